"""The terminal runs commands that never hang the node: prompts, servers, timeouts, big output."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from agent_runtime.node import Node
from agent_runtime.services.terminal import KEEP_OUTPUT_FILES, MAX_ARG_BYTES, Terminal
from agent_runtime.tools import ToolContext
from agent_runtime.workspace import Workspace
from mesh.errors import ToolError, Unavailable
from mesh.models import ExecRequest, ExecResult

EXEC = "/api/v1/terminal/exec"
WS = "/api/v1/terminal/ws"

# Generous: only here to turn a hang into a failure, not to measure speed (bench/ does that).
HANG_BOUND_S = 5.0


# -- helpers ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """State, ppid, pgrp, ... of a process, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def process_running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def group_running(pgid: int) -> bool:
    """Whether any process of the group is still running."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


async def execute(client: TestClient, **body: Any) -> dict[str, Any]:
    response = await client.post(EXEC, json=body)
    assert response.status == 200, await response.text()
    return await response.json()  # type: ignore[no-any-return]


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """PIDs a test meant to leave running; killed when the test ends."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
async def terminal(tmp_path: Path) -> Terminal:
    root = tmp_path / "ws"
    root.mkdir()
    return Terminal(Workspace(root), root / ".peermesh" / "exec", 256 * 1024)


# -- commands that would wait for someone -----------------------------------------------------


async def test_shell_prompt_for_confirmation_fails_at_once_with_its_partial_output(
    client: TestClient,
) -> None:
    prompt = 'read -p "Ok to proceed? (y) " ans && [ "$ans" = y ]'
    result = await execute(client, command=f'echo "Installing 3 packages"; {prompt}', timeout_s=60)

    assert result["exit_code"] != 0
    assert result["timed_out"] is False
    assert result["stdout"] == "Installing 3 packages\n"


async def test_python_input_prompt_fails_at_once_with_its_prompt_shown(
    client: TestClient,
) -> None:
    result = await execute(
        client, command="""python3 -c 'print("step 1"); input("Ok to proceed? (y) ")'""",
        timeout_s=60,
    )

    assert result["exit_code"] == 1
    assert result["timed_out"] is False
    assert result["stdout"] == "step 1\nOk to proceed? (y) "
    assert "EOFError" in result["stderr"]


async def test_backgrounded_server_does_not_hold_the_call_and_keeps_running(
    client: TestClient, leftovers: list[int]
) -> None:
    started = time.monotonic()
    result = await execute(
        client, command="python3 -m http.server 0 >/dev/null 2>&1 & echo $!", timeout_s=60
    )
    elapsed = time.monotonic() - started
    pid = int(result["stdout"])
    leftovers.append(pid)

    assert result["exit_code"] == 0
    assert elapsed < HANG_BOUND_S
    assert process_running(pid)
    assert b"http.server" in Path(f"/proc/{pid}/cmdline").read_bytes()


async def test_backgrounded_child_holding_the_pipes_does_not_hold_the_call(
    client: TestClient, leftovers: list[int]
) -> None:
    started = time.monotonic()
    result = await execute(client, command="sleep 60 & echo $!", timeout_s=60)
    elapsed = time.monotonic() - started
    pid = int(result["stdout"])
    leftovers.append(pid)

    assert result["exit_code"] == 0
    assert result["timed_out"] is False
    assert elapsed < HANG_BOUND_S
    assert process_running(pid)


# -- timeouts ---------------------------------------------------------------------------------


async def test_sleep_past_timeout_leaves_no_process_behind(
    client: TestClient, workspace: Path
) -> None:
    result = await execute(client, command="echo $$ > shell.pid; sleep 30", timeout_s=1)

    assert result["timed_out"] is True
    assert result["exit_code"] != 0
    pgid = read_pid(workspace / "shell.pid")
    await wait_until(lambda: not group_running(pgid))


async def test_child_ignoring_sigterm_is_killed_at_timeout(
    client: TestClient, workspace: Path
) -> None:
    stubborn = "(trap '' TERM; echo $BASHPID > child.pid; exec sleep 30)"
    started = "while [ ! -s child.pid ]; do sleep 0.01; done"
    command = f"{stubborn} & echo $$ > shell.pid; {started}; wait"
    result = await execute(client, command=command, timeout_s=2)

    assert result["timed_out"] is True
    child = read_pid(workspace / "child.pid")
    pgid = read_pid(workspace / "shell.pid")
    await wait_until(lambda: not process_running(child))
    await wait_until(lambda: not group_running(pgid))


async def test_closing_the_terminal_kills_running_commands(
    terminal: Terminal, tmp_path: Path
) -> None:
    pid_file = terminal.workspace.root / "shell.pid"
    running = asyncio.create_task(
        terminal.run(ExecRequest(command="echo $$ > shell.pid; sleep 30", timeout_s=60))
    )
    await wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "")

    await terminal.close()
    result = await running

    assert result.exit_code != 0
    await wait_until(lambda: not group_running(read_pid(pid_file)))
    with pytest.raises(Unavailable):
        await terminal.run(ExecRequest(command="true"))


# -- output -----------------------------------------------------------------------------------


async def test_invalid_utf8_output_comes_back_replacement_decoded(client: TestClient) -> None:
    result = await execute(client, command=r"printf '\xed\xff'")

    assert result["exit_code"] == 0
    assert result["stdout"] == "\ufffd\ufffd"


async def test_fifty_megabytes_of_output_come_back_cut_with_the_full_copy_in_a_file(
    client: TestClient, workspace: Path
) -> None:
    size = 50_000_000
    result = await execute(
        client, command=f"echo START; head -c {size} /dev/zero | tr '\\0' x; echo; echo END",
        timeout_s=120,
    )

    assert result["exit_code"] == 0
    assert result["truncated"] is True
    stdout = result["stdout"]
    assert stdout.startswith("START\nxxx")
    assert stdout.endswith("xxx\nEND\n")
    assert f"cut; full output in {result['output_file']} ...]" in stdout
    assert len(stdout.encode()) < 256 * 1024 + 200
    assert result["output_file"].startswith(".peermesh/exec/")
    full = workspace / result["output_file"]
    assert full.stat().st_size == len("START\n") + size + len("\nEND\n")
    with full.open("rb") as handle:
        assert handle.read(9) == b"START\nxxx"
        handle.seek(-8, os.SEEK_END)
        assert handle.read() == b"xxx\nEND\n"


async def test_cut_inside_a_multibyte_character_leaves_no_broken_character(
    tmp_path: Path,
) -> None:
    terminal = Terminal(Workspace(tmp_path), tmp_path / ".peermesh" / "exec", output_cap=12)

    # 1 + 200 + 1 bytes: a 6-byte head ends inside an "é", a 6-byte tail starts inside one;
    # both drop the broken character, so 202 - 5 - 5 bytes are cut.
    result = await terminal.run(
        ExecRequest(command="""python3 -c 'print("a" + "é" * 100 + "a", end="")'""")
    )

    assert result.truncated is True
    assert "\ufffd" not in result.stdout
    assert result.stdout.startswith("aéé\n[... 192 bytes cut; full output in .peermesh/exec/")
    assert result.stdout.endswith(" ...]\nééa")
    assert result.output_file is not None
    assert (tmp_path / result.output_file).read_text() == "a" + "é" * 100 + "a"


async def test_streamed_output_never_splits_a_character(terminal: Terminal) -> None:
    chunks: list[tuple[str, str]] = []

    async def collect(stream: str, data: str) -> None:
        chunks.append((stream, data))

    result = await terminal.stream(
        ExecRequest(command=r"printf '\xc3'; sleep 0.05; printf '\xa9'; echo oops >&2"), collect
    )

    assert result.stdout == "é"
    assert "".join(data for stream, data in chunks if stream == "stdout") == "é"
    assert "".join(data for stream, data in chunks if stream == "stderr") == "oops\n"


async def test_only_the_newest_output_files_are_kept(tmp_path: Path) -> None:
    terminal = Terminal(Workspace(tmp_path), tmp_path / ".peermesh" / "exec", output_cap=8)
    results: list[ExecResult] = []

    for _ in range(KEEP_OUTPUT_FILES + 5):
        results.append(await terminal.run(ExecRequest(command="printf 0123456789abcdef")))

    files = list((tmp_path / ".peermesh" / "exec").iterdir())
    assert len(files) == KEEP_OUTPUT_FILES
    newest, oldest = results[-1].output_file, results[0].output_file
    assert newest is not None and (tmp_path / newest).exists()
    assert oldest is not None and not (tmp_path / oldest).exists()


# -- the request ------------------------------------------------------------------------------


@pytest.mark.parametrize("cwd", ["..", "/etc", "sub/../../elsewhere"])
async def test_cwd_outside_the_workspace_is_refused_with_403(
    client: TestClient, workspace: Path, cwd: str
) -> None:
    (workspace / "sub").mkdir()

    response = await client.post(EXEC, json={"command": "pwd", "cwd": cwd})

    assert response.status == 403
    assert (await response.json())["error"]["code"] == "forbidden"


async def test_cwd_is_relative_to_the_workspace_and_defaults_to_its_root(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "sub" / "dir").mkdir(parents=True)

    in_sub = await execute(client, command="pwd", cwd="sub/dir")
    at_root = await execute(client, command="pwd")

    assert in_sub["stdout"].strip() == str((workspace / "sub" / "dir").resolve())
    assert at_root["stdout"].strip() == str(workspace.resolve())


async def test_missing_cwd_is_refused_with_404(client: TestClient) -> None:
    response = await client.post(EXEC, json={"command": "pwd", "cwd": "nowhere"})

    assert response.status == 404


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{", "malformed JSON"),
        (b'{"command": "true", "shell": "zsh"}', "shell"),
        (b'{"command": "true", "timeout_s": "soon"}', "timeout_s"),
        (b'{"command": ["ls"]}', "command"),
        (b'{"cwd": "sub"}', "command"),
        (b'{"command": "true", "env": {"A": 1}}', "env.A"),
        (b'{"command": "true", "env": {"A=B": "x"}}', "env.A=B"),
    ],
)
async def test_bad_body_is_refused_with_400_naming_the_field(
    client: TestClient, body: bytes, named: str
) -> None:
    response = await client.post(
        EXEC, data=body, headers={"Content-Type": "application/json"}
    )

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "bad_request"
    assert named in error["message"]


async def test_stdin_is_given_to_the_command(client: TestClient) -> None:
    result = await execute(client, command='read answer; echo "got $answer"; cat', stdin="y\nrest")

    assert result["exit_code"] == 0
    assert result["stdout"] == "got y\nrest"


async def test_env_is_merged_over_the_non_interactive_defaults(client: TestClient) -> None:
    result = await execute(
        client,
        command='echo "$FOO|$CI|$PAGER|$GIT_TERMINAL_PROMPT|$TERM|${HOME:+home}"',
        env={"FOO": "bar", "PAGER": "less"},
    )

    assert result["stdout"] == "bar|1|less|0|dumb|home\n"


async def test_a_command_over_the_systems_argument_limit_is_a_400_naming_the_limit(
    client: TestClient,
) -> None:
    too_long = "echo " + "x" * (MAX_ARG_BYTES + 1)
    for body, field in (
        ({"command": too_long}, "command"),
        ({"command": "true", "env": {"BIG": "x" * (MAX_ARG_BYTES + 1)}}, "env.BIG"),
    ):
        response = await client.post(EXEC, json=body)
        error = (await response.json())["error"]

        assert response.status == 400, error
        assert field in error["message"] and str(MAX_ARG_BYTES) in error["message"]


async def test_arguments_that_together_pass_the_system_limit_are_a_413_naming_it(
    client: TestClient,
) -> None:
    # Each variable is within the per-argument limit; together they pass ARG_MAX.
    count = os.sysconf("SC_ARG_MAX") // (MAX_ARG_BYTES - 16) + 1
    env = {f"V{index}": "x" * (MAX_ARG_BYTES - 16) for index in range(count)}

    body = io.BytesIO(json.dumps({"command": "true", "env": env}).encode())
    response = await client.post(EXEC, data=body, headers={"Content-Type": "application/json"})
    error = (await response.json())["error"]

    assert response.status == 413, error
    assert str(os.sysconf("SC_ARG_MAX")) in error["message"]


async def test_text_that_is_not_valid_unicode_is_a_400_naming_the_field(
    client: TestClient,
) -> None:
    for body, field in (
        ('{"command": "echo \\ud800"}', "command"),
        ('{"command": "cat", "stdin": "\\udfff"}', "stdin"),
        ('{"command": "true", "env": {"A": "\\ud800"}}', "env.A"),
    ):
        response = await client.post(EXEC, data=body,
                                     headers={"Content-Type": "application/json"})
        error = (await response.json())["error"]

        assert response.status == 400, (body, error)
        assert field in error["message"]


async def test_commands_do_not_see_the_node_token_or_api_key_by_any_route(
    client: TestClient, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_TOKEN", "node-secret-token")
    monkeypatch.setenv("MESH_API_KEY", "provider-secret-key")
    monkeypatch.setenv("MESH_HARMLESS", "shown")
    command = 'echo "${MESH_TOKEN-unset} ${MESH_API_KEY-unset} ${MESH_HARMLESS-unset}"'
    expected = "unset unset shown\n"

    assert (await execute(client, command=command))["stdout"] == expected

    async with client.ws_connect(WS) as ws:
        await ws.send_json({"command": command})
        messages = [await ws.receive_json()]
        while messages[-1]["type"] != "exit":
            messages.append(await ws.receive_json())
    assert messages[-1]["stdout"] == expected

    result = await node.tools.get("terminal_exec").call(ToolContext(), {"command": command})
    assert "node-secret-token" not in str(result) and "provider-secret-key" not in str(result)
    assert "unset unset shown" in str(result)


@pytest.mark.parametrize(
    ("command", "exit_code"),
    [("true", 0), ("false", 1), ("exit 3", 3), ("no-such-command-here", 127)],
)
async def test_exit_codes_come_back(client: TestClient, command: str, exit_code: int) -> None:
    result = await execute(client, command=command)

    assert result["exit_code"] == exit_code
    assert result["timed_out"] is False


async def test_metrics_count_commands_by_outcome(client: TestClient) -> None:
    await execute(client, command="true")
    await execute(client, command="false")

    text = await (await client.get("/metrics")).text()

    assert 'peermesh_exec_commands_total{outcome="ok"} 1.0' in text
    assert 'peermesh_exec_commands_total{outcome="error"} 1.0' in text
    assert "peermesh_exec_seconds_count 2.0" in text


# -- WebSocket --------------------------------------------------------------------------------


async def test_ws_streams_output_before_the_command_exits(
    client: TestClient, workspace: Path
) -> None:
    command = "echo first; while [ ! -e go ]; do sleep 0.01; done; echo second; echo err >&2"

    async with client.ws_connect(WS) as ws:
        await ws.send_json({"command": command, "timeout_s": 60})
        assert await ws.receive_json() == {"type": "stdout", "data": "first\n"}
        (workspace / "go").touch()
        messages = [await ws.receive_json()]
        while messages[-1]["type"] != "exit":
            messages.append(await ws.receive_json())
        closing = await ws.receive()

    streamed = {"stdout": "", "stderr": ""}
    for message in messages[:-1]:
        streamed[message["type"]] += message["data"]
    assert streamed == {"stdout": "second\n", "stderr": "err\n"}
    exit_message = messages[-1]
    assert exit_message["exit_code"] == 0
    assert exit_message["stdout"] == "first\nsecond\n"
    assert exit_message["stderr"] == "err\n"
    assert {"timed_out", "truncated", "duration_ms", "output_file"} <= exit_message.keys()
    assert closing.type == WSMsgType.CLOSE


async def test_ws_client_closing_the_socket_kills_the_command(
    client: TestClient, workspace: Path
) -> None:
    async with client.ws_connect(WS) as ws:
        await ws.send_json({"command": "echo $$ > shell.pid; echo started; sleep 30"})
        assert await ws.receive_json() == {"type": "stdout", "data": "started\n"}
        pgid = read_pid(workspace / "shell.pid")
        await ws.close()

    await wait_until(lambda: not group_running(pgid))


@pytest.mark.parametrize(
    ("send", "status", "named"),
    [
        (lambda ws: ws.send_str("not json"), 400, "malformed JSON"),
        (lambda ws: ws.send_json({"command": "true", "bogus": 1}), 400, "bogus"),
        (lambda ws: ws.send_json({"command": "true", "cwd": ".."}), 403, "leaves"),
        (lambda ws: ws.send_bytes(b'{"command": "true"}'), 400, "text message"),
    ],
)
async def test_ws_bad_first_message_gets_an_error_then_a_4xxx_close(
    client: TestClient, send: Callable[[Any], Awaitable[None]], status: int, named: str
) -> None:
    async with client.ws_connect(WS) as ws:
        await send(ws)
        message = await ws.receive_json()
        closing = await ws.receive()

    assert message["type"] == "error"
    assert named in message["error"]["message"]
    assert {"code", "message", "details"} <= message["error"].keys()
    assert closing.type == WSMsgType.CLOSE
    assert closing.data == 4000 + status


# -- the tool ---------------------------------------------------------------------------------


async def test_terminal_exec_tool_runs_a_step(client: TestClient, node: Node) -> None:
    response = await client.post("/api/v1/agent/tasks", json={
        "steps": [{"tool": "terminal_exec", "args": {"command": "echo from-step"}}],
    })
    task = await node.tasks.wait((await response.json())["id"])

    assert task.status.value == "completed"
    assert task.result[0]["stdout"] == "from-step\n"


async def test_terminal_exec_tool_refuses_unknown_arguments(node: Node) -> None:
    tool = node.tools.get("terminal_exec")

    with pytest.raises(ToolError, match="shell: unknown argument"):
        await tool.call(ToolContext(), {"command": "true", "shell": "zsh"})
    assert tool.executes and tool.writes
