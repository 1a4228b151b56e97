"""The same behaviour from both spawners: local processes and Docker containers, all real."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from spawn_support import (  # noqa: F401  (fixtures)
    BACKENDS,
    answers,
    container_exists,
    get_json,
    leftovers,
    mesh_name,
    peermesh_home,
    require_docker,
    spawner,
    start_parent,
    wait_for,
)

from mesh import Mesh
from mesh.errors import SpawnError
from mesh.models import NodeInfo, NodeSpec, NodeState
from mesh.spawn import Spawner, reap, registry
from mesh.spawn.docker import connect


async def crash(spawner: Spawner, node: NodeInfo) -> None:
    """Kill the node's process with SIGKILL, as a crash would."""
    if spawner.backend == "docker":
        # From inside: `docker kill` would be the engine removing the container on request.
        kill = ["sh", "-c", 'kill -9 $(pgrep -xf "python -m agent_runtime")']
        client = connect()
        try:
            container = client.containers.get(node.id)
            await asyncio.to_thread(container.exec_run, kill)
        finally:
            client.close()
        return
    record = next(r for r in registry.read_records(node.mesh) if r.id == node.id)
    os.kill(record.pid, signal.SIGKILL)


def kill_fork_servers(mesh: str) -> None:
    """Kill -9 a mesh's fork servers, as if the machine had lost them with their parent."""
    for record in registry.read_records(mesh):
        if record.kind == "forkserver":
            os.kill(record.pid, signal.SIGKILL)


async def gone(backend: str, node: NodeInfo) -> bool:
    """True once the node neither answers nor exists as a container or process."""
    if await answers(node.url):
        return False
    if backend == "docker":
        return not await asyncio.to_thread(container_exists, node.id)
    return not any(r.id == node.id and registry.is_alive(r)
                   for r in registry.read_records(node.mesh))


async def test_spawned_node_answers_with_its_own_token_and_refuses_others(
    spawner: Spawner,
) -> None:
    first = await spawner.spawn(NodeSpec(name="solo"))
    second = await spawner.spawn(NodeSpec(name="solo"))
    assert first.token and second.token and first.token != second.token

    status, health = await get_json(f"{first.url}/healthz")
    assert (status, health["status"], health["name"]) == (200, "ok", "solo")
    status, lease = await get_json(f"{first.url}/api/v1/lease", first.token)
    assert status == 200 and lease["enabled"] is True

    status, body = await get_json(f"{first.url}/api/v1/lease", second.token)
    assert status == 401 and body["error"]["code"] == "unauthorized"


async def test_eight_concurrent_spawns_of_one_name_get_distinct_nodes(spawner: Spawner) -> None:
    nodes = await asyncio.gather(*(spawner.spawn(NodeSpec(name="twin")) for _ in range(8)))

    assert len({n.id for n in nodes}) == 8
    assert len({n.url for n in nodes}) == 8
    for node in nodes:
        assert node.name == "twin" and node.state == NodeState.RUNNING
        assert await answers(node.url)
    listed = {n.id for n in await spawner.list()}
    assert listed >= {n.id for n in nodes}


async def test_stopped_node_is_gone_and_stopping_again_is_harmless(spawner: Spawner) -> None:
    node = await spawner.spawn(NodeSpec(name="brief"))

    await spawner.stop(node.id)

    assert await gone(spawner.backend, node)
    assert (await spawner.status(node.id)).state == NodeState.REMOVED
    assert node.id not in {n.id for n in await spawner.list()}
    await spawner.stop(node.id)


async def test_node_that_exits_while_starting_is_reported_with_its_exit_code(
    spawner: Spawner,
) -> None:
    with pytest.raises(SpawnError) as caught:
        await spawner.spawn(NodeSpec(name="broken", env={"MESH_PORT": "notanumber"}))

    message = str(caught.value)
    assert "exited with code 2 before ready" in message
    assert "port" in message
    assert "within" not in message


async def test_status_reports_a_node_that_crashed_after_start(spawner: Spawner) -> None:
    node = await spawner.spawn(NodeSpec(name="fragile"))

    await crash(spawner, node)

    async def crashed() -> bool:
        return (await spawner.status(node.id)).state == NodeState.CRASHED

    await wait_for(crashed, 30, "the node to be reported crashed")
    status = await spawner.status(node.id)
    assert status.exit_code == 128 + signal.SIGKILL
    assert "node.ready" in await spawner.logs(node.id)


async def test_parent_keeps_its_child_alive_by_renewing_the_lease(
    spawner: Spawner,
) -> None:
    node = await spawner.spawn(NodeSpec(name="leased", lease_s=1.0))

    async def renewed_three_times() -> bool:
        status, lease = await get_json(f"{node.url}/api/v1/lease", node.token)
        return status == 200 and lease["renewals"] >= 3

    # Three renewals a third of a lease apart: the node has outlived its first lease.
    await wait_for(renewed_three_times, 20, "three lease renewals")
    assert (await spawner.status(node.id)).state == NodeState.RUNNING


@pytest.mark.parametrize("backend", BACKENDS)
async def test_child_of_a_parent_killed_with_sigkill_stops_within_its_lease(
    backend: str, mesh_name: str, tmp_path: Path, peermesh_home: Path
) -> None:
    if backend == "docker":
        require_docker()
    lease_s = 2.0
    parent, child = await start_parent(backend, mesh_name, tmp_path / "nodes", lease_s)
    try:
        assert await answers(child.url)
        # The fork server first: it would stop the child once it saw its parent go.
        kill_fork_servers(mesh_name)
        parent.kill()
        await parent.wait()

        await wait_for(lambda: gone(backend, child), lease_s + 20, "the orphan to stop")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        await reap(mesh_name)
    assert await asyncio.to_thread(leftovers, backend, mesh_name, []) == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_reap_removes_what_a_crashed_run_left_behind(
    backend: str, mesh_name: str, tmp_path: Path, peermesh_home: Path
) -> None:
    if backend == "docker":
        require_docker()
    parent, child = await start_parent(backend, mesh_name, tmp_path / "nodes", 120.0)
    kill_fork_servers(mesh_name)
    parent.kill()
    await parent.wait()
    assert await answers(child.url)

    report = await reap(mesh_name)

    assert child.id in report.containers + report.processes
    assert not await answers(child.url)
    assert await asyncio.to_thread(leftovers, backend, mesh_name, []) == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_closing_the_mesh_leaves_nothing_of_it_behind(
    backend: str, mesh_name: str, tmp_path: Path, peermesh_home: Path
) -> None:
    if backend == "docker":
        require_docker()
    seen = []
    async with Mesh(mesh_name, backend=backend, root_dir=tmp_path / "nodes") as mesh:
        nodes = [await mesh.spawn(name="worker"), await mesh.spawn(NodeSpec(name="helper"))]
        for node in nodes:
            health = await mesh.peer(node).health()
            assert health.status == "ok"
        seen = registry.read_records(mesh_name)
        assert mesh.backend == backend

    for node in nodes:
        assert not await answers(node.url)
    assert await asyncio.to_thread(leftovers, backend, mesh_name, seen) == []
