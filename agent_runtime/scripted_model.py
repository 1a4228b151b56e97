"""A deterministic OpenAI-compatible model server on loopback, for tests and benchmarks.

The agent loop reaches it through litellm exactly as it would reach vLLM or Ollama
(`model="openai/scripted"`, `api_base=server.api_base`), so the real client path runs. Each
request consumes the next scripted turn: text, tool calls (also malformed ones), provider
faults (an HTTP error with Retry-After, or an error inside a 200 body) and stalls.

A task can have a script of its own: put `[script:NAME]` in its description and register
NAME with `script_for`; requests whose first user message carries the marker read from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid
from collections import deque
from typing import Any

from aiohttp import web

__all__ = ["ScriptedModelServer", "ToolCall", "Turn"]

_MARKER = re.compile(r"\[script:([A-Za-z0-9_.-]+)\]")


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str | dict[str, Any] = dataclasses.field(default_factory=dict)
    id: str | None = None

    def raw_arguments(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments)


@dataclasses.dataclass
class Turn:
    """One scripted answer of the model."""

    text: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    # A provider fault instead of an answer: an HTTP status (429, 500, 503 ...) with an
    # optional Retry-After, or the same error sent with status 200 when `in_body` is set.
    error_status: int | None = None
    retry_after: float | None = None
    error_in_body: bool = False
    # Silence before the first chunk, or between the first chunk and the rest.
    stall_first_s: float = 0.0
    stall_next_s: float = 0.0
    chunk_chars: int = 16
    prompt_tokens: int = 10
    completion_tokens: int = 5


class ScriptedModelServer:
    def __init__(self) -> None:
        self.turns: deque[Turn] = deque()
        self.scripts: dict[str, deque[Turn]] = {}
        self.requests: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.api_base = ""

    # -- scripting ----------------------------------------------------------------------------

    def add(self, *turns: Turn) -> ScriptedModelServer:
        self.turns.extend(turns)
        return self

    def script_for(self, name: str, *turns: Turn) -> ScriptedModelServer:
        self.scripts.setdefault(name, deque()).extend(turns)
        return self

    def _next_turn(self, body: dict[str, Any]) -> Turn:
        for message in body.get("messages", []):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                found = _MARKER.search(message["content"])
                if found and found.group(1) in self.scripts:
                    queue = self.scripts[found.group(1)]
                    return queue.popleft() if queue else Turn(text="(script finished)")
                break
        return self.turns.popleft() if self.turns else Turn(text="(script finished)")

    # -- serving ------------------------------------------------------------------------------

    async def start(self) -> ScriptedModelServer:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.api_base = f"http://127.0.0.1:{port}/v1"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> ScriptedModelServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "scripted", "object": "model", "owned_by": "peermesh"}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        turn = self._next_turn(body)

        if turn.stall_first_s:
            await asyncio.sleep(turn.stall_first_s)
        if turn.error_status is not None and turn.error_in_body and body.get("stream"):
            return await self._stream_error(request, turn)
        if turn.error_status is not None:
            return self._error(turn)
        if not body.get("stream"):
            return web.json_response(self._whole(turn, body))
        return await self._stream(request, turn, body)

    def _error(self, turn: Turn) -> web.Response:
        kind = "rate_limit_exceeded" if turn.error_status == 429 else "server_error"
        payload = {"error": {"message": f"scripted {kind}", "type": kind,
                             "code": turn.error_status}}
        headers = {}
        if turn.retry_after is not None:
            headers["Retry-After"] = str(turn.retry_after)
        status = 200 if turn.error_in_body else turn.error_status or 500
        return web.json_response(payload, status=status, headers=headers)

    async def _stream_error(self, request: web.Request, turn: Turn) -> web.StreamResponse:
        """A fault sent the way some providers do: an error object inside a 200 stream."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        kind = "rate_limit_exceeded" if turn.error_status == 429 else "server_error"
        payload = {"error": {"message": f"scripted {kind}", "type": kind,
                             "code": turn.error_status}}
        await response.write(f"data: {json.dumps(payload)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _usage(self, turn: Turn) -> dict[str, int]:
        return {"prompt_tokens": turn.prompt_tokens,
                "completion_tokens": turn.completion_tokens,
                "total_tokens": turn.prompt_tokens + turn.completion_tokens}

    def _whole(self, turn: Turn, body: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": turn.text or None}
        if turn.tool_calls:
            message["tool_calls"] = [
                {"id": call.id or f"call_{uuid.uuid4().hex[:8]}", "type": "function",
                 "function": {"name": call.name, "arguments": call.raw_arguments()}}
                for call in turn.tool_calls
            ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", "scripted"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if turn.tool_calls else "stop"}],
            "usage": self._usage(turn),
        }

    async def _stream(
        self, request: web.Request, turn: Turn, body: dict[str, Any]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        base = {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "scripted")}

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send({"role": "assistant", "content": ""})
        if turn.stall_next_s:
            await asyncio.sleep(turn.stall_next_s)
        text = turn.text
        for start in range(0, len(text), max(1, turn.chunk_chars)):
            await send({"content": text[start:start + turn.chunk_chars]})
        for index, call in enumerate(turn.tool_calls):
            await send({"tool_calls": [{
                "index": index, "id": call.id or f"call_{uuid.uuid4().hex[:8]}",
                "type": "function",
                "function": {"name": call.name, "arguments": call.raw_arguments()},
            }]})
        await send({}, finish="tool_calls" if turn.tool_calls else "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = {**base, "choices": [], "usage": self._usage(turn)}
            await response.write(f"data: {json.dumps(usage_chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
