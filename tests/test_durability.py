"""A node's state survives it: restarts find every task and event, signals stop it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from mesh import procfs
from tests.conftest import TOKEN, NodeProcess

HEADERS = {"Authorization": f"Bearer {TOKEN}"}


async def _wait_event(session: aiohttp.ClientSession, url: str, task_id: str,
                      predicate: Any) -> None:
    async with session.ws_connect(f"{url}/api/v1/agent/ws?task_id={task_id}&after=0") as ws:
        async for message in ws:
            if predicate(message.json()):
                return
    raise AssertionError("stream ended before the awaited event")


async def _task_events(session: aiohttp.ClientSession, url: str,
                       task_id: str) -> list[dict[str, Any]]:
    response = await session.get(f"{url}/api/v1/agent/tasks/{task_id}/events?after=0")
    text = await response.text()
    return [
        json.loads(line[6:])
        for line in text.splitlines() if line.startswith("data: ")
    ]


async def test_killed_node_restarts_with_its_task_interrupted_and_events_kept(
    node_process: NodeProcess,
) -> None:
    node_process.start()
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        response = await session.post(f"{node_process.url}/api/v1/agent/tasks", json={
            "steps": [
                {"tool": "terminal_exec", "args": {"command": "echo before"}},
                {"tool": "terminal_exec", "args": {"command": "sleep 30"}},
            ]})
        task_id = (await response.json())["id"]
        await asyncio.wait_for(_wait_event(
            session, node_process.url, task_id,
            lambda e: e["type"] == "tool_use" and e["data"]["call_id"] == "step-1"), 15)

        node_process.kill(signal.SIGKILL)
        node_process.start()

        task = await (await session.get(
            f"{node_process.url}/api/v1/agent/tasks/{task_id}")).json()
        events = await _task_events(session, node_process.url, task_id)

    assert task["status"] == "interrupted"
    types = [event["type"] for event in events]
    assert types == ["task.created", "task.started", "tool_use", "tool_result", "tool_use",
                     "task.interrupted"]
    assert "before" in events[3]["data"]["output"]


async def test_sigterm_interrupts_running_work_and_exits_zero_promptly(
    node_process: NodeProcess,
) -> None:
    node_process.start()
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        response = await session.post(f"{node_process.url}/api/v1/agent/tasks", json={
            "steps": [{"tool": "terminal_exec", "args": {"command": "sleep 30"}}]})
        task_id = (await response.json())["id"]
        await asyncio.wait_for(_wait_event(
            session, node_process.url, task_id, lambda e: e["type"] == "tool_use"), 15)

        started = time.monotonic()
        code = node_process.kill(signal.SIGTERM)
        took = time.monotonic() - started

        node_process.start()
        task = await (await session.get(
            f"{node_process.url}/api/v1/agent/tasks/{task_id}")).json()

    assert code == 0
    assert took < 10
    assert task["status"] == "interrupted"
    assert "shutting down" in task["error"]


def group_running(pgid: int) -> bool:
    """Whether any process of the group (or session) still runs; zombies do not count."""
    return any(pgid in (p.pgrp, p.session) and not p.ended for p in procfs.processes())


async def test_a_restarted_node_ends_the_commands_and_daemons_its_killed_run_left(
    node_process: NodeProcess,
) -> None:
    node_process.start()
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        response = await session.post(f"{node_process.url}/api/v1/daemons",
                                      json={"name": "sleeper", "command": "sleep 1000"})
        daemon_pgid = (await response.json())["pid"]
        pid_file = node_process.workspace / "exec.pid"
        running = asyncio.create_task(session.post(
            f"{node_process.url}/api/v1/terminal/exec",
            json={"command": "echo $$ > exec.pid; sleep 100", "timeout_s": 600}))
        async with asyncio.timeout(15):
            while not pid_file.exists() or not pid_file.read_text().strip():
                await asyncio.sleep(0.02)
        exec_pgid = int(pid_file.read_text())

        try:
            node_process.kill(signal.SIGKILL)
            # Their sessions of their own outlive the node's death; that is the fault to fix.
            assert group_running(daemon_pgid) and group_running(exec_pgid)
            with contextlib.suppress(aiohttp.ClientError):
                await running
            node_process.start()

            async with asyncio.timeout(15):
                while group_running(daemon_pgid) or group_running(exec_pgid):
                    await asyncio.sleep(0.05)
            assert (await session.get(f"{node_process.url}/healthz")).status == 200
        finally:
            # Should the node fail to, the test ends the sleeps it left.
            for pgid in (daemon_pgid, exec_pgid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)


async def test_a_leftover_group_whose_pid_was_reused_is_left_alone(
    node_process: NodeProcess,
) -> None:
    # A process unrelated to the node, started in a session of its own like a command.
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        node_process.state_dir.mkdir(parents=True)
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        # Recorded under its pid with another start time: the pid was reused since.
        (node_process.state_dir / "process-groups").write_text(
            f"boot {boot_id}\n+ {bystander.pid} 1 exec\n")

        node_process.start()

        assert bystander.poll() is None
        assert group_running(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()
