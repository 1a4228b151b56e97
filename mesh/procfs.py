"""What /proc says about processes: the few facts the node and the spawners act on (Linux).

One parser for /proc/PID/stat, whose second field (the command name) may hold spaces and
parentheses, so every field is read after its last ')'.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

__all__ = ["ProcessStat", "group_running", "processes", "stat"]


@dataclasses.dataclass(frozen=True)
class ProcessStat:
    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    # In clock ticks since boot: with the pid, it names one process even after pid reuse.
    start_time: int

    @property
    def ended(self) -> bool:
        """Exited and waiting to be collected (zombie), or dead."""
        return self.state in ("Z", "X")


def stat(pid: int | str) -> ProcessStat | None:
    """The process's stat, or None when there is no such process (any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return ProcessStat(int(pid), fields[0].decode(), int(fields[1]), int(fields[2]),
                           int(fields[3]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def processes() -> Iterator[ProcessStat]:
    """Every process that can be read, in no particular order."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if entry.isdigit() and (found := stat(entry)) is not None:
            yield found


def group_running(pgid: int) -> bool:
    """Whether a process of the group still runs; zombies waiting to be reaped do not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg also reaches zombies that nobody reaps (the node as PID 1 in a container, or as a
    # subreaper); /proc tells them apart.
    return any(p.pgrp == pgid and not p.ended for p in processes())
