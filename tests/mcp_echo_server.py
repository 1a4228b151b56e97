"""A tiny MCP server over stdio for the tests: it echoes, sleeps, and tells its pid.

Started with MCP_ECHO_PIDFILE set, it writes its pid there, so a test can kill it.
"""

from __future__ import annotations

import asyncio
import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("echo")


@server.tool()
def echo(text: str) -> str:
    """Return the text as given."""
    return text


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep for a while, then say so."""
    await asyncio.sleep(seconds)
    return f"slept {seconds:g}s"


if __name__ == "__main__":
    pidfile = os.environ.get("MCP_ECHO_PIDFILE")
    if pidfile:
        with open(pidfile, "w") as out:
            out.write(str(os.getpid()))
    server.run()
