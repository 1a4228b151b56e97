"""DockerSpawner: real containers of the node image on the mesh's network, and nothing left."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import docker
import pytest
from spawn_support import (  # noqa: F401  (fixtures)
    docker_leftovers,
    get_json,
    mesh_name,
    peermesh_home,
    require_docker,
    wait_for,
)

import mesh.spawn.docker as docker_spawn
from mesh.errors import SpawnError
from mesh.models import NodeSpec, NodeState
from mesh.spawn import DockerSpawner, reap
from mesh.spawn.docker import DEFAULT_IMAGE, LABEL_MESH, connect

pytestmark = pytest.mark.docker


@pytest.fixture
def engine() -> Iterator[docker.DockerClient]:
    require_docker()
    client = connect()
    yield client
    client.close()


@pytest.fixture
async def spawner(
    engine: docker.DockerClient, mesh_name: str, peermesh_home: Path
) -> AsyncIterator[DockerSpawner]:
    spawner = DockerSpawner(mesh_name)
    try:
        yield spawner
    finally:
        await spawner.close()
        left = await asyncio.to_thread(docker_leftovers, mesh_name)
        if left:
            await reap(mesh_name)
        assert not left, f"mesh {mesh_name} left behind: {', '.join(left)}"


async def test_container_carries_the_labels_limits_and_network_of_its_spec(
    spawner: DockerSpawner, engine: docker.DockerClient
) -> None:
    before = time.time()
    node = await spawner.spawn(
        NodeSpec(name="shaped", cpus=0.5, memory="256m", pids=200, labels={"team": "qa"}),
        parent="lead",
    )

    container = engine.containers.get(node.id)
    labels = container.labels
    assert labels[LABEL_MESH] == spawner.mesh
    assert (labels["peermesh.node"], labels["peermesh.parent"], labels["team"]) == (
        "shaped", "lead", "qa")
    assert before - 1 <= float(labels["peermesh.spawned_at"]) <= time.time()
    host = container.attrs["HostConfig"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == host["MemorySwap"] == 256 * 1024 * 1024
    assert host["PidsLimit"] == 200
    assert host["AutoRemove"] is True
    binding = host["PortBindings"]["8700/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"
    assert node.url.startswith("http://127.0.0.1:")
    assert list(container.attrs["NetworkSettings"]["Networks"]) == [f"peermesh-{spawner.mesh}"]
    assert node.id.startswith(f"pm-{spawner.mesh}-shaped-")


async def test_node_killed_for_memory_is_reported_oom_killed(
    spawner: DockerSpawner, engine: docker.DockerClient
) -> None:
    node = await spawner.spawn(NodeSpec(name="hungry", memory="128m"))

    # Make the node the OOM killer's first choice, then let a command eat the memory.
    script = ('echo 1000 > /proc/$(pgrep -xf "python -m agent_runtime")/oom_score_adj && '
              'python3 -c "b = b\'x\' * (512 << 20)"')
    await asyncio.to_thread(engine.containers.get(node.id).exec_run, ["sh", "-c", script])

    async def oom_killed() -> bool:
        return (await spawner.status(node.id)).state == NodeState.OOM_KILLED

    await wait_for(oom_killed, 30, "the node to be reported OOM-killed")
    assert (await spawner.status(node.id)).exit_code == 137


async def test_stale_container_holding_the_first_name_does_not_block_a_spawn(
    spawner: DockerSpawner, engine: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_name = f"pm-{spawner.mesh}-web-5ca1ed"
    engine.containers.create(DEFAULT_IMAGE, name=stale_name,
                             labels={LABEL_MESH: spawner.mesh})
    suffixes = itertools.chain(["5ca1ed"], iter(lambda: "f00d01", None))
    monkeypatch.setattr(docker_spawn, "new_suffix", lambda: next(suffixes))

    node = await spawner.spawn(NodeSpec(name="web"))

    assert node.id == f"pm-{spawner.mesh}-web-f00d01"
    status, _ = await get_json(f"{node.url}/healthz")
    assert status == 200
    # The stale one is a leftover of a crashed run: reaping the mesh takes it.
    report = await reap(spawner.mesh)
    assert stale_name in report.containers


async def test_workspace_is_seeded_with_a_copy_of_the_folder(
    spawner: DockerSpawner, engine: docker.DockerClient, tmp_path: Path
) -> None:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("seeded\n")

    node = await spawner.spawn(NodeSpec(name="seeded", workspace_from=str(tmp_path / "project")))

    result = await asyncio.to_thread(
        engine.containers.get(node.id).exec_run, ["cat", "/workspace/notes.txt"]
    )
    assert result.output == b"seeded\n"


async def test_node_spawns_a_sibling_through_the_mounted_socket(
    spawner: DockerSpawner, engine: docker.DockerClient
) -> None:
    lead = await spawner.spawn(NodeSpec(name="lead"))
    status, health = await get_json(f"{lead.url}/healthz")
    assert health["docker_socket"] is True

    status, sibling = await get_json(f"{lead.url}/api/v1/peers", lead.token, method="POST",
                                     body={"name": "helper"})

    assert status == 201, sibling
    assert sibling["url"] == f"http://{sibling['id']}:8700"
    labels = engine.containers.get(sibling["id"]).labels
    assert labels[LABEL_MESH] == spawner.mesh and labels["peermesh.parent"] == "lead"
    # The lead reaches its sibling by name on the mesh network.
    probe = f"import urllib.request; urllib.request.urlopen('{sibling['url']}/healthz')"
    result = await asyncio.to_thread(
        engine.containers.get(lead.id).exec_run, ["python3", "-c", probe]
    )
    assert result.exit_code == 0, result.output


async def test_node_without_the_socket_says_so_and_refuses_to_spawn(
    spawner: DockerSpawner,
) -> None:
    node = await spawner.spawn(
        NodeSpec(name="boxed", labels={"peermesh.docker-socket": "false"})
    )

    status, health = await get_json(f"{node.url}/healthz")
    assert health["docker_socket"] is False
    status, body = await get_json(f"{node.url}/api/v1/peers", node.token, method="POST",
                                  body={"name": "never"})
    assert status == 503
    assert "/var/run/docker.sock" in body["error"]["message"]


async def test_spawner_without_a_socket_names_the_missing_socket(
    monkeypatch: pytest.MonkeyPatch, mesh_name: str
) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setenv("MESH_DOCKER_SOCKET", "/nonexistent/docker.sock")
    spawner = DockerSpawner(mesh_name)

    with pytest.raises(SpawnError, match="no Docker socket at /nonexistent/docker.sock"):
        await spawner.spawn(NodeSpec(name="nowhere"))
    await spawner.close()


async def test_missing_image_is_named_with_how_to_build_it(
    engine: docker.DockerClient, mesh_name: str, peermesh_home: Path
) -> None:
    spawner = DockerSpawner(mesh_name, image="peermesh-node:does-not-exist")
    try:
        with pytest.raises(SpawnError, match="build-image.sh"):
            await spawner.spawn(NodeSpec(name="imageless"))
    finally:
        await spawner.close()
    assert await asyncio.to_thread(docker_leftovers, mesh_name) == []
