"""Wire models shared by the node (server side) and the peer library (client side).

Request models forbid unknown fields so that a misspelt key is an error naming the key,
not a silently ignored option.
"""

from __future__ import annotations

import enum
import shlex
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

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
    "McpServerDecl",
    "McpServerInfo",
    "McpServerStatus",
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
    # NaN and Infinity parse as JSON in Python but are no timeout, size or rate anyone means.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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


# -- MCP servers ------------------------------------------------------------------------------


class McpServerDecl(Request):
    """An MCP server to attach: a command spoken to over stdio, or a streamable HTTP URL."""

    name: str = Field(
        min_length=1, max_length=40, pattern=r"^[a-z0-9-]+(_[a-z0-9-]+)*$",
        description="Prefix of the server's tools on the node: NAME__TOOL (so no `__` in it, "
                    "nor a `_` at either end).",
    )
    command: list[str] | str | None = Field(
        default=None, description="argv of a stdio server; a string is split like a shell would.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Variables added to the stdio server's environment.")
    cwd: str | None = Field(
        default=None, description="Working folder of the stdio server, inside the workspace.")
    url: str | None = Field(
        default=None, pattern=r"^https?://", description="Endpoint of a streamable HTTP server.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Headers sent to an HTTP server, e.g. Authorization.")
    timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Time one tool call may take.")
    connect_timeout_s: float = Field(
        default=30.0, gt=0, le=3600,
        description="Time to start or reach the server, shake hands and list its tools.")

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerDecl:
        if (self.command is None) == (self.url is None):
            raise PydanticCustomError(
                "mcp_transport",
                "an MCP server needs exactly one of `command` (stdio) or `url` (streamable HTTP)")
        if self.url is not None and (self.env or self.cwd is not None):
            raise PydanticCustomError(
                "mcp_transport", "`env` and `cwd` apply only to a `command` server")
        if self.command is not None and self.headers:
            raise PydanticCustomError("mcp_transport", "`headers` apply only to a `url` server")
        if self.command is not None:
            try:
                argv = self.argv()
            except ValueError as exc:
                raise PydanticCustomError(
                    "mcp_transport", "`command` cannot be split: {reason}", {"reason": str(exc)}
                ) from None
            if not argv:
                raise PydanticCustomError("mcp_transport", "`command` is empty")
        return self

    def argv(self) -> list[str]:
        """The command as argv; a string is split by shell rules (quotes, no expansion)."""
        if isinstance(self.command, str):
            return shlex.split(self.command)
        return list(self.command or [])


class McpServerStatus(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    CRASHED = "crashed"
    STOPPED = "stopped"


class McpServerInfo(BaseModel):
    """An attached MCP server as the node sees it; headers and env stay private."""

    name: str
    transport: Literal["stdio", "http"]
    status: McpServerStatus
    tools: list[str] = Field(description="The node's names of the server's tools.")
    error: str | None = Field(default=None, description="Why the server is not running.")
    attached_at: float
