"""The fork server: a process that imports the node once and forks a child for every spawn.

Starting `python -m agent_runtime` costs most of a second of CPU in imports alone, which
would put 32 nodes at once on two cores far past any useful start-up time. This process pays
that cost once; each fork starts serving within milliseconds. It runs no threads and no event
loop, so forking it is safe, and it talks to its LocalSpawner over one SOCK_SEQPACKET socket
(one JSON message per packet):

    spawner -> server   {"op": "spawn", "id", "env", "cwd", "log"}
    server  -> spawner  {"op": "hello", "pid"}            imports done, ready to fork
                        {"op": "spawned", "id", "pid"}    or {"op": "spawn_failed", "id", "error"}
                        {"op": "exited", "id", "pid", "code"}
    child   -> spawner  {"op": "ready", "id", "url"}      the node listens (sent by the child)

Exit codes follow the shell's rule: 128 + N for a child killed by signal N. When the spawner
goes away (its end of the socket closes) or this process gets SIGTERM, every child is sent
SIGTERM, and SIGKILL after a grace period.

A node runs its commands and daemons in sessions of their own, which outlive a node killed
with -9. So every node is the subreaper of what it starts (a command's background processes
stay its own), and this process the subreaper of the nodes: whatever comes to it that is not
a node was left by a node that died, and it is killed, since nobody is left to supervise it.

Run as `python -m mesh.spawn.forkserver FD`, FD being the inherited socket.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any

from .. import procfs

STOP_GRACE_S = 5.0
MAX_MESSAGE = 1024 * 1024
PR_SET_CHILD_SUBREAPER = 36
HELD_SIGNALS = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
# What a node imports on its way to ready, some of it lazily: anyio's event loop backend alone
# (pulled in by the MCP service) costs a child over 100 ms of CPU when it is not here already.
PRELOAD = (
    "agent_runtime.__main__",
    "agent_runtime.app",
    "agent_runtime.config",
    "agent_runtime.logs",
    "agent_runtime.agent.loop",
    "agent_runtime.openapi",
    "agent_runtime.services.mcp",
    "agent_runtime.services.meta",
    "agent_runtime.services.rules",
    "agent_runtime.services.tasks",
    "mesh.client",
    "mesh.fanout",
    "anyio._backends._asyncio",
    "anyio.streams.stapled",
    "anyio.streams.tls",
)


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    _preload()
    _become_subreaper()
    server = _Server(sock)
    return server.run()


def _become_subreaper() -> None:
    """Have our orphaned descendants come to us rather than to init (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        # TODO: without prctl, commands of a node killed with -9 outlive it.
        pass


def _preload() -> None:
    """Import everything a node needs before its first fork, once for all children."""
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except Exception as exc:
            # Only a head start: a node that needs the module fails with its own error.
            sys.stderr.write(f"forkserver: not preloaded: {module}: {exc}\n")
    # A child's collector would walk, and so copy, every page of what we imported; frozen
    # objects stay shared with us.
    gc.collect()
    gc.freeze()


class _Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: dict[int, str] = {}
        # Signals arrive as bytes on this pair, so select() wakes up for them.
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, _ignore)
        signal.signal(signal.SIGTERM, _ignore)
        # Ctrl+C in the spawner's terminal is the spawner's to handle, not ours.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def run(self) -> int:
        self.send({"op": "hello", "pid": os.getpid()})
        while True:
            readable, _, _ = select.select([self.sock, self.wake_r], [], [])
            if self.wake_r in readable:
                signals = self.wake_r.recv(256)
                self.reap()
                if signal.SIGTERM in signals:
                    break
            if self.sock in readable:
                data = self.sock.recv(MAX_MESSAGE)
                if not data:
                    break
                self.handle(json.loads(data))
        self.shutdown()
        return 0

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(json.dumps(message).encode())
        except OSError:
            pass

    def handle(self, request: dict[str, Any]) -> None:
        if request.get("op") != "spawn":
            return
        # A signal that reached the child before it dropped our handlers would be written to
        # our wake-up socket and read as ours: the child holds them until it has its own.
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
            self.send({"op": "spawn_failed", "id": request["id"], "error": str(exc)})
            return
        if pid == 0:
            self._become_child(request)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        self.children[pid] = request["id"]
        self.send({"op": "spawned", "id": request["id"], "pid": pid})

    def reap(self) -> None:
        """Collect every child that ended: nodes are reported, orphans just laid to rest."""
        node_ended = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            node_id = self.children.pop(pid, None)
            if node_id is not None:
                node_ended = True
                self.send({"op": "exited", "id": node_id, "pid": pid,
                           "code": 128 - code if code < 0 else code})
        if node_ended:
            self.stop_orphans()

    def stop_orphans(self) -> None:
        """Kill the command groups that dead nodes left to us (see the module docstring)."""
        for pid in [p.pid for p in procfs.processes() if p.ppid == os.getpid()]:
            if pid not in self.children:
                _signal_group(pid, signal.SIGKILL)

    def shutdown(self) -> None:
        for pid in self.children:
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.children and time.monotonic() < deadline:
            select.select([self.wake_r], [], [], 0.05)
            self.reap()
        for pid in self.children:
            _signal_group(pid, signal.SIGKILL)
        self.reap()
        self.stop_orphans()

    def _become_child(self, request: dict[str, Any]) -> None:
        """Turn this fork into the node the request describes; never returns."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in HELD_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
            os.setsid()
            _become_subreaper()
            self.wake_r.close()
            self.wake_w.close()
            _redirect_stdio(request["log"])
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            code = _run_node(request["id"], self.sock)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


def _ignore(signum: int, frame: object) -> None:
    """A Python-level handler, so that the wake-up fd sees the signal."""


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # A child leads its own group once it has called setsid(); one just forked may not yet.
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            continue



def _redirect_stdio(log_path: str) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)


def _run_node(node_id: str, sock: socket.socket) -> int:
    """What `python -m agent_runtime` does, plus telling the spawner the node's URL."""
    import asyncio

    from agent_runtime.app import serve
    from agent_runtime.config import build_parser, config_from_namespace
    from agent_runtime.logs import configure_logging
    from mesh.errors import ConfigError

    try:
        config = config_from_namespace(build_parser().parse_args([]), dict(os.environ))
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    configure_logging(config.log_format, config.log_level)

    def report_ready(url: str) -> None:
        try:
            sock.send(json.dumps({"op": "ready", "id": node_id, "url": url}).encode())
        except OSError:
            pass
        # Our copy of the socket must not keep the spawner from seeing the server go away.
        sock.close()

    try:
        asyncio.run(serve(config, on_ready=report_ready))
    except OSError as exc:
        sys.stderr.write(f"error: cannot listen on {config.host}:{config.port}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
