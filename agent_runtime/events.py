"""The node's event stream: every task change and tool call, numbered, stored, then fanned out.

An event gets the next node-wide `seq`, is written to the store, and is delivered to live
subscribers only after the commit that holds it. Commits are batched per event-loop tick, so a
burst of events costs one commit. A subscriber reads from a bounded buffer; one that falls
behind is dropped with a reason and resumes from its last seq, so a slow reader can never grow
the node's memory or slow a task.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import structlog

from mesh.models import Event

from .metrics import Metrics
from .store import Store

__all__ = ["EventBus", "Subscriber", "SubscriberOverflow"]

log = structlog.get_logger("agent_runtime.events")


class SubscriberOverflow(Exception):
    """The subscriber's buffer filled; it must reconnect with after=<last seq it saw>."""


class Subscriber:
    def __init__(self, bus: EventBus, task_id: str | None, buffer: int) -> None:
        self._bus = bus
        self.task_id = task_id
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=buffer)
        self.overflowed = False
        self.last_seq = 0
        # Called once when the buffer overflows, so a writer blocked on a stalled client can
        # be interrupted instead of waiting for it forever.
        self.on_overflow: Callable[[], object] | None = None

    def offer(self, event: Event) -> None:
        if self.overflowed or (self.task_id is not None and event.task_id != self.task_id):
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self._bus.metrics.subscribers_dropped.inc()
            log.info("events.subscriber_dropped", task_id=self.task_id, last_seq=self.last_seq)
            # Wake a reader blocked on get() so it notices the overflow now, not at the
            # next event.
            self._drain_and_wake()
            if self.on_overflow is not None:
                self.on_overflow()

    def _drain_and_wake(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def next(self) -> Event:
        """The next event after the last one returned; never one twice."""
        while True:
            if self.overflowed:
                raise SubscriberOverflow(self.last_seq)
            event = await self._queue.get()
            if event is None:
                continue
            if event.seq <= self.last_seq:
                continue
            self.last_seq = event.seq
            return event

    def next_nowait(self) -> Event | None:
        while not self._queue.empty():
            event = self._queue.get_nowait()
            if event is not None and event.seq > self.last_seq:
                self.last_seq = event.seq
                return event
        if self.overflowed:
            raise SubscriberOverflow(self.last_seq)
        return None

    def close(self) -> None:
        self._bus._subscribers.discard(self)
        self._bus.metrics.subscribers.set(len(self._bus._subscribers))


class EventBus:
    def __init__(self, store: Store, metrics: Metrics, *, buffer: int = 4096) -> None:
        self.store = store
        self.metrics = metrics
        self.buffer = buffer
        self._seq = store.last_seq()
        self._committed_seq = self._seq
        self._pending: list[Event] = []
        self._flush_scheduled = False
        self._subscribers: set[Subscriber] = set()

    @property
    def last_seq(self) -> int:
        return self._seq

    def emit(self, task_id: str | None, type: str, data: dict[str, Any] | None = None) -> Event:
        """Store an event now; subscribers get it once the current tick's commit is done."""
        self._seq += 1
        event = Event(seq=self._seq, task_id=task_id, type=type, ts=time.time(), data=data or {})
        self.store.add_event(event)
        self.metrics.events.inc()
        self._pending.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return event

    def flush(self) -> None:
        """Commit what is pending, then deliver it."""
        self._flush_scheduled = False
        self.store.commit()
        self._committed_seq = self._seq
        pending, self._pending = self._pending, []
        for subscriber in tuple(self._subscribers):
            for event in pending:
                subscriber.offer(event)

    def subscribe(self, *, task_id: str | None = None, after: int | None = None) -> Subscriber:
        """A live subscriber; with `after`, replay what was stored since that seq first.

        Replay is read from the store in batches by the caller through `replay`, while live
        events queue up; the subscriber drops duplicates by seq.
        """
        subscriber = Subscriber(self, task_id, self.buffer)
        subscriber.last_seq = after if after is not None else self._seq
        self._subscribers.add(subscriber)
        self.metrics.subscribers.set(len(self._subscribers))
        return subscriber

    def replay(self, subscriber: Subscriber, *, limit: int = 1000) -> list[Event]:
        """The next batch of stored events the subscriber has not seen yet."""
        batch = self.store.events_after(
            subscriber.last_seq, task_id=subscriber.task_id, limit=limit
        )
        # Events inserted but not yet committed arrive through the live queue instead.
        batch = [event for event in batch if event.seq <= self._committed_seq]
        if batch:
            subscriber.last_seq = batch[-1].seq
        return batch

    def close(self) -> None:
        self.flush()
