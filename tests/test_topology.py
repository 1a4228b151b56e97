"""Topology files: strict schema, located errors, overrides, ordering and fan-out."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.topology import (
    Problem,
    Topology,
    TopologyError,
    apply_overrides,
    downstream,
    expand_nodes,
    expand_task,
    load_topology,
    plan,
    ready_tasks,
    validate_file,
    validation_report,
)

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"

BASE = """\
mesh:
  name: demo
nodes:
  - name: api
  - name: web
tasks:
  - name: build
    node: api
    description: build it
"""


def write(tmp_path: Path, text: str, name: str = "mesh.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def only(problems: list[Problem], key: str) -> Problem:
    found = [problem for problem in problems if problem.key == key]
    assert len(found) == 1, problems
    return found[0]


# -- the three cases from the issue -----------------------------------------------------------


def test_misspelt_instructions_is_rejected_with_file_line_and_a_suggestion(
        tmp_path: Path) -> None:
    path = write(tmp_path, """\
        mesh:
          name: demo
        nodes:
          - name: api
          - name: web
            instrutions: build the UI
        tasks: []
        """)

    with pytest.raises(TopologyError) as caught:
        load_topology(path)

    problem = only(caught.value.problems, "nodes[1].instrutions")
    assert problem.line == 6
    assert "did you mean 'instructions'" in problem.message
    assert f"{path}:6: nodes[1].instrutions: unknown key 'instrutions'" in str(caught.value)


def test_a_cycle_in_needs_is_rejected_showing_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        mesh: {name: demo}
        nodes: [{name: api}]
        tasks:
          - {name: a, node: api, description: x, needs: [b]}
          - {name: b, node: api, description: x, needs: [c]}
          - {name: c, node: api, description: x, needs: [a]}
        """)

    problems = validate_file(path)

    assert [p.message for p in problems] == ["cycle in needs: a -> b -> c -> a"]
    assert problems[0].to_dict() == {
        "file": str(path), "line": 4, "column": 50, "key": "tasks[0].needs[0]",
        "message": "cycle in needs: a -> b -> c -> a"}


def test_a_model_name_where_a_node_belongs_names_the_key_and_the_missing_node(
        tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("node: api", "node: gpt-4o"))

    problem = only(validate_file(path), "tasks[0].node")

    assert problem.line == 8
    assert "task 'build' names node 'gpt-4o', which is not a node" in problem.message
    assert "(nodes: api, web)" in problem.message
    assert "it looks like a model name: set it as `model:`" in problem.message


# -- schema -----------------------------------------------------------------------------------


def test_an_unknown_top_level_key_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "output:\n  results: [build]\n")

    problem = only(validate_file(path), "output")

    assert problem.line == 10
    assert problem.message == "unknown key 'output' (did you mean 'outputs'?)"


def test_aliases_nested_to_billions_of_values_are_refused_not_expanded(tmp_path: Path) -> None:
    lines = ['lol: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    path = write(tmp_path, "\n".join(lines) + "\n")

    problems = validate_file(path)

    assert len(problems) == 1
    assert "expands to more than" in problems[0].message


def test_a_wrong_type_names_the_key_and_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("  - name: web\n", "  - name: web\n    count: three\n"))

    problem = only(validate_file(path), "nodes[1].count")

    assert problem.line == 6
    assert "valid integer" in problem.message and "'three'" in problem.message


def test_duplicate_node_names_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("  - name: web\n", "  - name: api\n"))

    problem = only(validate_file(path), "nodes[1].name")

    assert problem.line == 5
    assert problem.message == "duplicate node name 'api' (first declared at nodes[0])"


def test_a_task_with_both_node_and_role_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("    node: api\n", "    node: api\n    role: dev\n"))

    problems = validate_file(path)

    assert "task 'build' needs exactly one of `node` or `role` (found both)" in [
        p.message for p in problems]


def test_a_task_without_description_or_steps_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("    description: build it\n", ""))

    problem = only(validate_file(path), "tasks[0]")

    assert problem.line == 7
    assert problem.message == "task 'build' needs a `description` or `steps`"


def test_needs_on_a_missing_task_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "    needs: [buidl, setup]\n")

    problems = validate_file(path)

    assert [p.key for p in problems] == ["tasks[0].needs[0]", "tasks[0].needs[1]"]
    assert "task 'build' needs 'buidl', which is not a task" in problems[0].message
    assert "did you mean 'build'?" in problems[0].message


def test_a_yaml_syntax_error_reports_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        mesh:
          name: demo
        nodes:
          - name: api
            env: {A: 1
        tasks: []
        """)

    problems = validate_file(path)

    assert len(problems) == 1
    assert problems[0].line == 6
    assert str(problems[0]).startswith(f"{path}:6: invalid YAML:")


def test_a_duplicate_yaml_key_is_reported_instead_of_silently_overwritten(
        tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("  name: demo\n", "  name: demo\n  name: other\n"))

    problem = only(validate_file(path), "mesh.name")

    assert problem.message == "duplicate key 'name' (first written at line 2)"


def test_several_problems_are_all_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        mesh:
          name: demo
          backend: kubernetes
        nodes:
          - name: api
            instrutions: x
          - name: api
        tasks:
          - name: build
            node: wbe
            description: x
            needs: [nothing]
        """)

    problems = validate_file(path)

    assert [(p.line, p.key) for p in problems] == [
        (3, "mesh.backend"),
        (6, "nodes[0].instrutions"),
        (7, "nodes[1].name"),
        (10, "tasks[0].node"),
        (12, "tasks[0].needs[0]"),
    ]
    assert "did you mean 'web'" not in problems[3].message
    assert len(str(TopologyError(problems)).splitlines()) == 5


def test_workspace_needs_exactly_one_source(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace(
        "  - name: web\n", "  - name: web\n    workspace: {path: ., git: 'https://x/y.git'}\n"))

    problem = only(validate_file(path), "nodes[1].workspace")

    assert "exactly one of path, git or archive (found: path, git)" in problem.message


def test_a_role_written_as_a_node_points_to_role(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("  - name: web\n", "  - name: web\n    role: ui\n")
                 .replace("node: api", "node: ui"))

    problem = only(validate_file(path), "tasks[0].node")

    assert problem.message.endswith("'ui' is a role: set it as `role:`")


def test_a_task_on_a_template_node_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("  - name: api\n", "  - name: api\n    template: true\n"))

    problem = only(validate_file(path), "tasks[0].node")

    assert "a template that is not started with the mesh" in problem.message


def test_topology_built_in_code_checks_references_too() -> None:
    with pytest.raises(ValueError, match="names node 'x', which is not a node"):
        Topology.model_validate({
            "mesh": {"name": "m"}, "nodes": [{"name": "n"}],
            "tasks": [{"name": "t", "node": "x", "description": "d"}],
        })


def test_validation_report_counts_nodes_and_tasks(tmp_path: Path) -> None:
    assert validation_report(write(tmp_path, BASE)) == (0, ["ok: 2 nodes, 1 task"])

    code, lines = validation_report(write(tmp_path, BASE + "bogus: 1\n"))

    assert code == 1 and len(lines) == 1 and ":10: bogus: unknown key 'bogus'" in lines[0]


# -- overrides --------------------------------------------------------------------------------


def test_overrides_set_values_by_path_with_list_items_addressed_by_name(
        tmp_path: Path) -> None:
    path = write(tmp_path, BASE)

    topology = load_topology(path, ["mesh.backend=docker", "nodes.web.count=3",
                                    "tasks.build.timeout_s=60", "mesh.workspace.path=../src"])

    assert topology.mesh.backend == "docker"
    assert topology.node("web").count == 3
    assert topology.task("build").timeout_s == 60
    assert topology.mesh.workspace is not None
    assert topology.resolve_path(topology.mesh.workspace.path or "") == (
        tmp_path.parent / "src").resolve()


def test_apply_overrides_leaves_the_input_unchanged() -> None:
    raw = {"mesh": {"name": "m"}, "nodes": [{"name": "w"}]}

    result = apply_overrides(raw, {"nodes.w.count": "2", "nodes.w.env.PORT": "8080"})

    assert result["nodes"][0] == {"name": "w", "count": 2, "env": {"PORT": 8080}}
    assert raw["nodes"][0] == {"name": "w"}


def test_an_unknown_override_path_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)

    problems = validate_file(path, ["mesh.backnd=docker", "nodes.worker.count=2", "oops"])

    assert [p.file for p in problems] == [
        "--set", "--set mesh.backnd=docker", "--set nodes.worker.count=2"]
    assert problems[1].message == "unknown key 'backnd' under mesh (did you mean 'backend'?)"
    assert problems[2].message == "no item named 'worker' in nodes (names: api, web)"
    assert problems[0].message == "expected KEY=VALUE, got 'oops'"


def test_a_wrong_override_value_is_blamed_on_the_override(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)

    with pytest.raises(ConfigError) as caught:
        load_topology(path, ["nodes.api.count=three"])

    assert str(caught.value).startswith("--set nodes.api.count=three: nodes[0].count:")


# -- running ----------------------------------------------------------------------------------


PIPELINE = {
    "mesh": {"name": "ci"},
    "nodes": [{"name": "runner", "count": 2}, {"name": "solo", "role": "checker"}],
    "tasks": [
        {"name": "report", "node": "solo", "description": "sum up", "needs": ["test", "lint"]},
        {"name": "lint", "node": "solo", "description": "lint", "needs": ["install"]},
        {"name": "install", "node": "runner", "description": "install"},
        {"name": "test", "node": "runner", "needs": ["install"],
         "fan_out": {"over": ["unit", "e2e", "smoke"]},
         "steps": [{"tool": "terminal_exec",
                    "args": {"command": "make {item}", "env": {"SUITE": "{item}"}}}]},
    ],
}


def test_plan_orders_tasks_so_that_needs_come_first() -> None:
    topology = Topology.model_validate(PIPELINE)

    waves = [[task.name for task in wave] for wave in plan(topology)]

    assert waves == [["install"], ["lint", "test"], ["report"]]


def test_ready_tasks_and_downstream_follow_needs() -> None:
    topology = Topology.model_validate(PIPELINE)

    assert [t.name for t in ready_tasks(topology, finished=["install"], running=["lint"])] == [
        "test"]
    assert downstream(topology, "install") == {"lint", "test", "report"}


def test_nodes_expand_into_named_replicas() -> None:
    topology = Topology.model_validate(PIPELINE)

    assert [(n.name, n.replica) for n in expand_nodes(topology)] == [
        ("runner-1", 1), ("runner-2", 2), ("solo", None)]


def test_fan_out_over_a_list_substitutes_each_item_in_steps() -> None:
    topology = Topology.model_validate(PIPELINE)

    branches = expand_task(topology, topology.task("test"))

    assert [(b.name, b.node, b.item) for b in branches] == [
        ("test[0]", "runner-1", "unit"), ("test[1]", "runner-2", "e2e"),
        ("test[2]", "runner-1", "smoke")]
    assert branches[1].steps is not None
    assert branches[1].steps[0].args == {"command": "make e2e", "env": {"SUITE": "e2e"}}
    assert topology.task("test").steps[0].args["command"] == "make {item}"  # type: ignore[index]


def test_fan_out_over_a_mapping_names_each_branch_by_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        mesh: {name: checks}
        nodes: [{name: runner, count: 2}]
        tasks:
          - name: check
            node: runner
            fan_out:
              over: {tests: pytest -q, lint: ruff check .}
            steps: [{tool: terminal_exec, args: {command: "{item}"}}]
        """)
    topology = load_topology(path, ["tasks.check.fan_out.over.lint=ruff check src"])

    branches = expand_task(topology, topology.task("check"))

    assert [(b.name, b.node, b.item) for b in branches] == [
        ("check[tests]", "runner-1", "pytest -q"), ("check[lint]", "runner-2", "ruff check src")]


def test_a_fan_out_that_is_neither_list_nor_mapping_says_what_it_expects(
        tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "    fan_out: {over: pytest}\n")

    problem = only(validate_file(path), "tasks[0].fan_out.over")

    assert problem.line == 10
    assert problem.message == ("expected a list of items or a mapping of branch names to "
                               "items, got 'pytest'")


def test_fan_out_over_replicas_makes_one_branch_per_replica_of_the_role(
        tmp_path: Path) -> None:
    path = write(tmp_path, """\
        mesh: {name: review}
        nodes:
          - {name: sec, role: reviewer, mode: ask}
          - {name: style, role: reviewer, count: 2}
        tasks:
          - name: review
            role: reviewer
            fan_out: {replicas: true}
            description: review as {item}
        """)
    topology = load_topology(path)

    branches = expand_task(topology, topology.task("review"))

    assert [(b.node, b.mode.value, b.description) for b in branches] == [
        ("sec", "ask", "review as sec"), ("style-1", "code", "review as style-1"),
        ("style-2", "code", "review as style-2")]


@pytest.mark.parametrize("path", sorted(TOPOLOGIES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_topology_validates(path: Path) -> None:
    assert validate_file(path) == []

    topology = load_topology(path)
    for task in topology.tasks:
        assert expand_task(topology, task)


def test_the_shipped_topologies_are_all_there() -> None:
    assert {p.name for p in TOPOLOGIES.glob("*.yaml")} >= {
        "review-fanout.yaml", "fullstack-team.yaml", "orchestrator.yaml", "ci-pipeline.yaml"}
