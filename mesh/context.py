"""Where the `mesh` command remembers the meshes it started: names, URLs and tokens.

One JSON file per mesh under ~/.peermesh/meshes (or $PEERMESH_HOME/meshes, the spawners'
registry's home too), readable only by its owner because it holds tokens.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel, Field

from .errors import ConfigError
from .models import NodeInfo
from .spawn.registry import mesh_home

__all__ = ["MeshContext", "home", "list_contexts", "load_context", "remove_context"]


def home() -> Path:
    """The folder of the meshes this machine started; the spawners' registry lives there too."""
    return mesh_home()


def _folder() -> Path:
    return home() / "meshes"


class MeshContext(BaseModel):
    mesh: str
    backend: str
    topology: str | None = None
    supervisor_pid: int | None = None
    created_at: float = Field(default_factory=time.time)
    nodes: dict[str, NodeInfo] = Field(default_factory=dict)

    @property
    def path(self) -> Path:
        return _folder() / f"{self.mesh}.json"

    def save(self) -> None:
        folder = _folder()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.model_dump_json(indent=2))
        os.replace(tmp, self.path)


def load_context(mesh: str) -> MeshContext:
    path = _folder() / f"{mesh}.json"
    try:
        return MeshContext.model_validate_json(path.read_text())
    except FileNotFoundError:
        known = ", ".join(ctx.mesh for ctx in list_contexts()) or "none"
        raise ConfigError(f"no mesh named {mesh!r} is up (meshes: {known})") from None
    except ValueError as exc:
        raise ConfigError(f"the record of mesh {mesh!r} at {path} is damaged: {exc}") from exc


def list_contexts() -> list[MeshContext]:
    folder = _folder()
    if not folder.is_dir():
        return []
    contexts = []
    for path in sorted(folder.glob("*.json")):
        try:
            contexts.append(MeshContext.model_validate_json(path.read_text()))
        except ValueError:
            continue
    return contexts


def remove_context(mesh: str) -> None:
    (_folder() / f"{mesh}.json").unlink(missing_ok=True)
