"""HTTP face of MCP: attach, list and detach MCP servers; the node's own MCP endpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from mesh.models import McpServerDecl

from ..http import json_response, read_model

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["add_routes"]


def add_routes(app: web.Application, node: Node) -> None:
    servers = node.mcp_servers

    async def attach(request: web.Request) -> web.Response:
        decl = await read_model(request, McpServerDecl)
        return json_response(await servers.attach(decl), status=201)

    async def list_servers(request: web.Request) -> web.Response:
        return json_response(servers.list())

    async def get_server(request: web.Request) -> web.Response:
        return json_response(servers.get(request.match_info["name"]))

    async def detach(request: web.Request) -> web.Response:
        return json_response(await servers.detach(request.match_info["name"]))

    async def endpoint(request: web.Request) -> web.StreamResponse:
        return await node.mcp_endpoint.handle(request)

    prefix = "/api/v1/agent/mcp/servers"
    app.router.add_post(prefix, attach)
    app.router.add_get(prefix, list_servers)
    app.router.add_get(f"{prefix}/{{name}}", get_server)
    app.router.add_delete(f"{prefix}/{{name}}", detach)
    # The streamable HTTP transport: POST carries messages, GET would open a stream for the
    # server's own messages, DELETE ends a session. Stateless, the endpoint refuses the last
    # two with 405 (GET itself, DELETE through the SDK).
    for method in ("POST", "GET", "DELETE"):
        app.router.add_route(method, "/mcp", endpoint)

