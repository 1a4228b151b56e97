"""An agent that spawns another agent with its own tools, gives it work and reads its file.

    .venv/bin/python examples/agent_spawns_agent.py                    # local processes
    MESH_MODEL=openai/gpt-4o-mini OPENAI_API_KEY=... \\
        .venv/bin/python examples/agent_spawns_agent.py                # with a real model
    .venv/bin/python examples/agent_spawns_agent.py --steps            # as a plan, no model
    .venv/bin/python examples/agent_spawns_agent.py --backend docker   # containers

The lead node runs in orchestrator mode, where its tools are the peer tools: spawn_peer,
assign_task, read_peer_file and fan_out. With MESH_MODEL set (and MESH_API_BASE/MESH_API_KEY
if the provider needs them) a real model decides the calls. Without one, the calls come from
a scripted model served by this script on loopback, through the same agent loop; containers
cannot reach this host's loopback, so on the docker backend without a model the lead runs
the same calls as a plan of steps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from typing import Any, AsyncIterator

from agent_runtime.logs import configure_logging
from agent_runtime.scripted_model import ScriptedModelServer, ToolCall, Turn
from mesh import Mesh, NodeSpec, Peer

POEM = "Two machines, one task:\nthe first one asks, the second writes,\nneither works alone.\n"
REQUEST = (
    "Spawn a peer named writer with spawn_peer. With assign_task, ask it to write a short "
    "poem about computers working together into the file poem.txt in its workspace. Then "
    "read poem.txt from it with read_peer_file and answer with the poem."
)
WRITE_POEM = [{"tool": "write_file", "args": {"path": "poem.txt", "content": POEM}}]
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("spawn_peer", {"name": "writer"}),
    ("assign_task", {"node": "writer", "steps": WRITE_POEM}),
    ("read_peer_file", {"node": "writer", "path": "poem.txt"}),
]


@contextlib.asynccontextmanager
async def model_for_lead(use_steps: bool) -> AsyncIterator[NodeSpec]:
    """The lead's spec: a real model from MESH_MODEL, the scripted one, or none for a plan."""
    if os.environ.get("MESH_MODEL"):
        env = {"MESH_API_KEY": os.environ["MESH_API_KEY"]} if "MESH_API_KEY" in os.environ \
            else {}
        yield NodeSpec(name="lead", model=os.environ["MESH_MODEL"],
                       api_base=os.environ.get("MESH_API_BASE"), env=env)
        return
    if use_steps:
        yield NodeSpec(name="lead")
        return
    async with ScriptedModelServer() as scripted:
        scripted.add(*(Turn(tool_calls=[ToolCall(name, args)]) for name, args in CALLS))
        scripted.add(Turn(text="The writer's poem:\n" + POEM))
        yield NodeSpec(name="lead", model="openai/scripted", api_base=scripted.api_base,
                       env={"MESH_API_KEY": "scripted"})


async def follow(lead: Peer, use_steps: bool) -> Any:
    """Run the lead's task, printing each peer tool call as it happens; return its result."""
    if use_steps:
        handle = await lead.submit(steps=[{"tool": name, "args": args} for name, args in CALLS])
    else:
        handle = await lead.submit(REQUEST, mode="orchestrator")
    async for event in handle.events():
        if event.type == "tool_use":
            print(f"  lead calls {event.data['tool']}")
        elif event.type == "tool_result":
            output = " ".join(str(event.data.get("output", "")).split())
            status = "ok" if event.data.get("ok") else "failed"
            print(f"    {status}: {output[:90]}")
    return (await handle.result(timeout=600)).result


async def main(backend: str, use_steps: bool) -> int:
    use_steps = use_steps or (backend == "docker" and not os.environ.get("MESH_MODEL"))
    async with model_for_lead(use_steps) as spec, Mesh(backend=backend) as mesh:
        lead = await mesh.spawn(spec)
        how = "a plan of steps" if use_steps else f"orchestrator mode, model {spec.model}"
        print(f"lead at {lead.url} in mesh {mesh.name}, in {how}")
        result = await follow(mesh.peer(lead), use_steps)

    # A plan returns each step's result; the agent returns its answer.
    answer = result[-1] if use_steps else result
    print("answer:")
    for line in str(answer).strip().splitlines():
        print(f"  {line}")
    return 0 if str(answer).strip() else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["local", "docker"], default="local")
    parser.add_argument("--steps", action="store_true",
                        help="drive the peer tools with a plan of steps instead of a model")
    args = parser.parse_args()
    configure_logging("console", "warning")
    sys.exit(asyncio.run(main(args.backend, args.steps)))
