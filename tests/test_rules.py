"""Rules: approvals, prompt injection, redaction, blocks, webhooks and how rules are loaded."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent_runtime.app import NODE, build_app
from agent_runtime.config import parse_node_args
from agent_runtime.node import Node
from agent_runtime.scripted_model import ScriptedModelServer, ToolCall, Turn
from mesh.errors import ConfigError
from mesh.runner import node_spec
from mesh.topology import TopologyError, expand_nodes, load_topology
from tests.conftest import TOKEN, NodeProcess, make_config
from tests.test_tasks import events_of, exec_step, submit, wait_final
from tests.test_agent_loop import tool_messages

SECRET = "sk-" + "A1b2C3d4E5f6G7h8I9j0K1l2"


async def put_rules(client: TestClient, rules: list[dict[str, Any]]) -> None:
    response = await client.put("/api/v1/agent/rules", json={"rules": rules})
    assert response.status == 200, await response.text()


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 20) -> Any:
    """Poll `check` until it returns something truthy."""
    async def poll() -> Any:
        while not (found := await check()):
            await asyncio.sleep(0.02)
        return found

    return await asyncio.wait_for(poll(), timeout)


async def wait_status(client: TestClient, task_id: str, status: str) -> None:
    async def reached() -> bool:
        task = await (await client.get(f"/api/v1/agent/tasks/{task_id}")).json()
        return bool(task["status"] == status)

    await until(reached)


def node_of(client: TestClient) -> Node:
    return client.server.app[NODE]  # type: ignore[union-attr]


def stored_events(client: TestClient, task_id: str) -> list[dict[str, Any]]:
    events = node_of(client).store.events_after(0, task_id=task_id, limit=10_000)
    return [event.model_dump(mode="json") for event in events]


def approval_rule(**action: Any) -> dict[str, Any]:
    return {"id": "ask-first",
            "trigger": {"event": "tool.execute.before", "tool": "terminal_*"},
            "action": {"type": "require-approval", "timeout_s": 60, **action}}


# -- approvals --------------------------------------------------------------------------------


async def test_approved_command_runs_after_the_task_waited_for_input(
    agent_client: TestClient, scripted: ScriptedModelServer, tmp_path: Path
) -> None:
    await put_rules(agent_client, [approval_rule(reason="commands need a person")])
    scripted.add(Turn(tool_calls=[ToolCall("terminal_exec", {"command": "echo ran > ran.txt"},
                                           id="c1")]),
                 Turn(text="done"))

    task_id = await submit(agent_client, description="run it", rollback_on_failure=False)
    await wait_status(agent_client, task_id, "input_required")
    response = await agent_client.post(f"/api/v1/agent/tasks/{task_id}/approve")
    task = await wait_final(agent_client, task_id)

    assert response.status == 200
    assert await response.json() == {"task_id": task_id, "call_id": "c1", "approved": True}
    assert task["status"] == "completed", task["error"]
    assert (tmp_path / "workspace" / "ran.txt").read_text() == "ran\n"
    events = await events_of(agent_client, task_id)
    requested = next(e for e in events if e["type"] == "approval.requested")
    assert requested["data"]["call_id"] == "c1" and requested["data"]["rule"] == "ask-first"
    assert requested["data"]["args"] == {"command": "echo ran > ran.txt"}
    resolved = next(e for e in events if e["type"] == "approval.resolved")
    assert resolved["data"]["approved"] is True
    types = [e["type"] for e in events]
    assert types.index("approval.resolved") < types.index("tool_result")


async def test_denied_command_is_not_run_and_the_model_sees_the_reason(
    agent_client: TestClient, scripted: ScriptedModelServer, tmp_path: Path
) -> None:
    await put_rules(agent_client, [approval_rule()])
    scripted.add(Turn(tool_calls=[ToolCall("terminal_exec", {"command": "touch ran.txt"})]),
                 Turn(text="I was told no."))

    task_id = await submit(agent_client, description="run it", rollback_on_failure=False)
    await wait_status(agent_client, task_id, "input_required")
    response = await agent_client.post(f"/api/v1/agent/tasks/{task_id}/deny",
                                       json={"reason": "not on a Friday"})
    task = await wait_final(agent_client, task_id)

    assert response.status == 200
    assert task["status"] == "completed"
    assert not (tmp_path / "workspace" / "ran.txt").exists()
    assert "denied: not on a Friday" in tool_messages(scripted.requests[1])[0]["content"]


async def test_no_answer_within_the_timeout_counts_as_a_denial(
    agent_client: TestClient, scripted: ScriptedModelServer, tmp_path: Path
) -> None:
    await put_rules(agent_client, [approval_rule(timeout_s=0.2)])
    scripted.add(Turn(tool_calls=[ToolCall("terminal_exec", {"command": "touch ran.txt"})]),
                 Turn(text="nobody answered"))

    task_id = await submit(agent_client, description="run it", rollback_on_failure=False)
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "completed"
    assert not (tmp_path / "workspace" / "ran.txt").exists()
    content = tool_messages(scripted.requests[1])[0]["content"]
    assert "denied: no approval within 0.2s" in content
    resolved = [e for e in await events_of(agent_client, task_id)
                if e["type"] == "approval.resolved"]
    assert resolved[0]["data"]["by"] == "timeout"


async def test_step_tasks_wait_for_approval_too(client: TestClient, workspace: Path) -> None:
    await put_rules(client, [approval_rule()])

    task_id = await submit(client, steps=[exec_step("echo step > step.txt")])
    await wait_status(client, task_id, "input_required")
    await client.post(f"/api/v1/agent/tasks/{task_id}/approve", json={"call_id": "step-0"})
    task = await wait_final(client, task_id)

    assert task["status"] == "completed", task["error"]
    assert (workspace / "step.txt").read_text() == "step\n"


async def test_several_waiting_calls_are_answered_one_by_one_by_call_id(
    agent_client: TestClient, scripted: ScriptedModelServer, tmp_path: Path
) -> None:
    await put_rules(agent_client, [approval_rule()])
    scripted.add(Turn(tool_calls=[
        ToolCall("terminal_exec", {"command": "touch a.txt"}, id="a"),
        ToolCall("terminal_exec", {"command": "touch b.txt"}, id="b"),
    ]), Turn(text="one of two"))
    task_id = await submit(agent_client, description="two", rollback_on_failure=False)
    node = node_of(agent_client)
    await until(lambda: _async(len(node.rules.approvals.waiting(task_id)) == 2))

    unnamed = await agent_client.post(f"/api/v1/agent/tasks/{task_id}/approve")
    await agent_client.post(f"/api/v1/agent/tasks/{task_id}/approve", json={"call_id": "a"})
    await agent_client.post(f"/api/v1/agent/tasks/{task_id}/deny", json={"call_id": "b"})
    await wait_final(agent_client, task_id)

    assert unnamed.status == 400
    error = (await unnamed.json())["error"]
    assert error["details"]["field"] == "call_id" and error["details"]["waiting"] == ["a", "b"]
    assert (tmp_path / "workspace" / "a.txt").exists()
    assert not (tmp_path / "workspace" / "b.txt").exists()
    by_id = {m["tool_call_id"]: m["content"] for m in tool_messages(scripted.requests[1])}
    assert by_id["b"] == "error: denied: refused by the approver"


async def _async(value: Any) -> Any:
    return value


async def test_approve_or_deny_with_nothing_waiting_is_a_conflict(client: TestClient) -> None:
    task_id = await submit(client, steps=[exec_step("true")])
    await wait_final(client, task_id)

    approve = await client.post(f"/api/v1/agent/tasks/{task_id}/approve")
    deny = await client.post(f"/api/v1/agent/tasks/{task_id}/deny", json={"reason": "no"})
    unknown = await client.post("/api/v1/agent/tasks/nope/approve")

    assert approve.status == deny.status == 409
    assert (await approve.json())["error"]["code"] == "conflict"
    assert unknown.status == 404


# -- prompts ----------------------------------------------------------------------------------


async def test_system_prompt_injection_reaches_only_tasks_with_the_tag(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    text = "This is production: never restart services."
    await put_rules(agent_client, [{
        "id": "prod-care", "trigger": {"event": "chat.system.transform", "tags": ["prod"]},
        "action": {"type": "prompt-inject", "target": "system", "text": text}}])
    scripted.add(Turn(text="prod answer"), Turn(text="dev answer"))

    prod = await submit(agent_client, description="check prod", tags=["prod", "eu"])
    await wait_final(agent_client, prod)
    dev = await submit(agent_client, description="check dev", tags=["dev"])
    await wait_final(agent_client, dev)

    prod_system = scripted.requests[0]["messages"][0]
    dev_system = scripted.requests[1]["messages"][0]
    assert prod_system["role"] == dev_system["role"] == "system"
    assert prod_system["content"].endswith("\n\n" + text)
    assert text not in dev_system["content"]
    fired = [e for e in await events_of(agent_client, prod) if e["type"] == "rule.fired"]
    assert fired[0]["data"] == {"rule": "prod-care", "event": "chat.system.transform",
                                "action": "prompt-inject"}


async def test_prompt_inject_can_prepend_to_the_user_prompt_without_storing_it(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    await put_rules(agent_client, [{
        "id": "be-brief", "trigger": {"event": "chat.system.transform"},
        "action": {"type": "prompt-inject", "target": "user", "position": "prepend",
                   "text": "Answer in one line."}}])
    scripted.add(Turn(text="ok"))

    task_id = await submit(agent_client, description="What is 2+2?", mode="ask")
    await wait_final(agent_client, task_id)

    user = scripted.requests[0]["messages"][1]
    assert user == {"role": "user", "content": "Answer in one line.\n\nWhat is 2+2?"}
    transcript = node_of(agent_client).store.get_transcript(task_id)
    assert transcript[0] == {"role": "user", "content": "What is 2+2?"}


async def test_a_secret_in_a_file_reaches_neither_the_model_nor_events_nor_the_transcript(
    agent_client: TestClient, scripted: ScriptedModelServer, tmp_path: Path
) -> None:
    workspace = tmp_path / "workspace"
    (workspace / "config.env").write_text(f"MODE=prod\nOPENAI_API_KEY={SECRET}\n")
    await put_rules(agent_client, [{
        "id": "no-keys", "trigger": {"event": "tool.execute.after"},
        "action": {"type": "redact", "pattern": "sk-[A-Za-z0-9]{20,}"}}])
    scripted.add(Turn(tool_calls=[
        ToolCall("read_file", {"path": "config.env"}, id="read"),
        ToolCall("terminal_exec", {"command": "cat config.env"}, id="cat"),
    ]), Turn(text="The key is hidden."))

    task_id = await submit(agent_client, description="show the config",
                           rollback_on_failure=False)
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "completed", task["error"]
    by_id = {m["tool_call_id"]: m["content"] for m in tool_messages(scripted.requests[1])}
    assert "OPENAI_API_KEY=[REDACTED]" in by_id["read"]
    assert "OPENAI_API_KEY=[REDACTED]" in by_id["cat"]
    assert SECRET not in json.dumps(scripted.requests)
    events = await events_of(agent_client, task_id)
    assert SECRET not in json.dumps(events)
    assert SECRET not in json.dumps(node_of(agent_client).store.get_transcript(task_id))
    fired = [e["data"] for e in events if e["type"] == "rule.fired"]
    assert {(f["rule"], f["tool"]) for f in fired} == {("no-keys", "read_file"),
                                                       ("no-keys", "terminal_exec")}


async def test_a_redacted_step_result_keeps_its_shape(client: TestClient, workspace: Path) -> None:
    (workspace / "key.txt").write_text(SECRET)
    await put_rules(client, [{
        "id": "no-keys", "trigger": {"event": "tool.execute.after", "tool": "terminal_exec"},
        "action": {"type": "redact", "pattern": "sk-[A-Za-z0-9]{20,}", "replacement": "***"}}])

    task_id = await submit(client, steps=[exec_step("cat key.txt")])
    task = await wait_final(client, task_id)

    assert task["status"] == "completed", task["error"]
    assert task["result"][0]["stdout"] == "***" and task["result"][0]["exit_code"] == 0


async def test_prompt_redaction_hides_a_secret_the_user_typed_from_the_model_and_events(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    await put_rules(agent_client, [{
        "id": "no-keys", "trigger": {"event": "chat.system.transform"},
        "action": {"type": "redact", "pattern": "sk-[A-Za-z0-9]{20,}"}}])
    scripted.add(Turn(text="noted"), Turn(text="noted again"))

    task_id = await submit(agent_client, description=f"my key is {SECRET}", mode="ask")
    await wait_final(agent_client, task_id)
    await agent_client.post(f"/api/v1/agent/tasks/{task_id}/messages",
                            json={"content": f"and again: {SECRET}"})
    await until(lambda: _async(len(scripted.requests) == 2))
    task = await wait_final(agent_client, task_id)

    assert task["status"] == "completed", task["error"]
    users = [m["content"] for m in scripted.requests[1]["messages"] if m["role"] == "user"]
    assert users == ["my key is [REDACTED]", "and again: [REDACTED]"]
    assert SECRET not in json.dumps(scripted.requests)
    events = stored_events(agent_client, task_id)
    assert SECRET not in json.dumps(events)
    said = [e["data"]["text"] for e in events if e["type"] == "message"
            and e["data"]["role"] == "user"]
    assert said == ["and again: [REDACTED]"]


async def test_a_blocked_prompt_never_reaches_the_model_and_fails_the_task_with_the_reason(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    await put_rules(agent_client, [{
        "id": "no-drops", "trigger": {"event": "chat.system.transform",
                                      "match": "(?i)drop table"},
        "action": {"type": "block", "reason": "destructive SQL is not asked of the model"}}])
    scripted.add(Turn(text="fine"))

    blocked = await submit(agent_client, description="DROP TABLE users; then report",
                           mode="ask")
    blocked_task = await wait_final(agent_client, blocked)
    allowed = await submit(agent_client, description="count the users", mode="ask")
    allowed_task = await wait_final(agent_client, allowed)

    assert blocked_task["status"] == "failed"
    assert blocked_task["error"] == ("blocked by rule no-drops: destructive SQL is not asked "
                                     "of the model")
    assert allowed_task["status"] == "completed"
    assert len(scripted.requests) == 1
    assert "DROP TABLE" not in json.dumps(scripted.requests)


# -- blocks, parameters, cooldown -------------------------------------------------------------


async def test_block_refuses_a_tool_call_with_a_reason_the_model_sees(
    agent_client: TestClient, scripted: ScriptedModelServer, tmp_path: Path
) -> None:
    (tmp_path / "workspace" / "keep").mkdir()
    await put_rules(agent_client, [{
        "id": "no-rm", "trigger": {"event": "tool.execute.before", "tool": "terminal_exec",
                                   "match": r"rm\s+-\w*r"},
        "action": {"type": "block", "reason": "recursive deletes are not allowed here"}}])
    scripted.add(Turn(tool_calls=[
        ToolCall("terminal_exec", {"command": "rm -rf keep"}, id="rm"),
        ToolCall("terminal_exec", {"command": "echo fine"}, id="echo"),
    ]), Turn(text="ok"))

    task_id = await submit(agent_client, description="clean up", rollback_on_failure=False)
    await wait_final(agent_client, task_id)

    assert (tmp_path / "workspace" / "keep").is_dir()
    by_id = {m["tool_call_id"]: m["content"] for m in tool_messages(scripted.requests[1])}
    assert by_id["rm"] == ("error: blocked by rule no-rm: recursive deletes are not allowed "
                           "here")
    assert "fine" in by_id["echo"]
    results = {e["data"]["call_id"]: e["data"] for e in await events_of(agent_client, task_id)
               if e["type"] == "tool_result"}
    assert results["rm"]["refused"] is True and results["echo"]["ok"] is True


async def test_block_at_session_start_fails_the_task_with_the_reason(
    client: TestClient, workspace: Path
) -> None:
    await put_rules(client, [{
        "id": "frozen", "trigger": {"event": "session.start", "mode": "code"},
        "action": {"type": "block", "reason": "code changes are frozen"}}])

    task_id = await submit(client, steps=[exec_step("touch made.txt")])
    task = await wait_final(client, task_id)

    assert task["status"] == "failed"
    assert task["error"] == "blocked by rule frozen: code changes are frozen"
    assert not (workspace / "made.txt").exists()


async def test_a_disabled_rule_never_fires_and_a_mode_filter_spares_other_modes(
    client: TestClient,
) -> None:
    await put_rules(client, [
        {"id": "off", "enabled": False, "trigger": {"event": "session.start"},
         "action": {"type": "block", "reason": "everything is frozen"}},
        {"id": "code-frozen", "trigger": {"event": "session.start", "mode": "code"},
         "action": {"type": "block", "reason": "code changes are frozen"}},
    ])

    debug = await submit(client, mode="debug", steps=[exec_step("true")])
    debug_task = await wait_final(client, debug)
    code = await submit(client, mode="code", steps=[exec_step("true")])
    code_task = await wait_final(client, code)

    assert debug_task["status"] == "completed", debug_task["error"]
    assert code_task["error"] == "blocked by rule code-frozen: code changes are frozen"
    fired = [e["data"]["rule"] for task_id in (debug, code)
             for e in stored_events(client, task_id) if e["type"] == "rule.fired"]
    assert fired == ["code-frozen"]


async def test_set_params_overrides_the_model_settings_of_each_turn(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    await put_rules(agent_client, [{
        "id": "cheap", "trigger": {"event": "chat.params", "tags": ["cheap"]},
        "action": {"type": "set-params", "temperature": 0.1, "max_tokens": 64}}])
    scripted.add(Turn(text="short"))

    task_id = await submit(agent_client, description="hi", mode="ask", tags=["cheap"])
    await wait_final(agent_client, task_id)

    assert scripted.requests[0]["temperature"] == 0.1
    assert scripted.requests[0]["max_tokens"] == 64


async def test_cooldown_keeps_a_rule_from_firing_again_for_the_same_task(
    agent_client: TestClient, scripted: ScriptedModelServer
) -> None:
    await put_rules(agent_client, [{
        "id": "remind", "cooldown_ms": 600_000, "trigger": {"event": "chat.system.transform"},
        "action": {"type": "prompt-inject", "text": "Reminder: be careful."}}])
    scripted.add(Turn(tool_calls=[ToolCall("list_files", {"path": "."})]), Turn(text="done"),
                 Turn(text="second task"))

    first = await submit(agent_client, description="look", mode="ask")
    await wait_final(agent_client, first)
    second = await submit(agent_client, description="look again", mode="ask")
    await wait_final(agent_client, second)

    systems = [request["messages"][0]["content"] for request in scripted.requests]
    assert ["Reminder: be careful." in system for system in systems] == [True, False, True]
    fired = [e for e in await events_of(agent_client, first) if e["type"] == "rule.fired"]
    assert len(fired) == 1


# -- replacing rules and validation -----------------------------------------------------------


# -- patterns that backtrack catastrophically -------------------------------------------------

# A run of a's the patterns below cannot end with `$`: each start point tries every split.
A_RUN = "printf 'a%.0s' $(seq 30); printf 'b\\n'"


async def test_a_redact_pattern_that_backtracks_withholds_the_output_while_the_node_answers(
    node_process: NodeProcess,
) -> None:
    node_process.workspace.mkdir(parents=True)
    (node_process.workspace / "key.txt").write_text(f"{SECRET}\n")
    node_process.start()
    url, headers = node_process.url, {"Authorization": f"Bearer {TOKEN}"}
    rules = [
        # The pattern of the report: it backtracks in Python's re (minutes on 31 characters).
        {"id": "reported", "trigger": {"event": "tool.execute.after"},
         "action": {"type": "redact", "pattern": "(a+)+$"}},
        # One that backtracks in any engine; it also hides keys, so the output must not leak.
        {"id": "slow", "trigger": {"event": "tool.execute.after"},
         "action": {"type": "redact", "pattern": r"sk-\w+|(a|aa)+$"}},
    ]
    steps = [exec_step(f"cat key.txt; {A_RUN}") for _ in range(5)]

    async with aiohttp.ClientSession(headers=headers) as session:
        response = await session.put(f"{url}/api/v1/agent/rules", json={"rules": rules})
        assert response.status == 200, await response.text()
        response = await session.post(f"{url}/api/v1/agent/tasks", json={"steps": steps})
        task_id = (await response.json())["id"]

        # The node answers health checks the whole time the task filters its outputs.
        answered = 0
        while True:
            async with session.get(f"{url}/healthz",
                                   timeout=aiohttp.ClientTimeout(total=10)) as health:
                assert health.status == 200
                answered += 1
            async with session.get(f"{url}/api/v1/agent/tasks/{task_id}") as got:
                task = await got.json()
            if task["status"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.05)
        assert task["status"] == "completed", task["error"]
        async with session.ws_connect(f"{url}/api/v1/agent/ws?task_id={task_id}&after=0",
                                      ) as ws:
            events = [await asyncio.wait_for(ws.receive_json(), 10)]
            while events[-1]["type"] != "task.completed":
                events.append(await asyncio.wait_for(ws.receive_json(), 10))

    assert answered >= 1
    marker = "[REDACTED: rule slow timed out]"
    assert [(step["stdout"], step["exit_code"]) for step in task["result"]] == [(marker, 0)] * 5
    assert SECRET not in json.dumps(task) and SECRET not in json.dumps(events)
    errors = [e["data"] for e in events if e["type"] == "rule.error"]
    assert [(e["rule"], e["event"]) for e in errors] == [("slow", "tool.execute.after")] * 5
    assert "longer than" in errors[0]["error"]


async def test_a_match_that_backtracks_does_not_fire_its_rule_and_says_which_rule(
    client: TestClient, workspace: Path
) -> None:
    await put_rules(client, [{
        "id": "slow-match", "trigger": {"event": "tool.execute.before", "match": "(a|aa)+$"},
        "action": {"type": "block", "reason": "never decided"}}])

    task_id = await submit(client, steps=[exec_step("echo " + "a" * 30 + "b > run.txt")])
    task = await wait_final(client, task_id)

    assert task["status"] == "completed", task["error"]
    assert (workspace / "run.txt").read_text() == "a" * 30 + "b\n"
    events = await events_of(client, task_id)
    assert not [e for e in events if e["type"] == "rule.fired"]
    errors = [e["data"] for e in events if e["type"] == "rule.error"]
    assert [(e["rule"], e["event"]) for e in errors] == [("slow-match", "tool.execute.before")]
    assert "did not fire" in errors[0]["error"]


async def test_a_redact_rule_whose_match_backtracks_withholds_rather_than_leaks(
    client: TestClient,
) -> None:
    await put_rules(client, [{
        "id": "keys-in-a-runs", "trigger": {"event": "tool.execute.after", "match": "(a|aa)+$"},
        "action": {"type": "redact", "pattern": r"sk-\w+"}}])

    task_id = await submit(client, steps=[exec_step(f"echo {SECRET} " + "a" * 30 + "b")])
    task = await wait_final(client, task_id)

    assert task["status"] == "completed", task["error"]
    assert task["result"][0]["stdout"] == "[REDACTED: rule keys-in-a-runs timed out]"
    events = await events_of(client, task_id)
    assert SECRET not in json.dumps(events)
    assert [e["data"]["rule"] for e in events if e["type"] == "rule.error"]


async def test_put_with_an_invalid_regex_is_refused_naming_the_field_and_keeps_the_old_rules(
    client: TestClient, workspace: Path
) -> None:
    old = [{"id": "no-touch", "trigger": {"event": "tool.execute.before", "match": "touch"},
            "action": {"type": "block", "reason": "no touching"}}]
    await put_rules(client, old)

    response = await client.put("/api/v1/agent/rules", json={"rules": [
        {"id": "fine", "trigger": {"event": "session.idle"},
         "action": {"type": "webhook", "url": "http://127.0.0.1:9/hook"}},
        {"id": "broken", "trigger": {"event": "tool.execute.after"},
         "action": {"type": "redact", "pattern": "sk-[A-Z"}},
    ]})
    listed = await (await client.get("/api/v1/agent/rules")).json()
    task_id = await submit(client, steps=[exec_step("touch made.txt")])
    task = await wait_final(client, task_id)

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["details"]["errors"][0]["field"] == "rules[1].action.pattern"
    assert "rules[1].action.pattern: not a valid regular expression" in error["message"]
    assert [rule["id"] for rule in listed["rules"]] == ["no-touch"]
    assert task["status"] == "failed" and "no touching" in task["error"]
    assert not (workspace / "made.txt").exists()


@pytest.mark.parametrize(("rule", "field", "words"), [
    ({"id": "x", "trigger": {"event": "tool.run"}, "action": {"type": "block", "reason": "r"}},
     "rules[0].trigger.event", "tool.execute.before"),
    ({"id": "x", "trigger": {"event": "session.idle"}, "action": {"type": "block",
                                                                  "reason": "r"}},
     "rules[0].action.type", "block cannot act at session.idle"),
    ({"id": "x", "trigger": {"event": "session.start"}, "action": {"type": "shout"}},
     "rules[0].action", "unknown action type 'shout'"),
    ({"id": "x", "trigger": {"event": "session.start"}, "action": {"reason": "r"}},
     "rules[0].action", "missing `type`"),
    ({"id": "x", "trigger": {"event": "session.start", "tool": "terminal_exec"},
      "action": {"type": "block", "reason": "r"}},
     "rules[0].trigger.tool", "applies only to tool.execute"),
    ({"id": "x", "trigger": {"event": "session.start", "match": "("},
      "action": {"type": "block", "reason": "r"}},
     "rules[0].trigger.match", "not a valid regular expression"),
    ({"id": "x", "trigger": {"event": "session.idle"},
      "action": {"type": "webhook", "url": "ftp://example.com/x"}},
     "rules[0].action.url", "http:// or https://"),
    ({"id": "x", "blocking": True, "trigger": {"event": "session.start"},
      "action": {"type": "block", "reason": "r"}},
     "rules[0].blocking", "only a webhook"),
    ({"id": "x", "cooldown_ms": 10, "trigger": {"event": "tool.execute.after"},
      "action": {"type": "redact", "pattern": "a"}},
     "rules[0].cooldown_ms", "must be 0"),
    ({"id": "x", "trigger": {"event": "chat.params"}, "action": {"type": "set-params"}},
     "rules[0].action", "at least one of model, temperature, max_tokens"),
    ({"id": "x", "trigger": {"event": "session.start"},
      "action": {"type": "block", "reason": "r", "colour": "red"}},
     "rules[0].action.colour", "unknown field"),
])
async def test_invalid_rules_are_refused_naming_the_field(
    client: TestClient, rule: dict[str, Any], field: str, words: str
) -> None:
    response = await client.put("/api/v1/agent/rules", json={"rules": [rule]})

    assert response.status == 400
    problems = (await response.json())["error"]["details"]["errors"]
    assert problems[0]["field"] == field
    assert words in problems[0]["message"]


async def test_duplicate_rule_ids_are_refused(client: TestClient) -> None:
    rule = {"id": "same", "trigger": {"event": "session.start"},
            "action": {"type": "block", "reason": "r"}}

    response = await client.put("/api/v1/agent/rules", json={"rules": [rule, rule]})

    assert response.status == 400
    problems = (await response.json())["error"]["details"]["errors"]
    assert problems == [{"field": "rules[1].id",
                         "message": "duplicate id 'same' (also rules[0])"}]


async def test_openapi_document_describes_the_rule_schema_and_the_mcp_and_model_routes(
    client: TestClient,
) -> None:
    document = await (await client.get("/api/v1/openapi.json")).json()

    paths, schemas = document["paths"], document["components"]["schemas"]
    assert {"get", "put"} <= set(paths["/api/v1/agent/rules"])
    assert "post" in paths["/api/v1/agent/tasks/{task_id}/approve"]
    assert {"post", "get"} <= set(paths["/api/v1/agent/mcp/servers"])
    assert "/api/v1/ai/chat/completions" in paths and "/mcp" in paths
    assert {"Rule", "Trigger", "RequireApproval", "McpServerDecl"} <= set(schemas)


# -- webhooks ---------------------------------------------------------------------------------


class Receiver:
    """A local webhook receiver: records every POST and answers as told."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.statuses: collections.deque[int] = collections.deque()
        self.answer: dict[str, Any] = {}
        self.hold: asyncio.Event | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        if self.hold is not None:
            await self.hold.wait()
        status = self.statuses.popleft() if self.statuses else 200
        return web.json_response(self.answer, status=status)


@pytest.fixture
async def receiver(aiohttp_server: Any) -> AsyncIterator[Receiver]:
    hooks = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hooks.handle)
    server: TestServer = await aiohttp_server(app)
    hooks.url = str(server.make_url("/hook"))
    yield hooks
    if hooks.hold is not None:
        hooks.hold.set()


def webhook_rule(url: str, event: str = "tool.execute.before", **extra: Any) -> dict[str, Any]:
    action = {"type": "webhook", "url": url, **extra.pop("action", {})}
    return {"id": "notify", "trigger": {"event": event}, "action": action, **extra}


async def test_webhook_posts_the_event_and_never_holds_the_task(
    client: TestClient, receiver: Receiver
) -> None:
    receiver.hold = asyncio.Event()
    await put_rules(client, [webhook_rule(receiver.url)])

    task_id = await submit(client, steps=[exec_step("echo hi")])
    task = await wait_final(client, task_id)

    assert task["status"] == "completed", task["error"]
    assert not receiver.hold.is_set()
    body = (await until(lambda: _async(receiver.bodies)))[0]
    assert body["event"] == "tool.execute.before" and body["rule"] == "notify"
    assert body["task"]["id"] == task_id and body["tool"] == "terminal_exec"
    assert body["args"] == {"command": "echo hi"} and body["call_id"] == "step-0"
    receiver.hold.set()


async def test_webhook_is_retried_after_a_server_error(
    client: TestClient, receiver: Receiver
) -> None:
    receiver.statuses.extend([500, 503])
    await put_rules(client, [webhook_rule(receiver.url, "session.idle")])

    task_id = await submit(client, steps=[exec_step("echo done")])
    await wait_final(client, task_id)
    await until(lambda: _async(len(receiver.bodies) == 3))

    assert len({body["id"] for body in receiver.bodies}) == 1
    assert receiver.bodies[0]["event"] == "session.idle"
    assert "done" in receiver.bodies[0]["text"]


async def test_undeliverable_webhook_is_an_event_and_the_task_still_completes(
    client: TestClient, receiver: Receiver
) -> None:
    receiver.statuses.extend([500, 500])
    await put_rules(client, [webhook_rule(receiver.url, action={"retries": 1})])

    task_id = await submit(client, steps=[exec_step("true")])
    task = await wait_final(client, task_id)
    failed = await until(lambda: _async(
        [e for e in stored_events(client, task_id) if e["type"] == "webhook.failed"]))

    assert task["status"] == "completed"
    assert failed[0]["data"]["attempts"] == 2 and "HTTP 500" in failed[0]["data"]["error"]


async def test_blocking_webhook_can_block_a_tool_call(
    client: TestClient, receiver: Receiver, workspace: Path
) -> None:
    receiver.answer = {"block": True, "reason": "the change window is closed"}
    await put_rules(client, [webhook_rule(receiver.url, blocking=True)])

    task_id = await submit(client, steps=[exec_step("touch made.txt")])
    task = await wait_final(client, task_id)

    assert task["status"] == "failed"
    assert "blocked by rule notify: the change window is closed" in task["error"]
    assert not (workspace / "made.txt").exists()


SEVEN_EVENTS = ["session.start", "chat.system.transform", "chat.params",
                "tool.execute.before", "tool.execute.after", "session.idle", "session.error"]


async def test_rules_fire_at_each_of_the_seven_events_and_each_firing_is_a_task_event(
    agent_client: TestClient, scripted: ScriptedModelServer, receiver: Receiver
) -> None:
    await put_rules(agent_client, [
        {"id": f"on-{event}", "trigger": {"event": event},
         "action": {"type": "webhook", "url": receiver.url}}
        for event in SEVEN_EVENTS])
    scripted.add(Turn(tool_calls=[ToolCall("list_files", {"path": "."})]), Turn(text="done"))

    worked = await submit(agent_client, description="look around", mode="ask")
    await wait_final(agent_client, worked)
    failed = await submit(agent_client, steps=[exec_step("exit 3")])
    await wait_final(agent_client, failed)
    await until(lambda: _async(len(receiver.bodies) >= 9))

    by_task: dict[str, list[str]] = collections.defaultdict(list)
    for body in receiver.bodies:
        by_task[body["task"]["id"]].append(body["event"])
    assert sorted(set(by_task[worked])) == sorted(SEVEN_EVENTS[:-1])
    assert sorted(by_task[failed]) == sorted(["session.start", "tool.execute.before",
                                              "tool.execute.after", "session.error"])
    for task_id in (worked, failed):
        fired = [e["data"]["event"] for e in stored_events(agent_client, task_id)
                 if e["type"] == "rule.fired"]
        assert sorted(fired) == sorted(by_task[task_id])


async def test_a_cooldown_at_a_session_event_spans_tasks(
    client: TestClient, receiver: Receiver
) -> None:
    await put_rules(client, [webhook_rule(receiver.url, "session.error", cooldown_ms=600_000)])

    first = await submit(client, steps=[exec_step("exit 1")])
    await wait_final(client, first)
    second = await submit(client, steps=[exec_step("exit 2")])
    await wait_final(client, second)
    await until(lambda: _async(receiver.bodies))

    fired = {task_id: [e for e in stored_events(client, task_id) if e["type"] == "rule.fired"]
             for task_id in (first, second)}
    assert [body["task"]["id"] for body in receiver.bodies] == [first]
    assert len(fired[first]) == 1 and fired[second] == []


# -- loading ----------------------------------------------------------------------------------


RULES_YAML = """\
- id: no-rm
  description: never delete recursively
  trigger: {event: tool.execute.before, tool: terminal_exec, match: 'rm -r'}
  action: {type: block, reason: recursive deletes are off}
"""


async def test_rules_file_and_mesh_rules_are_loaded_at_start(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES_YAML)
    extra = [{"id": "hello", "trigger": {"event": "session.start"},
              "action": {"type": "webhook", "url": "http://127.0.0.1:9/"}}]
    config = make_config(tmp_path, rules_file=rules_file, rules=json.dumps(extra))
    client = await aiohttp_client(build_app(config),
                                  headers={"Authorization": f"Bearer {TOKEN}"})

    listed = await (await client.get("/api/v1/agent/rules")).json()

    assert [rule["id"] for rule in listed["rules"]] == ["no-rm", "hello"]
    assert listed["rules"][0]["description"] == "never delete recursively"


def test_broken_rules_file_stops_the_node_naming_file_and_rule(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES_YAML + "- id: second\n  trigger: {event: tool.exec}\n"
                          "  action: {type: block, reason: r}\n")

    with pytest.raises(ConfigError) as caught:
        build_app(make_config(tmp_path, rules_file=rules_file))
    process = subprocess.run(
        [sys.executable, "-m", "agent_runtime", "--workspace", str(tmp_path / "ws"),
         "--port", "0", "--token", TOKEN, "--rules-file", str(rules_file)],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True"),
    )

    assert f"rules file {rules_file}: rules[1].trigger.event" in str(caught.value)
    assert process.returncode == 2
    assert f"rules file {rules_file}: rules[1].trigger.event" in process.stderr
    assert "Traceback" not in process.stderr


def test_a_rules_file_that_is_not_text_is_a_config_error_naming_the_file(
    tmp_path: Path,
) -> None:
    rules_file = tmp_path / "rules.bin"
    rules_file.write_bytes(b"\xff\xfe\x00rules")

    with pytest.raises(ConfigError, match=f"rules file {rules_file}: not UTF-8 text"):
        build_app(make_config(tmp_path, rules_file=rules_file))


def test_mesh_rules_variable_is_read_and_bad_json_is_a_config_error(tmp_path: Path) -> None:
    rules = [{"id": "a", "trigger": {"event": "session.idle"},
              "action": {"type": "webhook", "url": "http://hooks.example/x"}}]
    environ = {"MESH_WORKSPACE": str(tmp_path / "ws"), "MESH_RULES": json.dumps(rules)}

    config = parse_node_args([], environ)

    assert config.rules == rules
    with pytest.raises(ConfigError, match="rules"):
        parse_node_args([], {**environ, "MESH_RULES": "[{"})


TOPOLOGY = """\
mesh:
  name: m
  rules:
    - id: audit
      trigger: {event: session.idle}
      action: {type: webhook, url: "http://127.0.0.1:9/audit"}
nodes:
  - name: worker
    rules:
      - id: no-rm
        trigger: {event: tool.execute.before, tool: terminal_exec, match: 'rm -r'}
        action: {type: block, reason: recursive deletes are off}
"""


async def test_topology_rules_reach_the_node_mesh_wide_first(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(TOPOLOGY)
    topology = load_topology(path)
    env = node_spec(topology, expand_nodes(topology)[0], tmp_path / "scratch").env
    config = parse_node_args([], {"MESH_WORKSPACE": str(tmp_path / "ws"),
                                  "MESH_STATE_DIR": str(tmp_path / "state"),
                                  "MESH_TOKEN": TOKEN, "MESH_RULES": env["MESH_RULES"]})
    client = await aiohttp_client(build_app(config),
                                  headers={"Authorization": f"Bearer {TOKEN}"})

    listed = await (await client.get("/api/v1/agent/rules")).json()

    assert [rule["id"] for rule in listed["rules"]] == ["audit", "no-rm"]


def test_topology_rule_mistakes_are_reported_at_their_line_before_any_node_starts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(TOPOLOGY.replace("trigger: {event: tool", "trigger: {evnt: tool")
                    + "      - id: audit\n"
                      "        trigger: {event: session.error}\n"
                      "        action: {type: redact, pattern: 'sk-[A-Z]+'}\n")

    with pytest.raises(TopologyError) as raised:
        load_topology(path)

    problems = {problem.key: problem for problem in raised.value.problems}
    typo = problems["nodes[0].rules[0].trigger.evnt"]
    assert typo.line == 11 and "did you mean 'event'" in typo.message
    assert problems["nodes[0].rules[0].trigger.event"].message == "Field required"
    duplicate = problems["nodes[0].rules[1].id"]
    assert duplicate.line == 13
    assert "duplicate id 'audit' (also mesh-wide rule mesh.rules[0])" in duplicate.message
    assert "redact cannot act at session.error" in problems[
        "nodes[0].rules[1].action.type"].message
