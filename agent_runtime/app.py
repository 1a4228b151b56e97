"""The aiohttp application of a node, and running it until a signal says stop."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import AsyncIterator, Callable

import structlog
from aiohttp import web

from .config import NodeConfig
from .http import auth_middleware, error_middleware
from .node import Node

__all__ = ["NODE", "build_app", "serve"]

log = structlog.get_logger("agent_runtime.app")

NODE = web.AppKey("node", Node)


def build_app(config: NodeConfig) -> web.Application:
    """The node's application; the node starts and stops with it."""
    from .services import (
        daemons, files, gateway, lease, mcp, meta, peers, rules, snapshots, tasks, terminal,
    )

    node = Node(config)
    app = web.Application(
        middlewares=[error_middleware, auth_middleware(config.token, also=node.gateway.accepts)],
        client_max_size=config.max_body_bytes,
    )
    app[NODE] = node

    async def node_lifecycle(app: web.Application) -> AsyncIterator[None]:
        await node.start()
        yield
        await node.close()

    async def stop_taking_work(app: web.Application) -> None:
        await node.close()

    app.cleanup_ctx.append(node_lifecycle)
    app.on_shutdown.append(stop_taking_work)
    for service in (meta, terminal, files, daemons, snapshots, tasks, peers, lease, gateway,
                    mcp, rules):
        service.add_routes(app, node)
    return app


async def serve(
    config: NodeConfig, *, ready: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the node until SIGTERM, SIGINT or a service asks it to stop, then shut down cleanly.

    `on_ready` is called with the node's URL once it listens (the fork server reports it).
    """
    app = build_app(config)
    node = app[NODE]
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=3)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()

    # Before the ready line: whoever reads it may send SIGTERM at once and expects a clean stop.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.request_stop)

    port = runner.addresses[0][1]
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    node.url = config.public_url or f"http://{host}:{port}"
    ready_line: dict[str, object] = {"event": "node.ready", "name": config.name, "url": node.url}
    if config.token_generated:
        # Printed once, here, so that whoever started the node can use it.
        ready_line["token"] = config.token
    sys.stdout.write(json.dumps(ready_line) + "\n")
    sys.stdout.flush()
    log.info("node.ready", node=config.name, url=node.url, port=port)

    if ready is not None:
        ready.set()
    if on_ready is not None:
        on_ready(node.url)
    try:
        await node.stop_requested.wait()
    finally:
        log.info("node.signal", node=config.name)
        await runner.cleanup()
