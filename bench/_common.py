"""What the benchmarks share: nodes as real processes, timing, RSS, and the results table.

Every benchmark prints progress to stderr and its results to stdout as one table,
`name | measured | target | ok/MISS`, with the machine's load average beside it, because the
machine is shared and timings are only as good as the quiet they were taken in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import aiohttp

from agent_runtime.logs import configure_logging

__all__ = [
    "AUTH",
    "TOKEN",
    "Figure",
    "NodeProcess",
    "Results",
    "RssPeak",
    "base_parser",
    "node_env",
    "p50",
    "progress",
    "rss_kib",
    "running_node",
    "timed",
]

TOKEN = "bench-token-0123456789"

# The peer library logs through structlog, whose default would print to stdout, the results'.
configure_logging("console", "warning")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def progress(message: str) -> None:
    """One line of progress on stderr, so that stdout holds only the results."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def p50(values: Sequence[float]) -> float:
    return statistics.median(values)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true",
                        help="also print the results as one JSON object after the table")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions per figure (each benchmark has its own default)")
    return parser


def node_env(**extra: str) -> dict[str, str]:
    """This process's environment for a node, without MESH_* settings that would override ours."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MESH_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env.update(extra)
    return env


def rss_kib(pid: int) -> int:
    """The resident set size of a process, from /proc, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssPeak:
    """Samples a process's RSS from a thread, so a busy event loop does not miss the peak."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssPeak:
        self.peak_kib = rss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak_kib = max(self.peak_kib, rss_kib(self.pid))


class NodeProcess:
    """`python -m agent_runtime` as its own process, timed from spawn to a healthy answer."""

    def __init__(
        self, root: Path, *extra: str, name: str = "bench", profile: Path | None = None
    ) -> None:
        self.workspace = root / "workspace"
        self.state_dir = root / "state"
        self.extra = extra
        self.name = name
        # With a path, the node runs under cProfile, which writes there when the node stops.
        self.profile = profile
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.ready_line_s = 0.0
        self.healthy_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, session: aiohttp.ClientSession) -> NodeProcess:
        """Start the node; ready_line_s and healthy_s say how long each stage took."""
        profiler = ("-m", "cProfile", "-o", str(self.profile)) if self.profile else ()
        started = time.perf_counter()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *profiler, "-m", "agent_runtime", "--workspace", str(self.workspace),
            "--state-dir", str(self.state_dir), "--port", "0", "--token", TOKEN,
            "--name", self.name, "--log-format", "json", "--log-level", "warning", *self.extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=node_env(), start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        self.ready_line_s = time.perf_counter() - started
        if not line:
            raise RuntimeError(f"node exited with {await self.proc.wait()} before ready")
        self.url = json.loads(line)["url"]
        async with session.get(f"{self.url}/healthz", headers=AUTH) as response:
            response.raise_for_status()
            await response.read()
        self.healthy_s = time.perf_counter() - started
        return self

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def running_node(
    root: Path, session: aiohttp.ClientSession, *extra: str, profile: Path | None = None
) -> AsyncIterator[NodeProcess]:
    node = NodeProcess(root, *extra, profile=profile)
    try:
        yield await node.start(session)
    finally:
        await node.stop()


@dataclasses.dataclass
class Figure:
    name: str
    measured: float | None
    unit: str
    target: str = ""
    ok: bool | None = None
    note: str = ""
    runs: int = 0

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "skip"
        return {True: "ok", False: "MISS", None: "info"}[self.ok]

    def measured_text(self) -> str:
        if self.measured is None:
            return "-"
        value = self.measured
        digits = 0 if abs(value) >= 1000 else 1 if abs(value) >= 10 else 2
        text = f"{value:,.{digits}f} {self.unit}"
        return f"{text} (p50 of {self.runs})" if self.runs > 1 else text


class Results:
    """The figures of one benchmark run, with the load they were measured under."""

    def __init__(self, bench: str) -> None:
        self.bench = bench
        self.figures: list[Figure] = []
        self.load_start = os.getloadavg()
        self.started = time.time()

    def at_most(
        self, name: str, value: float, unit: str, limit: float, *, runs: int, note: str = ""
    ) -> None:
        self.figures.append(
            Figure(name, value, unit, f"<= {limit:g} {unit}", value <= limit, note, runs))

    def at_least(
        self, name: str, value: float, unit: str, floor: float, *, runs: int, note: str = ""
    ) -> None:
        self.figures.append(
            Figure(name, value, unit, f">= {floor:g} {unit}", value >= floor, note, runs))

    def info(self, name: str, value: float, unit: str, *, runs: int, note: str = "") -> None:
        self.figures.append(Figure(name, value, unit, "", None, note, runs))

    def skip(self, name: str, why: str) -> None:
        self.figures.append(Figure(name, None, "", "", None, why))

    @property
    def misses(self) -> list[Figure]:
        return [figure for figure in self.figures if figure.ok is False]

    def report(self, as_json: bool) -> None:
        load_end = os.getloadavg()
        out = sys.stdout
        out.write(f"\n{self.bench}: {os.cpu_count()} cores; load avg (1/5/15 min) "
                  f"{_load(self.load_start)} at start, {_load(load_end)} at end\n\n")
        rows = [("name", "measured", "target", "ok/MISS")]
        rows += [(f.name, f.measured_text(), f.target or "-", f.verdict) for f in self.figures]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for index, row in enumerate(rows):
            out.write(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "\n")
            if index == 0:
                out.write("-|-".join("-" * width for width in widths) + "\n")
        notes = [f for f in self.figures if f.note]
        if notes:
            out.write("\n")
            for figure in notes:
                out.write(f"  {figure.name}: {figure.note}\n")
        if as_json:
            out.write(json.dumps(self.as_dict(load_end)) + "\n")
        out.flush()

    def as_dict(self, load_end: tuple[float, float, float]) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "cores": os.cpu_count(),
            "started": self.started,
            "load_start": list(self.load_start),
            "load_end": list(load_end),
            "figures": [dataclasses.asdict(f) | {"verdict": f.verdict} for f in self.figures],
        }


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.2f}" for value in load)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as took:` leaves the elapsed seconds in took[0]."""
    took = [0.0]
    started = time.perf_counter()
    try:
        yield took
    finally:
        took[0] = time.perf_counter() - started
