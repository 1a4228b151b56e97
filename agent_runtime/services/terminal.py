"""Terminal service (placeholder until the real one lands)."""
from __future__ import annotations
from pathlib import Path
from aiohttp import web
from mesh.models import ExecRequest, ExecResult
from ..workspace import Workspace


class Terminal:
    def __init__(self, workspace: Workspace, output_dir: Path, output_cap: int) -> None:
        self.workspace = workspace

    async def run(self, request: ExecRequest) -> ExecResult:
        raise NotImplementedError

    async def close(self) -> None:
        pass


def add_routes(app: web.Application, node: object) -> None:
    pass


def register_tools(node: object) -> None:
    pass
