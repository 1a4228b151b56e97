"""Running a topology: start its nodes, run its tasks in `needs` order, bring results back.

`mesh run` starts the nodes itself and renews their leases for as long as it runs, so a run
that dies leaves nothing behind for long. `mesh up` hands the nodes to a small detached
supervisor process (`python -m mesh.runner supervise`), which keeps them until `mesh down`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import aiohttp
import structlog

from .context import MeshContext, home, list_contexts, load_context, remove_context
from .errors import ConfigError, MeshError, SpawnError
from .fanout import Assignment, BranchState, FailureKind, Outcome, fan_out
from .models import NodeInfo, NodeSpec
from .spawn import DockerSpawner, LocalSpawner, Spawner, reap
from .topology import (
    Branch,
    NodeInstance,
    Topology,
    WorkspaceDecl,
    downstream,
    expand_nodes,
    expand_task,
    load_topology,
    ready_tasks,
)

__all__ = ["Report", "down", "mesh_status", "node_logs", "run", "up"]

log = structlog.get_logger("mesh.runner")

Progress = Callable[[str], None]
RESULT_CHARS = 2000
SUPERVISOR_READY_S = 300.0


# -- nodes ------------------------------------------------------------------------------------


def make_spawner(topology: Topology, root: Path | None = None) -> Spawner:
    name = topology.mesh.name
    if topology.mesh.backend == "docker":
        return DockerSpawner(name, image=topology.mesh.image, network=topology.mesh.network)
    return LocalSpawner(name, root_dir=root)


def _prepare_workspace(topology: Topology, decl: WorkspaceDecl | None,
                       scratch: Path) -> tuple[str | None, str | None]:
    """(folder to copy in, folder to use in place) for a node's workspace declaration."""
    if decl is None:
        return None, None
    if decl.path is not None:
        folder = topology.resolve_path(decl.path)
        if not folder.is_dir():
            raise ConfigError(f"workspace folder {folder} does not exist")
        return (None, str(folder)) if decl.mount else (str(folder), None)
    if decl.git is not None:
        target = Path(tempfile.mkdtemp(prefix="git-", dir=scratch))
        command = ["git", "clone", "--quiet", "--depth", "1"]
        if decl.ref:
            command += ["--branch", decl.ref]
        done = subprocess.run([*command, decl.git, str(target)], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            raise ConfigError(f"cannot clone {decl.git}: {done.stderr.strip()[-500:]}")
        return str(target), None
    assert decl.archive is not None
    archive = topology.resolve_path(decl.archive)
    target = Path(tempfile.mkdtemp(prefix="archive-", dir=scratch))
    _unpack(archive, target)
    return str(target), None


def _unpack(archive: Path, target: Path) -> None:
    """Unpack an archive; a single top folder inside it becomes the workspace itself."""
    if not archive.is_file():
        raise ConfigError(f"workspace archive {archive} does not exist")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            bundle.extractall(target, filter="data")
    else:
        raise ConfigError(f"{archive} is neither a zip nor a tar archive")
    entries = list(target.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        for child in inner.iterdir():
            child.rename(target / child.name)
        inner.rmdir()


def node_spec(topology: Topology, instance: NodeInstance, scratch: Path) -> NodeSpec:
    decl = instance.decl
    copy_from, mount = _prepare_workspace(topology, instance.workspace, scratch)
    env = {key: str(value) for key, value in decl.env.items()}
    if decl.instructions:
        env["MESH_INSTRUCTIONS"] = decl.instructions
    # Mesh-wide MCP servers first; a node's own server of the same name replaces one.
    mcp_servers = {server.name: server
                   for server in [*topology.mesh.mcp_servers, *decl.mcp_servers]}
    if mcp_servers:
        env["MESH_MCP_SERVERS"] = json.dumps(
            [server.model_dump(exclude_defaults=True) for server in mcp_servers.values()])
    # Mesh-wide rules first, then the node's own; the node validates them as it starts.
    rules = [*topology.mesh.rules, *decl.rules]
    if rules:
        env["MESH_RULES"] = json.dumps(rules)
    return NodeSpec(
        name=instance.name, role=decl.role, env=env, model=instance.model,
        api_base=instance.api_base, cpus=decl.resources.cpus, memory=decl.resources.memory,
        pids=decl.resources.pids, workspace_from=copy_from, workspace_mount=mount,
        labels={"peermesh.topology": str(topology.source or "")},
    )


async def start_nodes(topology: Topology, spawner: Spawner, progress: Progress,
                      scratch: Path) -> dict[str, NodeInfo]:
    """Spawn every node of the topology at once; one failure stops the ones that started."""
    instances = expand_nodes(topology)
    specs = [node_spec(topology, instance, scratch) for instance in instances]

    async def spawn(spec: NodeSpec) -> NodeInfo:
        progress(f"starting {spec.name}")
        info = await spawner.spawn(spec)
        progress(f"  {spec.name} ready at {info.url}")
        return info

    results = await asyncio.gather(*(spawn(spec) for spec in specs), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    nodes = {info.name: info for info in results if isinstance(info, NodeInfo)}
    if failures:
        for info in nodes.values():
            with contextlib.suppress(Exception):
                await spawner.stop(info.id)
        raise SpawnError("; ".join(str(f) for f in failures))
    await _introduce(nodes)
    return {instance.name: nodes[instance.name] for instance in instances}


async def _introduce(nodes: dict[str, NodeInfo]) -> None:
    """Tell each node its siblings' URLs and tokens, so tasks can name them."""
    book = {name: {"url": info.internal_url or info.url, "token": info.token}
            for name, info in nodes.items()}
    async with aiohttp.ClientSession() as session:
        for info in nodes.values():
            async with session.put(
                f"{info.url}/api/v1/peers/book", json=book,
                headers={"Authorization": f"Bearer {info.token}"},
            ) as response:
                if response.status >= 400:
                    log.warning("runner.introduce_failed", node=info.name,
                                status=response.status)


# -- tasks ------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskReport:
    name: str
    status: str  # succeeded, failed, skipped
    branches: list[Outcome] = dataclasses.field(default_factory=list)
    reason: str | None = None
    # Which node ran each branch, and the fan-out item it was given, by branch name.
    nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    items: dict[str, str | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Report:
    mesh: str
    tasks: list[TaskReport]
    outputs: list[str] = dataclasses.field(default_factory=list)
    duration_s: float = 0.0

    @property
    def succeeded(self) -> bool:
        return all(task.status == "succeeded" for task in self.tasks)

    def to_json(self) -> dict[str, Any]:
        return {
            "mesh": self.mesh, "succeeded": self.succeeded, "duration_s": self.duration_s,
            "outputs": self.outputs,
            "tasks": [
                {"name": t.name, "status": t.status, "reason": t.reason, "branches": [
                    {"name": o.name, "status": o.status, "node": t.nodes.get(o.name),
                     "item": t.items.get(o.name), "result": o.result,
                     "failure": o.failure.value if o.failure else None, "reason": o.reason,
                     "task_id": o.task_id, "node_url": o.node_url,
                     "duration_s": o.duration_s}
                    for o in t.branches]}
                for t in self.tasks
            ],
        }

    def render(self) -> str:
        """The report for a person: one line per task, and under it one per branch."""
        failed = sum(task.status != "succeeded" for task in self.tasks)
        verdict = (f"all {len(self.tasks)} tasks succeeded" if not failed
                   else f"{failed} of {len(self.tasks)} tasks did not succeed")
        lines = [f"mesh {self.mesh}: {verdict} in {self.duration_s:.1f}s"]
        for task in self.tasks:
            lines.append(f"{_mark(task.status)} {task.name}: {task.reason or task.status}")
            name_width = max((len(o.name) for o in task.branches), default=0)
            node_width = max((len(task.nodes.get(o.name, "")) for o in task.branches),
                             default=0)
            for outcome in task.branches:
                lines.append(
                    f"     {_mark(outcome.status)} {outcome.name:<{name_width}}  "
                    f"{task.nodes.get(outcome.name, ''):<{node_width}}  "
                    f"{outcome.duration_s:5.1f}s  {_detail(outcome)}")
        lines += [f"output: {path}" for path in self.outputs]
        return "\n".join(lines)


def _mark(status: str) -> str:
    return {"succeeded": "ok  ", "failed": "FAIL", "skipped": "skip"}.get(status, "    ")


def _detail(outcome: Outcome) -> str:
    """A branch's result in one line, or why it failed."""
    if outcome.succeeded:
        return _summary(outcome.result)
    kind = outcome.failure.value if outcome.failure else "failed"
    reason = outcome.reason or ""
    # A failed task's reason starts with its status ("failed: step 0 ..."), which the kind
    # already says; a cancelled or interrupted one keeps it.
    if outcome.failure is FailureKind.TASK_FAILED and reason.startswith("failed: "):
        reason = reason.removeprefix("failed: ")
    text = " ".join(f"{kind}: {reason}".split())
    return text if len(text) <= 240 else text[:237] + "..."


def _summary(result: Any) -> str:
    """One line of a branch's result: the last step's output tail, or the answer's start."""
    if isinstance(result, list) and result:
        last = result[-1]
        if isinstance(last, dict) and "exit_code" in last:
            text = (last.get("stdout") or last.get("stderr") or "").strip()
            tail = text.splitlines()[-1].strip() if text else ""
            return f"exit {last['exit_code']}: {tail[:120]}" if tail else \
                f"exit {last['exit_code']}"
    text = result if isinstance(result, str) else json.dumps(result)
    return " ".join(str(text).split())[:120]


def _assignment(branch: Branch, nodes: dict[str, NodeInfo]) -> Assignment:
    body: dict[str, Any] = {"description": branch.description or "", "mode": branch.mode.value,
                            "tags": [branch.task.name],
                            "metadata": {"topology_task": branch.task.name,
                                         "branch": branch.name}}
    if branch.steps:
        body["steps"] = [step.model_dump() for step in branch.steps]
    if branch.task.rollback is not None:
        body["rollback_on_failure"] = branch.task.rollback
    if branch.task.timeout_s is not None:
        body["timeout_s"] = branch.task.timeout_s
    return Assignment(task=body, node=nodes[branch.node], name=branch.name)


async def run_tasks(topology: Topology, nodes: dict[str, NodeInfo], progress: Progress,
                    spawner: Spawner | None = None) -> list[TaskReport]:
    """Every task once its needs succeeded; a failed task skips what depends on it.

    With the spawner that started the nodes, a branch whose node died says how it died
    (crashed with its exit code, removed, OOM-killed) rather than only that it is gone.
    """
    reports: dict[str, TaskReport] = {}
    running: dict[str, asyncio.Task[TaskReport]] = {}

    def on_progress(index: int, name: str, state: BranchState, detail: str) -> None:
        if state is not BranchState.WAITING:
            progress(f"[{name}] {state.value} {detail}".rstrip())

    async def run_one(task_name: str) -> TaskReport:
        task = topology.task(task_name)
        branches = expand_task(topology, task)
        outcomes = await fan_out([_assignment(b, nodes) for b in branches],
                                 spawner=spawner, limit=max(1, len(branches)),
                                 timeout=task.timeout_s, on_progress=on_progress)
        failed = sum(not o.succeeded for o in outcomes)
        if len(outcomes) == 1:
            reason = "failed" if failed else "succeeded"
        elif failed:
            reason = f"{failed} of {len(outcomes)} branches failed"
        else:
            reason = f"{len(outcomes)} of {len(outcomes)} branches succeeded"
        return TaskReport(task_name, "failed" if failed else "succeeded", outcomes, reason,
                          nodes={b.name: b.node for b in branches},
                          items={b.name: b.item for b in branches})

    try:
        while True:
            finished = {name for name, r in reports.items() if r.status == "succeeded"}
            blocked = set(reports)
            for task in ready_tasks(topology, finished, running):
                if task.name not in blocked:
                    running[task.name] = asyncio.create_task(run_one(task.name))
            if not running:
                break
            done, _ = await asyncio.wait(running.values(),
                                         return_when=asyncio.FIRST_COMPLETED)
            for job in done:
                report = job.result()
                reports[report.name] = report
                running.pop(report.name)
                if report.status == "failed":
                    for skipped in downstream(topology, report.name):
                        reports.setdefault(skipped, TaskReport(
                            skipped, "skipped", reason=f"needs {report.name}, which failed"))
    finally:
        # Interrupted: the fan-outs still running cancel their tasks on the nodes before the
        # nodes themselves are stopped.
        for job in running.values():
            job.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
    return [reports.get(t.name) or TaskReport(t.name, "skipped", reason="never ready")
            for t in topology.tasks]


async def fetch_outputs(topology: Topology, nodes: dict[str, NodeInfo],
                        progress: Progress) -> list[str]:
    from .client import Peer

    saved = []
    for wanted in topology.outputs.files:
        info = nodes.get(wanted.node)
        if info is None or info.token is None:
            continue
        target = Path(wanted.to) if wanted.to else (
            Path("mesh-outputs") / topology.mesh.name / wanted.node / wanted.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            async with Peer(info.url, info.token) as peer:
                await peer.download(wanted.path, target)
        except MeshError as exc:
            progress(f"output {wanted.node}:{wanted.path} not fetched: {exc}")
            continue
        saved.append(str(target))
    return saved


# -- commands ---------------------------------------------------------------------------------


async def run(file: Path, *, overrides: Sequence[str] = (), keep: bool = False,
              progress: Progress) -> Report:
    """`mesh run`: up (if needed), tasks, outputs, report; then down unless kept."""
    topology = load_topology(file, overrides)
    started = time.monotonic()
    existing = _existing(topology.mesh.name)
    if existing is not None:
        _check_same_nodes(topology, existing)
        progress(f"mesh {topology.mesh.name} is already up; using its nodes")
        nodes = existing.nodes
        reports = await run_tasks(topology, nodes, progress)
        outputs = await fetch_outputs(topology, nodes, progress)
        return Report(topology.mesh.name, reports, outputs,
                      round(time.monotonic() - started, 1))

    if keep:
        ctx = await up(file, overrides=overrides, progress=progress)
        reports = await run_tasks(topology, ctx.nodes, progress)
        outputs = await fetch_outputs(topology, ctx.nodes, progress)
        return Report(topology.mesh.name, reports, outputs,
                      round(time.monotonic() - started, 1))

    with tempfile.TemporaryDirectory(prefix="peermesh-run-") as scratch:
        spawner = make_spawner(topology, Path(scratch) / "nodes")
        try:
            nodes = await start_nodes(topology, spawner, progress, Path(scratch))
            reports = await run_tasks(topology, nodes, progress, spawner)
            outputs = await fetch_outputs(topology, nodes, progress)
        finally:
            # Shielded: a Ctrl+C that cancelled the run must not cancel the clean-up too.
            # The reap by name catches what the spawner no longer knows of (nodes that its
            # nodes spawned, say).
            progress(f"stopping mesh {topology.mesh.name}")
            await asyncio.shield(_close_and_reap(spawner, topology.mesh.name))
    return Report(topology.mesh.name, reports, outputs, round(time.monotonic() - started, 1))


async def _close_and_reap(spawner: Spawner, mesh: str) -> None:
    try:
        await spawner.close()
    finally:
        await reap(mesh)


def _mesh_folder(mesh: str) -> Path:
    """Where `mesh up` keeps a mesh's nodes (their workspaces, state and logs)."""
    return home() / "meshes" / mesh


def _log_path(mesh: str) -> Path:
    return home() / "meshes" / f"{mesh}.log"


def _remove_files(mesh: str, *, log_too: bool) -> None:
    """A mesh's node folders (and supervisor log), once nothing of it runs any more."""
    folder = _mesh_folder(mesh)
    shutil.rmtree(folder / "nodes", ignore_errors=True)
    # Empty now unless registry records remain, which `mesh down` reaps.
    with contextlib.suppress(OSError):
        folder.rmdir()
    if log_too:
        _log_path(mesh).unlink(missing_ok=True)


def _existing(mesh: str) -> MeshContext | None:
    try:
        ctx = load_context(mesh)
    except ConfigError:
        return None
    return ctx if ctx.supervisor_pid and _alive(ctx.supervisor_pid) else None


def _check_same_nodes(topology: Topology, ctx: MeshContext) -> None:
    """A mesh that is up under this name must have the nodes this topology's tasks name."""
    wanted = [instance.name for instance in expand_nodes(topology)]
    missing = [name for name in wanted if name not in ctx.nodes]
    if missing:
        where = f" ({ctx.topology})" if ctx.topology else ""
        raise ConfigError(
            f"mesh {ctx.mesh} is up from a different topology{where} (nodes: "
            f"{', '.join(ctx.nodes) or 'none'}; this one needs {', '.join(missing)}); "
            f"mesh down --mesh {ctx.mesh} first, or set another mesh.name")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or b"mesh.runner" in cmdline.read_bytes()


async def up(file: Path, *, overrides: Sequence[str] = (), progress: Progress) -> MeshContext:
    """`mesh up`: a detached supervisor starts the nodes and keeps them until `mesh down`."""
    topology = load_topology(file, overrides)
    existing = _existing(topology.mesh.name)
    if existing is not None:
        _check_same_nodes(topology, existing)
        return existing

    log_path = _log_path(topology.mesh.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mesh.runner", "supervise", str(Path(file).resolve())]
    for item in overrides:
        command += ["--set", item]
    progress(f"starting mesh {topology.mesh.name} (log: {log_path})")
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True, cwd=os.getcwd(),
        )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), SUPERVISOR_READY_S)
    except asyncio.CancelledError:
        # Interrupted: the supervisor stops what it started, and nothing of it stays.
        proc.terminate()
        await asyncio.shield(proc.wait())
        log_path.unlink(missing_ok=True)
        raise
    except asyncio.TimeoutError:
        proc.terminate()
        raise SpawnError(f"mesh {topology.mesh.name} was not up within "
                         f"{SUPERVISOR_READY_S:g}s: {_tail(log_path, 15)}") from None
    if not line:
        await proc.wait()
        raise SpawnError(f"mesh {topology.mesh.name} did not start: "
                         f"{_tail(log_path, 15) or 'no output'}")
    message = json.loads(line)
    if "error" in message:
        raise SpawnError(message["error"])
    return load_context(topology.mesh.name)


async def supervise(file: Path, overrides: Sequence[str]) -> int:
    """The detached keeper of a mesh started by `mesh up`."""
    topology = load_topology(file, overrides)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    root = _mesh_folder(topology.mesh.name) / "nodes"
    spawner = make_spawner(topology, root)
    scratch = Path(tempfile.mkdtemp(prefix="peermesh-up-"))
    try:
        try:
            nodes = await start_nodes(topology, spawner, lambda text: log.info(
                "runner.progress", text=text), scratch)
        except MeshError as exc:
            sys.stdout.write(json.dumps({"error": str(exc)}) + "\n")
            sys.stdout.flush()
            return 1
        ctx = MeshContext(mesh=topology.mesh.name, backend=topology.mesh.backend,
                          topology=str(Path(file).resolve()), nodes=nodes,
                          supervisor_pid=os.getpid())
        ctx.save()
        sys.stdout.write(json.dumps({"ready": ctx.mesh}) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await spawner.close()
        remove_context(topology.mesh.name)
        shutil.rmtree(scratch, ignore_errors=True)
        _remove_files(topology.mesh.name, log_too=False)
    return 0


async def down(*, file: Path | None = None, mesh: str | None = None, everything: bool = False,
               progress: Progress) -> list[str]:
    """`mesh down`: stop a mesh's supervisor, then remove anything of it by label and record.

    Returns the meshes of which something was found and removed.
    """
    if everything:
        names = sorted({ctx.mesh for ctx in list_contexts()})
    elif file is not None:
        names = [load_topology(file).mesh.name]
    elif mesh is not None:
        names = [mesh]
    else:
        contexts = list_contexts()
        if len(contexts) > 1:
            known = ", ".join(ctx.mesh for ctx in contexts)
            raise ConfigError(f"say which mesh to take down: a FILE, --mesh or --all "
                              f"(up: {known})")
        names = [ctx.mesh for ctx in contexts]

    removed = []
    for name in names:
        found = False
        with contextlib.suppress(ConfigError):
            ctx = load_context(name)
            found = True
            if ctx.supervisor_pid and _alive(ctx.supervisor_pid):
                progress(f"stopping mesh {name}")
                os.kill(ctx.supervisor_pid, signal.SIGTERM)
                for _ in range(300):
                    if not _alive(ctx.supervisor_pid):
                        break
                    await asyncio.sleep(0.1)
        remove_context(name)
        # Whatever the supervisor did not stop (it may have been killed) goes by label.
        report = await reap(name)
        _remove_files(name, log_too=True)
        if found or report.containers or report.networks or report.processes:
            removed.append(name)
    return removed


async def mesh_status(mesh: str | None) -> list[dict[str, Any]]:
    contexts = [load_context(mesh)] if mesh else list_contexts()
    rows = []
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for ctx in contexts:
            for name, info in ctx.nodes.items():
                try:
                    async with session.get(f"{info.url}/healthz") as response:
                        state = "up" if response.status == 200 else f"http {response.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    state = "down"
                rows.append({"mesh": ctx.mesh, "node": name, "state": state, "url": info.url,
                             "backend": ctx.backend})
    return rows


async def node_logs(node: str, *, mesh: str | None, tail: int) -> str:
    contexts = [load_context(mesh)] if mesh else list_contexts()
    for ctx in contexts:
        info = ctx.nodes.get(node)
        if info is None:
            continue
        spawner: Spawner = DockerSpawner(ctx.mesh) if ctx.backend == "docker" \
            else LocalSpawner(ctx.mesh, root_dir=_mesh_folder(ctx.mesh) / "nodes")
        return await spawner.logs(info.id, tail=tail)
    known = sorted({name for ctx in contexts for name in ctx.nodes})
    raise ConfigError(f"no node {node!r} in a mesh that is up "
                      f"(nodes: {', '.join(known) or 'none'})")


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from agent_runtime.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m mesh.runner")
    commands = parser.add_subparsers(dest="command", required=True)
    keeper = commands.add_parser("supervise", help="keep a mesh up until SIGTERM")
    keeper.add_argument("file")
    keeper.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    configure_logging("json", "info")
    return asyncio.run(supervise(Path(args.file), args.set))


if __name__ == "__main__":
    sys.exit(main())
