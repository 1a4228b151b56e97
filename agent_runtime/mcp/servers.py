"""MCP servers attached to the node at run time; their tools join the registry as NAME__TOOL.

The SDK takes most of a second to import, so this module does not: `client` (which does) is
loaded in a worker thread on the first attach, and a node that attaches nothing never pays.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from types import ModuleType
from typing import TYPE_CHECKING, Any

import structlog

from mesh.errors import Conflict, NotFound
from mesh.models import McpServerDecl, McpServerInfo

from ..tools import JsonArgs, Tool, ToolContext

if TYPE_CHECKING:
    from mcp import types

    from ..node import Node
    from .client import McpConnection

__all__ = ["McpServers", "load_sdk_module", "tool_name"]

log = structlog.get_logger("agent_runtime.mcp")

# Model providers accept function names of at most 64 of these characters.
TOOL_NAME_MAX = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def tool_name(server: str, tool: str) -> str:
    """The node's name for `tool` of `server`: namespaced, and safe for model providers."""
    return _UNSAFE.sub("_", f"{server}__{tool}")[:TOOL_NAME_MAX]


async def load_sdk_module(name: str) -> ModuleType:
    """Import one of our modules that imports the SDK, off the event loop the first time."""
    module = f"agent_runtime.mcp.{name}"
    return await asyncio.to_thread(importlib.import_module, module)


class McpServers:
    """The MCP servers attached to a node, by name."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._servers: dict[str, McpConnection] = {}

    def owns(self, tool: str) -> bool:
        """Whether `tool` came from an attached server."""
        return any(tool in server.tools for server in self._servers.values())

    def list(self) -> list[McpServerInfo]:
        return [self._servers[name].info() for name in sorted(self._servers)]

    def get(self, name: str) -> McpServerInfo:
        return self._find(name).info()

    async def start(self) -> None:
        """Attach the servers the node was started with; one that fails is only logged."""
        async def attach(decl: McpServerDecl) -> None:
            try:
                await self.attach(decl)
            except Exception as exc:
                log.warning("mcp.attach_failed", server=decl.name, reason=str(exc))

        await asyncio.gather(*(attach(decl) for decl in self.node.config.mcp_servers))

    async def attach(self, decl: McpServerDecl) -> McpServerInfo:
        if decl.name in self._servers:
            raise Conflict(f"an mcp server named {decl.name!r} is already attached",
                           details={"field": "name", "name": decl.name})
        cwd = self.node.workspace.resolve(decl.cwd or ".")
        log_file = self.node.config.logs_dir / "mcp" / f"{decl.name}.log"
        client = await load_sdk_module("client")

        # Checked again: a second attach of the name may have come in during the import.
        if decl.name in self._servers:
            raise Conflict(f"an mcp server named {decl.name!r} is already attached",
                           details={"field": "name", "name": decl.name})
        server: McpConnection = client.McpConnection(decl, cwd, log_file)
        # Held under its name while it starts, so a second attach of the name is refused.
        self._servers[decl.name] = server
        try:
            await server.open()
            if self._servers.get(decl.name) is not server:
                raise Conflict(f"mcp server {decl.name!r} was detached while it started",
                               details={"name": decl.name})
            self._register(server)
        except BaseException:
            if self._servers.get(decl.name) is server:
                del self._servers[decl.name]
            await server.close()
            raise
        log.info("mcp.attached", server=decl.name, transport=server.transport,
                 tools=len(server.tools))
        return server.info()

    async def detach(self, name: str) -> McpServerInfo:
        server = self._find(name)
        del self._servers[name]
        for tool in server.tools:
            self.node.tools.remove(tool)
        await server.close()
        log.info("mcp.detached", server=name)
        return server.info()

    async def close(self) -> None:
        await asyncio.gather(*(self.detach(name) for name in list(self._servers)),
                             return_exceptions=True)

    def _find(self, name: str) -> McpConnection:
        try:
            return self._servers[name]
        except KeyError:
            raise NotFound(f"no mcp server {name!r}", details={"name": name}) from None

    def _register(self, server: McpConnection) -> None:
        taken = [name for name in server.tools if name in self.node.tools]
        if taken:
            raise Conflict(f"mcp server {server.name!r} brings tools the node already has: "
                           f"{', '.join(taken)}", details={"field": "name", "tools": taken})
        for name, tool in server.tools.items():
            self.node.tools.add(_proxy(server, name, tool))


def _proxy(server: McpConnection, name: str, tool: types.Tool) -> Tool:
    async def handler(ctx: ToolContext, args: JsonArgs) -> str:
        return await server.call(name, args.model_dump())

    description = tool.description or tool.title or tool.name
    schema: dict[str, Any] = {"properties": {}, **tool.input_schema}
    return Tool(
        name=name, description=f"[mcp server {server.name}] {description}",
        # Some providers refuse an object schema without `properties`.
        args_model=JsonArgs, handler=handler, json_schema=schema,
        # What a foreign tool does is unknown: it may write and run anything.
        reads=True, writes=True, executes=True,
    )
