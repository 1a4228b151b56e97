"""What a node says about itself: health, agent card, skill text, OpenAPI and metrics."""

from __future__ import annotations

import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mesh.models import Health

from ..http import json_response
from ..openapi import build_openapi

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["add_routes"]

VERSION = "0.1.0"


def node_url(node: Node, request: web.Request) -> str:
    return node.url or f"{request.scheme}://{request.host}"


def add_routes(app: web.Application, node: Node) -> None:
    skill_text = resources.files("agent_runtime").joinpath("skill.md").read_text()

    async def healthz(request: web.Request) -> web.Response:
        health = Health(
            status="ok" if node.state.value == "running" else "stopping",
            name=node.config.name,
            version=VERSION,
            uptime_s=round(time.time() - node.started_at, 3),
            docker_socket=node.docker_socket,
            model_configured=bool(node.config.model),
            capabilities={
                "terminal": True,
                "files": True,
                "daemons": True,
                "snapshots": True,
                "agent_loop": bool(node.config.model),
                "spawn": node.docker_socket,
            },
        )
        return json_response(health)

    async def agent_card(request: web.Request) -> web.Response:
        url = node_url(node, request)
        card: dict[str, Any] = {
            "name": node.config.name,
            "description": (
                "A peermesh agent node: a whole computer an agent can use over HTTP: run "
                "commands, edit files, keep daemons running, snapshot the workspace and run "
                "tasks, with every tool call streamed as events."
            ),
            "url": url,
            "version": VERSION,
            "protocolVersion": "0.3.0",
            "preferredTransport": "HTTP+JSON",
            "documentationUrl": f"{url}/api/v1/skill",
            "capabilities": {"streaming": True, "pushNotifications": False},
            "defaultInputModes": ["text/plain", "application/json"],
            "defaultOutputModes": ["application/json"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "security": [{"bearer": []}],
            "skills": [
                {"id": "terminal", "name": "Run commands",
                 "description": "Run shell commands with timeouts and capped output.",
                 "tags": ["shell", "exec"]},
                {"id": "files", "name": "Files",
                 "description": "Read, write, list and move files in the workspace.",
                 "tags": ["files"]},
                {"id": "daemons", "name": "Daemons",
                 "description": "Keep supervised background processes running.",
                 "tags": ["process"]},
                {"id": "snapshots", "name": "Snapshots",
                 "description": "Capture the workspace and restore it exactly.",
                 "tags": ["backup"]},
                {"id": "tasks", "name": "Tasks",
                 "description": "Run step plans or natural-language tasks; stream events.",
                 "tags": ["agent"]},
            ],
        }
        return json_response(card)

    async def skill(request: web.Request) -> web.Response:
        text = skill_text.replace("{{URL}}", node_url(node, request))
        return web.Response(text=text, content_type="text/markdown")

    async def openapi(request: web.Request) -> web.Response:
        return json_response(build_openapi(node_url(node, request)))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=node.metrics.render(),
                            content_type="text/plain", charset="utf-8")

    async def tools(request: web.Request) -> web.Response:
        return json_response([tool.schema() for tool in node.tools.all()])

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/.well-known/agent-card.json", agent_card)
    app.router.add_get("/api/v1/skill", skill)
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/tools", tools)
