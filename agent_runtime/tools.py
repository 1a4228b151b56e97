"""The node's tool registry: one place that names every tool, its argument schema and handler.

Step tasks and the agent loop both call tools through here, so a tool behaves the same whether
a plan or a model asked for it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from mesh.errors import ToolError

__all__ = ["JsonArgs", "Tool", "ToolContext", "ToolRegistry"]


@dataclasses.dataclass
class ToolContext:
    """What a running tool may know about the call that started it."""

    task_id: str | None = None
    call_id: str | None = None
    mode: str | None = None
    emit: Callable[[str, dict[str, Any]], Any] | None = None


ToolHandler = Callable[[ToolContext, Any], Awaitable[Any]]


class JsonArgs(BaseModel):
    """Arguments of a tool described by a JSON schema instead of a model, kept as given."""

    model_config = ConfigDict(extra="allow")


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args_model: type[BaseModel]
    handler: ToolHandler
    # What the tool may touch; modes allow tools by these, not by name.
    reads: bool = True
    writes: bool = False
    executes: bool = False
    peers: bool = False
    # A tool from elsewhere (an MCP server) brings its own argument schema; the tool then
    # takes JsonArgs and the server that runs it does the full validation.
    json_schema: dict[str, Any] | None = None

    def schema(self) -> dict[str, Any]:
        """OpenAI-style function schema, from the pydantic argument model or the JSON schema.

        A fresh dict each time, so that a caller may change it; only the parameters are shared.
        """
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description,
                         "parameters": self._parameters},
        }

    @functools.cached_property
    def _parameters(self) -> dict[str, Any]:
        # Built once: pydantic takes milliseconds per schema, and every model turn sends all.
        if self.json_schema is not None:
            params = dict(self.json_schema)
        else:
            params = self.args_model.model_json_schema()
        params.pop("title", None)
        return params

    def parse_args(self, raw: dict[str, Any]) -> BaseModel:
        if self.json_schema is not None:
            self._check_schema_keys(raw)
        try:
            return self.args_model.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(arguments)'}: "
                f"{'unknown argument' if err['type'] == 'extra_forbidden' else err['msg']}"
                for err in exc.errors()
            )
            raise ToolError(f"invalid arguments for {self.name}: {problems}") from exc

    def _check_schema_keys(self, raw: dict[str, Any]) -> None:
        """The cheap part of JSON-schema validation: required and unknown top-level keys."""
        assert self.json_schema is not None
        problems = [
            f"{key}: Field required" for key in self.json_schema.get("required", [])
            if key not in raw
        ]
        known = self.json_schema.get("properties", {})
        if self.json_schema.get("additionalProperties") is False:
            problems += [f"{key}: unknown argument" for key in raw if key not in known]
        if problems:
            raise ToolError(f"invalid arguments for {self.name}: {'; '.join(problems)}")

    async def call(self, ctx: ToolContext, raw: dict[str, Any]) -> Any:
        return await self.handler(ctx, self.parse_args(raw))


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def add(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def remove(self, name: str) -> None:
        self._tools.pop(name, None)

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            known = ", ".join(sorted(self._tools))
            raise ToolError(f"unknown tool {name!r}; available tools: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._tools)

    def all(self) -> list[Tool]:
        return [self._tools[name] for name in sorted(self._tools)]

    def __contains__(self, name: object) -> bool:
        return name in self._tools
