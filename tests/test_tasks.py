"""Tasks: explicit steps run in order without a model, with every change an event."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient


async def submit(client: TestClient, **body: Any) -> str:
    response = await client.post("/api/v1/agent/tasks", json=body)
    assert response.status == 202, await response.text()
    return str((await response.json())["id"])


async def wait_final(client: TestClient, task_id: str, timeout: float = 30) -> dict[str, Any]:
    async def poll() -> dict[str, Any]:
        while True:
            task = await (await client.get(f"/api/v1/agent/tasks/{task_id}")).json()
            if task["status"] in ("completed", "failed", "cancelled", "interrupted"):
                return task
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), timeout)


async def events_of(client: TestClient, task_id: str) -> list[dict[str, Any]]:
    ws = await client.ws_connect(f"/api/v1/agent/ws?task_id={task_id}&after=0")
    seen: list[dict[str, Any]] = []
    async with ws:
        while True:
            event = await asyncio.wait_for(ws.receive_json(), 10)
            seen.append(event)
            if event["type"] in ("task.completed", "task.failed", "task.cancelled",
                                 "task.interrupted"):
                return seen


def exec_step(command: str, **extra: Any) -> dict[str, Any]:
    return {"tool": "terminal_exec", "args": {"command": command}, **extra}


async def test_step_task_runs_its_steps_in_order_and_completes(client: TestClient) -> None:
    task_id = await submit(client, steps=[
        exec_step("echo one > order.txt"), exec_step("echo two >> order.txt"),
        {"tool": "read_file", "args": {"path": "order.txt"}},
    ])

    task = await wait_final(client, task_id)

    assert task["status"] == "completed", task["error"]
    assert "one\ntwo" in task["result"][2]
    types = [event["type"] for event in await events_of(client, task_id)]
    assert types == ["task.created", "task.started"] + ["tool_use", "tool_result"] * 3 + [
        "task.completed"]


async def test_events_carry_growing_seq_and_tool_call_ids(client: TestClient) -> None:
    task_id = await submit(client, steps=[exec_step("true"), exec_step("true")])
    await wait_final(client, task_id)

    events = await events_of(client, task_id)

    seqs = [event["seq"] for event in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    uses = [e["data"]["call_id"] for e in events if e["type"] == "tool_use"]
    results = [e["data"]["call_id"] for e in events if e["type"] == "tool_result"]
    assert uses == results == ["step-0", "step-1"]


async def test_failing_step_fails_the_task_naming_the_step_and_exit_code(
    client: TestClient,
) -> None:
    task_id = await submit(client, steps=[
        exec_step("echo fine"), exec_step("echo broken >&2; exit 3"), exec_step("touch never"),
    ])

    task = await wait_final(client, task_id)

    assert task["status"] == "failed"
    assert "step 1 (terminal_exec) exited with 3" in task["error"]
    assert "broken" in task["error"]
    stat = await client.get("/api/v1/stat/never")
    assert stat.status == 404


async def test_step_with_check_off_lets_the_task_go_on(client: TestClient) -> None:
    task_id = await submit(client, steps=[exec_step("exit 1", check=False), exec_step("true")])

    task = await wait_final(client, task_id)

    assert task["status"] == "completed"
    assert task["result"][0]["exit_code"] == 1


async def test_unknown_step_tool_is_refused_naming_the_step(client: TestClient) -> None:
    response = await client.post("/api/v1/agent/tasks", json={
        "steps": [exec_step("true"), {"tool": "execute_python", "args": {}}]})

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["details"]["field"] == "steps.1"
    assert "execute_python" in error["message"] and "terminal_exec" in error["message"]


async def test_step_with_wrong_argument_type_is_refused(client: TestClient) -> None:
    response = await client.post("/api/v1/agent/tasks", json={
        "steps": [{"tool": "terminal_exec", "args": {"command": 42}}]})

    assert response.status == 400
    assert "command" in (await response.json())["error"]["message"]


async def test_description_only_task_fails_with_no_model_configured(client: TestClient) -> None:
    task_id = await submit(client, description="write a haiku")

    task = await wait_final(client, task_id)

    assert task["status"] == "failed"
    assert "no model configured" in task["error"]


async def test_task_without_description_or_steps_is_refused(client: TestClient) -> None:
    response = await client.post("/api/v1/agent/tasks", json={"mode": "code"})

    assert response.status == 400
    assert "description" in (await response.json())["error"]["message"]


async def test_unknown_mode_is_refused_naming_the_field(client: TestClient) -> None:
    response = await client.post(
        "/api/v1/agent/tasks", json={"description": "x", "mode": "yolo"})

    assert response.status == 400
    assert "mode" in (await response.json())["error"]["message"]


async def test_cancel_stops_a_running_step_and_its_process(client: TestClient) -> None:
    task_id = await submit(client, steps=[exec_step("echo $$ > pid.txt; exec sleep 30")])
    async with client.ws_connect(f"/api/v1/agent/ws?task_id={task_id}&after=0") as ws:
        while (await asyncio.wait_for(ws.receive_json(), 10))["type"] != "tool_use":
            pass

    response = await client.post(f"/api/v1/agent/tasks/{task_id}/cancel")
    task = await wait_final(client, task_id, timeout=10)

    assert response.status == 202
    assert task["status"] == "cancelled"


async def test_cancel_of_a_finished_task_is_a_conflict(client: TestClient) -> None:
    task_id = await submit(client, steps=[exec_step("true")])
    await wait_final(client, task_id)

    response = await client.post(f"/api/v1/agent/tasks/{task_id}/cancel")

    assert response.status == 409
    assert "completed" in (await response.json())["error"]["message"]


async def test_mode_change_on_a_running_task_is_an_event(client: TestClient) -> None:
    task_id = await submit(client, mode="debug", steps=[exec_step("sleep 0.5")])

    response = await client.patch(f"/api/v1/agent/tasks/{task_id}/mode", json={"mode": "code"})
    await wait_final(client, task_id)

    assert response.status == 200
    changes = [e for e in await events_of(client, task_id) if e["type"] == "mode.changed"]
    assert changes[0]["data"] == {"from": "debug", "to": "code"}


async def test_unknown_task_id_is_404_in_the_error_shape(client: TestClient) -> None:
    for method, path in [("GET", "/api/v1/agent/tasks/nope"),
                         ("POST", "/api/v1/agent/tasks/nope/cancel"),
                         ("GET", "/api/v1/agent/tasks/nope/events")]:
        response = await client.request(method, path)
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"


async def test_malformed_json_is_a_400_not_a_500(client: TestClient) -> None:
    response = await client.post(
        "/api/v1/agent/tasks", data=b'{"description": ',
        headers={"Content-Type": "application/json"})

    assert response.status == 400
    assert "malformed JSON" in (await response.json())["error"]["message"]


async def test_oversized_body_is_a_413(client: TestClient) -> None:
    body = io.BytesIO(b'{"description": "' + b"x" * (9 << 20) + b'"}')
    response = await client.post("/api/v1/agent/tasks", data=body)

    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"


async def test_listing_filters_by_status(client: TestClient) -> None:
    done = await submit(client, steps=[exec_step("true")])
    failed = await submit(client, steps=[exec_step("false")])
    await wait_final(client, done)
    await wait_final(client, failed)

    listed = await (await client.get("/api/v1/agent/tasks?status=failed")).json()
    bad = await client.get("/api/v1/agent/tasks?status=sideways")

    assert [task["id"] for task in listed] == [failed]
    assert bad.status == 400


async def test_ask_task_with_a_writing_step_is_refused_and_writes_nothing(
    client: TestClient, workspace: Path,
) -> None:
    response = await client.post("/api/v1/agent/tasks", json={
        "mode": "ask", "steps": [{"tool": "write_file",
                                  "args": {"path": "ask.txt", "content": "x"}}]})

    assert response.status == 400
    assert "not allowed in ask mode" in (await response.json())["error"]["message"]
    assert not (workspace / "ask.txt").exists()


async def test_architect_steps_may_write_plans_but_not_code(client: TestClient) -> None:
    plan = await client.post("/api/v1/agent/tasks", json={
        "mode": "architect", "steps": [{"tool": "write_file",
                                        "args": {"path": "PLAN.md", "content": "# plan"}}]})
    code = await client.post("/api/v1/agent/tasks", json={
        "mode": "architect", "steps": [{"tool": "write_file",
                                        "args": {"path": "app.py", "content": "x = 1"}}]})

    assert plan.status == 202
    assert code.status == 400
    assert "Markdown" in (await code.json())["error"]["message"]


async def test_an_empty_steps_list_is_refused_naming_steps(client: TestClient) -> None:
    response = await client.post("/api/v1/agent/tasks", json={"description": "x", "steps": []})

    assert response.status == 400
    assert (await response.json())["error"]["details"]["field"] == "steps"
