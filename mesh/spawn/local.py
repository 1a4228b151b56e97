"""LocalSpawner: nodes as local processes on free loopback ports, no Docker needed.

Every node gets its own folder under the spawner's root (workspace, state, node.log) and runs
in a session of its own, so a Ctrl+C in the terminal reaches only the spawner, which then stops
its nodes itself. Nodes are forked from a fork server that imported the node once (see
forkserver.py): a fork serves within milliseconds where a fresh interpreter needs most of a
second of CPU for its imports.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from ..errors import SpawnError
from ..models import NodeInfo, NodeSpec, NodeState
from . import registry
from .base import (
    DEFAULT_LEASE_S,
    LeaseKeeper,
    Spawner,
    check_mesh_name,
    inherited_env,
    new_mesh_name,
    new_suffix,
    new_token,
    node_env,
    wait_healthy,
)

__all__ = ["LocalSpawner"]

log = structlog.get_logger("mesh.spawn")

STOP_GRACE_S = 5.0
FORKSERVER_START_S = 60.0
MAX_MESSAGE = 1024 * 1024
LOG_TAIL_BYTES = 256 * 1024


@dataclasses.dataclass
class _Child:
    """One forked node as the fork server reports it."""

    id: str
    spawned: asyncio.Future[int]
    ready: asyncio.Future[str]
    exited: asyncio.Future[int]


class _ForkServer:
    """The spawner's end of the fork server: requests go out, reports come back."""

    def __init__(self, python: str, mesh: str, log_file: Path) -> None:
        self.python = python
        self.mesh = mesh
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.record: registry.ProcessRecord | None = None
        self.children: dict[str, _Child] = {}
        self._sock: socket.socket | None = None
        self._hello: asyncio.Future[int] | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = inherited_env()
        env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        # The server must import this very copy of the package, installed or not.
        source_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = ":".join(p for p in (source_root, env.get("PYTHONPATH")) if p)
        with self.log_file.open("ab") as log_out, theirs:
            self.proc = subprocess.Popen(
                [self.python, "-m", "mesh.spawn.forkserver", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log_out,
                stderr=log_out, env=env, start_new_session=True,
            )
        ours.setblocking(False)
        self._sock = ours
        self._hello = loop.create_future()
        self._reader = asyncio.create_task(self._read(), name="forkserver-reader")
        try:
            await asyncio.wait_for(asyncio.shield(self._hello), FORKSERVER_START_S)
        except (TimeoutError, EOFError) as exc:
            await self.close()
            raise SpawnError(
                f"the fork server did not start: {_tail(self.log_file, 20) or exc}"
            ) from exc
        start_time = registry.process_start_time(self.proc.pid) or 0
        self.record = registry.ProcessRecord(
            id=f"forkserver-{self.proc.pid}", kind="forkserver", mesh=self.mesh,
            pid=self.proc.pid, start_time=start_time, log_file=str(self.log_file),
        )
        registry.register(self.record)

    async def spawn(self, node_id: str, env: dict[str, str], cwd: Path, log_file: Path) -> _Child:
        assert self._sock is not None
        if not self.alive:
            raise SpawnError("the fork server has exited; no node can be forked")
        loop = asyncio.get_running_loop()
        child = _Child(node_id, loop.create_future(), loop.create_future(), loop.create_future())
        self.children[node_id] = child
        request = {"op": "spawn", "id": node_id, "env": env, "cwd": str(cwd),
                   "log": str(log_file)}
        await loop.sock_sendall(self._sock, json.dumps(request).encode())
        try:
            await asyncio.shield(child.spawned)
        except asyncio.CancelledError:
            # The fork happens all the same: stop the orphan once it is up and can be told.
            child.ready.add_done_callback(lambda _: _stop_forked(child))
            raise
        return child

    async def close(self) -> None:
        """Close our end: the server stops its remaining children and exits."""
        if self._sock is not None:
            self._sock.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.proc is not None:
            try:
                await asyncio.to_thread(self.proc.wait, STOP_GRACE_S + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        if self.record is not None:
            registry.unregister(self.mesh, self.record.id)

    async def _read(self) -> None:
        assert self._sock is not None and self._hello is not None
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(self._sock, MAX_MESSAGE):
                self._dispatch(json.loads(data))
        except OSError as exc:
            log.debug("forkserver.read_failed", error=str(exc))
        finally:
            gone = EOFError("the fork server exited")
            if not self._hello.done():
                self._hello.set_exception(gone)
                # Marked as seen: a start() that was cancelled (Ctrl+C) no longer awaits it,
                # and asyncio would report it as "never retrieved"; an awaiter still gets it.
                self._hello.exception()
            for child in self.children.values():
                if not child.spawned.done():
                    child.spawned.set_exception(SpawnError(str(gone)))
                    child.spawned.exception()

    def _dispatch(self, message: dict[str, Any]) -> None:
        assert self._hello is not None
        op = message["op"]
        if op == "hello":
            self._hello.set_result(message["pid"])
            return
        child = self.children.get(message["id"])
        if child is None:
            return
        if op == "spawned":
            child.spawned.set_result(message["pid"])
        elif op == "spawn_failed":
            child.spawned.set_exception(SpawnError(f"fork failed: {message['error']}"))
        elif op == "ready" and not child.ready.done():
            child.ready.set_result(message["url"])
        elif op == "exited":
            child.exited.set_result(message["code"])
            self.children.pop(child.id, None)


@dataclasses.dataclass
class _Node:
    info: NodeInfo
    folder: Path
    log_file: Path
    child: _Child
    record: registry.ProcessRecord
    stopped: bool = False


class LocalSpawner(Spawner):
    """Nodes as local processes, forked from a fork server that imported the node once."""

    backend = "local"

    def __init__(
        self,
        mesh_name: str | None = None,
        root_dir: str | Path | None = None,
        python: str = sys.executable,
        *,
        parent_url: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        ready_timeout_s: float = 30.0,
    ) -> None:
        self.mesh = check_mesh_name(mesh_name or new_mesh_name())
        self.python = python
        self.parent_url = parent_url
        self.lease_s = lease_s
        self.ready_timeout_s = ready_timeout_s
        self._own_root = root_dir is None
        self.root = Path(root_dir) if root_dir is not None else None
        self._nodes: dict[str, _Node] = {}
        self._server: _ForkServer | None = None
        self._server_lock = asyncio.Lock()
        self._leases = LeaseKeeper()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def start(self) -> None:
        """Start the fork server now rather than on the first spawn."""
        await self._fork_server()

    async def spawn(self, spec: NodeSpec, *, parent: str | None = None) -> NodeInfo:
        if self._closed:
            raise SpawnError("this spawner is closed")
        started = time.monotonic()
        server = await self._fork_server()
        name = spec.name or "node"
        try:
            node_id, folder = await asyncio.to_thread(self._make_folder, name,
                                                      spec.workspace_from)
            workspace = _workspace(folder, spec.workspace_mount)
        except (SpawnError, OSError) as exc:
            log.warning("peer.spawn_failed", node=name, backend=self.backend, error=str(exc))
            raise SpawnError(f"cannot prepare a folder for {name}: {exc}") from exc
        token = new_token()
        lease_s = spec.lease_s or self.lease_s
        env = inherited_env()
        env.update(LITELLM_LOCAL_MODEL_COST_MAP="True")
        env.update(node_env(
            spec, name=name, mesh=self.mesh, token=token, lease_s=lease_s,
            parent_url=self.parent_url, MESH_HOST="127.0.0.1", MESH_PORT="0",
            # A process node spawns processes too, even on a host that is itself a container.
            MESH_SPAWN_BACKEND="local",
            MESH_WORKSPACE=str(workspace), MESH_STATE_DIR=str(folder / "state"),
        ))
        log_file = folder / "node.log"
        child = await server.spawn(node_id, env, workspace, log_file)
        pid = child.spawned.result()

        info = NodeInfo(
            id=node_id, name=name, url="", backend="local", mesh=self.mesh, parent=parent,
            state=NodeState.STARTING, spawned_at=time.time(), token=token,
        )
        record = registry.ProcessRecord(
            id=node_id, kind="node", mesh=self.mesh, pid=pid,
            start_time=registry.process_start_time(pid) or 0, name=name, parent=parent,
            spawned_at=info.spawned_at, log_file=str(log_file),
        )
        node = self._nodes[node_id] = _Node(info, folder, log_file, child, record)
        registry.register(record)
        try:
            await self._wait_ready(node, started + self.ready_timeout_s)
        except asyncio.CancelledError:
            # A caller that gave up (a cancelled fan-out) must not leave a node behind.
            await asyncio.shield(self.stop(node_id))
            raise
        except (SpawnError, TimeoutError) as exc:
            await self.stop(node_id)
            reason = str(exc) if isinstance(exc, SpawnError) else (
                f"node {node_id} did not become ready within {self.ready_timeout_s:g} s: "
                f"{_tail(log_file, 20) or 'no output'}"
            )
            log.warning("peer.spawn_failed", node_id=node_id, backend=self.backend,
                        error=reason)
            raise SpawnError(reason) from exc

        self._leases.hold(node_id, node.info.url, token, lease_s)
        log.info("peer.spawned", node=name, node_id=node_id, url=node.info.url, pid=pid,
                 backend=self.backend, ms=round((time.monotonic() - started) * 1000))
        return node.info.model_copy()

    async def stop(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is None:
            await self._stop_recorded(node_id)
            return
        if node.stopped:
            return
        node.stopped = True
        self._leases.release(node_id)
        if not await _ended(node, 0):
            registry.signal_group(node.record.pid, signal.SIGTERM)
            if not await _ended(node, STOP_GRACE_S):
                registry.signal_group(node.record.pid, signal.SIGKILL)
                await _ended(node, STOP_GRACE_S)
        registry.unregister(self.mesh, node_id)
        log.info("peer.stopped", node_id=node_id, backend=self.backend)

    async def list(self) -> builtins.list[NodeInfo]:
        nodes = [await self.status(node_id) for node_id, node in self._nodes.items()
                 if not node.stopped]
        for record in registry.read_records(self.mesh):
            if record.kind == "node" and record.id not in self._nodes and registry.is_alive(
                record
            ):
                nodes.append(_from_record(record, NodeState.RUNNING))
        return nodes

    async def status(self, node_id: str) -> NodeInfo:
        node = self._nodes.get(node_id)
        if node is None:
            for record in registry.read_records(self.mesh):
                if record.id == node_id:
                    alive = registry.is_alive(record)
                    return _from_record(record, NodeState.RUNNING if alive else NodeState.EXITED)
            return NodeInfo(id=node_id, name=node_id, url="", backend="local", mesh=self.mesh,
                            state=NodeState.REMOVED, spawned_at=0.0)
        info = node.info.model_copy()
        if node.stopped:
            info.state = NodeState.REMOVED
        elif node.child.exited.done():
            info.exit_code = node.child.exited.result()
            info.state = NodeState.EXITED if info.exit_code == 0 else NodeState.CRASHED
        elif not registry.is_alive(node.record):
            # The fork server went away before it could tell us how the node ended.
            info.state = NodeState.EXITED
        return info

    async def logs(self, node_id: str, tail: int = 200) -> str:
        node = self._nodes.get(node_id)
        if node is not None:
            return await asyncio.to_thread(_tail, node.log_file, tail)
        for record in registry.read_records(self.mesh):
            if record.id == node_id and record.log_file:
                return await asyncio.to_thread(_tail, Path(record.log_file), tail)
        return ""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(self.stop(node_id) for node_id in builtins.list(self._nodes)))
        await self._leases.close()
        if self._server is not None:
            await self._server.close()
        if self._session is not None:
            await self._session.close()
        if self._own_root and self.root is not None:
            await asyncio.to_thread(shutil.rmtree, self.root, True)

    async def _fork_server(self) -> _ForkServer:
        async with self._server_lock:
            if self._server is None or not self._server.alive:
                root = self._root()
                self._server = _ForkServer(self.python, self.mesh, root / "forkserver.log")
                await self._server.start()
            return self._server

    def _root(self) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix=f"peermesh-{self.mesh}-"))
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def _make_folder(self, name: str, workspace_from: str | None) -> tuple[str, Path]:
        """A fresh folder for a new node; its name is the node's id, unique in the root."""
        root = self._root()
        while True:
            node_id = f"{name}-{new_suffix()}"
            folder = root / node_id
            try:
                folder.mkdir()
                break
            except FileExistsError:
                continue
        if workspace_from is None:
            (folder / "workspace").mkdir()
            return node_id, folder
        source = Path(workspace_from).expanduser()
        if not source.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            raise SpawnError(f"workspace_from {workspace_from} is not a folder")
        shutil.copytree(source, folder / "workspace", symlinks=True)
        return node_id, folder

    async def _wait_ready(self, node: _Node, deadline: float) -> None:
        """The ready report first, then one healthy answer; a node that exits fails at once."""
        child = node.child
        reports: set[asyncio.Future[Any]] = {child.ready, child.exited}
        done, _ = await asyncio.wait(
            reports, timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not done:
            raise TimeoutError("no ready report")

        async def why_dead() -> str | None:
            if not child.exited.done():
                return None
            tail = await asyncio.to_thread(_tail, node.log_file, 20)
            return (f"node {node.info.id} exited with code {child.exited.result()} before "
                    f"ready: {tail or 'no output'}")

        if child.exited.done():
            raise SpawnError(await why_dead() or "")
        node.info.url = child.ready.result()
        node.info.state = NodeState.RUNNING
        node.record.url = node.info.url
        registry.register(node.record)
        self._session = self._session or aiohttp.ClientSession()
        await wait_healthy(self._session, node.info.url, deadline, why_dead)

    async def _stop_recorded(self, node_id: str) -> None:
        """Stop a node of this mesh that another process started, found in the registry."""
        for record in registry.read_records(self.mesh):
            if record.id == node_id and record.kind == "node":
                if await asyncio.to_thread(registry.terminate, record, STOP_GRACE_S):
                    log.info("peer.stopped", node_id=node_id, backend=self.backend)
                registry.unregister(self.mesh, node_id)


def _workspace(folder: Path, mount: str | None) -> Path:
    """The node's workspace: its own folder's, or a host folder it works in directly."""
    if mount is None:
        return folder / "workspace"
    path = Path(mount).expanduser().resolve()
    if not path.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        raise SpawnError(f"workspace_mount {mount} is not a folder")
    return path


def _stop_forked(child: _Child) -> None:
    """Stop a node whose spawn was cancelled before its pid came back."""
    spawned = child.spawned
    if child.exited.done() or not spawned.done() or spawned.exception() is not None:
        return
    registry.signal_group(spawned.result(), signal.SIGTERM)


async def _ended(node: _Node, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the node's process to end; True once it has."""
    deadline = time.monotonic() + timeout
    # The fork server's report is the quick way to know; the process table is the sure one.
    while not node.child.exited.done() and registry.is_alive(node.record):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _from_record(record: registry.ProcessRecord, state: NodeState) -> NodeInfo:
    return NodeInfo(id=record.id, name=record.name, url=record.url, backend="local",
                    mesh=record.mesh, parent=record.parent, state=state,
                    spawned_at=record.spawned_at)


def _tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log file, or "" if there is none."""
    try:
        with path.open("rb") as file:
            file.seek(0, 2)
            size = file.tell()
            file.seek(max(0, size - LOG_TAIL_BYTES))
            data = file.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""
