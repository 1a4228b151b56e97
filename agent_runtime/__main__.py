"""`python -m agent_runtime`: run one node, configured by options or MESH_* variables."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from mesh.errors import ConfigError

from .app import serve
from .config import build_parser, config_from_namespace
from .logs import configure_logging


def run_node(namespace: argparse.Namespace) -> int:
    try:
        config = config_from_namespace(namespace, dict(os.environ))
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    configure_logging(config.log_format, config.log_level)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        # Found only when the node builds itself, such as a broken rules file.
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"error: cannot listen on {config.host}:{config.port}: {exc}\n")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_node(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
