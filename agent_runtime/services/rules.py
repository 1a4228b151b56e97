"""HTTP face of the rules: read and replace them, and answer calls waiting for approval."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..http import json_response, read_model
from ..rules import RuleError, parse_rules

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["ApprovalAnswer", "RulesBody", "add_routes"]


class RulesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Validated by parse_rules, which names each bad field as rules[i].field.
    rules: list[Any]


class ApprovalAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    call_id: str | None = Field(
        default=None, description="The call to answer; needed when several wait.")
    reason: str | None = Field(
        default=None, max_length=4000, description="Shown to the model on a denial.")


def add_routes(app: web.Application, node: Node) -> None:
    engine = node.rules

    async def get_rules(request: web.Request) -> web.Response:
        return json_response({"rules": engine.rules})

    async def put_rules(request: web.Request) -> web.Response:
        body = await read_model(request, RulesBody)
        try:
            rules = parse_rules(body.rules)
        except RuleError as exc:
            raise exc.as_bad_request() from exc
        engine.replace(rules)
        return json_response({"rules": engine.rules})

    async def answer(request: web.Request, approved: bool) -> web.Response:
        task_id = request.match_info["task_id"]
        body = await read_model(request, ApprovalAnswer)
        call_id = engine.approvals.resolve(
            task_id, approved=approved, call_id=body.call_id, reason=body.reason)
        return json_response({"task_id": task_id, "call_id": call_id, "approved": approved})

    async def approve(request: web.Request) -> web.Response:
        return await answer(request, True)

    async def deny(request: web.Request) -> web.Response:
        return await answer(request, False)

    prefix = "/api/v1/agent"
    app.router.add_get(f"{prefix}/rules", get_rules)
    app.router.add_put(f"{prefix}/rules", put_rules)
    app.router.add_post(f"{prefix}/tasks/{{task_id}}/approve", approve)
    app.router.add_post(f"{prefix}/tasks/{{task_id}}/deny", deny)
