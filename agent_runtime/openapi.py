"""The node's OpenAPI document, built from the same pydantic models the handlers use."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from mesh import models, rules

__all__ = ["build_openapi"]

_ERROR = {"$ref": "#/components/schemas/Error"}

# (method, path, summary, request model, response model)
_OPERATIONS: list[tuple[str, str, str, type[BaseModel] | None, type[BaseModel] | None]] = [
    ("get", "/healthz", "Liveness and capabilities (no auth)", None, models.Health),
    ("get", "/.well-known/agent-card.json", "Agent card (no auth)", None, None),
    ("get", "/api/v1/skill", "Markdown guide to this API", None, None),
    ("get", "/metrics", "Prometheus metrics", None, None),
    ("get", "/api/v1/tools", "The tools tasks can call, as function schemas", None, None),
    ("post", "/api/v1/terminal/exec", "Run a command", models.ExecRequest, models.ExecResult),
    ("get", "/api/v1/terminal/ws", "Run a command, streaming output (WebSocket)", None, None),
    ("get", "/api/v1/files/{path}", "Read a file (Range supported) or list a folder", None,
     None),
    ("put", "/api/v1/files/{path}", "Write a file atomically (streamed body)", None,
     models.FileInfo),
    ("delete", "/api/v1/files/{path}", "Delete a file or folder", None, None),
    ("get", "/api/v1/stat/{path}", "Stat a path", None, models.FileInfo),
    ("post", "/api/v1/mkdir/{path}", "Create a folder and its parents", None, models.FileInfo),
    ("post", "/api/v1/move", "Move or rename", models.MoveRequest, models.FileInfo),
    ("post", "/api/v1/daemons", "Start a supervised daemon", models.DaemonSpec,
     models.DaemonInfo),
    ("get", "/api/v1/daemons", "List daemons", None, None),
    ("get", "/api/v1/daemons/{name}/logs", "Daemon log (tail, follow)", None, None),
    ("post", "/api/v1/daemons/{name}/stop", "Stop a daemon", None, models.DaemonInfo),
    ("post", "/api/v1/daemons/{name}/restart", "Restart a daemon", None, models.DaemonInfo),
    ("post", "/api/v1/snapshots", "Snapshot the workspace", models.SnapshotCreate,
     models.SnapshotInfo),
    ("get", "/api/v1/snapshots", "List snapshots", None, None),
    ("post", "/api/v1/snapshots/{id}/restore", "Restore a snapshot exactly", None,
     models.SnapshotInfo),
    ("delete", "/api/v1/snapshots/{id}", "Delete a snapshot", None, None),
    ("post", "/api/v1/agent/tasks", "Submit a task (202)", models.TaskCreate, None),
    ("get", "/api/v1/agent/tasks", "List tasks", None, None),
    ("get", "/api/v1/agent/tasks/{task_id}", "One task", None, models.Task),
    ("post", "/api/v1/agent/tasks/{task_id}/cancel", "Cancel a task", None, None),
    ("patch", "/api/v1/agent/tasks/{task_id}/mode", "Change a task's mode", models.ModeChange,
     models.Task),
    ("post", "/api/v1/agent/tasks/{task_id}/messages", "Add a user message",
     models.MessageRequest, None),
    ("get", "/api/v1/agent/tasks/{task_id}/events", "A task's events (SSE)", None, None),
    ("get", "/api/v1/agent/ws", "All events, live (WebSocket; after=SEQ, task_id=)", None,
     None),
    ("get", "/api/v1/agent/rules", "The node's rules", None, rules.RuleSet),
    ("put", "/api/v1/agent/rules", "Replace every rule (400 names each bad field)",
     rules.RuleSet, rules.RuleSet),
    ("post", "/api/v1/agent/tasks/{task_id}/approve", "Approve a call waiting for approval "
     "({call_id?})", None, None),
    ("post", "/api/v1/agent/tasks/{task_id}/deny", "Deny a call waiting for approval "
     "({call_id?, reason?})", None, None),
    ("post", "/api/v1/agent/mcp/servers", "Attach an MCP server (stdio command or URL)",
     models.McpServerDecl, models.McpServerInfo),
    ("get", "/api/v1/agent/mcp/servers", "Attached MCP servers with their status", None, None),
    ("get", "/api/v1/agent/mcp/servers/{name}", "One MCP server", None, models.McpServerInfo),
    ("delete", "/api/v1/agent/mcp/servers/{name}", "Detach an MCP server", None,
     models.McpServerInfo),
    ("post", "/mcp", "The node's own tools as an MCP server (streamable HTTP)", None, None),
    ("post", "/api/v1/ai/chat/completions", "OpenAI-compatible chat completions through "
     "this node's model (stream too)", None, None),
    ("get", "/api/v1/ai/models", "Model ids the gateway serves", None, None),
    ("get", "/api/v1/ai/usage", "Gateway usage: this node's and each child's", None, None),
]


@lru_cache(maxsize=4)
def build_openapi(url: str) -> dict[str, Any]:
    used = {m for _, _, _, req, resp in _OPERATIONS for m in (req, resp) if m is not None}
    used.add(models.Event)
    _, schema = models_json_schema(
        [(m, "validation") for m in sorted(used, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    schemas = schema.get("$defs", {})
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "object", "properties": {
            "code": {"type": "string"}, "message": {"type": "string"},
            "details": {"type": "object"}}}},
    }

    paths: dict[str, Any] = {}
    for method, path, summary, request, response in _OPERATIONS:
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": "OK", **_content(response)},
                "4XX": {"description": "Refused", "content": {
                    "application/json": {"schema": _ERROR}}},
            },
        }
        if request is not None:
            operation["requestBody"] = {"required": True, **_content(request)}
        if path in ("/healthz", "/.well-known/agent-card.json"):
            operation["security"] = []
        paths.setdefault(path, {})[method] = operation

    return {
        "openapi": "3.1.0",
        "info": {"title": "peermesh agent node", "version": "0.1.0"},
        "servers": [{"url": url}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def _content(model: type[BaseModel] | None) -> dict[str, Any]:
    if model is None:
        return {}
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"content": {"application/json": {"schema": ref}}}
