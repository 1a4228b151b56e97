"""Benchmark of one agent node: start, exec, event stream, big file reads, idle RSS, snapshots.

    .venv/bin/python bench/bench_node.py [--repeat N] [--only start,exec,...] [--json]

Every figure comes from real `python -m agent_runtime` processes on loopback, reached with
aiohttp clients; see bench/README.md for what each one measures.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from _common import (
    AUTH,
    TOKEN,
    NodeProcess,
    Results,
    RssPeak,
    base_parser,
    node_env,
    p50,
    progress,
    rss_kib,
    running_node,
    timed,
)
from mesh import Peer

SECTIONS = ("start", "exec", "events", "file", "snapshot")
DEFAULT_REPEAT = {"start": 10, "exec": 500, "events": 3, "file": 3, "snapshot": 3}
FLOOR_IMPORTS = "import aiohttp.web, pydantic, structlog"
EXEC_WARMUP = 30
PEER_EXEC_CALLS = 100
BIG_FILE_BYTES = 1 << 30
WORKSPACE_FILES = 10_000
WORKSPACE_FILE_BYTES = 10 * 1024
FINAL_EVENTS = tuple(f'"type":"task.{end}"' for end in
                     ("completed", "failed", "cancelled", "interrupted"))
# The node drops a subscriber that falls behind with this close code; it resumes by seq.
CLOSE_SLOW_SUBSCRIBER = 4008


def _prof(folder: Path | None, name: str) -> Path | None:
    """Where a node's cProfile stats go, when profiling was asked for."""
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve() / f"{name}.prof"


async def _python_ms(code: str) -> float:
    """Milliseconds from spawning this interpreter on `code` until it exits."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=node_env())
    if await proc.wait() != 0:
        raise RuntimeError(f"python -c {code!r} failed")
    return (time.perf_counter() - started) * 1000


async def bench_start(results: Results, root: Path, repeat: int) -> None:
    """Spawn to ready line, to /healthz, and idle RSS, each on a fresh node.

    Beside them, in the same runs: a bare interpreter, and one importing only the libraries
    every node needs (aiohttp, pydantic, structlog), the floor of any node's start.
    """
    ready_line, healthy, idle, bare, floor = [], [], [], [], []
    async with aiohttp.ClientSession() as session:
        for run in range(repeat):
            bare.append(await _python_ms("pass"))
            floor.append(await _python_ms(FLOOR_IMPORTS))
            node = NodeProcess(root / f"start-{run}")
            try:
                await node.start(session)
                ready_line.append(node.ready_line_s * 1000)
                healthy.append(node.healthy_s * 1000)
                idle.append(rss_kib(node.pid) / 1024)
            finally:
                await node.stop()
            progress(f"start {run + 1}/{repeat}: ready line {ready_line[-1]:.0f} ms, "
                     f"healthz {healthy[-1]:.0f} ms, rss {idle[-1]:.1f} MiB")
    results.at_most("node start to ready (+ /healthz)", p50(healthy), "ms", 400, runs=repeat,
                    note=f"ready line alone p50 {p50(ready_line):.0f} ms; "
                    f"min {min(healthy):.0f}, max {max(healthy):.0f} ms")
    results.info("python -c pass", p50(bare), "ms", runs=repeat)
    results.info(f"python -c '{FLOOR_IMPORTS}'", p50(floor), "ms", runs=repeat)
    results.at_most("idle node RSS", p50(idle), "MiB", 60, runs=repeat)


async def bench_exec(
    results: Results, root: Path, repeat: int, profile: Path | None = None
) -> None:
    """POST /api/v1/terminal/exec of `true` over one keep-alive session, one at a time."""
    async with aiohttp.ClientSession(headers=AUTH) as session, \
            running_node(root / "exec", session, profile=_prof(profile, "exec")) as node:
        url = f"{node.url}/api/v1/terminal/exec"
        took, node_ms = [], []
        for run in range(EXEC_WARMUP + repeat):
            started = time.perf_counter()
            async with session.post(url, json={"command": "true"}) as response:
                body = await response.json()
            if body.get("exit_code") != 0:
                raise RuntimeError(f"exec of true failed: {body}")
            if run >= EXEC_WARMUP:
                took.append((time.perf_counter() - started) * 1000)
                node_ms.append(body["duration_ms"])

        async with Peer(node.url, TOKEN) as peer:
            peer_took = []
            for _ in range(PEER_EXEC_CALLS):
                started = time.perf_counter()
                await peer.exec("true")
                peer_took.append((time.perf_counter() - started) * 1000)
    progress(f"exec: p50 {p50(took):.2f} ms over {repeat} calls")
    results.at_most("exec `true` round trip", p50(took), "ms", 5, runs=repeat,
                    note=f"after {EXEC_WARMUP} warm-up calls; p90 "
                    f"{sorted(took)[int(len(took) * 0.9)]:.2f} ms; the node's own "
                    f"duration_ms p50 {p50(node_ms):.2f} ms")
    results.info("exec `true` via mesh.Peer.exec", p50(peer_took), "ms", runs=PEER_EXEC_CALLS)


async def _receive_until_final(
    session: aiohttp.ClientSession, ws_url: str, after: int | None,
    on_open: asyncio.Event | None = None,
) -> tuple[int, float, int]:
    """Count event messages until a task's final event; (count, seconds, reconnects).

    Seconds run from the first message received to the final one. A drop for being slow is
    resumed from the last seq, as a real subscriber would.
    """
    count, reconnects, first, last_text = 0, 0, 0.0, ""
    while True:
        params = {} if after is None else {"after": str(after)}
        async with session.ws_connect(ws_url, params=params, max_msg_size=0) as ws:
            if on_open is not None:
                on_open.set()
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    break
                if count == 0:
                    first = time.perf_counter()
                count += 1
                last_text = message.data
                if any(final in last_text for final in FINAL_EVENTS):
                    return count, time.perf_counter() - first, reconnects
            if ws.close_code != CLOSE_SLOW_SUBSCRIBER:
                raise RuntimeError(f"event stream closed with {ws.close_code}")
        reconnects += 1
        after = json.loads(last_text)["seq"] if last_text else after


async def bench_events(
    results: Results, root: Path, repeat: int, steps: int, profile: Path | None = None
) -> None:
    """A WebSocket subscriber's receive rate: live while a step task runs, then replayed."""
    live, replay, parsed, produce, counts = [], [], [], [], []
    step = {"tool": "list_files", "args": {"path": "."}}
    reconnects = 0
    for run in range(repeat):
        async with aiohttp.ClientSession(headers=AUTH) as session, \
                running_node(root / f"events-{run}", session,
                             profile=_prof(profile, f"events-{run}")) as node:
            ws_url = f"{node.url}/api/v1/agent/ws"
            opened = asyncio.Event()
            listener = asyncio.create_task(_receive_until_final(session, ws_url, None, opened))
            await opened.wait()
            started = time.perf_counter()
            async with session.post(f"{node.url}/api/v1/agent/tasks",
                                    json={"steps": [step] * steps}) as response:
                response.raise_for_status()
            count, live_s, dropped = await listener
            produce.append(count / (time.perf_counter() - started))
            live.append(count / live_s)
            reconnects += dropped

            count, replay_s, _ = await _receive_until_final(session, ws_url, 0)
            replay.append(count / replay_s)
            counts.append(count)

            async with Peer(node.url, TOKEN) as peer:
                seen, started = 0, time.perf_counter()
                async for event in peer.events(after=0):
                    seen += 1
                    if event.type == "task.completed":
                        break
                parsed.append(seen / (time.perf_counter() - started))
        progress(f"events {run + 1}/{repeat}: {count} events; live {live[-1]:,.0f}/s, "
                 f"replay {replay[-1]:,.0f}/s, parsed {parsed[-1]:,.0f}/s")
    note = f"{p50(counts):,.0f} events from a task of {steps:,} list_files steps"
    results.at_least("WS subscriber, replay after=0", p50(replay), "ev/s", 20_000,
                     runs=repeat, note=note)
    results.at_least("WS subscriber, live while task runs", p50(live), "ev/s", 20_000,
                     runs=repeat, note="bounded by how fast the task makes events: whole "
                     f"task {p50(produce):,.0f} ev/s from submit; {reconnects} slow-subscriber "
                     "drops in all runs")
    results.info("replay via mesh.Peer.events (parsed)", p50(parsed), "ev/s", runs=repeat)


async def _write_big_file(path: Path) -> None:
    """Real bytes, not a sparse file: a random 16 MiB block written again and again."""
    block = os.urandom(16 << 20)

    def write() -> None:
        with path.open("wb") as out:
            for _ in range(BIG_FILE_BYTES // len(block)):
                out.write(block)

    await asyncio.to_thread(write)


async def bench_file(
    results: Results, root: Path, repeat: int, profile: Path | None = None
) -> None:
    """GET of a 1 GiB file, streamed and dropped, with the node's RSS growth meanwhile."""
    async with aiohttp.ClientSession(headers=AUTH) as session, \
            running_node(root / "file", session, profile=_prof(profile, "file")) as node:
        progress("file: writing 1 GiB")
        await _write_big_file(node.workspace / "big.bin")
        url = f"{node.url}/api/v1/files/big.bin"
        rates, growth = [], []
        for run in range(repeat):
            before = rss_kib(node.pid)
            with RssPeak(node.pid) as rss, timed() as took:
                received = 0
                async with session.get(url) as response:
                    response.raise_for_status()
                    async for chunk in response.content.iter_chunked(1 << 20):
                        received += len(chunk)
            if received != BIG_FILE_BYTES:
                raise RuntimeError(f"read {received} bytes of {BIG_FILE_BYTES}")
            rates.append(received / took[0] / 1e6)
            growth.append((rss.peak_kib - before) / 1024)
            progress(f"file {run + 1}/{repeat}: {rates[-1]:.0f} MB/s, "
                     f"RSS +{growth[-1]:.1f} MiB")
        curl = await _curl_rate(url) if shutil.which("curl") else None
    results.at_least("1 GiB file read over HTTP", p50(rates), "MB/s", 500, runs=repeat,
                     note="aiohttp client, 1 MiB chunks, MB = 10^6 bytes")
    results.at_most("node RSS growth during the read", max(growth), "MiB", 20, runs=1,
                    note=f"largest of {repeat} runs (peak minus before)")
    if curl is not None:
        results.info("same read with curl -o /dev/null", curl, "MB/s", runs=1,
                     note="the node's rate without a Python client on the same two cores")


async def _curl_rate(url: str) -> float:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}", "-H",
        f"Authorization: {AUTH['Authorization']}", url, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return float(out) / 1e6


def _make_workspace(folder: Path) -> list[Path]:
    """10,000 files of random bytes, 100 per folder, 100 MiB in all."""
    paths = []
    for index in range(WORKSPACE_FILES):
        path = folder / f"d{index // 100:03d}" / f"f{index % 100:03d}.bin"
        if index % 100 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(WORKSPACE_FILE_BYTES))
        paths.append(path)
    return paths


def _change_workspace(folder: Path, paths: list[Path]) -> None:
    """Rewrite 10% of the files, delete 2% and add as many new ones."""
    for path in paths[::10]:
        path.write_bytes(os.urandom(WORKSPACE_FILE_BYTES))
    for path in paths[5::50]:
        path.unlink()
    extra = folder / "added"
    extra.mkdir()
    for index in range(len(paths) // 50):
        (extra / f"new{index:03d}.bin").write_bytes(os.urandom(WORKSPACE_FILE_BYTES))


def _empty_workspace(folder: Path) -> None:
    """Everything but the node's own bookkeeping folder, which snapshots leave alone."""
    for entry in folder.iterdir():
        if entry.name == ".peermesh":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _count_files(folder: Path) -> int:
    return sum(len(files) for top, _, files in os.walk(folder)
               if ".peermesh" not in Path(top).relative_to(folder).parts)


async def _post(session: aiohttp.ClientSession, url: str) -> tuple[float, dict[str, object]]:
    with timed() as took:
        async with session.post(url, json={}) as response:
            body = await response.json()
            response.raise_for_status()
    return took[0] * 1000, body


async def bench_snapshot(
    results: Results, root: Path, repeat: int, profile: Path | None = None
) -> None:
    """Snapshot and restore of a 10,000-file, 100 MiB workspace, on a fresh node each run."""
    first, second, restore, restore_empty = [], [], [], []
    for run in range(repeat):
        async with aiohttp.ClientSession(headers=AUTH) as session, \
                running_node(root / f"snapshot-{run}", session,
                             profile=_prof(profile, f"snapshot-{run}")) as node:
            progress(f"snapshot {run + 1}/{repeat}: writing {WORKSPACE_FILES:,} files")
            paths = await asyncio.to_thread(_make_workspace, node.workspace)
            api = f"{node.url}/api/v1/snapshots"
            took, snap = await _post(session, api)
            first.append(took)

            await asyncio.to_thread(_change_workspace, node.workspace, paths)
            took, _ = await _post(session, api)
            second.append(took)

            took, _ = await _post(session, f"{api}/{snap['id']}/restore")
            restore.append(took)
            if (found := _count_files(node.workspace)) != WORKSPACE_FILES:
                raise RuntimeError(f"restore left {found} files, not {WORKSPACE_FILES}")

            await asyncio.to_thread(_empty_workspace, node.workspace)
            took, _ = await _post(session, f"{api}/{snap['id']}/restore")
            restore_empty.append(took)
            if (found := _count_files(node.workspace)) != WORKSPACE_FILES:
                raise RuntimeError(f"restore left {found} files, not {WORKSPACE_FILES}")
        progress(f"snapshot {run + 1}/{repeat}: first {first[-1]:.0f} ms, second "
                 f"{second[-1]:.0f} ms, restore {restore[-1]:.0f} ms, into empty "
                 f"{restore_empty[-1]:.0f} ms")
    note = "10,000 files of 10 KiB in 100 folders; fresh node and workspace each run"
    results.at_most("snapshot, first (10k files, 100 MiB)", p50(first), "ms", 2000,
                    runs=repeat, note=note)
    results.at_most("restore after 10% changed, 2% deleted, 2% added", p50(restore), "ms",
                    2000, runs=repeat)
    results.info("snapshot, second (incremental)", p50(second), "ms", runs=repeat)
    results.info("restore into an emptied workspace", p50(restore_empty), "ms", runs=repeat)


async def main() -> int:
    parser = base_parser("Benchmark one agent node.")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run each section's node under cProfile, stats in this folder")
    parser.add_argument("--steps", type=int, default=20_000,
                        help="steps of the task that makes events (default 20000)")
    args = parser.parse_args()
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    def repeat(section: str) -> int:
        return args.repeat or DEFAULT_REPEAT[section]

    results = Results("bench_node")
    root = Path(tempfile.mkdtemp(prefix="peermesh-bench-node-"))
    try:
        if "start" in sections:
            await bench_start(results, root, repeat("start"))
        if "exec" in sections:
            await bench_exec(results, root, repeat("exec"), args.profile)
        if "events" in sections:
            await bench_events(results, root, repeat("events"), args.steps, args.profile)
        if "file" in sections:
            await bench_file(results, root, repeat("file"), args.profile)
        if "snapshot" in sections:
            await bench_snapshot(results, root, repeat("snapshot"), args.profile)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results.report(args.json)
    return 1 if results.misses else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
