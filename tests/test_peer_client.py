"""The peer library against real nodes: typed calls, streamed files, resumable events, errors."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

import mesh
from agent_runtime.app import build_app
from mesh import (
    Event,
    ExecOutput,
    ExecResult,
    Mode,
    Peer,
    PeerAuthError,
    PeerGone,
    PeerRequestError,
    PeerUnreachable,
    TaskFailed,
    TaskHandle,
    TaskStatus,
)
from mesh import errors, models
from tests.conftest import TOKEN, NodeProcess, make_config

MiB = 1024 * 1024


def exec_step(command: str) -> dict[str, Any]:
    return {"tool": "terminal_exec", "args": {"command": command}}


def node_url(client: TestClient) -> str:
    return str(client.make_url("/")).rstrip("/")


def capturing_logger() -> tuple[structlog.typing.FilteringBoundLogger, list[dict[str, Any]]]:
    """A logger that keeps every entry, down to DEBUG, for the test to read."""
    capture = structlog.testing.LogCapture()
    logger = structlog.wrap_logger(
        None, processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    return logger, capture.entries


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_event(events: AsyncIterator[Event], kind: str) -> Event:
    async for event in events:
        if event.type == kind:
            return event
    raise AssertionError(f"the stream ended before a {kind} event")


@pytest.fixture
async def peer(client: TestClient) -> AsyncIterator[Peer]:
    async with Peer(node_url(client), TOKEN) as peer:
        yield peer


class CuttableProxy:
    """A TCP relay in front of a node whose live connections a test can cut."""

    def __init__(self, target: str) -> None:
        self.target = URL(target)
        self.url = ""
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every connection through the proxy at once, as a broken network would."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.target.host is not None and self.target.port is not None
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(64 * 1024):
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        sink.transport.abort()


class FlakyNode:
    """A tiny stand-in node that fails each call `failures` times, then answers it properly."""

    def __init__(self, failures: int, how: str = "503") -> None:
        self.failures = failures
        self.how = how
        self.attempts: collections.Counter[str] = collections.Counter()
        self.polls = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = f"{request.method} {request.path}"
        self.attempts[key] += 1
        if self.attempts[key] <= self.failures:
            if self.how == "drop":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            if self.how == "403":
                return web.Response(status=403, text="denied by the proxy")
            body = {"error": {"code": "unavailable", "message": "busy", "details": {}}}
            return web.json_response(body, status=503)
        await request.read()
        return web.json_response(self._answer(key), status=202 if "tasks" in key else 200)

    def _answer(self, key: str) -> Any:
        if key == "GET /api/v1/agent/tasks/t1":
            self.polls += 1
            status = "running" if self.polls < 3 else "completed"
            return {"id": "t1", "description": "", "mode": "code", "status": status,
                    "created_at": 1.0}
        if key == "POST /api/v1/agent/tasks":
            return {"id": "t1", "status": "queued"}
        return {"path": "x", "type": "file", "size": 1, "mode": "0644", "mtime": 1.0}


async def flaky_peer(aiohttp_server: Any, failures: int, how: str = "503") -> tuple[
        FlakyNode, Peer]:
    flaky = FlakyNode(failures, how)
    server: TestServer = await aiohttp_server(flaky.app())
    return flaky, Peer(str(server.make_url("/")), TOKEN)


# -- surface ----------------------------------------------------------------------------------


def test_public_surface_exports_every_error_model_and_client_class() -> None:
    expected = set(errors.__all__) | set(models.__all__) | set(mesh.client.__all__)

    assert expected <= set(mesh.__all__)
    assert all(hasattr(mesh, name) for name in mesh.__all__)


async def test_closed_peer_refuses_calls_and_leaves_a_borrowed_session_open(
    client: TestClient,
) -> None:
    async with aiohttp.ClientSession() as session:
        async with Peer(node_url(client), TOKEN, session=session) as peer:
            assert (await peer.health()).status == "ok"

        assert not session.closed
        with pytest.raises(RuntimeError, match="closed"):
            await peer.health()


def test_url_without_scheme_or_host_is_a_config_error() -> None:
    with pytest.raises(mesh.ConfigError, match="http://host:port"):
        Peer("127.0.0.1:8700", TOKEN)


async def test_token_never_shows_in_repr_errors_or_logs(client: TestClient) -> None:
    logger, entries = capturing_logger()
    async with Peer(node_url(client), TOKEN, logger=logger) as peer:
        handle = await peer.submit(steps=[exec_step("echo hi")])
        await handle.result()
        with pytest.raises(PeerRequestError) as refused:
            await peer.task("no-such-task")

    assert entries and TOKEN not in repr(entries)
    assert TOKEN not in repr(peer) + str(refused.value) + repr(handle)


# -- node and terminal ------------------------------------------------------------------------


async def test_health_and_card_describe_the_node(peer: Peer) -> None:
    health = await peer.health()
    card = await peer.card()

    assert health.status == "ok" and health.capabilities["terminal"]
    assert card["name"] == health.name
    assert any(skill["id"] == "tasks" for skill in card["skills"])
    assert peer.url in await peer.skill()
    assert "terminal_exec" in {tool["function"]["name"] for tool in await peer.tools()}


async def test_exec_returns_exit_code_and_both_streams(peer: Peer) -> None:
    result = await peer.exec("echo out; echo err >&2; exit 3", env={"X": "1"})

    assert result.exit_code == 3
    assert result.stdout == "out\n" and result.stderr == "err\n"


async def test_exec_stream_yields_output_as_it_comes_then_the_result(peer: Peer) -> None:
    items = [item async for item in peer.exec_stream("for i in 1 2 3; do echo $i; done")]

    *chunks, last = items
    assert isinstance(last, ExecResult) and last.exit_code == 0
    assert all(isinstance(chunk, ExecOutput) for chunk in chunks)
    assert "".join(c.data for c in chunks if isinstance(c, ExecOutput)) == "1\n2\n3\n"


async def test_exec_stream_refusal_is_a_request_error_with_the_nodes_code(peer: Peer) -> None:
    with pytest.raises(PeerRequestError) as refused:
        async for _ in peer.exec_stream("true", cwd="../.."):
            pass

    assert refused.value.status == 403 and refused.value.code == "forbidden"


# -- tasks and events -------------------------------------------------------------------------


async def test_step_task_events_run_in_order_to_the_final_event(peer: Peer) -> None:
    handle = await peer.submit(steps=[exec_step("echo hi")], tags=["t"])

    events = [event async for event in handle.events()]

    assert [e.type for e in events] == [
        "task.created", "task.started", "tool_use", "tool_result", "task.completed"]
    assert all(e.task_id == handle.id for e in events)
    assert '"stdout": "hi\\n"' in events[3].data["output"]
    task = await handle.result()
    assert task.status is TaskStatus.COMPLETED and task.result[0]["stdout"] == "hi\n"
    assert [t.id for t in await peer.tasks(status="completed")] == [handle.id]


async def test_node_events_follow_every_task_from_a_given_seq(peer: Peer) -> None:
    first = await peer.submit(steps=[exec_step("true")])
    await first.result()
    second = await peer.submit(steps=[exec_step("true")])

    seen: list[Event] = []
    async with contextlib.aclosing(peer.events(after=0)) as events:
        async for event in events:
            seen.append(event)
            if event.task_id == second.id and event.type == "task.completed":
                break

    assert {event.task_id for event in seen} == {first.id, second.id}
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert (await peer.task_handle(second.id).get()).status is TaskStatus.COMPLETED


async def test_result_raises_task_failed_with_the_nodes_reason(peer: Peer) -> None:
    handle = await peer.submit("write me a poem")

    with pytest.raises(TaskFailed) as failed:
        await handle.result(timeout=30)

    assert failed.value.status == "failed"
    assert "no model configured" in failed.value.reason
    assert failed.value.task_id == handle.id and failed.value.url == peer.url


async def test_cancelled_task_ends_its_events_and_fails_its_result(peer: Peer) -> None:
    handle = await peer.submit(steps=[exec_step("sleep 30")])
    events = handle.events()
    await wait_for_event(events, "tool_use")

    await handle.cancel()

    assert (await wait_for_event(events, "task.cancelled")).data["status"] == "cancelled"
    with pytest.raises(TaskFailed) as failed:
        await handle.result()
    assert failed.value.status == "cancelled"


async def test_result_gives_up_at_its_timeout(peer: Peer) -> None:
    handle = await peer.submit(steps=[exec_step("sleep 30")])

    with pytest.raises(TimeoutError, match=handle.id):
        await handle.result(timeout=0.2)

    await handle.cancel()


async def test_mode_change_and_message_reach_the_task(peer: Peer) -> None:
    handle = await peer.submit(steps=[exec_step("sleep 30")])

    task = await handle.set_mode("architect")
    with pytest.raises(PeerRequestError) as refused:
        await handle.send_message("go on")

    assert task.mode is Mode.ARCHITECT and (await handle.get()).mode is Mode.ARCHITECT
    assert refused.value.status == 409 and refused.value.code == "conflict"
    assert refused.value.task_id == handle.id
    await handle.cancel()


async def test_refused_request_carries_status_code_and_details(peer: Peer) -> None:
    with pytest.raises(PeerRequestError) as refused:
        await peer.submit(steps=[{"tool": "no_such_tool"}])

    assert refused.value.status == 400 and refused.value.code == "bad_request"
    assert refused.value.details["field"] == "steps.0"
    assert refused.value.url == peer.url


async def test_events_resume_after_the_connection_is_cut_without_loss_or_repeats(
    client: TestClient, peer: Peer
) -> None:
    logger, entries = capturing_logger()
    async with CuttableProxy(node_url(client)) as proxy:
        async with Peer(proxy.url, TOKEN, logger=logger) as relayed:
            handle = await relayed.submit(steps=[
                exec_step("sleep 0.2"), exec_step("echo one"), exec_step("echo two")])
            seen = []
            async for event in handle.events():
                seen.append(event)
                if event.type == "task.started":
                    proxy.cut()

    everything = [event async for event in TaskHandle(peer, handle.id).events()]
    assert [e.seq for e in seen] == [e.seq for e in everything]
    assert seen[-1].type == "task.completed"
    assert any(entry["event"] == "peer.events_resuming" for entry in entries)


@pytest.fixture
async def slow_reader_node(aiohttp_server: Any, tmp_path: Path) -> TestServer:
    """A node that drops any subscriber more than one event behind."""
    server: TestServer = await aiohttp_server(
        build_app(make_config(tmp_path, subscriber_buffer=1)))
    return server


async def test_events_resume_after_a_slow_subscriber_close_without_loss_or_repeats(
    slow_reader_node: TestServer,
) -> None:
    logger, entries = capturing_logger()
    async with Peer(str(slow_reader_node.make_url("/")), TOKEN, logger=logger) as peer:
        handle = await peer.submit(steps=[exec_step("true") for _ in range(20)])

        seen = [event async for event in handle.events()]

    seqs = [event.seq for event in seen]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seen) == 2 + 2 * 20 + 1 and seen[-1].type == "task.completed"
    resumed = [entry for entry in entries if entry["event"] == "peer.events_resuming"]
    assert any(entry["close_code"] == 4008 for entry in resumed)


async def test_submitting_logs_one_info_line_with_the_task_id(client: TestClient) -> None:
    logger, entries = capturing_logger()
    async with Peer(node_url(client), TOKEN, logger=logger) as peer:
        handle = await peer.submit(steps=[exec_step("true")])

    infos = [entry for entry in entries if entry["log_level"] == "info"]
    assert infos == [{"event": "peer.task_submitted", "url": peer.url, "task_id": handle.id,
                      "log_level": "info"}]
    assert any(entry["event"] == "peer.request" for entry in entries)


# -- errors and retries -----------------------------------------------------------------------


async def test_wrong_token_raises_peer_auth_error_for_calls_and_streams(
    client: TestClient,
) -> None:
    async with Peer(node_url(client), "wrong-token-0000") as peer:
        assert (await peer.health()).status == "ok"
        with pytest.raises(PeerAuthError) as refused:
            await peer.tasks()
        with pytest.raises(PeerAuthError):
            async for _ in TaskHandle(peer, "t1").events():
                pass

    assert refused.value.url == peer.url


async def test_path_outside_the_workspace_is_a_request_error_not_an_auth_error(
    peer: Peer,
) -> None:
    with pytest.raises(PeerRequestError) as refused:
        await peer.read_bytes("../outside")

    assert refused.value.status == 403 and refused.value.code == "forbidden"


async def test_403_from_something_other_than_the_node_is_an_auth_error(
    aiohttp_server: Any,
) -> None:
    flaky, peer = await flaky_peer(aiohttp_server, failures=1, how="403")
    async with peer:
        with pytest.raises(PeerAuthError, match="Forbidden"):
            await peer.stat("x")

    assert flaky.attempts["GET /api/v1/stat/x"] == 1


@pytest.mark.timeout(15)
async def test_nothing_listening_raises_peer_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with Peer(url, TOKEN) as peer:
        with pytest.raises(PeerUnreachable) as unreachable:
            await peer.health()
        with pytest.raises(PeerUnreachable):
            await peer.submit(steps=[exec_step("true")])
        with pytest.raises(PeerUnreachable) as streaming:
            async for _ in TaskHandle(peer, "t1").events():
                pass

    assert unreachable.value.url == url and isinstance(unreachable.value, ConnectionError)
    assert streaming.value.task_id == "t1"


async def test_get_is_tried_again_after_503_while_post_is_not(aiohttp_server: Any) -> None:
    flaky, peer = await flaky_peer(aiohttp_server, failures=1)
    async with peer:
        task = await peer.task("t1")
        with pytest.raises(PeerRequestError) as refused:
            await peer.submit(steps=[exec_step("true")])

    assert task.id == "t1"
    assert flaky.attempts["GET /api/v1/agent/tasks/t1"] == 2
    assert flaky.attempts["POST /api/v1/agent/tasks"] == 1
    assert refused.value.status == 503 and refused.value.code == "unavailable"


async def test_retries_stop_after_the_policys_attempts(aiohttp_server: Any) -> None:
    flaky, peer = await flaky_peer(aiohttp_server, failures=100)
    async with peer:
        with pytest.raises(PeerRequestError):
            await peer.stat("x")

    assert flaky.attempts["GET /api/v1/stat/x"] == peer.retry.attempts


async def test_dropped_connection_is_tried_again_only_for_replayable_idempotent_calls(
    aiohttp_server: Any,
) -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b"x"

    flaky, peer = await flaky_peer(aiohttp_server, failures=1, how="drop")
    async with peer:
        with pytest.raises(PeerUnreachable):
            await peer.exec("true")
        await peer.write("x", b"x")
        # The node has answered by now, so a dropped connection means it went away.
        with pytest.raises(PeerGone):
            await peer.write("streamed", stream())

    assert flaky.attempts["PUT /api/v1/files/x"] == 2
    assert flaky.attempts["POST /api/v1/terminal/exec"] == 1
    assert flaky.attempts["PUT /api/v1/files/streamed"] == 1


async def test_result_falls_back_to_polling_when_the_event_stream_is_refused(
    aiohttp_server: Any,
) -> None:
    flaky, peer = await flaky_peer(aiohttp_server, failures=0)
    async with peer:
        handle = await peer.submit(steps=[exec_step("true")])
        task = await handle.result(timeout=30)

    assert task.status is TaskStatus.COMPLETED
    assert flaky.attempts["GET /api/v1/agent/ws"] == 1 and flaky.polls == 3


async def test_node_that_answered_then_died_is_gone_not_unreachable(
    node_process: NodeProcess,
) -> None:
    node_process.start()
    async with Peer(node_process.url, TOKEN) as peer, Peer(node_process.url, TOKEN) as fresh:
        await peer.health()
        await asyncio.to_thread(node_process.kill)

        with pytest.raises(PeerGone) as gone:
            await peer.health()
        with pytest.raises(PeerUnreachable):
            await fresh.health()

    assert gone.value.url == node_process.url


async def test_events_raise_peer_gone_when_the_node_dies_mid_task(
    node_process: NodeProcess,
) -> None:
    node_process.start()
    async with Peer(node_process.url, TOKEN) as peer:
        handle = await peer.submit(steps=[exec_step("sleep 30")])
        events = handle.events()
        await wait_for_event(events, "tool_use")

        await asyncio.to_thread(node_process.kill)
        with pytest.raises(PeerGone) as gone:
            await wait_for_event(events, "task.completed")

    assert gone.value.task_id == handle.id


# -- files ------------------------------------------------------------------------------------


async def test_every_byte_value_survives_a_round_trip(peer: Peer) -> None:
    data = bytes(range(256))

    info = await peer.write("bin/all.bytes", data)

    assert info.size == 256 and info.type == "file"
    assert await peer.read_bytes("bin/all.bytes") == data
    assert await peer.read_text("bin/all.bytes", encoding="latin-1") == data.decode("latin-1")


async def test_streamed_upload_and_download_move_megabytes_in_chunks(
    peer: Peer, tmp_path: Path
) -> None:
    block = bytes(range(256)) * 4096

    async def blocks() -> AsyncIterator[bytes]:
        for index in range(6):
            yield bytes([index]) + block[1:]

    info = await peer.write("big.bin", blocks())
    chunks = [chunk async for chunk in peer.iter_file("big.bin", chunk_size=MiB)]
    local = await peer.download("big.bin", tmp_path / "big.bin")
    expected = b"".join([bytes([index]) + block[1:] for index in range(6)])
    await peer.write("copy.bin", expected)

    assert info.size == 6 * MiB
    assert await peer.read_bytes("copy.bin") == expected
    assert all(len(chunk) <= MiB for chunk in chunks) and b"".join(chunks) == expected
    assert local.read_bytes() == expected
    assert not (tmp_path / "big.bin.part").exists()


async def test_failed_download_leaves_no_local_file(peer: Peer, tmp_path: Path) -> None:
    local = tmp_path / "downloads"
    local.mkdir()

    with pytest.raises(PeerRequestError) as missing:
        await peer.download("absent.bin", local / "absent.bin")

    assert missing.value.status == 404
    assert list(local.iterdir()) == []


async def test_upload_streams_a_local_file_and_sets_its_mode(peer: Peer, tmp_path: Path) -> None:
    source = tmp_path / "run.sh"
    source.write_text("#!/bin/sh\necho ran\n")

    await peer.upload(source, "tools/run.sh", mode=0o755)

    assert (await peer.exec("./tools/run.sh")).stdout == "ran\n"


async def test_paths_with_spaces_and_url_characters_stay_one_path(peer: Peer) -> None:
    name = "odd dir/a b?c#d&e=f;g.txt"

    await peer.write(name, "text")

    assert await peer.read_text(name) == "text"
    listing = await peer.list("odd dir")
    assert [entry.path for entry in listing.entries] == [name]


async def test_folders_list_stat_move_and_delete(peer: Peer) -> None:
    await peer.mkdir("a/b")
    await peer.write("a/b/one.txt", "1")

    moved = await peer.move("a/b/one.txt", "a/two.txt")
    listing = await peer.list("a", recursive=True)
    with pytest.raises(PeerRequestError) as missing:
        await peer.stat("a/b/one.txt")

    assert moved.path == "a/two.txt" and (await peer.stat("a/two.txt")).size == 1
    assert {entry.path for entry in listing.entries} == {"a/b", "a/two.txt"}
    assert missing.value.status == 404 and missing.value.code == "not_found"
    await peer.delete("a", recursive=True)
    assert "a" not in {entry.path for entry in (await peer.list()).entries}


# -- daemons ----------------------------------------------------------------------------------


async def test_daemon_starts_logs_restarts_and_stops(peer: Peer) -> None:
    info = await peer.start_daemon({"name": "ticker", "command": "echo up; sleep 30"})

    async def logged() -> str:
        while "up" not in (text := await peer.daemon_logs("ticker", tail=10)):
            await asyncio.sleep(0.05)
        return text

    await asyncio.wait_for(logged(), 15)
    restarted = await peer.restart_daemon("ticker")
    stopped = await peer.stop_daemon("ticker")

    assert info.status.value == "running" and info.pid
    assert [d.name for d in await peer.daemons()] == ["ticker"]
    assert restarted.pid != info.pid
    assert stopped.status.value == "stopped" and (await peer.daemon("ticker")).pid is None
    await peer.forget_daemon("ticker")
    assert await peer.daemons() == []


async def test_following_daemon_logs_streams_until_the_daemon_exits(peer: Peer) -> None:
    await peer.start_daemon({"name": "counter", "command": "for i in 1 2 3; do echo $i; done"})

    text = "".join([piece async for piece in peer.follow_daemon_logs("counter", tail=100)])

    assert text == "1\n2\n3\n"


# -- snapshots --------------------------------------------------------------------------------


async def test_snapshot_restores_the_workspace_exactly(peer: Peer) -> None:
    await peer.write("keep.txt", "before")
    taken = await peer.snapshot(alias="base")

    await peer.write("keep.txt", "after")
    await peer.write("extra.txt", "new")
    restored = await peer.restore("base")

    assert restored.id == taken.id and taken.files == 1
    assert await peer.read_text("keep.txt") == "before"
    assert "extra.txt" not in {entry.path for entry in (await peer.list()).entries}
    assert [s.alias for s in await peer.snapshots()] == ["base"]
    assert (await peer.snapshot_info("base")).id == taken.id
    await peer.delete_snapshot(taken.id)
    assert await peer.snapshots() == []


def test_a_script_using_the_library_prints_only_its_own_output(
    node_process: NodeProcess, tmp_path: Path,
) -> None:
    node_process.start()
    script = tmp_path / "script.py"
    script.write_text(
        "import asyncio, sys\n"
        "from mesh import Peer\n"
        "async def main():\n"
        "    async with Peer(sys.argv[1], sys.argv[2]) as peer:\n"
        "        result = await peer.exec('echo hello from the node')\n"
        "        print(result.stdout.strip())\n"
        "        await peer.health()\n"
        "asyncio.run(main())\n"
    )

    done = subprocess.run([sys.executable, str(script), node_process.url, TOKEN],
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello from the node\n"
    # Below warning the library stays silent; its debug lines went nowhere.
    assert "peer.request" not in done.stderr
