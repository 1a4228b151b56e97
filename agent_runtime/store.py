"""Durable state of a node: tasks and events in one SQLite database in the state dir.

The node's event loop is the only writer. Writes go into an open transaction and are committed
once per loop tick (see EventBus), which keeps thousands of events a second cheap while an event
is still on disk before any subscriber sees it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from mesh.models import Event, Task

__all__ = ["Store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    task_id TEXT,
    type TEXT NOT NULL,
    ts REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_task ON events (task_id, seq);
CREATE TABLE IF NOT EXISTS transcripts (
    task_id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # WAL with synchronous=NORMAL survives a killed process (not a power cut) without an
        # fsync per commit, which is what lets events be stored before they are sent.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._in_tx = False

    def close(self) -> None:
        self.commit()
        self._db.close()

    def _begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self._db.execute("COMMIT")
            self._in_tx = False

    # -- events -------------------------------------------------------------------------------

    def last_seq(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        return int(row[0])

    def add_event(self, event: Event) -> None:
        self._begin()
        self._db.execute(
            "INSERT INTO events (seq, task_id, type, ts, data) VALUES (?, ?, ?, ?, ?)",
            (event.seq, event.task_id, event.type, event.ts, json.dumps(event.data)),
        )

    def events_after(
        self, after: int, *, task_id: str | None = None, limit: int = 1000
    ) -> list[Event]:
        if task_id is None:
            rows = self._db.execute(
                "SELECT seq, task_id, type, ts, data FROM events WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after, limit),
            )
        else:
            rows = self._db.execute(
                "SELECT seq, task_id, type, ts, data FROM events WHERE task_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (task_id, after, limit),
            )
        return [
            Event(seq=seq, task_id=tid, type=kind, ts=ts, data=json.loads(data))
            for seq, tid, kind, ts, data in rows
        ]

    def iter_events(self, after: int, *, task_id: str | None = None) -> Iterator[list[Event]]:
        """Batches of stored events after `after`, so a long history never sits in memory."""
        while True:
            batch = self.events_after(after, task_id=task_id)
            if not batch:
                return
            yield batch
            after = batch[-1].seq

    # -- tasks --------------------------------------------------------------------------------

    def save_task(self, task: Task) -> None:
        self._begin()
        self._db.execute(
            "INSERT INTO tasks (id, status, created_at, body) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET status = excluded.status, body = excluded.body",
            (task.id, task.status.value, task.created_at, task.model_dump_json()),
        )

    def get_task(self, task_id: str) -> Task | None:
        row = self._db.execute("SELECT body FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return Task.model_validate_json(row[0]) if row else None

    def list_tasks(self, *, status: str | None = None, limit: int = 100) -> list[Task]:
        if status:
            rows = self._db.execute(
                "SELECT body FROM tasks WHERE status = ? ORDER BY created_at DESC LIMIT ?",
                (status, limit),
            )
        else:
            rows = self._db.execute(
                "SELECT body FROM tasks ORDER BY created_at DESC LIMIT ?", (limit,)
            )
        return [Task.model_validate_json(body) for (body,) in rows]

    def unfinished_tasks(self) -> list[Task]:
        final = ("completed", "failed", "cancelled", "interrupted")
        rows = self._db.execute(
            f"SELECT body FROM tasks WHERE status NOT IN ({','.join('?' * len(final))})", final
        )
        return [Task.model_validate_json(body) for (body,) in rows]

    # -- transcripts (the agent loop's whole conversation, uncut) -------------------------------

    def save_transcript(self, task_id: str, messages: list[dict[str, Any]]) -> None:
        self._begin()
        self._db.execute(
            "INSERT INTO transcripts (task_id, body) VALUES (?, ?) "
            "ON CONFLICT(task_id) DO UPDATE SET body = excluded.body",
            (task_id, json.dumps(messages)),
        )

    def get_transcript(self, task_id: str) -> list[dict[str, Any]]:
        row = self._db.execute(
            "SELECT body FROM transcripts WHERE task_id = ?", (task_id,)
        ).fetchone()
        return json.loads(row[0]) if row else []

