"""The event stream: stored before sent, replayable by seq, and safe from slow readers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import TOKEN, NodeProcess
from tests.test_tasks import events_of, exec_step, submit, wait_final

FINAL = ("task.completed", "task.failed", "task.cancelled", "task.interrupted")


async def test_sse_stream_replays_after_last_event_id(client: TestClient) -> None:
    task_id = await submit(client, steps=[exec_step("true"), exec_step("true")])
    await wait_final(client, task_id)
    events = await events_of(client, task_id)

    response = await client.get(
        f"/api/v1/agent/tasks/{task_id}/events",
        headers={"Last-Event-ID": str(events[2]["seq"])},
    )
    text = await asyncio.wait_for(response.text(), 10)

    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == [event["seq"] for event in events[3:]]
    assert response.headers["Content-Type"].startswith("text/event-stream")


async def test_websocket_after_seq_replays_then_goes_live(client: TestClient) -> None:
    first = await submit(client, steps=[exec_step("true")])
    await wait_final(client, first)
    old = await events_of(client, first)

    async with client.ws_connect(f"/api/v1/agent/ws?after={old[1]['seq']}") as ws:
        replayed = [await asyncio.wait_for(ws.receive_json(), 5) for _ in old[2:]]
        second = await submit(client, steps=[exec_step("true")])
        live = await asyncio.wait_for(ws.receive_json(), 5)

    assert [e["seq"] for e in replayed] == [e["seq"] for e in old[2:]]
    assert live["task_id"] == second and live["type"] == "task.created"


async def test_bad_after_value_is_refused(client: TestClient) -> None:
    response = await client.get("/api/v1/agent/ws?after=abc")

    assert response.status == 400
    assert "after" in (await response.json())["error"]["message"]


async def test_client_that_vanishes_costs_the_task_nothing(client: TestClient) -> None:
    task_id = await submit(client, steps=[exec_step("sleep 0.3"), exec_step("echo done")])
    ws = await client.ws_connect(f"/api/v1/agent/ws?task_id={task_id}&after=0")
    await ws.receive_json()
    await ws.close()

    task = await wait_final(client, task_id)

    assert task["status"] == "completed"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _open_stalled_websocket(url: str, query: str) -> socket.socket:
    """A WebSocket handshake over a raw socket that then never reads a byte."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /api/v1/agent/ws?{query} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


async def _collect(session: aiohttp.ClientSession, url: str, task_id: str,
                   after: int) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while True:
        ws_url = f"{url}/api/v1/agent/ws?task_id={task_id}&after={after}"
        async with session.ws_connect(ws_url) as ws:
            async for message in ws:
                event = json.loads(message.data)
                seen.append(event)
                after = event["seq"]
                if event["type"] in FINAL:
                    return seen
        # Closed for falling behind: resume from the last seq seen, as any client would.


async def _wait_for_metric(
    session: aiohttp.ClientSession, url: str, name: str, at_least: float
) -> float:
    for _ in range(600):
        text = await (await session.get(f"{url}/metrics")).text()
        for line in text.splitlines():
            if line.startswith(name + " "):
                value = float(line.split()[1])
                if value >= at_least:
                    return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never reached {at_least}")


async def test_stalled_subscriber_is_closed_and_memory_stays_flat(
    node_process: NodeProcess,
) -> None:
    node_process.start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    steps = [{"tool": "list_files", "args": {"path": "."}} for _ in range(50_000)]
    async with aiohttp.ClientSession(headers=headers) as session:
        await (await session.get(f"{node_process.url}/healthz")).read()
        assert node_process.proc is not None
        rss_before = _rss_kb(node_process.proc.pid)
        stalled = _open_stalled_websocket(node_process.url, "after=0")

        body = io.BytesIO(json.dumps({"steps": steps}).encode())
        response = await session.post(
            f"{node_process.url}/api/v1/agent/tasks", data=body,
            headers={"Content-Type": "application/json"})
        task_id = (await response.json())["id"]

        # The node notices the stalled reader, drops it, and the task runs to its end.
        dropped = await _wait_for_metric(
            session, node_process.url, "peermesh_event_subscribers_dropped_total", 1)
        events = await _collect(session, node_process.url, task_id, after=0)
        rss_after = _rss_kb(node_process.proc.pid)
        stalled.close()

    assert dropped >= 1
    seqs = [event["seq"] for event in events]
    assert len(seqs) == 100_003 and seqs == list(range(seqs[0], seqs[0] + 100_003))
    assert rss_after - rss_before < 60_000
