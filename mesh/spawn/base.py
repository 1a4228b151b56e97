"""What every spawner shares: the interface, fresh names and tokens, leases and readiness."""

from __future__ import annotations

import abc
import asyncio
import builtins
import dataclasses
import os
import re
import secrets
import time
from typing import Awaitable, Callable

import aiohttp
import structlog

from ..errors import ConfigError, SpawnError
from ..models import NodeInfo, NodeSpec

__all__ = [
    "DEFAULT_LEASE_S",
    "LeaseKeeper",
    "Spawner",
    "check_mesh_name",
    "new_mesh_name",
    "new_suffix",
    "new_token",
    "node_env",
    "wait_healthy",
]

log = structlog.get_logger("mesh.spawn")

DEFAULT_LEASE_S = 10.0
MESH_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
# The parent's own credentials and identity must not leak into a child's environment.
PARENT_ONLY_ENV = re.compile(r"^MESH_")


class Spawner(abc.ABC):
    """Creates sibling nodes of one mesh and keeps their tokens and leases."""

    backend: str
    mesh: str

    @abc.abstractmethod
    async def spawn(self, spec: NodeSpec, *, parent: str | None = None) -> NodeInfo:
        """Start a node and wait until it answers; the NodeInfo carries its fresh token."""

    @abc.abstractmethod
    async def stop(self, node_id: str) -> None:
        """Stop and remove a node; stopping one that is gone is not an error."""

    @abc.abstractmethod
    async def list(self) -> builtins.list[NodeInfo]:
        """This mesh's nodes, each with its current state."""

    @abc.abstractmethod
    async def status(self, node_id: str) -> NodeInfo:
        """A node's current state: running, exited, crashed, oom_killed or removed."""

    @abc.abstractmethod
    async def logs(self, node_id: str, tail: int = 200) -> str:
        """The last `tail` lines a node wrote."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop everything this spawner started."""

    async def __aenter__(self) -> Spawner:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def new_token() -> str:
    return secrets.token_urlsafe(24)


def new_suffix() -> str:
    """Six hex digits that make a node's id unique among siblings of the same name."""
    return secrets.token_hex(3)


def new_mesh_name() -> str:
    return f"m{secrets.token_hex(4)}"


def check_mesh_name(name: str) -> str:
    """A mesh name doubles as a Docker label, network name and host name part."""
    if not MESH_NAME_RE.match(name):
        raise ConfigError(
            f"invalid mesh name {name!r}: use 1-24 lowercase letters, digits and dashes"
        )
    return name


def node_env(
    spec: NodeSpec, *, name: str, mesh: str, token: str, lease_s: float,
    parent_url: str | None, **extra: str,
) -> dict[str, str]:
    """The MESH_* variables a child starts with; the spec's own env comes last and wins."""
    env = {
        "MESH_TOKEN": token,
        "MESH_NAME": name,
        "MESH_MESH_NAME": mesh,
        "MESH_LEASE_S": f"{lease_s:g}",
        "MESH_LOG_FORMAT": "json",
        **extra,
    }
    if parent_url:
        env["MESH_PARENT_URL"] = parent_url
    if spec.model:
        env["MESH_MODEL"] = spec.model
    if spec.api_base:
        env["MESH_API_BASE"] = spec.api_base
    env.update(spec.env)
    return env


def inherited_env() -> dict[str, str]:
    """This process's environment without its own MESH_* settings (token, name, port)."""
    return {key: value for key, value in os.environ.items() if not PARENT_ONLY_ENV.match(key)}


async def wait_healthy(
    session: aiohttp.ClientSession, url: str, deadline: float,
    why_dead: Callable[[], Awaitable[str | None]], *, interval_s: float = 0.02,
) -> None:
    """Poll GET /healthz until it answers ok; a node that died fails at once with its reason.

    `why_dead` says why the node can no longer become ready (it exited, was OOM-killed), or
    None while it may still come up. Only a node that is alive and silent times out.
    """
    timeout = aiohttp.ClientTimeout(total=2.0)
    while True:
        reason = await why_dead()
        if reason is not None:
            raise SpawnError(reason)
        try:
            async with session.get(f"{url}/healthz", timeout=timeout) as response:
                if response.status == 200 and (await response.json())["status"] == "ok":
                    return
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url}/healthz did not answer ok in time")
        await asyncio.sleep(interval_s)


@dataclasses.dataclass
class _Held:
    url: str
    token: str
    ttl_s: float
    due: float = 0.0

    def schedule(self) -> None:
        self.due = time.monotonic() + self.ttl_s / 3


class LeaseKeeper:
    """Renews the lease of every child a spawner holds, from one background task.

    Each child is renewed every third of its lease time, so two renewals in a row may fail
    (a busy child, a slow network) before it stops.
    """

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()

    def hold(self, node_id: str, url: str, token: str, ttl_s: float) -> None:
        held = self._held[node_id] = _Held(url, token, ttl_s)
        held.schedule()
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="lease-keeper")

    def release(self, node_id: str) -> None:
        self._held.pop(node_id, None)

    async def close(self) -> None:
        self._held.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        self._session = self._session or aiohttp.ClientSession()
        while self._held:
            # A new child whose renewal is due sooner cuts the wait short.
            self._changed.clear()
            wait_s = min(held.due for held in self._held.values()) - time.monotonic()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=max(0.0, wait_s))
                continue
            except TimeoutError:
                pass
            now = time.monotonic()
            due = [(node_id, held) for node_id, held in self._held.items() if held.due <= now]
            for _, held in due:
                held.schedule()
            await asyncio.gather(*(self._renew(node_id, held) for node_id, held in due))

    async def _renew(self, node_id: str, held: _Held) -> None:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=max(1.0, held.ttl_s / 3))
        try:
            async with self._session.post(
                f"{held.url}/api/v1/lease", json={"ttl_s": held.ttl_s}, timeout=timeout,
                headers={"Authorization": f"Bearer {held.token}"},
            ) as response:
                if response.status != 200:
                    log.warning("peer.lease_refused", node_id=node_id, status=response.status)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.debug("peer.lease_renew_failed", node_id=node_id, error=str(exc) or "timeout")
