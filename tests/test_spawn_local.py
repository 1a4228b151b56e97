"""LocalSpawner: nodes as local processes, forked from a fork server, found again by registry."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import AsyncIterator

import pytest
from spawn_support import (  # noqa: F401  (fixtures)
    answers,
    get_json,
    local_leftovers,
    mesh_name,
    peermesh_home,
    start_parent,
    wait_for,
)

from mesh import Mesh, Peer
from mesh.errors import SpawnError
from mesh.models import NodeSpec
from mesh.spawn import LocalSpawner, reap, registry


@pytest.fixture
async def local(
    mesh_name: str, tmp_path: Path, peermesh_home: Path
) -> AsyncIterator[LocalSpawner]:
    spawner = LocalSpawner(mesh_name, tmp_path / "nodes")
    yield spawner
    await spawner.close()
    assert registry.read_records(mesh_name) == []


async def test_workspace_is_seeded_with_a_copy_of_the_folder(
    local: LocalSpawner, tmp_path: Path
) -> None:
    source = tmp_path / "project"
    (source / "src").mkdir(parents=True)
    (source / "src" / "main.py").write_text("print('hi')\n")

    node = await local.spawn(NodeSpec(name="seeded", workspace_from=str(source)))

    copy = tmp_path / "nodes" / node.id / "workspace" / "src" / "main.py"
    assert copy.read_text() == "print('hi')\n"
    copy.write_text("changed\n")
    assert (source / "src" / "main.py").read_text() == "print('hi')\n"


async def test_missing_seed_folder_is_refused_by_name(local: LocalSpawner, tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="nowhere"):
        await local.spawn(NodeSpec(name="seeded", workspace_from=str(tmp_path / "nowhere")))


async def test_each_node_runs_in_a_session_of_its_own(local: LocalSpawner) -> None:
    node = await local.spawn(NodeSpec(name="apart"))

    record = next(r for r in registry.read_records(local.mesh) if r.id == node.id)
    assert os.getsid(record.pid) == record.pid != os.getsid(0)


async def test_registry_names_each_node_but_never_its_token(
    local: LocalSpawner, peermesh_home: Path
) -> None:
    node = await local.spawn(NodeSpec(name="listed"))
    assert node.token is not None

    files = list((peermesh_home / "meshes" / local.mesh).glob("*.json"))
    texts = [f.read_text() for f in files]
    assert any(json.loads(t)["url"] == node.url for t in texts)
    assert all(node.token not in t for t in texts)


async def test_spawner_without_a_root_removes_its_folder_on_close(
    mesh_name: str, peermesh_home: Path
) -> None:
    spawner = LocalSpawner(mesh_name)
    await spawner.spawn(NodeSpec(name="temp"))
    assert spawner.root is not None and spawner.root.is_dir()

    await spawner.close()

    assert not spawner.root.exists()


async def test_nodes_stop_at_once_when_their_spawner_is_killed(
    mesh_name: str, tmp_path: Path, peermesh_home: Path
) -> None:
    parent, child = await start_parent("local", mesh_name, tmp_path / "nodes", 300.0)

    parent.kill()
    await parent.wait()

    # The fork server sees its spawner go and stops the node long before the lease would.
    async def stopped() -> bool:
        return not await answers(child.url)

    await wait_for(stopped, 15, "the node to stop")
    await reap(mesh_name)


async def test_reap_leaves_alone_a_process_that_reused_a_recorded_pid(
    mesh_name: str, peermesh_home: Path
) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        start_time = registry.process_start_time(bystander.pid)
        assert start_time is not None
        registry.register(registry.ProcessRecord(
            id="ghost", kind="node", mesh=mesh_name, pid=bystander.pid,
            start_time=start_time - 1,
        ))

        report = await reap(mesh_name)

        assert report.processes == []
        assert bystander.poll() is None
        assert registry.read_records(mesh_name) == []
    finally:
        bystander.kill()
        bystander.wait()


async def test_fan_out_of_thirty_two_nodes_all_come_up(local: LocalSpawner) -> None:
    nodes = await asyncio.gather(*(local.spawn(NodeSpec(name="many")) for _ in range(32)))

    assert len({n.url for n in nodes}) == 32
    assert all(await asyncio.gather(*(answers(n.url) for n in nodes)))


async def test_closing_the_mesh_also_stops_the_nodes_its_nodes_spawned(
    mesh_name: str, tmp_path: Path, peermesh_home: Path
) -> None:
    async with Mesh(mesh_name, backend="local", root_dir=tmp_path / "nodes") as mesh:
        parent = await mesh.spawn(name="parent")
        status, child = await get_json(f"{parent.url}/api/v1/peers", parent.token,
                                       method="POST", body={"name": "child"})
        assert status == 201 and await answers(child["url"])
        seen = registry.read_records(mesh_name)
        assert sorted(r.name for r in seen if r.kind == "node") == ["child", "parent"]

    assert not await answers(child["url"])
    assert local_leftovers(mesh_name, seen) == []


async def test_node_works_in_a_mounted_folder_in_place(
    local: LocalSpawner, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "README").write_text("shared\n")

    node = await local.spawn(NodeSpec(name="mounted", workspace_mount=str(project)))

    assert node.token is not None
    async with Peer(node.url, node.token) as peer:
        assert await peer.read_text("README") == "shared\n"
        await peer.exec("echo written > out.txt")
    assert (project / "out.txt").read_text() == "written\n"


async def test_missing_mounted_folder_is_refused_by_name(
    local: LocalSpawner, tmp_path: Path
) -> None:
    with pytest.raises(SpawnError, match="workspace_mount .*absent is not a folder"):
        await local.spawn(NodeSpec(name="mounted", workspace_mount=str(tmp_path / "absent")))


async def test_background_processes_a_node_adopted_are_collected_when_they_exit(
    local: LocalSpawner,
) -> None:
    from agent_runtime.orphans import zombie_children

    node = await local.spawn(NodeSpec(name="adopter"))
    async with Peer(node.url, node.token) as peer:
        # Each shell exits at once and leaves its sleep to the node, which adopts it.
        for _ in range(5):
            result = await peer.exec("sleep 0.2 & echo $PPID")
            assert result.exit_code == 0
        node_pid = int(result.stdout.strip())

        async def some_waiting() -> bool:
            return bool(zombie_children(node_pid))

        async def none_left() -> bool:
            return not zombie_children(node_pid)

        # The exited sleeps wait as zombies first: only the node's reaper collects them.
        await wait_for(some_waiting, timeout=10, what="the adopted sleeps to exit")
        await wait_for(none_left, timeout=15, what="the node to collect its exited orphans")
        assert (await peer.exec("true")).exit_code == 0
