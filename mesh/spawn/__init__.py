"""Spawners: how a node, or the library, creates sibling nodes of a mesh.

`LocalSpawner` runs nodes as local processes, `DockerSpawner` as containers; both answer to
the `Spawner` interface. `reap` removes whatever a mesh left behind, by label and registry.
"""

import importlib
from typing import TYPE_CHECKING

from .base import Spawner as Spawner

if TYPE_CHECKING:
    from .docker import DockerSpawner as DockerSpawner
    from .local import LocalSpawner as LocalSpawner
    from .reaper import reap as reap

__all__ = ["DockerSpawner", "LocalSpawner", "Spawner", "reap"]

# Loaded on first use: the fork server imports this package and must not pay for the Docker
# SDK in every node it forks.
_LAZY = {
    "DockerSpawner": "mesh.spawn.docker",
    "LocalSpawner": "mesh.spawn.local",
    "reap": "mesh.spawn.reaper",
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'mesh.spawn' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
