"""DockerSpawner: real containers of the node image on the mesh's network, and nothing left."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import docker
import pytest
from spawn_support import (  # noqa: F401  (fixtures)
    container_exists,
    docker_leftovers,
    docker_problem,
    get_json,
    mesh_name,
    peermesh_home,
    require_docker,
    wait_for,
)

import mesh.spawn.docker as docker_spawn
from mesh.client import Peer
from mesh.errors import SpawnError, TaskFailed
from mesh.fanout import Assignment, BranchState, FailureKind, Outcome, fan_out
from mesh.models import NodeSpec, NodeState
from mesh.spawn import DockerSpawner, reap
from mesh.spawn.docker import DEFAULT_IMAGE, LABEL_MESH, connect

pytestmark = pytest.mark.docker


def shell(command: str) -> dict[str, Any]:
    """A step task that runs one shell command on the node."""
    return {"steps": [{"tool": "terminal_exec", "args": {"command": command}}]}


def stdout(outcome: Outcome) -> str:
    assert outcome.succeeded, outcome
    return str(outcome.result[0]["stdout"]).strip()


def docker_leftovers_containers(mesh: str) -> list[str]:
    """The mesh's containers that still exist (its network stays while its spawner is open)."""
    return [left for left in docker_leftovers(mesh) if left.startswith("container ")]


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


async def test_node_without_the_socket_says_so_refuses_to_spawn_and_serves_the_rest(
    spawner: DockerSpawner,
) -> None:
    node = await spawner.spawn(
        NodeSpec(name="boxed", labels={"peermesh.docker-socket": "false"})
    )

    status, health = await get_json(f"{node.url}/healthz")
    assert (status, health["status"], health["docker_socket"]) == (200, "ok", False)
    status, body = await get_json(f"{node.url}/api/v1/peers", node.token, method="POST",
                                  body={"name": "never"})
    assert status == 503
    assert "no Docker socket at /var/run/docker.sock" in body["error"]["message"]

    async with Peer(node.url, node.token) as peer:
        handle = await peer.submit(steps=[{"tool": "spawn_peer", "args": {"name": "never"}}])
        with pytest.raises(TaskFailed) as caught:
            await handle.result(timeout=60)
        assert "no Docker socket at /var/run/docker.sock" in str(caught.value)

        await peer.write("notes/plan.txt", b"still a whole computer\n")
        ran = await peer.exec("cat notes/plan.txt && uname -s")
        assert ran.exit_code == 0
        assert ran.stdout.splitlines() == ["still a whole computer", "Linux"]


async def test_spawner_without_a_socket_names_the_missing_socket(
    monkeypatch: pytest.MonkeyPatch, mesh_name: str
) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setenv("MESH_DOCKER_SOCKET", "/nonexistent/docker.sock")
    spawner = DockerSpawner(mesh_name)

    with pytest.raises(SpawnError, match="no Docker socket at /nonexistent/docker.sock"):
        await spawner.spawn(NodeSpec(name="nowhere"))
    await spawner.close()

    monkeypatch.undo()
    if docker_problem() is None:
        assert await asyncio.to_thread(docker_leftovers, mesh_name) == []


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


async def test_node_that_never_answers_fails_once_its_ready_wait_runs_out(
    spawner: DockerSpawner,
) -> None:
    spawner.ready_timeout_s = 4
    # The node listens on another port than the one published: alive, but never healthy.
    with pytest.raises(SpawnError) as caught:
        await spawner.spawn(NodeSpec(name="deaf", env={"MESH_PORT": "8799"}))

    assert "did not become ready within 4 s" in str(caught.value)
    assert await asyncio.to_thread(docker_leftovers_containers, spawner.mesh) == []


async def test_peers_reach_a_node_by_its_internal_url_on_the_mesh_network(
    spawner: DockerSpawner, engine: docker.DockerClient
) -> None:
    first, second = await asyncio.gather(spawner.spawn(NodeSpec(name="first")),
                                         spawner.spawn(NodeSpec(name="second")))

    assert second.internal_url == f"http://{second.id}:8700"
    probe = ("import urllib.request; "
             f"print(urllib.request.urlopen('{second.internal_url}/healthz').read().decode())")
    result = await asyncio.to_thread(
        engine.containers.get(first.id).exec_run, ["python3", "-c", probe]
    )
    assert result.exit_code == 0 and '"second"' in result.output.decode(), result.output


# -- fan-out on containers: each branch's failure stays its own --------------------------------


async def test_fan_out_on_three_containers_brings_back_two_results_and_one_failure(
    spawner: DockerSpawner,
) -> None:
    assignments = [
        Assignment(task=shell("echo alpha"), spec=NodeSpec(name="alpha")),
        Assignment(task=shell("echo broken >&2; exit 3"), spec=NodeSpec(name="broken")),
        Assignment(task=shell("echo gamma"), spec=NodeSpec(name="gamma")),
    ]

    outcomes = await fan_out(assignments, spawner=spawner, limit=3, timeout=120)

    assert [o.name for o in outcomes] == ["alpha", "broken", "gamma"]
    assert [o.succeeded for o in outcomes] == [True, False, True]
    assert (stdout(outcomes[0]), stdout(outcomes[2])) == ("alpha", "gamma")
    assert outcomes[1].failure is FailureKind.TASK_FAILED
    # The fan-out stops the containers it spawned for its branches.
    assert await asyncio.to_thread(docker_leftovers_containers, spawner.mesh) == []


async def test_container_removed_mid_task_fails_its_branch_as_gone_and_the_others_finish(
    spawner: DockerSpawner,
) -> None:
    doomed_running = asyncio.Event()

    def on_progress(index: int, name: str, state: BranchState, detail: str) -> None:
        if name == "doomed" and state is BranchState.RUNNING:
            doomed_running.set()

    async def remove_doomed() -> None:
        await doomed_running.wait()
        nodes = await spawner.list()
        doomed = next(n for n in nodes if n.name == "doomed")
        remove = await asyncio.create_subprocess_exec(
            "docker", "rm", "-f", doomed.id, stdout=subprocess.DEVNULL)
        assert await remove.wait() == 0

    assignments = [
        Assignment(task=shell("sleep 3; echo steady"), spec=NodeSpec(name="steady")),
        Assignment(task=shell("sleep 300"), spec=NodeSpec(name="doomed")),
        Assignment(task=shell("sleep 3; echo calm"), spec=NodeSpec(name="calm")),
    ]

    outcomes, _ = await asyncio.gather(
        fan_out(assignments, spawner=spawner, limit=3, timeout=240, on_progress=on_progress),
        remove_doomed(),
    )

    steady, doomed, calm = outcomes
    assert (stdout(steady), stdout(calm)) == ("steady", "calm")
    assert doomed.failure is FailureKind.NODE_REMOVED, doomed
    assert "is gone" in (doomed.reason or "")
    # It failed as soon as its node went, not when its command or the fan-out would have ended.
    assert doomed.duration_s < 120


# -- nodes inside containers -------------------------------------------------------------------


async def test_children_of_a_node_container_killed_with_sigkill_stop_once_their_lease_ends(
    spawner: DockerSpawner, engine: docker.DockerClient
) -> None:
    lead = await spawner.spawn(NodeSpec(name="lead"))
    status, child = await get_json(f"{lead.url}/api/v1/peers", lead.token, method="POST",
                                   body={"name": "orphan", "lease_s": 3})
    assert status == 201, child
    assert await asyncio.to_thread(container_exists, child["id"])

    # SIGKILL to the container's init takes every process of the lead down at once.
    await asyncio.to_thread(engine.containers.get(lead.id).kill)

    async def orphan_gone() -> bool:
        return not await asyncio.to_thread(container_exists, child["id"])

    await wait_for(orphan_gone, 3 + 20, "the lead's child to stop")


async def test_node_in_a_container_spawns_a_peer_with_its_tool_and_uses_it_by_url(
    spawner: DockerSpawner, engine: docker.DockerClient
) -> None:
    lead = await spawner.spawn(NodeSpec(name="lead"))

    async with Peer(lead.url, lead.token) as peer:
        spawned = await (await peer.submit(
            steps=[{"tool": "spawn_peer", "args": {"name": "writer"}}]
        )).result(timeout=120)
        writer = spawned.result[0]
        work = [{"tool": "write_file", "args": {"path": "out/report.txt",
                                                "content": "written by the writer\n"}}]
        used = await (await peer.submit(steps=[
            {"tool": "assign_task", "args": {"node": writer["url"], "steps": work}},
            {"tool": "read_peer_file", "args": {"node": writer["url"], "path": "out/report.txt"}},
        ])).result(timeout=120)

    assert writer["url"] == f"http://{writer['id']}:8700"
    assert used.result[0]["status"] == "completed"
    assert used.result[1] == "written by the writer\n"
    labels = engine.containers.get(writer["id"]).labels
    assert (labels[LABEL_MESH], labels["peermesh.parent"]) == (spawner.mesh, "lead")
    # The file is the writer's own: the lead's workspace does not have it.
    result = await asyncio.to_thread(
        engine.containers.get(lead.id).exec_run, ["test", "-e", "/workspace/out/report.txt"]
    )
    assert result.exit_code == 1
