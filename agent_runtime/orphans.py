"""Reaping adopted orphans, for a node that is the subreaper of what its commands start.

A node started by the local spawner's fork server is a child subreaper: a command's background
process (`server &`) whose shell has exited becomes the node's own child. asyncio waits only
for the processes it started, so when such an orphan exits nobody collects it and it stays a
zombie, holding a pid, for as long as the node runs. This reaper collects them.

A zombie is reaped only once it has been seen on two scans in a row: a process asyncio started
is collected by its own watcher the moment it exits, so one that lingers for a whole interval
is an orphan nobody else waits for, and taking it steals no exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os

import structlog

from mesh import procfs

__all__ = ["OrphanReaper", "is_subreaper"]

log = structlog.get_logger("agent_runtime.orphans")

PR_GET_CHILD_SUBREAPER = 37
SCAN_INTERVAL_S = 2.0


def is_subreaper() -> bool:
    """Whether orphaned descendants come to this process rather than to init (Linux only)."""
    flag = ctypes.c_int(0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return flag.value != 0


def zombie_children(parent: int) -> set[int]:
    """Pids of `parent`'s children that have exited and wait to be collected."""
    return {p.pid for p in procfs.processes() if p.ppid == parent and p.state == "Z"}


class OrphanReaper:
    """Collects exited orphans every few seconds while the node runs."""

    def __init__(self, interval_s: float = SCAN_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.reaped = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if is_subreaper():
            self._task = asyncio.create_task(self._run(), name="orphan-reaper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        me = os.getpid()
        lingering: set[int] = set()
        while True:
            await asyncio.sleep(self.interval_s)
            zombies = await asyncio.to_thread(zombie_children, me)
            for pid in zombies & lingering:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        self.reaped += 1
                        log.debug("orphan.reaped", pid=pid)
            lingering = zombies - lingering
