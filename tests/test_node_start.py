"""Starting a node as a user would: options, MESH_* variables, the ready line, the token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from agent_runtime.__main__ import main as node_main


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("MESH_")}
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "agent_runtime", *args, "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=tmp_path,
    )


def ready_line(process: subprocess.Popen[str]) -> dict[str, object]:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, f"the node exited before it was ready: {process.communicate()[1][-2000:]}"
    return json.loads(line)


def stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr[-2000:]
    return stderr


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_node_without_a_token_generates_one_and_prints_it_once(tmp_path: Path) -> None:
    process = start(tmp_path, "--workspace", str(tmp_path / "ws"), "--port", "0",
                    "--state-dir", str(tmp_path / "state"))
    line = ready_line(process)
    token = str(line["token"])
    url = str(line["url"])

    assert len(token) >= 16
    assert get(f"{url}/api/v1/agent/tasks", token)[0] == 200
    assert get(f"{url}/api/v1/agent/tasks", "not-" + token)[0] == 401
    stderr = stop(process)
    assert token not in stderr, "the generated token must not reach the logs"


def test_mesh_variables_configure_a_node_like_options(tmp_path: Path) -> None:
    env = {"MESH_WORKSPACE": str(tmp_path / "from-env"), "MESH_PORT": "0",
           "MESH_TOKEN": "env-token-123456", "MESH_NAME": "env-node",
           "MESH_STATE_DIR": str(tmp_path / "state")}
    process = start(tmp_path, env=env)
    line = ready_line(process)

    assert line["name"] == "env-node"
    assert "token" not in line, "a token the user chose is never printed"
    status, body = get(f"{line['url']}/api/v1/files/", "env-token-123456")
    assert status == 200, body
    assert (tmp_path / "from-env").is_dir()
    stop(process)


def test_option_on_the_command_line_wins_over_its_variable(tmp_path: Path) -> None:
    process = start(tmp_path, "--name", "from-option", "--workspace", str(tmp_path / "ws"),
                    "--port", "0", "--token", "option-token-1234",
                    env={"MESH_NAME": "from-env", "MESH_STATE_DIR": str(tmp_path / "state")})
    assert ready_line(process)["name"] == "from-option"
    stop(process)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "not-a-number"], {}, "port"),
        ([], {"MESH_PORT": "eighty"}, "MESH_PORT"),
        (["--token", "short"], {}, "token"),
    ],
)
def test_bad_configuration_is_one_clear_line_and_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str,
) -> None:
    process = start(tmp_path, "--workspace", str(tmp_path / "ws"), *args, env=env)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 2
    assert named in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--max-steps", "-3"], "--max-steps"),
        (["--max-steps", "0"], "--max-steps"),
        (["--task-timeout-s", "-1"], "--task-timeout-s"),
        (["--task-timeout-s", "inf"], "--task-timeout-s"),
        (["--model-timeout-s", "nan"], "--model-timeout-s"),
        (["--stream-idle-timeout-s", "0"], "--stream-idle-timeout-s"),
        (["--temperature", "99"], "--temperature"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--model-retries", "-1"], "--model-retries"),
        (["--max-tool-mistakes", "-2"], "--max-tool-mistakes"),
        (["--log-format", "xml"], "--log-format"),
        (["--log-level", "bogus"], "--log-level"),
        (["--lease-s", "-5"], "--lease-s"),
        (["--lease-s", "0"], "--lease-s"),
        (["--name", ""], "--name"),
        (["--host", ""], "--host"),
        (["--public-url", "not a url"], "--public-url"),
        (["--parent-url", "parent:8700"], "--parent-url"),
        (["--api-base", "localhost:11434"], "--api-base"),
    ],
)
def test_an_out_of_range_or_unknown_setting_is_one_line_naming_the_option_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    args: list[str], named: str,
) -> None:
    # In-process: refused while the options are read, before the node builds anything.
    for variable in [key for key in os.environ if key.startswith("MESH_")]:
        monkeypatch.delenv(variable)

    code = node_main(["--workspace", str(tmp_path / "ws"), "--port", "0", *args])

    stderr = capsys.readouterr().err
    assert code == 2
    assert named in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "ws").exists()


def test_a_log_level_variable_in_capitals_is_accepted(tmp_path: Path) -> None:
    process = start(tmp_path, "--workspace", str(tmp_path / "ws"), "--port", "0",
                    "--state-dir", str(tmp_path / "state"), "--token", "level-token-1234",
                    env={"MESH_LOG_LEVEL": "WARNING"})
    ready_line(process)
    stop(process)


def test_a_negative_lease_is_refused_instead_of_the_node_exiting_at_once(
    tmp_path: Path,
) -> None:
    process = start(tmp_path, "--workspace", str(tmp_path / "ws"), "--port", "0",
                    env={"MESH_LEASE_S": "-5"})
    stdout, stderr = process.communicate(timeout=30)

    assert process.returncode == 2
    assert "MESH_LEASE_S" in stderr and stdout == ""


@pytest.mark.parametrize("option", ["--workspace", "--state-dir"])
def test_a_folder_that_is_a_file_is_a_config_error_naming_it(
    tmp_path: Path, option: str,
) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a folder")
    folders = {"--workspace": str(tmp_path / "ws"), "--state-dir": str(tmp_path / "state")}
    folders[option] = str(a_file)

    process = start(tmp_path, "--workspace", folders["--workspace"], "--port", "0",
                    "--state-dir", folders["--state-dir"], "--token", "folder-token-1234")
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 2
    assert option in stderr and str(a_file) in stderr
    assert "cannot listen" not in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_a_workspace_below_a_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    # /etc/passwd/ws: the folder cannot be created at all.
    process = start(tmp_path, "--workspace", "/etc/passwd/ws", "--port", "0",
                    "--state-dir", str(tmp_path / "state"), "--token", "folder-token-1234")
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 2
    assert "--workspace" in stderr and "/etc/passwd/ws" in stderr
    assert "Traceback" not in stderr


def test_a_busy_port_is_reported_without_a_traceback(tmp_path: Path) -> None:
    first = start(tmp_path, "--workspace", str(tmp_path / "a"), "--port", "0",
                  "--token", "busy-token-12345", "--state-dir", str(tmp_path / "sa"))
    port = str(ready_line(first)["url"]).rsplit(":", 1)[1]
    second = start(tmp_path, "--workspace", str(tmp_path / "b"), "--port", port,
                   "--token", "busy-token-12345", "--state-dir", str(tmp_path / "sb"))
    _, stderr = second.communicate(timeout=30)
    stop(first)

    assert second.returncode == 1
    assert f"cannot listen" in stderr and port in stderr
    assert "Traceback" not in stderr


def test_starting_a_node_does_not_import_the_model_client(tmp_path: Path) -> None:
    # litellm takes seconds to import; a node pays for it only when a model is first used.
    code = (
        "import sys, asyncio\n"
        "from agent_runtime.app import build_app\n"
        "from agent_runtime.config import NodeConfig\n"
        f"build_app(NodeConfig(workspace={str(tmp_path / 'ws')!r}, "
        f"state_dir={str(tmp_path / 'state')!r}, token='x' * 16))\n"
        "print(sorted(name for name in ('litellm', 'mcp', 'docker') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
