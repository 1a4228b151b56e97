"""Prometheus metrics, one registry per node so that several nodes can share a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "peermesh_http_requests", "HTTP requests served", ["method", "route", "status"],
            registry=self.registry,
        )
        self.exec_commands = Counter(
            "peermesh_exec_commands", "Commands run through the terminal", ["outcome"],
            registry=self.registry,
        )
        self.exec_seconds = Histogram(
            "peermesh_exec_seconds", "Wall time of terminal commands", registry=self.registry,
        )
        self.tasks = Counter(
            "peermesh_tasks", "Tasks that reached a final state", ["status"],
            registry=self.registry,
        )
        self.tasks_running = Gauge(
            "peermesh_tasks_running", "Tasks running now", registry=self.registry
        )
        self.events = Counter("peermesh_events", "Events stored", registry=self.registry)
        self.subscribers = Gauge(
            "peermesh_event_subscribers", "Live event subscribers", registry=self.registry
        )
        self.subscribers_dropped = Counter(
            "peermesh_event_subscribers_dropped", "Subscribers closed for falling behind",
            registry=self.registry,
        )
        self.daemons_running = Gauge(
            "peermesh_daemons_running", "Supervised daemons running", registry=self.registry
        )
        self.tool_calls = Counter(
            "peermesh_tool_calls", "Tool calls", ["tool", "outcome"], registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
