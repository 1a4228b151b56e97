"""A node's state survives it: restarts find every task and event, signals stop it cleanly."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import aiohttp

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
