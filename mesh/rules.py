"""The rule schema: what a rule may say, checked the same way by the node and by topologies.

A rule names an event, a filter on it (task tags, task mode, tool name or glob, a regex) and
one action; the node's engine (agent_runtime.rules) evaluates them. What each event shows
and which actions may act there:

    event                   `match` searches        actions
    session.start           the task description    block, webhook
    chat.system.transform   the latest user prompt  prompt-inject, redact, block, webhook
    chat.params             the latest user prompt  set-params, block, webhook
    tool.execute.before     the JSON arguments      block, require-approval, webhook
    tool.execute.after      the JSON arguments      redact, webhook
    session.idle            the task's result       webhook
    session.error           the task's error        webhook

`check_rules` validates a list and locates every problem by its key path, so the node can
answer `rules[1].action.pattern: ...` and a topology `nodes[0].rules[1].action.pattern` at
its file and line.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal, get_args

import regex
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL

from .errors import BadRequest, ConfigError
from .models import Mode

__all__ = [
    "ACTIONS_AT",
    "ACTION_TYPES",
    "PATTERN_TIMEOUT_S",
    "SESSION_EVENTS",
    "TARGET_EVENTS",
    "TOOL_EVENTS",
    "Block",
    "PromptInject",
    "Redact",
    "RequireApproval",
    "Rule",
    "RuleError",
    "RuleSet",
    "SetParams",
    "Trigger",
    "Webhook",
    "check_rules",
    "compile_pattern",
    "parse_rules",
]

Loc = tuple[str | int, ...]

# How long one rule pattern may search or rewrite one value. Rule patterns run in the
# `regex` engine, not `re`: a pattern that backtracks catastrophically would otherwise hold
# the node (and the GIL, so no thread helps) for minutes on one tool output.
PATTERN_TIMEOUT_S = 0.2

# An HTTP header name: a token (RFC 9110, section 5.6.2).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

EventName = Literal[
    "session.start",
    "chat.system.transform",
    "chat.params",
    "tool.execute.before",
    "tool.execute.after",
    "session.idle",
    "session.error",
]
TOOL_EVENTS = frozenset({"tool.execute.before", "tool.execute.after"})
# Events that come once per task; a cooldown on them spans the node's tasks.
SESSION_EVENTS = frozenset({"session.start", "session.idle", "session.error"})
Target = Literal["tool_output", "prompt"]
# Where each redact target is filtered, and the target a redact rule's own event implies.
TARGET_EVENTS: dict[str, str] = {
    "tool_output": "tool.execute.after", "prompt": "chat.system.transform"}
ACTIONS_AT: dict[str, tuple[str, ...]] = {
    "session.start": ("block", "webhook"),
    "chat.system.transform": ("prompt-inject", "redact", "block", "webhook"),
    "chat.params": ("set-params", "block", "webhook"),
    "tool.execute.before": ("block", "require-approval", "webhook"),
    "tool.execute.after": ("redact", "webhook"),
    "session.idle": ("webhook",),
    "session.error": ("webhook",),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def compile_pattern(pattern: str) -> regex.Pattern[str]:
    """A rule's regex, compiled by the engine that runs it (so what validates also runs)."""
    return regex.compile(pattern)


def _check_regex(pattern: str) -> str:
    try:
        compile_pattern(pattern)
    except regex.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


class Trigger(_Strict):
    event: EventName
    tags: list[str] = Field(
        default_factory=list, description="Any of these task tags; none means every task.")
    tool: str | None = Field(
        default=None, min_length=1, description="Tool name or glob (tool events only).")
    mode: Mode | None = None
    match: str | None = Field(
        default=None, description="Regex searched in what the event shows (see the table).")

    _match_re: regex.Pattern[str] | None = PrivateAttr(default=None)

    @field_validator("match")
    @classmethod
    def _valid_match(cls, value: str | None) -> str | None:
        return value if value is None else _check_regex(value)

    def model_post_init(self, context: Any) -> None:
        self._match_re = compile_pattern(self.match) if self.match is not None else None

    @property
    def match_re(self) -> regex.Pattern[str] | None:
        return self._match_re


class PromptInject(_Strict):
    type: Literal["prompt-inject"]
    target: Literal["system", "user"] = "system"
    position: Literal["append", "prepend"] = "append"
    text: str = Field(min_length=1)


class Block(_Strict):
    type: Literal["block"]
    reason: str = Field(min_length=1)


class RequireApproval(_Strict):
    type: Literal["require-approval"]
    timeout_s: float = Field(default=300.0, gt=0, le=7 * 24 * 3600)
    reason: str | None = None


class Webhook(_Strict):
    type: Literal["webhook"]
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    retries: int = Field(default=3, ge=0, le=10)
    timeout_s: float = Field(default=10.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = URL(value)
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        try:
            url.port  # noqa: B018 - yarl checks the port only when asked for it
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        return value

    @field_validator("headers")
    @classmethod
    def _sendable_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name")
            if "\r" in text or "\n" in text:
                raise ValueError(f"the value of header {name!r} holds a line break")
        return value


class Redact(_Strict):
    type: Literal["redact"]
    pattern: str = Field(min_length=1)
    replacement: str = "[REDACTED]"
    targets: list[Target] | None = Field(
        default=None, min_length=1, description="Where to filter; the rule's event if absent.")

    _compiled: regex.Pattern[str] = PrivateAttr()

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        return _check_regex(value)

    def model_post_init(self, context: Any) -> None:
        self._compiled = compile_pattern(self.pattern)

    @property
    def compiled(self) -> regex.Pattern[str]:
        return self._compiled


class SetParams(_Strict):
    type: Literal["set-params"]
    model: str | None = Field(default=None, min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(
        default=None, gt=0, description="Output tokens of one model call.")

    @model_validator(mode="after")
    def _something(self) -> SetParams:
        if not self.overrides():
            raise ValueError("set at least one of model, temperature, max_tokens")
        return self

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude={"type"}, exclude_none=True)


Action = Annotated[
    PromptInject | Block | RequireApproval | Webhook | Redact | SetParams,
    Field(discriminator="type"),
]
ACTION_MODELS: dict[str, type[BaseModel]] = {
    get_args(kind.model_fields["type"].annotation)[0]: kind
    for kind in (PromptInject, Block, RequireApproval, Webhook, Redact, SetParams)
}
ACTION_TYPES = frozenset(ACTION_MODELS)


class Rule(_Strict):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    enabled: bool = True
    description: str = ""
    trigger: Trigger
    action: Action
    cooldown_ms: int = Field(
        default=0, ge=0, description="Quiet time after a firing: per task at chat.* and "
        "tool.* events, node-wide at session.* events, which come once per task.")
    blocking: bool = Field(
        default=False, description="Webhooks only: hold the action until delivered.")

    @model_validator(mode="after")
    def _default_targets(self) -> Rule:
        if isinstance(self.action, Redact) and self.action.targets is None:
            implied = [t for t, event in TARGET_EVENTS.items() if event == self.trigger.event]
            self.action.targets = implied or None  # type: ignore[assignment]
        return self

    def targets(self) -> list[str]:
        return list(self.action.targets or []) if isinstance(self.action, Redact) else []


class RuleSet(BaseModel):
    """Every rule of a node: the body of PUT /api/v1/agent/rules and the answer of GET."""

    rules: list[Rule]


def _problems(rule: Rule) -> list[tuple[Loc, str]]:
    """What a well-formed rule still gets wrong: combinations the schema alone cannot see."""
    event, action = rule.trigger.event, rule.action
    found: list[tuple[Loc, str]] = []
    if action.type not in ACTIONS_AT[event]:
        found.append((("action", "type"), f"{action.type} cannot act at {event}; actions "
                                          f"there: {', '.join(ACTIONS_AT[event])}"))
    sees_tools = event in TOOL_EVENTS or "tool_output" in rule.targets()
    if rule.trigger.tool is not None and not sees_tools:
        found.append((("trigger", "tool"), "a tool filter applies only to tool.execute.before "
                                           "and tool.execute.after"))
    if rule.blocking and not isinstance(action, Webhook):
        found.append((("blocking",), "only a webhook can be blocking; the other actions "
                                     "always act before the task goes on"))
    if rule.cooldown_ms and isinstance(action, Redact):
        found.append((("cooldown_ms",), "a redact rule filters every time; cooldown_ms must "
                                        "be 0"))
    return found


def format_field(loc: Loc, prefix: str = "rules") -> str:
    """A key path as users read it: rules[1].action.pattern."""
    name = prefix
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


def _error_loc(index: int, loc: tuple[int | str, ...]) -> Loc:
    parts = list(loc)
    # A discriminated union puts the chosen tag in the path: action.redact.pattern.
    if len(parts) > 1 and parts[0] == "action" and parts[1] in ACTION_TYPES:
        del parts[1]
    return (index, *parts)


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """The fields of the part of a rule that holds `loc`'s last key (its raw error path)."""
    models: dict[tuple[str | int, ...], type[BaseModel]] = {(): Rule, ("trigger",): Trigger}
    models.update({("action", kind): model for kind, model in ACTION_MODELS.items()})
    model = models.get(tuple(loc[:-1]))
    return list(model.model_fields) if model is not None else []


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), _fields_at(error["loc"]), n=1)
        return f"unknown field (did you mean {close[0]!r}?)" if close else "unknown field"
    if kind == "union_tag_not_found":
        return f"missing `type`; one of {', '.join(sorted(ACTION_TYPES))}"
    if kind == "union_tag_invalid":
        return (f"unknown action type {error['ctx']['tag']!r}; one of "
                f"{', '.join(sorted(ACTION_TYPES))}")
    if kind == "value_error":
        return str(error["ctx"]["error"])
    return str(error["msg"])


def check_rules(data: Any, *, taken: dict[str, str] | None = None,
                ) -> tuple[list[Rule], list[tuple[Loc, str]]]:
    """The valid rules of a list, and every problem located by (index, key, ...).

    `taken` maps rule ids already in use elsewhere to where, so that a duplicate across two
    lists (a mesh-wide rule and a node's own) is named too.
    """
    if not isinstance(data, list):
        return [], [((), "must be a list of rules")]
    rules: list[Rule] = []
    problems: list[tuple[Loc, str]] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data):
        # Ids are compared as written, so a duplicate is named even where the rule is broken.
        rule_id = raw.get("id") if isinstance(raw, dict) else None
        if isinstance(rule_id, str) and rule_id in seen:
            problems.append(((index, "id"), f"duplicate id {rule_id!r} (also "
                                            f"{format_field((seen[rule_id],))})"))
        elif isinstance(rule_id, str) and taken and rule_id in taken:
            problems.append(((index, "id"), f"duplicate id {rule_id!r} (also {taken[rule_id]})"))
        if isinstance(rule_id, str):
            seen.setdefault(rule_id, index)

        try:
            rule = Rule.model_validate(raw)
        except ValidationError as exc:
            problems += [(_error_loc(index, err["loc"]), _message(err)) for err in exc.errors()]
            continue
        problems += [((index, *loc), message) for loc, message in _problems(rule)]
        rules.append(rule)
    return rules, problems


class RuleError(ConfigError):
    """Rules that do not validate; `problems` names each field as rules[i].field."""

    def __init__(self, problems: list[dict[str, str]], *, source: str | None = None) -> None:
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        super().__init__(f"{source}: {summary}" if source else f"invalid rules: {summary}")
        self.problems = problems
        self.source = source

    def as_bad_request(self) -> BadRequest:
        return BadRequest(str(self), details={"errors": self.problems})


def parse_rules(data: Any, *, source: str | None = None) -> list[Rule]:
    """Validate a list of rules, all or nothing; RuleError names every bad field."""
    rules, problems = check_rules(data)
    if problems:
        raise RuleError([{"field": format_field(loc), "message": message}
                         for loc, message in problems], source=source)
    return rules
