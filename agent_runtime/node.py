"""The node: every service of one agent computer, started and stopped together."""

from __future__ import annotations

import asyncio
import enum
import os
import time
import weakref
from pathlib import Path

import structlog
from aiohttp import web

from mesh.errors import ConfigError

from .config import NodeConfig
from .events import EventBus
from .groups import GroupLedger
from .mcp import McpEndpoint, McpServers
from .metrics import Metrics
from .orphans import OrphanReaper
from .rules import RuleEngine, load_rules
from .services.daemons import Daemons
from .services.files import Files
from .services.gateway import Gateway
from .services.lease import Lease
from .services.peers import Peers
from .services.snapshots import Snapshots
from .services.terminal import Terminal
from .store import Store
from .tasks import TaskManager
from .tools import ToolRegistry
from .workspace import Workspace

__all__ = ["Node", "NodeState"]

log = structlog.get_logger("agent_runtime.node")

DOCKER_SOCKET = "/var/run/docker.sock"


def _usable_folder(path: Path, option: str) -> None:
    """Create the folder; one the node cannot create or write into is a configuration error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{option}: {path} exists and is not a folder") from None
    except OSError as exc:
        raise ConfigError(f"{option}: cannot create folder {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: folder {path} is not writable by this user")


class NodeState(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSED = "closed"


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.state = NodeState.CREATED
        self.started_at = time.time()
        # First: a broken rules file stops the start before anything is opened.
        self.rules = RuleEngine(self, load_rules(config))
        _usable_folder(config.workspace, "--workspace")
        _usable_folder(config.state_dir, "--state-dir")
        _usable_folder(config.logs_dir, "--state-dir")

        self.workspace = Workspace(config.workspace)
        self.metrics = Metrics()
        self.store = Store(config.state_dir / "node.db")
        self.events = EventBus(self.store, self.metrics, buffer=config.subscriber_buffer)
        self.tools = ToolRegistry()
        # Commands and daemons run in sessions of their own; a killed node's are ended here.
        self.groups = GroupLedger(config.state_dir / "process-groups")
        # Full outputs of cut commands live in the workspace, where the files API reads them.
        self.terminal = Terminal(
            self.workspace, self.workspace.root / ".peermesh" / "exec", config.exec_output_cap,
            metrics=self.metrics, groups=self.groups,
        )
        self.files = Files(self.workspace)
        self.daemons = Daemons(
            self.workspace, config.logs_dir / "daemons", self.metrics, groups=self.groups
        )
        self.snapshots = Snapshots(self.workspace, config.state_dir / "snapshots")
        self.tasks = TaskManager(self)
        self.gateway = Gateway(self)
        self.peers = Peers(self)
        self.mcp_servers = McpServers(self)
        self.mcp_endpoint = McpEndpoint(self)
        self.websockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.url = config.public_url or ""
        # serve() runs until this is set: by a signal, or by a service such as the lease.
        self.stop_requested = asyncio.Event()
        self.lease = Lease(config.lease_s, self.request_stop, parent_url=config.parent_url)
        self.orphans = OrphanReaper()

    @property
    def docker_socket(self) -> bool:
        return os.path.exists(os.environ.get("MESH_DOCKER_SOCKET", DOCKER_SOCKET))

    def request_stop(self) -> None:
        """Ask the serving loop to shut the node down cleanly, as SIGTERM would."""
        self.stop_requested.set()

    async def start(self) -> None:
        from .services import daemons, files, peers, snapshots, terminal

        for service in (terminal, files, daemons, snapshots, peers):
            service.register_tools(self)
        self.tasks.recover()
        leftovers = self.groups.kill_leftovers()
        if leftovers:
            log.warning("node.leftover_processes_killed", node=self.config.name,
                        groups=len(leftovers))
        await self.daemons.start()
        await self.mcp_endpoint.start()
        await self.mcp_servers.start()
        self.lease.start()
        self.orphans.start()
        self.state = NodeState.RUNNING
        log.info("node.started", node=self.config.name, workspace=str(self.config.workspace))

    async def close(self) -> None:
        """Stop taking work, interrupt tasks, stop daemons, flush state."""
        if self.state in (NodeState.STOPPING, NodeState.CLOSED):
            return
        self.state = NodeState.STOPPING
        log.info("node.stopping", node=self.config.name)
        await self.lease.close()
        await self.tasks.close()
        await self.rules.close()
        await self.mcp_servers.close()
        await self.mcp_endpoint.close()
        for ws in list(self.websockets):
            await ws.close(code=1001, message=b"node stopping")
        await self.daemons.close()
        await self.peers.close()
        await self.terminal.close()
        self.groups.close()
        self.events.close()
        await self.orphans.close()
        self.store.close()
        self.state = NodeState.CLOSED
        log.info("node.stopped", node=self.config.name)
