"""Topology files: a mesh declared in YAML, checked strictly, and helpers to run it.

A topology names the mesh settings, its nodes, the tasks they run and the outputs that come
back. Loading never stops at the first mistake: every problem is collected with the file,
line and key path it comes from, and raised together as one TopologyError (a ConfigError).

    load_topology(path, overrides)  -> Topology, or TopologyError listing every problem
    validate_file(path, overrides)  -> list[Problem]            (`mesh validate FILE`)
    plan / ready_tasks / downstream -> task order by `needs`
    expand_nodes / expand_task      -> concrete replicas and fan-out branches
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import graphlib
import re
import types
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .models import McpServerDecl, Mode, Step
from .rules import check_rules

__all__ = [
    "Branch",
    "FanOut",
    "MeshSettings",
    "NodeDecl",
    "NodeInstance",
    "OutputFile",
    "Outputs",
    "Problem",
    "Resources",
    "TaskDecl",
    "Topology",
    "TopologyError",
    "WorkspaceDecl",
    "apply_overrides",
    "downstream",
    "expand_nodes",
    "expand_task",
    "format_loc",
    "load_topology",
    "plan",
    "ready_tasks",
    "validate_file",
    "validation_report",
]

Loc = tuple[str | int, ...]

# Where a value came from: a place in the file, or the `--set` option that wrote it.
_OVERRIDE_FILE = "--set"


# -- problems ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """One mistake in a topology, located by file, line and key path."""

    file: str
    line: int | None
    column: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TopologyError(ConfigError):
    """A topology with one or more problems; str() lists them one per line."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def format_loc(loc: Loc) -> str:
    """Render a key path the way a user reads it: `nodes[1].instructions`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


# -- schema -----------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _node_name(value: str) -> str:
    # Node names become container and host names, and `--set nodes.NAME.key` addresses them.
    if not _NAME_RE.match(value):
        raise PydanticCustomError(
            "name", "'{value}' is not a valid name: use lower-case letters, digits and '-', "
            "starting with a letter or digit", {"value": value})
    return value


def _task_name(value: str) -> str:
    if not _TASK_NAME_RE.match(value):
        raise PydanticCustomError(
            "name", "'{value}' is not a valid task name: use letters, digits, '_' and '-', "
            "starting with a letter or digit", {"value": value})
    return value


def _number_to_str(value: Any) -> Any:
    # `PORT: 8080` or `over: [1, 2]` are numbers in YAML where strings are meant. Booleans
    # stay errors because `yes` and `on` would silently become "True".
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


NodeName = Annotated[str, Field(min_length=1, max_length=40), AfterValidator(_node_name)]
TaskName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_task_name)]
Scalar = Annotated[str, BeforeValidator(_number_to_str)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkspaceDecl(_Strict):
    """Where a node's workspace comes from: a host folder, a git repository or an archive."""

    path: str | None = Field(
        default=None, description="Host folder, relative to the topology file.")
    mount: bool = Field(
        default=False, description="Mount the folder instead of copying it (changes are live).")
    git: str | None = Field(default=None, description="Repository URL to clone.")
    ref: str | None = Field(default=None, description="Branch, tag or commit to check out.")
    archive: str | None = Field(default=None, description="Archive path or URL to unpack.")

    @model_validator(mode="after")
    def _one_source(self) -> WorkspaceDecl:
        given = [key for key in ("path", "git", "archive") if getattr(self, key) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise PydanticCustomError(
                "workspace", "a workspace needs exactly one of path, git or archive "
                "(found: {found})", {"found": found})
        if self.mount and self.path is None:
            raise PydanticCustomError("workspace", "mount applies only to a workspace `path`")
        if self.ref is not None and self.git is None:
            raise PydanticCustomError("workspace", "ref applies only to a `git` workspace")
        return self


class Resources(_Strict):
    cpus: float | None = Field(default=None, gt=0)
    memory: str | None = Field(default=None, pattern=r"^[0-9]+[kmgKMG]?$")
    pids: int | None = Field(default=None, gt=0)


class MeshSettings(_Strict):
    name: NodeName
    backend: Literal["local", "docker"] = "local"
    image: str = "peermesh-node:latest"
    network: str | None = None
    model: str | None = Field(default=None, description="Default model of every node.")
    api_base: str | None = None
    workspace: WorkspaceDecl | None = Field(
        default=None, description="Workspace of every node that declares none.")
    # Checked by mesh.rules, as the node checks them (see _rule_problems).
    rules: list[Any] = Field(
        default_factory=list, description="Rules every node gets, before its own.")
    mcp_servers: list[McpServerDecl] = Field(default_factory=list)


class NodeDecl(_Strict):
    name: NodeName
    role: str | None = None
    mode: Mode = Mode.CODE
    model: str | None = None
    api_base: str | None = None
    count: int = Field(default=1, ge=1, le=100, description="Replicas, named NAME-1..NAME-N.")
    template: bool = Field(
        default=False,
        description="Not started with the mesh: a blueprint for nodes that may_spawn it.")
    resources: Resources = Field(default_factory=Resources)
    env: dict[str, Scalar] = Field(default_factory=dict)
    workspace: WorkspaceDecl | None = None
    instructions: str | None = Field(
        default=None, description="Added to the system prompt of this node's agent.")
    may_spawn: list[str] = Field(
        default_factory=list, description="Node names or roles this node may spawn.")
    # Checked by mesh.rules, as the node checks them (see _rule_problems).
    rules: list[Any] = Field(default_factory=list, description="This node's own rules.")
    mcp_servers: list[McpServerDecl] = Field(default_factory=list)


def _over_kind(value: Any) -> str:
    return "<mapping>" if isinstance(value, dict) else "<list>"


# Tagged, so that a wrong item yields one error about the form written, not one per form.
# The tags are dropped from error locations (see _schema_problems).
_Over = Annotated[
    Union[Annotated[list[Scalar], Tag("<list>")],
          Annotated[dict[TaskName, Scalar], Tag("<mapping>")]],
    Discriminator(_over_kind),
]


class FanOut(_Strict):
    """Run a task as parallel branches: one per item of `over`, or one per replica.

    `over` is a list (branches TASK[0], TASK[1], ...) or a mapping from branch name to item
    (branches TASK[NAME]), which makes a report say which branch was which.
    """

    over: _Over | None = Field(
        default=None, min_length=1,
        description="Items substituted for {item} in the description and step arguments.")
    replicas: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> FanOut:
        if (self.over is not None) == self.replicas:
            raise PydanticCustomError(
                "fan_out", "fan_out needs exactly one of `over: [...]` or `replicas: true`")
        return self

    def items(self) -> list[tuple[str, str]]:
        """(branch key, item) pairs of `over`, in the order written."""
        if isinstance(self.over, dict):
            return list(self.over.items())
        return [(str(index), item) for index, item in enumerate(self.over or [])]


class TaskDecl(_Strict):
    name: TaskName
    description: str | None = None
    steps: list[Step] | None = Field(default=None, min_length=1)
    node: str | None = None
    role: str | None = None
    needs: list[str] = Field(default_factory=list)
    fan_out: FanOut | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    rollback: bool | None = Field(
        default=None, description="Restore the workspace when the task fails (node default).")
    mode: Mode | None = Field(default=None, description="Overrides the node's mode.")

    @model_validator(mode="after")
    def _complete(self) -> TaskDecl:
        if (self.node is None) == (self.role is None):
            raise PydanticCustomError(
                "task", "task '{name}' needs exactly one of `node` or `role` (found {found})",
                {"name": self.name, "found": "both" if self.node else "neither"})
        if not (self.description or "").strip() and not self.steps:
            raise PydanticCustomError(
                "task", "task '{name}' needs a `description` or `steps`", {"name": self.name})
        return self


class OutputFile(_Strict):
    node: str
    path: str = Field(min_length=1)
    to: str | None = Field(default=None, description="Local destination (default: same path).")


class Outputs(_Strict):
    files: list[OutputFile] = Field(default_factory=list)
    results: list[str] = Field(default_factory=list, description="Tasks whose results return.")


class Topology(_Strict):
    mesh: MeshSettings
    nodes: list[NodeDecl] = Field(min_length=1)
    tasks: list[TaskDecl] = Field(default_factory=list)
    outputs: Outputs = Field(default_factory=Outputs)

    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _references(self, info: ValidationInfo) -> Topology:
        # load_topology runs these checks itself, on the raw data, to locate each problem.
        if (info.context or {}).get("skip_references"):
            return self
        found = _reference_problems(self.model_dump())
        if found:
            detail = "; ".join(f"{format_loc(loc)}: {message}" for loc, message in found)
            raise PydanticCustomError("references", "{detail}", {"detail": detail})
        return self

    @property
    def source(self) -> Path | None:
        """The file this topology was loaded from."""
        return self._source

    def node(self, name: str) -> NodeDecl:
        for decl in self.nodes:
            if decl.name == name:
                return decl
        raise KeyError(name)

    def task(self, name: str) -> TaskDecl:
        for decl in self.tasks:
            if decl.name == name:
                return decl
        raise KeyError(name)

    def resolve_path(self, raw: str) -> Path:
        """A host path as written in the file: relative paths start at the file's folder."""
        path = Path(raw).expanduser()
        if path.is_absolute():
            return path
        base = self._source.parent if self._source is not None else Path.cwd()
        return (base / path).resolve()


# -- YAML with positions ----------------------------------------------------------------------


@dataclasses.dataclass
class _Document:
    data: Any
    positions: dict[Loc, tuple[int, int]]
    origins: dict[Loc, str]
    problems: list[Problem]


def _position(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


MAX_VALUES = 100_000


class _TooBig(Exception):
    """The document builds into more values than any real topology holds."""

    def __init__(self, mark: yaml.Mark, loc: Loc) -> None:
        super().__init__()
        self.mark = mark
        self.loc = loc


class _Builder:
    """Turns a composed YAML tree into plain data, remembering where each key was written."""

    def __init__(self, loader: yaml.SafeLoader, file: str) -> None:
        self.loader = loader
        self.file = file
        self.positions: dict[Loc, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self._active: set[int] = set()
        # Aliases of aliases grow a small file into billions of values ("billion laughs"):
        # each use of an alias is built again, so the budget counts values as built.
        self._budget = MAX_VALUES

    def problem(self, mark: yaml.Mark, loc: Loc, message: str) -> None:
        line, column = _position(mark)
        self.problems.append(Problem(self.file, line, column, format_loc(loc), message))

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self._budget -= 1
        if self._budget < 0:
            raise _TooBig(node.start_mark, loc)
        self.positions.setdefault(loc, _position(node.start_mark))
        if id(node) in self._active:
            self.problem(node.start_mark, loc, "an alias refers to itself")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc)
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
            return self.loader.construct_object(node, deep=True)
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        self.loader.flatten_mapping(node)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node.start_mark, loc, "a key must be a plain name")
                continue

            # The key's text as written: YAML 1.1 would turn `on:` or `yes:` into booleans.
            key = str(key_node.value)
            if key in out:
                first = self.positions[(*loc, key)][0]
                self.problem(key_node.start_mark, (*loc, key),
                             f"duplicate key {key!r} (first written at line {first})")
                continue
            self.positions[(*loc, key)] = _position(key_node.start_mark)
            out[key] = self.build(value_node, (*loc, key))
        return out


def _parse_yaml(text: str, file: str) -> _Document:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            problem = Problem(file, 1, 1, "", "the file is empty: expected a mapping with "
                              "`mesh`, `nodes` and `tasks`")
            return _Document(None, {}, {}, [problem])
        builder = _Builder(loader, file)
        data = builder.build(root, ())
        return _Document(data, builder.positions, {}, builder.problems)
    except _TooBig as exc:
        line, column = _position(exc.mark)
        problem = Problem(file, line, column, format_loc(exc.loc),
                          f"the file expands to more than {MAX_VALUES:,} values; "
                          "are aliases (*name) nested in each other?")
        return _Document(None, {}, {}, [problem])
    except yaml.MarkedYAMLError as exc:
        return _Document(None, {}, {}, [_yaml_problem(exc, file)])
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.MarkedYAMLError, file: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line, column = _position(mark) if mark is not None else (None, None)
    message = f"invalid YAML: {exc.problem or exc.context}"
    if exc.problem and exc.context:
        context = exc.context
        if exc.context_mark is not None and exc.context_mark is not mark:
            context += f" at line {exc.context_mark.line + 1}"
        message += f" ({context})"
    return Problem(file, line, column, "", message)


# -- schema navigation ------------------------------------------------------------------------


def _shape(annotation: Any) -> tuple[str, Any]:
    """Classify a field type as model, list, dict, any or scalar, with its inner type."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _shape(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _shape(members[0]) if len(members) == 1 else ("any", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    if origin is list:
        return "list", get_args(annotation)[0]
    if origin is dict:
        return "dict", get_args(annotation)[1]
    if annotation is Any:
        return "any", None
    return "scalar", None


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The schema model that describes the mapping at `loc`, if any."""
    kind, inner = "model", Topology
    for part in loc:
        if kind == "model" and isinstance(part, str) and part in inner.model_fields:
            kind, inner = _shape(inner.model_fields[part].annotation)
        elif kind == "list" and isinstance(part, int):
            kind, inner = _shape(inner)
        elif kind == "dict":
            kind, inner = _shape(inner)
        else:
            return None
    return inner if kind == "model" else None


def _did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


# -- overrides --------------------------------------------------------------------------------


class _OverrideError(Exception):
    pass


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise _OverrideError(f"expected KEY=VALUE, got {item!r}")
    return key.strip(), value


def _find_item(items: list[Any], name: str) -> int | None:
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == name:
            return index
    if name.isdigit() and int(name) < len(items):
        return int(name)
    return None


def _step(kind: str, inner: Any, container: Any, part: str, loc: Loc,
          ) -> tuple[str | int, tuple[str, Any]]:
    """Resolve one part of an override path: the key or index, and the shape below it."""
    if kind == "model" and isinstance(container, dict):
        if part not in inner.model_fields:
            guess = _did_you_mean(part, inner.model_fields)
            hint = f" (did you mean {guess!r}?)" if guess else ""
            raise _OverrideError(f"unknown key {part!r} under {format_loc(loc) or 'the top'}"
                                 f"{hint}")
        return part, _shape(inner.model_fields[part].annotation)
    if kind in ("dict", "any") and isinstance(container, dict):
        return part, _shape(inner) if kind == "dict" else ("any", None)
    if kind in ("list", "any") and isinstance(container, list):
        found = _find_item(container, part)
        if found is None:
            names = [str(item.get("name")) for item in container if isinstance(item, dict)]
            raise _OverrideError(f"no item named {part!r} in {format_loc(loc)} "
                                 f"(names: {', '.join(names) or 'none'})")
        return found, _shape(inner) if kind == "list" else ("any", None)
    raise _OverrideError(f"{format_loc(loc)} is {_describe(container)} in the file; "
                         f"it has no key {part!r}")


def _set_path(data: dict[str, Any], key: str, value: Any) -> Loc:
    """Set one `a.b.c` path in the raw data, following the schema; return its location."""
    parts = key.split(".")
    if not all(parts):
        raise _OverrideError(f"{key!r} has an empty part")
    shape: tuple[str, Any] = ("model", Topology)
    container: Any = data
    loc: Loc = ()
    for part in parts[:-1]:
        step, below = _step(*shape, container, part, loc)
        loc = (*loc, step)

        # Missing mappings on the way are created; list items must already exist by name.
        if isinstance(container, dict) and container.get(step) is None:
            if below[0] not in ("model", "dict", "any"):
                raise _OverrideError(f"{format_loc(loc)} is not set in the file")
            container[step] = {}
        container = container[step]
        shape = below
    step, _ = _step(*shape, container, parts[-1], loc)
    container[step] = value
    return (*loc, step)


def _apply(data: dict[str, Any], overrides: Mapping[str, str] | Iterable[str] | None,
           ) -> tuple[dict[str, Any], dict[Loc, str], list[Problem]]:
    if not overrides:
        return data, {}, []
    problems: list[Problem] = []
    pairs: list[tuple[str, str]] = []
    if isinstance(overrides, Mapping):
        pairs = [(str(key), str(value)) for key, value in overrides.items()]
    else:
        for item in overrides:
            try:
                pairs.append(_split_override(item))
            except _OverrideError as exc:
                problems.append(Problem(_OVERRIDE_FILE, None, None, "", str(exc)))

    data = copy.deepcopy(data)
    origins: dict[Loc, str] = {}
    for key, raw in pairs:
        label = f"{_OVERRIDE_FILE} {key}={raw}"
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
            origins[_set_path(data, key, value)] = label
        except yaml.YAMLError as exc:
            problems.append(Problem(label, None, None, key, f"value is not valid YAML: {exc}"))
        except _OverrideError as exc:
            problems.append(Problem(label, None, None, key, str(exc)))
    return data, origins, problems


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, str] | Iterable[str],
                    ) -> dict[str, Any]:
    """Return a copy of raw topology data with `a.b=value` overrides (YAML values) applied.

    List items are addressed by their `name`: `nodes.worker.count=3`.
    """
    result, _, problems = _apply(data, overrides)
    if problems:
        raise TopologyError(problems)
    return result


# -- schema errors ----------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_message(error: Any) -> str:
    kind, loc, message = error["type"], error["loc"], error["msg"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(tuple(loc[:-1]))
        fields = list(model.model_fields) if model is not None else []
        guess = _did_you_mean(key, fields)
        if guess:
            return f"unknown key {key!r} (did you mean {guess!r}?)"
        return f"unknown key {key!r} (allowed: {', '.join(fields)})"
    if kind == "list_type" and "<list>" in loc:
        return (f"expected a list of items or a mapping of branch names to items, got "
                f"{_describe(error['input'])}")
    if kind == "missing":
        return f"missing required key {str(loc[-1])!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {_describe(error['input'])}"
    if kind in ("enum", "literal_error"):
        expected = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        guess = _did_you_mean(str(error["input"]), expected)
        hint = f"; did you mean {guess!r}?" if guess else ""
        return f"{message} (got {_describe(error['input'])}){hint}"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind in ("name", "workspace", "fan_out", "task", "references"):
        return message
    return f"{message} (got {_describe(error['input'])})"


def _schema_problems(exc: ValidationError) -> list[tuple[Loc, str]]:
    found = []
    for error in exc.errors(include_url=False):
        # Union tags (`<list>`) and pydantic's `[key]` marker are not keys of the file.
        loc = tuple(part for part in error["loc"] if isinstance(part, int)
                    or (isinstance(part, str) and not part.startswith(("<", "[key]"))))
        found.append((loc, _schema_message(error)))
    return found


# -- references and cycles --------------------------------------------------------------------

_MODEL_NAME_RE = re.compile(
    r"^(gpt-|gpt4|o[134](-|$)|chatgpt|claude|llama|gemini|gemma|mistral|mixtral|codestral|"
    r"qwen|deepseek|phi-?\d|command-r|grok)", re.IGNORECASE)


def _looks_like_model(name: str) -> bool:
    return "/" in name or ":" in name or bool(_MODEL_NAME_RE.match(name))


def _named(raw: Any, key: str) -> list[tuple[int, dict[str, Any], str]]:
    """The items of a top-level list that are mappings with a string name."""
    items = raw.get(key) if isinstance(raw, dict) else None
    if not isinstance(items, list):
        return []
    return [(i, item, item["name"]) for i, item in enumerate(items)
            if isinstance(item, dict) and isinstance(item.get("name"), str)]


def _strings(value: Any) -> list[tuple[int, str]]:
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, str)]


def _missing(subject: str, kind: str, name: str, choices: list[str],
             other: tuple[str, list[str]] | None = None) -> str:
    """`subject, which is not a KIND of this topology (KINDs: ...)`, with hints."""
    message = (f"{subject}, which is not a {kind} of this topology "
               f"({kind}s: {', '.join(choices) or 'none'})")
    guess = _did_you_mean(name, choices)
    if guess:
        message += f"; did you mean {guess!r}?"
    if other is not None and name in other[1]:
        message += f"; {name!r} is a {other[0]}: set it as `{other[0]}:`"
    elif _looks_like_model(name):
        message += "; it looks like a model name: set it as `model:`"
    return message


def _reference_problems(raw: Any) -> list[tuple[Loc, str]]:
    """Duplicate names, dangling references and `needs` cycles, read from raw data."""
    found: list[tuple[Loc, str]] = []
    nodes, tasks = _named(raw, "nodes"), _named(raw, "tasks")

    # Names: each declared once, and no node named like another node's replica.
    first_node: dict[str, int] = {}
    for index, _, name in nodes:
        if name in first_node:
            found.append((("nodes", index, "name"), f"duplicate node name {name!r} "
                          f"(first declared at nodes[{first_node[name]}])"))
        first_node.setdefault(name, index)
    replicas: dict[str, str] = {}
    for _, item, name in nodes:
        count = item.get("count")
        if isinstance(count, int) and count > 1:
            replicas.update({f"{name}-{n}": name for n in range(1, count + 1)})
    for index, _, name in nodes:
        if name in replicas:
            found.append((("nodes", index, "name"), f"node name {name!r} clashes with a "
                          f"replica of node {replicas[name]!r}"))
    first_task: dict[str, int] = {}
    for index, _, name in tasks:
        if name in first_task:
            found.append((("tasks", index, "name"), f"duplicate task name {name!r} "
                          f"(first declared at tasks[{first_task[name]}])"))
        first_task.setdefault(name, index)

    node_names = list(first_node)
    started = [name for _, item, name in nodes if item.get("template") is not True]
    roles = sorted({item["role"] for _, item, _ in nodes if isinstance(item.get("role"), str)})
    started_roles = {item.get("role") for _, item, _ in nodes if item.get("template") is not True}
    task_names = list(first_task)

    for index, item, name in tasks:
        owner = f"task {name!r}"
        node, role = item.get("node"), item.get("role")
        if isinstance(node, str):
            if node not in first_node:
                found.append((("tasks", index, "node"), _missing(
                    f"{owner} names node {node!r}", "node", node, node_names, ("role", roles))))
            elif node not in started:
                found.append((("tasks", index, "node"), f"{owner} names node {node!r}, a "
                              "template that is not started with the mesh; name a started node"))
        if isinstance(role, str):
            if role not in roles:
                found.append((("tasks", index, "role"), _missing(
                    f"{owner} names role {role!r}", "role", role, roles, ("node", node_names))))
            elif role not in started_roles:
                found.append((("tasks", index, "role"), f"{owner} names role {role!r}, which "
                              "only template nodes have; no started node can run it"))
        for position, need in _strings(item.get("needs")):
            if need not in first_task:
                found.append((("tasks", index, "needs", position), _missing(
                    f"{owner} needs {need!r}", "task", need, task_names)))

    for index, item, name in nodes:
        for position, target in _strings(item.get("may_spawn")):
            if target not in first_node and target not in roles:
                message = (f"node {name!r} may spawn {target!r}, which is neither a node nor a "
                           f"role of this topology (nodes: {', '.join(node_names)}; "
                           f"roles: {', '.join(roles) or 'none'})")
                guess = _did_you_mean(target, [*node_names, *roles])
                found.append((("nodes", index, "may_spawn", position),
                              message + (f"; did you mean {guess!r}?" if guess else "")))

    found.extend(_output_problems(raw, node_names + list(replicas), task_names))
    found.extend(_cycle_problems(tasks, first_task))
    found.extend(_rule_problems(raw))
    return found


def _rule_problems(raw: Any) -> list[tuple[Loc, str]]:
    """Mesh-wide and per-node rules, checked as the node will check them when it starts.

    A node gets the mesh-wide rules, then its own, so an id may appear in only one of them.
    """
    mesh = raw.get("mesh") if isinstance(raw, dict) else None
    mesh_rules = mesh.get("rules") if isinstance(mesh, dict) else None
    found: list[tuple[Loc, str]] = []
    mesh_ids: dict[str, str] = {}
    if isinstance(mesh_rules, list):
        _, problems = check_rules(mesh_rules)
        found += [(("mesh", "rules", *loc), message) for loc, message in problems]
        for index, item in enumerate(mesh_rules):
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                mesh_ids.setdefault(item["id"], f"mesh-wide rule mesh.rules[{index}]")
    nodes = raw.get("nodes") if isinstance(raw, dict) else None
    for index, node in enumerate(nodes if isinstance(nodes, list) else []):
        rules = node.get("rules") if isinstance(node, dict) else None
        if isinstance(rules, list):
            _, problems = check_rules(rules, taken=mesh_ids)
            found += [(("nodes", index, "rules", *loc), message) for loc, message in problems]
    return found


def _output_problems(raw: Any, node_names: list[str], task_names: list[str],
                     ) -> list[tuple[Loc, str]]:
    outputs = raw.get("outputs") if isinstance(raw, dict) else None
    if not isinstance(outputs, dict):
        return []
    found: list[tuple[Loc, str]] = []
    files = outputs.get("files")
    for index, item in enumerate(files if isinstance(files, list) else []):
        node = item.get("node") if isinstance(item, dict) else None
        if isinstance(node, str) and node not in node_names:
            found.append((("outputs", "files", index, "node"),
                          _missing(
                              f"output file names node {node!r}", "node", node, node_names)))
    for index, name in _strings(outputs.get("results")):
        if name not in task_names:
            found.append((("outputs", "results", index),
                          _missing(
                              f"output result names task {name!r}", "task", name, task_names)))
    return found


def _cycle_problems(tasks: list[tuple[int, dict[str, Any], str]], first: dict[str, int],
                    ) -> list[tuple[Loc, str]]:
    graph: dict[str, list[tuple[int, str]]] = {}
    for index, item, name in tasks:
        if first[name] == index:
            graph[name] = [(p, n) for p, n in _strings(item.get("needs")) if n in first]

    found: list[tuple[Loc, str]] = []
    seen: set[tuple[str, ...]] = set()
    for cycle in _cycles(graph):
        # One report per cycle, starting at the task declared first.
        start = min(range(len(cycle)), key=lambda i: first[cycle[i]])
        ordered = tuple(cycle[start:] + cycle[:start])
        if ordered in seen:
            continue
        seen.add(ordered)
        head, after = ordered[0], ordered[1 % len(ordered)]
        position = next(p for p, n in graph[head] if n == after)
        path = " -> ".join((*ordered, head))
        found.append((("tasks", first[head], "needs", position), f"cycle in needs: {path}"))
    return found


def _cycles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Cycles closed by back edges of a depth-first walk (iterative: no recursion limit)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    for root in graph:
        if root in state:
            continue
        stack = [root]
        iterators = [iter(graph[root])]
        state[root] = 1
        while iterators:
            step = next(iterators[-1], None)
            if step is None:
                state[stack.pop()] = 2
                iterators.pop()
                continue
            target = step[1]
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):])
            elif target not in state:
                state[target] = 1
                stack.append(target)
                iterators.append(iter(graph[target]))
    return cycles


# -- loading ----------------------------------------------------------------------------------


def _locate(doc: _Document, file: str, loc: Loc, message: str) -> Problem:
    key = format_loc(loc)
    for size in range(len(loc), -1, -1):
        prefix = loc[:size]
        if prefix in doc.origins:
            return Problem(doc.origins[prefix], None, None, key, message)
        if prefix in doc.positions:
            line, column = doc.positions[prefix]
            return Problem(file, line, column, key, message)
    return Problem(file, None, None, key, message)


def _host_path_problems(topology: Topology) -> list[tuple[Loc, str]]:
    """Local workspace folders and archives that are not there: `mesh run` would stop on them."""
    declared: list[tuple[Loc, WorkspaceDecl]] = [
        (("nodes", index, "workspace"), decl.workspace)
        for index, decl in enumerate(topology.nodes) if decl.workspace is not None]
    if topology.mesh.workspace is not None and any(d.workspace is None for d in topology.nodes):
        declared.append((("mesh", "workspace"), topology.mesh.workspace))
    found: list[tuple[Loc, str]] = []
    for loc, decl in declared:
        if decl.path is not None and not topology.resolve_path(decl.path).is_dir():
            found.append(((*loc, "path"), f"no folder {topology.resolve_path(decl.path)}; "
                          "create it, or point it elsewhere (e.g. --set "
                          f"{format_loc((*loc, 'path'))}=../my-app)"))
        archive = decl.archive
        if archive is not None and "://" not in archive \
                and not topology.resolve_path(archive).is_file():
            found.append(((*loc, "archive"), f"no archive {topology.resolve_path(archive)}"))
    return found


def _check(path: str | Path, overrides: Mapping[str, str] | Iterable[str] | None,
           check_paths: bool = False) -> tuple[Topology | None, list[Problem]]:
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(file, None, None, "", f"cannot read the file: {exc}")]

    doc = _parse_yaml(text, file)
    if doc.data is None:
        return None, doc.problems
    if not isinstance(doc.data, dict):
        doc.problems.append(Problem(file, 1, 1, "", "expected a mapping with `mesh`, `nodes` "
                                    f"and `tasks`, got {_describe(doc.data)}"))
        return None, doc.problems

    doc.data, doc.origins, override_problems = _apply(doc.data, overrides)
    doc.problems.extend(override_problems)

    topology: Topology | None = None
    found: list[tuple[Loc, str]] = []
    try:
        topology = Topology.model_validate(doc.data, context={"skip_references": True})
    except ValidationError as exc:
        found.extend(_schema_problems(exc))

    # Reference checks read the raw data, so they still run when the schema found problems.
    found.extend(_reference_problems(doc.data))
    if check_paths and topology is not None:
        topology._source = Path(path).resolve()
        found.extend(_host_path_problems(topology))
    problems = doc.problems + [_locate(doc, file, loc, message) for loc, message in found]
    problems.sort(key=lambda p: (p.line is None, p.line or 0, p.column or 0))
    if problems:
        return None, problems
    assert topology is not None
    topology._source = Path(path).resolve()
    return topology, []


def load_topology(path: str | Path,
                  overrides: Mapping[str, str] | Iterable[str] | None = None) -> Topology:
    """Load and check a topology file; raise TopologyError listing every problem."""
    topology, problems = _check(path, overrides)
    if problems or topology is None:
        raise TopologyError(problems)
    return topology


def validate_file(path: str | Path,
                  overrides: Mapping[str, str] | Iterable[str] | None = None,
                  check_paths: bool = False) -> list[Problem]:
    """Every problem of a topology file (with `check_paths`, missing local workspace folders
    and archives too); empty when it is valid."""
    return _check(path, overrides, check_paths)[1]


def validation_report(path: str | Path,
                      overrides: Mapping[str, str] | Iterable[str] | None = None,
                      check_paths: bool = False) -> tuple[int, list[str]]:
    """What `mesh validate` prints, and its exit code: 1 with every problem, or 0 and a summary."""
    topology, problems = _check(path, overrides, check_paths)
    if problems or topology is None:
        return 1, [str(problem) for problem in problems]
    nodes, tasks = len(topology.nodes), len(topology.tasks)
    return 0, [f"ok: {nodes} node{'s' * (nodes != 1)}, {tasks} task{'s' * (tasks != 1)}"]


# -- running: order -------------------------------------------------------------------------


def plan(topology: Topology) -> list[list[TaskDecl]]:
    """Tasks in waves: every task comes after all the tasks it `needs`."""
    order = {task.name: i for i, task in enumerate(topology.tasks)}
    sorter = graphlib.TopologicalSorter({task.name: task.needs for task in topology.tasks})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        path = " -> ".join(reversed(exc.args[1]))
        raise TopologyError([Problem(str(topology.source or "<topology>"), None, None,
                                     "tasks", f"cycle in needs: {path}")]) from exc
    waves = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=order.__getitem__)
        waves.append([topology.task(name) for name in ready])
        sorter.done(*ready)
    return waves


def ready_tasks(topology: Topology, finished: Collection[str],
                running: Collection[str] = ()) -> list[TaskDecl]:
    """Tasks not yet started whose `needs` have all finished, in declaration order."""
    return [task for task in topology.tasks
            if task.name not in finished and task.name not in running
            and all(need in finished for need in task.needs)]


def downstream(topology: Topology, name: str) -> set[str]:
    """Every task that needs `name`, directly or through others (to skip when it fails)."""
    found: set[str] = set()
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for task in topology.tasks:
            if current in task.needs and task.name not in found:
                found.add(task.name)
                frontier.append(task.name)
    return found


# -- running: nodes and branches --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NodeInstance:
    """One node process or container to start: a declaration, or one replica of it."""

    name: str
    decl: NodeDecl
    replica: int | None
    model: str | None
    api_base: str | None
    workspace: WorkspaceDecl | None


@dataclasses.dataclass(frozen=True)
class Branch:
    """One concrete run of a task on one node; fan-out makes several per task."""

    task: TaskDecl
    name: str
    node: str
    item: str | None
    mode: Mode
    description: str | None
    steps: list[Step] | None


def _instances(topology: Topology, decl: NodeDecl) -> list[NodeInstance]:
    names = ([decl.name] if decl.count == 1
             else [f"{decl.name}-{n}" for n in range(1, decl.count + 1)])
    return [
        NodeInstance(
            name=name, decl=decl, replica=None if decl.count == 1 else n + 1,
            model=decl.model or topology.mesh.model,
            api_base=decl.api_base or topology.mesh.api_base,
            workspace=decl.workspace or topology.mesh.workspace,
        )
        for n, name in enumerate(names)
    ]


def expand_nodes(topology: Topology) -> list[NodeInstance]:
    """The nodes to start with the mesh: replicas named NAME-1..NAME-N, templates left out."""
    return [instance for decl in topology.nodes if not decl.template
            for instance in _instances(topology, decl)]


def _substitute(value: Any, item: str) -> Any:
    # Plain replacement, not str.format: commands are full of braces (${VAR}, JSON, awk).
    if isinstance(value, str):
        return value.replace("{item}", item)
    if isinstance(value, list):
        return [_substitute(v, item) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, item) for k, v in value.items()}
    return value


def _branch(task: TaskDecl, name: str, node: NodeInstance, item: str | None) -> Branch:
    description, steps = task.description, task.steps
    if item is not None:
        description = _substitute(description, item)
        steps = [step.model_copy(update={"args": _substitute(step.args, item)})
                 for step in steps] if steps else steps
    return Branch(task=task, name=name, node=node.name, item=item,
                  mode=task.mode or node.decl.mode, description=description, steps=steps)


def expand_task(topology: Topology, task: TaskDecl) -> list[Branch]:
    """The branches of a task, each placed on a concrete node.

    Without fan-out the task runs once, on the first replica that can take it. `over` makes
    one branch per item (named by its index, or by its key when `over` is a mapping), spread
    round-robin over those replicas; `replicas` makes one branch
    per replica, with the replica's name as its {item}.
    """
    candidates = [instance for instance in expand_nodes(topology)
                  if instance.decl.name == task.node
                  or (task.role is not None and instance.decl.role == task.role)]
    if not candidates:
        raise ConfigError(f"task {task.name!r}: no started node can run it")
    if task.fan_out is None:
        return [_branch(task, task.name, candidates[0], None)]
    if task.fan_out.replicas:
        return [_branch(task, f"{task.name}[{node.name}]", node, node.name)
                for node in candidates]
    return [_branch(task, f"{task.name}[{key}]", candidates[i % len(candidates)], item)
            for i, (key, item) in enumerate(task.fan_out.items())]
