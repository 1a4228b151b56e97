"""Daemons outlive their request, restart by policy, log to a file and stop with the node."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp.test_utils import TestClient

from agent_runtime.node import Node
from agent_runtime.services.terminal import MAX_ARG_BYTES
from agent_runtime.tools import ToolContext

from conftest import TOKEN, NodeProcess


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    """Poll `check` until it returns something truthy; that value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check.__name__}")
        await asyncio.sleep(0.05)


def process_gone(pid: int) -> bool:
    """Whether the process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in (b"Z", b"X")


async def read_pid(path: Path) -> int:
    async def written() -> str:
        return path.read_text().strip() if path.exists() else ""

    return int(await eventually(written))


async def start(client: TestClient, **spec: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/daemons", json=spec)
    assert response.status == 201, await response.text()
    return await response.json()


async def info(client: TestClient, name: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/daemons/{name}")
    assert response.status == 200
    return await response.json()


async def until_status(client: TestClient, name: str, *statuses: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        body = await info(client, name)
        return body if body["status"] in statuses else None

    return await eventually(reached)


async def test_daemon_keeps_running_after_the_request_returns_and_writes_its_log(
    client: TestClient, workspace: Path
) -> None:
    body = await start(
        client, name="ticker", command="echo started; while true; do echo tick; sleep 0.05; done"
    )
    assert body["status"] == "running"
    assert body["pid"] > 0

    async def ticked_twice() -> bool:
        return Path(body["log_file"]).read_text().count("tick") >= 2

    await eventually(ticked_twice)
    assert Path(body["log_file"]).read_text().startswith("started\n")
    assert Path(body["log_file"]).name == "ticker.log"
    assert not process_gone(body["pid"])
    listed = await (await client.get("/api/v1/daemons")).json()
    assert [(d["name"], d["status"]) for d in listed] == [("ticker", "running")]


async def test_logs_tail_returns_the_last_lines(client: TestClient) -> None:
    await start(client, name="counter", command="seq 1 500")
    await until_status(client, "counter", "exited")

    response = await client.get("/api/v1/daemons/counter/logs", params={"tail": "3"})
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.text() == "498\n499\n500\n"

    default = await (await client.get("/api/v1/daemons/counter/logs")).text()
    assert default.splitlines() == [str(n) for n in range(301, 501)]

    bad = await client.get("/api/v1/daemons/counter/logs", params={"tail": "many"})
    assert bad.status == 400
    assert (await bad.json())["error"]["details"]["errors"][0]["field"] == "tail"


async def test_follow_streams_new_lines_as_they_are_written(
    client: TestClient, workspace: Path
) -> None:
    await start(
        client, name="waiter",
        command="echo first; while [ ! -e go ]; do sleep 0.05; done; echo second",
    )
    response = await client.get("/api/v1/daemons/waiter/logs", params={"follow": "1"})
    assert response.status == 200

    first = await asyncio.wait_for(response.content.readline(), 10)
    assert first == b"first\n"
    (workspace / "go").touch()
    second = await asyncio.wait_for(response.content.readline(), 10)
    assert second == b"second\n"

    # The stream ends by itself once the daemon has exited.
    rest = await asyncio.wait_for(response.content.read(), 10)
    assert rest == b""


async def test_stop_kills_the_whole_process_group(client: TestClient, workspace: Path) -> None:
    body = await start(
        client, name="parent", command="sleep 1000 & echo $! > child.pid; wait"
    )
    child = await read_pid(workspace / "child.pid")

    response = await client.post("/api/v1/daemons/parent/stop")
    assert response.status == 200
    stopped = await response.json()
    assert stopped["status"] == "stopped"
    assert stopped["pid"] is None

    async def both_gone() -> bool:
        return process_gone(child) and process_gone(body["pid"])

    await eventually(both_gone)


async def test_on_failure_restarts_a_crashing_command_and_counts_restarts(
    client: TestClient, workspace: Path
) -> None:
    await start(
        client, name="crasher", command="echo run >> runs.txt; exit 3", restart="on-failure"
    )

    async def ran_three_times() -> dict[str, Any] | None:
        # The count goes up as a restart begins, a moment before that run writes its line.
        body = await info(client, "crasher")
        runs = workspace / "runs.txt"
        ran = len(runs.read_text().splitlines()) if runs.exists() else 0
        return body if body["restarts"] >= 2 and ran >= 3 else None

    body = await eventually(ran_three_times)
    assert body["exit_code"] == 3
    assert body["status"] in ("running", "backoff")

    stopped = await (await client.post("/api/v1/daemons/crasher/stop")).json()
    assert stopped["status"] == "stopped"


async def test_on_failure_does_not_restart_a_clean_exit(client: TestClient) -> None:
    await start(client, name="clean", command="true", restart="on-failure")
    body = await until_status(client, "clean", "exited")
    assert (body["exit_code"], body["restarts"]) == (0, 0)


async def test_restart_no_leaves_it_exited_with_its_exit_code(client: TestClient) -> None:
    await start(client, name="once", command="exit 7")
    body = await until_status(client, "once", "exited")
    assert body["exit_code"] == 7
    assert body["restarts"] == 0
    assert body["pid"] is None


async def test_duplicate_name_is_refused_with_409_while_running(client: TestClient) -> None:
    await start(client, name="dup", command="sleep 1000")
    response = await client.post("/api/v1/daemons", json={"name": "dup", "command": "true"})
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "conflict"


async def test_a_finished_daemons_name_can_be_used_again(client: TestClient) -> None:
    await start(client, name="again", command="exit 1")
    await until_status(client, "again", "exited")
    body = await start(client, name="again", command="sleep 1000")
    assert body["status"] == "running"


async def test_bad_name_is_refused_with_400_naming_name(client: TestClient) -> None:
    response = await client.post("/api/v1/daemons", json={"name": "../x", "command": "true"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "bad_request"
    assert [e["field"] for e in error["details"]["errors"]] == ["name"]


async def test_cwd_must_be_a_folder_inside_the_workspace(client: TestClient) -> None:
    outside = await client.post(
        "/api/v1/daemons", json={"name": "out", "command": "true", "cwd": "../.."}
    )
    assert outside.status == 403

    missing = await client.post(
        "/api/v1/daemons", json={"name": "gone", "command": "true", "cwd": "nowhere"}
    )
    assert missing.status == 400
    assert (await missing.json())["error"]["details"]["errors"][0]["field"] == "cwd"


async def test_a_command_over_the_systems_argument_limit_is_a_400_and_starts_nothing(
    client: TestClient,
) -> None:
    response = await client.post("/api/v1/daemons", json={
        "name": "huge", "command": "echo " + "x" * (MAX_ARG_BYTES + 1),
    })
    error = (await response.json())["error"]

    assert response.status == 400, error
    assert "command" in error["message"] and str(MAX_ARG_BYTES) in error["message"]
    assert (await client.get("/api/v1/daemons/huge")).status == 404


async def test_unknown_daemon_is_404(client: TestClient) -> None:
    for method, path in [
        ("GET", "/api/v1/daemons/nope"),
        ("GET", "/api/v1/daemons/nope/logs"),
        ("POST", "/api/v1/daemons/nope/stop"),
        ("POST", "/api/v1/daemons/nope/restart"),
        ("DELETE", "/api/v1/daemons/nope"),
    ]:
        response = await client.request(method, path)
        assert response.status == 404, path
        assert (await response.json())["error"]["details"] == {"name": "nope"}


async def test_restart_runs_a_new_process_and_delete_forgets_the_daemon(
    client: TestClient,
) -> None:
    first = await start(client, name="svc", command="sleep 1000")
    restarted = await (await client.post("/api/v1/daemons/svc/restart")).json()
    assert restarted["status"] == "running"
    assert restarted["pid"] != first["pid"]

    async def old_gone() -> bool:
        return process_gone(first["pid"])

    await eventually(old_gone)

    deleted = await client.delete("/api/v1/daemons/svc")
    assert deleted.status == 200
    assert (await deleted.json())["status"] == "stopped"
    assert await (await client.get("/api/v1/daemons")).json() == []
    assert not Path(first["log_file"]).exists()


async def test_daemon_gets_a_non_interactive_environment_and_its_own_variables(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "sub").mkdir()
    await start(
        client, name="env", command='echo "$CI $PAGER $GREETING"; pwd', cwd="sub",
        env={"GREETING": "hello"},
    )
    await until_status(client, "env", "exited")
    text = await (await client.get("/api/v1/daemons/env/logs")).text()
    assert text.splitlines() == ["1 cat hello", str(workspace.resolve() / "sub")]


async def test_running_daemons_are_counted_in_the_metrics(client: TestClient, node: Node) -> None:
    def running() -> float | None:
        return node.metrics.registry.get_sample_value("peermesh_daemons_running")

    await start(client, name="counted", command="sleep 1000")
    assert running() == 1
    await client.post("/api/v1/daemons/counted/stop")
    assert running() == 0


async def test_daemon_tools_start_read_logs_and_stop(client: TestClient, node: Node) -> None:
    ctx = ToolContext()
    started = await node.tools.get("daemon_start").call(
        ctx, {"name": "tool-made", "command": "echo hello from tool; sleep 1000"}
    )
    assert started.status == "running"
    assert node.tools.get("daemon_start").executes

    async def said_hello() -> str:
        text = await node.tools.get("daemon_logs").call(ctx, {"name": "tool-made"})
        return text if "hello from tool" in text else ""

    await eventually(said_hello)
    stopped = await node.tools.get("daemon_stop").call(ctx, {"name": "tool-made"})
    assert stopped.status == "stopped"


def test_stopping_the_node_stops_its_daemons(node_process: NodeProcess) -> None:
    node_process.start()
    workspace = node_process.workspace

    async def start_daemon() -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            response = await http.post(
                f"{node_process.url}/api/v1/daemons",
                json={"name": "lingerer",
                      "command": "sleep 1000 & echo $! > child.pid; echo $$ > daemon.pid; wait"},
            )
            assert response.status == 201, await response.text()
        await read_pid(workspace / "child.pid")
        await read_pid(workspace / "daemon.pid")

    asyncio.run(start_daemon())
    daemon = int((workspace / "daemon.pid").read_text())
    child = int((workspace / "child.pid").read_text())
    assert not process_gone(daemon)

    assert node_process.kill(signal.SIGTERM) == 0

    async def all_gone() -> bool:
        return process_gone(daemon) and process_gone(child)

    asyncio.run(eventually(all_gone, timeout=5))
    assert os.path.exists(workspace / "daemon.pid")
