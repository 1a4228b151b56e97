"""The `mesh` command, run as a user runs it: the installed console script, as a subprocess,
against real local nodes. Only the model is scripted, behind litellm.

Every test has its own PEERMESH_HOME, so "nothing left behind" can be checked exactly: no
mesh record, no registry entry, and no process whose environment carries that home.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent_runtime.scripted_model import ScriptedModelServer, ToolCall, Turn

ROOT = Path(__file__).resolve().parent.parent
MESH = Path(sys.executable).with_name("mesh")
COMMANDS = ["node", "up", "run", "ps", "task", "tail", "exec", "cp", "snapshot", "restore",
            "logs", "down", "validate"]

pytestmark = pytest.mark.skipif(not MESH.exists(), reason=f"no console script at {MESH}: "
                                "install the project (scripts/setup)")


# -- running the command ----------------------------------------------------------------------


class Shell:
    """Runs `mesh` with one PEERMESH_HOME, in one working folder."""

    def __init__(self, home: Path, cwd: Path) -> None:
        self.home = home
        self.cwd = cwd
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("MESH_")}
        self.env.update(PEERMESH_HOME=str(home), LITELLM_LOCAL_MODEL_COST_MAP="True")
        self.started: dict[str, Any] = {}

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(MESH), *args], cwd=self.cwd, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen[str]:
        """`mesh` in the background, in a process group of its own as a terminal job is."""
        with default_sigint():
            return subprocess.Popen([str(MESH), *args], cwd=self.cwd, env=self.env,
                                    text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    process_group=0)

    def json(self, *args: str) -> Any:
        done = self("--json", *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def leftovers(self) -> list[str]:
        """What this home still holds: mesh records, registry entries, node folders."""
        meshes = self.home / "meshes"
        return sorted(str(p.relative_to(meshes)) for p in meshes.rglob("*")) \
            if meshes.exists() else []

    def processes(self) -> list[str]:
        """Live processes started with this home: nodes, fork servers, supervisors."""
        marker = f"PEERMESH_HOME={self.home}\0".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ")
                                 .decode(errors="replace").strip())
            except OSError:
                continue
        return [command for command in found if command]


@contextlib.contextmanager
def default_sigint() -> Iterator[None]:
    # A child inherits an ignored SIGINT (pytest started as a background job, say); then no
    # Ctrl+C could reach it. Let it start with the default, as a terminal's job does.
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous == signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def wait_for_line(stream: Any, pattern: str, timeout: float = 60) -> list[str]:
    """Read lines until one matches; all lines read so far come back."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            lines.append(line)
            if re.search(pattern, line):
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert found.wait(timeout), f"no line matching {pattern!r} in:\n{''.join(lines)}"
    return lines


def wait_until(probe: Any, timeout: float = 30) -> Any:
    """The first truthy answer of `probe`, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while not (answer := probe()):
        assert time.monotonic() < deadline, "the state did not come about in time"
        time.sleep(0.1)
    return answer


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sh(tmp_path: Path) -> Iterator[Shell]:
    shell = Shell(tmp_path / "home", tmp_path)
    yield shell
    if shell.processes():
        shell("down", "--all")


# -- topology files ---------------------------------------------------------------------------


def test_a_misspelt_instructions_key_is_rejected_with_file_line_and_a_suggestion(
        sh: Shell) -> None:
    write(sh.cwd, "team.yaml", """\
        mesh:
          name: typo
        nodes:
          - name: writer
            instrutions: Write short sentences.
        tasks:
          - name: draft
            node: writer
            description: Draft the release notes.
        """)

    done = sh("run", "team.yaml")

    assert done.returncode == 2
    assert done.stderr == ("mesh: team.yaml:5: nodes[0].instrutions: unknown key 'instrutions' "
                           "(did you mean 'instructions'?)\n")
    assert sh.leftovers() == [] and sh.processes() == []


def test_a_cycle_in_needs_is_rejected_showing_its_path(sh: Shell) -> None:
    write(sh.cwd, "cycle.yaml", """\
        mesh: {name: cycle}
        nodes: [{name: runner}]
        tasks:
          - {name: A, node: runner, description: a, needs: [B]}
          - {name: B, node: runner, description: b, needs: [C]}
          - {name: C, node: runner, description: c, needs: [A]}
        """)

    done = sh("up", "cycle.yaml")

    assert done.returncode == 2
    assert "cycle.yaml:4:" in done.stderr
    assert "cycle in needs: A -> B -> C -> A" in done.stderr
    assert "Traceback" not in done.stderr
    assert sh.leftovers() == []


def test_a_model_name_where_a_node_belongs_is_rejected_naming_the_key_and_the_node(
        sh: Shell) -> None:
    write(sh.cwd, "review.yaml", """\
        mesh: {name: review}
        nodes:
          - name: reviewer
        tasks:
          - name: review
            node: gpt-4o-mini
            description: Review the change.
        """)

    done = sh("validate", "review.yaml")

    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("review.yaml:6: tasks[0].node: task 'review' names node "
                           "'gpt-4o-mini', which is not a node of this topology")
    assert "looks like a model name: set it as `model:`" in line


def test_validate_prints_every_problem_and_its_json_parses(sh: Shell) -> None:
    write(sh.cwd, "broken.yaml", """\
        mesh: {name: broken, backend: podman}
        nodes:
          - {name: a, instrutions: hi}
        tasks:
          - {name: t, node: b, description: x}
        """)

    text = sh("validate", "broken.yaml")
    report = json.loads(sh("--json", "validate", "broken.yaml").stdout)

    assert text.returncode == 2
    assert len(text.stderr.splitlines()) == 3
    assert report["ok"] is False
    assert [(p["line"], p["key"]) for p in report["problems"]] == [
        (1, "mesh.backend"), (3, "nodes[0].instrutions"), (5, "tasks[0].node")]
    # The project folder it names comes from examples/fetch_project.py, which a clean
    # checkout has not run.
    shipped = str(ROOT / "topologies" / "real-project-checks.yaml")
    assert sh("validate", "--skip-paths", shipped).stdout == "ok: 1 node, 2 tasks\n"


def test_validate_reports_a_missing_workspace_folder_that_run_would_stop_on(sh: Shell) -> None:
    write(sh.cwd, "work.yaml", """\
        mesh:
          name: work
          workspace:
            path: ./project
        nodes: [{name: worker}]
        tasks:
          - {name: t, node: worker, steps: [{tool: terminal_exec, args: {command: ls}}]}
        """)

    missing = sh("validate", "work.yaml")
    elsewhere = sh("validate", "work.yaml", "--set", f"mesh.workspace.path={sh.cwd}")
    skipped = sh("validate", "work.yaml", "--skip-paths")

    assert missing.returncode == 2
    assert missing.stderr.startswith(
        f"work.yaml:4: mesh.workspace.path: no folder {sh.cwd / 'project'};")
    assert elsewhere.returncode == 0 and skipped.returncode == 0


# -- the command line itself ------------------------------------------------------------------


def test_every_command_answers_help(sh: Shell) -> None:
    helps = {name: sh.start(*[name] if name else [], "--help") for name in ["", *COMMANDS]}

    for name, proc in helps.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (name, err)
        assert out.startswith(f"usage: mesh {name}".rstrip()), (name, out)
        assert err == ""


def test_bad_input_exits_2_and_an_unreachable_node_3_each_with_one_line(sh: Shell) -> None:
    url = f"http://127.0.0.1:{closed_port()}"

    unknown = sh("frobnicate")
    no_node = sh("exec", "nowhere", "--", "true")
    unreachable = sh("exec", "--token", "t0ken", url, "--", "true")
    as_json = sh("--json", "snapshot", "--token", "t0ken", url)

    assert unknown.returncode == 2 and "invalid choice: 'frobnicate'" in unknown.stderr
    assert no_node.returncode == 2
    assert no_node.stderr == ("mesh: no node 'nowhere' in any mesh that is up (nodes: none); "
                              "give a URL with --token instead\n")
    assert unreachable.returncode == 3
    [line] = unreachable.stderr.splitlines()
    assert line.startswith(f"mesh: {url}: cannot reach the node")
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["error"]["exit_code"] == 3


# -- a mesh that is up ------------------------------------------------------------------------


class ModelThread:
    """The scripted model served from a thread, so it answers while the test waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = ScriptedModelServer()

    def __enter__(self) -> ScriptedModelServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self.server

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedModelServer]:
    with ModelThread() as server:
        yield server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory,
         model: ScriptedModelServer) -> Iterator[Shell]:
    """`mesh up` of two nodes, one with a (scripted) model, shared by the tests below."""
    folder = tmp_path_factory.mktemp("live")
    shell = Shell(folder / "home", folder)
    write(folder, "team.yaml", f"""\
        mesh:
          name: live-{secrets.token_hex(3)}
        nodes:
          - name: worker
          - name: writer
            model: openai/scripted
            api_base: {model.api_base}
            instructions: Always answer in French.
        """)
    up = shell("--json", "up", "team.yaml")
    assert up.returncode == 0, up.stderr
    shell.started = json.loads(up.stdout)
    try:
        yield shell
    finally:
        shell("down", "--all")


def test_up_prints_each_node_url_and_ps_shows_them_up(live: Shell) -> None:
    nodes = {row["node"]: row for row in live.json("ps")}
    text = live("ps").stdout.splitlines()

    assert live.started["nodes"] == {name: row["url"] for name, row in nodes.items()}
    assert set(nodes) == {"worker", "writer"}
    assert all(row["state"] == "up" and row["url"].startswith("http://127.0.0.1:")
               for row in nodes.values())
    assert text[0].split() == ["MESH", "NODE", "STATE", "URL"]
    assert any(line.split()[1:3] == ["worker", "up"] for line in text[1:])


def test_exec_prints_the_output_and_exits_with_the_command_code(live: Shell) -> None:
    done = live("exec", "worker", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    result = live.json("exec", "worker", "pwd")

    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    assert result["exit_code"] == 0 and result["stdout"].strip().endswith("/workspace")


def test_cp_copies_a_file_to_a_node_and_back(live: Shell) -> None:
    (live.cwd / "notes.txt").write_text("kept by peers\n")
    (live.cwd / "back").mkdir(exist_ok=True)

    there = live.json("cp", "notes.txt", "worker:docs/notes.txt")
    back = live("cp", "worker:docs/notes.txt", "back")
    missing = live("cp", "worker:docs/absent.txt", "back")

    assert there["path"] == "docs/notes.txt" and there["size"] == 14
    assert back.returncode == 0 and back.stdout == "worker:docs/notes.txt -> back/notes.txt\n"
    assert (live.cwd / "back" / "notes.txt").read_text() == "kept by peers\n"
    assert live("exec", "worker", "cat docs/notes.txt").stdout == "kept by peers\n"
    assert missing.returncode == 2
    assert missing.stderr == "mesh: worker:docs/absent.txt: no such file or folder\n"


def test_a_step_task_streams_its_events_and_prints_its_result(live: Shell) -> None:
    steps = write(live.cwd, "steps.json", json.dumps([
        {"tool": "terminal_exec", "args": {"command": "echo built > build.log; echo built"}}]))
    failing = write(live.cwd, "failing.json", json.dumps([
        {"tool": "terminal_exec", "args": {"command": "exit 9"}}]))

    done = live("task", "worker", "--steps", str(steps))
    failed = live("task", "worker", "--steps", str(failing))
    lines = live("--json", "task", "worker", "--steps", str(steps)).stdout.splitlines()

    assert done.returncode == 0, done.stderr
    assert "-> terminal_exec" in done.stderr and "<- terminal_exec ok exit 0: built" in done.stderr
    assert json.loads(done.stdout)[0]["stdout"] == "built\n"
    assert failed.returncode == 1
    assert "exited with 9" in failed.stderr.splitlines()[-1]
    assert [json.loads(line).get("type") for line in lines][-2:] == ["task.completed", None]
    assert json.loads(lines[-1])["status"] == "completed"


def test_a_model_task_streams_the_answer_and_uses_the_nodes_instructions(
        live: Shell, model: ScriptedModelServer) -> None:
    model.script_for("greet", Turn(tool_calls=[ToolCall("write_file", {
        "path": "greeting.txt", "content": "bonjour\n"})]), Turn(text="J'ai écrit le fichier."))

    done = live("task", "writer", "Write a greeting to greeting.txt [script:greet]")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "J'ai écrit le fichier."
    assert "-> write_file" in done.stderr
    assert live("exec", "writer", "cat greeting.txt").stdout == "bonjour\n"
    system = model.requests[-1]["messages"][0]
    assert system["role"] == "system" and "Always answer in French." in system["content"]


def test_tail_replays_a_task_and_follows_a_node_until_interrupted(live: Shell) -> None:
    steps = write(live.cwd, "tail-steps.json", json.dumps([
        {"tool": "terminal_exec", "args": {"command": "echo followed"}}]))
    follower = live.start("tail", "worker", "--after", "0")
    try:
        task_id = live("task", "worker", "--steps", str(steps), "--detach").stdout.strip()
        wait_for_line(follower.stdout, "exit 0: followed")
        replay = live("tail", "worker", task_id)
        events = [json.loads(line) for line in
                  live("--json", "tail", "worker", task_id).stdout.splitlines()]
    finally:
        os.killpg(follower.pid, signal.SIGINT)
        follower.communicate(timeout=30)

    assert replay.returncode == 0
    assert "<- terminal_exec ok exit 0: followed" in replay.stdout
    assert replay.stdout.splitlines()[-1].endswith("task.completed")
    assert {event["task_id"] for event in events} == {task_id}
    assert [event["type"] for event in events][-1] == "task.completed"
    assert follower.returncode == 130


def test_snapshot_and_restore_bring_the_workspace_back(live: Shell) -> None:
    live("exec", "worker", "echo v1 > state.txt")

    taken = live.json("snapshot", "worker", "--alias", "before-change")
    live("exec", "worker", "echo v2 > state.txt; touch stray.txt")
    restored = live.json("restore", "worker", "before-change")
    unknown = live("restore", "worker", "no-such-snapshot")

    assert restored["id"] == taken["id"] and restored["alias"] == "before-change"
    assert live("exec", "worker", "cat state.txt; test ! -e stray.txt").stdout == "v1\n"
    assert unknown.returncode == 2
    assert unknown.stderr == "mesh: worker: no snapshot with id or alias 'no-such-snapshot'\n"


def test_logs_show_the_nodes_own_log(live: Shell) -> None:
    url = next(row["url"] for row in live.json("ps") if row["node"] == "worker")

    done = live("logs", "worker", "--tail", "500")
    as_json = live.json("logs", "worker")

    assert done.returncode == 0
    ready = [json.loads(line) for line in done.stdout.splitlines() if "node.ready" in line]
    assert ready and ready[0]["url"] == url
    assert f'"url": "{url}"' in as_json["logs"]


def test_values_refused_on_this_side_exit_2_naming_the_field(live: Shell) -> None:
    whole_task = write(live.cwd, "whole-task.json", json.dumps(
        {"steps": [{"tool": "terminal_exec", "args": {"command": "true"}}]}))
    no_tool = write(live.cwd, "no-tool.json", json.dumps([{"args": {"command": "true"}}]))

    zero_timeout = live("exec", "--timeout", "0", "worker", "--", "true")
    wrapped = live("task", "worker", "--steps", str(whole_task))
    missing = live("task", "worker", "--steps", str(no_tool))
    negative_tail = live("logs", "worker", "--tail", "-1")
    late_option = live("exec", "worker", "--json", "--", "echo", "hi")

    for done in (zero_timeout, wrapped, missing, negative_tail, late_option):
        assert done.returncode == 2, done.stderr
        assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert "--timeout: must be more than 0 seconds" in zero_timeout.stderr
    [line] = wrapped.stderr.splitlines()
    assert "steps must be a JSON list" in line and "it holds an object" in line
    [line] = missing.stderr.splitlines()
    assert "steps.0.tool: Field required" in line
    assert "--tail: must be 0 or more" in negative_tail.stderr
    assert "put it before NODE" in late_option.stderr and not late_option.stdout


def test_tail_of_an_unknown_task_or_a_negative_seq_shows_the_nodes_message(
        live: Shell) -> None:
    unknown = live("tail", "worker", "nope")
    negative = live("tail", "worker", "--after", "-5")

    assert unknown.returncode == 2
    assert unknown.stderr == "mesh: worker (task nope): no task 'nope'\n"
    assert negative.returncode == 2 and "must be 0 or more" in negative.stderr


def test_cp_takes_a_node_url_and_copies_folders_whole_both_ways(live: Shell) -> None:
    url = next(row["url"] for row in live.json("ps") if row["node"] == "worker")
    [record] = (live.home / "meshes").glob("*.json")
    token = json.loads(record.read_text())["nodes"]["worker"]["token"]
    tree = live.cwd / "tree"
    (tree / "sub").mkdir(parents=True, exist_ok=True)
    (tree / "top.txt").write_text("top\n")
    (tree / "sub" / "deep.txt").write_text("deep\n")
    live("exec", "worker", "rm -rf shared; mkdir shared")

    up = live("cp", str(tree), "worker:shared")
    fresh = live("cp", "worker:shared/tree", str(live.cwd / "copied"))
    into = live("cp", "worker:shared/tree", str(live.cwd / "newdir") + "/")
    via_url = live("cp", "--token", token, str(tree / "top.txt"), f"{url}:via-url.txt")
    no_token = live("cp", str(tree / "top.txt"), f"{url}:via-url.txt")

    assert up.returncode == 0, up.stderr
    assert live("exec", "worker", "cat shared/tree/sub/deep.txt").stdout == "deep\n"
    assert fresh.returncode == 0, fresh.stderr
    assert (live.cwd / "copied" / "sub" / "deep.txt").read_text() == "deep\n"
    assert (live.cwd / "copied" / "top.txt").read_text() == "top\n"
    assert into.returncode == 0, into.stderr
    assert (live.cwd / "newdir" / "tree" / "sub" / "deep.txt").read_text() == "deep\n"
    assert via_url.returncode == 0, via_url.stderr
    assert live("exec", "worker", "cat via-url.txt").stdout == "top\n"
    assert no_token.returncode == 2 and "no token for" in no_token.stderr


def test_a_file_into_a_missing_folder_with_a_trailing_slash_makes_the_folder(
        live: Shell) -> None:
    live("exec", "worker", "echo note > note.txt")

    done = live("cp", "worker:note.txt", str(live.cwd / "made") + "/")

    assert done.returncode == 0, done.stderr
    assert (live.cwd / "made" / "note.txt").read_text() == "note\n"


def test_logs_of_a_url_that_is_no_node_of_a_mesh_here_says_what_to_give(live: Shell) -> None:
    url = next(row["url"] for row in live.json("ps") if row["node"] == "worker")
    stranger = f"http://127.0.0.1:{closed_port()}"

    by_url = live("logs", url, "--tail", "50")
    unknown = live("logs", stranger)

    assert by_url.returncode == 0, by_url.stderr
    assert "node.ready" in by_url.stdout
    assert unknown.returncode == 2
    assert unknown.stderr == (f"mesh: no log for {stranger}: logs are kept for the nodes of a "
                              "mesh that is up here; give its node name (see `mesh ps`)\n")


# -- down and run -----------------------------------------------------------------------------

PIPELINE = """\
    mesh:
      name: {name}
    nodes:
      - name: checker
        count: 2
    tasks:
      - name: prepare
        node: checker
        steps:
          - tool: terminal_exec
            args: {{command: "echo ready"}}
      - name: checks
        node: checker
        needs: [prepare]
        fan_out:
          over:
            fine: echo all good
            broken: echo about to fail > verdict.txt; exit 7
        steps:
          - tool: terminal_exec
            args: {{command: "{{item}}"}}
      - name: publish
        node: checker
        needs: [checks]
        steps:
          - tool: terminal_exec
            args: {{command: "echo published"}}
    outputs:
      files:
        - {{node: checker-2, path: verdict.txt, to: out/verdict.txt}}
    """


def test_run_reports_each_branch_isolates_the_failing_one_and_leaves_nothing(
        sh: Shell) -> None:
    write(sh.cwd, "pipeline.yaml", PIPELINE.format(name=f"run-{secrets.token_hex(3)}"))

    done = sh("run", "pipeline.yaml")

    assert done.returncode == 1, done.stderr
    report = done.stdout.splitlines()
    assert report[0].startswith("mesh run-") and "2 of 3 tasks did not succeed" in report[0]
    assert report[1] == "ok   prepare: succeeded"
    assert report[3] == "FAIL checks: 1 of 2 branches failed"
    assert re.match(r" +ok   checks\[fine\] +checker-1 +[\d.]+s  exit 0: all good$", report[4])
    assert re.match(r" +FAIL checks\[broken\] +checker-2 +[\d.]+s  task failed: .*exited with 7",
                    report[5])
    assert report[6] == "skip publish: needs checks, which failed"
    assert report[7] == "output: out/verdict.txt"
    assert (sh.cwd / "out" / "verdict.txt").read_text() == "about to fail\n"
    assert "[checks[broken]] failed" in done.stderr
    assert sh.leftovers() == [] and sh.processes() == []


def test_run_exits_0_when_every_task_succeeds_and_keep_leaves_the_mesh_up(sh: Shell) -> None:
    write(sh.cwd, "pipeline.yaml", PIPELINE.format(name=f"keep-{secrets.token_hex(3)}"))

    done = sh("--json", "run", "pipeline.yaml", "--keep",
              "--set", "tasks.checks.fan_out.over.broken=echo fixed | tee verdict.txt")
    kept = sh.json("ps")
    down = sh.json("down", "pipeline.yaml")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["succeeded"] is True
    assert [(b["name"], b["status"], b["node"]) for b in report["tasks"][1]["branches"]] == [
        ("checks[fine]", "succeeded", "checker-1"), ("checks[broken]", "succeeded", "checker-2")]
    assert report["tasks"][1]["branches"][1]["result"][0]["stdout"] == "fixed\n"
    assert report["outputs"] == ["out/verdict.txt"]
    assert sorted(row["node"] for row in kept) == ["checker-1", "checker-2"]
    assert all(row["state"] == "up" for row in kept)
    assert down == {"removed": [kept[0]["mesh"]]}
    assert sh.leftovers() == [] and sh.processes() == []
    assert sh("down").stdout == "no meshes are up\n"


def test_the_review_topology_runs_its_reviewers_on_a_model_in_parallel(
        sh: Shell, model: ScriptedModelServer) -> None:
    project = sh.cwd / "project"
    project.mkdir()
    (project / "app.py").write_text("def add(a, b):\n    return a - b\n")
    model.requests.clear()
    model.add(*[Turn(text="Summary: add() subtracts. High: app.py:2 returns a - b.")] * 3)

    done = sh("--json", "run", str(ROOT / "topologies" / "review-fanout.yaml"),
              "--set", f"mesh.name=review-{secrets.token_hex(3)}",
              "--set", f"mesh.workspace.path={project}",
              "--set", "mesh.model=openai/scripted", "--set", f"mesh.api_base={model.api_base}")

    assert done.returncode == 0, done.stderr
    [review] = json.loads(done.stdout)["tasks"]
    assert [(b["name"], b["status"]) for b in review["branches"]] == [
        ("review[security]", "succeeded"), ("review[tests]", "succeeded"),
        ("review[style]", "succeeded")]
    assert all("app.py:2" in b["result"] for b in review["branches"])
    # Each reviewer asked the model once, with its own node's instructions.
    prompts = [request["messages"][0]["content"] for request in model.requests]
    for specialty in ("security reviewer", "test reviewer", "maintainability reviewer"):
        assert sum(specialty in prompt for prompt in prompts) == 1, prompts
    assert sh.leftovers() == [] and sh.processes() == []


def test_ctrl_c_during_run_stops_every_node_and_leaves_nothing_behind(sh: Shell) -> None:
    write(sh.cwd, "slow.yaml", f"""\
        mesh: {{name: slow-{secrets.token_hex(3)}}}
        nodes: [{{name: sleeper, count: 3}}]
        tasks:
          - name: nap
            node: sleeper
            fan_out: {{replicas: true}}
            steps:
              - tool: terminal_exec
                args: {{command: "sleep 300"}}
        """)
    run = sh.start("run", "slow.yaml")
    try:
        progress = wait_for_line(run.stderr, r"\[nap\[sleeper-\d\]\] running terminal_exec")
        running = wait_until(lambda: [p for p in sh.processes() if "sleep 300" in p])
    finally:
        # As a terminal delivers Ctrl+C: to the whole foreground process group.
        os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=60)

    assert running
    assert run.returncode == 130, "".join(progress) + err
    assert err.splitlines()[-1] == "mesh: interrupted"
    assert out == ""
    assert sh.processes() == []
    assert sh.leftovers() == []


def test_run_of_another_topology_under_a_mesh_name_that_is_up_says_to_take_it_down(
        sh: Shell) -> None:
    name = f"same-{secrets.token_hex(3)}"
    write(sh.cwd, "first.yaml", f"mesh: {{name: {name}}}\nnodes: [{{name: alpha}}]\n")
    write(sh.cwd, "other.yaml", f"""\
        mesh: {{name: {name}}}
        nodes: [{{name: beta}}]
        tasks:
          - {{name: t, node: beta, steps: [{{tool: terminal_exec, args: {{command: "true"}}}}]}}
        """)
    assert sh("up", "first.yaml").returncode == 0

    done = sh("run", "other.yaml")

    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"mesh: mesh {name} is up from a different topology")
    assert "(nodes: alpha; this one needs beta)" in line and f"mesh down --mesh {name}" in line
    assert sh("down", "first.yaml").returncode == 0


def test_ctrl_c_as_a_run_starts_prints_only_that_it_was_interrupted(sh: Shell) -> None:
    write(sh.cwd, "quick.yaml", f"""\
        mesh: {{name: quick-{secrets.token_hex(3)}}}
        nodes: [{{name: sleeper, count: 2}}]
        tasks:
          - name: nap
            node: sleeper
            steps: [{{tool: terminal_exec, args: {{command: "true"}}}}]
        """)
    run = sh.start("run", "quick.yaml")
    try:
        wait_for_line(run.stderr, "sleeper")
    finally:
        os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=60)

    assert run.returncode == 130, err
    assert "never retrieved" not in err and "Traceback" not in err
    assert err.splitlines()[-1] == "mesh: interrupted"
    assert sh.processes() == [] and sh.leftovers() == []


# -- the quickstart ---------------------------------------------------------------------------


def test_the_quickstart_topology_points_at_what_the_fetch_example_unpacks() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import fetch_project
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from mesh.topology import expand_task, load_topology

    topology = load_topology(ROOT / "topologies" / "real-project-checks.yaml")
    name, version = fetch_project.DEFAULT_PROJECT.split("==")
    folder = topology.resolve_path(topology.mesh.workspace.path)  # type: ignore[union-attr]
    branches = expand_task(topology, topology.task("checks"))
    quickstart = (ROOT / "scripts" / "quickstart").read_text()

    assert folder == ROOT / "work" / f"{name}-{version}"
    assert [b.name for b in branches] == [
        "checks[tests]", "checks[lint]", "checks[types]", "checks[broken]"]
    assert len({b.node for b in branches}) == 4
    assert "examples/fetch_project.py" in quickstart
    assert "mesh run topologies/real-project-checks.yaml" in quickstart
