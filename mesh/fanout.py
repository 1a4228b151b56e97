"""Fan-out: N tasks on N nodes at once, each branch's failure its own.

    outcomes = await fan_out([
        Assignment(task={"steps": [...]}, spec=NodeSpec(name="lint")),
        Assignment(task={"description": "review auth"}, node=existing_node),
    ], spawner=spawner, limit=4, timeout=600)

Every branch catches its own failure and returns an Outcome, so one branch raising, hanging or
losing its node never cancels another or loses its result. Outcomes come back in input order.
Cancelling the fan-out cancels its tasks and stops the nodes it spawned for the purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import structlog

from .client import Peer, TaskHandle
from .errors import ConfigError, PeerError, PeerGone, PeerUnreachable, SpawnError, TaskFailed
from .models import (
    TERMINAL_STATUSES,
    NodeInfo,
    NodeSpec,
    NodeState,
    Task,
    TaskCreate,
    TaskStatus,
)

if TYPE_CHECKING:
    from .spawn.base import Spawner

__all__ = ["Assignment", "BranchState", "FailureKind", "Outcome", "fan_out"]

log = structlog.get_logger("mesh.fanout")

# How long a branch whose node broke off waits for its spawner to say how the node ended.
DIAGNOSE_WAIT_S = 3.0
# How long cancelling a branch's task may take before the branch gives up on it.
CANCEL_WAIT_S = 2.0


class FailureKind(str, enum.Enum):
    TASK_FAILED = "task failed"
    TIMED_OUT = "timed out"
    NODE_CRASHED = "node crashed"
    NODE_REMOVED = "node removed"
    # The node answered before and stopped, and nothing here knows why.
    NODE_GONE = "node gone"
    UNREACHABLE = "unreachable"
    SPAWN_FAILED = "spawn failed"
    CANCELLED = "cancelled"
    ERROR = "error"


class BranchState(str, enum.Enum):
    WAITING = "waiting"
    SPAWNING = "spawning"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclasses.dataclass
class Assignment:
    """One branch: a task, and either a node to run it on or a spec to spawn one from."""

    task: TaskCreate | dict[str, Any]
    node: NodeInfo | Peer | None = None
    spec: NodeSpec | None = None
    name: str | None = None

    def label(self, index: int) -> str:
        if self.name:
            return self.name
        if self.spec is not None and self.spec.name:
            return self.spec.name
        if isinstance(self.node, NodeInfo):
            return self.node.name
        return f"branch-{index}"


@dataclasses.dataclass
class Outcome:
    index: int
    name: str
    succeeded: bool
    result: Any = None
    failure: FailureKind | None = None
    reason: str | None = None
    task_id: str | None = None
    node_url: str | None = None
    duration_s: float = 0.0
    task: Task | None = None

    @property
    def status(self) -> str:
        return "succeeded" if self.succeeded else "failed"


ProgressCallback = Callable[[int, str, BranchState, str], Awaitable[None] | None]


async def fan_out(
    assignments: Sequence[Assignment],
    *,
    spawner: Spawner | None = None,
    limit: int = 8,
    timeout: float | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[Outcome]:
    """Run every assignment, at most `limit` at once; one Outcome per assignment, in order."""
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, not {limit}")
    for index, assignment in enumerate(assignments):
        if assignment.node is None and assignment.spec is None:
            raise ConfigError(f"assignment {index} names neither a node nor a spec to spawn")
        if assignment.node is None and spawner is None:
            raise ConfigError(f"assignment {index} needs a spawner to create its node")

    gate = asyncio.Semaphore(limit)
    branches = [
        _Branch(index, assignment, spawner, gate, timeout, on_progress)
        for index, assignment in enumerate(assignments)
    ]
    async with asyncio.TaskGroup() as group:
        jobs = [group.create_task(branch.run(), name=f"fan-out-{branch.name}")
                for branch in branches]
    return [job.result() for job in jobs]


_ENDED = frozenset({NodeState.EXITED, NodeState.CRASHED, NodeState.OOM_KILLED,
                    NodeState.REMOVED})
# Failures after which the branch's task may still be running on its node.
_TASK_LEFT = frozenset({FailureKind.TIMED_OUT, FailureKind.ERROR})


class _Branch:
    def __init__(
        self,
        index: int,
        assignment: Assignment,
        spawner: Spawner | None,
        gate: asyncio.Semaphore,
        timeout: float | None,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.index = index
        self.assignment = assignment
        self.name = assignment.label(index)
        self.spawner = spawner
        self.gate = gate
        self.timeout = timeout
        self.on_progress = on_progress
        self.spawned: NodeInfo | None = None
        self.node: NodeInfo | None = (
            assignment.node if isinstance(assignment.node, NodeInfo) else None
        )
        self.peer: Peer | None = None
        self.task_id: str | None = None
        self.url: str | None = None

    async def progress(self, state: BranchState, detail: str = "") -> None:
        if self.on_progress is None:
            return
        try:
            maybe = self.on_progress(self.index, self.name, state, detail)
            if maybe is not None:
                await maybe
        except Exception:
            # A broken progress display must not cost a branch, let alone the fan-out.
            log.exception("fanout.progress_failed", branch=self.name, state=state.value)

    def outcome(self, started: float, **fields: Any) -> Outcome:
        return Outcome(index=self.index, name=self.name, task_id=self.task_id,
                       node_url=self.url, duration_s=round(time.monotonic() - started, 3),
                       **fields)

    async def run(self) -> Outcome:
        """The branch to its end; every failure becomes this branch's Outcome."""
        await self.progress(BranchState.WAITING)
        async with self.gate:
            started = time.monotonic()
            try:
                outcome = await self._run(started)
            except asyncio.CancelledError:
                await asyncio.shield(self._clean_up(cancel_task=True))
                raise
            await asyncio.shield(self._clean_up(cancel_task=outcome.failure in _TASK_LEFT))
        state = BranchState.SUCCEEDED if outcome.succeeded else BranchState.FAILED
        await self.progress(state, outcome.reason or "")
        log.info("fanout.branch_done", branch=self.name, status=outcome.status,
                 failure=outcome.failure.value if outcome.failure else None,
                 duration_s=outcome.duration_s)
        return outcome

    async def _run(self, started: float) -> Outcome:
        scope = asyncio.timeout(self.timeout)
        try:
            async with scope:
                self.peer = await self._peer()
                self.url = self.peer.url
                return await self._run_task(self.peer, started)
        except TimeoutError as exc:
            if not scope.expired():
                return self.outcome(started, succeeded=False, failure=FailureKind.ERROR,
                                    reason=str(exc) or "a call timed out")
            return self.outcome(started, succeeded=False, failure=FailureKind.TIMED_OUT,
                                reason=f"no result within {self.timeout:g} s")
        except SpawnError as exc:
            return self.outcome(started, succeeded=False, failure=FailureKind.SPAWN_FAILED,
                                reason=str(exc))
        except TaskFailed as exc:
            # "failed" is what the failure kind says already; cancelled or interrupted is news.
            reason = exc.reason if exc.status == "failed" else f"{exc.status}: {exc.reason}"
            return self.outcome(started, succeeded=False, failure=FailureKind.TASK_FAILED,
                                reason=reason)
        except (PeerGone, PeerUnreachable) as exc:
            kind, reason = await self._diagnose(exc)
            return self.outcome(started, succeeded=False, failure=kind, reason=reason)
        except PeerError as exc:
            return self.outcome(started, succeeded=False, failure=FailureKind.ERROR,
                                reason=str(exc))
        except Exception as exc:
            # Isolation first: even our own bug stays on this branch, with its name.
            log.exception("fanout.branch_crashed", branch=self.name)
            return self.outcome(started, succeeded=False, failure=FailureKind.ERROR,
                                reason=f"{type(exc).__name__}: {exc}")

    async def _peer(self) -> Peer:
        node = self.assignment.node
        if isinstance(node, Peer):
            return node
        if node is None:
            assert self.spawner is not None and self.assignment.spec is not None
            await self.progress(BranchState.SPAWNING)
            node = self.spawned = await self.spawner.spawn(self.assignment.spec)
            self.node = node
        if node.token is None:
            raise SpawnError(f"node {node.name} has no token this caller can use")
        return Peer(node.url, node.token)

    async def _run_task(self, peer: Peer, started: float) -> Outcome:
        request = self.assignment.task
        body = request.model_dump(exclude_none=True) if isinstance(request, TaskCreate) \
            else dict(request)
        handle = await peer.submit(**body)
        self.task_id = handle.id
        await self.progress(BranchState.RUNNING, f"task {handle.id}")

        # One pass over the events shows progress and ends with the task: no second stream.
        async with contextlib.aclosing(handle.events()) as events:
            async for event in events:
                if event.type == "tool_use":
                    await self.progress(BranchState.RUNNING, str(event.data.get("tool", "")))
        task = await handle.get()
        if task.status not in TERMINAL_STATUSES:
            task = await handle.result()
        if task.status is not TaskStatus.COMPLETED:
            raise TaskFailed(task.error or f"the task ended {task.status.value}",
                             url=peer.url, task_id=handle.id, status=task.status.value)
        return self.outcome(started, succeeded=True, result=task.result, task=task)

    async def _diagnose(self, exc: PeerError) -> tuple[FailureKind, str]:
        """Why a node stopped answering: ask the spawner that knows it, if there is one."""
        kind = FailureKind.NODE_GONE if isinstance(exc, PeerGone) else FailureKind.UNREACHABLE
        if self.spawner is None or self.node is None or not self._spawner_knows(self.node):
            return kind, exc.reason

        # The spawner may learn of the node's end a moment after its connections break.
        deadline = time.monotonic() + DIAGNOSE_WAIT_S
        while True:
            try:
                info = await self.spawner.status(self.node.id)
            except Exception:
                return FailureKind.UNREACHABLE, exc.reason
            settled = info.state in _ENDED and (info.exit_code is not None
                                                 or info.state is not NodeState.EXITED)
            if settled or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        if info.state is NodeState.REMOVED:
            return FailureKind.NODE_REMOVED, f"node {self.node.name} is gone: it was removed"
        if info.state in _ENDED:
            how = "was OOM-killed" if info.state is NodeState.OOM_KILLED \
                else f"exited with code {info.exit_code}"
            return FailureKind.NODE_CRASHED, f"node {self.node.name} is gone: it {how}"
        return kind, exc.reason

    def _spawner_knows(self, node: NodeInfo) -> bool:
        """Whether the spawner's word on this node means anything: one of its mesh's nodes."""
        if self.spawned is not None:
            return True
        return (node.backend == getattr(self.spawner, "backend", None)
                and node.mesh == getattr(self.spawner, "mesh", None))

    async def _clean_up(self, *, cancel_task: bool) -> None:
        """Cancel a task left running, close our client, stop a node spawned for this branch."""
        peer, self.peer = self.peer, None
        if cancel_task and self.task_id is not None and peer is not None and not peer.closed:
            try:
                # A task that already ended answers 409, which is as good as cancelled.
                await asyncio.wait_for(TaskHandle(peer, self.task_id).cancel(), CANCEL_WAIT_S)
            except (PeerError, TimeoutError):
                pass
        if peer is not None and peer is not self.assignment.node:
            await peer.close()
        if self.spawned is not None and self.spawner is not None:
            try:
                await self.spawner.stop(self.spawned.id)
            except Exception:
                log.warning("fanout.stop_failed", branch=self.name, node=self.spawned.id)
