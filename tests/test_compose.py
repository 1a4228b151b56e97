"""compose.yaml: three nodes come up with docker-compose, the `mesh` command and the library work
against them, a node spawns a sibling through the socket, and `docker-compose down` leaves
nothing behind."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path
from typing import AsyncIterator

import docker
import pytest
from spawn_support import REPO, answers, docker_leftovers, get_json, require_docker, wait_for

from mesh.client import Peer
from mesh.spawn import reap
from mesh.spawn.docker import connect

pytestmark = pytest.mark.docker

COMPOSE_FILE = REPO / "compose.yaml"
NODES = ("node-a", "node-b", "node-c")
DEFAULT_TOKEN = "devtoken"


class ComposeMesh:
    """One docker-compose project of compose.yaml, on host ports of its own."""

    def __init__(self, project: str, ports: dict[str, int]) -> None:
        self.project = project
        self.mesh = project
        self.ports = ports
        self.env = {key: value for key, value in os.environ.items() if key != "MESH_TOKEN"}
        self.env.update(
            PEERMESH_MESH=project,
            PEERMESH_PORT_A=str(ports["node-a"]),
            PEERMESH_PORT_B=str(ports["node-b"]),
            PEERMESH_PORT_C=str(ports["node-c"]),
        )

    def url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.ports[node]}"

    async def compose(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        return await asyncio.to_thread(
            subprocess.run, command, env=self.env, capture_output=True, text=True, timeout=180,
        )

    def leftovers(self) -> list[str]:
        """Containers of the project or the mesh, and the project's network, still there."""
        client = connect()
        try:
            project = {"label": f"com.docker.compose.project={self.project}"}
            left = [f"container {c.name}"
                    for c in client.containers.list(all=True, filters=project)]
            left += [f"network {n.name}"
                     for n in client.networks.list(names=[f"peermesh-{self.mesh}"])]
        finally:
            client.close()
        return sorted(set(left + docker_leftovers(self.mesh)))


def free_ports(count: int) -> list[int]:
    """Loopback ports nothing listens on right now, all different."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
async def compose_mesh() -> AsyncIterator[ComposeMesh]:
    require_docker()
    if shutil.which("docker-compose") is None:
        pytest.skip("compose tests skipped: no docker-compose command on PATH")
    project = f"pmc{secrets.token_hex(4)}"
    mesh = ComposeMesh(project, dict(zip(NODES, free_ports(len(NODES)), strict=True)))
    try:
        up = await mesh.compose("up", "-d")
        assert up.returncode == 0, up.stderr
        for node in NODES:
            await wait_for(lambda node=node: answers(mesh.url(node)), 60, f"{node} to answer")
        yield mesh
    finally:
        left = await asyncio.to_thread(mesh.leftovers)
        if left:
            await mesh.compose("down", "--timeout", "5")
            await reap(mesh.mesh)


async def test_compose_mesh_serves_the_mesh_command_and_the_library_and_goes_down_whole(
    compose_mesh: ComposeMesh, tmp_path: Path
) -> None:
    mesh_command = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "mesh")
    if not Path(mesh_command).exists():
        mesh_command = shutil.which("mesh") or mesh_command

    ran = await asyncio.to_thread(
        subprocess.run,
        [mesh_command, "exec", "--token", DEFAULT_TOKEN, compose_mesh.url("node-a"), "--",
         "uname", "-a"],
        capture_output=True, text=True, timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("Linux node-a ")

    async with Peer(compose_mesh.url("node-b"), DEFAULT_TOKEN) as node_b:
        health = await node_b.health()
        assert (health.name, health.docker_socket) == ("node-b", True)
        await node_b.write("hello.txt", "from the library\n")
        assert await node_b.read_text("hello.txt") == "from the library\n"

    status, sibling = await get_json(f"{compose_mesh.url('node-a')}/api/v1/peers",
                                     DEFAULT_TOKEN, method="POST", body={"name": "extra"})
    assert status == 201, sibling
    assert sibling["url"] == f"http://{sibling['id']}:8700"
    # The sibling is on the compose network: another compose node reaches it by name.
    async with Peer(compose_mesh.url("node-c"), DEFAULT_TOKEN) as node_c:
        probe = await node_c.exec(
            f"python3 -c \"import urllib.request; urllib.request.urlopen('{sibling['url']}"
            "/healthz')\""
        )
        assert probe.exit_code == 0, probe.stderr
        assert (await node_c.exec("getent hosts node-a")).exit_code == 0
    engine = connect()
    try:
        labels = engine.containers.get(sibling["id"]).labels
    except docker.errors.NotFound:
        pytest.fail(f"the sibling {sibling['id']} is not a container of this engine")
    finally:
        engine.close()
    assert (labels["peermesh.mesh"], labels["peermesh.parent"]) == (compose_mesh.mesh, "node-a")

    # The mesh's reap takes what the nodes spawned and leaves compose's own services to it.
    report = await reap(compose_mesh.mesh)
    assert report.containers == [sibling["id"]]
    async with Peer(compose_mesh.url("node-a"), DEFAULT_TOKEN) as node_a:
        assert (await node_a.health()).status == "ok"

    down = await compose_mesh.compose("down")

    assert down.returncode == 0, down.stderr
    assert await asyncio.to_thread(compose_mesh.leftovers) == []
