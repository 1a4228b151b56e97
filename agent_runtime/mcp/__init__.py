"""MCP both ways: servers attached to the node lend it tools; the node serves its own at /mcp."""

from .client import McpConnection, McpServers, tool_name
from .server import McpEndpoint, serve_asgi

__all__ = ["McpConnection", "McpEndpoint", "McpServers", "serve_asgi", "tool_name"]
