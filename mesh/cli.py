"""The `mesh` command: run topologies, and drive any node from a shell.

A NODE argument is a node name of a mesh this command started (`--mesh` picks which, default
the only one up) or a node's URL, whose token comes from --token or MESH_TOKEN.

Exit codes: 0 success; 1 a task, command or check failed; 2 bad usage or input; 3 a node could
not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from .errors import ConfigError, MeshError, PeerError, PeerUnreachable, TaskFailed

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CliError(MeshError):
    """A command cannot go on; its message is for the user, its code is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# -- output -----------------------------------------------------------------------------------


class Output:
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
    return Peer(url, token)


# -- commands ---------------------------------------------------------------------------------


async def cmd_task(args: argparse.Namespace, out: Output) -> int:
    steps = None
    if args.steps:
        try:
            steps = json.loads(Path(args.steps).read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read steps from {args.steps}: {exc}", EXIT_USAGE) from exc
    async with open_peer(args, args.node) as peer:
        handle = await peer.submit(description=args.text or "", mode=args.mode, steps=steps)
        out.line(f"task {handle.id} on {args.node}")
        if args.detach:
            out.data({"id": handle.id}, handle.id)
            return EXIT_OK
        async for event in handle.events():
            render_event(out, event)
        task = await handle.get()
    out.data(task, _task_summary(task))
    return EXIT_OK if task.status.value == "completed" else EXIT_FAILED


def _task_summary(task: Any) -> str:
    if task.status.value == "completed":
        result = task.result
        text = result if isinstance(result, str) else json.dumps(result, indent=1)
        return f"completed\n{text}" if text else "completed"
    return f"{task.status.value}: {task.error}"


def render_event(out: Output, event: Any) -> None:
    """One readable line per event (or the event as JSON)."""
    if out.as_json:
        out.data(event)
        return
    data = event.data
    kind = event.type
    if kind == "message":
        text = data.get("text", "")
        sys.stdout.write(text if data.get("role") == "assistant" else f"\n[user] {text}\n")
        sys.stdout.flush()
        return
    if kind == "tool_use":
        detail = json.dumps(data.get("args"))[:160]
        out.line(f"  -> {data.get('tool')} {detail}")
    elif kind == "tool_result":
        status = "ok" if data.get("ok") else "error"
        first = str(data.get("output", "")).strip().splitlines()[:1]
        out.line(f"  <- {data.get('tool')} {status} {first[0][:160] if first else ''}")
    else:
        extra = data.get("error") or data.get("to") or ""
        out.line(f"[{event.seq}] {kind} {extra}".rstrip())


async def cmd_tail(args: argparse.Namespace, out: Output) -> int:
    async with open_peer(args, args.node) as peer:
        if args.task:
            async for event in peer.task_handle(args.task).events(after=args.after):
                render_event(out, event)
            return EXIT_OK
        async for event in peer.events(after=args.after):
            render_event(out, event)
    return EXIT_OK


async def cmd_exec(args: argparse.Namespace, out: Output) -> int:
    words = args.command[1:] if args.command[:1] == ["--"] else args.command
    # One argument is a shell command line; several are words, quoted as the shell would.
    command = words[0] if len(words) == 1 else shlex.join(words)
    if not command:
        raise CliError("no command given", EXIT_USAGE)
    async with open_peer(args, args.node) as peer:
        result = await peer.exec(command, cwd=args.cwd, timeout_s=args.timeout)
    if out.as_json:
        out.data(result)
    else:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.timed_out:
            sys.stderr.write(f"mesh: timed out after {args.timeout:g}s\n")
        if result.truncated and result.output_file:
            sys.stderr.write(f"mesh: output cut; whole output in {result.output_file}\n")
    if result.timed_out or result.exit_code is None:
        return EXIT_FAILED
    return min(result.exit_code, 255)


def _split_remote(spec: str) -> tuple[str | None, str]:
    """`node:path` -> (node, path); a local path (also one with a drive-less colon) -> None."""
    if spec.startswith(("http://", "https://")):
        base, _, path = spec.partition("::")
        return base, path
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
            target = Path(dst)
            if target.is_dir():
                target = target / Path(src).name
            await peer.download(src, target)
        out.data({"copied": str(target)}, f"{args.src} -> {target}")
        return EXIT_OK
    local = Path(src)
    if not local.is_file():
        raise CliError(f"no such local file: {local}", EXIT_USAGE)
    assert dst_node is not None
    remote = dst if dst and not dst.endswith("/") else f"{dst}{local.name}"
    async with open_peer(args, dst_node) as peer:
        info = await peer.upload(local, remote)
    out.data(info, f"{local} -> {dst_node}:{info.path}")
    return EXIT_OK


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
    from .runner import node_logs

    text = await node_logs(args.node, mesh=args.mesh, tail=args.tail)
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
    out.data({"removed": removed}, f"removed {len(removed)} mesh(es): {', '.join(removed)}"
             if removed else "nothing to remove")
    return EXIT_OK


async def cmd_validate(args: argparse.Namespace, out: Output) -> int:
    from .topology import validate_file, validation_report

    if out.as_json:
        problems = validate_file(Path(args.file), overrides=args.set)
        out.data({"ok": not problems, "problems": [p.to_dict() for p in problems]})
        return EXIT_USAGE if problems else EXIT_OK
    code, lines = validation_report(Path(args.file), overrides=args.set)
    (sys.stdout if code == 0 else sys.stderr).write("\n".join(lines) + "\n")
    return EXIT_OK if code == 0 else EXIT_USAGE


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from agent_runtime.config import build_parser as build_node_parser

    # Shared options may come before or after the command; SUPPRESS keeps a subcommand's
    # default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    common.add_argument("--mesh", default=argparse.SUPPRESS,
                        help="which mesh a NODE name belongs to")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="token for a NODE given as a URL [env MESH_TOKEN]")

    parser = argparse.ArgumentParser(
        prog="mesh", description="Run peermesh topologies and drive agent nodes.",
        epilog="NODE is a node name of a mesh that is up, or a node URL (with --token).",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, handler: Callable[..., Awaitable[int]] | None,
                *, shared: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  parents=[common] if shared else [])
        sub.set_defaults(handler=handler)
        return sub

    node = command("node", "run one agent node in the foreground", None, shared=False)
    build_node_parser(node)

    sub = command("up", "start a topology's nodes and print their URLs", cmd_up)
    sub.add_argument("file")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a topology value, e.g. mesh.backend=docker")

    sub = command("run", "run a topology's tasks, print a report, then tear it down", cmd_run)
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

    sub = command("tail", "follow a node's events, or one task's", cmd_tail)
    sub.add_argument("node")
    sub.add_argument("task", nargs="?")
    sub.add_argument("--after", type=int, default=0, help="start after this event seq")

    sub = command("exec", "run a command on a node", cmd_exec)
    sub.add_argument("node")
    sub.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_argument("--cwd")
    sub.add_argument("--timeout", type=float, default=600.0)

    sub = command("cp", "copy a file between a node (NODE:PATH) and this machine", cmd_cp)
    sub.add_argument("src")
    sub.add_argument("dst")

    sub = command("snapshot", "snapshot a node's workspace", cmd_snapshot)
    sub.add_argument("node")
    sub.add_argument("--alias")

    sub = command("restore", "restore a node's workspace from a snapshot", cmd_restore)
    sub.add_argument("node")
    sub.add_argument("snapshot", help="snapshot id or alias")

    sub = command("logs", "show a node's own log", cmd_logs)
    sub.add_argument("node")
    sub.add_argument("--tail", type=int, default=200)

    sub = command("down", "stop and remove a mesh's nodes", cmd_down)
    sub.add_argument("file", nargs="?", help="the topology whose mesh to remove")
    sub.add_argument("--all", action="store_true", help="every peermesh mesh on this machine")

    sub = command("validate", "check a topology file and print every problem", cmd_validate)
    sub.add_argument("file")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, default in (("json", False), ("mesh", None), ("token", None)):
        if not hasattr(args, option):
            setattr(args, option, default)
    if args.command == "node":
        from agent_runtime.__main__ import run_node

        return run_node(args)

    from agent_runtime.logs import configure_logging

    configure_logging("console", os.environ.get("MESH_LOG_LEVEL", "warning"))
    out = Output(args.json)
    try:
        return asyncio.run(args.handler(args, out))
    except KeyboardInterrupt:
        sys.stderr.write("mesh: interrupted; what this command started has been stopped\n")
        return EXIT_INTERRUPTED
    except CliError as exc:
        sys.stderr.write(f"mesh: {exc}\n")
        return exc.code
    except ConfigError as exc:
        sys.stderr.write(f"mesh: {exc}\n")
        return EXIT_USAGE
    except TaskFailed as exc:
        sys.stderr.write(f"mesh: {exc}\n")
        return EXIT_FAILED
    except (PeerUnreachable,) as exc:
        sys.stderr.write(f"mesh: {exc}\n")
        return EXIT_UNREACHABLE
    except PeerError as exc:
        sys.stderr.write(f"mesh: {exc}\n")
        return EXIT_FAILED
    except MeshError as exc:
        sys.stderr.write(f"mesh: {exc}\n")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
