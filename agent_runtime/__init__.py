"""The peermesh agent node: an aiohttp server that gives an agent a whole computer."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import build_app as build_app
    from .app import serve as serve
    from .config import NodeConfig as NodeConfig
    from .config import parse_node_args as parse_node_args
    from .node import Node as Node

__all__ = ["Node", "NodeConfig", "build_app", "parse_node_args", "serve"]

# Loaded on first use: `mesh` and the fork server import submodules such as agent_runtime.logs
# and must not pay for the whole node (over a second of imports) to do so.
_LAZY = {
    "Node": "agent_runtime.node",
    "NodeConfig": "agent_runtime.config",
    "build_app": "agent_runtime.app",
    "parse_node_args": "agent_runtime.config",
    "serve": "agent_runtime.app",
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'agent_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
