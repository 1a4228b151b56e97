"""Where local node processes of a mesh are written down, so that `mesh down` can find them.

One JSON file per process under PEERMESH_HOME/meshes/<mesh>/ (default ~/.peermesh). A record
names a process by pid and start time together: a pid alone may have been reused by the time
someone reads the record, the pair never is. Tokens are never written here.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ValidationError

from .. import procfs

__all__ = [
    "ProcessRecord",
    "is_alive",
    "mesh_home",
    "process_start_time",
    "read_records",
    "register",
    "signal_group",
    "terminate",
    "unregister",
]

log = structlog.get_logger("mesh.spawn")


class ProcessRecord(BaseModel):
    id: str
    kind: Literal["node", "forkserver"]
    mesh: str
    pid: int
    start_time: int
    name: str = ""
    url: str = ""
    parent: str | None = None
    spawned_at: float = 0.0
    log_file: str = ""


def mesh_home() -> Path:
    return Path(os.environ.get("PEERMESH_HOME", "~/.peermesh")).expanduser()


def _mesh_dir(mesh: str) -> Path:
    return mesh_home() / "meshes" / mesh


def register(record: ProcessRecord) -> None:
    folder = _mesh_dir(record.mesh)
    folder.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a reader never sees half a record.
    path = folder / f"{record.id}.json"
    partial = path.with_suffix(".tmp")
    partial.write_text(record.model_dump_json())
    partial.replace(path)


def unregister(mesh: str, record_id: str) -> None:
    folder = _mesh_dir(mesh)
    (folder / f"{record_id}.json").unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def read_records(mesh: str | None = None) -> list[ProcessRecord]:
    """Every record of one mesh, or of all meshes; unreadable files are skipped."""
    root = mesh_home() / "meshes"
    folders = [root / mesh] if mesh else sorted(p for p in root.glob("*") if p.is_dir())
    records = []
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            try:
                records.append(ProcessRecord.model_validate_json(path.read_text()))
            except (OSError, ValidationError) as exc:
                log.debug("registry.unreadable", path=str(path), error=str(exc))
    return records


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot."""
    found = procfs.stat(pid)
    return found.start_time if found is not None else None


def is_alive(record: ProcessRecord) -> bool:
    """True if the recorded process still runs (not a zombie) and is the same process."""
    found = procfs.stat(record.pid)
    return found is not None and found.start_time == record.start_time and not found.ended


def terminate(record: ProcessRecord, grace_s: float = 5.0) -> bool:
    """SIGTERM the recorded process's group, SIGKILL it after `grace_s`; False if it was gone.

    Blocking; call it from a thread in async code.
    """
    if not is_alive(record):
        return False
    signal_group(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while is_alive(record):
        if time.monotonic() >= deadline:
            signal_group(record.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    return True


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group a node leads, or the node alone if it leads none yet."""
    # A node leads its own session and process group; its group holds what it started. One
    # forked a moment ago may not have called setsid() yet.
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            continue
