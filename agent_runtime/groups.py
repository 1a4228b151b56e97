"""The process groups a node starts, written down so that its next run can end them.

Commands and daemons run in sessions of their own, so when the node is killed (`kill -9`,
an OOM kill) nothing takes them down: they keep running, holding ports and files, and the
restarted node knows nothing of them. The node appends each group it starts (and each it is
done with) to a file in its state folder; on start it kills the groups a previous run left.

A pid may have been reused since: a group is killed only when its leader still has the start
time written down, or, once the leader is gone, for members of its session that started no
earlier than it did, and only on the same boot.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import IO

import structlog

from mesh import procfs

__all__ = ["GroupLedger"]

log = structlog.get_logger("agent_runtime.groups")

BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


class GroupLedger:
    """An append-only record of live process groups: `+ PGID START KIND` and `- PGID`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def kill_leftovers(self) -> list[int]:
        """Kill the groups a previous run of the node left running; their ids.

        Starts a fresh record; call it once, before the node starts any process.
        """
        leftovers = self._read()
        killed = []
        for pgid, (start, kind) in sorted(leftovers.items()):
            members = _members(pgid, start)
            if not members:
                continue
            for pid in members:
                # Each one, not the group: a member may have left for a group of its own.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            killed.append(pgid)
            log.warning("groups.leftover_killed", pgid=pgid, kind=kind, processes=len(members))

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8", buffering=1)
        self._file.write(f"boot {_boot_id()}\n")
        return killed

    def record(self, pgid: int, kind: str) -> None:
        """Write down a group just started (`kind`: exec or daemon)."""
        start = _start_time(pgid)
        if self._file is None or start is None:
            return
        self._write(f"+ {pgid} {start} {kind}\n")

    def forget(self, pgid: int) -> None:
        """The group is done with: ended, or left running on purpose."""
        if self._file is not None:
            self._write(f"- {pgid}\n")

    def close(self) -> None:
        """A clean stop has ended every group it means to: the record starts empty next time."""
        if self._file is not None:
            self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _write(self, line: str) -> None:
        # TODO: the record only grows while the node runs (two short lines per command);
        # rewrite it with just the live groups once it holds many finished ones.
        assert self._file is not None
        try:
            self._file.write(line)
        except OSError as exc:
            # A full disk costs the record, not the command.
            log.warning("groups.record_failed", path=str(self.path), error=str(exc))

    def _read(self) -> dict[int, tuple[int, str]]:
        """The groups the record says were running when the last run ended."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("groups.record_unreadable", path=str(self.path), error=str(exc))
            return {}
        if not lines or lines[0] != f"boot {_boot_id()}":
            # Written before a reboot: none of those processes exists any more.
            return {}

        live: dict[int, tuple[int, str]] = {}
        for line in lines[1:]:
            fields = line.split()
            try:
                if fields[0] == "+":
                    live[int(fields[1])] = (int(fields[2]), fields[3])
                elif fields[0] == "-":
                    live.pop(int(fields[1]), None)
            except (IndexError, ValueError):
                # The last line may have been cut by the kill.
                continue
        return live


def _boot_id() -> str:
    try:
        with open(BOOT_ID_FILE, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"


def _start_time(pid: int) -> int | None:
    found = procfs.stat(pid)
    return found.start_time if found is not None else None


def _members(pgid: int, start: int) -> list[int]:
    """The running processes of the group that began at `start`, or [] if it is gone."""
    leader_start = _start_time(pgid)
    if leader_start is not None and leader_start != start:
        # The pid now belongs to another process: this group is not ours.
        return []
    return [p.pid for p in procfs.processes()
            if pgid in (p.pgrp, p.session) and not p.ended and p.start_time >= start]
