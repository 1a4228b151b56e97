"""placeholder"""
from __future__ import annotations
from typing import Any
from aiohttp import web


class Daemons:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


def add_routes(app: web.Application, node: object) -> None:
    pass


def register_tools(node: object) -> None:
    pass
