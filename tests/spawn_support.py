"""Fixtures and helpers the spawner tests share: real spawners of both kinds, an isolated
registry, the node image, and the check that a test left nothing of its mesh behind."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import docker
import docker.errors
import pytest

from mesh.errors import SpawnError
from mesh.models import NodeInfo
from mesh.spawn import DockerSpawner, LocalSpawner, Spawner, reap, registry
from mesh.spawn.docker import DEFAULT_IMAGE, LABEL_MESH, connect

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["local", pytest.param("docker", marks=pytest.mark.docker)]

# A parent that spawns one child, prints it as JSON and then waits to be killed.
PARENT_SCRIPT = """
import asyncio, json, sys
from agent_runtime.logs import configure_logging
from mesh.models import NodeSpec
from mesh.spawn import DockerSpawner, LocalSpawner

async def main(backend, mesh, lease_s, root):
    if backend == "docker":
        spawner = DockerSpawner(mesh, lease_s=lease_s)
    else:
        spawner = LocalSpawner(mesh, root, lease_s=lease_s)
    info = await spawner.spawn(NodeSpec(name="orphan"))
    print(info.model_dump_json(), flush=True)
    await asyncio.Event().wait()

configure_logging("json", "warning")
asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]))
"""


@functools.cache
def docker_problem() -> str | None:
    """Why the Docker tests cannot run here, or None; builds the node image if it is missing."""
    try:
        client = connect()
    except SpawnError as exc:
        return f"no Docker engine answers here ({exc})"
    try:
        client.images.get(DEFAULT_IMAGE)
        return None
    except docker.errors.ImageNotFound:
        pass
    finally:
        client.close()
    build = subprocess.run([str(REPO / "docker" / "build-image.sh")], capture_output=True,
                           text=True)
    if build.returncode != 0:
        pytest.fail(f"docker/build-image.sh failed:\n{build.stderr[-3000:]}")
    return None


def require_docker() -> None:
    problem = docker_problem()
    if problem is not None:
        pytest.skip(f"Docker tests skipped: {problem}")


def docker_leftovers(mesh: str) -> list[str]:
    """Containers and networks that still carry the mesh's label."""
    client = connect()
    try:
        label = {"label": f"{LABEL_MESH}={mesh}"}
        containers = [f"container {c.name}" for c in client.containers.list(all=True,
                                                                            filters=label)]
        networks = [f"network {n.name}" for n in client.networks.list(filters=label)]
        return containers + networks
    finally:
        client.close()


def local_leftovers(mesh: str, seen: list[registry.ProcessRecord]) -> list[str]:
    """Registry records of the mesh, and processes once recorded that still run."""
    left = [f"record {r.id}" for r in registry.read_records(mesh)]
    left += [f"process {r.id} (pid {r.pid})" for r in seen if registry.is_alive(r)]
    return left


def make_spawner(backend: str, mesh: str, root: Path, **options: Any) -> Spawner:
    if backend == "docker":
        return DockerSpawner(mesh, **options)
    return LocalSpawner(mesh, root, **options)


@pytest.fixture
def mesh_name() -> str:
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def peermesh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A registry of this test's own, also for the processes it starts."""
    home = tmp_path / "peermesh-home"
    monkeypatch.setenv("PEERMESH_HOME", str(home))
    return home


@pytest.fixture(params=BACKENDS)
async def spawner(
    request: pytest.FixtureRequest, mesh_name: str, tmp_path: Path, peermesh_home: Path
) -> AsyncIterator[Spawner]:
    """A real spawner of each kind; afterwards nothing of its mesh may remain."""
    backend = request.param
    if backend == "docker":
        require_docker()
    spawner = make_spawner(backend, mesh_name, tmp_path / "nodes")
    try:
        yield spawner
    finally:
        seen = registry.read_records(mesh_name)
        await spawner.close()
        left = await asyncio.to_thread(leftovers, backend, mesh_name, seen)
        if left:
            await reap(mesh_name)
        assert not left, f"mesh {mesh_name} left behind: {', '.join(left)}"


def leftovers(backend: str, mesh: str, seen: list[registry.ProcessRecord]) -> list[str]:
    if backend == "docker":
        return docker_leftovers(mesh)
    return local_leftovers(mesh, seen)


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def get_json(
    url: str, token: str | None = None, *, method: str = "GET", body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, json=body) as response:
            return response.status, await response.json(content_type=None)


async def answers(url: str) -> bool:
    """True while something answers GET /healthz at `url`."""
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/healthz",
                                   timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return False


async def start_parent(
    backend: str, mesh: str, root: Path, lease_s: float
) -> tuple[asyncio.subprocess.Process, NodeInfo]:
    """A separate process that spawns one child node and holds its lease until killed."""
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True")
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT_SCRIPT, backend, mesh, str(lease_s), str(root),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=str(REPO),
    )
    assert parent.stdout is not None
    line = await asyncio.wait_for(parent.stdout.readline(), timeout=90)
    if not line:
        pytest.fail(f"the parent process exited with {await parent.wait()} before spawning")
    return parent, NodeInfo.model_validate(json.loads(line))


def container_exists(name: str) -> bool:
    client = connect()
    try:
        client.containers.get(name)
        return True
    except docker.errors.NotFound:
        return False
    finally:
        client.close()
