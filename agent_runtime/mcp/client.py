"""One attached MCP server, through the official SDK: its session, its tools, its calls.

This module imports the SDK, which takes most of a second; `servers` loads it on the first
attach, never at node start.

Each server lives in one asyncio task that holds the SDK's transport and session contexts:
they are anyio task groups, which the task that enters them must also leave. Tool calls reach
the session from the task runner's own tasks; the session correlates concurrent requests by
id. A server that exits, or a call that outlasts the server's timeout, fails only the calls
to that server: the task that made them goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Self

import httpx2
import structlog
from mcp import ClientSession, StdioServerParameters, stdio_client, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from mesh.errors import BadRequest, ToolError
from mesh.models import McpServerDecl, McpServerInfo, McpServerStatus

from .servers import tool_name

__all__ = ["McpConnection", "render_result"]

log = structlog.get_logger("agent_runtime.mcp")

STDERR_TAIL_CHARS = 500
# Closing waits this long for the SDK's own shutdown (a stdio server gets 2s, then SIGTERM and
# SIGKILL 2s apart) before the holding task is cancelled.
CLOSE_TIMEOUT_S = 10.0
CLIENT_INFO = types.Implementation(name="peermesh", version="0.1.0")


class _EofWatch:
    """A read stream that reports when the server's side of it ends."""

    def __init__(self, stream: Any, on_eof: Callable[[], None]) -> None:
        self._stream = stream
        self._on_eof = on_eof

    @property
    def last_context(self) -> Any:
        return getattr(self._stream, "last_context", None)

    async def receive(self) -> Any:
        try:
            return await self._stream.receive()
        except Exception:
            self._on_eof()
            raise

    async def aclose(self) -> None:
        await self._stream.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            self._on_eof()
            raise

    async def __aenter__(self) -> Self:
        await self._stream.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        return await self._stream.__aexit__(*exc)


class McpConnection:
    """One attached MCP server: its session, its tools and whether it still runs."""

    def __init__(self, decl: McpServerDecl, cwd: Path, log_file: Path) -> None:
        self.decl = decl
        self.cwd = cwd
        self.log_file = log_file
        self.status = McpServerStatus.STARTING
        self.error: str | None = None
        self.attached_at = time.time()
        # The node's tool name -> the server's tool.
        self.tools: dict[str, types.Tool] = {}
        self._session: ClientSession | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.decl.name

    @property
    def transport(self) -> Literal["stdio", "http"]:
        return "http" if self.decl.url is not None else "stdio"

    def info(self) -> McpServerInfo:
        return McpServerInfo(
            name=self.name, transport=self.transport, status=self.status,
            tools=sorted(self.tools), error=self.error, attached_at=self.attached_at,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the server, shake hands and list its tools, all within its connect timeout."""
        self._task = asyncio.create_task(self._hold(), name=f"mcp-{self.name}")
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({ready, self._task}, timeout=self.decl.connect_timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self.status is McpServerStatus.RUNNING:
            return
        reason = self.error or f"it did not answer within {self.decl.connect_timeout_s:g}s"
        await self.close()
        field = "url" if self.decl.url is not None else "command"
        raise BadRequest(f"mcp server {self.name!r} could not be attached: {reason}",
                         details={"field": field, "name": self.name})

    async def close(self) -> None:
        """Close the session and stop the server; the SDK kills a stdio server that lingers."""
        self._stop.set()
        task = self._task
        if task is not None and not task.done():
            if not self._ready.is_set():
                # Still shaking hands: nothing waits on the stop event yet.
                task.cancel()
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
            if not done:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.status is not McpServerStatus.CRASHED:
            self.status = McpServerStatus.STOPPED

    async def _hold(self) -> None:
        """The server's whole life, in this one task: connect, serve calls, disconnect."""
        eof = asyncio.Event()
        try:
            async with self._connect() as (read, write), ClientSession(
                _EofWatch(read, eof.set), write, client_info=CLIENT_INFO
            ) as session:
                await session.initialize()
                self.tools = await self._list_tools(session)
                self._session = session
                self.status = McpServerStatus.RUNNING
                self._ready.set()
                await _first(self._stop.wait(), eof.wait())
                if not self._stop.is_set():
                    self._crashed("the server closed its connection")
        except Exception as exc:
            self._crashed(_describe(exc))
        finally:
            self._session = None

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[Any]:
        decl = self.decl
        if decl.url is not None:
            # The SDK's own HTTP client; reads are bounded per call, by the call's timeout.
            http = httpx2.AsyncClient(
                headers=decl.headers, timeout=httpx2.Timeout(decl.connect_timeout_s, read=None))
            async with http, streamable_http_client(decl.url, http_client=http) as streams:
                yield streams
            return
        argv = decl.argv()
        params = StdioServerParameters(command=argv[0], args=argv[1:], env=decl.env,
                                       cwd=self.cwd)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a") as errlog:
            async with stdio_client(params, errlog=errlog) as streams:
                yield streams

    async def _list_tools(self, session: ClientSession) -> dict[str, types.Tool]:
        tools: dict[str, types.Tool] = {}
        cursor: str | None = None
        while True:
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            listing = await session.list_tools(params=params)
            for tool in listing.tools:
                name = tool_name(self.name, tool.name)
                if name in tools:
                    log.warning("mcp.tool_skipped", server=self.name, tool=tool.name,
                                reason="its name collides with another tool of the server")
                    continue
                tools[name] = tool
            cursor = listing.next_cursor
            if not cursor:
                return tools

    def _crashed(self, reason: str) -> None:
        if self._stop.is_set():
            return
        tail = _tail(self.log_file) if self.transport == "stdio" else ""
        self.error = f"{reason}; its last output: {tail}" if tail else reason
        self.status = McpServerStatus.CRASHED
        if self._ready.is_set():
            log.warning("mcp.crashed", server=self.name, reason=reason)

    # -- calls --------------------------------------------------------------------------------

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Call one tool; every way it can fail comes back as a ToolError for the model."""
        tool = self.tools[name]
        session = self._session
        if self.status is not McpServerStatus.RUNNING or session is None:
            raise ToolError(f"mcp server {self.name!r} is not running: "
                            f"{self.error or self.status.value}")
        timeout = self.decl.timeout_s
        try:
            result = await session.call_tool(tool.name, arguments, read_timeout_seconds=timeout)
        except MCPError as exc:
            if exc.error.code == types.REQUEST_TIMEOUT:
                raise ToolError(f"mcp server {self.name!r} did not answer within {timeout:g}s "
                                f"(tool {tool.name})") from exc
            if exc.error.code == types.CONNECTION_CLOSED and self.transport == "stdio":
                raise ToolError(f"mcp server {self.name!r} is not running: "
                                f"{self.error or 'its connection closed'}") from exc
            if exc.error.code == types.CONNECTION_CLOSED:
                # TODO: a server that comes back under the same URL is not reconnected to.
                raise ToolError(f"mcp server {self.name!r} could not be reached: "
                                f"{exc}") from exc
            raise ToolError(f"mcp server {self.name!r} refused {tool.name}: {exc}") from exc
        except Exception as exc:
            raise ToolError(f"mcp server {self.name!r} failed on {tool.name}: "
                            f"{_describe(exc)}") from exc
        text = render_result(result)
        if result.is_error:
            raise ToolError(text or f"{tool.name} failed without saying why")
        return text


def render_result(result: types.CallToolResult) -> str:
    """A tool result's content as the text a model reads."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.EmbeddedResource):
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if text is not None else f"[resource {resource.uri}]")
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource link {block.uri}]")
        else:
            parts.append(f"[{block.type} {getattr(block, 'mime_type', '')}]".rstrip())
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, indent=1, default=str))
    return "\n".join(parts)


async def _first(*waits: Any) -> None:
    """Wait until the first of `waits` finishes; cancel the rest."""
    pending = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in pending:
            future.cancel()


def _describe(exc: BaseException) -> str:
    """The innermost useful message of an error; anyio wraps task failures in groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, (MCPError, ToolError)) else f"{type(exc).__name__}: {text}"


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - STDERR_TAIL_CHARS))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return ""

