"""peermesh: give every agent a whole computer, and let agents work together as peers.

The peer library's public surface: `Peer` talks to one node, `TaskHandle` follows one task,
and the wire models and the one error hierarchy are shared with the node.
"""

import importlib
import logging as _logging
import sys as _sys
from typing import TYPE_CHECKING

import structlog as _structlog

from .errors import ApiError as ApiError
from .errors import BadRequest as BadRequest
from .errors import ConfigError as ConfigError
from .errors import Conflict as Conflict
from .errors import Forbidden as Forbidden
from .errors import MeshError as MeshError
from .errors import NotFound as NotFound
from .errors import PayloadTooLarge as PayloadTooLarge
from .errors import PeerAuthError as PeerAuthError
from .errors import PeerError as PeerError
from .errors import PeerGone as PeerGone
from .errors import PeerRequestError as PeerRequestError
from .errors import PeerUnreachable as PeerUnreachable
from .errors import SpawnError as SpawnError
from .errors import TaskFailed as TaskFailed
from .errors import ToolError as ToolError
from .errors import Unauthorized as Unauthorized
from .errors import Unavailable as Unavailable
from .models import TERMINAL_STATUSES as TERMINAL_STATUSES
from .models import DaemonInfo as DaemonInfo
from .models import DaemonSpec as DaemonSpec
from .models import DaemonStatus as DaemonStatus
from .models import Event as Event
from .models import ExecRequest as ExecRequest
from .models import ExecResult as ExecResult
from .models import FileInfo as FileInfo
from .models import FileListing as FileListing
from .models import Health as Health
from .models import McpServerDecl as McpServerDecl
from .models import McpServerInfo as McpServerInfo
from .models import McpServerStatus as McpServerStatus
from .models import MessageRequest as MessageRequest
from .models import Mode as Mode
from .models import ModeChange as ModeChange
from .models import MoveRequest as MoveRequest
from .models import NodeInfo as NodeInfo
from .models import NodeSpec as NodeSpec
from .models import NodeState as NodeState
from .models import SnapshotCreate as SnapshotCreate
from .models import SnapshotInfo as SnapshotInfo
from .models import Step as Step
from .models import Task as Task
from .models import TaskCreate as TaskCreate
from .models import TaskStatus as TaskStatus
from .models import Usage as Usage

__all__ = [
    # errors
    "ApiError",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "Forbidden",
    "MeshError",
    "NotFound",
    "PayloadTooLarge",
    "PeerAuthError",
    "PeerError",
    "PeerGone",
    "PeerRequestError",
    "PeerUnreachable",
    "SpawnError",
    "TaskFailed",
    "ToolError",
    "Unauthorized",
    "Unavailable",
    # models
    "TERMINAL_STATUSES",
    "DaemonInfo",
    "DaemonSpec",
    "DaemonStatus",
    "Event",
    "ExecRequest",
    "ExecResult",
    "FileInfo",
    "FileListing",
    "Health",
    "McpServerDecl",
    "McpServerInfo",
    "McpServerStatus",
    "MessageRequest",
    "Mode",
    "ModeChange",
    "MoveRequest",
    "NodeInfo",
    "NodeSpec",
    "NodeState",
    "SnapshotCreate",
    "SnapshotInfo",
    "Step",
    "Task",
    "TaskCreate",
    "TaskStatus",
    "Usage",
]

if TYPE_CHECKING:
    from .client import ExecOutput as ExecOutput
    from .client import Peer as Peer
    from .client import RetryPolicy as RetryPolicy
    from .client import TaskHandle as TaskHandle
    from .mesh import Mesh as Mesh
    from .spawn import DockerSpawner as DockerSpawner
    from .spawn import LocalSpawner as LocalSpawner
    from .spawn import Spawner as Spawner
    from .spawn import reap as reap

# The client, the mesh and its spawners load on first use: the Docker SDK and the client's
# retry machinery are imports that a node, which needs only the errors and models from here,
# should not pay for at start-up.
_LAZY = {
    "ExecOutput": "mesh.client",
    "Peer": "mesh.client",
    "RetryPolicy": "mesh.client",
    "TaskHandle": "mesh.client",
    "DockerSpawner": "mesh.spawn.docker",
    "LocalSpawner": "mesh.spawn.local",
    "Mesh": "mesh.mesh",
    "Spawner": "mesh.spawn.base",
    "reap": "mesh.spawn.reaper",
}
__all__ += list(_LAZY)



def _quiet_by_default() -> None:
    """Warnings and errors on stderr, unless the application configured structlog itself.

    structlog's own default prints every event, debug included, to stdout: a script that uses
    `Peer` would find the library's chatter mixed into its own output. Loggers are not cached
    under this default, so an application (or the node, or the `mesh` command) that calls
    structlog.configure later still gets its own settings for every logger.
    """
    if _structlog.is_configured():
        return
    _structlog.configure(
        processors=[_structlog.processors.add_log_level,
                    _structlog.processors.TimeStamper(fmt="iso", utc=True),
                    _structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=_structlog.make_filtering_bound_logger(_logging.WARNING),
        logger_factory=_structlog.PrintLoggerFactory(file=_sys.stderr),
        cache_logger_on_first_use=False,
    )


_quiet_by_default()

def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'mesh' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
