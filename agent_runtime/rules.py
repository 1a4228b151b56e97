"""Rules: declarative reactions a node applies to its own tasks, evaluated in-process.

A rule names an event, a filter on it (task tags, task mode, tool name or glob, a regex) and
one action. What each event shows and which actions may act there:

    event                   `match` searches        actions
    session.start           the task description    block, webhook
    chat.system.transform   the latest user prompt  prompt-inject, redact, block, webhook
    chat.params             the latest user prompt  set-params, block, webhook
    tool.execute.before     the JSON arguments      block, require-approval, webhook
    tool.execute.after      the JSON arguments      redact, webhook
    session.idle            the task's result       webhook
    session.error           the task's error        webhook

Rules run in order and the first block ends an evaluation. Two choices the issue left open:

- `set-params` is a sixth action besides prompt-inject, block, require-approval, webhook and
  redact: chat.params needs a way to act, and folding a params override into prompt-inject
  would give one action two unrelated meanings.
- `redact` is a filter, not a reaction: it runs before the other rules of its event, so that
  nothing else (a webhook, an event, the model) sees what it removes, and it has no cooldown.
  Its `targets` say where it filters: `tool_output` at tool.execute.after (the result the
  model, the transcript and the tool_result event get, and tool arguments shown in events)
  and `prompt` at chat.system.transform (system and user messages before the model sees
  them). Without `targets` it filters the data of its own event.

A webhook POSTs the event as JSON and retries transient failures. It runs in the background
unless the rule is `blocking`; a blocking webhook holds the action until it is delivered, and
where the event allows `block`, an answer of {"block": true, "reason": "..."} blocks it. A
webhook that cannot be delivered is a `webhook.failed` event on the task's stream and never
fails the task, blocking or not (it fails open). Every firing is a `rule.fired` event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_args

import aiohttp
import structlog
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from yarl import URL

from mesh.errors import BadRequest, ConfigError, Conflict, MeshError
from mesh.models import Mode, Task, TaskStatus

from .tasks import TaskError, cut, render_output

if TYPE_CHECKING:
    from .config import NodeConfig
    from .node import Node

__all__ = [
    "Approvals",
    "Rule",
    "RuleContext",
    "RuleEngine",
    "RuleError",
    "load_rules",
    "parse_rules",
]

log = structlog.get_logger("agent_runtime.rules")

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

# The one retry policy of webhook deliveries: exponential from the base, capped.
WEBHOOK_RETRY_BASE_S = 0.2
WEBHOOK_RETRY_MAX_S = 10.0
# Background deliveries still running at shutdown get this long before they are dropped.
WEBHOOK_GRACE_S = 2.0


# -- the rule schema --------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
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

    _match_re: re.Pattern[str] | None = PrivateAttr(default=None)

    @field_validator("match")
    @classmethod
    def _valid_match(cls, value: str | None) -> str | None:
        return value if value is None else _check_regex(value)

    def model_post_init(self, context: Any) -> None:
        self._match_re = re.compile(self.match) if self.match is not None else None

    @property
    def match_re(self) -> re.Pattern[str] | None:
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
        return value


class Redact(_Strict):
    type: Literal["redact"]
    pattern: str = Field(min_length=1)
    replacement: str = "[REDACTED]"
    targets: list[Target] | None = Field(
        default=None, min_length=1, description="Where to filter; the rule's event if absent.")

    _compiled: re.Pattern[str] = PrivateAttr()

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        return _check_regex(value)

    def model_post_init(self, context: Any) -> None:
        self._compiled = re.compile(self.pattern)

    @property
    def compiled(self) -> re.Pattern[str]:
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
ACTION_TYPES = frozenset(
    get_args(kind.model_fields["type"].annotation)[0]
    for kind in (PromptInject, Block, RequireApproval, Webhook, Redact, SetParams)
)


class Rule(_Strict):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    enabled: bool = True
    description: str = ""
    trigger: Trigger
    action: Action
    cooldown_ms: int = Field(default=0, ge=0)
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


def _problems(rule: Rule) -> list[tuple[str, str]]:
    """What a well-formed rule still gets wrong: combinations the schema alone cannot see."""
    event, action = rule.trigger.event, rule.action
    found: list[tuple[str, str]] = []
    if action.type not in ACTIONS_AT[event]:
        found.append(("action.type", f"{action.type} cannot act at {event}; actions there: "
                                     f"{', '.join(ACTIONS_AT[event])}"))
    sees_tools = event in TOOL_EVENTS or "tool_output" in rule.targets()
    if rule.trigger.tool is not None and not sees_tools:
        found.append(("trigger.tool", "a tool filter applies only to tool.execute.before "
                                      "and tool.execute.after"))
    if rule.blocking and not isinstance(action, Webhook):
        found.append(("blocking", "only a webhook can be blocking; the other actions always "
                                  "act before the task goes on"))
    if rule.cooldown_ms and isinstance(action, Redact):
        found.append(("cooldown_ms", "a redact rule filters every time; cooldown_ms must be 0"))
    return found


class RuleError(ConfigError):
    """Rules that do not validate; `problems` names each field as rules[i].field."""

    def __init__(self, problems: list[dict[str, str]], *, source: str | None = None) -> None:
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        super().__init__(f"{source}: {summary}" if source else f"invalid rules: {summary}")
        self.problems = problems
        self.source = source

    def as_bad_request(self) -> BadRequest:
        return BadRequest(str(self), details={"errors": self.problems})


def _field_name(index: int, loc: tuple[int | str, ...]) -> str:
    parts = list(loc)
    # A discriminated union puts the chosen tag in the path: action.redact.pattern.
    if len(parts) > 1 and parts[0] == "action" and parts[1] in ACTION_TYPES:
        del parts[1]
    name = f"rules[{index}]"
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "union_tag_not_found":
        return f"missing `type`; one of {', '.join(sorted(ACTION_TYPES))}"
    if kind == "union_tag_invalid":
        return (f"unknown action type {error['input'].get('type')!r}; one of "
                f"{', '.join(sorted(ACTION_TYPES))}")
    if kind == "value_error":
        return str(error["ctx"]["error"])
    return str(error["msg"])


def parse_rules(data: Any, *, source: str | None = None) -> list[Rule]:
    """Validate a list of rules, all or nothing; RuleError names every bad field."""
    if not isinstance(data, list):
        raise RuleError([{"field": "rules", "message": "must be a list of rules"}],
                        source=source)
    rules: list[Rule] = []
    problems: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data):
        try:
            rule = Rule.model_validate(raw)
        except ValidationError as exc:
            problems += [{"field": _field_name(index, err["loc"]), "message": _message(err)}
                         for err in exc.errors()]
            continue
        problems += [{"field": f"rules[{index}].{field}", "message": message}
                     for field, message in _problems(rule)]
        if rule.id in seen:
            problems.append({"field": f"rules[{index}].id",
                             "message": f"duplicate id {rule.id!r} (also rules[{seen[rule.id]}])"})
        seen.setdefault(rule.id, index)
        rules.append(rule)
    if problems:
        raise RuleError(problems, source=source)
    return rules


def load_rules(config: NodeConfig) -> list[Rule]:
    """The rules a node starts with: its rules file, then MESH_RULES (set by topologies)."""
    rules: list[Rule] = []
    if config.rules_file is not None:
        rules += parse_rules(_read_rules_file(config.rules_file),
                             source=f"rules file {config.rules_file}")
    if config.rules:
        rules += parse_rules(config.rules, source="MESH_RULES")
    ids = [rule.id for rule in rules]
    twice = sorted({rule_id for rule_id in ids if ids.count(rule_id) > 1})
    if twice:
        raise ConfigError(f"rule ids given by both the rules file and MESH_RULES: "
                          f"{', '.join(twice)}")
    return rules


def _read_rules_file(path: Path) -> Any:
    """A YAML or JSON list of rules, or a mapping whose `rules` key holds one."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"rules file {path}: cannot read it: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"rules file {path}: not valid YAML or JSON: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"rules"}:
        return data["rules"]
    return [] if data is None else data


# -- evaluation -------------------------------------------------------------------------------


@dataclasses.dataclass
class RuleContext:
    """What one event shows the rules; actions rewrite it in place."""

    task: Task
    # What `match` is searched in (see the table in the module docstring).
    subject: str = ""
    call_id: str | None = None
    tool: str | None = None
    args: Any = None
    ok: bool | None = None
    output: Any = None
    system: str | None = None
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    blocked: str | None = None

    def inject(self, action: PromptInject) -> None:
        def place(text: str) -> str:
            if action.position == "prepend":
                return f"{action.text}\n\n{text}"
            return f"{text}\n\n{action.text}"

        if action.target == "system":
            self.system = place(self.system or "")
            return
        for message in self.messages:
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                message["content"] = place(message["content"])


S = TypeVar("S")
V = TypeVar("V")


def _latest_user(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


def _substitute(value: V, pattern: re.Pattern[str], replacement: str) -> tuple[V, int]:
    """`value` with every match replaced, inside strings, lists, dicts and pydantic models."""
    if isinstance(value, str):
        text, count = pattern.subn(lambda _: replacement, value)
        return text, count  # type: ignore[return-value]
    if isinstance(value, BaseModel):
        data, count = _substitute(value.model_dump(), pattern, replacement)
        return (type(value).model_validate(data) if count else value), count
    if isinstance(value, dict):
        pairs = [(key, _substitute(item, pattern, replacement)) for key, item in value.items()]
        return {key: item for key, (item, _) in pairs}, sum(n for _, (_, n) in pairs)  # type: ignore[return-value]
    if isinstance(value, (list, tuple)):
        items = [_substitute(item, pattern, replacement) for item in value]
        return type(value)(item for item, _ in items), sum(n for _, n in items)  # type: ignore[return-value]
    return value, 0


class RuleEngine:
    """The node's rules and the one place they are evaluated."""

    def __init__(self, node: Node, rules: list[Rule]) -> None:
        self.node = node
        self._rules: tuple[Rule, ...] = tuple(rules)
        self.approvals = Approvals(node)
        self._webhooks = _Webhooks(node)
        # task id -> rule id -> when the rule last fired for it (monotonic seconds)
        self._fired_at: dict[str, dict[str, float]] = {}

    @property
    def rules(self) -> list[Rule]:
        return list(self._rules)

    def replace(self, rules: list[Rule]) -> None:
        """Swap the whole list; evaluations already running finish with the old one."""
        self._rules = tuple(rules)
        log.info("rules.replaced", count=len(rules))

    def forget(self, task_id: str) -> None:
        """Drop a finished task's cooldown state."""
        self._fired_at.pop(task_id, None)

    async def close(self) -> None:
        await self._webhooks.close()

    # -- the hook points the task runner and the agent loop call --------------------------

    async def session_start(self, task: Task) -> None:
        """session.start; raises TaskError when a rule blocks the task."""
        ctx = await self.fire("session.start", RuleContext(task, subject=task.description))
        _raise_if_blocked(ctx)

    async def prompt(
        self, task: Task, system: str, messages: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """chat.system.transform: the messages a turn sends, system prompt first."""
        ctx = RuleContext(task, subject=_latest_user(messages), system=system,
                          messages=[dict(message) for message in messages])
        await self.fire("chat.system.transform", ctx)
        _raise_if_blocked(ctx)
        return [{"role": "system", "content": ctx.system}, *ctx.messages]

    async def chat_params(self, task: Task, settings: S, messages: list[dict[str, Any]]) -> S:
        """chat.params: the model settings of a turn, with the overrides of set-params rules."""
        ctx = await self.fire("chat.params", RuleContext(task, subject=_latest_user(messages)))
        _raise_if_blocked(ctx)
        return dataclasses.replace(settings, **ctx.params) if ctx.params else settings  # type: ignore[type-var]

    async def before_tool(
        self, task: Task, call_id: str, tool: str, args: dict[str, Any]
    ) -> str | None:
        """tool.execute.before: why the call must not run (blocked, denied), or None."""
        ctx = RuleContext(task, subject=json.dumps(args), call_id=call_id, tool=tool,
                          args=args)
        return (await self.fire("tool.execute.before", ctx)).blocked

    async def after_tool(
        self, task: Task, call_id: str, tool: str, args: dict[str, Any], ok: bool, output: V
    ) -> V:
        """tool.execute.after: the output as the model, the transcript and events get it."""
        ctx = RuleContext(task, subject=json.dumps(args), call_id=call_id, tool=tool,
                          args=args, ok=ok, output=output)
        return (await self.fire("tool.execute.after", ctx)).output  # type: ignore[no-any-return]

    async def session_idle(self, task: Task, result: Any) -> None:
        await self.fire("session.idle", RuleContext(task, subject=render_output(result)))

    async def session_error(self, task: Task, error: str) -> None:
        await self.fire("session.error", RuleContext(task, subject=error))

    def redact_args(self, task: Task, tool: str, args: V) -> V:
        """Tool arguments as events show them, through the tool_output filters."""
        ctx = RuleContext(task, subject=json.dumps(args, default=str), tool=tool)
        return self._redact(ctx, "tool_output", args, event=None)

    # -- evaluation ---------------------------------------------------------------------------

    async def fire(self, event: str, ctx: RuleContext) -> RuleContext:
        """Run the rules of `event` in order over `ctx`: redaction first, then the actions."""
        rules = self._rules
        if event == "tool.execute.after":
            ctx.output = self._redact(ctx, "tool_output", ctx.output, event=event)
        elif event == "chat.system.transform":
            ctx.system = self._redact(ctx, "prompt", ctx.system, event=event)
            for message in ctx.messages:
                if message.get("role") == "user":
                    message["content"] = self._redact(ctx, "prompt", message.get("content"),
                                                      event=event)

        for rule in rules:
            if (not rule.enabled or rule.trigger.event != event
                    or isinstance(rule.action, Redact) or not self._matches(rule, ctx)
                    or not self._cooled_down(rule, ctx.task.id)):
                continue
            self._emit_fired(rule, event, ctx)
            await self._act(rule, event, ctx)
            if ctx.blocked is not None:
                break
        return ctx

    def _matches(self, rule: Rule, ctx: RuleContext) -> bool:
        trigger, task = rule.trigger, ctx.task
        if trigger.tags and not set(trigger.tags) & set(task.tags):
            return False
        if trigger.mode is not None and task.mode != trigger.mode:
            return False
        if trigger.tool is not None and (
            ctx.tool is None or not fnmatch.fnmatchcase(ctx.tool, trigger.tool)
        ):
            return False
        return trigger.match_re is None or bool(trigger.match_re.search(ctx.subject))

    def _cooled_down(self, rule: Rule, task_id: str) -> bool:
        """Whether the rule may fire for the task now; if so, its cooldown starts again."""
        if not rule.cooldown_ms:
            return True
        fired = self._fired_at.setdefault(task_id, {})
        now = time.monotonic()
        last = fired.get(rule.id)
        if last is not None and (now - last) * 1000 < rule.cooldown_ms:
            return False
        fired[rule.id] = now
        return True

    def _redact(self, ctx: RuleContext, target: str, value: V, *, event: str | None) -> V:
        for rule in self._rules:
            action = rule.action
            if (not rule.enabled or not isinstance(action, Redact)
                    or target not in rule.targets() or not self._matches(rule, ctx)):
                continue
            value, count = _substitute(value, action.compiled, action.replacement)
            if count and event is not None:
                self._emit_fired(rule, event, ctx, replaced=count)
        return value

    async def _act(self, rule: Rule, event: str, ctx: RuleContext) -> None:
        action = rule.action
        if isinstance(action, PromptInject):
            ctx.inject(action)
        elif isinstance(action, Block):
            ctx.blocked = f"blocked by rule {rule.id}: {action.reason}"
        elif isinstance(action, SetParams):
            ctx.params.update(action.overrides())
        elif isinstance(action, RequireApproval):
            refusal = await self.approvals.wait(rule, action, ctx, self._event_args(ctx))
            if refusal is not None:
                ctx.blocked = f"denied: {refusal}"
        elif isinstance(action, Webhook):
            payload = self._payload(rule, event, ctx)
            if not rule.blocking:
                self._webhooks.send_soon(rule, action, ctx.task.id, payload)
                return
            answer = await self._webhooks.send(rule, action, ctx.task.id, payload)
            if answer.get("block") is True and "block" in ACTIONS_AT[event]:
                reason = str(answer.get("reason") or "the webhook refused it")
                ctx.blocked = f"blocked by rule {rule.id}: {reason}"

    def _event_args(self, ctx: RuleContext) -> Any:
        return self.redact_args(ctx.task, ctx.tool or "", ctx.args)

    def _emit_fired(self, rule: Rule, event: str, ctx: RuleContext, **extra: Any) -> None:
        data: dict[str, Any] = {"rule": rule.id, "event": event, "action": rule.action.type}
        if ctx.call_id is not None:
            data.update(call_id=ctx.call_id, tool=ctx.tool)
        self.node.events.emit(ctx.task.id, "rule.fired", {**data, **extra})
        log.debug("rule.fired", task_id=ctx.task.id, rule=rule.id, on=event,
                  action=rule.action.type)

    def _payload(self, rule: Rule, event: str, ctx: RuleContext) -> dict[str, Any]:
        """The JSON a webhook receives; `id` is the same on every retry of one delivery."""
        task = ctx.task
        payload: dict[str, Any] = {
            "id": uuid.uuid4().hex, "event": event, "rule": rule.id,
            "node": self.node.config.name, "ts": time.time(),
            "task": {"id": task.id, "status": task.status.value, "mode": task.mode.value,
                     "tags": task.tags},
        }
        if ctx.tool is not None:
            payload.update(call_id=ctx.call_id, tool=ctx.tool, args=self._event_args(ctx))
        else:
            payload["text"] = cut(self._redact(ctx, "prompt", ctx.subject, event=None))
        if event == "tool.execute.after":
            payload.update(ok=ctx.ok, output=cut(render_output(ctx.output)))
        return payload


def _raise_if_blocked(ctx: RuleContext) -> None:
    if ctx.blocked is not None:
        raise TaskError(ctx.blocked)


# -- approvals --------------------------------------------------------------------------------


class Approvals:
    """Tool calls waiting for a person: approve or deny resolves them, the timeout denies."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # task id -> call id -> resolves to None (approved) or the reason for the denial
        self._waiting: dict[str, dict[str, asyncio.Future[str | None]]] = {}

    def waiting(self, task_id: str) -> list[str]:
        return sorted(self._waiting.get(task_id, {}))

    async def wait(
        self, rule: Rule, action: RequireApproval, ctx: RuleContext, shown_args: Any
    ) -> str | None:
        """Hold the call until it is answered; returns None when approved, else the reason."""
        task, call_id = ctx.task, ctx.call_id or "call"
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(task.id, {})
        waiting[call_id] = answer
        self.node.tasks.set_input_required(task, True)
        self.node.events.emit(task.id, "approval.requested", {
            "call_id": call_id, "tool": ctx.tool, "args": shown_args, "rule": rule.id,
            "reason": action.reason, "timeout_s": action.timeout_s})
        log.info("approval.requested", task_id=task.id, call_id=call_id, rule=rule.id)
        by = "request"
        try:
            async with asyncio.timeout(action.timeout_s):
                refusal = await answer
        except TimeoutError:
            refusal, by = f"no approval within {action.timeout_s:g}s", "timeout"
        finally:
            waiting.pop(call_id, None)
            if not waiting:
                self._waiting.pop(task.id, None)
                self.node.tasks.set_input_required(task, False)

        self.node.events.emit(task.id, "approval.resolved", {
            "call_id": call_id, "approved": refusal is None, "reason": refusal, "by": by})
        log.info("approval.resolved", task_id=task.id, call_id=call_id,
                 approved=refusal is None, by=by)
        return refusal

    def resolve(
        self, task_id: str, *, approved: bool, call_id: str | None = None,
        reason: str | None = None,
    ) -> str:
        """Answer a waiting call (the only one, or `call_id`); returns the call's id."""
        task = self.node.tasks.get(task_id)
        waiting = {key: future for key, future in self._waiting.get(task_id, {}).items()
                   if not future.done()}
        if not waiting:
            raise Conflict(f"task {task_id} waits for no approval",
                           details={"task_id": task_id, "status": task.status.value})
        if call_id is None:
            if len(waiting) > 1:
                raise BadRequest(
                    f"{len(waiting)} calls of task {task_id} wait for approval; name one "
                    "with call_id", details={"field": "call_id", "waiting": sorted(waiting)})
            call_id = next(iter(waiting))
        elif call_id not in waiting:
            raise Conflict(f"call {call_id!r} of task {task_id} waits for no approval",
                           details={"task_id": task_id, "waiting": sorted(waiting)})
        waiting[call_id].set_result(None if approved else (reason or "refused by the approver"))
        return call_id


# -- webhooks ---------------------------------------------------------------------------------


class WebhookError(MeshError):
    """A webhook could not be delivered."""


class _WebhookFault(WebhookError):
    """A transient delivery fault (no connection, timeout, 429 or 5xx): worth a retry."""


class _Webhooks:
    """Delivers webhook payloads, in line or in the background, with one retry policy."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=WEBHOOK_GRACE_S)
        for job in list(self._background):
            job.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def send_soon(
        self, rule: Rule, action: Webhook, task_id: str, payload: dict[str, Any]
    ) -> None:
        job = asyncio.create_task(self.send(rule, action, task_id, payload),
                                  name=f"webhook-{rule.id}")
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def send(
        self, rule: Rule, action: Webhook, task_id: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        """Deliver, retrying faults; the receiver's JSON object answer, or {} (never raises)."""
        # Logs and events show the URL without its query, where tokens tend to live.
        shown = str(URL(action.url).with_query(None))
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_WebhookFault),
            stop=stop_after_attempt(action.retries + 1),
            wait=wait_exponential(multiplier=WEBHOOK_RETRY_BASE_S, max=WEBHOOK_RETRY_MAX_S),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    answer = await self._post(action, payload)
        except WebhookError as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            log.warning("webhook.failed", task_id=task_id, rule=rule.id, url=shown,
                        error=str(exc), attempts=attempts)
            self.node.events.emit(task_id, "webhook.failed", {
                "rule": rule.id, "url": shown, "error": str(exc), "attempts": attempts})
            return {}
        log.info("webhook.delivered", task_id=task_id, rule=rule.id, url=shown,
                 on=payload["event"])
        return answer

    async def _post(self, action: Webhook, payload: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(
                action.url, json=payload, headers=action.headers,
                timeout=aiohttp.ClientTimeout(total=action.timeout_s),
            ) as response:
                if response.status == 429 or response.status >= 500:
                    raise _WebhookFault(f"the receiver answered HTTP {response.status}")
                if response.status >= 400:
                    raise WebhookError(f"the receiver refused it with HTTP {response.status}")
                try:
                    answer = await response.json(content_type=None)
                except ValueError:
                    answer = None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _WebhookFault(f"{type(exc).__name__}: {exc}") from exc
        return answer if isinstance(answer, dict) else {}
