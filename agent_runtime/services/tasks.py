"""HTTP face of tasks and their events: REST, a WebSocket stream and per-task SSE."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog
from aiohttp import WSCloseCode, web

from mesh.errors import BadRequest
from mesh.models import TERMINAL_STATUSES, MessageRequest, ModeChange, TaskCreate, TaskStatus

from ..events import Subscriber, SubscriberOverflow
from ..http import json_response, query_int, read_model

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["add_routes", "CLOSE_SLOW_SUBSCRIBER"]

log = structlog.get_logger("agent_runtime.events")

# Application close code (4000-4999 are ours): the subscriber fell behind its buffer and
# should reconnect with after=<last seq it received>.
CLOSE_SLOW_SUBSCRIBER = 4008
FINAL_EVENT_TYPES = frozenset({"task.completed", "task.failed", "task.cancelled",
                               "task.interrupted"})



def add_routes(app: web.Application, node: Node) -> None:
    tasks = node.tasks

    async def create_task(request: web.Request) -> web.Response:
        body = await read_model(request, TaskCreate)
        task = tasks.create(body)
        return json_response({"id": task.id, "status": task.status.value}, status=202)

    async def list_tasks(request: web.Request) -> web.Response:
        status = request.query.get("status")
        if status is not None and status not in {s.value for s in TaskStatus}:
            raise BadRequest(f"unknown status {status!r}", details={"field": "status"})
        limit = query_int(request, "limit", 100)
        return json_response(tasks.list(status=status, limit=min(limit or 100, 1000)))

    async def get_task(request: web.Request) -> web.Response:
        return json_response(tasks.get(request.match_info["task_id"]))

    async def cancel_task(request: web.Request) -> web.Response:
        task = tasks.cancel(request.match_info["task_id"])
        return json_response({"id": task.id, "status": "cancelling"}, status=202)

    async def change_mode(request: web.Request) -> web.Response:
        body = await read_model(request, ModeChange)
        return json_response(tasks.set_mode(request.match_info["task_id"], body.mode))

    async def add_message(request: web.Request) -> web.Response:
        body = await read_model(request, MessageRequest)
        task = tasks.add_message(request.match_info["task_id"], body.content)
        return json_response({"id": task.id, "status": task.status.value}, status=202)

    async def task_events_sse(request: web.Request) -> web.StreamResponse:
        task = tasks.get(request.match_info["task_id"])
        last_event_id = request.headers.get("Last-Event-ID")
        after = query_int(request, "after", 0) or 0
        if last_event_id:
            try:
                after = int(last_event_id)
            except ValueError:
                raise BadRequest("Last-Event-ID must be an event seq",
                                 details={"field": "Last-Event-ID"}) from None
        subscriber = node.events.subscribe(task_id=task.id, after=after)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })
        await response.prepare(request)
        try:
            async for event in _stream(node, subscriber):
                frame = (f"id: {event.seq}\nevent: {event.type}\n"
                         f"data: {event.model_dump_json()}\n\n")
                await response.write(frame.encode())
                if event.type in FINAL_EVENT_TYPES and _task_final(node, task.id):
                    break
        except SubscriberOverflow:
            await response.write(b"event: overflow\ndata: {}\n\n")
        finally:
            subscriber.close()
        return response

    async def events_ws(request: web.Request) -> web.StreamResponse:
        task_id = request.query.get("task_id") or None
        if task_id is not None:
            tasks.get(task_id)
        after = query_int(request, "after")
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1 << 20)
        await ws.prepare(request)
        subscriber = node.events.subscribe(task_id=task_id, after=after)
        node.websockets.add(ws)
        sender = asyncio.current_task()
        assert sender is not None
        subscriber.on_overflow = sender.cancel
        # Whatever the client sends is ignored, but reading notices a close at once.
        reader = asyncio.create_task(_watch_close(ws, sender))
        try:
            async for event in _stream(node, subscriber):
                await ws.send_str(event.model_dump_json())
        except SubscriberOverflow:
            pass
        except asyncio.CancelledError:
            # Our own cancel (overflow, or the client closed) ends the stream here; any
            # other cancellation belongs to the server and goes on.
            if not (subscriber.overflowed or ws.closed) or sender.uncancel() > 0:
                raise
        except ConnectionResetError:
            pass
        finally:
            reader.cancel()
            subscriber.close()
            node.websockets.discard(ws)
        if subscriber.overflowed:
            log.info("events.ws_closed_slow", task_id=task_id, last_seq=subscriber.last_seq)
            await _close(request, ws, CLOSE_SLOW_SUBSCRIBER,
                         f"too slow: reconnect with after={subscriber.last_seq}")
        elif not ws.closed:
            await _close(request, ws, WSCloseCode.GOING_AWAY, "stream ended")
        return ws

    prefix = "/api/v1/agent"
    app.router.add_post(f"{prefix}/tasks", create_task)
    app.router.add_get(f"{prefix}/tasks", list_tasks)
    app.router.add_get(f"{prefix}/tasks/{{task_id}}", get_task)
    app.router.add_post(f"{prefix}/tasks/{{task_id}}/cancel", cancel_task)
    app.router.add_patch(f"{prefix}/tasks/{{task_id}}/mode", change_mode)
    app.router.add_post(f"{prefix}/tasks/{{task_id}}/messages", add_message)
    app.router.add_get(f"{prefix}/tasks/{{task_id}}/events", task_events_sse)
    app.router.add_get(f"{prefix}/ws", events_ws)


def _task_final(node: Node, task_id: str) -> bool:
    return node.tasks.get(task_id).status in TERMINAL_STATUSES


async def _stream(node: Node, subscriber: Subscriber):  # type: ignore[no-untyped-def]
    """Stored events after the subscriber's seq, then live ones, each exactly once."""
    while batch := node.events.replay(subscriber):
        for event in batch:
            yield event
    while True:
        yield await subscriber.next()


async def _watch_close(ws: web.WebSocketResponse, sender: asyncio.Task[object] | None) -> None:
    with contextlib.suppress(Exception):
        async for _ in ws:
            pass
    if sender is not None and not sender.done():
        sender.cancel()


async def _close(
    request: web.Request, ws: web.WebSocketResponse, code: int, message: str
) -> None:
    """Close politely, but never wait long on a peer that does not read."""
    try:
        await asyncio.wait_for(ws.close(code=code, message=message.encode()), timeout=2)
    except (asyncio.TimeoutError, ConnectionResetError):
        # The close frame is stuck behind unread data; drop the connection instead.
        if request.transport is not None:
            request.transport.abort()
