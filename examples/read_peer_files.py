"""Read a peer's files: list its workspace, read a text file, stream a large one to disk.

    .venv/bin/python examples/read_peer_files.py                    # local processes
    .venv/bin/python examples/read_peer_files.py --backend docker   # containers
    .venv/bin/python examples/read_peer_files.py --into /tmp/out    # keep the downloaded file

A node runs a small build that writes a report and a data file; this script then looks at
what the node produced through the files service, without any shared folder.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from agent_runtime.logs import configure_logging
from mesh import Mesh

BUILD = (
    "mkdir -p out && "
    "python3 -c \"print('\\n'.join(f'row {i}' for i in range(100000)))\" > out/data.txt && "
    "printf 'rows: %s\\nstatus: ok\\n' \"$(wc -l < out/data.txt)\" > out/report.txt"
)


async def main(backend: str, into: Path) -> int:
    async with Mesh(backend=backend) as mesh:
        node = await mesh.spawn(name="builder")
        peer = mesh.peer(node)
        await (await peer.submit(steps=[
            {"tool": "terminal_exec", "args": {"command": BUILD}},
        ])).result()

        print(f"files on {node.name}:")
        listing = await peer.list("out", recursive=True)
        for entry in sorted(listing.entries, key=lambda e: e.path):
            print(f"  {entry.path} ({entry.type}, {entry.size} bytes)")

        print("out/report.txt says:")
        for line in (await peer.read_text("out/report.txt")).splitlines():
            print(f"  {line}")

        # A large file comes over in chunks and appears locally only once it is whole.
        local = await peer.download("out/data.txt", into / "data.txt")
        with local.open() as data:
            rows = sum(1 for _ in data)
        print(f"downloaded out/data.txt to {local}: {rows} rows")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["local", "docker"], default="local")
    parser.add_argument("--into", type=Path, help="folder for the downloaded file "
                        "(default: a temporary one, removed at the end)")
    args = parser.parse_args()
    configure_logging("console", "warning")
    if args.into is not None:
        args.into.mkdir(parents=True, exist_ok=True)
        sys.exit(asyncio.run(main(args.backend, args.into)))
    with tempfile.TemporaryDirectory() as scratch:
        sys.exit(asyncio.run(main(args.backend, Path(scratch))))
