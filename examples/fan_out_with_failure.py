"""Three specialists in parallel, one of which fails: the failure stays on its own branch.

    .venv/bin/python examples/fan_out_with_failure.py                    # local processes
    .venv/bin/python examples/fan_out_with_failure.py --backend docker   # containers

Each branch gets a node spawned for the purpose and stopped when it is done. Progress is
printed per branch as it happens; the report lists every branch in the order given, the
failing one with its reason. The script exits 0 when the fan-out behaved so: two results and
one isolated failure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from agent_runtime.logs import configure_logging
from mesh import Mesh, NodeSpec
from mesh.fanout import Assignment, BranchState, FailureKind


def shell(command: str) -> dict[str, object]:
    return {"steps": [{"tool": "terminal_exec", "args": {"command": command}}]}


SPECIALISTS = [
    ("tests", shell("sleep 1; python3 -c 'assert sum(range(10)) == 45'; echo '1 passed'")),
    ("lint", shell("sleep 1; echo 'app.py:3: E501 line too long' >&2; exit 1")),
    ("docs", shell("sleep 1; echo '4 pages built'")),
]


def show(index: int, name: str, state: BranchState, detail: str) -> None:
    if state is not BranchState.WAITING:
        print(f"  [{name}] {state.value} {detail}".rstrip(), flush=True)


async def main(backend: str) -> int:
    async with Mesh(backend=backend) as mesh:
        assignments = [Assignment(task=task, spec=NodeSpec(name=name))
                       for name, task in SPECIALISTS]
        outcomes = await mesh.fan_out(assignments, limit=3, timeout=120, on_progress=show)

    print("report:")
    for outcome in outcomes:
        if outcome.succeeded:
            print(f"  {outcome.name:6} succeeded: {outcome.result[0]['stdout'].strip()}")
        else:
            print(f"  {outcome.name:6} FAILED ({outcome.failure.value}): {outcome.reason}")
    failed = [o.name for o in outcomes if not o.succeeded]
    isolated = failed == ["lint"] and outcomes[1].failure is FailureKind.TASK_FAILED
    return 0 if isolated else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["local", "docker"], default="local")
    configure_logging("console", "warning")
    sys.exit(asyncio.run(main(parser.parse_args().backend)))
