"""The scripts in examples/ run as a user would run them, each in a process of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from spawn_support import REPO, docker_leftovers, require_docker

from mesh.spawn import registry

EXAMPLES = REPO / "examples"


def run_example(home: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one example to its end; it must exit 0 and leave no node of any mesh behind."""
    # No model of the caller's, and a registry of this test's own.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MESH_")}
    env.update(PEERMESH_HOME=str(home), LITELLM_LOCAL_MODEL_COST_MAP="True")
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, env=env, cwd=home.parent, timeout=110)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    assert registry.read_records() == [], f"{name} left nodes behind"
    return done


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "peermesh-home"
    monkeypatch.setenv("PEERMESH_HOME", str(home))
    return home


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_says_how_to_run_it(name: str) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--help"],
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    source = (EXAMPLES / name).read_text()
    docstring = source.split('"""')[1]
    assert f"examples/{name}" in docstring


def test_spawn_and_assign_runs_a_plan_on_a_new_node(home: Path) -> None:
    out = run_example(home, "spawn_and_assign.py").stdout

    assert re.search(r"^spawned worker in mesh \S+ \(local\) at http://127\.0\.0\.1:\d+$", out,
                     re.MULTILINE)
    assert ": write_file\n" in out and ": terminal_exec\n" in out
    assert "task completed\n" in out
    assert "output: hello from" in out


def test_fan_out_example_reports_the_failing_branch_on_its_own(home: Path) -> None:
    out = run_example(home, "fan_out_with_failure.py").stdout

    report = out.split("report:\n")[1].splitlines()
    assert [line.split()[0] for line in report] == ["tests", "lint", "docs"]
    assert report[0].endswith("succeeded: 1 passed")
    assert "FAILED (task failed)" in report[1] and "E501 line too long" in report[1]
    assert report[2].endswith("succeeded: 4 pages built")
    # Live progress came per branch before the report.
    for name in ("tests", "lint", "docs"):
        assert f"[{name}] running terminal_exec" in out.split("report:")[0]


def test_read_peer_files_example_lists_reads_and_downloads(home: Path, tmp_path: Path) -> None:
    out = run_example(home, "read_peer_files.py", "--into", str(tmp_path / "got")).stdout

    assert "  out/report.txt (file, " in out
    assert "  rows: 100000\n  status: ok\n" in out
    assert "100000 rows" in out
    lines = (tmp_path / "got" / "data.txt").read_text().splitlines()
    assert (len(lines), lines[-1]) == (100000, "row 99999")


def test_agent_spawns_an_agent_through_its_tools_in_orchestrator_mode(home: Path) -> None:
    out = run_example(home, "agent_spawns_agent.py").stdout

    assert re.search(r"^lead at \S+ in mesh \S+, in orchestrator mode, model openai/scripted$",
                     out, re.MULTILINE)
    calls = re.findall(r"lead calls (\w+)", out)
    assert calls == ["spawn_peer", "assign_task", "read_peer_file"]
    assert "failed:" not in out
    assert out.split("answer:\n")[1].splitlines()[-1] == "  neither works alone."


def test_agent_spawns_an_agent_with_a_plan_of_steps(home: Path) -> None:
    out = run_example(home, "agent_spawns_agent.py", "--steps").stdout

    assert "in a plan of steps" in out
    assert re.findall(r"lead calls (\w+)", out) == ["spawn_peer", "assign_task",
                                                    "read_peer_file"]
    assert out.split("answer:\n")[1].splitlines()[0] == "  Two machines, one task:"


@pytest.mark.docker
def test_spawn_and_assign_runs_on_the_docker_backend(home: Path) -> None:
    require_docker()

    out = run_example(home, "spawn_and_assign.py", "--backend", "docker").stdout

    found = re.search(r"^spawned worker in mesh (\S+) \(docker\)", out, re.MULTILINE)
    assert found is not None and "task completed\n" in out
    assert docker_leftovers(found.group(1)) == []


@pytest.mark.docker
def test_agent_in_a_container_spawns_a_sibling_container_with_its_tools(home: Path) -> None:
    require_docker()

    out = run_example(home, "agent_spawns_agent.py", "--backend", "docker").stdout

    found = re.search(r"^lead at \S+ in mesh (\S+), in a plan of steps$", out, re.MULTILINE)
    assert found is not None
    assert re.findall(r"lead calls (\w+)", out) == ["spawn_peer", "assign_task",
                                                    "read_peer_file"]
    assert "failed:" not in out
    assert out.split("answer:\n")[1].splitlines()[-1] == "  neither works alone."
    assert docker_leftovers(found.group(1)) == []
