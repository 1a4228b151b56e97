"""Rules: declarative reactions a node applies to its own tasks, evaluated in-process.

What a rule may say (events, filters, actions, and which action may act at which event) is
the schema in mesh.rules, shared with topologies; this module loads rules and runs them.

Rules run in order and the first block ends an evaluation. Choices the issue left open:

- `set-params` is a sixth action besides prompt-inject, block, require-approval, webhook and
  redact: chat.params needs a way to act, and folding a params override into prompt-inject
  would give one action two unrelated meanings.
- `redact` is a filter, not a reaction: it runs before the other rules of its event, so that
  nothing else (a webhook, an event, the model) sees what it removes, and it has no cooldown.
  Its `targets` say where it filters: `tool_output` at tool.execute.after (the result the
  model, the transcript and the tool_result event get, and tool arguments shown in events)
  and `prompt` at chat.system.transform (system and user messages before the model sees
  them, and user messages as events show them). Without `targets` it filters the data of
  its own event.
- A block of a prompt (at session.start, chat.system.transform or chat.params) ends the task
  as failed with the rule's reason: the prompt never reaches the model, so there is no model
  to tell.
- `cooldown_ms` keeps a rule quiet after it fired: within the task at the chat.* and tool.*
  events, and across the node's tasks at the session.* events, which come once per task.

A webhook POSTs the event as JSON and retries transient failures. It runs in the background
unless the rule is `blocking`; a blocking webhook holds the action until it is delivered, and
where the event allows `block`, an answer of {"block": true, "reason": "..."} blocks it. A
webhook that cannot be delivered is a `webhook.failed` event on the task's stream and never
fails the task, blocking or not (it fails open). Every firing is a `rule.fired` event.

Patterns (`match` and redact `pattern`) run in the `regex` engine with PATTERN_TIMEOUT_S per
search or rewrite of one value, so a pattern that backtracks catastrophically costs the node
a fraction of a second, not minutes. A `match` that runs out of time does not fire its rule;
a redact that runs out of time fails closed: every string of the value becomes a marker, as
nothing is known not to hold the secret. Either is a `rule.error` event naming the rule.
Redaction at tool.execute.after and chat.system.transform runs on a worker thread, with the
engine releasing the GIL, so that a large output keeps the node answering meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import regex
import structlog
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from yarl import URL

from mesh.errors import BadRequest, ConfigError, Conflict, MeshError
from mesh.models import Task
from mesh.rules import (
    ACTIONS_AT,
    PATTERN_TIMEOUT_S,
    SESSION_EVENTS,
    TARGET_EVENTS,
    Block,
    PromptInject,
    Redact,
    RequireApproval,
    Rule,
    RuleError,
    SetParams,
    Webhook,
    parse_rules,
)

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


# The one retry policy of webhook deliveries: exponential from the base, capped.
WEBHOOK_RETRY_BASE_S = 0.2
WEBHOOK_RETRY_MAX_S = 10.0
# Background deliveries still running at shutdown get this long before they are dropped.
WEBHOOK_GRACE_S = 2.0
# Where the cooldowns of session.* rules are kept: they span tasks.
NODE_SCOPE = ""


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
    # Imported here: only a node with a rules file needs YAML, and it costs start time.
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"rules file {path}: cannot read it: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"rules file {path}: not UTF-8 text: {exc}") from exc
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


class PatternTimeout(Exception):
    """A rule's pattern ran out of its time on a value."""


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise PatternTimeout
    return left


def _substitute(
    value: V, pattern: regex.Pattern[str], replacement: str, deadline: float
) -> tuple[V, int]:
    """`value` with every match replaced, inside strings, lists, dicts and pydantic models.

    Raises PatternTimeout once the work passes `deadline` (time.monotonic()): the budget is
    for the whole value, however many strings it holds.
    """
    if isinstance(value, str):
        try:
            # concurrent=True releases the GIL while matching, for callers on a worker thread.
            text, count = pattern.subn(lambda _: replacement, value,
                                       timeout=_remaining(deadline), concurrent=True)
        except TimeoutError:
            raise PatternTimeout from None
        return text, count  # type: ignore[return-value]
    return _rebuild(value, lambda item: _substitute(item, pattern, replacement, deadline))


def _withhold(value: V, marker: str) -> V:
    """`value` with every string replaced by `marker`: what a redact that timed out shows."""
    if isinstance(value, str):
        return marker  # type: ignore[return-value]
    return _rebuild(value, lambda item: (_withhold(item, marker), 1))[0]


def _rebuild(value: V, change: Any) -> tuple[V, int]:
    """`value` with `change` (item -> (item, count)) applied to every item inside it."""
    if isinstance(value, BaseModel):
        data, count = change(value.model_dump())
        if not count:
            return value, 0
        try:
            return type(value).model_validate(data), count
        except ValidationError:
            # The replacement broke a constraint of the model; its data, redacted, will do.
            return data, count  # type: ignore[return-value]
    if isinstance(value, dict):
        pairs = [(key, change(item)) for key, item in value.items()]
        found = {key: item for key, (item, _) in pairs}
        return found, sum(n for _, (_, n) in pairs)  # type: ignore[return-value]
    if isinstance(value, (list, tuple)):
        items = [change(item) for item in value]
        rebuilt = type(value)(item for item, _ in items)
        return rebuilt, sum(n for _, n in items)  # type: ignore[return-value]
    return value, 0


def _search(pattern: regex.Pattern[str], text: str) -> bool:
    """Whether `pattern` occurs in `text`; raises PatternTimeout when it takes too long."""
    try:
        return pattern.search(text, timeout=PATTERN_TIMEOUT_S, concurrent=True) is not None
    except TimeoutError:
        raise PatternTimeout from None


@dataclasses.dataclass
class _Redacted:
    """What one redact rule did to a value, reported on the event loop once it is done."""

    rule: Rule
    replaced: int = 0
    timed_out: str | None = None  # which regex ran out of time: "pattern", "match pattern"


class RuleEngine:
    """The node's rules and the one place they are evaluated."""

    def __init__(self, node: Node, rules: list[Rule]) -> None:
        self.node = node
        self._rules: tuple[Rule, ...] = tuple(rules)
        self.approvals = Approvals(node)
        self._webhooks = _Webhooks(node)
        # task id (or NODE_SCOPE) -> rule id -> when the rule last fired (monotonic seconds)
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
        if not ctx.params:
            return settings
        return dataclasses.replace(settings, **ctx.params)  # type: ignore[type-var]

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

    def redact_prompt(self, task: Task, text: str) -> str:
        """A user's message as events show it, through the prompt filters."""
        return self._redact(RuleContext(task, subject=text), "prompt", text, event=None)

    def redact_args(self, task: Task, tool: str, args: V) -> V:
        """Tool arguments as events show them, through the tool_output filters."""
        ctx = RuleContext(task, subject=json.dumps(args, default=str), tool=tool)
        return self._redact(ctx, "tool_output", args, event=None)

    # -- evaluation ---------------------------------------------------------------------------

    async def fire(self, event: str, ctx: RuleContext) -> RuleContext:
        """Run the rules of `event` in order over `ctx`: redaction first, then the actions."""
        rules = self._rules
        if event == "tool.execute.after":
            ctx.output = await self._redact_off_loop(ctx, "tool_output", ctx.output, event)
        elif event == "chat.system.transform":
            ctx.system = await self._redact_off_loop(ctx, "prompt", ctx.system, event)
            for message in ctx.messages:
                if message.get("role") == "user":
                    message["content"] = await self._redact_off_loop(
                        ctx, "prompt", message.get("content"), event)

        for rule in rules:
            if (not rule.enabled or rule.trigger.event != event
                    or isinstance(rule.action, Redact)
                    or not self._matches_or_report(rule, event, ctx)
                    or not self._cooled_down(rule, event, ctx.task.id)):
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
        return trigger.match_re is None or _search(trigger.match_re, ctx.subject)

    def _matches_or_report(self, rule: Rule, event: str, ctx: RuleContext) -> bool:
        """Whether the rule fires here; a `match` that runs out of time does not fire it."""
        try:
            return self._matches(rule, ctx)
        except PatternTimeout:
            self._emit_error(rule, event, ctx, f"its match pattern took longer than "
                                               f"{PATTERN_TIMEOUT_S:g}s; the rule did not fire")
            return False

    def _cooled_down(self, rule: Rule, event: str, task_id: str) -> bool:
        """Whether the rule may fire now; if so, its cooldown starts again."""
        if not rule.cooldown_ms:
            return True
        scope = NODE_SCOPE if event in SESSION_EVENTS else task_id
        fired = self._fired_at.setdefault(scope, {})
        now = time.monotonic()
        last = fired.get(rule.id)
        if last is not None and (now - last) * 1000 < rule.cooldown_ms:
            return False
        fired[rule.id] = now
        return True

    def _redact(self, ctx: RuleContext, target: str, value: V, *, event: str | None) -> V:
        """`value` through the redact rules of `target`, on the calling thread."""
        value, done = self._filter(self._redactors(target), ctx, value)
        self._report(done, ctx, target, event)
        return value

    async def _redact_off_loop(self, ctx: RuleContext, target: str, value: V, event: str) -> V:
        """`_redact` on a worker thread, so that a large value keeps the node answering."""
        redactors = self._redactors(target)
        if not redactors:
            return value
        value, done = await asyncio.to_thread(self._filter, redactors, ctx, value)
        self._report(done, ctx, target, event)
        return value

    def _redactors(self, target: str) -> list[Rule]:
        return [rule for rule in self._rules if rule.enabled and isinstance(rule.action, Redact)
                and target in rule.targets()]

    def _filter(self, redactors: list[Rule], ctx: RuleContext, value: V,
                ) -> tuple[V, list[_Redacted]]:
        """Apply `redactors` in order; touches nothing but `value`, so any thread may run it."""
        done: list[_Redacted] = []
        for rule in redactors:
            action = rule.action
            assert isinstance(action, Redact)
            step = "match pattern"
            try:
                if not self._matches(rule, ctx):
                    continue
                step = "pattern"
                deadline = time.monotonic() + PATTERN_TIMEOUT_S
                value, count = _substitute(value, action.compiled, action.replacement, deadline)
            except PatternTimeout:
                # Fails closed: part of the value may still hold what the rule hides.
                done.append(_Redacted(rule, timed_out=step))
                return _withhold(value, f"[REDACTED: rule {rule.id} timed out]"), done
            done.append(_Redacted(rule, replaced=count))
        return value, done

    def _report(self, done: list[_Redacted], ctx: RuleContext, target: str,
                event: str | None) -> None:
        for outcome in done:
            if outcome.timed_out is not None:
                self._emit_error(outcome.rule, event or TARGET_EVENTS[target], ctx,
                                 f"its {outcome.timed_out} took longer than "
                                 f"{PATTERN_TIMEOUT_S:g}s; the whole value was withheld")
            elif outcome.replaced and event is not None:
                self._emit_fired(outcome.rule, event, ctx, replaced=outcome.replaced)

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

    def _emit_error(self, rule: Rule, event: str, ctx: RuleContext, error: str) -> None:
        data: dict[str, Any] = {"rule": rule.id, "event": event, "action": rule.action.type,
                                "error": f"rule {rule.id}: {error}"}
        if ctx.call_id is not None:
            data.update(call_id=ctx.call_id, tool=ctx.tool)
        self.node.events.emit(ctx.task.id, "rule.error", data)
        log.warning("rule.timed_out", task_id=ctx.task.id, rule=rule.id, on=event,
                    error=error)

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
        except Exception as exc:
            # Fails open, whatever the fault: a webhook never fails the task.
            if not isinstance(exc, WebhookError):
                log.exception("webhook.crashed", task_id=task_id, rule=rule.id, url=shown)
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
        except ValueError as exc:
            # A request aiohttp will not send as given; no retry can change that.
            raise WebhookError(f"cannot send it: {exc}") from exc
        return answer if isinstance(answer, dict) else {}
