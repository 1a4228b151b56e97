"""Benchmark of the agent loop: its own time per step, and node start with a model configured.

    .venv/bin/python bench/bench_loop.py [--repeat N] [--turns N] [--json]

The node is a real `python -m agent_runtime` process whose model is the ScriptedModelServer
in this process, reached through litellm as "openai/scripted". A task of N turns, each asking
for one cheap tool call (list_files), shows the loop's own time from its events: between two
model calls' ends (model.usage events) lies the second call's duration, the tool's duration
and the loop's overhead, and only the last is not in an event's duration_ms.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import aiohttp

from _common import TOKEN, NodeProcess, Results, base_parser, p50, progress
from agent_runtime.scripted_model import ScriptedModelServer, ToolCall, Turn
from mesh import Peer
from mesh.models import Event

DEFAULT_REPEAT = 5
START_REPEAT = 10


def _model_args(server: ScriptedModelServer) -> tuple[str, ...]:
    return ("--model", "openai/scripted", "--api-base", server.api_base, "--api-key", "scripted")


def _script(turns: int) -> list[Turn]:
    call = ToolCall("list_files", {"path": "."})
    return [Turn(tool_calls=[call]) for _ in range(turns)] + [Turn(text="done")]


def overheads(events: list[Event]) -> list[float]:
    """The loop's own milliseconds for each turn that called a tool, from a task's events."""
    usage = [event for event in events if event.type == "model.usage"]
    results = [event for event in events if event.type == "tool_result"]
    if len(results) != len(usage) - 1:
        raise RuntimeError(f"{len(usage)} model calls but {len(results)} tool results")
    return [
        (after.ts - before.ts) * 1000 - after.data["duration_ms"] - tool.data["duration_ms"]
        for before, after, tool in zip(usage, usage[1:], results)
    ]


async def _run_task(peer: Peer, server: ScriptedModelServer, turns: int) -> list[Event]:
    server.add(*_script(turns))
    handle = await peer.submit(f"list the workspace {turns} times", max_steps=turns + 1)
    events = [event async for event in handle.events()]
    task = await handle.result()
    if task.status.value != "completed":
        raise RuntimeError(f"task ended {task.status.value}: {task.error}")
    return events


async def bench_overhead(
    results: Results, root: Path, server: ScriptedModelServer, repeat: int, turns: int,
    profile: Path | None = None,
) -> None:
    """Loop overhead per step, pooled over `repeat` tasks of `turns` turns on one node."""
    pooled, per_run, model_ms, tool_ms = [], [], [], []
    async with aiohttp.ClientSession() as session:
        node = NodeProcess(root / "loop", *_model_args(server), profile=profile)
        try:
            await node.start(session)
            async with Peer(node.url, TOKEN, session=session) as peer:
                # The first model call imports litellm; that belongs to no step's overhead.
                await _run_task(peer, server, 1)
                for run in range(repeat):
                    events = await _run_task(peer, server, turns)
                    steps = overheads(events)
                    pooled += steps
                    per_run.append(p50(steps))
                    model_ms += [e.data["duration_ms"] for e in events if e.type == "model.usage"]
                    tool_ms += [e.data["duration_ms"] for e in events if e.type == "tool_result"]
                    progress(f"loop {run + 1}/{repeat}: overhead p50 {per_run[-1]:.2f} ms, "
                             f"max {max(steps):.2f} ms")
        finally:
            await node.stop()
    results.at_most("loop overhead per step", p50(pooled), "ms", 3, runs=len(pooled),
                    note=f"{repeat} tasks of {turns} list_files turns; per-task p50 "
                    f"{min(per_run):.2f}..{max(per_run):.2f} ms; p90 "
                    f"{sorted(pooled)[int(len(pooled) * 0.9)]:.2f} ms")
    results.info("model call (litellm + scripted server)", p50(model_ms), "ms",
                 runs=len(model_ms))
    results.info("list_files tool call", p50(tool_ms), "ms", runs=len(tool_ms))


async def bench_start(results: Results, root: Path, server: ScriptedModelServer) -> None:
    """Start to healthy with a model configured, beside a node without one, alternating."""
    with_model, without = [], []
    async with aiohttp.ClientSession() as session:
        for run in range(START_REPEAT):
            for extra, times in ((_model_args(server), with_model), ((), without)):
                node = NodeProcess(root / f"start-{run}-{len(extra)}", *extra)
                try:
                    await node.start(session)
                    times.append(node.healthy_s * 1000)
                finally:
                    await node.stop()
            progress(f"start {run + 1}/{START_REPEAT}: with model {with_model[-1]:.0f} ms, "
                     f"without {without[-1]:.0f} ms")
    results.at_most("node start with a model configured", p50(with_model), "ms", 400,
                    runs=START_REPEAT, note="spawn to ready line, then /healthz")
    results.info("same node start without a model", p50(without), "ms", runs=START_REPEAT,
                 note="alike figures mean litellm is not imported at start")


async def main() -> int:
    parser = base_parser("Benchmark the agent loop's own time per step.")
    parser.add_argument("--turns", type=int, default=50, help="turns per task (default 50)")
    parser.add_argument("--skip-start", action="store_true", help="skip the start figures")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run the loop's node under cProfile, writing the stats here")
    args = parser.parse_args()

    results = Results("bench_loop")
    root = Path(tempfile.mkdtemp(prefix="peermesh-bench-loop-"))
    try:
        async with ScriptedModelServer() as server:
            await bench_overhead(results, root, server, args.repeat or DEFAULT_REPEAT,
                                 args.turns, args.profile)
            if not args.skip_start:
                await bench_start(results, root, server)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results.report(args.json)
    return 1 if results.misses else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
