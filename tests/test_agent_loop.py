"""The agent loop, driven by a scripted model through litellm's real client path."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agent_runtime.app import build_app
from agent_runtime.scripted_model import ScriptedModelServer, ToolCall, Turn
from tests.conftest import TOKEN, make_config
from tests.test_tasks import events_of, submit, wait_final


def tool_names(request: dict[str, Any]) -> set[str]:
    return {tool["function"]["name"] for tool in request.get("tools", [])}


def tool_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [message for message in request["messages"] if message["role"] == "tool"]


async def test_text_answer_completes_the_task_with_streamed_message_events(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(text="The answer is 42. " * 30, chunk_chars=7))

    task_id = await submit(agent_client, description="What is the answer?")
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "completed", task["error"]
    assert task["result"] == "The answer is 42. " * 30
    messages = [e for e in await events_of(agent_client, task_id) if e["type"] == "message"]
    assert len(messages) > 1
    assert "".join(e["data"]["text"] for e in messages) == task["result"]
    assert task["usage"]["total_tokens"] == 15


async def test_cut_off_tool_arguments_come_back_as_an_error_and_the_task_goes_on(
    agent_client: TestClient, scripted: ScriptedModelServer, workspace: Path
) -> None:
    scripted.add(
        Turn(tool_calls=[ToolCall("write_file", '{"path": "a.txt", "content": "x')]),
        Turn(tool_calls=[ToolCall("write_file", {"path": "a.txt", "content": "fixed"})]),
        Turn(text="done"),
    )

    task_id = await submit(agent_client, description="write a.txt")
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "completed", task["error"]
    first_result = tool_messages(scripted.requests[1])[0]["content"]
    assert "not valid JSON" in first_result
    assert (workspace / "a.txt").read_text() == "fixed"
    results = [e for e in await events_of(agent_client, task_id) if e["type"] == "tool_result"]
    assert [r["data"]["ok"] for r in results] == [False, True]


async def test_unknown_tool_is_answered_with_the_modes_tools(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(tool_calls=[ToolCall("execute_python", {"code": "1+1"})]),
                 Turn(text="ok"))

    task_id = await submit(agent_client, description="compute", mode="ask")
    await wait_final(agent_client, task_id)

    content = tool_messages(scripted.requests[1])[0]["content"]
    assert "unknown tool 'execute_python'" in content
    assert "read_file" in content and "ask mode" in content
    assert "write_file" not in content and "terminal_exec" not in content


async def test_ask_mode_refuses_write_file_and_writes_nothing(
    agent_client: TestClient, scripted: ScriptedModelServer, workspace: Path
) -> None:
    scripted.add(Turn(tool_calls=[ToolCall("write_file", {"path": "x.txt", "content": "no"})]),
                 Turn(text="I could not write."))

    task_id = await submit(agent_client, description="write x.txt", mode="ask")
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "completed"
    assert not (workspace / "x.txt").exists()
    assert "not allowed in ask mode" in tool_messages(scripted.requests[1])[0]["content"]
    assert "write_file" not in tool_names(scripted.requests[0])


async def test_architect_may_write_markdown_but_not_code(
    agent_client: TestClient, scripted: ScriptedModelServer, workspace: Path
) -> None:
    scripted.add(Turn(tool_calls=[
        ToolCall("write_file", {"path": "PLAN.md", "content": "# plan"}, id="a"),
        ToolCall("write_file", {"path": "main.py", "content": "print()"}, id="b"),
    ]), Turn(text="planned"))

    task_id = await submit(agent_client, description="plan", mode="architect")
    await wait_final(agent_client, task_id)

    assert (workspace / "PLAN.md").read_text() == "# plan"
    assert not (workspace / "main.py").exists()
    refused = {m["tool_call_id"]: m["content"] for m in tool_messages(scripted.requests[1])}
    assert "only write Markdown" in refused["b"]


async def test_mode_switch_mid_task_gives_the_next_turn_the_new_tools(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(
        Turn(tool_calls=[ToolCall("list_files", {"path": "."})]),
        Turn(tool_calls=[ToolCall("list_files", {"path": "."})], stall_next_s=0.3),
        Turn(tool_calls=[ToolCall("terminal_exec", {"command": "echo switched"})]),
        Turn(text="done"),
    )
    task_id = await submit(agent_client, description="plan then build", mode="architect",
                           rollback_on_failure=False)
    async with agent_client.ws_connect(f"/api/v1/agent/ws?task_id={task_id}&after=0") as ws:
        while (await asyncio.wait_for(ws.receive_json(), 10))["type"] != "tool_result":
            pass

    response = await agent_client.patch(
        f"/api/v1/agent/tasks/{task_id}/mode", json={"mode": "code"})
    task = await wait_final(agent_client, task_id)

    assert response.status == 200
    assert task["status"] == "completed", task["error"]
    assert "terminal_exec" not in tool_names(scripted.requests[0])
    assert "terminal_exec" in tool_names(scripted.requests[2])
    assert "switched" in tool_messages(scripted.requests[3])[-1]["content"]
    types = [e["type"] for e in await events_of(agent_client, task_id)]
    assert types.index("mode.changed") < max(
        i for i, kind in enumerate(types) if kind == "tool_use")


async def test_failed_code_task_rolls_the_workspace_back_byte_identical(
    agent_client: TestClient, scripted: ScriptedModelServer, workspace: Path
) -> None:
    (workspace / "src").mkdir(parents=True)
    (workspace / "src" / "app.py").write_bytes(bytes(range(256)))
    (workspace / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(workspace / "run.sh", 0o755)
    before = _tree(workspace)
    scripted.add(
        Turn(tool_calls=[
            ToolCall("write_file", {"path": "src/app.py", "content": "corrupted"}, id="w"),
            ToolCall("terminal_exec", {"command": "rm run.sh; touch new.txt"}, id="t"),
        ]),
        Turn(error_status=400),
    )

    task_id = await submit(agent_client, description="break things")
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "failed"
    assert _tree(workspace) == before
    types = [e["type"] for e in await events_of(agent_client, task_id)]
    assert "rollback.armed" in types and "rollback.restored" in types
    # One snapshot before both parallel calls: a second one could catch the first's writes.
    assert types.count("rollback.armed") == 1


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(path.relative_to(root)): (path.stat().st_mode, path.read_bytes())
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".peermesh" not in path.parts
    }


async def test_parallel_tool_calls_run_together_and_match_their_call_ids(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(tool_calls=[
        ToolCall("terminal_exec", {"command": "sleep 0.3; echo first"}, id="one"),
        ToolCall("terminal_exec", {"command": "echo second"}, id="two"),
    ]), Turn(text="both ran"))

    task_id = await submit(agent_client, description="run two", rollback_on_failure=False)
    await wait_final(agent_client, task_id)

    by_id = {m["tool_call_id"]: m["content"] for m in tool_messages(scripted.requests[1])}
    assert "first" in by_id["one"] and "second" in by_id["two"]
    events = await events_of(agent_client, task_id)
    kinds = [(e["type"], e["data"].get("call_id")) for e in events if e["type"].startswith("tool")]
    assert kinds[:2] == [("tool_use", "one"), ("tool_use", "two")]
    assert kinds[2] == ("tool_result", "two")


async def test_wrong_argument_types_go_back_to_the_model(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(tool_calls=[ToolCall("read_file", {"path": ["not", "a", "string"]})]),
                 Turn(text="sorry"))

    task_id = await submit(agent_client, description="read", mode="ask")
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "completed"
    assert "path" in tool_messages(scripted.requests[1])[0]["content"]


async def test_repeated_mistakes_fail_the_task_with_the_reason(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(*[Turn(tool_calls=[ToolCall("nope", {})]) for _ in range(12)])

    task_id = await submit(agent_client, description="flail", mode="ask")
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "failed"
    assert "invalid tool calls" in task["error"] and "nope" in task["error"]


async def test_rate_limit_is_retried_honouring_retry_after(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(error_status=429, retry_after=0.2), Turn(text="after the wait"))

    task_id = await submit(agent_client, description="hi", mode="ask")
    task = await wait_final(agent_client, task_id)

    assert task["result"] == "after the wait"
    retries = [e for e in await events_of(agent_client, task_id) if e["type"] == "model.retry"]
    assert retries[0]["data"]["delay_s"] == 0.2


async def test_rate_limit_inside_a_200_body_is_retried(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(error_status=429, error_in_body=True), Turn(text="recovered"))

    task_id = await submit(agent_client, description="hi", mode="ask")
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "completed" and task["result"] == "recovered"


async def test_server_errors_past_the_retry_budget_fail_with_the_providers_reason(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(*[Turn(error_status=503) for _ in range(3)])

    task_id = await submit(agent_client, description="hi", mode="ask")
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "failed"
    assert "model provider failed" in task["error"] and "server_error" in task["error"]


async def test_silent_stream_counts_as_a_timeout_by_our_own_deadline(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(text="late", stall_next_s=5), Turn(text="late", stall_first_s=5),
                 Turn(text="late", stall_next_s=5))

    task_id = await submit(agent_client, description="hi", mode="ask")
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "failed"
    assert "silent for 0.5s" in task["error"]


async def test_step_limit_ends_the_task_with_a_clear_reason(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(*[Turn(tool_calls=[ToolCall("list_files", {})]) for _ in range(3)])

    task_id = await submit(agent_client, description="loop", mode="ask", max_steps=3)
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "failed"
    assert "3 turns without a final answer" in task["error"]


async def test_token_limit_ends_the_task(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(*[Turn(tool_calls=[ToolCall("list_files", {})], prompt_tokens=400)
                   for _ in range(3)])

    task_id = await submit(agent_client, description="spend", mode="ask", max_tokens=500)
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "failed"
    assert "over its limit of 500" in task["error"]


async def test_cancel_stops_a_task_waiting_on_the_model(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(text="never", stall_first_s=0.4), Turn(text="x", stall_first_s=0.4))
    task_id = await submit(agent_client, description="hi", mode="ask")
    while not scripted.requests:  # the model call is under way
        await asyncio.sleep(0.01)

    await agent_client.post(f"/api/v1/agent/tasks/{task_id}/cancel")
    task = await wait_final(agent_client, task_id, timeout=5)

    assert task["status"] == "cancelled"


async def test_message_to_a_finished_task_continues_the_conversation(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(text="first answer"), Turn(text="second answer"))
    task_id = await submit(agent_client, description="hello", mode="ask")
    await wait_final(agent_client, task_id)

    response = await agent_client.post(
        f"/api/v1/agent/tasks/{task_id}/messages", json={"content": "and more?"})
    await asyncio.sleep(0.05)
    task = await wait_final(agent_client, task_id)

    assert response.status == 202
    assert task["result"] == "second answer"
    contents = [m.get("content") for m in scripted.requests[1]["messages"]]
    assert contents[1:] == ["hello", "first answer", "and more?"]


async def test_message_to_a_running_task_is_seen_on_its_next_turn(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(tool_calls=[ToolCall("list_files", {})], stall_first_s=0.3),
                 Turn(text="noted"))
    task_id = await submit(agent_client, description="work", mode="ask")

    await agent_client.post(f"/api/v1/agent/tasks/{task_id}/messages",
                            json={"content": "also check README"})
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "completed"
    assert {"role": "user", "content": "also check README"} in scripted.requests[1]["messages"]


async def test_model_can_be_chosen_per_task(
    client: TestClient, scripted: ScriptedModelServer
) -> None:
    scripted.add(Turn(text="from the task's own model"))

    task_id = await submit(client, description="hi", mode="ask", model="openai/scripted",
                           api_base=scripted.api_base)
    task = await wait_final(client, task_id)

    assert task["result"] == "from the task's own model", task["error"]


# -- a real provider, only where one is configured ------------------------------------------


REAL_MODEL = os.environ.get("PEERMESH_TEST_MODEL")


@pytest.mark.skipif(
    not REAL_MODEL,
    reason="set PEERMESH_TEST_MODEL (e.g. openai/gpt-4o-mini) and its provider key to run",
)
async def test_a_real_model_writes_a_file_through_the_node_tools(
    aiohttp_client: Any, tmp_path: Path,
) -> None:
    config = make_config(tmp_path, model=REAL_MODEL,
                         api_base=os.environ.get("PEERMESH_TEST_API_BASE"))
    client = await aiohttp_client(build_app(config),
                                  headers={"Authorization": f"Bearer {TOKEN}"})

    task_id = await submit(client, mode="code", description=(
        "Create the file hello.txt in the workspace containing exactly the text: peermesh"))
    task = await wait_final(client, task_id, timeout=300)

    assert task["status"] == "completed", task["error"]
    assert (config.workspace / "hello.txt").read_text().strip() == "peermesh"
