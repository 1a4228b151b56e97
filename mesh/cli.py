"""The `mesh` command."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from agent_runtime.config import build_parser as build_node_parser

    parser = argparse.ArgumentParser(prog="mesh", description="Run and drive peermesh nodes.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    node = commands.add_parser("node", help="run one agent node in the foreground",
                               description="Run one agent node in the foreground.")
    build_node_parser(node)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "node":
        from agent_runtime.__main__ import run_node

        return run_node(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
