"""The lease a spawned node holds: unless its parent renews it in time, the node shuts down.

A parent that dies, even by kill -9, stops renewing, so its children stop on their own within
the lease time. The parent renews with POST /api/v1/lease (the child's own bearer token);
GET /api/v1/lease shows the deadline. A node started without a lease runs until stopped.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Callable

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import Conflict

from ..http import json_response, read_model

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["Lease", "LeaseInfo", "LeaseRenew", "add_routes"]

log = structlog.get_logger("agent_runtime.lease")

MAX_TTL_S = 24 * 3600.0
# A watchdog that wakes this much later than it asked was held up by its own event loop.
STALL_S = 1.0


class LeaseRenew(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ttl_s: float | None = Field(
        default=None, gt=0, le=MAX_TTL_S,
        description="Seconds from now the lease runs; the node's configured lease if absent.",
    )


class LeaseInfo(BaseModel):
    enabled: bool
    ttl_s: float | None = None
    deadline: float | None = Field(default=None, description="Unix time the lease runs out.")
    remaining_s: float | None = None
    renewals: int = 0
    parent_url: str | None = None


class Lease:
    """A deadline that renewals push forward; a watchdog calls `on_expiry` once it passes."""

    def __init__(
        self, ttl_s: float | None, on_expiry: Callable[[], None], *,
        parent_url: str | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self.parent_url = parent_url
        self.renewals = 0
        self._on_expiry = on_expiry
        self._deadline = time.monotonic() + ttl_s if ttl_s else None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.ttl_s is not None

    def start(self) -> None:
        if self.ttl_s is None or self._watchdog is not None:
            return
        # The lease runs from start, not from construction: a slow start-up must not eat it.
        self._deadline = time.monotonic() + self.ttl_s
        self._watchdog = asyncio.create_task(self._watch(), name="lease-watchdog")
        log.info("lease.started", ttl_s=self.ttl_s, parent_url=self.parent_url)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None

    def renew(self, ttl_s: float | None = None) -> LeaseInfo:
        if self.ttl_s is None or self._deadline is None:
            raise Conflict("this node holds no lease: it was started without a lease time")
        self._deadline = time.monotonic() + (ttl_s or self.ttl_s)
        self.renewals += 1
        log.debug("lease.renewed", ttl_s=ttl_s or self.ttl_s, renewals=self.renewals)
        return self.info()

    def info(self) -> LeaseInfo:
        if self._deadline is None:
            return LeaseInfo(enabled=False, parent_url=self.parent_url)
        remaining = max(0.0, self._deadline - time.monotonic())
        return LeaseInfo(
            enabled=True, ttl_s=self.ttl_s, deadline=round(time.time() + remaining, 3),
            remaining_s=round(remaining, 3), renewals=self.renewals, parent_url=self.parent_url,
        )

    async def _watch(self) -> None:
        assert self._deadline is not None and self.ttl_s is not None
        # A renewal moves the deadline while we sleep, so wake up and look again.
        while (remaining := self._deadline - time.monotonic()) > 0:
            asked = time.monotonic()
            await asyncio.sleep(remaining)
            stalled_s = time.monotonic() - asked - remaining
            if stalled_s > STALL_S and self._deadline <= time.monotonic():
                # Our own event loop was held up past the deadline, so the parent's renewals
                # could not be answered: give it one more renewal period before giving up.
                log.warning("lease.stalled", stalled_s=round(stalled_s, 3), ttl_s=self.ttl_s)
                self._deadline = time.monotonic() + max(self.ttl_s / 3, STALL_S)
        log.warning("lease.expired", ttl_s=self.ttl_s, renewals=self.renewals,
                    parent_url=self.parent_url)
        self._on_expiry()


def add_routes(app: web.Application, node: Node) -> None:
    lease = node.lease

    async def get_lease(request: web.Request) -> web.Response:
        return json_response(lease.info())

    async def renew(request: web.Request) -> web.Response:
        body = await read_model(request, LeaseRenew)
        return json_response(lease.renew(body.ttl_s))

    app.router.add_get("/api/v1/lease", get_lease)
    app.router.add_post("/api/v1/lease", renew)
