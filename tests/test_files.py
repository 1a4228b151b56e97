"""The files service: confinement, byte-exact streaming, atomic writes, and the file tools."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from agent_runtime.app import build_app
from agent_runtime.node import Node
from agent_runtime.tools import ToolContext
from mesh.client import Peer
from mesh.errors import ToolError
from tests.conftest import TOKEN, make_config

FILES = "/api/v1/files"


async def wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll `condition` until it holds; fail the test if it never does."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


async def call_tool(node: Node, name: str, **args: object) -> object:
    return await node.tools.get(name).call(ToolContext(), args)


# -- confinement ------------------------------------------------------------------------------


async def test_percent_encoded_traversal_in_the_url_is_refused_with_403(
    client: TestClient,
) -> None:
    response = await client.get(f"{FILES}/..%2f..%2fetc%2fpasswd")
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "forbidden"


async def test_literal_dot_dot_that_climbs_out_is_refused_with_403(client: TestClient) -> None:
    # encoded=True keeps the client from folding `..` away before it is sent.
    url = URL(str(client.make_url("/")).rstrip("/") + f"{FILES}/a/../../x", encoded=True)
    async with client.session.get(url) as response:
        assert response.status == 403

    response = await client.post("/api/v1/move", json={"src": "a/../../x", "dst": "b"})
    assert response.status == 403


async def test_absolute_path_is_refused_with_403(client: TestClient) -> None:
    assert (await client.get(f"{FILES}//etc/passwd")).status == 403
    assert (await client.put(f"{FILES}//tmp/x", data=b"no")).status == 403
    assert (await client.get("/api/v1/stat//etc/passwd")).status == 403


async def test_a_name_holding_percent_escapes_is_read_and_written_as_that_literal_name(
    client: TestClient, workspace: Path
) -> None:
    # The router decodes the URL once; `%2541.txt` is the file `%41.txt`, never `A.txt`.
    response = await client.put(f"{FILES}/%2541.txt", data=b"literal")

    assert response.status == 201
    assert (workspace / "%41.txt").read_bytes() == b"literal"
    assert not (workspace / "A.txt").exists()

    (workspace / "%2e%2e").write_bytes(b"dots")
    assert await (await client.get(f"{FILES}/%252e%252e")).read() == b"dots"
    assert (await client.delete(f"{FILES}/%2541.txt")).status == 204
    assert not (workspace / "%41.txt").exists()


async def test_the_peer_client_round_trips_names_that_look_percent_encoded(
    client: TestClient, workspace: Path
) -> None:
    async with Peer(str(client.make_url("")), TOKEN) as peer:
        await peer.write("%41.txt", b"not A")
        await peer.write("dir%2f/%2e%2e", b"not a climb")

        assert await peer.read_bytes("%41.txt") == b"not A"
        assert await peer.read_bytes("dir%2f/%2e%2e") == b"not a climb"

    assert sorted(p.name for p in workspace.iterdir()) == ["%41.txt", "dir%2f"]


async def test_a_traversal_decoded_once_by_the_router_is_still_refused_on_write(
    client: TestClient, tmp_path: Path
) -> None:
    response = await client.put(f"{FILES}/..%2f..%2fescaped.txt", data=b"no")

    assert response.status == 403
    assert not (tmp_path / "escaped.txt").exists()


async def test_a_symlink_pointing_outside_can_be_deleted_and_renamed_but_not_followed(
    client: TestClient, workspace: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    (workspace / "link").symlink_to(outside)

    moved = await client.post("/api/v1/move", json={"src": "link", "dst": "renamed"})
    assert moved.status == 200
    assert os.path.islink(workspace / "renamed")
    assert (await client.get(f"{FILES}/renamed")).status == 403
    assert (await client.put(f"{FILES}/renamed", data=b"x")).status == 403

    assert (await client.delete(f"{FILES}/renamed")).status == 204
    assert not os.path.lexists(workspace / "renamed")
    assert outside.read_bytes() == b"keep me"


async def test_symlink_to_a_file_outside_cannot_be_read(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "leak").symlink_to("/etc/passwd")

    response = await client.get(f"{FILES}/leak")

    assert response.status == 403
    assert (await response.json())["error"]["code"] == "forbidden"


async def test_writing_through_a_symlink_that_leaves_the_workspace_leaves_the_target_as_it_was(
    client: TestClient, workspace: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    (workspace / "link").symlink_to(outside)

    response = await client.put(f"{FILES}/link", data=b"overwritten")

    assert response.status == 403
    assert outside.read_bytes() == b"keep me"
    assert temp_files(workspace) == []


# -- reading and writing bytes ----------------------------------------------------------------


async def test_every_byte_value_round_trips_exactly(client: TestClient, workspace: Path) -> None:
    data = bytes(range(256))

    put = await client.put(f"{FILES}/bin/all.bytes", data=data)
    get = await client.get(f"{FILES}/bin/all.bytes")

    assert put.status == 201
    assert (await put.json())["size"] == 256
    assert get.status == 200
    assert get.headers["Content-Type"] == "application/octet-stream"
    assert await get.read() == data
    assert (workspace / "bin" / "all.bytes").read_bytes() == data


@pytest.mark.parametrize(
    ("header", "expected", "content_range"),
    [
        ("bytes=10-19", bytes(range(10, 20)), "bytes 10-19/256"),
        ("bytes=-5", bytes(range(251, 256)), "bytes 251-255/256"),
        ("bytes=250-", bytes(range(250, 256)), "bytes 250-255/256"),
    ],
)
async def test_a_range_read_returns_just_those_bytes_with_206(
    client: TestClient, workspace: Path, header: str, expected: bytes, content_range: str
) -> None:
    (workspace / "all.bytes").write_bytes(bytes(range(256)))

    response = await client.get(f"{FILES}/all.bytes", headers={"Range": header})

    assert response.status == 206
    assert response.headers["Content-Range"] == content_range
    assert await response.read() == expected


async def test_an_unsatisfiable_range_is_answered_with_416(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "all.bytes").write_bytes(bytes(range(256)))

    response = await client.get(f"{FILES}/all.bytes", headers={"Range": "bytes=300-400"})

    assert response.status == 416
    assert response.headers["Content-Range"] == "bytes */256"
    assert (await response.json())["error"]["code"] == "range_not_satisfiable"


async def test_a_multi_megabyte_streamed_upload_beyond_the_body_limit_arrives_intact(
    aiohttp_client, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    # The node's body limit is 1 MiB; a streamed upload is not bound by it.
    config = make_config(tmp_path, max_body_bytes=1024 * 1024)
    client = await aiohttp_client(
        build_app(config), headers={"Authorization": f"Bearer {TOKEN}"}
    )
    blocks = [os.urandom(64 * 1024) for _ in range(96)]
    expected = hashlib.sha256(b"".join(blocks)).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for block in blocks:
            yield block

    response = await client.put(f"{FILES}/big.bin", data=body())

    assert response.status == 201
    assert (await response.json())["size"] == 96 * 64 * 1024
    stored = (config.workspace / "big.bin").read_bytes()
    assert hashlib.sha256(stored).hexdigest() == expected
    assert temp_files(config.workspace) == []


async def test_replacing_a_file_answers_200_and_keeps_no_temp_file(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "f.txt").write_bytes(b"old")

    response = await client.put(f"{FILES}/f.txt", data=b"new")

    assert response.status == 200
    assert (workspace / "f.txt").read_bytes() == b"new"
    assert temp_files(workspace) == []


async def test_an_aborted_upload_leaves_the_old_content_and_no_temp_file(
    client: TestClient, workspace: Path
) -> None:
    target = workspace / "f.txt"
    target.write_bytes(b"old content")
    assert client.port is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"PUT /api/v1/files/f.txt HTTP/1.1\r\nHost: node\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n".encode()
        + b"Content-Length: 10000000\r\n\r\n"
        + b"x" * 5000
    )
    await writer.drain()

    # The temp file shows the upload has begun; dropping the connection must remove it.
    await wait_for(lambda: temp_files(workspace) != [])
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: temp_files(workspace) == [])

    assert target.read_bytes() == b"old content"


async def test_put_with_mode_sets_the_permissions(client: TestClient, workspace: Path) -> None:
    response = await client.put(f"{FILES}/run.sh", data=b"#!/bin/sh\n", params={"mode": "0755"})

    assert (await response.json())["mode"] == "0755"
    assert oct((workspace / "run.sh").stat().st_mode & 0o777) == "0o755"


async def test_put_with_a_malformed_mode_is_a_400_naming_mode(client: TestClient) -> None:
    response = await client.put(f"{FILES}/x", data=b"x", params={"mode": "rwx"})

    assert response.status == 400
    assert (await response.json())["error"]["details"]["errors"][0]["field"] == "mode"


async def test_writing_onto_a_folder_is_a_409(client: TestClient, workspace: Path) -> None:
    (workspace / "folder").mkdir()

    assert (await client.put(f"{FILES}/folder", data=b"x")).status == 409
    assert (await client.put(f"{FILES}/", data=b"x")).status == 409


async def test_reading_a_missing_file_is_a_404(client: TestClient) -> None:
    response = await client.get(f"{FILES}/nope.txt")

    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


# -- listing, stat, mkdir, move, delete -------------------------------------------------------


async def test_a_folder_lists_its_entries_and_recursive_lists_everything_below(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "src" / "pkg").mkdir(parents=True)
    (workspace / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (workspace / "README").write_text("hi")

    top = await (await client.get(f"{FILES}/")).json()
    deep = await (await client.get(f"{FILES}/src", params={"recursive": "1"})).json()

    assert [(e["path"], e["type"]) for e in top["entries"]] == [
        ("README", "file"),
        ("src", "dir"),
    ]
    assert top["truncated"] is False
    assert [e["path"] for e in deep["entries"]] == ["src/pkg", "src/pkg/mod.py"]
    assert deep["entries"][1]["size"] == 6


async def test_stat_reports_a_file_and_404s_a_missing_one(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "a.txt").write_text("abc")
    os.chmod(workspace / "a.txt", 0o640)

    info = await (await client.get("/api/v1/stat/a.txt")).json()
    missing = await client.get("/api/v1/stat/b.txt")

    assert info["path"] == "a.txt"
    assert info["type"] == "file"
    assert info["size"] == 3
    assert info["mode"] == "0640"
    assert missing.status == 404


async def test_mkdir_creates_parents_and_a_file_in_the_way_is_a_409(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "file").write_text("x")

    created = await client.post("/api/v1/mkdir/a/b/c")
    again = await client.post("/api/v1/mkdir/a/b/c")
    blocked = await client.post("/api/v1/mkdir/file/sub")

    assert created.status == 201
    assert (await created.json())["type"] == "dir"
    assert (workspace / "a" / "b" / "c").is_dir()
    assert again.status == 200
    assert blocked.status == 409


async def test_move_renames_and_refuses_to_replace_without_overwrite(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "a.txt").write_text("a")
    (workspace / "b.txt").write_text("b")

    refused = await client.post("/api/v1/move", json={"src": "a.txt", "dst": "b.txt"})
    moved = await client.post(
        "/api/v1/move", json={"src": "a.txt", "dst": "b.txt", "overwrite": True}
    )
    nested = await client.post("/api/v1/move", json={"src": "b.txt", "dst": "d/e/b.txt"})

    assert refused.status == 409
    assert moved.status == 200
    assert (await moved.json())["path"] == "b.txt"
    assert (await nested.json())["path"] == "d/e/b.txt"
    assert (workspace / "d" / "e" / "b.txt").read_text() == "a"
    assert not (workspace / "a.txt").exists()


async def test_move_with_an_unknown_field_is_a_400_naming_it(client: TestClient) -> None:
    response = await client.post("/api/v1/move", json={"src": "a", "dst": "b", "force": True})

    assert response.status == 400
    assert "force" in (await response.json())["error"]["message"]


async def test_deleting_a_non_empty_folder_needs_recursive(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "d").mkdir()
    (workspace / "d" / "f").write_text("x")

    refused = await client.delete(f"{FILES}/d")
    deleted = await client.delete(f"{FILES}/d", params={"recursive": "1"})

    assert refused.status == 409
    assert deleted.status == 204
    assert not (workspace / "d").exists()


async def test_the_workspace_root_cannot_be_deleted(client: TestClient, workspace: Path) -> None:
    response = await client.delete(f"{FILES}/", params={"recursive": "1"})

    assert response.status == 403
    assert workspace.is_dir()


async def test_deleting_a_symlink_removes_the_link_and_keeps_its_target(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "target.txt").write_text("still here")
    (workspace / "link").symlink_to(workspace / "target.txt")

    response = await client.delete(f"{FILES}/link")

    assert response.status == 204
    assert not os.path.lexists(workspace / "link")
    assert (workspace / "target.txt").read_text() == "still here"


async def test_deleting_a_missing_file_is_a_404(client: TestClient) -> None:
    assert (await client.delete(f"{FILES}/nothing")).status == 404


# -- tools ------------------------------------------------------------------------------------


async def test_edit_file_replaces_unique_text(node: Node, workspace: Path) -> None:
    (workspace / "m.py").write_text("a = 1\nb = 2\n")

    await call_tool(node, "edit_file", path="m.py", old="b = 2", new="b = 3")

    assert (workspace / "m.py").read_text() == "a = 1\nb = 3\n"


async def test_edit_file_says_when_the_text_is_missing(node: Node, workspace: Path) -> None:
    (workspace / "m.py").write_text("a = 1\n")

    with pytest.raises(ToolError, match="text not found in m.py"):
        await call_tool(node, "edit_file", path="m.py", old="zzz", new="y")


async def test_edit_file_refuses_text_that_is_not_unique(node: Node, workspace: Path) -> None:
    (workspace / "m.py").write_text("x = 1\nx = 1\n")

    with pytest.raises(ToolError, match="found 2 times in m.py; give more context or set count"):
        await call_tool(node, "edit_file", path="m.py", old="x = 1", new="x = 2")
    assert (workspace / "m.py").read_text() == "x = 1\nx = 1\n"

    await call_tool(node, "edit_file", path="m.py", old="x = 1", new="x = 2", count=2)
    assert (workspace / "m.py").read_text() == "x = 2\nx = 2\n"


async def test_search_files_finds_matching_lines_and_skips_git_and_binary_files(
    node: Node, workspace: Path
) -> None:
    (workspace / "src").mkdir()
    (workspace / "src" / "a.py").write_text("import os\n\ndef needle():\n    pass\n")
    (workspace / ".git").mkdir()
    (workspace / ".git" / "config").write_text("needle\n")
    (workspace / "blob.bin").write_bytes(b"\0needle\n")

    output = await call_tool(node, "search_files", pattern=r"def \w+")
    nothing = await call_tool(node, "search_files", pattern="needle", glob="*.txt")

    assert output == "src/a.py:3: def needle():"
    assert "no line matches" in str(nothing)


async def test_read_file_of_a_missing_file_says_so(node: Node) -> None:
    with pytest.raises(ToolError, match="missing.txt: no such file"):
        await call_tool(node, "read_file", path="missing.txt")


async def test_read_file_returns_a_range_of_lines_and_says_where_to_go_on(
    node: Node, workspace: Path
) -> None:
    (workspace / "lines.txt").write_text("".join(f"line {n}\n" for n in range(1, 11)))

    output = await call_tool(node, "read_file", path="lines.txt", offset_line=3, max_lines=2)

    assert str(output).startswith("line 3\nline 4\n")
    assert "offset_line=5" in str(output)


async def test_read_file_refuses_a_binary_file(node: Node, workspace: Path) -> None:
    (workspace / "b.bin").write_bytes(bytes(range(256)))

    with pytest.raises(ToolError, match="binary file"):
        await call_tool(node, "read_file", path="b.bin")


async def test_write_file_then_list_files_shows_it(node: Node, workspace: Path) -> None:
    await call_tool(node, "write_file", path="docs/notes.md", content="# notes\n")

    listing = await call_tool(node, "list_files", path=".", recursive=True, pattern="*.md")

    assert (workspace / "docs" / "notes.md").read_text() == "# notes\n"
    assert listing == "docs/notes.md  (8 bytes)"


async def test_file_tools_refuse_unknown_arguments(node: Node) -> None:
    with pytest.raises(ToolError, match="unknown argument"):
        await call_tool(node, "write_file", path="a", content="b", append=True)


async def test_put_to_a_path_ending_in_a_slash_is_refused_and_creates_nothing(
    client: TestClient, workspace: Path,
) -> None:
    response = await client.put(f"{FILES}/dir/", data=b"x")

    assert response.status == 400
    assert "names a folder" in (await response.json())["error"]["message"]
    assert not (workspace / "dir").exists()


async def test_a_range_header_that_is_no_byte_range_is_ignored(
    client: TestClient, workspace: Path,
) -> None:
    (workspace / "all.bytes").write_bytes(bytes(range(256)))

    response = await client.get(f"{FILES}/all.bytes", headers={"Range": "bytes=abc"})

    assert response.status == 200
    assert await response.read() == bytes(range(256))
