"""Peers: this node creates sibling nodes, hands them work by URL and reads their files.

There is no coordinator: any node with a way to start nodes (the Docker socket in a container,
child processes on a host) can spawn, and it alone keeps the tokens of what it spawned. Peers
it did not spawn can be named in its configuration (MESH_PEERS) with their URL and token.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import secrets
from typing import TYPE_CHECKING, Any, cast

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import (
    ApiError, BadRequest, NotFound, PeerGone, SpawnError, ToolError, Unavailable,
)
from mesh.models import TERMINAL_STATUSES, Mode, NodeInfo, NodeSpec, NodeState, Step

from ..http import json_response, parse_json, query_int, read_model
from ..tasks import cut
from ..tools import Tool, ToolContext
from .gateway import ALIAS as GATEWAY_ALIAS

if TYPE_CHECKING:
    from mesh.client import Peer
    from mesh.spawn.base import Spawner

    from ..node import Node

__all__ = ["Peers", "add_routes", "register_tools"]

log = structlog.get_logger("agent_runtime.peers")

READ_PEER_FILE_CHARS = 256 * 1024
# A spec that sets any of these brings a provider of its own and gets no gateway key.
PROVIDER_ENV = ("MESH_MODEL", "MESH_API_BASE", "MESH_API_KEY")


class Peers:
    """The nodes this node knows: those it spawned (with their tokens) and configured ones."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._spawner: Spawner | None = None
        self.children: dict[str, NodeInfo] = {}
        self.known: dict[str, NodeInfo] = _configured_peers(os.environ.get("MESH_PEERS", ""))

    @property
    def backend(self) -> str:
        """Which way this node starts peers: docker, local, or none (with the reason)."""
        configured = os.environ.get("MESH_SPAWN_BACKEND", "auto")
        if configured != "auto":
            return configured
        if os.path.exists("/.dockerenv"):
            return "docker" if self.node.docker_socket else "none"
        return "local"

    def spawner(self) -> Spawner:
        if self._spawner is not None:
            return self._spawner
        backend = self.backend
        mesh_name = self.node.config.mesh_name or self.node.config.name
        if backend == "none":
            socket = os.environ.get("MESH_DOCKER_SOCKET", "/var/run/docker.sock")
            raise Unavailable(
                f"this node cannot spawn peers: no Docker socket at {socket} (mount it into "
                "the container to let the node start siblings)",
                details={"docker_socket": socket},
            )
        if backend == "docker":
            from mesh.spawn import DockerSpawner

            self._spawner = DockerSpawner(mesh_name, parent_url=self.node.url or None)
        else:
            from mesh.spawn import LocalSpawner

            root = self.node.config.state_dir / "peers"
            self._spawner = LocalSpawner(mesh_name, root_dir=root,
                                         parent_url=self.node.url or None)
        return self._spawner

    async def spawn(self, spec: NodeSpec) -> NodeInfo:
        if self.spawner().backend == "local":
            # A container's paths are the Docker host's, which this node cannot check.
            for field in ("workspace_from", "workspace_mount"):
                folder = getattr(spec, field)
                if folder is not None and not os.path.isdir(os.path.expanduser(folder)):
                    raise BadRequest(f"{field} {folder} is not a folder",
                                     details={"field": field})
        try:
            return await self.spawn_child(spec)
        except SpawnError as exc:
            raise Unavailable(f"spawn failed: {exc}") from exc

    async def spawn_child(self, spec: NodeSpec) -> NodeInfo:
        """Start a child node; a SpawnError says why it could not."""
        spawner = self.spawner()
        spec, grant = self._provider_spec(spec)
        gateway = self.node.gateway
        try:
            info = await spawner.spawn(spec, parent=self.node.config.name)
        except BaseException:
            # A child that never came up must not leave a working key behind.
            if grant is not None:
                gateway.revoke(grant, forget=True)
            raise
        if grant is not None:
            gateway.rename(grant, info.id)
        self.children[info.id] = info
        log.info("peer.spawned", node=info.name, node_id=info.id, url=info.url,
                 gateway=grant is not None)
        return info

    def _provider_spec(self, spec: NodeSpec) -> tuple[NodeSpec, str | None]:
        """The spec with the child's model settings, and the owner of its gateway key if any.

        A child uses this node's model through this node's gateway, with a key of its own and
        never this node's provider key, unless its spec names a provider of its own.
        """
        config = self.node.config
        if not config.model:
            return spec, None
        own_provider = (
            spec.model not in (None, config.model)
            or spec.api_base not in (None, config.api_base)
            or any(name in spec.env for name in PROVIDER_ENV)
        )
        url = None if own_provider else self._gateway_url()
        if url is not None:
            owner = f"pending-{secrets.token_hex(8)}"
            env = {**spec.env, "MESH_MODEL": f"openai/{GATEWAY_ALIAS}",
                   "MESH_API_BASE": f"{url}/api/v1/ai",
                   "MESH_API_KEY": self.node.gateway.mint(owner)}
            return spec.model_copy(update={"model": None, "api_base": None, "env": env}), owner
        if not spec.model:
            spec = spec.model_copy(update={"model": config.model, "api_base": config.api_base})
        return spec, None

    def _gateway_url(self) -> str | None:
        """This node's URL as its children reach it, or None where they cannot."""
        spawner = self.spawner()
        if spawner.backend == "local":
            return self.node.url or None
        # A container reaches its parent only by name, on the mesh network they share.
        network = getattr(spawner, "network", None)
        if os.path.exists("/.dockerenv") and os.environ.get("MESH_NETWORK") == network:
            return self.node.url or None
        # TODO: a parent on the host could serve its containers via host.docker.internal.
        log.warning("gateway.unreachable", backend=spawner.backend,
                    reason="the parent is not on the children's Docker network")
        return None

    async def stop(self, node_id: str) -> None:
        info = self.find(node_id)
        # The key stops first: a child being stopped has no further use for the model.
        self.node.gateway.revoke(info.id)
        await self.spawner().stop(info.id)
        self.children.pop(info.id, None)

    async def status(self, node_id: str) -> NodeInfo:
        info = self.find(node_id)
        if info.id not in self.children:
            return info
        current = await self.spawner().status(info.id)
        if current.state not in (NodeState.STARTING, NodeState.RUNNING):
            # A child that ended on its own is stopped too: its gateway key goes with it.
            self.node.gateway.revoke(info.id)
        return current.model_copy(update={"token": info.token})

    async def why_gone(self, ref: str, exc: PeerGone) -> str:
        """What became of a peer that stopped answering, as its spawner saw it if it is ours."""
        info = self.find(ref)
        if info.id in self.children:
            try:
                current = await self.status(info.id)
            except (ApiError, SpawnError):
                current = info
            if current.state is NodeState.REMOVED:
                return f"node {info.name} is gone: it was removed"
            if current.state is NodeState.OOM_KILLED:
                return f"node {info.name} is gone: it was OOM-killed"
            if current.state not in (NodeState.STARTING, NodeState.RUNNING):
                return f"node {info.name} is gone: it exited with code {current.exit_code}"
        return f"node {info.name} is gone: {exc.reason}"

    def find(self, ref: str) -> NodeInfo:
        """A peer by id, name or URL."""
        for pool in (self.children, self.known):
            if ref in pool:
                return pool[ref]
            for info in pool.values():
                if ref in (info.name, info.url, info.url.rstrip("/")):
                    return info
        names = sorted({info.name for info in [*self.children.values(), *self.known.values()]})
        raise NotFound(
            f"no peer {ref!r}; known peers: {', '.join(names) or 'none'}",
            details={"peer": ref},
        )

    def peer(self, ref: str) -> Peer:
        info = self.find(ref)
        if info.token is None:
            raise ToolError(f"peer {info.name} has no token this node can use")
        from mesh.client import Peer

        return Peer(info.url, info.token)

    async def close(self) -> None:
        for node_id in self.children:
            self.node.gateway.revoke(node_id)
        if self._spawner is not None:
            await self._spawner.close()
            self.children.clear()


class _ChildSpawner:
    """The node's spawner as a fan-out sees it: its children come and go through Peers.

    So they get gateway keys and lose them when stopped. It is a Spawner by duck typing only,
    since importing mesh.spawn (and the Docker SDK with it) would slow every node's start.
    """

    def __init__(self, peers: Peers) -> None:
        self.peers = peers
        self.inner = peers.spawner()
        self.backend = self.inner.backend
        self.mesh = self.inner.mesh

    async def spawn(self, spec: NodeSpec, *, parent: str | None = None) -> NodeInfo:
        return await self.peers.spawn_child(spec)

    async def stop(self, node_id: str) -> None:
        if node_id in self.peers.children:
            await self.peers.stop(node_id)
        else:
            await self.inner.stop(node_id)

    async def list(self) -> builtins.list[NodeInfo]:
        return await self.inner.list()

    async def status(self, node_id: str) -> NodeInfo:
        return await self.inner.status(node_id)

    async def logs(self, node_id: str, tail: int = 200) -> str:
        return await self.inner.logs(node_id, tail)

    async def close(self) -> None:
        """Nothing to do: the node's spawner outlives a fan-out, and Peers.close closes it."""


def _configured_peers(raw: str) -> dict[str, NodeInfo]:
    """MESH_PEERS: a JSON object of name -> {"url", "token"} for siblings this node may use."""
    if not raw.strip():
        return {}
    try:
        return _book(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("peer.bad_configured_peers", error=str(exc))
        return {}


def _book(entries: dict[str, Any]) -> dict[str, NodeInfo]:
    return {
        name: NodeInfo(id=name, name=name, url=str(entry["url"]).rstrip("/"),
                       token=entry.get("token"), backend="local", mesh="", spawned_at=0.0)
        for name, entry in entries.items()
    }


def add_routes(app: web.Application, node: Node) -> None:
    peers = node.peers

    async def spawn(request: web.Request) -> web.Response:
        spec = await read_model(request, NodeSpec)
        return json_response(await peers.spawn(spec), status=201)

    async def list_peers(request: web.Request) -> web.Response:
        return json_response([await peers.status(node_id) for node_id in list(peers.children)])

    async def get_peer(request: web.Request) -> web.Response:
        return json_response(await peers.status(request.match_info["node_id"]))

    async def stop_peer(request: web.Request) -> web.Response:
        await peers.stop(request.match_info["node_id"])
        return web.Response(status=204)

    async def set_book(request: web.Request) -> web.Response:
        """Siblings this node may name in its tasks: {name: {"url", "token"}}."""
        entries = parse_json(await request.read(), "peer book")
        try:
            book = _book(entries)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BadRequest(
                'peer book must be {"name": {"url": "...", "token": "..."}}',
                details={"error": str(exc)},
            ) from exc
        peers.known = book
        return json_response({"peers": sorted(book)})

    async def peer_logs(request: web.Request) -> web.Response:
        info = peers.find(request.match_info["node_id"])
        tail = query_int(request, "tail", 200) or 0
        text = await peers.spawner().logs(info.id, tail=tail)
        return web.Response(text=text, content_type="text/plain")

    app.router.add_post("/api/v1/peers", spawn)
    app.router.add_get("/api/v1/peers", list_peers)
    app.router.add_put("/api/v1/peers/book", set_book)
    app.router.add_get("/api/v1/peers/{node_id}", get_peer)
    app.router.add_delete("/api/v1/peers/{node_id}", stop_peer)
    app.router.add_get("/api/v1/peers/{node_id}/logs", peer_logs)


# -- tools ------------------------------------------------------------------------------------


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpawnPeerArgs(_Args):
    name: str = Field(description="Name of the new node (lowercase letters, digits, dashes).")
    role: str | None = None
    model: str | None = Field(default=None, description="Model for its agent; default: ours.")


class AssignTaskArgs(_Args):
    node: str = Field(description="The peer's name, id or URL.")
    description: str = Field(default="", description="What the peer should do, in words.")
    steps: list[Step] | None = Field(default=None, description="Or explicit tool calls.")
    mode: Mode = Mode.CODE
    wait: bool = Field(default=True, description="Wait for the result (else return the id).")
    timeout_s: float = Field(default=1800, gt=0)


class ReadPeerFileArgs(_Args):
    node: str = Field(description="The peer's name, id or URL.")
    path: str = Field(description="Path in the peer's workspace.")


class FanOutBranch(_Args):
    node: str | None = Field(default=None, description="An existing peer; or give spawn.")
    spawn: str | None = Field(default=None, description="Name of a new peer to spawn for it.")
    description: str = ""
    steps: list[Step] | None = None
    mode: Mode = Mode.CODE


class FanOutArgs(_Args):
    assignments: list[FanOutBranch] = Field(min_length=1)
    limit: int = Field(default=4, ge=1, le=64)
    timeout_s: float = Field(default=1800, gt=0)


def _task_body(description: str, steps: list[Step] | None, mode: Mode) -> dict[str, Any]:
    if not description and not steps:
        raise ToolError("give the peer a description or steps")
    body: dict[str, Any] = {"description": description, "mode": mode.value}
    if steps:
        body["steps"] = [step.model_dump() for step in steps]
    return body


def register_tools(node: Node) -> None:
    peers = node.peers

    async def spawn_peer(ctx: ToolContext, args: SpawnPeerArgs) -> dict[str, Any]:
        try:
            spec = NodeSpec(name=args.name, role=args.role, model=args.model)
        except ValueError as exc:
            raise ToolError(f"invalid peer spec: {exc}") from exc
        try:
            info = await peers.spawn(spec)
        except ApiError as exc:
            raise ToolError(exc.message) from exc
        return {"id": info.id, "name": info.name, "url": info.url}

    async def assign_task(ctx: ToolContext, args: AssignTaskArgs) -> Any:
        body = _task_body(args.description, args.steps, args.mode)
        async with peers.peer(args.node) as peer:
            handle = await peer.submit(**body)
            if not args.wait:
                return {"task_id": handle.id, "node": args.node}
            try:
                async with asyncio.timeout(args.timeout_s):
                    # Following the events, as fan_out does, ends at the task's last event, and
                    # a node that vanished ends it at once (PeerGone), with no polling retries.
                    async with contextlib.aclosing(handle.events()) as events:
                        async for _ in events:
                            pass
                    task = await handle.get()
                    if task.status not in TERMINAL_STATUSES:
                        task = await handle.result()
            except TimeoutError as exc:
                # The task goes on; its id lets the model look again or cancel it.
                raise ToolError(
                    f"task {handle.id} on {args.node} did not end within {args.timeout_s:g} s "
                    "and is still running"
                ) from exc
            except PeerGone as exc:
                raise ToolError(await peers.why_gone(args.node, exc)) from exc
            return {"task_id": handle.id, "status": task.status.value, "result": task.result}

    async def read_peer_file(ctx: ToolContext, args: ReadPeerFileArgs) -> str:
        async with peers.peer(args.node) as peer:
            text = await peer.read_text(args.path)
        return cut(text, READ_PEER_FILE_CHARS)

    async def fan_out_tool(ctx: ToolContext, args: FanOutArgs) -> list[dict[str, Any]]:
        # The client and fan-out load here, on first use, not with every node.
        from mesh.fanout import Assignment, fan_out

        assignments = []
        for branch in args.assignments:
            body = _task_body(branch.description, branch.steps, branch.mode)
            if branch.node:
                assignments.append(Assignment(task=body, node=peers.find(branch.node),
                                              name=branch.node))
            elif branch.spawn:
                spec = NodeSpec(name=branch.spawn, model=node.config.model,
                                api_base=node.config.api_base)
                assignments.append(Assignment(task=body, spec=spec, name=branch.spawn))
            else:
                raise ToolError("each assignment needs `node` (existing) or `spawn` (new)")
        spawner = (cast("Spawner", _ChildSpawner(peers)) if any(a.spec for a in assignments)
                   else None)
        outcomes = await fan_out(assignments, spawner=spawner, limit=args.limit,
                                 timeout=args.timeout_s)
        return [
            {"branch": o.name, "status": o.status, "result": o.result,
             "failure": o.failure.value if o.failure else None, "reason": o.reason}
            for o in outcomes
        ]

    for tool in (
        Tool("spawn_peer", "Create a new peer node (a whole computer) to delegate work to.",
             SpawnPeerArgs, spawn_peer, writes=True, peers=True),
        Tool("assign_task", "Give a peer a task by name or URL and (by default) wait for it.",
             AssignTaskArgs, assign_task, peers=True),
        Tool("read_peer_file", "Read a text file from a peer's workspace.",
             ReadPeerFileArgs, read_peer_file, peers=True),
        Tool("fan_out", "Run several tasks on several peers in parallel; one result each, "
             "failures isolated per branch.", FanOutArgs, fan_out_tool, peers=True),
    ):
        node.tools.add(tool)
