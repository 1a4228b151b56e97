"""Benchmark of the mesh: spawn to ready (local process, Docker container) and a 32-wide fan-out.

    .venv/bin/python bench/bench_mesh.py [--repeat N] [--only local,docker,fanout] [--json]

The Docker figures are skipped, with the reason, when there is no engine or no node image.
"""

from __future__ import annotations

import asyncio
import sys
import time

from _common import Results, base_parser, p50, progress
from mesh.errors import SpawnError
from mesh.fanout import Assignment, fan_out
from mesh.models import NodeSpec
from mesh.spawn import DockerSpawner, LocalSpawner

SECTIONS = ("local", "docker", "fanout")
DEFAULT_REPEAT = {"local": 10, "docker": 5, "fanout": 3}
IMAGE = "peermesh-node:latest"
FANOUT_WIDTH = 32


async def bench_local(results: Results, repeat: int) -> None:
    """LocalSpawner.spawn until the node answers /healthz, one node at a time."""
    took = []
    async with LocalSpawner() as spawner:
        started = time.perf_counter()
        await spawner.start()
        fork_server_ms = (time.perf_counter() - started) * 1000
        for run in range(repeat):
            started = time.perf_counter()
            info = await spawner.spawn(NodeSpec(name="bench"))
            took.append((time.perf_counter() - started) * 1000)
            await spawner.stop(info.id)
            progress(f"local {run + 1}/{repeat}: {took[-1]:.0f} ms")
    results.at_most("spawn to ready, local process", p50(took), "ms", 400, runs=repeat,
                    note="fork server already up; max "
                    f"{max(took):.0f} ms")
    results.info("fork server start (once per spawner)", fork_server_ms, "ms", runs=1)


def _docker_missing() -> str | None:
    """Why the Docker figures cannot be measured here, or None when they can."""
    try:
        import docker
        import docker.errors

        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        return f"no Docker engine: {exc}"
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        return f"no image {IMAGE}: build it with docker/build-image.sh"
    finally:
        client.close()
    return None


async def _bare_run() -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "docker", "run", "--rm", "--entrypoint", "python3", IMAGE, "-c", "pass",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"docker run failed: {err.decode().strip()}")
    return (time.perf_counter() - started) * 1000


async def bench_docker(results: Results, repeat: int) -> None:
    """DockerSpawner.spawn to ready, against a bare `docker run` of the image, alternating."""
    why = await asyncio.to_thread(_docker_missing)
    if why is not None:
        progress(f"docker: skipped, {why}")
        results.skip("spawn to ready, Docker container", why)
        return
    spawned, bare = [], []
    async with DockerSpawner(image=IMAGE, mount_socket=False) as spawner:
        # The first spawn also creates the mesh's network; neither figure counts a warm-up.
        started = time.perf_counter()
        try:
            await spawner.stop((await spawner.spawn(NodeSpec(name="warm"))).id)
        except SpawnError as exc:
            why = f"{IMAGE} does not start a node: {str(exc).strip().splitlines()[-1]}"
            progress(f"docker: skipped, {why}")
            results.skip("spawn to ready, Docker container", why)
            return
        first_ms = (time.perf_counter() - started) * 1000
        await _bare_run()
        for run in range(repeat):
            started = time.perf_counter()
            info = await spawner.spawn(NodeSpec(name="bench"))
            spawned.append((time.perf_counter() - started) * 1000)
            await spawner.stop(info.id)
            bare.append(await _bare_run())
            progress(f"docker {run + 1}/{repeat}: spawner {spawned[-1]:.0f} ms, "
                     f"bare run {bare[-1]:.0f} ms")
    limit = 1.5 * p50(bare)
    results.at_most("spawn to ready, Docker container", p50(spawned), "ms", round(limit),
                    runs=repeat, note=f"target is 1.5 x the bare run measured in this run; "
                    f"{p50(spawned) / p50(bare):.2f} x here")
    results.info("bare docker run --rm (python3 -c pass)", p50(bare), "ms", runs=repeat)
    results.info("first Docker spawn (creates the network)", first_ms, "ms", runs=1)


async def bench_fanout(results: Results, repeat: int) -> None:
    """32 local specialists, each spawned for the purpose, each running `sleep 1`."""
    took, cold = [], 0.0
    task = {"steps": [{"tool": "terminal_exec", "args": {"command": "sleep 1"}}]}
    for run in range(repeat):
        async with LocalSpawner() as spawner:
            started = time.perf_counter()
            await spawner.start()
            server_ms = (time.perf_counter() - started) * 1000
            assignments = [Assignment(task=task, spec=NodeSpec(name=f"spec-{index}"))
                           for index in range(FANOUT_WIDTH)]
            started = time.perf_counter()
            outcomes = await fan_out(assignments, spawner=spawner, limit=FANOUT_WIDTH)
            took.append((time.perf_counter() - started) * 1000)
            cold = max(cold, took[-1] + server_ms)
        failed = [o for o in outcomes if not o.succeeded]
        if failed:
            raise RuntimeError(f"{len(failed)} branches failed, e.g. {failed[0].name}: "
                               f"{failed[0].failure} {failed[0].reason}")
        slowest = max(o.duration_s for o in outcomes)
        progress(f"fanout {run + 1}/{repeat}: {took[-1]:.0f} ms, slowest branch "
                 f"{slowest:.2f} s, fork server {server_ms:.0f} ms")
    results.at_most(f"fan-out of {FANOUT_WIDTH} local specialists, sleep 1", p50(took) / 1000,
                    "s", 6, runs=repeat,
                    note="spawn, task, result and stop of every node; fork server already up")
    results.info("same, with the fork server's start (slowest run)", cold / 1000, "s", runs=1)


async def main() -> int:
    parser = base_parser("Benchmark spawning and fan-out.")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    results = Results("bench_mesh")
    for section, bench in (("local", bench_local), ("docker", bench_docker),
                           ("fanout", bench_fanout)):
        if section in sections:
            await bench(results, args.repeat or DEFAULT_REPEAT[section])
    results.report(args.json)
    return 1 if results.misses else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
