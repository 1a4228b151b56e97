"""The library's mesh object: spawn nodes, talk to them, and remove everything on close.

    async with Mesh(backend="local") as mesh:
        node = await mesh.spawn(name="coder")
        result = await mesh.peer(node).exec("python3 --version")
        outcomes = await mesh.fan_out([Assignment(task, spec=NodeSpec(name="lint")), ...])

Closing the mesh stops every node this object spawned and then reaps the mesh by label and
registry, so nodes its nodes spawned (and any left by an earlier crashed run of the same mesh
name) go too.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
from pathlib import Path
from typing import Any, Literal, Sequence

import docker.errors
import structlog

from .client import Peer
from .errors import ConfigError, SpawnError
from .fanout import Assignment, Outcome, ProgressCallback, fan_out
from .models import NodeInfo, NodeSpec
from .spawn.base import DEFAULT_LEASE_S, Spawner, check_mesh_name, new_mesh_name
from .spawn.docker import DEFAULT_IMAGE, DockerSpawner, connect
from .spawn.local import LocalSpawner
from .spawn.reaper import ReapReport, reap

__all__ = ["Mesh"]

log = structlog.get_logger("mesh.mesh")

Backend = Literal["local", "docker", "auto"]


class _State(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    CLOSED = "closed"


class Mesh:
    """A named group of nodes started by one spawner; there is no coordinator beyond it."""

    def __init__(
        self,
        name: str | None = None,
        backend: Backend = "auto",
        image: str = DEFAULT_IMAGE,
        root_dir: str | Path | None = None,
        *,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        if backend not in ("local", "docker", "auto"):
            raise ConfigError(f"unknown backend {backend!r}: use local, docker or auto")
        self.name = check_mesh_name(name or new_mesh_name())
        self.requested_backend = backend
        self.image = image
        self.root_dir = root_dir
        self.lease_s = lease_s
        self._spawner: Spawner | None = None
        self._peers: dict[str, Peer] = {}
        self._nodes: dict[str, NodeInfo] = {}
        self._state = _State.CREATED

    def __repr__(self) -> str:
        return f"<Mesh {self.name} {self.backend} {self._state.value}>"

    @property
    def backend(self) -> str:
        return self._spawner.backend if self._spawner is not None else self.requested_backend

    @property
    def spawner(self) -> Spawner:
        if self._spawner is None:
            raise SpawnError(f"mesh {self.name} is not started: use `async with Mesh(...)`")
        return self._spawner

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Choose the backend and get its spawner ready."""
        if self._state is _State.CLOSED:
            raise SpawnError(f"mesh {self.name} is closed")
        if self._spawner is not None:
            return
        backend = self.requested_backend
        if backend == "auto":
            backend = "docker" if await _docker_usable(self.image) else "local"
        if backend == "docker":
            self._spawner = DockerSpawner(self.name, self.image, lease_s=self.lease_s)
        else:
            local = LocalSpawner(self.name, self.root_dir, lease_s=self.lease_s)
            await local.start()
            self._spawner = local
        self._state = _State.RUNNING
        log.info("mesh.started", mesh=self.name, backend=backend)

    async def spawn(self, spec: NodeSpec | None = None, /, **fields: Any) -> NodeInfo:
        """Start a node from a spec, or from NodeSpec fields given as keywords."""
        if spec is not None and fields:
            raise ConfigError("pass a NodeSpec or keyword fields, not both")
        await self.start()
        info = await self.spawner.spawn(spec or NodeSpec(**fields))
        self._nodes[info.id] = info
        return info

    async def fan_out(
        self,
        assignments: Sequence[Assignment],
        *,
        limit: int = 8,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> builtins.list[Outcome]:
        """Run each assignment on its node, or on one this mesh spawns for it (see fanout)."""
        await self.start()
        return await fan_out(assignments, spawner=self.spawner, limit=limit, timeout=timeout,
                             on_progress=on_progress)

    def peer(self, node: NodeInfo | str) -> Peer:
        """A client of one of this mesh's nodes, authenticated with its token."""
        info = self._info(node)
        if info.id not in self._peers:
            if info.token is None:
                raise ConfigError(f"node {info.id} was not spawned by this mesh: no token")
            self._peers[info.id] = Peer(info.url, info.token)
        return self._peers[info.id]

    async def stop(self, node: NodeInfo | str) -> None:
        info = self._info(node)
        peer = self._peers.pop(info.id, None)
        if peer is not None:
            await peer.close()
        await self.spawner.stop(info.id)
        self._nodes.pop(info.id, None)

    async def status(self, node: NodeInfo | str) -> NodeInfo:
        info = self._info(node)
        current = await self.spawner.status(info.id)
        return current.model_copy(update={"token": info.token})

    async def nodes(self) -> builtins.list[NodeInfo]:
        return await self.spawner.list()

    async def logs(self, node: NodeInfo | str, tail: int = 200) -> str:
        return await self.spawner.logs(self._info(node).id, tail)

    async def close(self) -> ReapReport | None:
        """Stop every node, then remove whatever else carries this mesh's name."""
        if self._state is _State.CLOSED:
            return None
        self._state = _State.CLOSED
        try:
            for peer in self._peers.values():
                await peer.close()
            self._peers.clear()
            if self._spawner is not None:
                await self._spawner.close()
        finally:
            # Whatever went wrong above, nothing of the mesh may stay behind.
            report = await asyncio.shield(reap(self.name))
        log.info("mesh.closed", mesh=self.name)
        return report

    def _info(self, node: NodeInfo | str) -> NodeInfo:
        if isinstance(node, NodeInfo):
            return self._nodes.get(node.id, node)
        if node in self._nodes:
            return self._nodes[node]
        raise ConfigError(f"no node {node!r} in mesh {self.name}")


async def _docker_usable(image: str) -> bool:
    """True when an engine answers here and has the node image."""

    def check() -> bool:
        try:
            client = connect()
        except SpawnError:
            return False
        try:
            client.images.get(image)
            return True
        except docker.errors.DockerException:
            return False
        finally:
            client.close()

    return await asyncio.to_thread(check)
