"""`mesh down`: remove everything a mesh left behind, whoever started it and whether or not it
still runs: containers and networks by label, local node processes by the registry."""

from __future__ import annotations

import asyncio
import dataclasses

import docker.errors
import structlog

from ..errors import SpawnError
from . import registry
from .docker import LABEL_MESH, connect, remove_container

__all__ = ["ReapReport", "reap"]

log = structlog.get_logger("mesh.spawn")

# Set by docker-compose on what it starts; such a container or network is its project's.
COMPOSE_PROJECT = "com.docker.compose.project"

STOP_GRACE_S = 3


@dataclasses.dataclass
class ReapReport:
    """What reap removed, by name."""

    containers: list[str] = dataclasses.field(default_factory=list)
    networks: list[str] = dataclasses.field(default_factory=list)
    processes: list[str] = dataclasses.field(default_factory=list)


async def reap(mesh_name: str | None = None) -> ReapReport:
    """Remove every container, network and local node of one mesh, or of every mesh."""
    report = ReapReport()
    await _reap_processes(mesh_name, report)
    await _reap_docker(mesh_name, report)
    log.info("mesh.reaped", mesh=mesh_name or "*", containers=len(report.containers),
             networks=len(report.networks), processes=len(report.processes))
    return report


async def _reap_processes(mesh_name: str | None, report: ReapReport) -> None:
    records = registry.read_records(mesh_name)
    # Nodes first: a fork server that goes first would take its nodes with it, unrecorded.
    for kind in ("node", "forkserver"):
        batch = [r for r in records if r.kind == kind]
        stopped = await asyncio.gather(
            *(asyncio.to_thread(registry.terminate, record, STOP_GRACE_S) for record in batch)
        )
        for record, was_running in zip(batch, stopped, strict=True):
            registry.unregister(record.mesh, record.id)
            if was_running:
                report.processes.append(record.id)


async def _reap_docker(mesh_name: str | None, report: ReapReport) -> None:
    try:
        client = await asyncio.to_thread(connect)
    except SpawnError as exc:
        log.debug("mesh.reap_no_docker", reason=str(exc))
        return
    label = f"{LABEL_MESH}={mesh_name}" if mesh_name else LABEL_MESH
    try:
        containers = await asyncio.to_thread(
            client.containers.list, all=True, filters={"label": label}
        )
        # What docker-compose started is its project's: `docker-compose down` removes it, and
        # the mesh's reap takes only what the nodes spawned.
        containers = [c for c in containers if COMPOSE_PROJECT not in c.labels]
        await asyncio.gather(
            *(asyncio.to_thread(remove_container, c, STOP_GRACE_S) for c in containers)
        )
        report.containers.extend(c.name for c in containers if c.name)
        networks = await asyncio.to_thread(client.networks.list, filters={"label": label})
        for network in networks:
            if COMPOSE_PROJECT in (network.attrs.get("Labels") or {}):
                continue
            try:
                await asyncio.to_thread(network.remove)
                report.networks.append(network.name or network.id or "")
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                log.warning("mesh.network_not_removed", network=network.name, error=str(exc))
    finally:
        client.close()
