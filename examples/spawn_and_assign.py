"""Spawn a node, hand it a task, follow the task's events and read its result.

    .venv/bin/python examples/spawn_and_assign.py                    # nodes as local processes
    .venv/bin/python examples/spawn_and_assign.py --backend docker   # nodes as containers

The task is a plan of explicit tool calls, so no model is needed. The node is stopped, and
everything of the mesh removed, when the `async with` block ends.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from agent_runtime.logs import configure_logging
from mesh import Mesh

PROGRAM = "import platform\nprint('hello from', platform.node() or 'a peer')\n"


async def main(backend: str) -> int:
    async with Mesh(backend=backend) as mesh:
        node = await mesh.spawn(name="worker")
        print(f"spawned {node.name} in mesh {mesh.name} ({mesh.backend}) at {node.url}")

        peer = mesh.peer(node)
        handle = await peer.submit(steps=[
            {"tool": "write_file", "args": {"path": "hello.py", "content": PROGRAM}},
            {"tool": "terminal_exec", "args": {"command": "python3 hello.py"}},
        ])
        async for event in handle.events():
            if event.type == "tool_use":
                print(f"  {handle.id}: {event.data['tool']}")
        task = await handle.result()

        print(f"task {task.status.value}")
        print(f"output: {task.result[1]['stdout'].strip()}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["local", "docker"], default="local")
    configure_logging("console", "warning")
    sys.exit(asyncio.run(main(parser.parse_args().backend)))
