"""Wire models shared by the node (server side) and the peer library (client side).

Request models forbid unknown fields so that a misspelt key is an error naming the key,
not a silently ignored option.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DaemonInfo",
    "DaemonSpec",
    "DaemonStatus",
    "Event",
    "ExecRequest",
    "ExecResult",
    "FileInfo",
    "FileListing",
    "Health",
    "MessageRequest",
    "NodeInfo",
    "NodeSpec",
    "NodeState",
    "Mode",
    "ModeChange",
    "MoveRequest",
    "SnapshotCreate",
    "SnapshotInfo",
    "Step",
    "Task",
    "TaskCreate",
    "TaskStatus",
    "Usage",
    "TERMINAL_STATUSES",
]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Mode(str, enum.Enum):
    CODE = "code"
    ARCHITECT = "architect"
    DEBUG = "debug"
    ASK = "ask"
    ORCHESTRATOR = "orchestrator"


class TaskStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    INPUT_REQUIRED = "input_required"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


TERMINAL_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.INTERRUPTED}
)


# -- terminal ---------------------------------------------------------------------------------


class ExecRequest(Request):
    command: str = Field(min_length=1, max_length=1_000_000)
    cwd: str | None = None
    env: dict[str, str] | None = None
    timeout_s: float = Field(default=120.0, gt=0, le=24 * 3600)
    stdin: str | None = None


class ExecResult(BaseModel):
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False
    duration_ms: float
    output_file: str | None = Field(
        default=None, description="Workspace-relative file holding the full output when truncated."
    )


# -- files ------------------------------------------------------------------------------------


class FileInfo(BaseModel):
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: str
    mtime: float


class FileListing(BaseModel):
    """A folder's entries; `truncated` says the node stopped at its entry cap."""

    entries: list[FileInfo]
    truncated: bool = False


class MoveRequest(Request):
    src: str = Field(min_length=1)
    dst: str = Field(min_length=1)
    overwrite: bool = False


# -- daemons ----------------------------------------------------------------------------------


class DaemonStatus(str, enum.Enum):
    RUNNING = "running"
    BACKOFF = "backoff"
    EXITED = "exited"
    STOPPED = "stopped"


class DaemonSpec(Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    command: str = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] | None = None
    restart: Literal["no", "on-failure", "always"] = "no"


class DaemonInfo(BaseModel):
    name: str
    command: str
    status: DaemonStatus
    pid: int | None
    exit_code: int | None
    restarts: int
    started_at: float | None
    restart: str
    log_file: str


# -- snapshots --------------------------------------------------------------------------------


class SnapshotCreate(Request):
    alias: str | None = Field(default=None, max_length=128)


class SnapshotInfo(BaseModel):
    id: str
    alias: str | None
    created_at: float
    files: int
    bytes: int


# -- tasks and events -------------------------------------------------------------------------


class Step(Request):
    """One explicit tool call a task runs in order, without a model."""

    tool: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)
    check: bool = Field(
        default=True, description="Fail the task when this step fails (non-zero exit included)."
    )


class TaskCreate(Request):
    description: str = Field(default="", max_length=200_000)
    mode: Mode = Mode.CODE
    steps: list[Step] | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    rollback_on_failure: bool | None = None
    model: str | None = None
    api_base: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_steps: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    timeout_s: float | None = Field(default=None, gt=0)


class ModeChange(Request):
    mode: Mode


class MessageRequest(Request):
    content: str = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0


class Task(BaseModel):
    id: str
    description: str
    mode: Mode
    status: TaskStatus
    steps: list[Step] | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    result: Any = None
    error: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    usage: Usage = Field(default_factory=Usage)
    options: dict[str, Any] = Field(default_factory=dict)


class Event(BaseModel):
    seq: int
    task_id: str | None
    type: str
    ts: float
    data: dict[str, Any] = Field(default_factory=dict)


# -- node -------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok", "stopping"]
    name: str
    version: str
    uptime_s: float
    docker_socket: bool
    model_configured: bool
    capabilities: dict[str, bool] = Field(default_factory=dict)


# -- peers ------------------------------------------------------------------------------------


class NodeSpec(Request):
    """What a spawner needs to create a node."""

    name: str | None = Field(
        default=None, max_length=48, pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Node name; a unique suffix is added to the container or process name.",
    )
    role: str | None = None
    image: str | None = Field(default=None, description="Node image (docker backend only).")
    env: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    api_base: str | None = None
    cpus: float | None = Field(default=None, gt=0)
    memory: str | None = Field(default=None, pattern=r"^[0-9]+[kmgKMG]?$")
    pids: int | None = Field(default=None, gt=0)
    workspace_from: str | None = Field(
        default=None, description="Host folder whose contents seed the new node's workspace."
    )
    workspace_mount: str | None = Field(
        default=None,
        description="Host folder used as the workspace itself (bind-mounted into a container).",
    )
    lease_s: float | None = Field(default=None, gt=0)
    labels: dict[str, str] = Field(default_factory=dict)


class NodeState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    CRASHED = "crashed"
    OOM_KILLED = "oom_killed"
    REMOVED = "removed"


class NodeInfo(BaseModel):
    """A spawned node as its parent sees it. The token stays with the parent."""

    id: str
    name: str
    url: str
    internal_url: str | None = Field(
        default=None, description="URL sibling nodes use, where it differs from `url`."
    )
    backend: Literal["local", "docker"]
    mesh: str
    parent: str | None = None
    state: NodeState = NodeState.RUNNING
    exit_code: int | None = None
    spawned_at: float
    token: str | None = Field(default=None, repr=False)
