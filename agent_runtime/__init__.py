"""The peermesh agent node: an aiohttp server that gives an agent a whole computer."""

from .app import build_app, serve
from .config import NodeConfig, parse_node_args
from .node import Node

__all__ = ["Node", "NodeConfig", "build_app", "parse_node_args", "serve"]
