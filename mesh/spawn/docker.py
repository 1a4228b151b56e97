"""DockerSpawner: one container per node, from the node image, on the mesh's own network.

Peers reach a node by its container name on the network `peermesh-<mesh>`; the host reaches it
through port 8700 published on 127.0.0.1. Labels carry the mesh, node name, parent and spawn
time, so `reap` finds every container of a mesh whoever started it.

Containers run with auto-remove, so a node that exits, for instance because its parent died
and stopped renewing its lease, leaves nothing behind. What is then gone with the container
is kept on this side: one thread follows the mesh's container events (who was OOM-killed,
who died with which code), and one thread per container reads its output from the moment it
is created, so that a node dying during start-up is reported with its state, exit code and
last lines, never as a timeout.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import concurrent.futures
import dataclasses
import functools
import os
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import aiohttp
import docker
import docker.errors
import structlog
from docker.models.containers import Container
from docker.types.daemon import CancellableStream

from ..errors import SpawnError
from ..models import NodeInfo, NodeSpec, NodeState
from .base import (
    DEFAULT_LEASE_S,
    LeaseKeeper,
    Spawner,
    check_mesh_name,
    new_mesh_name,
    new_suffix,
    new_token,
    node_env,
    wait_healthy,
)

__all__ = [
    "DEFAULT_IMAGE",
    "LABEL_MESH",
    "DockerSpawner",
    "connect",
    "docker_socket_path",
    "remove_container",
]

log = structlog.get_logger("mesh.spawn")

T = TypeVar("T")

DEFAULT_IMAGE = "peermesh-node:latest"
NODE_PORT = 8700
LABEL_MESH = "peermesh.mesh"
LABEL_NODE = "peermesh.node"
LABEL_PARENT = "peermesh.parent"
LABEL_SPAWNED_AT = "peermesh.spawned_at"
# A spec label that says whether the child gets the Docker socket ("true" or "false").
LABEL_DOCKER_SOCKET = "peermesh.docker-socket"
SOCKET_IN_CONTAINER = "/var/run/docker.sock"
WORKSPACE_IN_CONTAINER = "/workspace"
NAME_ATTEMPTS = 8
STOP_GRACE_S = 5
REMOVE_WAIT_S = 20.0
OUTPUT_LINES = 1000
# How long a stopped container's die event may lag behind what the engine shows of it.
EXIT_EVENT_WAIT_S = 2.0
# A DNS label holds at most 63 characters, and peers resolve nodes by container name.
MAX_CONTAINER_NAME = 63


def docker_socket_path() -> str:
    return os.environ.get("MESH_DOCKER_SOCKET", SOCKET_IN_CONTAINER)


def connect(timeout: float | None = 60.0) -> docker.DockerClient:
    """A client of the Docker engine, or a SpawnError that says why there is none. Blocking."""
    host = os.environ.get("DOCKER_HOST")
    path = docker_socket_path()
    if not host and not os.path.exists(path):
        raise SpawnError(f"no Docker socket at {path}: this node cannot spawn containers")
    try:
        client = docker.DockerClient(
            base_url=host or f"unix://{path}", timeout=timeout, max_pool_size=64
        )
        client.ping()
    except docker.errors.DockerException as exc:
        raise SpawnError(f"the Docker engine at {host or path} does not answer: {exc}") from exc
    return client


def remove_container(container: Container, grace_s: float = STOP_GRACE_S) -> None:
    """Stop a container (SIGTERM, then SIGKILL after `grace_s`) and wait until it is gone."""
    try:
        container.stop(timeout=int(grace_s))
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:
        log.debug("container.stop_failed", container=container.name, error=str(exc))
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:
        # Auto-remove may already be at work: "removal ... is already in progress".
        log.debug("container.remove_failed", container=container.name, error=str(exc))
    deadline = time.monotonic() + REMOVE_WAIT_S
    while time.monotonic() < deadline:
        try:
            container.reload()
        except docker.errors.NotFound:
            return
        time.sleep(0.05)
    log.warning("container.not_removed", container=container.name)


@dataclasses.dataclass(frozen=True)
class _Exit:
    """How a container ended: its exit code, and who ended it."""

    code: int
    oom: bool = False
    # The engine killed it on someone's request (`docker rm -f`, `docker kill`, `docker stop`):
    # with auto-remove, that container is gone for good, so it counts as removed.
    killed: bool = False

    @property
    def state(self) -> NodeState:
        if self.oom:
            return NodeState.OOM_KILLED
        if self.killed:
            return NodeState.REMOVED
        return NodeState.EXITED if self.code == 0 else NodeState.CRASHED


class _ExitWatch:
    """Follows the mesh's container events from one thread: kills, OOM kills and exit codes."""

    def __init__(self, client: docker.DockerClient, mesh: str) -> None:
        self._exits: dict[str, _Exit] = {}
        self._oom: set[str] = set()
        self._killed: set[str] = set()
        self._changed = threading.Condition()
        # From a second ago, so that nothing between here and the first create is missed.
        self._stream = client.events(
            since=int(time.time()) - 1, decode=True,
            filters={"label": [f"{LABEL_MESH}={mesh}"], "type": ["container"],
                     "event": ["oom", "kill", "die"]},
        )
        self._thread = threading.Thread(target=self._run, name=f"peermesh-events-{mesh}",
                                        daemon=True)
        self._thread.start()

    def exit_of(self, container_id: str) -> _Exit | None:
        with self._changed:
            return self._exits.get(container_id)

    def wait_exit(self, container_id: str, timeout: float) -> _Exit | None:
        """How the container ended, waiting up to `timeout` s for its die event. Blocking."""
        with self._changed:
            self._changed.wait_for(lambda: container_id in self._exits, timeout)
            return self._exits.get(container_id)

    def close(self) -> None:
        _cut(self._stream)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            for event in self._stream:
                container_id = event.get("id") or event.get("Actor", {}).get("ID", "")
                action = event.get("Action")
                with self._changed:
                    if action == "oom":
                        self._oom.add(container_id)
                    elif action == "kill":
                        self._killed.add(container_id)
                    elif action == "die":
                        code = int(event["Actor"]["Attributes"].get("exitCode", -1))
                        self._exits[container_id] = _Exit(
                            code, container_id in self._oom, container_id in self._killed
                        )
                        self._changed.notify_all()
        except Exception as exc:  # the stream ends with an error when close() cuts it
            log.debug("docker.events_ended", error=str(exc))


class _Output:
    """A container's output from its creation on, read by a thread of its own."""

    def __init__(self, api: docker.APIClient, container_id: str) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self.ready = threading.Event()
        self.ended = threading.Event()
        self._stream = api.attach(container_id, stdout=True, stderr=True, stream=True,
                                  logs=True, demux=True)
        self._thread = threading.Thread(target=self._run, name=f"peermesh-output-{container_id}",
                                        daemon=True)
        self._thread.start()

    def tail(self, lines: int) -> str:
        return "\n".join(builtins.list(self.lines)[-lines:]) if lines > 0 else ""

    def close(self) -> None:
        """Cut the stream and close its socket; safe to call twice and from any thread."""
        _cut(self._stream)

    def _run(self) -> None:
        partial = [b"", b""]
        try:
            for frame in self._stream:
                for index, chunk in enumerate(frame):
                    if not chunk:
                        continue
                    *complete, partial[index] = (partial[index] + chunk).split(b"\n")
                    for line in complete:
                        self._line(index, line.decode("utf-8", errors="replace"))
        except Exception as exc:  # cut by close(), or the engine went away
            log.debug("docker.output_ended", error=str(exc))
        finally:
            for index, rest in enumerate(partial):
                if rest:
                    self._line(index, rest.decode("utf-8", errors="replace"))
            self.close()
            self.ended.set()

    def _line(self, stream: int, text: str) -> None:
        self.lines.append(text)
        # The node announces itself with one JSON line on stdout.
        if stream == 0 and '"node.ready"' in text:
            self.ready.set()


@dataclasses.dataclass
class _Node:
    info: NodeInfo
    container_id: str
    output: _Output
    memory: str | None
    stopped: bool = False


class DockerSpawner(Spawner):
    """Nodes as containers of the node image, through the Docker engine's API."""

    backend = "docker"

    def __init__(
        self,
        mesh_name: str | None = None,
        image: str = DEFAULT_IMAGE,
        network: str | None = None,
        *,
        parent_url: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        ready_timeout_s: float = 60.0,
        mount_socket: bool | None = None,
    ) -> None:
        self.mesh = check_mesh_name(mesh_name or new_mesh_name())
        self.image = image
        self.network = network or f"peermesh-{self.mesh}"
        self.parent_url = parent_url
        self.lease_s = lease_s
        self.ready_timeout_s = ready_timeout_s
        # Children get the socket by default when we have one, so that they can spawn too.
        if mount_socket is None:
            mount_socket = os.environ.get("MESH_SPAWN_DOCKER_SOCKET", "1") != "0"
        self.mount_socket = mount_socket
        self._client: docker.DockerClient | None = None
        self._streams: docker.DockerClient | None = None
        self._watch: _ExitWatch | None = None
        self._created_network = False
        self._connect_lock = asyncio.Lock()
        self._streams_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            32, thread_name_prefix="peermesh-docker"
        )
        self._nodes: dict[str, _Node] = {}
        self._leases = LeaseKeeper()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def spawn(self, spec: NodeSpec, *, parent: str | None = None) -> NodeInfo:
        if self._closed:
            raise SpawnError("this spawner is closed")
        started = time.monotonic()
        client = await self._connect()
        name = spec.name or "node"
        token = new_token()
        lease_s = spec.lease_s or self.lease_s
        container = await self._run(self._create, client, spec, name, token, lease_s, parent)
        assert container.name is not None and container.id is not None

        node_id = container.name
        try:
            if spec.workspace_from:
                await self._run(_seed_workspace, container, spec.workspace_from)
            output = await self._run(self._attach, container.id)
        except (SpawnError, docker.errors.DockerException) as exc:
            await self._run(remove_container, container, 0)
            log.warning("peer.spawn_failed", node_id=node_id, backend=self.backend,
                        error=str(exc))
            raise SpawnError(f"cannot prepare {node_id}: {exc}") from exc
        info = NodeInfo(
            id=node_id, name=name, url="", internal_url=_internal_url(node_id),
            backend="docker", mesh=self.mesh, parent=parent, state=NodeState.STARTING,
            spawned_at=time.time(), token=token,
        )
        node = self._nodes[node_id] = _Node(info, container.id, output, spec.memory)
        try:
            await self._run(container.start)
            await self._wait_ready(node, container, started + self.ready_timeout_s)
        except (SpawnError, TimeoutError, docker.errors.DockerException) as exc:
            reason = self._failure(node, exc)
            await self.stop(node_id)
            log.warning("peer.spawn_failed", node_id=node_id, backend=self.backend,
                        error=reason)
            raise SpawnError(reason) from exc

        self._leases.hold(node_id, node.info.url, token, lease_s)
        log.info("peer.spawned", node=name, node_id=node_id, url=node.info.url,
                 backend=self.backend, ms=round((time.monotonic() - started) * 1000))
        return node.info.model_copy()

    async def stop(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is not None:
            if node.stopped:
                return
            node.stopped = True
            self._leases.release(node_id)
        client = await self._connect()
        container = await self._run(_find, client, node_id, self.mesh)
        if container is not None:
            await self._run(remove_container, container)
            log.info("peer.stopped", node_id=node_id, backend=self.backend)
        if node is not None:
            node.output.close()

    async def list(self) -> builtins.list[NodeInfo]:
        client = await self._connect()
        containers = await self._run(
            client.containers.list, all=True, filters={"label": f"{LABEL_MESH}={self.mesh}"}
        )
        nodes = {c.name: self._describe(c) for c in containers}
        for node_id, node in self._nodes.items():
            if node_id not in nodes and not node.stopped:
                nodes[node_id] = await self.status(node_id)
        return builtins.list(nodes.values())

    async def status(self, node_id: str) -> NodeInfo:
        node = self._nodes.get(node_id)
        if node is not None and node.stopped:
            return node.info.model_copy(update={"state": NodeState.REMOVED})
        if node is not None and (exit_ := self._exit_seen(node)) is not None:
            return node.info.model_copy(update={"state": exit_.state, "exit_code": exit_.code})
        client = await self._connect()
        container = await self._run(_find, client, node_id, self.mesh)
        if node is None:
            if container is not None:
                return self._describe(container)
            return NodeInfo(id=node_id, name=node_id, url="", backend="docker",
                            mesh=self.mesh, state=NodeState.REMOVED, spawned_at=0.0)
        if container is not None and container.status in ("created", "running", "paused"):
            return self._describe(container)
        # Ours, and no longer running: its die event tells how it ended (killed from outside,
        # OOM, crashed) and follows within moments; the container itself may be gone already.
        assert self._watch is not None
        exit_ = await self._run(self._watch.wait_exit, node.container_id, EXIT_EVENT_WAIT_S)
        if exit_ is not None:
            return node.info.model_copy(update={"state": exit_.state, "exit_code": exit_.code})
        if container is not None:
            return self._describe(container)
        return node.info.model_copy(update={"state": NodeState.REMOVED})

    def _exit_seen(self, node: _Node) -> _Exit | None:
        return self._watch.exit_of(node.container_id) if self._watch is not None else None

    async def logs(self, node_id: str, tail: int = 200) -> str:
        client = await self._connect()
        container = await self._run(_find, client, node_id, self.mesh)
        if container is not None:
            try:
                raw = await self._run(container.logs, tail=tail)
                return bytes(raw).decode("utf-8", errors="replace")
            except docker.errors.APIError as exc:
                # Gone, or dead and being auto-removed (409): the engine no longer serves logs.
                log.debug("container.logs_gone", container=node_id, error=str(exc))
        node = self._nodes.get(node_id)
        # Gone with its container: what the output thread kept is all there is.
        return node.output.tail(tail) if node is not None else ""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            await asyncio.gather(*(self.stop(node_id) for node_id in builtins.list(self._nodes)))
        await self._leases.close()
        if self._session is not None:
            await self._session.close()
        if self._created_network and self._client is not None:
            await self._run(_remove_network_if_empty, self._client, self.network)
        if self._watch is not None:
            await self._run(self._watch.close)
        for client in (self._client, self._streams):
            if client is not None:
                client.close()
        self._pool.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking Docker call, on this spawner's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def _connect(self) -> docker.DockerClient:
        async with self._connect_lock:
            if self._client is None:
                client = await self._run(connect)
                await self._run(self._ensure_network, client)
                self._watch = await self._run(_ExitWatch, client, self.mesh)
                self._client = client
            return self._client

    def _attach(self, container_id: str) -> _Output:
        # Its own client, without a read timeout: output may stay silent for hours.
        with self._streams_lock:
            if self._streams is None:
                self._streams = connect(timeout=None)
        return _Output(self._streams.api, container_id)

    def _ensure_network(self, client: docker.DockerClient) -> None:
        if any(net.name == self.network for net in client.networks.list(names=[self.network])):
            return
        try:
            client.networks.create(self.network, driver="bridge", check_duplicate=True,
                                   labels={LABEL_MESH: self.mesh})
            self._created_network = True
        except docker.errors.APIError as exc:
            # Another spawner of the mesh created it a moment ago: that is as good.
            if exc.status_code != 409:
                raise SpawnError(f"cannot create network {self.network}: {exc}") from exc

    def _create(
        self, client: docker.DockerClient, spec: NodeSpec, name: str, token: str,
        lease_s: float, parent: str | None,
    ) -> Container:
        """Create (not start) the container under a fresh name; a taken name gets another."""
        image = spec.image or self.image
        labels = {
            **spec.labels,
            LABEL_MESH: self.mesh,
            LABEL_NODE: name,
            LABEL_PARENT: parent or "",
            LABEL_SPAWNED_AT: f"{time.time():.3f}",
        }
        limits: dict[str, Any] = {}
        if spec.cpus:
            limits["nano_cpus"] = int(spec.cpus * 1e9)
        if spec.memory:
            # Without swap, so that the limit is what the node really has.
            limits["mem_limit"] = limits["memswap_limit"] = spec.memory
        if spec.pids:
            limits["pids_limit"] = spec.pids
        volumes = {}
        if spec.workspace_mount:
            # The engine resolves the folder on its own host, also for a spawner in a container.
            folder = Path(spec.workspace_mount).expanduser().absolute()
            if not folder.is_dir() and not os.path.exists("/.dockerenv"):
                raise SpawnError(f"workspace_mount {folder} is not a folder")
            volumes[str(folder)] = {"bind": WORKSPACE_IN_CONTAINER, "mode": "rw"}
        if self._mounts_socket(spec):
            volumes[docker_socket_path()] = {"bind": SOCKET_IN_CONTAINER, "mode": "rw"}

        prefix = f"pm-{self.mesh}-"
        stem = name[: MAX_CONTAINER_NAME - len(prefix) - 7]
        for _ in range(NAME_ATTEMPTS):
            container_name = f"{prefix}{stem}-{new_suffix()}"
            env = node_env(
                spec, name=name, mesh=self.mesh, token=token, lease_s=lease_s,
                parent_url=self.parent_url, MESH_NETWORK=self.network,
                MESH_PUBLIC_URL=_internal_url(container_name),
            )
            try:
                return client.containers.create(
                    image, name=container_name, labels=labels, environment=env,
                    network=self.network, ports={f"{NODE_PORT}/tcp": ("127.0.0.1", None)},
                    auto_remove=True, volumes=volumes, **limits,
                )
            except docker.errors.ImageNotFound as exc:
                raise SpawnError(
                    f"image {image} not found: build it with docker/build-image.sh"
                ) from exc
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise SpawnError(f"cannot create container {container_name}: {exc}") from exc
                log.debug("peer.name_taken", container=container_name)
        raise SpawnError(f"no free container name for {name} after {NAME_ATTEMPTS} attempts")

    def _mounts_socket(self, spec: NodeSpec) -> bool:
        if os.environ.get("DOCKER_HOST"):
            return False
        wanted = spec.labels.get(LABEL_DOCKER_SOCKET)
        if wanted is not None:
            return wanted.lower() in ("1", "true", "yes")
        return self.mount_socket

    async def _wait_ready(self, node: _Node, container: Container, deadline: float) -> None:
        """The ready line, then one healthy answer; a container that stops fails at once."""

        async def why_dead() -> str | None:
            exit_ = await self._exit_if_stopped(node)
            if exit_ is None:
                return None
            tail = node.output.tail(20) or "no output"
            if exit_.oom:
                limit = f" (memory limit {node.memory})" if node.memory else ""
                return (f"container {node.info.id} was OOM-killed{limit} before ready, "
                        f"exit code {exit_.code}: {tail}")
            return f"node {node.info.id} exited with code {exit_.code} before ready: {tail}"

        while not node.output.ready.is_set():
            reason = await why_dead()
            if reason is not None:
                raise SpawnError(reason)
            if time.monotonic() >= deadline:
                raise TimeoutError("no ready line")
            await asyncio.sleep(0.02)

        await self._run(container.reload)
        node.info.url = self._url(container)
        node.info.state = NodeState.RUNNING
        self._session = self._session or aiohttp.ClientSession()
        await wait_healthy(self._session, node.info.url, deadline, why_dead)

    async def _exit_if_stopped(self, node: _Node) -> _Exit | None:
        """How the container ended, once its output stream has closed; None while it runs."""
        assert self._watch is not None
        exit_ = self._watch.exit_of(node.container_id)
        if exit_ is not None or not node.output.ended.is_set():
            return exit_
        # The output ends as the container stops; its die event follows within moments.
        for _ in range(100):
            await asyncio.sleep(0.02)
            if (exit_ := self._watch.exit_of(node.container_id)) is not None:
                return exit_
        return _Exit(-1)

    def _failure(self, node: _Node, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return (f"node {node.info.id} did not become ready within "
                    f"{self.ready_timeout_s:g} s: {node.output.tail(20) or 'no output'}")
        return str(exc)

    def _url(self, container: Container) -> str:
        """How this process reaches the node: by name on the mesh network, else via the host."""
        if os.environ.get("MESH_NETWORK") == self.network and os.path.exists("/.dockerenv"):
            return _internal_url(container.name or "")
        ports = container.attrs["NetworkSettings"]["Ports"] or {}
        binding = (ports.get(f"{NODE_PORT}/tcp") or [{}])[0]
        return f"http://127.0.0.1:{binding.get('HostPort')}"

    def _describe(self, container: Container) -> NodeInfo:
        labels = container.labels
        state = container.attrs["State"]
        own = self._nodes.get(container.name or "")
        node_state, exit_code = _LIVE_STATES.get(state.get("Status", "")), None
        if node_state is None:
            exit_ = _Exit(int(state.get("ExitCode", -1)), bool(state.get("OOMKilled")))
            node_state, exit_code = exit_.state, exit_.code
        return NodeInfo(
            id=container.name or container.id or "", name=labels.get(LABEL_NODE, ""),
            url=own.info.url if own else self._url(container),
            internal_url=_internal_url(container.name or ""), backend="docker",
            mesh=self.mesh, parent=labels.get(LABEL_PARENT) or None, state=node_state,
            exit_code=exit_code, spawned_at=float(labels.get(LABEL_SPAWNED_AT, 0) or 0),
            token=own.info.token if own else None,
        )


_LIVE_STATES = {
    "created": NodeState.STARTING,
    "running": NodeState.RUNNING,
    "paused": NodeState.RUNNING,
    "restarting": NodeState.STARTING,
    "removing": NodeState.REMOVED,
}


def _internal_url(container_name: str) -> str:
    """How sibling nodes on the mesh network reach a node: by its container name."""
    return f"http://{container_name}:{NODE_PORT}"


def _cut(stream: CancellableStream) -> None:
    """Cut a stream of the engine and release its socket; safe twice and from any thread."""
    try:
        stream.close()
    except (OSError, AttributeError, docker.errors.DockerException):
        pass
    # close() shuts the socket, but the response's file still holds it open until it too is
    # closed; else the socket is only freed, with a ResourceWarning, when collected.
    response = getattr(stream, "_response", None)
    if response is not None:
        try:
            response.close()
        except (OSError, AttributeError):
            pass


def _find(client: docker.DockerClient, node_id: str, mesh: str) -> Container | None:
    """The container of a node of this mesh, or None; never one of another mesh."""
    try:
        container = client.containers.get(node_id)
    except docker.errors.NotFound:
        return None
    return container if container.labels.get(LABEL_MESH) == mesh else None


def _seed_workspace(container: Container, source: str) -> None:
    """Copy a local folder's contents into the created container's workspace."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise SpawnError(f"workspace_from {source} is not a folder")
    # Spooled to disk: a workspace may be far larger than we want to hold in memory.
    with tempfile.TemporaryFile() as archive:
        with tarfile.open(fileobj=archive, mode="w") as tar:
            tar.add(folder, arcname=".")
        archive.seek(0)
        container.put_archive(WORKSPACE_IN_CONTAINER, archive)


def _remove_network_if_empty(client: docker.DockerClient, name: str) -> None:
    try:
        network = client.networks.get(name)
        if not network.attrs.get("Containers"):
            network.remove()
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        log.debug("network.remove_failed", network=name, error=str(exc))
