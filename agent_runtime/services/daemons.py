"""Supervised daemons: background processes that outlive the request that started them.

Each daemon runs `/bin/bash -c COMMAND` in a session of its own, so that its whole process
group can be signalled, with stdin from /dev/null and stdout and stderr appended to
`<log_dir>/<name>.log`. One supervisor task per daemon restarts it by its policy with
exponential backoff, and every daemon stops with the node.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, BinaryIO

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import Conflict, NotFound, Unavailable
from mesh.models import DaemonInfo, DaemonSpec, DaemonStatus
from mesh.procfs import group_running

from ..groups import GroupLedger
from ..http import field_error, json_response, query_int, read_model
from ..metrics import Metrics
from ..tools import Tool, ToolContext
from ..workspace import Workspace
from .terminal import check_command, command_env, spawn_error

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["Daemons", "add_routes", "register_tools"]

log = structlog.get_logger("agent_runtime.daemons")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 10.0
STOP_GRACE_S = 3.0
GROUP_POLL_S = 0.05
FOLLOW_POLL_S = 0.1
FOLLOW_CHUNK = 64 * 1024
DEFAULT_TAIL = 200
MAX_TAIL = 1_000_000


class _Daemon:
    """One daemon's spec and live state; only its supervisor task touches the process."""

    def __init__(self, spec: DaemonSpec, cwd: Path, log_file: Path) -> None:
        self.spec = spec
        self.cwd = cwd
        self.log_file = log_file
        self.status = DaemonStatus.RUNNING
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.restarts = 0
        self.started_at: float | None = None
        self.stopping = asyncio.Event()
        self.supervisor: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """Running, or waiting to be restarted."""
        return self.supervisor is not None and not self.supervisor.done()

    def info(self) -> DaemonInfo:
        return DaemonInfo(
            name=self.spec.name,
            command=self.spec.command,
            status=self.status,
            pid=self.pid,
            exit_code=self.exit_code,
            restarts=self.restarts,
            started_at=self.started_at,
            restart=self.spec.restart,
            log_file=str(self.log_file),
        )


class Daemons:
    """Starts, supervises and stops the node's daemons."""

    def __init__(
        self, workspace: Workspace, log_dir: Path, metrics: Metrics,
        groups: GroupLedger | None = None,
    ) -> None:
        self.workspace = workspace
        self.groups = groups
        self.log_dir = log_dir
        self.metrics = metrics
        self._daemons: dict[str, _Daemon] = {}
        self._closed = False

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        """Stop every daemon's process group, all at once, and wait for them."""
        self._closed = True
        await asyncio.gather(*(self._halt(d) for d in list(self._daemons.values())))

    def list(self) -> list[DaemonInfo]:
        return [d.info() for d in sorted(self._daemons.values(), key=lambda d: d.spec.name)]

    def get(self, name: str) -> DaemonInfo:
        return self._record(name).info()

    async def run(self, spec: DaemonSpec) -> DaemonInfo:
        """Start a new daemon; its first process is running when this returns."""
        self._check_open()
        existing = self._daemons.get(spec.name)
        if existing is not None and existing.active:
            raise Conflict(
                f"daemon {spec.name!r} is already running", details={"name": spec.name}
            )
        check_command(spec.command, spec.env)
        daemon = _Daemon(spec, self._resolve_cwd(spec.cwd), self.log_dir / f"{spec.name}.log")
        self._daemons[spec.name] = daemon
        await self._launch(daemon)
        return daemon.info()

    async def stop(self, name: str) -> DaemonInfo:
        daemon = self._record(name)
        await self._halt(daemon)
        return daemon.info()

    async def restart(self, name: str) -> DaemonInfo:
        """Stop the daemon if it runs, then start it again with the same spec."""
        self._check_open()
        daemon = self._record(name)
        await self._halt(daemon)
        if self._daemons.get(name) is not daemon:
            raise NotFound(f"daemon {name!r} was removed meanwhile", details={"name": name})
        if daemon.active:
            raise Conflict(f"daemon {name!r} was started meanwhile", details={"name": name})
        daemon.stopping = asyncio.Event()
        daemon.exit_code = None
        await self._launch(daemon)
        return daemon.info()

    async def forget(self, name: str) -> DaemonInfo:
        """Stop the daemon and drop it, log included."""
        daemon = self._record(name)
        await self._halt(daemon)
        if self._daemons.get(name) is daemon:
            del self._daemons[name]
            daemon.log_file.unlink(missing_ok=True)
        return daemon.info()

    async def tail(self, name: str, lines: int) -> tuple[bytes, int]:
        """The last `lines` lines of the daemon's log, and the log's length when read."""
        daemon = self._record(name)
        return await asyncio.to_thread(_tail, daemon.log_file, lines)

    async def follow(self, name: str, offset: int) -> AsyncIterator[bytes]:
        """The log from `offset` on as it grows, until the daemon stops or is dropped."""
        daemon = self._record(name)
        handle = None
        try:
            while True:
                # Decided before reading, so that what the daemon wrote last is still sent.
                live = daemon.active and self._daemons.get(name) is daemon and not self._closed
                if handle is None:
                    handle = _open_or_none(daemon.log_file)
                chunk = b""
                if handle is not None:
                    if os.fstat(handle.fileno()).st_size < offset:
                        offset = 0
                    handle.seek(offset)
                    chunk = handle.read(FOLLOW_CHUNK)
                if chunk:
                    offset += len(chunk)
                    yield chunk
                    continue
                if not live:
                    return
                await asyncio.sleep(FOLLOW_POLL_S)
        finally:
            if handle is not None:
                handle.close()

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the node is stopping; no daemons start now")

    def _record(self, name: str) -> _Daemon:
        try:
            return self._daemons[name]
        except KeyError:
            raise NotFound(f"no daemon named {name!r}", details={"name": name}) from None

    def _resolve_cwd(self, raw: str | None) -> Path:
        if raw is None:
            return self.workspace.root
        try:
            cwd = self.workspace.resolve(raw, must_exist=True)
        except NotFound:
            raise field_error("cwd", "no such folder in the workspace") from None
        if not cwd.is_dir():
            raise field_error("cwd", "not a folder")
        return cwd

    async def _launch(self, daemon: _Daemon) -> None:
        try:
            proc = await self._spawn(daemon)
        except OSError as exc:
            daemon.status = DaemonStatus.EXITED
            raise spawn_error(exc, daemon.cwd, f"daemon {daemon.spec.name!r}") from exc
        daemon.supervisor = asyncio.create_task(
            self._supervise(daemon, proc), name=f"daemon-{daemon.spec.name}"
        )
        if self._closed:
            # The node began stopping while this one was starting, after close() took stock.
            await self._halt(daemon)
            raise Unavailable("the node is stopping; no daemons start now")

    async def _spawn(self, daemon: _Daemon) -> asyncio.subprocess.Process:
        env = command_env(daemon.spec.env)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(daemon.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/bash", "-c", daemon.spec.command,
                stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                cwd=daemon.cwd, env=env, start_new_session=True,
            )
        finally:
            os.close(log_fd)
        if self.groups is not None:
            self.groups.record(proc.pid, "daemon")
        daemon.pid = proc.pid
        daemon.status = DaemonStatus.RUNNING
        daemon.started_at = time.time()
        self._count_running()
        log.info("daemon.started", name=daemon.spec.name, pid=proc.pid, restarts=daemon.restarts)
        return proc

    async def _supervise(self, daemon: _Daemon, proc: asyncio.subprocess.Process | None) -> None:
        """Watch the daemon's process and restart it by policy until asked to stop."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_START_S
        name = daemon.spec.name
        try:
            while True:
                started = loop.time()
                code = await self._watch(daemon, proc) if proc is not None else None
                if daemon.stopping.is_set():
                    break
                if not _wants_restart(daemon.spec.restart, code):
                    daemon.status = DaemonStatus.EXITED
                    return

                if loop.time() - started >= STABLE_AFTER_S:
                    delay = BACKOFF_START_S
                daemon.status = DaemonStatus.BACKOFF
                log.info("daemon.restarting", name=name, exit_code=code, delay_s=delay)
                if await _set_within(daemon.stopping, delay):
                    break
                delay = min(delay * 2, BACKOFF_MAX_S)
                daemon.restarts += 1

                try:
                    proc = await self._spawn(daemon)
                except OSError as exc:
                    # Counts as a failed start: the policy decides whether to try again.
                    log.warning("daemon.spawn_failed", name=name, error=str(exc))
                    proc = None
            daemon.status = DaemonStatus.STOPPED
            log.info(
                "daemon.stopped", name=name, pid=proc.pid if proc is not None else None,
                exit_code=daemon.exit_code,
            )
        except Exception:
            log.exception("daemon.supervisor_failed", name=name)
            daemon.status = DaemonStatus.EXITED

    async def _watch(self, daemon: _Daemon, proc: asyncio.subprocess.Process) -> int:
        """Wait until the process exits, or stop its group when asked; its exit code."""
        exited = asyncio.ensure_future(proc.wait())
        asked = asyncio.ensure_future(daemon.stopping.wait())
        try:
            await asyncio.wait({exited, asked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()
        if not exited.done():
            await _terminate_group(proc.pid)
        code = await exited

        # Whatever the daemon left behind in its group goes with it, so that restarts do not
        # pile up orphans holding ports and files.
        await _terminate_group(proc.pid)
        if self.groups is not None:
            self.groups.forget(proc.pid)
        daemon.pid = None
        daemon.exit_code = code
        self._count_running()
        log.info("daemon.exited", name=daemon.spec.name, pid=proc.pid, exit_code=code)
        return code

    async def _halt(self, daemon: _Daemon) -> None:
        if daemon.supervisor is None or daemon.supervisor.done():
            return
        daemon.stopping.set()
        # Shielded: a client that hangs up mid-stop must not cancel the supervisor itself.
        await asyncio.shield(daemon.supervisor)

    def _count_running(self) -> None:
        running = sum(1 for d in self._daemons.values() if d.pid is not None)
        self.metrics.daemons_running.set(running)


def _wants_restart(policy: str, code: int | None) -> bool:
    if policy == "always":
        return True
    return policy == "on-failure" and code != 0


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    """Whether the event is set within the time."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _terminate_group(pgid: int) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after the grace period."""
    if not group_running(pgid):
        return
    _signal_group(pgid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + STOP_GRACE_S
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(GROUP_POLL_S)
        if not group_running(pgid):
            return
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass




def _open_or_none(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


def _tail(path: Path, lines: int) -> tuple[bytes, int]:
    """The last `lines` lines of a file, read backwards, and the file's length when read."""
    handle = _open_or_none(path)
    if handle is None:
        return b"", 0
    with handle:
        end = handle.seek(0, os.SEEK_END)
        if lines <= 0:
            return b"", end
        pos, data = end, b""
        while pos > 0:
            step = min(FOLLOW_CHUNK, pos)
            pos -= step
            handle.seek(pos)
            data = handle.read(step) + data
            # A newline at the very end closes the last line rather than starting another.
            if data.count(b"\n", 0, len(data) - 1) >= lines:
                break
        return b"".join(data.splitlines(keepends=True)[-lines:]), end



def add_routes(app: web.Application, node: Node) -> None:
    daemons = node.daemons

    async def create(request: web.Request) -> web.Response:
        spec = await read_model(request, DaemonSpec)
        return json_response(await daemons.run(spec), status=201)

    async def list_all(request: web.Request) -> web.Response:
        return json_response(daemons.list())

    async def get_one(request: web.Request) -> web.Response:
        return json_response(daemons.get(request.match_info["name"]))

    async def logs(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        lines = query_int(request, "tail", DEFAULT_TAIL, maximum=MAX_TAIL) or 0
        follow = request.query.get("follow", "").lower() in ("1", "true", "yes")
        text, offset = await daemons.tail(name, lines)
        if not follow:
            return web.Response(body=text, content_type="text/plain", charset="utf-8")

        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if text:
            await response.write(text)
        async for chunk in daemons.follow(name, offset):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def stop(request: web.Request) -> web.Response:
        return json_response(await daemons.stop(request.match_info["name"]))

    async def restart(request: web.Request) -> web.Response:
        return json_response(await daemons.restart(request.match_info["name"]))

    async def forget(request: web.Request) -> web.Response:
        return json_response(await daemons.forget(request.match_info["name"]))

    app.router.add_post("/api/v1/daemons", create)
    app.router.add_get("/api/v1/daemons", list_all)
    app.router.add_get("/api/v1/daemons/{name}", get_one)
    app.router.add_delete("/api/v1/daemons/{name}", forget)
    app.router.add_get("/api/v1/daemons/{name}/logs", logs)
    app.router.add_post("/api/v1/daemons/{name}/stop", stop)
    app.router.add_post("/api/v1/daemons/{name}/restart", restart)


class DaemonName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)


class DaemonLogs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    tail: int = Field(default=100, ge=0, le=10_000)


def register_tools(node: Node) -> None:
    daemons = node.daemons

    async def daemon_start(ctx: ToolContext, args: DaemonSpec) -> DaemonInfo:
        return await daemons.run(args)

    async def daemon_stop(ctx: ToolContext, args: DaemonName) -> DaemonInfo:
        return await daemons.stop(args.name)

    async def daemon_logs(ctx: ToolContext, args: DaemonLogs) -> str:
        text, _ = await daemons.tail(args.name, args.tail)
        return text.decode("utf-8", errors="replace")

    node.tools.add(Tool(
        "daemon_start",
        "Start a supervised background process (server, watcher) that keeps running after "
        "this call; output goes to its log. restart: no, on-failure or always.",
        DaemonSpec, daemon_start, executes=True,
    ))
    node.tools.add(Tool(
        "daemon_stop", "Stop a daemon and every process it started.",
        DaemonName, daemon_stop, executes=True,
    ))
    node.tools.add(Tool(
        "daemon_logs", "The last lines of a daemon's combined stdout and stderr.",
        DaemonLogs, daemon_logs,
    ))
