"""MCP both ways: real MCP servers attached at run time, and the node's own /mcp endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import aiohttp
import httpx2
import pytest
from aiohttp.test_utils import TestClient
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from agent_runtime.scripted_model import ScriptedModelServer, ToolCall, Turn
from mesh.runner import node_spec
from mesh.topology import TopologyError, expand_nodes, load_topology
from tests.conftest import TOKEN, NodeProcess
from tests.test_agent_loop import tool_messages, tool_names
from tests.test_tasks import submit, wait_final

ECHO_SERVER = str(Path(__file__).with_name("mcp_echo_server.py"))
SERVERS = "/api/v1/agent/mcp/servers"


def echo_decl(name: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"name": name, "command": [sys.executable, ECHO_SERVER], **extra}


async def attach(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(SERVERS, json=body)
    assert response.status == 201, await response.text()
    return dict(await response.json())


async def tool_list(client: TestClient) -> set[str]:
    return {tool["function"]["name"] for tool in await (await client.get("/api/v1/tools")).json()}


async def server_status(client: TestClient, name: str) -> dict[str, Any]:
    servers = await (await client.get(SERVERS)).json()
    return next(server for server in servers if server["name"] == name)


async def wait_for(check: Callable[[], Any], timeout: float = 15) -> None:
    async def poll() -> None:
        while not await check():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def wait_event(
    client: TestClient, task_id: str, match: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first event of the task that matches, stored or live."""
    async with client.ws_connect(f"/api/v1/agent/ws?task_id={task_id}&after=0") as ws:
        while True:
            event = await asyncio.wait_for(ws.receive_json(), 20)
            if match(event):
                return dict(event)


def result_of(tool: str, ok: bool) -> Callable[[dict[str, Any]], bool]:
    return lambda event: (event["type"] == "tool_result" and event["data"]["tool"] == tool
                          and event["data"]["ok"] is ok)


async def test_server_attached_mid_task_is_used_next_turn_and_its_death_fails_only_its_call(
    agent_client: TestClient, scripted: ScriptedModelServer, workspace: Path, tmp_path: Path
) -> None:
    wait_file = "while [ ! -f {0} ]; do sleep 0.02; done; echo {0} seen"
    scripted.add(
        Turn(tool_calls=[ToolCall("terminal_exec", {"command": wait_file.format("attached")})]),
        Turn(tool_calls=[
            ToolCall("echo__echo", {"text": "hello"}, id="first"),
            ToolCall("terminal_exec", {"command": wait_file.format("killed")}, id="wait"),
        ]),
        Turn(tool_calls=[
            ToolCall("echo__echo", {"text": "again"}, id="second"),
            ToolCall("terminal_exec", {"command": "echo still here"}, id="local"),
        ]),
        Turn(text="done"),
    )
    task_id = await submit(agent_client, description="use echo", rollback_on_failure=False)
    await wait_event(agent_client, task_id, lambda e: e["type"] == "tool_use")

    pidfile = tmp_path / "echo.pid"
    attached = await attach(agent_client, echo_decl(env={"MCP_ECHO_PIDFILE": str(pidfile)}))
    (workspace / "attached").touch()
    await wait_event(agent_client, task_id, result_of("echo__echo", ok=True))
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    await wait_for(lambda: _status_is(agent_client, "echo", "crashed"))
    (workspace / "killed").touch()
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "completed", task["error"]
    assert attached["status"] == "running"
    assert attached["tools"] == ["echo__echo", "echo__slow"]
    assert "echo__echo" not in tool_names(scripted.requests[0])
    assert "echo__echo" in tool_names(scripted.requests[-1])
    # The last request holds the whole conversation; a model call retried on a slow machine
    # would shift the others' positions.
    results = {m["tool_call_id"]: m["content"] for m in tool_messages(scripted.requests[-1])}
    assert results["first"] == "hello"
    assert results["second"].startswith("error: mcp server 'echo' is not running")
    assert "still here" in results["local"]
    status = await server_status(agent_client, "echo")
    assert status["status"] == "crashed" and "closed its connection" in status["error"]


async def _status_is(client: TestClient, name: str, status: str) -> bool:
    return (await server_status(client, name))["status"] == status


async def test_bad_attach_bodies_are_refused_naming_the_field(client: TestClient) -> None:
    cases = [
        ({"command": ["x"]}, "name"),
        ({"name": "Bad Name", "command": ["x"]}, "name"),
        # Its tools are named NAME__TOOL: a `__` in the name would make that ambiguous.
        ({"name": "a__b", "command": ["x"]}, "name"),
        ({"name": "a_", "command": ["x"]}, "name"),
        ({"name": "x"}, "`command`"),
        ({"name": "x", "command": ["x"], "url": "http://127.0.0.1:1/mcp"}, "`url`"),
        ({"name": "x", "url": "ftp://host/mcp"}, "url"),
        ({"name": "x", "command": ["x"], "headers": {"A": "b"}}, "`headers`"),
        ({"name": "x", "command": ["x"], "timeout_s": 0}, "timeout_s"),
        ({"name": "x", "command": "python 'unclosed"}, "`command`"),
        ({"name": "x", "command": ["x"], "colour": "red"}, "colour"),
    ]
    for body, field in cases:
        response = await client.post(SERVERS, json=body)
        error = (await response.json())["error"]

        assert response.status == 400, body
        assert field in error["message"], (body, error)


async def test_a_command_that_is_no_mcp_server_is_refused_and_not_listed(
    client: TestClient,
) -> None:
    missing = await client.post(SERVERS, json={"name": "gone", "command": ["/no/such/binary"]})
    silent = await client.post(SERVERS, json={"name": "mute", "command": ["sleep", "30"],
                                              "connect_timeout_s": 0.5})

    assert missing.status == 400
    assert "could not be attached" in (await missing.json())["error"]["message"]
    assert silent.status == 400
    assert "did not answer within 0.5s" in (await silent.json())["error"]["message"]
    assert await (await client.get(SERVERS)).json() == []


async def test_duplicate_name_conflicts_and_detach_removes_the_tools(client: TestClient) -> None:
    await attach(client, echo_decl())
    duplicate = await client.post(SERVERS, json=echo_decl())
    tools_attached = await tool_list(client)

    detached = await client.delete(f"{SERVERS}/echo")
    tools_after = await tool_list(client)
    again = await client.delete(f"{SERVERS}/echo")

    assert duplicate.status == 409
    assert {"echo__echo", "echo__slow"} <= tools_attached
    assert detached.status == 200
    assert (await detached.json())["status"] == "stopped"
    assert not any(name.startswith("echo__") for name in tools_after)
    assert "read_file" in tools_after
    assert again.status == 404
    assert await (await client.get(SERVERS)).json() == []


async def test_hanging_tool_times_out_and_the_server_stays_usable(client: TestClient) -> None:
    await attach(client, echo_decl(timeout_s=1))

    task_id = await submit(client, steps=[
        {"tool": "echo__slow", "args": {"seconds": 30}, "check": False},
        {"tool": "echo__echo", "args": {"text": "still answering"}},
    ])
    task = await wait_final(client, task_id)

    assert task["status"] == "completed", task["error"]
    assert "did not answer within 1s" in task["result"][0]["error"]
    assert task["result"][1] == "still answering"
    assert (await server_status(client, "echo"))["status"] == "running"


async def test_mcp_tools_keep_their_schema_and_missing_arguments_go_back_to_the_caller(
    client: TestClient,
) -> None:
    await attach(client, echo_decl())
    schemas = {t["function"]["name"]: t["function"]
               for t in await (await client.get("/api/v1/tools")).json()}

    refused = await client.post("/api/v1/agent/tasks", json={
        "steps": [{"tool": "echo__echo", "args": {}}]})

    assert schemas["echo__echo"]["parameters"]["required"] == ["text"]
    assert "[mcp server echo]" in schemas["echo__echo"]["description"]
    assert refused.status == 400
    assert "text: Field required" in (await refused.json())["error"]["message"]


async def test_ask_mode_does_not_offer_mcp_tools(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    await attach(agent_client, echo_decl())
    scripted.add(Turn(text="looked"), Turn(text="built"))

    await wait_final(agent_client, await submit(agent_client, description="a", mode="ask"))
    await wait_final(agent_client, await submit(agent_client, description="b",
                                                rollback_on_failure=False))

    assert "echo__echo" not in tool_names(scripted.requests[0])
    assert "echo__echo" in tool_names(scripted.requests[1])


async def test_node_serves_its_own_tools_to_the_official_mcp_client(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "notes.txt").write_text("from the workspace")
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async with httpx2.AsyncClient(headers=headers) as http, streamable_http_client(
        str(client.make_url("/mcp")), http_client=http
    ) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        listing = await session.list_tools()
        ran = await session.call_tool("terminal_exec", {"command": "echo hi from mcp"})
        read_back = await session.call_tool("read_file", {"path": "notes.txt"})
        outside = await session.call_tool("read_file", {"path": "../secret"})

    names = {tool.name for tool in listing.tools}
    assert {"terminal_exec", "read_file", "write_file"} <= names
    assert not ran.is_error and "hi from mcp" in ran.content[0].text
    assert ran.structured_content["exit_code"] == 0
    assert "from the workspace" in read_back.content[0].text
    assert outside.is_error


async def test_mcp_endpoint_refuses_a_missing_or_wrong_token(client: TestClient) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    accept = {"Accept": "application/json, text/event-stream"}

    missing = await client.post("/mcp", json=body, headers={**accept, "Authorization": ""})
    wrong = await client.post("/mcp", json=body,
                              headers={**accept, "Authorization": "Bearer nope-nope"})

    assert missing.status == 401 and wrong.status == 401


async def test_mcp_endpoint_refuses_a_get_stream_instead_of_holding_it_open(
    client: TestClient,
) -> None:
    response = await client.get("/mcp", headers={"Accept": "text/event-stream"})

    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert "stateless" in (await response.json())["error"]["message"]


async def test_attach_bodies_of_the_wrong_shape_are_refused_with_a_400(
    client: TestClient,
) -> None:
    nested = b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    bodies = [nested, b"[]", b'"echo"', b"{", json.dumps({"name": 5}).encode(),
              json.dumps({"name": "x", "command": {"argv": "x"}}).encode()]

    answers = [await client.post(SERVERS, data=body) for body in bodies]

    assert [answer.status for answer in answers] == [400] * len(bodies)
    assert "nested too deeply" in (await answers[0].json())["error"]["message"]


def test_starting_a_node_leaves_the_mcp_sdk_unloaded_until_mcp_is_used(tmp_path: Path) -> None:
    # The SDK takes most of a second to import; a node that never speaks MCP never pays.
    code = textwrap.dedent(f"""\
        import asyncio, json, sys
        import aiohttp
        from aiohttp import web
        from agent_runtime.app import build_app
        from agent_runtime.config import NodeConfig

        async def main():
            config = NodeConfig(workspace={str(tmp_path / "ws")!r},
                                state_dir={str(tmp_path / "state")!r}, token={TOKEN!r})
            runner = web.AppRunner(build_app(config))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = "http://127.0.0.1:%d/mcp" % runner.addresses[0][1]
            started = "mcp" in sys.modules
            headers = {{"Authorization": "Bearer {TOKEN}",
                        "Accept": "application/json, text/event-stream"}}
            async with aiohttp.ClientSession(headers=headers) as http:
                answer = await http.post(url, json={{"jsonrpc": "2.0", "id": 1,
                                                     "method": "tools/list"}})
                listing = await answer.json()
            await runner.cleanup()
            print(json.dumps({{"at_start": started, "status": answer.status,
                              "tools": [tool["name"] for tool in listing["result"]["tools"]],
                              "after_use": "mcp" in sys.modules}}))

        asyncio.run(main())
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True"))

    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["at_start"] is False
    assert seen["status"] == 200 and "terminal_exec" in seen["tools"]
    assert seen["after_use"] is True


async def test_node_attached_to_its_own_endpoint_does_not_serve_proxied_tools(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "a.txt").write_text("over http")
    attached = await attach(client, {
        "name": "self", "url": str(client.make_url("/mcp")),
        "headers": {"Authorization": f"Bearer {TOKEN}"},
    })

    task_id = await submit(client, steps=[{"tool": "self__read_file", "args": {"path": "a.txt"}}])
    task = await wait_final(client, task_id)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx2.AsyncClient(headers=headers) as http, streamable_http_client(
        str(client.make_url("/mcp")), http_client=http
    ) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        served = {tool.name for tool in (await session.list_tools()).tools}

    assert attached["transport"] == "http"
    assert "self__read_file" in attached["tools"]
    assert task["status"] == "completed", task["error"]
    assert "over http" in task["result"][0]
    assert "read_file" in served and not any(name.startswith("self__") for name in served)


def test_a_node_started_with_mcp_servers_attaches_them_and_logs_a_broken_one(
    node_process: NodeProcess, tmp_path: Path
) -> None:
    pidfile = tmp_path / "echo.pid"
    declared = [echo_decl(env={"MCP_ECHO_PIDFILE": str(pidfile)}),
                {"name": "broken", "command": ["/no/such/binary"]}]
    node_process.extra = ("--mcp-servers", json.dumps(declared))
    node_process.start()

    async def servers() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            return list(await (await http.get(node_process.url + SERVERS)).json())

    listed = asyncio.run(servers())
    pid = int(pidfile.read_text())
    exit_code = node_process.kill(signal.SIGTERM)

    assert [(s["name"], s["status"]) for s in listed] == [("echo", "running")]
    assert exit_code == 0
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_topology_mcp_servers_reach_the_node_as_one_json_list(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent("""\
        mesh:
          name: m
          mcp_servers:
            - {name: docs, url: "http://docs.local/mcp"}
            - {name: echo, command: "python old.py"}
        nodes:
          - name: worker
            mcp_servers:
              - {name: echo, command: [python, echo.py], timeout_s: 5}
        """))

    topology = load_topology(path)
    env = node_spec(topology, expand_nodes(topology)[0], tmp_path / "scratch").env

    assert json.loads(env["MESH_MCP_SERVERS"]) == [
        {"name": "docs", "url": "http://docs.local/mcp"},
        {"name": "echo", "command": ["python", "echo.py"], "timeout_s": 5.0},
    ]


def test_a_topology_mcp_server_with_two_transports_is_an_error_at_its_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent("""\
        mesh: {name: m}
        nodes:
          - name: worker
            mcp_servers:
              - name: echo
                command: python echo.py
                url: http://x/mcp
        """))

    with pytest.raises(TopologyError) as raised:
        load_topology(path)

    problem = raised.value.problems[0]
    assert problem.line == 5
    assert "exactly one of `command`" in problem.message
