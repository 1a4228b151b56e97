"""The peer library: one async client for every service a node offers.

    async with Peer("http://127.0.0.1:8700", token) as peer:
        handle = await peer.submit(steps=[{"tool": "terminal_exec", "args": {"command": "make"}}])
        async for event in handle.events():
            print(event.type)
        task = await handle.result()

Failures come out as the peer errors of mesh.errors, translated where aiohttp raises them, each
carrying the node's url and the task id where there is one:

- PeerUnreachable: no connection could be made, and this client never had an answer from the
  node.
- PeerGone: this client had an answer from the node before, and now a connection cannot be made,
  a response breaks off, or an event stream drops and cannot be resumed. "It answered before" is
  the only evidence a client has that the node existed, so the rule is kept per Peer object.
- PeerAuthError: a 401, or a 403 that is not the node's refusal of a path outside its workspace.
- PeerRequestError: any other error answer, with the node's status, code, message and details.
- TaskFailed: a task that ended failed, cancelled or interrupted (from TaskHandle.result).

Retries are decided by RetryPolicy alone: connection failures and 502/503 answers are tried again,
and only for idempotent calls (GET, DELETE, a PUT whose body can be sent again, and the event
stream's handshake).
"""

from __future__ import annotations

import asyncio
import builtins
import codecs
import contextlib
import dataclasses
import functools
import io
import math
import time
from pathlib import Path
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Literal,
    Mapping,
    TypeVar,
)
from urllib.parse import quote

import aiohttp
import structlog
from pydantic import BaseModel, TypeAdapter, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from yarl import URL

from .errors import (
    ConfigError,
    Forbidden,
    PeerAuthError,
    PeerError,
    PeerGone,
    PeerRequestError,
    PeerUnreachable,
    TaskFailed,
)
from .models import (
    TERMINAL_STATUSES,
    DaemonInfo,
    DaemonSpec,
    Event,
    ExecRequest,
    ExecResult,
    FileInfo,
    FileListing,
    Health,
    MessageRequest,
    Mode,
    ModeChange,
    MoveRequest,
    SnapshotCreate,
    SnapshotInfo,
    Step,
    Task,
    TaskCreate,
    TaskStatus,
)

__all__ = ["ExecOutput", "Peer", "RetryPolicy", "TaskHandle"]

Logger = structlog.typing.FilteringBoundLogger

log: Logger = structlog.get_logger("mesh.client")

T = TypeVar("T")

# The event a task's stream ends with, one per terminal status.
FINAL_EVENT_TYPES = frozenset(f"task.{status.value}" for status in TERMINAL_STATUSES)
# The close code of a node dropping a subscriber that fell behind; it resumes by seq.
CLOSE_SLOW_SUBSCRIBER = 4008
# A refused terminal stream closes with 4000 + the HTTP status the refusal would have had.
CLOSE_CODE_BASE = 4000
CHUNK_SIZE = 256 * 1024
# Events carry tool arguments, which may hold a whole file a model wrote.
MAX_WS_MESSAGE = 64 * 1024 * 1024
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})

# A request body: in memory, a local file (opened afresh for each attempt) or a stream.
Body = bytes | Path | AsyncIterable[bytes] | None


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Which failures are tried again, how often and how far apart: the one place that decides."""

    attempts: int = 3
    first_wait_s: float = 0.1
    max_wait_s: float = 1.0
    statuses: frozenset[int] = frozenset({502, 503})

    def is_transient(self, exc: BaseException) -> bool:
        """A failure that may pass: no connection, or a gateway or node that is busy."""
        if isinstance(exc, PeerRequestError):
            return exc.status in self.statuses
        return isinstance(exc, (PeerUnreachable, PeerGone))

    async def run(
        self, call: Callable[[], Awaitable[T]], *, idempotent: bool, logger: Logger = log
    ) -> T:
        """Await `call`, again after a transient failure if it is idempotent."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts if idempotent else 1),
            wait=wait_exponential_jitter(
                multiplier=self.first_wait_s, max=self.max_wait_s, jitter=self.first_wait_s
            ),
            retry=retry_if_exception(self.is_transient),
            before_sleep=functools.partial(_log_retry, logger),
            reraise=True,
        )
        return await retrying(call)


def _log_retry(logger: Logger, state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    logger.debug("peer.retry", attempt=state.attempt_number, error=str(error))


@dataclasses.dataclass(frozen=True)
class ExecOutput:
    """A piece of a running command's output, as exec_stream yields it."""

    stream: Literal["stdout", "stderr"]
    data: str


class _ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class _ErrorBody(BaseModel):
    error: _ErrorDetail


class _Accepted(BaseModel):
    id: str
    status: str


@functools.cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def _quote(path: str) -> str:
    """A workspace path as a URL path, every segment escaped but the separators kept."""
    return quote(path, safe="/")


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _opened(body: Body) -> Iterator[Any]:
    """The body for one attempt, as aiohttp sends it in chunks rather than in one write."""
    if isinstance(body, Path):
        with body.open("rb") as file:
            yield file
    elif isinstance(body, bytes):
        yield io.BytesIO(body)
    else:
        yield body


class Peer:
    """An async client for one node, over one aiohttp session.

    The session is created on first use unless one is passed in; closing the Peer (or leaving
    `async with`) closes only a session it created. `timeout` bounds a connect and any silence
    while reading an answer, not a whole call: a download or an event stream may last long.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        logger: Logger | None = None,
    ) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"a node URL looks like http://host:port, not {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.log = logger or log
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session = session
        self._owns_session = session is None
        self._answered = False
        self._closed = False

    def __repr__(self) -> str:
        return f"Peer({self.url!r})"

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Close the session if this Peer created it; a closed Peer makes no more calls."""
        self._closed = True
        session, self._session = self._session, None
        if self._owns_session and session is not None:
            await session.close()

    # -- node ---------------------------------------------------------------------------------

    async def health(self) -> Health:
        return self._decode(Health, await self._call("GET", "/healthz"))

    async def card(self) -> dict[str, Any]:
        """The node's agent card."""
        raw = await self._call("GET", "/.well-known/agent-card.json")
        return self._decode(dict[str, Any], raw)

    async def skill(self) -> str:
        """The node's Markdown guide to its own API."""
        return (await self._call("GET", "/api/v1/skill")).decode("utf-8")

    async def tools(self) -> builtins.list[dict[str, Any]]:
        """The tools the node's tasks can call, as OpenAI-style function schemas."""
        return self._decode(list[dict[str, Any]], await self._call("GET", "/api/v1/tools"))

    # -- terminal -----------------------------------------------------------------------------

    async def exec(
        self,
        command: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 120.0,
        stdin: str | None = None,
    ) -> ExecResult:
        """Run a command on the node and wait for it to exit."""
        request = ExecRequest(command=command, cwd=cwd, env=dict(env) if env else None,
                              timeout_s=timeout_s, stdin=stdin)
        raw = await self._call(
            "POST", "/api/v1/terminal/exec", json_body=request, read_extra_s=timeout_s
        )
        return self._decode(ExecResult, raw)

    async def exec_stream(
        self,
        command: str,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 120.0,
        stdin: str | None = None,
    ) -> AsyncIterator[ExecOutput | ExecResult]:
        """Run a command, yielding its output as it comes and, last, its ExecResult."""
        request = ExecRequest(command=command, cwd=cwd, env=dict(env) if env else None,
                              timeout_s=timeout_s, stdin=stdin)
        ws = await self._websocket("/api/v1/terminal/ws", idempotent=False)
        refusal: str | None = None
        try:
            await ws.send_str(request.model_dump_json(exclude_none=True))
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    break
                frame = self._decode(dict[str, Any], message.data)
                kind = frame.get("type")
                if kind in ("stdout", "stderr"):
                    yield ExecOutput(stream=kind, data=str(frame.get("data", "")))
                elif kind == "exit":
                    yield self._decode(ExecResult, message.data)
                    return
                elif kind == "error":
                    refusal = message.data
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._lost(exc) from exc
        finally:
            await ws.close()

        # A refusal comes as an error message, then a close coded 4000 + the HTTP status.
        code = ws.close_code or 0
        if refusal is not None:
            status = code - CLOSE_CODE_BASE if 400 <= code - CLOSE_CODE_BASE < 600 else 400
            raise self._refusal(status, "", refusal.encode())
        if code == aiohttp.WSCloseCode.INTERNAL_ERROR:
            raise PeerRequestError("the node failed to run the command", url=self.url,
                                   status=500, code="internal")
        raise PeerGone(f"the terminal stream closed before the command exited (code {code})",
                       url=self.url)

    # -- files --------------------------------------------------------------------------------

    async def read_bytes(self, path: str) -> bytes:
        return await self._call("GET", f"/api/v1/files/{_quote(path)}")

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read_bytes(path)).decode(encoding)

    async def iter_file(self, path: str, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """A file's content in chunks as it arrives, never held whole in memory."""
        async with self._stream("GET", f"/api/v1/files/{_quote(path)}") as response:
            async for chunk in response.content.iter_chunked(chunk_size):
                yield chunk

    async def download(self, path: str, local_path: str | Path) -> Path:
        """Copy a node file to a local one, streamed; the local file appears only when whole."""
        target = Path(local_path)
        partial = target.with_name(target.name + ".part")
        try:
            with partial.open("wb") as out:
                async with contextlib.aclosing(self.iter_file(path)) as chunks:
                    async for chunk in chunks:
                        await asyncio.to_thread(out.write, chunk)
            partial.replace(target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return target

    async def write(
        self,
        path: str,
        data: bytes | bytearray | memoryview | str | AsyncIterable[bytes],
        *,
        mode: int | None = None,
    ) -> FileInfo:
        """Write a node file (atomically) from memory or from an async stream of chunks.

        `mode` sets the file's permission bits, such as 0o755.
        """
        body: Body
        if isinstance(data, str):
            body = data.encode()
        elif isinstance(data, (bytearray, memoryview)):
            body = bytes(data)
        else:
            body = data
        raw = await self._call(
            "PUT", f"/api/v1/files/{_quote(path)}", body=body, params=_mode_query(mode)
        )
        return self._decode(FileInfo, raw)

    async def upload(
        self, local_path: str | Path, path: str, *, mode: int | None = None
    ) -> FileInfo:
        """Write a node file from a local one, streamed from disk."""
        raw = await self._call(
            "PUT", f"/api/v1/files/{_quote(path)}", body=Path(local_path),
            params=_mode_query(mode),
        )
        return self._decode(FileInfo, raw)

    async def list(self, path: str = "", recursive: bool = False) -> FileListing:
        """What a node folder holds; `truncated` says the node stopped at its entry cap."""
        params = {"recursive": "1"} if recursive else None
        raw = await self._call("GET", f"/api/v1/files/{_quote(path)}", params=params)
        return self._decode(FileListing, raw)

    async def stat(self, path: str) -> FileInfo:
        raw = await self._call("GET", f"/api/v1/stat/{_quote(path)}")
        return self._decode(FileInfo, raw)

    async def mkdir(self, path: str) -> FileInfo:
        """Create a node folder and its parents."""
        raw = await self._call("POST", f"/api/v1/mkdir/{_quote(path)}")
        return self._decode(FileInfo, raw)

    async def move(self, src: str, dst: str, overwrite: bool = False) -> FileInfo:
        request = MoveRequest(src=src, dst=dst, overwrite=overwrite)
        raw = await self._call("POST", "/api/v1/move", json_body=request)
        return self._decode(FileInfo, raw)

    async def delete(self, path: str, recursive: bool = False) -> None:
        params = {"recursive": "1"} if recursive else None
        await self._call("DELETE", f"/api/v1/files/{_quote(path)}", params=params)

    # -- daemons ------------------------------------------------------------------------------

    async def start_daemon(self, spec: DaemonSpec | Mapping[str, Any]) -> DaemonInfo:
        """Start a supervised background process on the node."""
        spec = spec if isinstance(spec, DaemonSpec) else DaemonSpec.model_validate(spec)
        raw = await self._call("POST", "/api/v1/daemons", json_body=spec)
        return self._decode(DaemonInfo, raw)

    async def daemons(self) -> builtins.list[DaemonInfo]:
        raw = await self._call("GET", "/api/v1/daemons")
        return self._decode(list[DaemonInfo], raw)

    async def daemon(self, name: str) -> DaemonInfo:
        raw = await self._call("GET", f"/api/v1/daemons/{_quote(name)}")
        return self._decode(DaemonInfo, raw)

    async def daemon_logs(self, name: str, tail: int = 100) -> str:
        """The last `tail` lines a daemon wrote."""
        raw = await self._call(
            "GET", f"/api/v1/daemons/{_quote(name)}/logs", params={"tail": str(tail)}
        )
        return raw.decode("utf-8", errors="replace")

    async def follow_daemon_logs(self, name: str, tail: int = 0) -> AsyncIterator[str]:
        """A daemon's log as it grows, from its last `tail` lines, until the daemon stops."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        params = {"tail": str(tail), "follow": "1"}
        path = f"/api/v1/daemons/{_quote(name)}/logs"
        # A quiet daemon is no failure: the stream may stay silent for as long as it likes.
        async with self._stream("GET", path, params=params, read_extra_s=math.inf) as response:
            async for chunk in response.content.iter_any():
                if text := decoder.decode(chunk):
                    yield text
        if text := decoder.decode(b"", final=True):
            yield text

    async def stop_daemon(self, name: str) -> DaemonInfo:
        raw = await self._call("POST", f"/api/v1/daemons/{_quote(name)}/stop")
        return self._decode(DaemonInfo, raw)

    async def restart_daemon(self, name: str) -> DaemonInfo:
        raw = await self._call("POST", f"/api/v1/daemons/{_quote(name)}/restart")
        return self._decode(DaemonInfo, raw)

    async def forget_daemon(self, name: str) -> DaemonInfo:
        """Stop a daemon and drop it from the node, its log included."""
        raw = await self._call("DELETE", f"/api/v1/daemons/{_quote(name)}")
        return self._decode(DaemonInfo, raw)

    # -- snapshots ----------------------------------------------------------------------------

    async def snapshot(self, alias: str | None = None) -> SnapshotInfo:
        """Capture the node's workspace."""
        raw = await self._call(
            "POST", "/api/v1/snapshots", json_body=SnapshotCreate(alias=alias)
        )
        return self._decode(SnapshotInfo, raw)

    async def snapshots(self) -> builtins.list[SnapshotInfo]:
        """The node's snapshots, oldest first."""
        raw = await self._call("GET", "/api/v1/snapshots")
        return self._decode(list[SnapshotInfo], raw)

    async def snapshot_info(self, snapshot_id: str) -> SnapshotInfo:
        """One snapshot, by id or alias."""
        raw = await self._call("GET", f"/api/v1/snapshots/{_quote(snapshot_id)}")
        return self._decode(SnapshotInfo, raw)

    async def restore(self, snapshot_id: str) -> SnapshotInfo:
        """Put the workspace back exactly as the snapshot (id or alias) holds it."""
        raw = await self._call("POST", f"/api/v1/snapshots/{_quote(snapshot_id)}/restore")
        return self._decode(SnapshotInfo, raw)

    async def delete_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        """Forget a snapshot (id or alias); what it was comes back."""
        raw = await self._call("DELETE", f"/api/v1/snapshots/{_quote(snapshot_id)}")
        return self._decode(SnapshotInfo, raw)

    # -- tasks --------------------------------------------------------------------------------

    async def submit(
        self,
        description: str = "",
        mode: Mode | str = Mode.CODE,
        steps: builtins.list[Step] | builtins.list[dict[str, Any]] | None = None,
        tags: builtins.list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **options: Any,
    ) -> TaskHandle:
        """Start a task on the node; `options` are TaskCreate's (model, timeout_s, ...)."""
        request = TaskCreate.model_validate({
            "description": description, "mode": mode, "steps": steps, "tags": tags or [],
            "metadata": metadata or {}, **options,
        })
        raw = await self._call("POST", "/api/v1/agent/tasks", json_body=request)
        accepted: _Accepted = self._decode(_Accepted, raw)
        self.log.info("peer.task_submitted", url=self.url, task_id=accepted.id)
        return TaskHandle(self, accepted.id)

    async def tasks(
        self, status: TaskStatus | str | None = None, limit: int = 100
    ) -> builtins.list[Task]:
        """The node's tasks, newest first, optionally only those in one status."""
        params = {"limit": str(limit)}
        if status is not None:
            params["status"] = TaskStatus(status).value
        raw = await self._call("GET", "/api/v1/agent/tasks", params=params)
        return self._decode(list[Task], raw)

    def task_handle(self, task_id: str) -> TaskHandle:
        """A handle on a task already on the node."""
        return TaskHandle(self, task_id)

    def events(self, *, after: int | None = None) -> AsyncIterator[Event]:
        """Every event of the node after seq `after` (by default, from now on), endlessly.

        Dropped streams are resumed as TaskHandle.events resumes them.
        """
        return self._events(None, after)

    async def task(self, task_id: str) -> Task:
        raw = await self._call("GET", f"/api/v1/agent/tasks/{_quote(task_id)}", task_id=task_id)
        return self._decode(Task, raw, task_id=task_id)

    # -- plumbing -----------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout())
        return self._session

    def _timeout(self, read_extra_s: float = 0.0) -> aiohttp.ClientTimeout:
        # No limit on the whole: a download or a stream may rightly last long. What must not
        # last is a connect, or a silence between two reads (unless silence is expected:
        # read_extra_s=inf).
        read_s = self.timeout + read_extra_s
        return aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=None if math.isinf(read_s) else read_s
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: BaseModel | None = None,
        body: Body = None,
        headers: Mapping[str, str] | None = None,
        task_id: str | None = None,
        read_extra_s: float = 0.0,
    ) -> bytes:
        """The body of the node's answer to one call, tried again as the policy allows."""
        if json_body is not None:
            body = json_body.model_dump_json(exclude_none=True).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        replayable = not isinstance(body, AsyncIterable)

        async def attempt() -> bytes:
            with _opened(body) as data:
                response = await self._send(
                    method, path, params=params, data=data, headers=headers, task_id=task_id,
                    read_extra_s=read_extra_s,
                )
                try:
                    return await response.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise self._lost(exc, task_id) from exc
                finally:
                    response.release()

        idempotent = method in IDEMPOTENT_METHODS and replayable
        return await self.retry.run(attempt, idempotent=idempotent, logger=self.log)

    @contextlib.asynccontextmanager
    async def _stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        task_id: str | None = None,
        read_extra_s: float = 0.0,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An answer whose body the caller reads as it arrives; only opening it is retried."""

        async def attempt() -> aiohttp.ClientResponse:
            return await self._send(
                method, path, params=params, task_id=task_id, read_extra_s=read_extra_s
            )

        response = await self.retry.run(
            attempt, idempotent=method in IDEMPOTENT_METHODS, logger=self.log
        )
        try:
            yield response
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._lost(exc, task_id) from exc
        finally:
            response.release()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        task_id: str | None = None,
        read_extra_s: float = 0.0,
    ) -> aiohttp.ClientResponse:
        """One request; an answer with an error status raises, translated."""
        started = time.perf_counter()
        try:
            response = await self._client().request(
                method, URL(self.url + path, encoded=True), params=params, data=data,
                headers={**self._headers, **(headers or {})}, timeout=self._timeout(read_extra_s),
            )
        except aiohttp.ClientResponseError as exc:
            # Only from a session the caller passed in with raise_for_status set.
            raise self._refusal(exc.status, exc.message, b"", task_id) from exc
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._lost(exc, task_id) from exc
        self._answered = True
        self.log.debug("peer.request", url=self.url, method=method, path=path,
                       status=response.status,
                       ms=round((time.perf_counter() - started) * 1000, 1))
        if response.status < 400:
            return response
        try:
            raw = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            raw = b""
        finally:
            response.release()
        raise self._refusal(response.status, response.reason or "", raw, task_id)

    async def _websocket(
        self,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        idempotent: bool,
        task_id: str | None = None,
    ) -> aiohttp.ClientWebSocketResponse:
        """An open WebSocket; the handshake is retried only when `idempotent`."""

        async def attempt() -> aiohttp.ClientWebSocketResponse:
            try:
                ws = await self._client().ws_connect(
                    URL(self.url + path, encoded=True), params=params, headers=self._headers,
                    heartbeat=max(self.timeout / 2, 1.0), max_msg_size=MAX_WS_MESSAGE,
                )
            except aiohttp.ClientResponseError as exc:
                # aiohttp drops the body of a refused handshake. The node checks a stream's
                # query (task id, after) before upgrading, so the same GET without the
                # upgrade gets the same refusal with its message, which _send raises.
                self._answered = True
                if 400 <= exc.status < 500:
                    plain = await self._send("GET", path, params=params, task_id=task_id)
                    plain.release()
                reason = f"WebSocket handshake refused ({exc.message})"
                raise self._refusal(exc.status, reason, b"", task_id) from exc
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise self._lost(exc, task_id) from exc
            self._answered = True
            self.log.debug("peer.websocket", url=self.url, path=path, task_id=task_id)
            return ws

        return await self.retry.run(attempt, idempotent=idempotent, logger=self.log)

    async def _events(self, task_id: str | None, after: int | None) -> AsyncIterator[Event]:
        """Events after seq `after`, each once, resuming across dropped streams.

        With a task id the stream ends after that task's final event; without one it goes on
        with every event of the node, and `after=None` starts at the live end.
        """
        last = after
        barren_closes = 0
        reconnecting = False
        while True:
            ws = await self._event_socket(task_id, last, reconnecting=reconnecting)
            delivered = False
            try:
                async for message in ws:
                    if message.type is not aiohttp.WSMsgType.TEXT:
                        break
                    event: Event = self._decode(Event, message.data, task_id=task_id)
                    # A replay after a reconnect may overlap what was already yielded.
                    if last is not None and event.seq <= last:
                        continue
                    last, delivered = event.seq, True
                    yield event
                    if task_id is not None and event.type in FINAL_EVENT_TYPES:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.log.debug("peer.events_dropped", url=self.url, task_id=task_id,
                               error=_describe(exc))
            finally:
                await ws.close()

            # A node that keeps closing the stream without sending anything is not coming
            # back; after a slow-subscriber close there is always more to replay, so it
            # counts as progress.
            slow = ws.close_code == CLOSE_SLOW_SUBSCRIBER
            barren_closes = 0 if delivered or slow else barren_closes + 1
            if barren_closes >= self.retry.attempts:
                raise PeerGone(
                    f"the event stream keeps closing (code {ws.close_code})",
                    url=self.url, task_id=task_id,
                )
            self.log.info("peer.events_resuming", url=self.url, task_id=task_id, after=last,
                          close_code=ws.close_code)
            reconnecting = True

    async def _event_socket(
        self, task_id: str | None, after: int | None, *, reconnecting: bool
    ) -> aiohttp.ClientWebSocketResponse:
        params: dict[str, str] = {}
        if task_id is not None:
            params["task_id"] = task_id
        # TODO: a live-only stream that drops before its first event resumes live, missing
        # what happened in between; the node has no "current seq" query to start from.
        if after is not None:
            params["after"] = str(after)
        try:
            return await self._websocket(
                "/api/v1/agent/ws", params=params, idempotent=True, task_id=task_id
            )
        except (PeerUnreachable, PeerRequestError) as exc:
            if not reconnecting:
                raise
            raise PeerGone(
                f"the event stream dropped and could not be resumed: {exc.reason}",
                url=self.url, task_id=task_id,
            ) from exc

    def _lost(self, exc: BaseException, task_id: str | None = None) -> PeerError:
        """A transport failure: PeerGone once the node has answered this client before."""
        if self._answered:
            return PeerGone(f"the node stopped answering: {_describe(exc)}",
                            url=self.url, task_id=task_id)
        return PeerUnreachable(f"cannot reach the node: {_describe(exc)}",
                               url=self.url, task_id=task_id)

    def _refusal(
        self, status: int, reason: str, raw: bytes, task_id: str | None = None
    ) -> PeerError:
        """An error answer as the error it means, with the node's code and message if given."""
        try:
            error = _ErrorBody.model_validate_json(raw).error
            code, message, details = error.code, error.message, error.details
        except ValidationError:
            code, message, details = f"http_{status}", reason or f"HTTP {status}", {}
        if status == 401 or (status == 403 and code != Forbidden.code):
            return PeerAuthError(message, url=self.url, task_id=task_id)
        return PeerRequestError(message, url=self.url, status=status, code=code,
                                details=details, task_id=task_id)

    def _decode(self, kind: Any, raw: bytes | str, *, task_id: str | None = None) -> Any:
        """Parse an answer; one that does not fit the wire model is the node's fault."""
        try:
            return _adapter(kind).validate_json(raw)
        except ValidationError as exc:
            raise PeerError(
                f"unexpected answer from the node: {exc.error_count()} problem(s), "
                f"first: {exc.errors()[0]['msg']}",
                url=self.url, task_id=task_id,
            ) from exc


class TaskHandle:
    """A task on a node: follow its events, wait for its end, steer it."""

    def __init__(self, peer: Peer, id: str) -> None:
        self.peer = peer
        self.id = id

    def __repr__(self) -> str:
        return f"TaskHandle({self.peer.url!r}, {self.id!r})"

    async def get(self) -> Task:
        return await self.peer.task(self.id)

    async def cancel(self) -> None:
        """Ask the node to cancel the task; it ends as cancelled soon after."""
        await self.peer._call("POST", f"/api/v1/agent/tasks/{_quote(self.id)}/cancel",
                              task_id=self.id)

    async def set_mode(self, mode: Mode | str) -> Task:
        raw = await self.peer._call(
            "PATCH", f"/api/v1/agent/tasks/{_quote(self.id)}/mode",
            json_body=ModeChange(mode=Mode(mode)), task_id=self.id,
        )
        return self.peer._decode(Task, raw, task_id=self.id)

    async def send_message(self, text: str) -> None:
        """Add a user message to the task's conversation."""
        await self.peer._call(
            "POST", f"/api/v1/agent/tasks/{_quote(self.id)}/messages",
            json_body=MessageRequest(content=text), task_id=self.id,
        )

    def events(self, *, after: int = 0) -> AsyncIterator[Event]:
        """The task's events after seq `after` (all of them by default), ending with its final one.

        A dropped stream, or a node closing it because we read too slowly, is resumed from the
        last event yielded, so none is lost or repeated; one that cannot be resumed raises
        PeerGone.
        """
        return self.peer._events(self.id, after)

    async def result(self, timeout: float | None = None) -> Task:
        """Wait for the task to end and return it; raise TaskFailed unless it completed."""
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                task = await self._wait()
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise TimeoutError(
                f"task {self.id} on {self.peer.url} did not end within {timeout} s"
            ) from exc
        if task.status is not TaskStatus.COMPLETED:
            raise TaskFailed(
                task.error or f"the task ended {task.status.value}",
                url=self.peer.url, task_id=self.id, status=task.status.value,
            )
        return task

    async def _wait(self) -> Task:
        """The task once it has ended: followed by its events, else by asking."""
        try:
            async with contextlib.aclosing(self.events()) as events:
                async for _ in events:
                    pass
        except PeerRequestError as exc:
            # The event stream was refused (a proxy without WebSocket, say): ask instead.
            self.peer.log.info("peer.events_unavailable", url=self.peer.url,
                               task_id=self.id, status=exc.status)
        delay = self.peer.retry.first_wait_s
        task = await self.get()
        while task.status not in TERMINAL_STATUSES:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.peer.retry.max_wait_s)
            task = await self.get()
        return task


def _mode_query(mode: int | None) -> dict[str, str] | None:
    return {"mode": f"{mode:04o}"} if mode is not None else None
