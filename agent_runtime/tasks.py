"""Tasks: their lifecycle, their durable record, and the tool calls they make.

A task runs either its explicit steps (tool calls in order, no model) or, when it only has a
description, the agent loop. Every change is an event. A task never outlives the node silently:
tasks found unfinished at start, or running at shutdown, are marked interrupted.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import structlog
from pydantic import BaseModel

from mesh.errors import BadRequest, Conflict, MeshError, NotFound, ToolError, Unavailable
from mesh.models import (
    TERMINAL_STATUSES,
    ExecResult,
    Mode,
    Task,
    TaskCreate,
    TaskStatus,
)

from .agent.modes import policy_for
from .tools import ToolContext

if TYPE_CHECKING:
    from .node import Node

__all__ = ["TaskError", "TaskManager", "cut"]

log = structlog.get_logger("agent_runtime.tasks")

EVENT_OUTPUT_CHARS = 4000

AgentRunner = Callable[[Task], Awaitable[Any]]



class TaskError(MeshError):
    """A task cannot go on; its message becomes the task's failure reason."""


def cut(text: str, limit: int = EVENT_OUTPUT_CHARS) -> str:
    """Head and tail of `text` with a marker, for events; the full text stays elsewhere."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def to_jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [to_jsonable(item) for item in value]
    return value


def render_output(value: Any) -> str:
    """A tool result as the text a model or an event shows."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json(indent=1)
    return json.dumps(to_jsonable(value), indent=1, default=str)


class TaskManager:
    def __init__(self, node: Node) -> None:
        self.node = node
        from .agent.loop import AgentLoop

        self.agent_runner: AgentRunner = AgentLoop(node).run
        self._running: dict[str, asyncio.Task[None]] = {}
        self._inbox: dict[str, list[str]] = {}
        self._rollback_points: dict[str, str] = {}
        self._arming: dict[str, asyncio.Lock] = {}
        self._tasks: dict[str, Task] = {}
        self._closing = False

    @property
    def events(self) -> Any:
        return self.node.events

    # -- lifecycle ----------------------------------------------------------------------------

    def recover(self) -> None:
        """Mark tasks a previous run of this node left unfinished as interrupted."""
        for task in self.node.store.unfinished_tasks():
            self._finish(task, TaskStatus.INTERRUPTED, error="the node stopped while it ran")
            log.info("task.interrupted", task_id=task.id, reason="found unfinished at start")
        self.node.events.flush()

    async def close(self) -> None:
        """Stop taking work and interrupt what runs."""
        self._closing = True
        running = list(self._running.values())
        for job in running:
            job.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    # -- queries ------------------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        task = self._tasks.get(task_id) or self.node.store.get_task(task_id)
        if task is None:
            raise NotFound(f"no task {task_id!r}", details={"task_id": task_id})
        return task

    def list(self, *, status: str | None = None, limit: int = 100) -> list[Task]:
        return self.node.store.list_tasks(status=status, limit=limit)

    # -- commands -----------------------------------------------------------------------------

    def create(self, request: TaskCreate) -> Task:
        if self._closing:
            raise Unavailable("the node is shutting down and takes no new tasks")
        if request.steps is not None and not request.steps:
            raise BadRequest("steps is empty: give at least one step, or leave steps out for "
                             "the agent loop", details={"field": "steps"})
        if not request.steps and not request.description.strip():
            raise BadRequest(
                "a task needs a description or steps", details={"field": "description"}
            )
        # Steps may use any tool, except that ask and architect keep their promise to only
        # read, or to write only plans, whoever wrote the plan.
        limits = policy_for(request.mode) if request.mode in (Mode.ASK, Mode.ARCHITECT) \
            else None
        for index, step in enumerate(request.steps or []):
            try:
                tool = self.node.tools.get(step.tool)
                tool.parse_args(step.args)
            except ToolError as exc:
                raise BadRequest(
                    f"steps.{index}: {exc}", details={"field": f"steps.{index}"}
                ) from exc
            refusal = limits.refusal(tool, step.args) if limits is not None else None
            if refusal is not None:
                raise BadRequest(f"steps.{index}: {refusal}",
                                 details={"field": f"steps.{index}.tool"})

        options = request.model_dump(
            include={"rollback_on_failure", "model", "api_base", "temperature", "max_steps",
                     "max_tokens", "timeout_s"},
            exclude_none=True,
        )
        task = Task(
            id=uuid.uuid4().hex[:16],
            description=request.description,
            mode=request.mode,
            status=TaskStatus.QUEUED,
            steps=request.steps,
            tags=request.tags,
            metadata=request.metadata,
            created_at=time.time(),
            options=options,
        )
        self._save(task)
        self.events.emit(task.id, "task.created", {"mode": task.mode.value, "tags": task.tags})
        log.info("task.created", task_id=task.id, mode=task.mode.value,
                 steps=len(task.steps or []))
        self._start(task)
        return task

    def cancel(self, task_id: str) -> Task:
        task = self.get(task_id)
        if task.status in TERMINAL_STATUSES:
            raise Conflict(
                f"task {task_id} already ended as {task.status.value}",
                details={"task_id": task_id, "status": task.status.value},
            )
        job = self._running.get(task_id)
        if job is not None:
            job.cancel()
        return task

    def set_mode(self, task_id: str, mode: Mode) -> Task:
        task = self.get(task_id)
        if task.status in TERMINAL_STATUSES:
            raise Conflict(
                f"task {task_id} already ended as {task.status.value}; its mode is fixed",
                details={"task_id": task_id, "status": task.status.value},
            )
        previous = task.mode
        if previous != mode:
            task.mode = mode
            self._save(task)
            self.events.emit(task.id, "mode.changed", {"from": previous.value, "to": mode.value})
            log.info("task.mode_changed", task_id=task.id, mode=mode.value)
        return task

    def add_message(self, task_id: str, content: str) -> Task:
        """A user message: a running task reads it next turn; a finished one runs again."""
        task = self.get(task_id)
        if task.steps:
            raise Conflict(
                f"task {task_id} runs explicit steps and takes no messages",
                details={"task_id": task_id},
            )
        if self._closing:
            raise Unavailable("the node is shutting down and takes no new work")
        shown = self.node.rules.redact_prompt(task, content)
        self.events.emit(task.id, "message", {"role": "user", "text": shown})
        if task.status not in TERMINAL_STATUSES:
            self._inbox.setdefault(task.id, []).append(content)
            return task

        # A finished task continues as a new run of the same conversation.
        transcript = self.node.store.get_transcript(task.id)
        transcript.append({"role": "user", "content": content})
        self.node.store.save_transcript(task.id, transcript)
        task.status = TaskStatus.QUEUED
        task.result = None
        task.error = None
        task.finished_at = None
        self._save(task)
        self._start(task)
        return task

    def take_messages(self, task_id: str) -> list[str]:
        return self._inbox.pop(task_id, [])

    def has_messages(self, task_id: str) -> bool:
        return bool(self._inbox.get(task_id))

    async def wait(self, task_id: str) -> Task:
        job = self._running.get(task_id)
        if job is not None:
            await asyncio.shield(job)
        return self.get(task_id)

    # -- running ------------------------------------------------------------------------------

    def _start(self, task: Task) -> None:
        job = asyncio.get_running_loop().create_task(self._run(task), name=f"task-{task.id}")
        self._running[task.id] = job
        job.add_done_callback(lambda _: self._running.pop(task.id, None))

    async def _run(self, task: Task) -> None:
        bound = log.bind(task_id=task.id)
        task.status = TaskStatus.RUNNING
        task.started_at = time.time()
        self._save(task)
        self.events.emit(task.id, "task.started", {})
        self.node.metrics.tasks_running.inc()
        try:
            await self.node.rules.session_start(task)
            if task.steps:
                result = await self._run_steps(task)
            else:
                result = await self.agent_runner(task)
            await self.node.rules.session_idle(task, result)
        except asyncio.CancelledError:
            if self._closing:
                self._finish(task, TaskStatus.INTERRUPTED, error="the node is shutting down")
            else:
                await self._roll_back(task)
                self._finish(task, TaskStatus.CANCELLED, error="cancelled on request")
            # A cancelled task ends here: the cancellation was aimed at this task alone.
        except TaskError as exc:
            await self._roll_back(task)
            await self.node.rules.session_error(task, str(exc))
            self._finish(task, TaskStatus.FAILED, error=str(exc))
        except Exception as exc:
            bound.exception("task.crashed")
            await self._roll_back(task)
            await self.node.rules.session_error(task, f"internal error: {exc!r}")
            self._finish(task, TaskStatus.FAILED, error=f"internal error: {exc!r}")
        else:
            await self._drop_rollback_point(task)
            self._finish(task, TaskStatus.COMPLETED, result=result)
        finally:
            self._inbox.pop(task.id, None)
            self.node.rules.forget(task.id)
            self.node.metrics.tasks_running.dec()

    def _finish(
        self, task: Task, status: TaskStatus, *, result: Any = None, error: str | None = None
    ) -> None:
        task.status = status
        task.finished_at = time.time()
        task.result = to_jsonable(result)
        task.error = error
        self._save(task)
        self._tasks.pop(task.id, None)
        kind = {
            TaskStatus.COMPLETED: "task.completed",
            TaskStatus.FAILED: "task.failed",
            TaskStatus.CANCELLED: "task.cancelled",
            TaskStatus.INTERRUPTED: "task.interrupted",
        }[status]
        data: dict[str, Any] = {"status": status.value}
        if error is not None:
            data["error"] = error
        if result is not None:
            data["result"] = cut(render_output(result))
        self.events.emit(task.id, kind, data)
        self.node.metrics.tasks.labels(status=status.value).inc()
        log.info(kind, task_id=task.id, error=error)

    def set_input_required(self, task: Task, waiting: bool) -> None:
        """Mark a running task as waiting for a person's answer, or as running again."""
        if task.status not in TERMINAL_STATUSES:
            task.status = TaskStatus.INPUT_REQUIRED if waiting else TaskStatus.RUNNING
            self._save(task)

    def _save(self, task: Task) -> None:
        if task.status not in TERMINAL_STATUSES:
            self._tasks[task.id] = task
        self.node.store.save_task(task)

    async def _run_steps(self, task: Task) -> list[Any]:
        results: list[Any] = []
        for index, step in enumerate(task.steps or []):
            ok, output = await self.call_tool(
                task, step.tool, step.args, call_id=f"step-{index}"
            )
            results.append(to_jsonable(output) if ok else {"error": output})
            if step.check and not ok:
                raise TaskError(f"step {index} ({step.tool}) failed: {cut(str(output), 500)}")
            if step.check and isinstance(output, ExecResult) and not _exec_succeeded(output):
                why = "timed out" if output.timed_out else f"exited with {output.exit_code}"
                tail = cut(output.stderr.strip() or output.stdout.strip(), 500)
                raise TaskError(f"step {index} ({step.tool}) {why}: {tail}")
        return results

    async def call_tool(
        self, task: Task, name: str, args: dict[str, Any], *, call_id: str
    ) -> tuple[bool, Any]:
        """Run one tool call for a task, with its tool_use and tool_result events.

        Returns (ok, output): the tool's result, or the reason it could not run. Faults of the
        call (unknown tool, bad arguments, a refused path) and refusals by rules come back as
        (False, reason).
        """
        rules = self.node.rules
        await self._arm_rollback(task)
        self.events.emit(task.id, "tool_use", {
            "call_id": call_id, "tool": name, "args": rules.redact_args(task, name, args)})
        refusal = await rules.before_tool(task, call_id, name, args)
        if refusal is not None:
            self._refused(task, call_id, name, refusal)
            return False, refusal
        started = time.perf_counter()
        ctx = ToolContext(task_id=task.id, call_id=call_id, mode=task.mode.value)
        try:
            output = await self.node.tools.get(name).call(ctx, args)
            ok = True
        except (ToolError, MeshError) as exc:
            output, ok = str(exc), False
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        output = await rules.after_tool(task, call_id, name, args, ok, output)
        self.node.metrics.tool_calls.labels(tool=name, outcome="ok" if ok else "error").inc()
        self.events.emit(
            task.id,
            "tool_result",
            {"call_id": call_id, "tool": name, "ok": ok, "duration_ms": duration_ms,
             "output": cut(render_output(output))},
        )
        return ok, output

    def refuse_call(
        self, task: Task, call_id: str, name: str, args: Any, reason: str
    ) -> None:
        """Record a tool call that was not run because the call itself was wrong."""
        self.events.emit(task.id, "tool_use", {
            "call_id": call_id, "tool": name,
            "args": self.node.rules.redact_args(task, name, args)})
        self._refused(task, call_id, name, reason)

    def _refused(self, task: Task, call_id: str, name: str, reason: str) -> None:
        self.node.metrics.tool_calls.labels(tool=name, outcome="refused").inc()
        self.events.emit(task.id, "tool_result", {
            "call_id": call_id, "tool": name, "ok": False, "refused": True,
            "output": cut(reason)})

    # -- rollback -----------------------------------------------------------------------------

    def _wants_rollback(self, task: Task) -> bool:
        asked = task.options.get("rollback_on_failure")
        if asked is not None:
            return bool(asked)
        # On by default for the modes that change code; a step plan asks for it explicitly.
        return not task.steps and task.mode in (Mode.CODE, Mode.DEBUG)

    async def _arm_rollback(self, task: Task) -> None:
        if task.id in self._rollback_points or not self._wants_rollback(task):
            return
        # The parallel calls of one turn all wait for the one snapshot, taken before any of
        # them touches the workspace: a second snapshot would catch the first call's writes.
        async with self._arming.setdefault(task.id, asyncio.Lock()):
            if task.id in self._rollback_points:
                return
            info = await self.node.snapshots.create(alias=None)
            self._rollback_points[task.id] = info.id
        self.events.emit(task.id, "rollback.armed", {"snapshot": info.id})

    async def _roll_back(self, task: Task) -> None:
        self._arming.pop(task.id, None)
        snapshot_id = self._rollback_points.pop(task.id, None)
        if snapshot_id is None:
            return
        try:
            await self.node.snapshots.restore(snapshot_id)
        except Exception as exc:
            log.exception("task.rollback_failed", task_id=task.id, snapshot=snapshot_id)
            self.events.emit(task.id, "rollback.failed", {"snapshot": snapshot_id,
                                                          "error": str(exc)})
            return
        self.events.emit(task.id, "rollback.restored", {"snapshot": snapshot_id})
        log.info("task.rolled_back", task_id=task.id, snapshot=snapshot_id)
        await self.node.snapshots.delete(snapshot_id)

    async def _drop_rollback_point(self, task: Task) -> None:
        self._arming.pop(task.id, None)
        snapshot_id = self._rollback_points.pop(task.id, None)
        if snapshot_id is not None:
            await self.node.snapshots.delete(snapshot_id)


def _exec_succeeded(result: ExecResult) -> bool:
    return result.exit_code == 0 and not result.timed_out
