"""The node's own tools served over MCP, so any MCP client can use the container as a computer.

The SDK's session manager speaks the streamable HTTP transport (every protocol revision it
knows); it is an ASGI app, and `serve_asgi` hands it aiohttp's requests at /mcp, behind the
node's bearer auth. It runs stateless with plain JSON answers: each POST carries a whole
exchange, so nothing is kept between requests, and a GET (a stream for messages the server
starts) is refused with 405, as the transport allows: a stateless server has none to send.

The SDK takes most of a second to import: it is imported, and the manager started, on the
first request to /mcp, never at node start.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable, MutableMapping

import structlog
from aiohttp import web

from mesh.errors import MeshError, ToolError, Unavailable

from ..tasks import render_output, to_jsonable
from ..tools import Tool, ToolContext

if TYPE_CHECKING:
    from mcp import types
    from mcp.server.context import ServerRequestContext
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from ..node import Node

__all__ = ["McpEndpoint", "serve_asgi"]

log = structlog.get_logger("agent_runtime.mcp")

Message = MutableMapping[str, Any]
AsgiApp = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


class McpEndpoint:
    """An MCP server whose tools are the node's own (not those it proxies from MCP servers)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._manager: StreamableHTTPSessionManager | None = None
        self._starting = asyncio.Lock()
        self._running = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Nothing to do at node start: the endpoint starts with its first request."""

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            # The transport lets a server without server-initiated messages refuse the GET
            # stream; accepting it would hold the connection open with nothing ever to say.
            return web.json_response(
                {"jsonrpc": "2.0", "id": None, "error": {
                    "code": -32600, "message": "Method Not Allowed: this server is stateless "
                    "and sends no messages of its own; POST requests to /mcp"}},
                status=405, headers={"Allow": "POST"})
        manager = await self._manager_running()
        return await serve_asgi(manager.handle_request, request)

    async def _manager_running(self) -> StreamableHTTPSessionManager:
        async with self._starting:
            if self._manager is None:
                sdk = await _load_sdk()
                if self._stop.is_set():
                    raise Unavailable("the node is shutting down")
                server = sdk.Server(
                    f"peermesh-{self.node.config.name}", version="0.1.0",
                    instructions="The tools of a peermesh node: a computer with a workspace "
                    "folder.",
                    on_list_tools=self._list_tools, on_call_tool=self._call_tool,
                )
                manager = sdk.StreamableHTTPSessionManager(server, stateless=True,
                                                           json_response=True)
                self._task = asyncio.create_task(self._run(manager), name="mcp-endpoint")
                ready = asyncio.ensure_future(self._running.wait())
                await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if self._task.done():
                    await self._task
                self._manager = manager
                log.info("mcp.endpoint_started")
            return self._manager

    async def _run(self, manager: StreamableHTTPSessionManager) -> None:
        # The manager's task group must be entered and left by one task: this one.
        async with manager.run():
            self._running.set()
            await self._stop.wait()

    def tools(self) -> list[Tool]:
        # Proxied tools stay out: two nodes attached to each other would offer them in a loop.
        mcp_servers = self.node.mcp_servers
        return [tool for tool in self.node.tools.all() if not mcp_servers.owns(tool.name)]

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        from mcp import types

        return types.ListToolsResult(tools=[
            types.Tool(name=tool.name, description=tool.description,
                       input_schema=tool.schema()["function"]["parameters"])
            for tool in self.tools()
        ])

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        from mcp import types

        tools = {tool.name: tool for tool in self.tools()}
        tool = tools.get(params.name)
        if tool is None:
            return _error(f"unknown tool {params.name!r}; tools: {', '.join(sorted(tools))}")
        call_id = None if ctx.request_id is None else str(ctx.request_id)
        try:
            output = await tool.call(ToolContext(call_id=call_id), params.arguments or {})
        except (ToolError, MeshError) as exc:
            self.node.metrics.tool_calls.labels(tool=tool.name, outcome="error").inc()
            return _error(str(exc))
        self.node.metrics.tool_calls.labels(tool=tool.name, outcome="ok").inc()
        structured = to_jsonable(output)
        return types.CallToolResult(
            content=[types.TextContent(text=render_output(output))],
            structured_content=structured if isinstance(structured, dict) else None,
        )


def _error(message: str) -> types.CallToolResult:
    from mcp import types

    # A tool's failure is a result the model reads, not a protocol error (MCP spec, tools).
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


class _Sdk:
    """The few SDK names the endpoint needs, imported on first use."""

    def __init__(self) -> None:
        from mcp.server.lowlevel import Server
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

        self.Server = Server
        self.StreamableHTTPSessionManager = StreamableHTTPSessionManager


async def _load_sdk() -> _Sdk:
    # In a worker thread: the import takes most of a second, and the node serves meanwhile.
    return await asyncio.to_thread(_Sdk)


async def serve_asgi(app: AsgiApp, request: web.Request) -> web.StreamResponse:
    """Answer an aiohttp request with an ASGI app; its body may stream (SSE)."""
    body = await request.read()
    scope: Message = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": request.method, "scheme": request.scheme, "path": request.path,
        "raw_path": request.raw_path.encode(), "query_string": request.query_string.encode(),
        "root_path": "", "headers": [(name.lower(), value) for name, value in request.raw_headers],
        "client": (request.remote or "", 0), "server": (request.url.host, request.url.port),
    }
    body_sent = False
    response: web.StreamResponse | None = None

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # The whole body was read up front; an app that listens for a disconnect waits here
        # until it is done and cancels the wait.
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal response
        if message["type"] == "http.response.start":
            response = web.StreamResponse(status=message["status"])
            for name, value in message.get("headers", []):
                response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
            await response.prepare(request)
        elif message["type"] == "http.response.body" and response is not None:
            await response.write(message.get("body", b""))
            if not message.get("more_body", False):
                await response.write_eof()

    await app(scope, receive, send)
    if response is None:
        raise RuntimeError("the ASGI app sent no response")
    return response
