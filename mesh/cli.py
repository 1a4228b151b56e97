"""The `mesh` command: run topologies, and drive any node from a shell.

A NODE argument is a node name of a mesh this command started (`--mesh` picks which when two
meshes have a node of that name) or a node's URL, whose token comes from --token or MESH_TOKEN.

Exit codes: 0 success; 1 a task, command or check failed; 2 bad usage or input (a topology
problem, an unknown node, path or snapshot, a refused token); 3 a node could not be reached;
130 interrupted (143 terminated), after stopping what the command started. `exec` exits with
the remote command's own code, as ssh does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import traceback
from pathlib import Path, PurePosixPath
from typing import Any, Awaitable, Callable, Sequence

from .errors import (
    ConfigError,
    MeshError,
    PeerAuthError,
    PeerError,
    PeerGone,
    PeerRequestError,
    PeerUnreachable,
)

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class CliError(MeshError):
    """A command cannot go on; its message is for the user, its code is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# -- output -----------------------------------------------------------------------------------


class Output:
    """Results on stdout (as JSON with --json), progress on stderr (silent with --json)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def data(self, value: Any, text: str | None = None) -> None:
        """Print a result: JSON for scripts, or the readable text."""
        if self.as_json:
            sys.stdout.write(json.dumps(value, default=_jsonable) + "\n")
        elif text is not None:
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        sys.stdout.flush()

    def line(self, text: str) -> None:
        """A progress line: stderr, so stdout stays the command's result."""
        if not self.as_json:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude={"token"})
    return str(value)


# -- resolving nodes --------------------------------------------------------------------------


def resolve_node(args: argparse.Namespace, ref: str) -> tuple[str, str]:
    """(url, token) for a node name of a started mesh, or for a URL."""
    if ref.startswith(("http://", "https://")):
        token = args.token or os.environ.get("MESH_TOKEN")
        if not token:
            raise CliError(f"no token for {ref}: pass --token or set MESH_TOKEN", EXIT_USAGE)
        return ref.rstrip("/"), token

    from .context import list_contexts, load_context

    if args.mesh:
        contexts = [load_context(args.mesh)]
    else:
        contexts = [ctx for ctx in list_contexts() if ref in ctx.nodes]
    if len(contexts) > 1:
        meshes = ", ".join(ctx.mesh for ctx in contexts)
        raise CliError(f"node {ref!r} is in several meshes ({meshes}): pick one with --mesh",
                       EXIT_USAGE)
    for ctx in contexts:
        info = ctx.nodes.get(ref)
        if info is not None and info.token:
            return info.url, info.token
    known = sorted({name for ctx in list_contexts() for name in ctx.nodes})
    raise CliError(
        f"no node {ref!r} in any mesh that is up (nodes: {', '.join(known) or 'none'}); "
        "give a URL with --token instead",
        EXIT_USAGE,
    )


def open_peer(args: argparse.Namespace, ref: str) -> Any:
    from .client import Peer

    url, token = resolve_node(args, ref)
    # Errors then name the node as the user wrote it, not only its URL.
    args.node_names[url] = ref
    return Peer(url, token)


# -- commands ---------------------------------------------------------------------------------


async def cmd_task(args: argparse.Namespace, out: Output) -> int:
    steps = None
    if args.steps:
        try:
            steps = json.loads(Path(args.steps).read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read steps from {args.steps}: {exc}", EXIT_USAGE) from exc
        if not isinstance(steps, list):
            # A common slip: the file holds a whole task ({"steps": [...]}), not its steps.
            hint = " (it holds an object; put the list of steps itself in the file)" \
                if isinstance(steps, dict) else ""
            raise CliError(f"{args.steps}: steps must be a JSON list of "
                           f'{{"tool": ..., "args": {{...}}}} objects{hint}', EXIT_USAGE)
    if not args.text.strip() and not steps:
        raise CliError("say what to do: give TEXT, or --steps FILE", EXIT_USAGE)
    async with open_peer(args, args.node) as peer:
        handle = await peer.submit(description=args.text, mode=args.mode, steps=steps)
        out.line(f"task {handle.id} on {args.node}")
        if args.detach:
            out.data({"id": handle.id}, handle.id)
            return EXIT_OK
        # Progress on stderr, the answer on stdout: `mesh task ... > answer.md` works.
        shown = EventPrinter(out, sys.stderr, answer_to=sys.stdout)
        async for event in handle.events():
            shown.print(event)
        task = await handle.get()
    completed = task.status.value == "completed"
    if out.as_json:
        out.data(task)
    elif completed and not shown.streamed_answer:
        out.data(None, _result_text(task.result))
    if not completed:
        sys.stderr.write(f"mesh: task {task.id} {task.status.value}: {task.error}\n")
    return EXIT_OK if completed else EXIT_FAILED


def _result_text(result: Any) -> str:
    if result is None:
        return ""
    return result if isinstance(result, str) else json.dumps(result, indent=1)


class EventPrinter:
    """Events as a person reads them: the agent's words as they come, one line per step."""

    def __init__(self, out: Output, stream: Any, answer_to: Any | None = None) -> None:
        self.out = out
        self.stream = stream
        self.answer_to = answer_to or stream
        self.streamed_answer = False
        self._mid_line = False

    def print(self, event: Any) -> None:
        if self.out.as_json:
            self.out.data(event)
            return
        data, kind = event.data, event.type
        if kind == "message" and data.get("role") == "assistant":
            text = str(data.get("text", ""))
            self.answer_to.write(text)
            self.answer_to.flush()
            self.streamed_answer = True
            self._mid_line = not text.endswith("\n")
            return
        if self._mid_line:
            self.answer_to.write("\n")
            self._mid_line = False
        self.stream.write(_event_line(event) + "\n")
        self.stream.flush()


def _event_line(event: Any) -> str:
    data, kind = event.data, event.type
    if kind == "message":
        return f"[{event.seq}] {data.get('role', 'user')}: {data.get('text', '')}"
    if kind == "tool_use":
        return f"[{event.seq}] -> {data.get('tool')} {json.dumps(data.get('args'))[:160]}"
    if kind == "tool_result":
        status = "ok" if data.get("ok") else "error"
        return f"[{event.seq}] <- {data.get('tool')} {status} {_output_line(data.get('output'))}"
    extra = data.get("error") or data.get("to") or ""
    return f"[{event.seq}] {kind} {extra}".rstrip()


def _output_line(output: Any) -> str:
    """One line of a tool's output: a command's exit code and the last line it printed."""
    text = str(output or "")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "exit_code" in parsed:
        printed = str(parsed.get("stdout") or parsed.get("stderr") or "").strip()
        last = printed.splitlines()[-1] if printed else ""
        return f"exit {parsed['exit_code']}" + (f": {last[:160]}" if last else "")
    lines = text.strip().splitlines()
    return lines[0][:160] if lines else ""


async def cmd_tail(args: argparse.Namespace, out: Output) -> int:
    printer = EventPrinter(out, sys.stdout)
    async with open_peer(args, args.node) as peer:
        if args.task:
            # A task's events from its start (or --after), ending with its final event.
            async for event in peer.task_handle(args.task).events(after=args.after or 0):
                printer.print(event)
            return EXIT_OK
        # A node's events from now on (or after --after), until interrupted.
        async for event in peer.events(after=args.after):
            printer.print(event)
    return EXIT_OK


EXEC_OPTIONS = frozenset({"--cwd", "--timeout", "--json", "--token", "--mesh", "--help", "-h"})


async def cmd_exec(args: argparse.Namespace, out: Output) -> int:
    first = args.command[0].split("=", 1)[0] if args.command else ""
    if first in EXEC_OPTIONS:
        # Everything after NODE is the remote command; an option there would run as one.
        raise CliError(f"{first} comes after NODE, where it would be part of the command: "
                       f"put it before NODE (mesh exec {first} ... NODE -- COMMAND)", EXIT_USAGE)
    words = args.command[1:] if args.command[:1] == ["--"] else args.command
    # One argument is a shell command line; several are words, quoted as the shell would.
    command = words[0] if len(words) == 1 else shlex.join(words)
    if not command.strip():
        raise CliError("no command given: mesh exec NODE -- COMMAND...", EXIT_USAGE)
    async with open_peer(args, args.node) as peer:
        result = await peer.exec(command, cwd=args.cwd, timeout_s=args.timeout)
    if out.as_json:
        out.data(result)
    else:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
        if result.timed_out:
            sys.stderr.write(f"mesh: timed out after {args.timeout:g}s\n")
        if result.truncated and result.output_file:
            sys.stderr.write(f"mesh: output cut; whole output in {result.output_file}\n")
    if result.timed_out or result.exit_code is None:
        return EXIT_FAILED
    return min(result.exit_code, 255)


_URL_AND_PATH = re.compile(
    r"(?P<url>https?://(?:\[[^\]]*\]|[^/:\[]+)(?::\d+)?+(?:/[^:]*)?):(?P<path>.*)", re.S)


def _split_remote(spec: str) -> tuple[str | None, str]:
    """`node:path` or `URL:path` -> (node, path); a local path -> (None, path)."""
    if spec.startswith(("http://", "https://")):
        # The path starts at the first ':' past the URL's host and port (and any URL path).
        match = _URL_AND_PATH.fullmatch(spec)
        if match is None:
            raise CliError(f"say which path on {spec.rstrip('/')}: URL:PATH, e.g. "
                           f"{spec.rstrip('/')}:notes.txt", EXIT_USAGE)
        # `URL::PATH` was the old spelling; its extra ':' is not part of the path.
        return match["url"].rstrip("/"), match["path"].removeprefix(":")
    node, sep, path = spec.partition(":")
    if sep and node and "/" not in node:
        return node, path
    return None, spec


async def cmd_cp(args: argparse.Namespace, out: Output) -> int:
    src_node, src = _split_remote(args.src)
    dst_node, dst = _split_remote(args.dst)
    if (src_node is None) == (dst_node is None):
        raise CliError("cp copies between a node and this machine: one side must be "
                       "NODE:PATH and the other a local path", EXIT_USAGE)
    if src_node is not None:
        async with open_peer(args, src_node) as peer:
            copied = await _download(peer, args.src, src, dst)
        out.data({"copied": str(copied)}, f"{args.src} -> {copied}")
        return EXIT_OK
    assert dst_node is not None
    local = Path(src)
    if not local.exists():
        raise CliError(f"no such local file or folder: {local}", EXIT_USAGE)
    if not (local.is_file() or local.is_dir()):
        raise CliError(f"{local} is neither a file nor a folder", EXIT_USAGE)
    async with open_peer(args, dst_node) as peer:
        info = await _upload(peer, args.dst, local, dst)
    out.data(info, f"{local} -> {dst_node}:{info.path}")
    return EXIT_OK


async def _download(peer: Any, where: str, src: str, dst: str) -> Path:
    """Copy a node file or folder (recursively) to `dst`, as `docker cp` does."""
    info = await _on_path(where, peer.stat(src))
    target = Path(dst)
    wants_folder = dst.endswith(("/", os.sep))
    if target.is_dir():
        # Into an existing folder, under the source's own name.
        target = target / PurePosixPath(info.path).name
    elif wants_folder:
        # A trailing slash names a folder: make it (its parent must exist, as for a file).
        if not target.parent.is_dir():
            raise CliError(f"no such local folder: {target.parent}", EXIT_USAGE)
        target.mkdir()
        target = target / PurePosixPath(info.path).name
    if not target.parent.is_dir():
        raise CliError(f"no such local folder: {target.parent}", EXIT_USAGE)

    if info.type == "file":
        if target.is_dir():
            raise CliError(f"a folder is in the way: {target}", EXIT_USAGE)
        await _on_path(where, peer.download(src, target))
        return target
    if info.type != "dir":
        raise CliError(f"{where} is a {info.type}, not a file or folder", EXIT_USAGE)

    # A folder: a missing target becomes the copy; an existing file cannot.
    if target.exists() and not target.is_dir():
        raise CliError(f"cannot copy folder {where} onto file {target}", EXIT_USAGE)
    listing = await _on_path(where, peer.list(src, recursive=True))
    if listing.truncated:
        # TODO: page through folders larger than the node's listing cap.
        raise CliError(f"{where} holds more entries than one listing returns; copy its "
                       "subfolders one by one", EXIT_FAILED)
    base = PurePosixPath(info.path)
    target.mkdir(exist_ok=True)
    for entry in listing.entries:
        below = PurePosixPath(entry.path)
        relative = below.relative_to(base) if info.path not in ("", ".") else below
        local = target.joinpath(*relative.parts)
        if entry.type == "dir":
            local.mkdir(parents=True, exist_ok=True)
        elif entry.type == "file":
            local.parent.mkdir(parents=True, exist_ok=True)
            await _on_path(f"{where}/{relative}", peer.download(entry.path, local))
        else:
            sys.stderr.write(f"mesh: skipped {entry.path}: a {entry.type}, not copied\n")
    return target


async def _upload(peer: Any, where: str, local: Path, dst: str) -> Any:
    """Copy a local file or folder (recursively) to the node's `dst`, as `docker cp` does."""
    remote = dst.rstrip("/")
    into_folder = not remote or dst.endswith("/")
    if not into_folder:
        try:
            into_folder = (await peer.stat(remote)).type == "dir"
        except PeerRequestError as exc:
            if exc.status != 404:
                raise CliError(f"{where}: {exc.reason}", _request_code(exc)) from exc
    if into_folder:
        remote = f"{remote}/{local.name}" if remote else local.name

    if local.is_file():
        return await _on_path(where, peer.upload(local, remote))
    for folder, subfolders, files in os.walk(local):
        subfolders.sort()
        here = Path(folder).relative_to(local)
        remote_here = (PurePosixPath(remote) / here.as_posix()).as_posix()
        await _on_path(f"{where}/{here}", peer.mkdir(remote_here))
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                sys.stderr.write(f"mesh: skipped {path}: not a regular file\n")
                continue
            await _on_path(f"{where}/{here / name}", peer.upload(path, f"{remote_here}/{name}"))
    return await _on_path(where, peer.stat(remote))


async def _on_path(where: str, call: Awaitable[Any]) -> Any:
    """Run a file call; a refusal names the NODE:PATH it was about."""
    try:
        return await call
    except PeerRequestError as exc:
        raise CliError(f"{where}: {exc.reason}", _request_code(exc)) from exc


async def cmd_snapshot(args: argparse.Namespace, out: Output) -> int:
    async with open_peer(args, args.node) as peer:
        info = await peer.snapshot(alias=args.alias)
    out.data(info, f"snapshot {info.id} ({info.files} files, {info.bytes} bytes)")
    return EXIT_OK


async def cmd_restore(args: argparse.Namespace, out: Output) -> int:
    async with open_peer(args, args.node) as peer:
        info = await peer.restore(args.snapshot)
    out.data(info, f"restored {info.id}")
    return EXIT_OK


async def cmd_logs(args: argparse.Namespace, out: Output) -> int:
    from .context import list_contexts
    from .runner import node_logs

    node, mesh = args.node, args.mesh
    if node.startswith(("http://", "https://")):
        # A node has no route for its own log: the log is kept by what started it, so a URL
        # works only for a node of a mesh this machine brought up.
        url = node.rstrip("/")
        found = [(ctx.mesh, name) for ctx in list_contexts() for name, info in ctx.nodes.items()
                 if info.url.rstrip("/") == url]
        if not found:
            raise CliError(f"no log for {url}: logs are kept for the nodes of a mesh that is "
                           "up here; give its node name (see `mesh ps`)", EXIT_USAGE)
        mesh, node = found[0]
    text = await node_logs(node, mesh=mesh, tail=args.tail)
    out.data({"logs": text}, text)
    return EXIT_OK


async def cmd_ps(args: argparse.Namespace, out: Output) -> int:
    from .runner import mesh_status

    rows = await mesh_status(args.mesh)
    lines = [f"{'MESH':<16} {'NODE':<20} {'STATE':<10} URL"]
    lines += [f"{r['mesh']:<16} {r['node']:<20} {r['state']:<10} {r['url']}" for r in rows]
    out.data(rows, "\n".join(lines) if rows else "no meshes are up")
    return EXIT_OK


async def cmd_up(args: argparse.Namespace, out: Output) -> int:
    from .runner import up

    ctx = await up(Path(args.file), overrides=args.set, progress=out.line)
    rows = {name: info.url for name, info in ctx.nodes.items()}
    text = "\n".join(f"{name:<20} {url}" for name, url in rows.items())
    out.data({"mesh": ctx.mesh, "nodes": rows}, f"mesh {ctx.mesh} is up\n{text}")
    return EXIT_OK


async def cmd_run(args: argparse.Namespace, out: Output) -> int:
    from .runner import run

    report = await run(Path(args.file), overrides=args.set, keep=args.keep, progress=out.line)
    out.data(report.to_json(), report.render())
    return EXIT_OK if report.succeeded else EXIT_FAILED


async def cmd_down(args: argparse.Namespace, out: Output) -> int:
    from .runner import down

    removed = await down(file=Path(args.file) if args.file else None,
                         mesh=args.mesh, everything=args.all, progress=out.line)
    asked = args.mesh or (args.file and Path(args.file).name)
    nothing = f"nothing of {asked} was up" if asked else "no meshes are up"
    out.data({"removed": removed}, f"removed {', '.join(removed)}" if removed else nothing)
    return EXIT_OK


async def cmd_validate(args: argparse.Namespace, out: Output) -> int:
    from .topology import validate_file, validation_report

    if out.as_json:
        problems = validate_file(Path(args.file), overrides=args.set,
                                 check_paths=not args.skip_paths)
        out.data({"ok": not problems, "problems": [p.to_dict() for p in problems]})
        return EXIT_USAGE if problems else EXIT_OK
    code, lines = validation_report(Path(args.file), overrides=args.set,
                                    check_paths=not args.skip_paths)
    (sys.stdout if code == 0 else sys.stderr).write("\n".join(lines) + "\n")
    return EXIT_OK if code == 0 else EXIT_USAGE


# -- parser -----------------------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value



def build_parser() -> argparse.ArgumentParser:
    # Shared options may come before or after the command; SUPPRESS keeps a subcommand's
    # default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output (JSON; one object per line when "
                        "streaming events)")
    common.add_argument("--mesh", default=argparse.SUPPRESS,
                        help="which mesh a NODE name belongs to")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="token for a NODE given as a URL [env MESH_TOKEN]")

    parser = argparse.ArgumentParser(
        prog="mesh", description="Run peermesh topologies and drive agent nodes.",
        epilog="NODE is a node name of a mesh that is up, or a node URL (with --token). "
        "Exit codes: 0 ok, 1 failed, 2 bad usage or input, 3 unreachable, 130 interrupted.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, handler: Callable[..., Awaitable[int]],
                ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    # The node's own parser answers `mesh node ...` (see main); it is not built here because
    # it imports the whole node, which every other command would pay for.
    node = commands.add_parser("node", help="run one agent node in the foreground",
                               add_help=False)
    node.add_argument("node_args", nargs=argparse.REMAINDER)

    sub = command("up", "start a topology's nodes and print their URLs", cmd_up)
    sub.add_argument("file")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a topology value, e.g. mesh.backend=docker")

    sub = command("run", "run a topology's tasks, print a report, then tear it down; exit 0 "
                  "only if every task succeeded", cmd_run)
    sub.add_argument("file")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a topology value, e.g. mesh.backend=docker")
    sub.add_argument("--keep", action="store_true", help="leave the nodes running")

    command("ps", "list the nodes of the meshes that are up", cmd_ps)

    sub = command("task", "submit a task to a node and stream its events", cmd_task)
    sub.add_argument("node")
    sub.add_argument("text", nargs="?", default="", help="what to do, in words")
    sub.add_argument("--mode", default="code",
                     choices=["code", "architect", "debug", "ask", "orchestrator"])
    sub.add_argument("--steps", metavar="FILE", help="JSON file of explicit steps")
    sub.add_argument("--detach", action="store_true", help="print the task id and return")

    sub = command("tail", "follow a node's events from now on, or one task's from its start",
                  cmd_tail)
    sub.add_argument("node")
    sub.add_argument("task", nargs="?")
    sub.add_argument("--after", type=_count, default=None,
                     help="start after this event seq (0 or more)")

    sub = command("exec", "run a command on a node; exit with the command's exit code",
                  cmd_exec)
    sub.add_argument("node")
    sub.add_argument("command", nargs=argparse.REMAINDER,
                     help="one shell command line, or words after --; options of `mesh "
                     "exec` go before NODE")
    sub.add_argument("--cwd", help="folder to run in, relative to the workspace")
    sub.add_argument("--timeout", type=_positive_seconds, default=600.0,
                     help="seconds, more than 0 (default 600)")

    sub = command("cp", "copy a file or folder (recursively) between a node and this "
                  "machine, as docker cp does; a node side is NODE:PATH or URL:PATH", cmd_cp)
    sub.add_argument("src", help="NODE:PATH, URL:PATH or a local path")
    sub.add_argument("dst", help="NODE:PATH, URL:PATH or a local path; a trailing / means "
                     "a folder")

    sub = command("snapshot", "snapshot a node's workspace", cmd_snapshot)
    sub.add_argument("node")
    sub.add_argument("--alias", help="a name to restore it by")

    sub = command("restore", "restore a node's workspace from a snapshot", cmd_restore)
    sub.add_argument("node")
    sub.add_argument("snapshot", help="snapshot id or alias")

    sub = command("logs", "show a node's own log (a node of a mesh that is up here: its "
                  "name, or its URL as `mesh ps` shows it)", cmd_logs)
    sub.add_argument("node")
    sub.add_argument("--tail", type=_count, default=200, help="lines (default 200)")

    sub = command("down", "stop and remove a mesh's nodes", cmd_down)
    sub.add_argument("file", nargs="?", help="the topology whose mesh to remove")
    sub.add_argument("--all", action="store_true", help="every mesh this machine started")

    sub = command("validate", "check a topology file and print every problem", cmd_validate)
    sub.add_argument("file")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a topology value before checking, as `mesh run --set` "
                     "does, e.g. mesh.workspace.path=./project")
    sub.add_argument("--skip-paths", action="store_true",
                     help="do not check that local workspace folders and archives exist "
                     "(for a file meant for another machine)")
    return parser


def run_node(argv: Sequence[str]) -> int:
    """`mesh node ...`: the node's own command line, as `python -m agent_runtime`."""
    from agent_runtime.__main__ import run_node as serve_node
    from agent_runtime.config import build_parser as build_node_parser

    parser = argparse.ArgumentParser(prog="mesh node",
                                     description="Run one agent node in the foreground.")
    build_node_parser(parser)
    return serve_node(parser.parse_args(argv))


async def _run_handler(args: argparse.Namespace, out: Output) -> int:
    # SIGTERM ends a command as Ctrl+C does: cancelled, so that what it started is stopped.
    task = asyncio.current_task()
    assert task is not None
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return int(await args.handler(args, out))


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    words = list(sys.argv[1:] if argv is None else argv)
    command_at = _command_index(words)
    if command_at is not None and words[command_at] == "node":
        return run_node(words[command_at + 1:])
    args = build_parser().parse_args(words)
    if args.command == "node":
        return run_node(args.node_args)
    for option, default in (("json", False), ("mesh", None), ("token", None)):
        if not hasattr(args, option):
            setattr(args, option, default)
    args.node_names = {}

    configure_logging(os.environ.get("MESH_LOG_LEVEL", "warning"))
    try:
        return asyncio.run(_run_handler(args, Output(args.json)))
    except KeyboardInterrupt:
        sys.stderr.write("mesh: interrupted\n")
        return EXIT_INTERRUPTED
    except asyncio.CancelledError:
        sys.stderr.write("mesh: terminated\n")
        return EXIT_TERMINATED
    except Exception as exc:
        code, message = explain(exc, args.node_names)
        for line in message.splitlines() or [""]:
            sys.stderr.write(f"mesh: {line}\n")
        if args.json:
            # Scripts read stdout: they get the error there too, as JSON.
            sys.stdout.write(json.dumps({"error": {"exit_code": code, "message": message}})
                             + "\n")
        if code == EXIT_FAILED and not isinstance(exc, (MeshError, OSError)):
            # Our own bug: one line by default, the traceback when asked for.
            if os.environ.get("MESH_DEBUG"):
                traceback.print_exc()
            else:
                sys.stderr.write("mesh: (set MESH_DEBUG=1 for the traceback)\n")
        return code


def configure_logging(level: str) -> None:
    """Readable log lines on stderr, from `level` up (MESH_LOG_LEVEL, default warning)."""
    # Not agent_runtime.logs: importing it imports the whole node, a second of start-up that
    # every command would pay for.
    import logging

    import structlog

    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.WARNING)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _command_index(words: list[str]) -> int | None:
    """Where the command word is, past the shared options that may come before it."""
    index = 0
    while index < len(words):
        word = words[index]
        if word in ("--mesh", "--token"):
            index += 2
        elif word.startswith("-"):
            index += 1
        else:
            return index
    return None


def explain(exc: Exception, node_names: dict[str, str]) -> tuple[int, str]:
    """The exit code for an error and the message a user reads."""
    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, ConfigError):
        return EXIT_USAGE, str(exc)
    if _is_validation_error(exc):
        # A value the caller gave was checked on this side before it was sent.
        return EXIT_USAGE, _validation_message(exc)
    if isinstance(exc, PeerError):
        node = node_names.get(exc.url, exc.url)
        task = f" (task {exc.task_id})" if exc.task_id else ""
        message = f"{node}{task}: {exc.reason}"
        if isinstance(exc, (PeerUnreachable, PeerGone)):
            return EXIT_UNREACHABLE, message
        if isinstance(exc, PeerAuthError):
            return EXIT_USAGE, f"{message} (check the token)"
        if isinstance(exc, PeerRequestError):
            return _request_code(exc), message
        return EXIT_FAILED, message
    if isinstance(exc, (MeshError, OSError)):
        return EXIT_FAILED, str(exc)
    return EXIT_FAILED, f"internal error: {type(exc).__name__}: {exc}"


def _is_validation_error(exc: Exception) -> bool:
    # pydantic is loaded only by commands that talk to a node; do not import it for this.
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(exc, pydantic.ValidationError)


def _validation_message(exc: Any) -> str:
    """One line: each field that was wrong and why, e.g. `timeout_s: ... greater than 0`."""
    parts = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error.get("loc", ())) or exc.title
        parts.append(f"{field}: {error.get('msg', 'invalid value')}")
    return f"invalid {exc.title}: " + "; ".join(parts)


def _request_code(exc: PeerRequestError) -> int:
    # A request the node refused as wrong (unknown path, snapshot, bad value) is bad input;
    # a node that failed serving it is a failure.
    return EXIT_USAGE if 400 <= exc.status < 500 and exc.status != 409 else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
