"""Node configuration: command-line options, each also read from a MESH_* variable."""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mesh.errors import ConfigError
from mesh.models import McpServerDecl

__all__ = ["NodeConfig", "parse_node_args"]

URL_PATTERN = r"^https?://[^\s/]+"


class NodeConfig(BaseModel):
    # Infinity and NaN are not durations or sizes; every number below is finite.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workspace: Path
    state_dir: Path
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8700, ge=0, le=65535)
    token: str = Field(min_length=8)
    token_generated: bool = False
    name: str = Field(default="node", min_length=1)
    public_url: str | None = Field(default=None, pattern=URL_PATTERN)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    exec_output_cap: int = Field(default=256 * 1024, gt=0)
    subscriber_buffer: int = Field(default=4096, gt=0)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # The agent loop's provider settings; a node without a model still runs step tasks.
    model: str | None = Field(default=None, min_length=1)
    api_base: str | None = Field(default=None, pattern=URL_PATTERN)
    api_key: str | None = Field(default=None, repr=False)
    # The range providers accept (OpenAI's is 0 to 2).
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_steps: int = Field(default=50, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    task_timeout_s: float = Field(default=3600.0, gt=0)
    model_timeout_s: float = Field(default=120.0, gt=0)
    stream_idle_timeout_s: float = Field(default=60.0, gt=0)
    model_retries: int = Field(default=4, ge=0)
    model_retry_base_s: float = Field(default=0.5, ge=0)
    max_tool_mistakes: int = Field(default=10, ge=0)

    # Mesh settings: the lease a parent renews, the label of the mesh this node belongs to.
    mesh_name: str | None = None
    parent_url: str | None = Field(default=None, pattern=URL_PATTERN)
    lease_s: float | None = Field(default=None, gt=0)
    rules_file: Path | None = None
    # More rules as a JSON list (MESH_RULES, set by topologies); validated when the node starts.
    rules: list[Any] = Field(default_factory=list)
    instructions: str | None = None
    # MCP servers attached at start; MESH_MCP_SERVERS holds them as a JSON list.
    mcp_servers: list[McpServerDecl] = Field(default_factory=list)

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        # MESH_LOG_LEVEL=INFO means info.
        return value.lower() if isinstance(value, str) else value

    @field_validator("mcp_servers", mode="before")
    @classmethod
    def _json_list(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("rules", mode="before")
    @classmethod
    def _rules_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"


# option name -> (MESH_ variable, type, help)
_OPTIONS: dict[str, tuple[type, str]] = {
    "workspace": (str, "folder the node's files, commands and snapshots are confined to"),
    "state_dir": (str, "folder for the task database, logs and snapshots (default: "
                  "WORKSPACE/../.peermesh-state-NAME)"),
    "host": (str, "address to listen on (default 127.0.0.1)"),
    "port": (int, "port to listen on; 0 picks a free one (default 8700)"),
    "token": (str, "bearer token clients must send; generated and printed once if absent"),
    "name": (str, "the node's name (default: node)"),
    "public_url": (str, "URL peers should use to reach this node"),
    "model": (str, "litellm model name for the agent loop, e.g. openai/gpt-4o-mini"),
    "api_base": (str, "base URL of an OpenAI-compatible server (vLLM, Ollama, LM Studio)"),
    "api_key": (str, "provider API key"),
    "temperature": (float, "sampling temperature"),
    "max_steps": (int, "model turns a task may take (default 50)"),
    "max_tokens": (int, "tokens a task may use in total"),
    "task_timeout_s": (float, "wall time a task may take, seconds (default 3600)"),
    "model_timeout_s": (float, "time one model call may take, seconds (default 120)"),
    "stream_idle_timeout_s": (float, "silence allowed in a model stream, seconds (default 60)"),
    "model_retries": (int, "retries of a transient provider fault (default 4)"),
    "max_tool_mistakes": (int, "invalid tool calls a task may make before it fails (default 10)"),
    "mesh_name": (str, "the mesh this node belongs to"),
    "parent_url": (str, "URL of the node that spawned this one"),
    "lease_s": (float, "stop unless the parent renews the lease within this many seconds"),
    "rules_file": (str, "YAML or JSON file of rules to load at start"),
    "rules": (str, "JSON list of rules to load after the rules file"),
    "instructions": (str, "text added to the agent's system prompt"),
    "mcp_servers": (str, "MCP servers to attach at start, as a JSON list of "
                    "{name, command | url, ...}"),
    "log_format": (str, "json, console or auto (json unless on a terminal)"),
    "log_level": (str, "debug, info, warning or error (default info)"),
}


def _env_name(option: str) -> str:
    return "MESH_" + option.upper()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m agent_runtime", description="Run one peermesh agent node."
    )
    for option, (kind, help_text) in _OPTIONS.items():
        flag = "--" + option.replace("_", "-")
        parser.add_argument(
            flag, dest=option, type=kind, default=None,
            help=f"{help_text} [env {_env_name(option)}]",
        )
    return parser


def parse_node_args(
    argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> NodeConfig:
    """Merge command-line options over MESH_* variables into a validated config."""
    environ = dict(os.environ if environ is None else environ)
    namespace = build_parser().parse_args(argv)
    return config_from_namespace(namespace, environ)


def config_from_namespace(namespace: argparse.Namespace, environ: dict[str, str]) -> NodeConfig:
    values: dict[str, object] = {}
    # Where each value came from, so that an error names the option or variable to fix.
    sources: dict[str, str] = {}
    for option in _OPTIONS:
        value = getattr(namespace, option, None)
        sources[option] = "--" + option.replace("_", "-")
        if value is None:
            value = environ.get(_env_name(option)) or None
            sources[option] = _env_name(option)
        if value is not None:
            values[option] = value

    if "workspace" not in values:
        raise ConfigError("no workspace: pass --workspace DIR or set MESH_WORKSPACE")
    workspace = Path(str(values["workspace"])).expanduser().resolve()
    values["workspace"] = workspace
    name = str(values.get("name", "node"))
    if "state_dir" not in values:
        values["state_dir"] = workspace.parent / f".peermesh-state-{workspace.name}"
    values["state_dir"] = Path(str(values["state_dir"])).expanduser().resolve()
    if "token" not in values:
        values["token"] = secrets.token_urlsafe(24)
        values["token_generated"] = True
    values["name"] = name

    try:
        return NodeConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_source(err['loc'], sources)}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid node configuration: {problems}") from exc


def _source(loc: tuple[int | str, ...], sources: dict[str, str]) -> str:
    """`--port` or `MESH_PORT` for a value that came from there, else the field's path."""
    path = ".".join(str(part) for part in loc)
    origin = sources.get(str(loc[0])) if loc else None
    return f"{origin} ({path})" if origin and len(loc) == 1 else path
