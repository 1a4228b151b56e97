"""Snapshots capture the whole workspace and restore it exactly, sharing unchanged contents."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from agent_runtime.config import NodeConfig
from agent_runtime.node import Node
from agent_runtime.tools import ToolContext

BINARY = bytes(range(256)) * 64 + os.urandom(50_000)


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything under root but `.peermesh/`: kind, mode, time and content or link target."""
    found: dict[str, tuple[Any, ...]] = {}

    def visit(folder: Path, prefix: str) -> None:
        for entry in os.scandir(folder):
            rel = prefix + entry.name
            if rel == ".peermesh":
                continue
            st = entry.stat(follow_symlinks=False)
            mode = stat.S_IMODE(st.st_mode)
            if entry.is_symlink():
                found[rel] = ("link", os.readlink(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                visit(Path(entry.path), rel + "/")
                found[rel] = ("dir", mode, st.st_mtime_ns)
            elif stat.S_ISFIFO(st.st_mode):
                found[rel] = ("fifo", mode)
            else:
                found[rel] = ("file", mode, st.st_mtime_ns, Path(entry.path).read_bytes())

    visit(root, "")
    return found


def populate(root: Path) -> None:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("print('hello')\n")
    (root / "README.md").write_text("readme\n")
    (root / "data.bin").write_bytes(BINARY)
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "frozen.txt").write_text("do not touch\n")
    (root / "frozen.txt").chmod(0o444)
    (root / ".env").write_text("SECRET=1\n")
    (root / ".hidden" / "deep").mkdir(parents=True)
    (root / ".hidden" / "deep" / "note").write_text("dotfolder\n")
    (root / "empty").mkdir()
    (root / "locked").mkdir()
    (root / "locked" / "inside.txt").write_text("inside\n")
    (root / "locked").chmod(0o555)
    (root / "link").symlink_to("src/pkg/mod.py")
    (root / "dangling").symlink_to("../nowhere")
    os.mkfifo(root / "pipe", 0o640)


def mess_up(root: Path) -> None:
    (root / "README.md").write_text("README\n")  # same size, other bytes
    (root / "data.bin").unlink()
    (root / "run.sh").chmod(0o644)
    (root / "frozen.txt").chmod(0o644)
    (root / "frozen.txt").write_text("touched after all\n")
    (root / "empty").rmdir()
    (root / "src" / "pkg" / "mod.py").unlink()
    (root / "src" / "pkg" / "mod.py").mkdir()
    (root / "src" / "pkg" / "mod.py" / "surprise").write_text("a folder now\n")
    (root / "new-folder" / "sub").mkdir(parents=True)
    (root / "new-folder" / "sub" / "file").write_text("added\n")
    (root / "added.txt").write_text("added\n")
    (root / "link").unlink()
    (root / "link").symlink_to("README.md")
    (root / "dangling").unlink()
    (root / "dangling").write_text("a file where a link was\n")
    (root / "locked").chmod(0o755)
    (root / "locked" / "intruder").write_text("x\n")
    (root / "locked").chmod(0o555)
    (root / "pipe").unlink()


async def snapshot(client: TestClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/snapshots", json=body)
    assert response.status == 201, await response.text()
    return await response.json()


async def restore(client: TestClient, ref: str) -> dict[str, Any]:
    response = await client.post(f"/api/v1/snapshots/{ref}/restore")
    assert response.status == 200, await response.text()
    return await response.json()


def stored_contents(config: NodeConfig) -> list[bytes]:
    """Every file content the snapshot store holds, read through the packs' indexes."""
    contents = []
    for index_file in (config.state_dir / "snapshots" / "packs").glob("*.idx"):
        pack = index_file.with_suffix(".pack").read_bytes()
        for offset, size in json.loads(index_file.read_text()).values():
            contents.append(pack[offset:offset + size])
    return contents


async def test_restore_is_byte_identical_after_modifying_deleting_and_adding(
    client: TestClient, workspace: Path
) -> None:
    populate(workspace)
    before = tree(workspace)
    info = await snapshot(client)
    assert info["files"] == 11
    assert info["bytes"] == sum(len(v[3]) for v in before.values() if v[0] == "file")

    mess_up(workspace)
    assert tree(workspace) != before
    restored = await restore(client, info["id"])

    assert restored["id"] == info["id"]
    assert tree(workspace) == before
    assert os.access(workspace / "run.sh", os.X_OK)


async def test_node_bookkeeping_is_neither_captured_nor_removed(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "work.txt").write_text("work\n")
    info = await snapshot(client)

    bookkeeping = workspace / ".peermesh" / "exec" / "output.txt"
    bookkeeping.parent.mkdir(parents=True)
    bookkeeping.write_text("full output of a later command\n")
    await restore(client, info["id"])

    assert bookkeeping.read_text() == "full output of a later command\n"
    assert (workspace / "work.txt").read_text() == "work\n"


async def test_a_snapshot_can_be_found_and_restored_by_its_alias(
    client: TestClient, workspace: Path
) -> None:
    (workspace / "state.txt").write_text("v1\n")
    info = await snapshot(client, alias="before-refactor")
    assert info["alias"] == "before-refactor"

    found = await (await client.get("/api/v1/snapshots/before-refactor")).json()
    assert found == info
    (workspace / "state.txt").write_text("v2\n")
    await restore(client, "before-refactor")
    assert (workspace / "state.txt").read_text() == "v1\n"


async def test_duplicate_alias_is_refused_with_409(client: TestClient) -> None:
    await snapshot(client, alias="twice")
    response = await client.post("/api/v1/snapshots", json={"alias": "twice"})
    assert response.status == 409
    assert (await response.json())["error"]["details"] == {"alias": "twice"}


async def test_bad_alias_and_unknown_fields_are_refused_naming_the_field(
    client: TestClient,
) -> None:
    for body, field in [({"alias": "a/b"}, "alias"), ({"alias": "  "}, "alias"),
                        ({"name": "x"}, "name")]:
        response = await client.post("/api/v1/snapshots", json=body)
        assert response.status == 400
        errors = (await response.json())["error"]["details"]["errors"]
        assert [e["field"] for e in errors] == [field]


async def test_unknown_snapshot_is_404(client: TestClient) -> None:
    for method, path in [
        ("GET", "/api/v1/snapshots/nope"),
        ("POST", "/api/v1/snapshots/nope/restore"),
        ("DELETE", "/api/v1/snapshots/nope"),
    ]:
        response = await client.request(method, path)
        assert response.status == 404, path
        assert (await response.json())["error"]["code"] == "not_found"


async def test_delete_forgets_the_snapshot_and_the_contents_only_it_held(
    client: TestClient, workspace: Path, node_config: NodeConfig
) -> None:
    (workspace / "shared.txt").write_text("in both snapshots\n")
    (workspace / "only-first.txt").write_text("only in the first\n")
    first = await snapshot(client, alias="first")
    (workspace / "only-first.txt").unlink()
    (workspace / "only-second.txt").write_text("only in the second\n")
    second = await snapshot(client)
    assert sorted(stored_contents(node_config)) == sorted(
        [b"in both snapshots\n", b"only in the first\n", b"only in the second\n"]
    )

    response = await client.delete("/api/v1/snapshots/first")
    assert response.status == 200
    assert (await response.json())["id"] == first["id"]

    listed = await (await client.get("/api/v1/snapshots")).json()
    assert [s["id"] for s in listed] == [second["id"]]
    assert sorted(stored_contents(node_config)) == [
        b"in both snapshots\n", b"only in the second\n"
    ]
    assert (await client.get(f"/api/v1/snapshots/{first['id']}")).status == 404


async def test_restoring_one_snapshot_then_another_gives_each_exactly(
    client: TestClient, workspace: Path, node_config: NodeConfig
) -> None:
    populate(workspace)
    first_tree = tree(workspace)
    first = await snapshot(client)
    mess_up(workspace)
    second_tree = tree(workspace)
    second = await snapshot(client)

    await restore(client, first["id"])
    assert tree(workspace) == first_tree
    await restore(client, second["id"])
    assert tree(workspace) == second_tree
    await restore(client, first["id"])
    assert tree(workspace) == first_tree

    # Contents both snapshots hold are stored once.
    stored = stored_contents(node_config)
    assert len(stored) == len(set(stored))


async def test_a_change_right_after_the_snapshot_is_undone(
    client: TestClient, workspace: Path
) -> None:
    for round_ in range(5):
        (workspace / "hot.txt").write_text(f"before {round_}\n")
        info = await snapshot(client)
        (workspace / "hot.txt").write_text(f"after! {round_}\n")
        await restore(client, info["id"])
        assert (workspace / "hot.txt").read_text() == f"before {round_}\n"


async def test_snapshots_are_listed_oldest_first(client: TestClient) -> None:
    ids = [(await snapshot(client))["id"] for _ in range(3)]
    listed = await (await client.get("/api/v1/snapshots")).json()
    assert [s["id"] for s in listed] == ids


async def test_snapshot_tools_create_and_restore_by_alias(
    client: TestClient, node: Node, workspace: Path
) -> None:
    ctx = ToolContext()
    (workspace / "file.txt").write_text("kept\n")
    info = await node.tools.get("snapshot_create").call(ctx, {"alias": "tool-made"})
    assert info.alias == "tool-made"
    assert node.tools.get("snapshot_restore").writes

    (workspace / "file.txt").unlink()
    restored = await node.tools.get("snapshot_restore").call(ctx, {"id": "tool-made"})
    assert restored.id == info.id
    assert (workspace / "file.txt").read_text() == "kept\n"


async def test_a_file_changed_after_a_settled_snapshot_is_captured_again(
    client: TestClient, workspace: Path
) -> None:
    target = workspace / "settled.txt"
    target.write_text("one\n")

    # Let the file's times settle, so that snapshots trust its stat instead of rehashing.
    settled_after = target.stat().st_ctime_ns + 300_000_000
    while time.time_ns() < settled_after:
        await asyncio.sleep(0.05)
    first = await snapshot(client)
    second_unchanged = await snapshot(client)
    target.write_text("two\n")
    second = await snapshot(client)

    await restore(client, first["id"])
    assert target.read_text() == "one\n"
    await restore(client, second["id"])
    assert target.read_text() == "two\n"
    await restore(client, second_unchanged["id"])
    assert target.read_text() == "one\n"

    # Written back by the restore with its old time, then changed at once: still noticed.
    target.write_text("six\n")
    third = await snapshot(client)
    await restore(client, first["id"])
    await restore(client, third["id"])
    assert target.read_text() == "six\n"
