"""The terminal: run shell commands that can never hang the node or the call.

A command runs through `bash -c` in its own session, with stdin closed unless given and an
environment that turns prompts off. It ends when its shell exits; at its timeout the whole
process group is killed. Each output stream is kept whole up to the cap; past it the caller
gets head and tail around a marker, and the full stream goes to a file in the workspace.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import os
import secrets
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Awaitable, Callable

import structlog
from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh.errors import ApiError, BadRequest, Forbidden, PayloadTooLarge, Unavailable
from mesh.models import ExecRequest, ExecResult
from mesh.procfs import group_running

from ..groups import GroupLedger
from ..http import field_error, json_response, parse_json, read_model, validation_message
from ..metrics import Metrics
from ..tools import Tool, ToolContext
from ..workspace import Workspace

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["OutputHandler", "Terminal", "TerminalExecArgs", "add_routes", "register_tools"]

log = structlog.get_logger("agent_runtime.terminal")

OutputHandler = Callable[[str, str], Awaitable[None]]
"""Receives ("stdout" | "stderr", text) for each piece of output as it arrives."""

DEFAULT_OUTPUT_CAP = 256 * 1024

# Whatever reads these sees no terminal and nobody to ask: tools fail instead of waiting.
NON_INTERACTIVE_ENV = {
    "CI": "1",
    "PAGER": "cat",
    "GIT_PAGER": "cat",
    "EDITOR": "true",
    "VISUAL": "true",
    "GIT_TERMINAL_PROMPT": "0",
    "DEBIAN_FRONTEND": "noninteractive",
    "TERM": "dumb",
    "PIP_NO_INPUT": "1",
    "NO_COLOR": "1",
    # Python writes into a pipe in blocks otherwise, and a stream would show nothing for long.
    "PYTHONUNBUFFERED": "1",
}

# Linux refuses one argument or variable longer than this (MAX_ARG_STRLEN, with its NUL).
MAX_ARG_BYTES = 128 * 1024 - 1

# The node's own credentials are not the business of the commands and daemons it runs.
SECRET_ENV = frozenset({"MESH_TOKEN", "MESH_API_KEY"})


def command_env(extra: dict[str, str] | None) -> dict[str, str]:
    """The environment a command or daemon runs with: the node's, minus its secrets."""
    env = {name: value for name, value in os.environ.items() if name not in SECRET_ENV}
    env.update(NON_INTERACTIVE_ENV)
    env.update(extra or {})
    return env


# After the shell exits, a child it put in the background may hold the pipes open for good.
DRAIN_GRACE_S = 0.1
KILL_GRACE_S = 1.0
GROUP_POLL_S = 0.02
KEEP_OUTPUT_FILES = 50

# A streaming reader that falls this many chunks behind pauses the pipes until it catches up.
MAX_QUEUED_CHUNKS = 64

STREAM_NAMES = {1: "stdout", 2: "stderr"}

# WebSocket close codes of a refusal: 4000 + the HTTP status it would have had (4400, 4403).
CLOSE_CODE_BASE = 4000
FIRST_MESSAGE_TIMEOUT_S = 30.0


class TerminalExecArgs(BaseModel):
    """Arguments of the terminal_exec tool."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    command: str = Field(min_length=1, description="Shell command, run with bash -c.")
    cwd: str | None = Field(
        default=None, description="Folder to run in, relative to the workspace (default: root)."
    )
    timeout_s: float = Field(
        default=120.0, gt=0, le=24 * 3600,
        description="Seconds before the command and everything it started are killed.",
    )
    env: dict[str, str] | None = Field(
        default=None, description="Environment variables set on top of the node's."
    )
    stdin: str | None = Field(
        default=None, description="Text given as standard input (default: none, at EOF)."
    )


class Terminal:
    """Runs commands in the workspace and kills what is left of them when asked or at close."""

    def __init__(
        self,
        workspace: Workspace,
        output_dir: Path,
        output_cap: int = DEFAULT_OUTPUT_CAP,
        *,
        metrics: Metrics | None = None,
        groups: GroupLedger | None = None,
    ) -> None:
        self.workspace = workspace
        self.groups = groups
        self.output_dir = output_dir
        self.output_cap = output_cap
        self.metrics = metrics or Metrics()
        self.shell = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"
        self._runs: set[_Run] = set()
        self._closed = False

    async def run(self, request: ExecRequest) -> ExecResult:
        """Run a command to its end and return its capped output."""
        return await self._execute(request, None)

    async def stream(self, request: ExecRequest, on_output: OutputHandler) -> ExecResult:
        """Run a command, handing its output to `on_output` as it arrives.

        A slow `on_output` slows the command's output down rather than filling memory.
        """
        return await self._execute(request, on_output)

    async def close(self) -> None:
        """Refuse new commands and kill every command still running."""
        self._closed = True
        await asyncio.gather(*(self._terminate(run) for run in list(self._runs)))

    # -- running ------------------------------------------------------------------------------

    async def _execute(self, request: ExecRequest, on_output: OutputHandler | None) -> ExecResult:
        if self._closed:
            raise Unavailable("the node is shutting down and runs no new commands")
        _check_request(request)
        cwd = self._resolve_cwd(request.cwd)
        run = _Run(_new_exec_id(), self.output_cap, self.output_dir, on_output is not None)

        started = time.perf_counter()
        # Known before it starts, so that close() also kills a command that is still starting.
        self._runs.add(run)
        try:
            transport = await self._spawn(run, request, cwd)
        except BaseException:
            run.started.cancel()
            self._runs.discard(run)
            raise
        if self.groups is not None:
            self.groups.record(run.pid, "exec")

        outcome = "cancelled"
        try:
            timed_out = await self._supervise(run, request.timeout_s, on_output)
            exit_code = transport.get_returncode()
            outcome = "timeout" if timed_out else "ok" if exit_code == 0 else "error"
        except BaseException:
            # The caller left (a closed socket) or its reader failed: the command goes too.
            await asyncio.shield(self._terminate(run))
            raise
        finally:
            transport.close()
            run.close_files()
            self._runs.discard(run)
            if self.groups is not None:
                # Its shell has ended; what it put in the background stays, as on a clean stop.
                self.groups.forget(run.pid)
            duration = time.perf_counter() - started
            self.metrics.exec_commands.labels(outcome=outcome).inc()
            self.metrics.exec_seconds.observe(duration)

        result = ExecResult(
            exit_code=exit_code,
            stdout=run.stdout.text(self._display(run.stdout.path)),
            stderr=run.stderr.text(self._display(run.stderr.path)),
            timed_out=timed_out,
            truncated=run.stdout.cut or run.stderr.cut,
            duration_ms=round(duration * 1000, 3),
            output_file=self._output_file(run),
        )
        log.debug("terminal.exec", exec_id=run.id, command_chars=len(request.command),
                  exit_code=exit_code, timed_out=timed_out, truncated=result.truncated,
                  duration_ms=result.duration_ms)
        if run.stdout.saved or run.stderr.saved:
            self._prune_outputs()
        return result

    async def _spawn(
        self, run: _Run, request: ExecRequest, cwd: Path
    ) -> asyncio.SubprocessTransport:
        env = command_env(request.env)
        loop = asyncio.get_running_loop()
        try:
            # A session of its own: no controlling terminal to prompt on, and one process
            # group to kill at the timeout.
            transport, _ = await loop.subprocess_exec(
                lambda: run, self.shell, "-c", request.command,
                stdin=subprocess.DEVNULL if request.stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=cwd, env=env, start_new_session=True,
            )
        except OSError as exc:
            raise spawn_error(exc, cwd, "the command") from exc

        if request.stdin is not None:
            stdin = transport.get_pipe_transport(0)
            assert isinstance(stdin, asyncio.WriteTransport)
            stdin.write(request.stdin.encode())
            # Closing after the write is what lets a reader see the end of its input.
            stdin.close()
        return transport

    async def _supervise(
        self, run: _Run, timeout_s: float, on_output: OutputHandler | None
    ) -> bool:
        """Wait for the shell to exit or time out; returns whether it timed out."""
        pump = asyncio.create_task(run.pump(on_output)) if on_output is not None else None
        try:
            waiting: set[asyncio.Future[None]] = {run.exited}
            if pump is not None:
                waiting.add(pump)
            done, _ = await asyncio.wait(
                waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if pump is not None and pump in done:
                # The reader only stops early when it failed (the client went away).
                pump.result()
            timed_out = not run.exited.done()
            if timed_out:
                await self._terminate(run)

            # Read what is still in the pipes, but a backgrounded child holding them open
            # (`server &`) must not hold the call: after a short grace, stop reading.
            run.resume_reading()
            await asyncio.wait({run.eof}, timeout=DRAIN_GRACE_S)
            run.stop_reading()
            if pump is not None:
                run.end_stream()
                await pump
            return timed_out
        finally:
            if pump is not None and not pump.done():
                pump.cancel()

    async def _terminate(self, run: _Run) -> None:
        """Kill the command's whole process group: SIGTERM, a short grace, then SIGKILL.

        A command whose shell already ended is left alone: what remains of it was put in the
        background on purpose.
        """
        await asyncio.wait({run.started})
        if run.started.cancelled() or run.exited.done():
            return
        pgid = run.pid
        _signal_group(pgid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KILL_GRACE_S
        await asyncio.wait({run.exited}, timeout=KILL_GRACE_S)
        while loop.time() < deadline and group_running(pgid):
            await asyncio.sleep(GROUP_POLL_S)
        _signal_group(pgid, signal.SIGKILL)
        await asyncio.shield(run.exited)

    # -- paths --------------------------------------------------------------------------------

    def _resolve_cwd(self, raw: str | None) -> Path:
        cwd = self.workspace.resolve(raw or "", must_exist=True)
        if not cwd.is_dir():
            raise field_error("cwd", "not a folder")
        return cwd

    def _display(self, path: Path) -> str:
        """The path as the caller can name it: workspace-relative when it lies inside."""
        try:
            return self.workspace.relative(path)
        except ValueError:
            return str(path)

    def _output_file(self, run: _Run) -> str | None:
        # One field for two streams: stdout's file when both were cut; each marker names its own.
        for capture in (run.stdout, run.stderr):
            if capture.saved:
                return self._display(capture.path)
        return None

    def _prune_outputs(self) -> None:
        """Keep the newest output files (names sort by time) and delete the rest."""
        try:
            names = sorted(entry.name for entry in os.scandir(self.output_dir))
        except OSError:
            return
        for name in names[:-KEEP_OUTPUT_FILES]:
            try:
                (self.output_dir / name).unlink()
            except OSError as exc:
                log.warning("terminal.prune_failed", file=name, error=str(exc))


class _Run(asyncio.SubprocessProtocol):
    """One command while it runs: its process, its captured output, its stream of chunks."""

    def __init__(self, exec_id: str, cap: int, output_dir: Path, streaming: bool) -> None:
        loop = asyncio.get_running_loop()
        self.id = exec_id
        self.started: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.eof: asyncio.Future[None] = loop.create_future()
        self.stdout = _Capture(cap, output_dir / f"{exec_id}.stdout")
        self.stderr = _Capture(cap, output_dir / f"{exec_id}.stderr")
        self.transport: asyncio.SubprocessTransport | None = None
        self._open_pipes = {1, 2}
        self._paused = False
        self._chunks: asyncio.Queue[tuple[str, str] | None] | None = (
            asyncio.Queue() if streaming else None
        )
        self._decoders = {
            fd: codecs.getincrementaldecoder("utf-8")(errors="replace") for fd in STREAM_NAMES
        }

    @property
    def pid(self) -> int:
        assert self.transport is not None
        pid = self.transport.get_pid()
        assert pid is not None
        return pid

    # -- protocol callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport
        self.started.set_result(None)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        (self.stdout if fd == 1 else self.stderr).write(data)
        if self._chunks is None:
            return
        text = self._decoders[fd].decode(data)
        if text:
            self._chunks.put_nowait((STREAM_NAMES[fd], text))
        if self._chunks.qsize() >= MAX_QUEUED_CHUNKS and not self.exited.done():
            self._set_reading(paused=True)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open_pipes.discard(fd)
        if not self._open_pipes and not self.eof.done():
            self.eof.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    # -- reading ------------------------------------------------------------------------------

    def resume_reading(self) -> None:
        self._set_reading(paused=False)

    def stop_reading(self) -> None:
        """Close the pipes; a child still writing to them gets EPIPE from now on."""
        assert self.transport is not None
        self.transport.close()

    def _set_reading(self, *, paused: bool) -> None:
        if self._paused == paused or self.transport is None:
            return
        self._paused = paused
        for fd in STREAM_NAMES:
            pipe = self.transport.get_pipe_transport(fd)
            if isinstance(pipe, asyncio.ReadTransport) and not pipe.is_closing():
                if paused:
                    pipe.pause_reading()
                else:
                    pipe.resume_reading()

    async def pump(self, on_output: OutputHandler) -> None:
        """Hand queued chunks to `on_output` until the stream ends."""
        assert self._chunks is not None
        while (chunk := await self._chunks.get()) is not None:
            if self._paused and self._chunks.qsize() <= MAX_QUEUED_CHUNKS // 2:
                self.resume_reading()
            await on_output(*chunk)

    def end_stream(self) -> None:
        """Queue the decoders' last characters and the end of the stream."""
        assert self._chunks is not None
        for fd, decoder in self._decoders.items():
            text = decoder.decode(b"", final=True)
            if text:
                self._chunks.put_nowait((STREAM_NAMES[fd], text))
        self._chunks.put_nowait(None)

    def close_files(self) -> None:
        self.stdout.close()
        self.stderr.close()


class _Capture:
    """One output stream: whole up to the cap; past it, head and tail kept, all of it in a file.

    Memory stays near the cap whatever the command prints.
    """

    def __init__(self, cap: int, path: Path) -> None:
        self.path = path
        self.cap = cap
        self.head_size = cap // 2
        self.tail_size = cap - self.head_size
        self.size = 0
        self.head = bytearray()
        self.tail = bytearray()
        self.cut = False
        self.save_error: str | None = None
        self._file: IO[bytes] | None = None

    @property
    def saved(self) -> bool:
        return self.cut and self.save_error is None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if not self.cut:
            self.head += data
            if len(self.head) > self.cap:
                self._start_cutting()
            return

        self.tail += data
        if len(self.tail) > 2 * self.tail_size:
            del self.tail[: -self.tail_size]
        self._save(data)

    def _start_cutting(self) -> None:
        self.cut = True
        self.tail = self.head[-self.tail_size:] if self.tail_size else bytearray()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")
        except OSError as exc:
            self.save_error = str(exc)
        self._save(self.head)
        del self.head[self.head_size:]

    def _save(self, data: bytes | bytearray) -> None:
        if self._file is None:
            return
        try:
            self._file.write(data)
        except OSError as exc:
            # A full disk costs the saved copy, not the command or the call.
            self.save_error = str(exc)
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def text(self, display_path: str) -> str:
        """The stream as text; a cut one as head, a marker line, and tail."""
        if not self.cut:
            return self.head.decode("utf-8", errors="replace")
        head = self.head[: _complete_prefix(self.head)]
        tail = self.tail[-self.tail_size:] if self.tail_size else bytearray()
        tail = tail[_first_char_start(tail):]
        where = (
            f"full output in {display_path}" if self.save_error is None
            else f"full output not saved: {self.save_error}"
        )
        marker = f"[... {_size(self.size - len(head) - len(tail))} cut; {where} ...]"
        return (f"{head.decode('utf-8', errors='replace')}\n{marker}\n"
                f"{tail.decode('utf-8', errors='replace')}")


# -- helpers ----------------------------------------------------------------------------------


def _check_request(request: ExecRequest) -> None:
    check_command(request.command, request.env)
    if request.stdin is not None and not _encodable(request.stdin):
        raise field_error("stdin", "holds a lone surrogate, which is not text")


def check_command(command: str, env: dict[str, str] | None) -> None:
    """Refuse what the operating system would refuse with an unhelpful error.

    The caller's mistakes, found here, are a 400 naming the field rather than a failed start.
    """
    _check_argument("command", command)
    for name, value in (env or {}).items():
        if not name or "=" in name or "\x00" in name or not _encodable(name):
            raise field_error(f"env.{name}", "not a valid variable name")
        _check_argument(f"env.{name}", f"{name}={value}")


def _check_argument(field: str, text: str) -> None:
    if "\x00" in text:
        raise field_error(field, "contains a NUL byte")
    if not _encodable(text):
        raise field_error(field, "holds a lone surrogate, which is not text")
    size = len(text.encode())
    if size > MAX_ARG_BYTES:
        raise field_error(
            field, f"{size} bytes, over the system's limit of {MAX_ARG_BYTES} bytes for one "
            "argument or variable; put a longer script in a file and run that",
        )


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def spawn_error(exc: OSError, cwd: Path, what: str) -> ApiError:
    """The refusal for a process that could not start: the caller's fault is a 4xx."""
    if exc.errno == errno.E2BIG:
        return PayloadTooLarge(
            f"could not start {what}: the command and environment together exceed the "
            f"system's limit of {os.sysconf('SC_ARG_MAX')} bytes",
            details={"limit_bytes": os.sysconf("SC_ARG_MAX")},
        )
    # The folder was checked before; it may have gone or changed meanwhile.
    if not os.path.isdir(cwd):
        return field_error("cwd", "no longer a folder in the workspace")
    if not os.access(cwd, os.X_OK):
        return Forbidden(f"could not start {what}: cwd is not accessible",
                         details={"field": "cwd"})
    return Unavailable(f"could not start {what}: {exc.strerror or exc}")



def _new_exec_id() -> str:
    """A unique id that sorts by time, so that output files sort oldest first."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f-") + secrets.token_hex(3)


def _complete_prefix(data: bytes | bytearray) -> int:
    """Length of `data` without a UTF-8 sequence the cut split at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= needed else len(data) - back
    return len(data)


def _first_char_start(data: bytes | bytearray) -> int:
    """Index past the continuation bytes a cut left at the start of `data`."""
    index = 0
    while index < min(3, len(data)) and 0x80 <= data[index] < 0xC0:
        index += 1
    return index


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass



# -- HTTP and WebSocket -----------------------------------------------------------------------


def add_routes(app: web.Application, node: Node) -> None:
    async def exec_command(request: web.Request) -> web.Response:
        body = await read_model(request, ExecRequest)
        return json_response(await node.terminal.run(body))

    async def exec_ws(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=2 * 1024 * 1024)
        await ws.prepare(request)
        node.websockets.add(ws)
        try:
            await _serve_exec(node.terminal, ws)
        finally:
            node.websockets.discard(ws)
        return ws

    app.router.add_post("/api/v1/terminal/exec", exec_command)
    app.router.add_get("/api/v1/terminal/ws", exec_ws)


async def _serve_exec(terminal: Terminal, ws: web.WebSocketResponse) -> None:
    """Read one ExecRequest, stream the command's output, end with its result."""
    try:
        request = await _first_request(ws)
    except ApiError as exc:
        await _refuse(ws, exc)
        return
    if request is None:
        return

    async def send(stream: str, data: str) -> None:
        await ws.send_json({"type": stream, "data": data})

    runner = asyncio.create_task(terminal.stream(request, send))
    closed = asyncio.create_task(_wait_closed(ws))
    try:
        await asyncio.wait({runner, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closed.cancel()
        if not runner.done():
            # The client went away, or the server stops: the command goes with it.
            runner.cancel()
            await asyncio.wait({runner})

    if runner.cancelled() or ws.closed:
        return
    error = runner.exception()
    if isinstance(error, ApiError):
        await _refuse(ws, error)
    elif isinstance(error, ConnectionResetError):
        log.debug("terminal.ws_client_gone")
    elif error is not None:
        log.error("terminal.ws_failed", exc_info=error)
        await ws.close(code=1011, message=b"internal error")
    else:
        result = runner.result()
        await ws.send_json({"type": "exit", **result.model_dump(mode="json")})
        await ws.close()


async def _first_request(ws: web.WebSocketResponse) -> ExecRequest | None:
    """The ExecRequest the client sends first, or None when it closed instead."""
    try:
        message = await ws.receive(timeout=FIRST_MESSAGE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise BadRequest(
            f"no command within {FIRST_MESSAGE_TIMEOUT_S:.0f} s: send one ExecRequest message"
        ) from None
    if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                        WSMsgType.ERROR):
        return None
    if message.type != WSMsgType.TEXT:
        raise BadRequest("the first message must be a JSON text message holding an ExecRequest")
    data = parse_json(message.data, "message")
    if not isinstance(data, dict):
        raise BadRequest("the message must be a JSON object")
    try:
        return ExecRequest.model_validate(data)
    except ValidationError as exc:
        text, problems = validation_message(exc)
        raise BadRequest(text, details={"errors": problems}) from exc


async def _wait_closed(ws: web.WebSocketResponse) -> None:
    """Return once the client closed the socket; what it sends meanwhile is ignored."""
    async for message in ws:
        if message.type == WSMsgType.ERROR:
            return


async def _refuse(ws: web.WebSocketResponse, error: ApiError) -> None:
    await ws.send_json({"type": "error", **error.to_body()})
    await ws.close(code=CLOSE_CODE_BASE + error.status, message=error.code.encode())


# -- tool -------------------------------------------------------------------------------------


def register_tools(node: Node) -> None:
    terminal = node.terminal

    async def terminal_exec(ctx: ToolContext, args: TerminalExecArgs) -> ExecResult:
        return await terminal.run(ExecRequest.model_validate(args.model_dump()))

    node.tools.add(Tool(
        name="terminal_exec",
        description=(
            "Run a shell command (bash -c) in the workspace and return exit_code, stdout and "
            "stderr. Nothing is interactive: stdin is empty unless given, so a prompt fails "
            "at once instead of waiting; pass answers with stdin or flags such as -y. The "
            "command ends when its shell exits: put servers in the background with output "
            "redirected (`cmd >log 2>&1 &`). Long output comes back as head and tail; the "
            "full text is in output_file."
        ),
        args_model=TerminalExecArgs,
        handler=terminal_exec,
        reads=True,
        writes=True,
        executes=True,
    ))
