"""Fan-out on real local nodes: each branch's failure stays its own, in the library and as the
node's peer tools."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from spawn_support import (  # noqa: F401  (fixtures)
    answers,
    get_json,
    local_leftovers,
    mesh_name,
    peermesh_home,
    wait_for,
)

from agent_runtime.scripted_model import ScriptedModelServer, ToolCall, Turn
from mesh.client import Peer
from mesh.errors import ConfigError
from mesh.fanout import Assignment, BranchState, FailureKind, Outcome, fan_out
from mesh.models import NodeInfo, NodeSpec, NodeState, TaskStatus
from mesh.spawn import LocalSpawner, reap, registry

PEER_TOOLS = {"spawn_peer", "assign_task", "read_peer_file", "fan_out"}


@pytest.fixture
async def local(
    mesh_name: str, tmp_path: Path, peermesh_home: Path
) -> AsyncIterator[LocalSpawner]:
    """A real LocalSpawner; afterwards no process or record of its mesh may remain."""
    spawner = LocalSpawner(mesh_name, tmp_path / "nodes")
    seen: list[registry.ProcessRecord] = []
    try:
        yield spawner
    finally:
        seen = registry.read_records(mesh_name)
        await spawner.close()
        left = await asyncio.to_thread(local_leftovers, mesh_name, seen)
        if left:
            await reap(mesh_name)
        assert not left, f"mesh {mesh_name} left behind: {', '.join(left)}"


def shell(command: str) -> dict[str, Any]:
    """A step task that runs one shell command on the node."""
    return {"steps": [{"tool": "terminal_exec", "args": {"command": command}}]}


def timed(log: Path, name: str, command: str) -> dict[str, Any]:
    """A step task that notes in a shared log when it starts and when it ends."""
    return shell(f"echo start {name} >> {log}; {command}; echo end {name} >> {log}")


def most_at_once(log: Path) -> int:
    """The most branches that were between their start and end lines at the same time."""
    running = peak = 0
    for line in log.read_text().splitlines():
        running += 1 if line.startswith("start ") else -1
        peak = max(peak, running)
    return peak


def stdout(outcome: Outcome) -> str:
    return str(outcome.result[0]["stdout"]).strip()


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def pid_of(mesh: str, name: str) -> int:
    return next(r.pid for r in registry.read_records(mesh) if r.name == name)


# -- the library ------------------------------------------------------------------------------


async def test_failing_branch_is_reported_alone_and_the_others_come_back_in_order(
    local: LocalSpawner, tmp_path: Path
) -> None:
    log = tmp_path / "intervals.log"
    assignments = [
        Assignment(task=timed(log, "tests", "sleep 1; echo 12 passed"),
                   spec=NodeSpec(name="tests")),
        Assignment(task=timed(log, "lint", "sleep 1; echo 'E501 too long' >&2; exit 3"),
                   spec=NodeSpec(name="lint")),
        Assignment(task=timed(log, "types", "sleep 1; echo 'no issues'"),
                   spec=NodeSpec(name="types")),
    ]

    outcomes = await fan_out(assignments, spawner=local, limit=3)

    assert [o.name for o in outcomes] == ["tests", "lint", "types"]
    assert [o.index for o in outcomes] == [0, 1, 2]
    assert [o.status for o in outcomes] == ["succeeded", "failed", "succeeded"]
    assert stdout(outcomes[0]) == "12 passed"
    assert stdout(outcomes[2]) == "no issues"
    failed = outcomes[1]
    assert failed.failure is FailureKind.TASK_FAILED
    assert failed.reason is not None
    assert "exited with 3" in failed.reason and "E501 too long" in failed.reason
    assert failed.result is None and failed.task_id is not None
    assert most_at_once(log) == 3


async def test_node_killed_mid_task_fails_its_branch_as_crashed_and_spares_the_others(
    local: LocalSpawner, tmp_path: Path
) -> None:
    sleeper_pid = tmp_path / "victim.pid"
    assignments = [
        Assignment(task=shell("sleep 2; echo first"), spec=NodeSpec(name="first")),
        Assignment(task=shell(f"echo $$ > {sleeper_pid}; exec sleep 60"),
                   spec=NodeSpec(name="victim")),
        Assignment(task=shell("sleep 2; echo third"), spec=NodeSpec(name="third")),
    ]
    job = asyncio.create_task(fan_out(assignments, spawner=local, timeout=90))
    try:
        async def sleeping() -> bool:
            return sleeper_pid.exists() and sleeper_pid.read_text().strip() != ""

        await wait_for(sleeping, 30, "the victim's command to start")
        os.kill(pid_of(local.mesh, "victim"), signal.SIGKILL)

        outcomes = await job

        # The node's command ran in a session of its own; it must not outlive its node.
        sleeper = int(sleeper_pid.read_text())

        async def sleeper_gone() -> bool:
            return not running(sleeper)

        await wait_for(sleeper_gone, 15, "the killed node's command to stop")
    finally:
        if sleeper_pid.exists() and running(int(sleeper_pid.read_text())):
            os.kill(int(sleeper_pid.read_text()), signal.SIGKILL)

    assert [o.status for o in outcomes] == ["succeeded", "failed", "succeeded"]
    assert [stdout(outcomes[0]), stdout(outcomes[2])] == ["first", "third"]
    victim = outcomes[1]
    assert victim.failure is FailureKind.NODE_CRASHED
    assert victim.reason is not None
    assert "victim" in victim.reason and f"code {128 + signal.SIGKILL}" in victim.reason


async def test_hanging_branch_times_out_alone_and_its_node_is_stopped(
    local: LocalSpawner,
) -> None:
    seen: dict[str, str] = {}

    async def note_nodes(index: int, name: str, state: BranchState, detail: str) -> None:
        if state is BranchState.RUNNING and name not in seen:
            seen[name] = next(n.url for n in await local.list() if n.name == name)

    assignments = [
        Assignment(task=shell("echo quick"), spec=NodeSpec(name="quick")),
        Assignment(task=shell("sleep 600"), spec=NodeSpec(name="stuck")),
        Assignment(task=shell("echo also-quick"), spec=NodeSpec(name="also")),
    ]

    outcomes = await fan_out(assignments, spawner=local, timeout=8, on_progress=note_nodes)

    assert [o.status for o in outcomes] == ["succeeded", "failed", "succeeded"]
    assert [stdout(outcomes[0]), stdout(outcomes[2])] == ["quick", "also-quick"]
    stuck = outcomes[1]
    assert stuck.failure is FailureKind.TIMED_OUT
    assert stuck.reason == "no result within 8 s"
    assert not await answers(seen["stuck"])
    assert await local.list() == []


async def test_no_more_than_limit_branches_run_at_once(
    local: LocalSpawner, tmp_path: Path
) -> None:
    log = tmp_path / "intervals.log"
    states: list[tuple[str, BranchState]] = []

    def note(index: int, name: str, state: BranchState, detail: str) -> None:
        states.append((name, state))

    assignments = [
        Assignment(task=timed(log, f"b{i}", "sleep 0.5"), spec=NodeSpec(name=f"b{i}"))
        for i in range(5)
    ]

    outcomes = await fan_out(assignments, spawner=local, limit=2, on_progress=note)

    assert all(o.succeeded for o in outcomes)
    assert most_at_once(log) == 2
    # The nodes count too: never more than two spawned and not yet done.
    alive = peak = 0
    for _, state in states:
        if state is BranchState.SPAWNING:
            alive += 1
        elif state in (BranchState.SUCCEEDED, BranchState.FAILED):
            alive -= 1
        peak = max(peak, alive)
    assert peak == 2


async def test_cancelling_the_fan_out_cancels_its_tasks_and_stops_the_nodes_it_spawned(
    local: LocalSpawner,
) -> None:
    existing = await local.spawn(NodeSpec(name="existing"))
    running: set[str] = set()

    def note(index: int, name: str, state: BranchState, detail: str) -> None:
        if state is BranchState.RUNNING and detail == "terminal_exec":
            running.add(name)

    assignments = [
        Assignment(task=shell("sleep 600"), node=existing),
        Assignment(task=shell("sleep 600"), spec=NodeSpec(name="spawned-a")),
        Assignment(task=shell("sleep 600"), spec=NodeSpec(name="spawned-b")),
    ]
    job = asyncio.create_task(fan_out(assignments, spawner=local, on_progress=note))

    async def all_running() -> bool:
        return len(running) == 3

    await wait_for(all_running, 30, "all three branches to run their command")
    spawned = [n for n in await local.list() if n.id != existing.id]
    assert len(spawned) == 2

    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job

    for node in spawned:
        assert (await local.status(node.id)).state is NodeState.REMOVED
        assert not await answers(node.url)
    assert existing.token is not None
    async with Peer(existing.url, existing.token) as peer:
        tasks = await peer.tasks()
    assert [t.status for t in tasks] == [TaskStatus.CANCELLED]
    assert (await local.status(existing.id)).state is NodeState.RUNNING


async def test_branches_that_cannot_start_fail_with_their_reason_and_spare_the_others(
    local: LocalSpawner,
) -> None:
    nowhere = NodeInfo(id="ghost", name="ghost", url="http://127.0.0.1:9", token="t",
                       backend="local", mesh="elsewhere", spawned_at=0.0)
    assignments = [
        Assignment(task=shell("echo fine"), spec=NodeSpec(name="fine")),
        Assignment(task=shell("echo never"), node=nowhere),
        Assignment(task=shell("echo never"),
                   spec=NodeSpec(name="broken", env={"MESH_PORT": "notanumber"})),
    ]

    outcomes = await fan_out(assignments, spawner=local)

    assert [o.status for o in outcomes] == ["succeeded", "failed", "failed"]
    assert stdout(outcomes[0]) == "fine"
    assert outcomes[1].failure is FailureKind.UNREACHABLE
    assert outcomes[1].reason is not None and "cannot reach" in outcomes[1].reason
    assert outcomes[2].failure is FailureKind.SPAWN_FAILED
    assert outcomes[2].reason is not None and "exited with code 2" in outcomes[2].reason


async def test_assignment_with_neither_node_nor_spec_is_refused_before_anything_starts(
    local: LocalSpawner,
) -> None:
    with pytest.raises(ConfigError, match="assignment 1 names neither a node nor a spec"):
        await fan_out([Assignment(task=shell("true"), spec=NodeSpec(name="ok")),
                       Assignment(task=shell("true"))], spawner=local)

    with pytest.raises(ConfigError, match="limit must be at least 1"):
        await fan_out([Assignment(task=shell("true"), spec=NodeSpec(name="ok"))],
                      spawner=local, limit=0)
    assert await local.list() == []


# -- through a node's peer tools --------------------------------------------------------------


async def run_steps(node: NodeInfo, steps: list[dict[str, Any]], timeout: float = 60) -> Any:
    """Run a step task on a node and return its result; fail the test with its error."""
    assert node.token is not None
    async with Peer(node.url, node.token) as peer:
        task = await (await peer.submit(steps=steps)).result(timeout=timeout)
    return task.result


async def test_node_spawns_a_sibling_assigns_it_work_by_url_and_reads_its_file(
    local: LocalSpawner,
) -> None:
    parent = await local.spawn(NodeSpec(name="parent"))
    write_report = [{"tool": "write_file", "args": {"path": "report.txt",
                                                     "content": "all green\n"}}]

    spawned, _ = await run_steps(parent, [
        {"tool": "spawn_peer", "args": {"name": "helper"}},
        {"tool": "terminal_exec", "args": {"command": "true"}},
    ])
    helper_url = spawned["url"]
    assert helper_url != parent.url and await answers(helper_url)

    assigned, text = await run_steps(parent, [
        {"tool": "assign_task", "args": {"node": helper_url, "steps": write_report}},
        {"tool": "read_peer_file", "args": {"node": helper_url, "path": "report.txt"}},
    ])

    assert assigned["status"] == "completed"
    assert text == "all green\n"

    [waited] = await run_steps(parent, [
        {"tool": "assign_task", "check": False, "args": {
            "node": "helper", "timeout_s": 0.5,
            "steps": [{"tool": "terminal_exec", "args": {"command": "sleep 30"}}]}},
    ])
    assert "did not end within 0.5 s and is still running" in waited["error"]
    status, children = await get_json(f"{parent.url}/api/v1/peers", parent.token)
    assert status == 200
    assert [(c["name"], c["url"], c["parent"]) for c in children] == [
        ("helper", helper_url, "parent")]
    # The sibling is a process of the same mesh, found by `mesh down` like any other.
    helper = next(r for r in registry.read_records(local.mesh) if r.name == "helper")
    assert registry.is_alive(helper) and helper.url == helper_url


async def test_assigned_task_on_a_sibling_killed_mid_task_fails_at_once_as_gone(
    local: LocalSpawner,
) -> None:
    parent = await local.spawn(NodeSpec(name="parent"))
    await run_steps(parent, [{"tool": "spawn_peer", "args": {"name": "victim"}}])
    victim = next(r for r in registry.read_records(local.mesh) if r.name == "victim")

    _, [child] = await get_json(f"{parent.url}/api/v1/peers", parent.token)

    async with Peer(parent.url, str(parent.token)) as peer, \
            Peer(child["url"], child["token"]) as on_victim:
        handle = await peer.submit(steps=[{"tool": "assign_task", "args": {
            "node": "victim", "steps": [{"tool": "terminal_exec",
                                         "args": {"command": "sleep 60"}}]}}])

        async def victim_busy() -> bool:
            return bool(await on_victim.tasks(status="running"))

        await wait_for(victim_busy, timeout=15, what="the assigned task to run on the victim")
        os.kill(victim.pid, signal.SIGKILL)
        async with asyncio.timeout(15):
            async for _ in handle.events():
                pass
        task = await handle.get()

    assert task.status is TaskStatus.FAILED
    assert "node victim is gone: it exited with code" in (task.error or "")


async def test_fan_out_tool_returns_each_branch_with_the_failure_on_its_own(
    local: LocalSpawner,
) -> None:
    parent = await local.spawn(NodeSpec(name="parent"))
    branches = [
        {"spawn": "unit", "steps": [{"tool": "terminal_exec",
                                     "args": {"command": "echo 30 passed"}}]},
        {"spawn": "flaky", "steps": [{"tool": "terminal_exec",
                                      "args": {"command": "echo boom >&2; exit 1"}}]},
        {"spawn": "docs", "steps": [{"tool": "terminal_exec",
                                     "args": {"command": "echo built"}}]},
    ]

    [outcomes] = await run_steps(parent, [
        {"tool": "fan_out", "args": {"assignments": branches, "limit": 3, "timeout_s": 60}},
    ])

    assert [(o["branch"], o["status"], o["failure"]) for o in outcomes] == [
        ("unit", "succeeded", None), ("flaky", "failed", "task failed"),
        ("docs", "succeeded", None)]
    assert outcomes[0]["result"][0]["stdout"] == "30 passed\n"
    assert "boom" in outcomes[1]["reason"]
    # Specialists spawned for the fan-out are stopped once it is done.
    status, children = await get_json(f"{parent.url}/api/v1/peers", parent.token)
    assert (status, children) == (200, [])

    async def only_parent_left() -> bool:
        records = registry.read_records(local.mesh)
        return [r.name for r in records if r.kind == "node" and registry.is_alive(r)] == [
            "parent"]

    await wait_for(only_parent_left, 15, "the specialists to stop")


async def test_orchestrator_mode_offers_the_peer_tools_and_works_through_them(
    local: LocalSpawner, scripted: ScriptedModelServer
) -> None:
    parent = await local.spawn(NodeSpec(
        name="boss", model="openai/scripted", api_base=scripted.api_base,
        env={"MESH_API_KEY": "scripted"},
    ))
    scripted.add(
        Turn(tool_calls=[ToolCall("spawn_peer", {"name": "worker"})]),
        Turn(tool_calls=[ToolCall("assign_task", {"node": "worker", "steps": [
            {"tool": "write_file", "args": {"path": "notes.md", "content": "done by worker"}},
        ]})]),
        Turn(tool_calls=[ToolCall("read_peer_file", {"node": "worker", "path": "notes.md"})]),
        Turn(text="The worker wrote: done by worker"),
    )
    assert parent.token is not None

    async with Peer(parent.url, parent.token) as peer:
        handle = await peer.submit("Have a worker write notes.md", mode="orchestrator")
        results = [e.data for e in [event async for event in handle.events()]
                   if e.type == "tool_result"]
        task = await handle.result(timeout=60)

    assert task.result == "The worker wrote: done by worker"
    offered = {tool["function"]["name"] for tool in scripted.requests[0]["tools"]}
    assert PEER_TOOLS <= offered
    assert not {"terminal_exec", "write_file"} & offered
    assert [(r["tool"], r["ok"]) for r in results] == [
        ("spawn_peer", True), ("assign_task", True), ("read_peer_file", True)]
    assert "done by worker" in results[2]["output"]


async def test_node_peer_routes_spawn_list_show_log_and_stop_a_sibling(
    local: LocalSpawner,
) -> None:
    parent = await local.spawn(NodeSpec(name="parent"))
    peers = f"{parent.url}/api/v1/peers"

    status, child = await get_json(peers, parent.token, method="POST", body={"name": "kid"})
    assert status == 201 and child["name"] == "kid" and child["parent"] == "parent"
    status, shown = await get_json(f"{peers}/kid", parent.token)
    assert (status, shown["id"], shown["state"]) == (200, child["id"], "running")
    status, listed = await get_json(peers, parent.token)
    assert [c["id"] for c in listed] == [child["id"]]
    assert child["token"] and child["token"] != parent.token

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{peers}/{child['id']}/logs?tail=50",
                               headers={"Authorization": f"Bearer {parent.token}"}) as reply:
            assert reply.status == 200
            assert "node.ready" in await reply.text()

    status, _ = await get_json(f"{peers}/{child['id']}", parent.token, method="DELETE")
    assert status == 204
    assert not await answers(child["url"])
    status, listed = await get_json(peers, parent.token)
    assert (status, listed) == (200, [])


async def test_node_peer_routes_refuse_bad_requests_naming_what_was_wrong(
    local: LocalSpawner,
) -> None:
    parent = await local.spawn(NodeSpec(name="parent"))
    peers = f"{parent.url}/api/v1/peers"

    status, body = await get_json(peers, parent.token, method="POST", body={"name": "Not OK"})
    assert status == 400 and "name" in body["error"]["message"]
    status, body = await get_json(peers, parent.token, method="POST",
                                  body={"name": "kid", "colour": "blue"})
    assert status == 400 and "colour" in body["error"]["message"]
    status, body = await get_json(peers, parent.token, method="POST",
                                  body={"name": "kid", "workspace_from": "/no/such/folder"})
    assert status == 400 and body["error"]["details"] == {"field": "workspace_from"}
    assert "/no/such/folder is not a folder" in body["error"]["message"]
    status, body = await get_json(f"{peers}/nobody", parent.token)
    assert status == 404 and "no peer 'nobody'" in body["error"]["message"]
    status, body = await get_json(f"{peers}/{parent.id}/logs?tail=all", parent.token)
    assert status == 404 and "known peers: none" in body["error"]["message"]
    assert await local.list() == [await local.status(parent.id)]


async def test_a_failing_progress_callback_costs_no_branch(local: LocalSpawner) -> None:
    def broken(index: int, name: str, state: BranchState, detail: str) -> None:
        raise RuntimeError("the display broke")

    existing = await local.spawn(NodeSpec(name="existing"))
    outcomes = await fan_out([Assignment(task=shell("echo one"), node=existing),
                              Assignment(task=shell("echo two"), node=existing)],
                             on_progress=broken)

    assert [stdout(o) for o in outcomes] == ["one", "two"]
