"""MCP both ways: servers attached to the node lend it tools; the node serves its own at /mcp.

Neither imports the `mcp` SDK at node start: it loads on the first attach or /mcp request.
"""

from .server import McpEndpoint, serve_asgi
from .servers import McpServers, tool_name

__all__ = ["McpEndpoint", "McpServers", "serve_asgi", "tool_name"]
