"""Workspace snapshots: packed, content-addressed file contents plus one manifest per snapshot.

Layout of the snapshot folder:

    packs/<pack>.pack          file contents one after another, each stored once for all
    packs/<pack>.idx           {sha256: [offset, size]}, written once the pack is complete
    snaps/<id>/manifest.json   [path, kind, mode, mtime_ns, size, sha256 | link target] rows
    snaps/<id>/info.json       the SnapshotInfo, written last: its presence marks a whole one
    statcache.json             path -> [inode, size, mtime_ns, ctime_ns, sha256] last seen

Contents are packed rather than kept one file each because creating files is what costs most:
a snapshot appends the contents the store lacks to one new pack, and hashes only files whose
stat differs from the cache. A restore rewrites only files whose content differs, removes what
the snapshot does not have and puts back modes and modification times. Deleting a snapshot
drops the packs nobody needs any more and repacks those partly needed.

`.peermesh/` at the workspace root is neither captured nor touched by a restore: it holds the
node's own bookkeeping (full outputs of terminal commands), not the user's work, and a restore
must not take away the output of commands run after the snapshot.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import secrets
import shutil
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import BadRequest, Conflict, NotFound
from mesh.models import SnapshotCreate, SnapshotInfo

from ..http import json_response, read_model
from ..tools import Tool, ToolContext
from ..workspace import Workspace

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["BOOKKEEPING_DIR", "Snapshots", "add_routes", "register_tools"]

log = structlog.get_logger("agent_runtime.snapshots")

BOOKKEEPING_DIR = ".peermesh"
MANIFEST_VERSION = 1
# Most of the time goes to waiting on the filesystem (opening and creating files), which
# overlaps well across threads even on two cores.
WORKERS = 16
# Files up to this size are read whole; larger ones are streamed.
WHOLE_READ_LIMIT = 8 * 1024 * 1024
CHUNK = 1024 * 1024
# File times come from a coarse clock: a stat taken this close to a write may not show a
# second write in the same tick, so such a stat is not trusted to stand for the content.
RACY_NS = 100_000_000

# One manifest row: path, kind ("d" folder, "f" file, "l" symlink, "p" fifo), permission
# bits, mtime_ns, size, and the content's SHA-256 (files) or the link's target (symlinks).
Row = list[Any]


class _Seen(NamedTuple):
    """An entry found by walking the tree."""

    path: str
    kind: str
    st: os.stat_result


class _Location(NamedTuple):
    pack: str
    offset: int
    size: int


class _PackWriter:
    """Appends the contents the store lacks to one new pack, from several threads."""

    def __init__(self, folder: Path, known: dict[str, _Location]) -> None:
        self.name = secrets.token_hex(8)
        self.path = folder / f"{self.name}.pack"
        self.added: dict[str, list[int]] = {}
        self._known = known
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None

    def add(self, digest: str, data: bytes) -> None:
        with self._lock:
            if digest in self._known:
                return
            out = self._open()
            self._record(digest, out.tell(), len(data))
            out.write(data)

    def add_stream(self, source: BinaryIO) -> tuple[str, int]:
        """Copy a large file in while hashing it, so that it is read once; digest and size."""
        with self._lock:
            out = self._open()
            start, size, hasher = out.tell(), 0, hashlib.sha256()
            while chunk := source.read(CHUNK):
                hasher.update(chunk)
                out.write(chunk)
                size += len(chunk)
            digest = hasher.hexdigest()
            if digest in self._known:
                out.seek(start)
                out.truncate()
            else:
                self._record(digest, start, size)
            return digest, size

    def finish(self) -> None:
        """Make the pack durable, then its index: only an indexed pack is ever read."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _write_atomic(self.path.with_suffix(".idx"), json.dumps(self.added).encode())

    def abort(self) -> None:
        for digest in self.added:
            self._known.pop(digest, None)
        if self._file is not None:
            self._file.close()
            self.path.unlink(missing_ok=True)

    def _open(self) -> BinaryIO:
        if self._file is None:
            self._file = open(self.path, "wb")
        return self._file

    def _record(self, digest: str, offset: int, size: int) -> None:
        self.added[digest] = [offset, size]
        self._known[digest] = _Location(self.name, offset, size)


class Snapshots:
    """Captures the workspace and puts it back exactly."""

    def __init__(self, workspace: Workspace, snapshot_dir: Path) -> None:
        self.workspace = workspace
        self.dir = snapshot_dir
        self._packs_dir = snapshot_dir / "packs"
        self._snaps_dir = snapshot_dir / "snaps"
        self._cache_file = snapshot_dir / "statcache.json"
        self._lock = asyncio.Lock()
        self._loading = asyncio.Lock()
        self._infos: dict[str, SnapshotInfo] | None = None
        self._hashes: dict[str, frozenset[str]] = {}
        self._objects: dict[str, _Location] = {}
        self._packs: dict[str, dict[str, list[int]]] = {}
        self._cache: dict[str, list[Any]] = {}
        self._excluded = {BOOKKEEPING_DIR}
        inside = _relative_inside(self.workspace.root, snapshot_dir)
        if inside is not None:
            self._excluded.add(inside)

    async def start(self) -> None:
        await self._index()

    async def close(self) -> None:
        # Waits for a snapshot or restore in progress; the threads cannot be interrupted.
        async with self._lock:
            pass

    async def list(self) -> list[SnapshotInfo]:
        infos = await self._index()
        return sorted(infos.values(), key=lambda info: info.created_at)

    async def get(self, ref: str) -> SnapshotInfo:
        """A snapshot by id or alias."""
        infos = await self._index()
        if ref in infos:
            return infos[ref]
        for info in infos.values():
            if info.alias == ref:
                return info
        raise NotFound(f"no snapshot with id or alias {ref!r}", details={"id": ref})

    async def create(self, alias: str | None = None) -> SnapshotInfo:
        _check_alias(alias)
        async with self._lock:
            infos = await self._index()
            if alias is not None and any(
                alias in (info.alias, info.id) for info in infos.values()
            ):
                raise Conflict(f"alias {alias!r} is already taken", details={"alias": alias})
            info = await asyncio.to_thread(self._create, secrets.token_hex(6), alias)
            infos[info.id] = info
        log.info("snapshot.created", id=info.id, alias=alias, files=info.files, bytes=info.bytes)
        return info

    async def restore(self, ref: str) -> SnapshotInfo:
        """Make the workspace exactly what the snapshot holds."""
        async with self._lock:
            info = await self.get(ref)
            changed = await asyncio.to_thread(self._restore, info.id)
        log.info("snapshot.restored", id=info.id, alias=info.alias, changed=changed)
        return info

    async def delete(self, ref: str) -> SnapshotInfo:
        """Forget the snapshot and the contents no other snapshot uses."""
        async with self._lock:
            info = await self.get(ref)
            freed = await asyncio.to_thread(self._delete, info.id)
            (await self._index()).pop(info.id, None)
        log.info("snapshot.deleted", id=info.id, alias=info.alias, contents_freed=freed)
        return info

    # -- loading ------------------------------------------------------------------------------

    async def _index(self) -> dict[str, SnapshotInfo]:
        """The snapshots by id, loaded from disk on first use."""
        async with self._loading:
            if self._infos is None:
                self._infos = await asyncio.to_thread(self._load)
        return self._infos

    def _load(self) -> dict[str, SnapshotInfo]:
        for folder in (self._packs_dir, self._snaps_dir):
            folder.mkdir(parents=True, exist_ok=True)

        infos: dict[str, SnapshotInfo] = {}
        for entry in os.scandir(self._snaps_dir):
            info_file = Path(entry.path) / "info.json"
            if info_file.exists():
                info = SnapshotInfo.model_validate_json(info_file.read_bytes())
                infos[info.id] = info
            else:
                # A snapshot interrupted before its info was written never existed.
                shutil.rmtree(entry.path, ignore_errors=True)

        for entry in os.scandir(self._packs_dir):
            name, _, suffix = entry.name.partition(".")
            if suffix == "idx":
                self._adopt(name, json.loads(Path(entry.path).read_bytes()))
            elif suffix != "pack" or not os.path.exists(entry.path[:-4] + "idx"):
                # Left by an interrupted snapshot or repack: never indexed, never read.
                os.unlink(entry.path)

        try:
            self._cache = json.loads(self._cache_file.read_bytes())
        except (FileNotFoundError, ValueError):
            self._cache = {}
        return infos

    def _adopt(self, pack: str, index: dict[str, list[int]]) -> None:
        self._packs[pack] = index
        for digest, (offset, size) in index.items():
            self._objects[digest] = _Location(pack, offset, size)

    def _manifest(self, snap_id: str) -> list[Row]:
        data = json.loads((self._snaps_dir / snap_id / "manifest.json").read_bytes())
        rows: list[Row] = data["entries"]
        self._hashes[snap_id] = frozenset(row[5] for row in rows if row[1] == "f")
        return rows

    # -- creating -----------------------------------------------------------------------------

    def _create(self, snap_id: str, alias: str | None) -> SnapshotInfo:
        start_ns = time.time_ns()
        root = str(self.workspace.root)
        seen = _walk(root, self._excluded, make_writable=False)

        rows: list[Row | None] = []
        pending: list[int] = []
        trusted: list[tuple[_Seen, str]] = []
        for item in seen:
            st = item.st
            ref = ""
            if item.kind == "f":
                cached = self._cache.get(item.path)
                if cached and cached[:4] == _stat_key(st) and cached[4] in self._objects:
                    ref = cached[4]
                    trusted.append((item, ref))
                else:
                    pending.append(len(rows))
            elif item.kind == "l":
                ref = os.readlink(os.path.join(root, item.path))
            rows.append([item.path, item.kind, stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                         st.st_size if item.kind == "f" else 0, ref])

        fresh: list[tuple[_Seen, str]] = []
        writer = _PackWriter(self._packs_dir, self._objects)
        try:
            store = functools.partial(self._store, writer)
            with ThreadPoolExecutor(WORKERS) as pool:
                paths = (os.path.join(root, seen[index].path) for index in pending)
                for index, stored in zip(pending, pool.map(store, paths)):
                    row = rows[index]
                    assert row is not None
                    if stored is None:
                        rows[index] = None
                        continue
                    digest, size, st = stored
                    row[3], row[4], row[5] = st.st_mtime_ns, size, digest
                    fresh.append((_Seen(row[0], "f", st), digest))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        if writer.added:
            self._packs[writer.name] = writer.added

        kept = [row for row in rows if row is not None]
        info = SnapshotInfo(
            id=snap_id, alias=alias, created_at=time.time(),
            files=sum(1 for row in kept if row[1] != "d"), bytes=sum(row[4] for row in kept),
        )
        folder = self._snaps_dir / snap_id
        folder.mkdir()
        _write_atomic(folder / "manifest.json",
                      json.dumps({"version": MANIFEST_VERSION, "entries": kept}).encode())
        _write_atomic(folder / "info.json", info.model_dump_json().encode())
        self._hashes[snap_id] = frozenset(row[5] for row in kept if row[1] == "f")

        self._save_cache(fresh, trusted, start_ns)
        return info

    def _store(self, writer: _PackWriter, path: str) -> tuple[str, int, os.stat_result] | None:
        """Store a file's content; its digest, size and the stat it was read under."""
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise Conflict("cannot read a workspace file", details={"path": path}) from exc
        with handle:
            st = os.fstat(handle.fileno())
            if st.st_size > WHOLE_READ_LIMIT:
                return (*writer.add_stream(handle), st)
            data = handle.read()
        digest = hashlib.sha256(data).hexdigest()
        writer.add(digest, data)
        return digest, len(data), st

    def _save_cache(
        self, fresh: list[tuple[_Seen, str]], trusted: list[tuple[_Seen, str]], start_ns: int
    ) -> None:
        """Remember the stats that will show any later change to their file.

        A write sets the modification time to now, so a stat whose time was settled well
        before the operation began will differ after one. A file just read needs a settled
        change time too, against writes that set an old time (`cp -p`). Trusted are stats
        the cache already vouched for and those of files the restore wrote itself, whose
        own write is their last change.
        """
        limit = start_ns - RACY_NS
        self._cache = {
            item.path: [*_stat_key(item.st), digest]
            for item, digest in fresh
            if item.st.st_mtime_ns < limit and item.st.st_ctime_ns < limit
        }
        self._cache.update(
            (item.path, [*_stat_key(item.st), digest])
            for item, digest in trusted
            if item.st.st_mtime_ns < limit
        )
        _write_atomic(self._cache_file, json.dumps(self._cache).encode())

    # -- restoring ----------------------------------------------------------------------------

    def _restore(self, snap_id: str) -> int:
        start_ns = time.time_ns()
        root = str(self.workspace.root)
        rows = self._manifest(snap_id)
        wanted = {row[0]: row for row in rows}

        # Away with what the snapshot does not have, or has as another kind of entry.
        present: dict[str, os.stat_result] = {}
        removed: set[str] = set()
        for item in _walk(root, self._excluded, make_writable=True):
            if item.path.rpartition("/")[0] in removed:
                removed.add(item.path)
                continue
            row = wanted.get(item.path)
            if row is None or row[1] != item.kind:
                _remove(os.path.join(root, item.path), item.kind)
                removed.add(item.path)
            else:
                present[item.path] = item.st

        # Folders, links and fifos in order, parents first; files whose stat does not vouch
        # for their content are left to the threads.
        trusted: list[tuple[_Seen, str]] = []
        jobs: list[tuple[Row, os.stat_result | None]] = []
        for row in rows:
            path, kind, mode, mtime_ns, size, ref = row
            st = present.get(path)
            target = os.path.join(root, path)
            if kind == "d":
                if st is None:
                    os.mkdir(target, 0o700)
            elif kind == "l":
                if st is None or os.readlink(target) != ref:
                    _symlink_atomic(ref, target)
            elif kind == "p":
                if st is None:
                    os.mkfifo(target)
                os.chmod(target, mode)
            elif st is not None and self._vouched(path, st, row):
                trusted.append((_Seen(path, kind, st), ref))
            else:
                jobs.append((row, st))

        packs = {self._objects[row[5]].pack for row, _ in jobs}
        fds = {pack: os.open(self._packs_dir / f"{pack}.pack", os.O_RDONLY) for pack in packs}
        try:
            restore = functools.partial(self._restore_file, root, fds)
            with ThreadPoolExecutor(WORKERS) as pool:
                outcomes = list(pool.map(lambda job: restore(*job), jobs))
        finally:
            for fd in fds.values():
                os.close(fd)

        # Folder modes and times last, deepest first: filling a folder changes its time, and
        # a read-only mode would have kept us from filling it.
        for row in reversed(rows):
            if row[1] == "d":
                target = os.path.join(root, row[0])
                os.chmod(target, row[2])
                os.utime(target, ns=(row[3], row[3]))

        fresh = []
        for item, digest, changed in outcomes:
            (trusted if changed else fresh).append((item, digest))
        self._save_cache(fresh, trusted, start_ns)
        return sum(1 for *_, changed in outcomes if changed)

    def _vouched(self, path: str, st: os.stat_result, row: Row) -> bool:
        """Whether the cache shows the file as the row wants it, mode and time included."""
        cached = self._cache.get(path)
        return (
            cached is not None and cached[:4] == _stat_key(st) and cached[4] == row[5]
            and stat.S_IMODE(st.st_mode) == row[2] and st.st_mtime_ns == row[3]
        )

    def _restore_file(
        self, root: str, fds: dict[str, int], row: Row, st: os.stat_result | None
    ) -> tuple[_Seen, str, bool]:
        """Make one file right; its stat now, and whether it had to be changed."""
        path, _, mode, mtime_ns, size, digest = row
        target = os.path.join(root, path)
        if st is not None and st.st_size == size and _content_is(target, digest):
            if stat.S_IMODE(st.st_mode) == mode and st.st_mtime_ns == mtime_ns:
                return _Seen(path, "f", st), digest, False
            os.chmod(target, mode)
            os.utime(target, ns=(st.st_atime_ns, mtime_ns))
            return _Seen(path, "f", os.lstat(target)), digest, True

        # A file that is there is replaced by renaming a full copy over it, so that nobody
        # sees it half written; a missing one is written in place, which saves the rename.
        # TODO: hard links between workspace files come back as separate copies.
        location = self._objects[digest]
        pack_fd = fds[location.pack]
        if st is None:
            try:
                _write_copy(pack_fd, location, target, mode, mtime_ns)
                return _Seen(path, "f", os.lstat(target)), digest, True
            except FileExistsError:
                pass  # created meanwhile: replaced below like any file that was there
        tmp = _temporary_beside(target)
        _write_copy(pack_fd, location, tmp, mode, mtime_ns)
        os.replace(tmp, target)
        return _Seen(path, "f", os.lstat(target)), digest, True

    # -- deleting -----------------------------------------------------------------------------

    def _delete(self, snap_id: str) -> int:
        folder = self._snaps_dir / snap_id
        # The info goes first: without it the snapshot no longer exists, even after a crash.
        (folder / "info.json").unlink()
        shutil.rmtree(folder)
        self._hashes.pop(snap_id, None)

        assert self._infos is not None
        used: set[str] = set()
        for other in self._infos:
            if other != snap_id:
                hashes = self._hashes.get(other)
                if hashes is None:
                    self._manifest(other)
                    hashes = self._hashes[other]
                used |= hashes
        freed = 0
        for pack, index in list(self._packs.items()):
            live = {digest: where for digest, where in index.items() if digest in used}
            if len(live) < len(index):
                freed += len(index) - len(live)
                self._repack(pack, live)
        return freed

    def _repack(self, pack: str, live: dict[str, list[int]]) -> None:
        """Replace a pack by one holding only the live contents (or by nothing)."""
        old = self._packs.pop(pack)
        for digest in old:
            if digest not in live and self._objects.get(digest, (None,))[0] == pack:
                del self._objects[digest]
        if live:
            writer = _PackWriter(self._packs_dir, {})
            with open(self._packs_dir / f"{pack}.pack", "rb") as source:
                for digest, (offset, size) in live.items():
                    source.seek(offset)
                    writer.add(digest, source.read(size))
            writer.finish()
            self._adopt(writer.name, writer.added)
        (self._packs_dir / f"{pack}.idx").unlink()
        (self._packs_dir / f"{pack}.pack").unlink()


def _walk(root: str, excluded: set[str], *, make_writable: bool) -> list[_Seen]:
    """Every entry under root, parents before their children; sockets and devices skipped.

    With make_writable, folders the owner may not enter or change are opened up first; a
    restore sets every folder's mode afterwards anyway.
    """
    seen: list[_Seen] = []
    stack: list[tuple[str, str]] = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            entries = os.scandir(abs_dir)
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            raise Conflict(
                "cannot read a workspace folder", details={"path": rel_dir or "."}
            ) from exc
        folders = []
        with entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if rel in excluded:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                kind = _kind(st.st_mode)
                if kind is None:
                    continue
                if kind == "d" and make_writable and st.st_mode & 0o700 != 0o700:
                    os.chmod(entry.path, stat.S_IMODE(st.st_mode) | 0o700)
                seen.append(_Seen(rel, kind, st))
                if kind == "d":
                    folders.append((rel, entry.path))
        stack.extend(reversed(folders))
    return seen


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISFIFO(mode):
        return "p"
    # TODO: sockets and devices are skipped: a socket cannot be restored and devices have no
    # place in a workspace.
    return None


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _content_is(path: str, digest: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest() == digest
    except PermissionError:
        return False


def _write_copy(pack_fd: int, where: _Location, path: str, mode: int, mtime_ns: int) -> None:
    """Create `path` with the content at `where`, then its mode and modification time."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        offset, left = where.offset, where.size
        while left > 0:
            sent = os.sendfile(fd, pack_fd, offset, left)
            if sent == 0:
                raise OSError(f"pack {where.pack} ends early")
            offset, left = offset + sent, left - sent
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _remove(path: str, kind: str) -> None:
    if kind == "d":
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _temporary_beside(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".peermesh-restore-{secrets.token_hex(8)}")


def _symlink_atomic(target: str, path: str) -> None:
    tmp = _temporary_beside(path)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _relative_inside(root: Path, path: Path) -> str | None:
    """`path` relative to `root` when it lies inside it."""
    resolved = path.resolve()
    if resolved == root or root not in resolved.parents:
        return None
    return resolved.relative_to(root).as_posix()


def _check_alias(alias: str | None) -> None:
    if alias is None:
        return
    if not alias.strip() or "/" in alias or any(ord(ch) < 32 for ch in alias):
        message = "must not be blank or hold '/' or control characters"
        raise BadRequest(
            f"invalid request: alias: {message}",
            details={"errors": [{"field": "alias", "message": message}]},
        )


def add_routes(app: web.Application, node: Node) -> None:
    snapshots = node.snapshots

    async def create(request: web.Request) -> web.Response:
        body = await read_model(request, SnapshotCreate)
        return json_response(await snapshots.create(body.alias), status=201)

    async def list_all(request: web.Request) -> web.Response:
        return json_response(await snapshots.list())

    async def get_one(request: web.Request) -> web.Response:
        return json_response(await snapshots.get(request.match_info["id"]))

    async def restore(request: web.Request) -> web.Response:
        return json_response(await snapshots.restore(request.match_info["id"]))

    async def delete(request: web.Request) -> web.Response:
        return json_response(await snapshots.delete(request.match_info["id"]))

    app.router.add_post("/api/v1/snapshots", create)
    app.router.add_get("/api/v1/snapshots", list_all)
    app.router.add_get("/api/v1/snapshots/{id}", get_one)
    app.router.add_delete("/api/v1/snapshots/{id}", delete)
    app.router.add_post("/api/v1/snapshots/{id}/restore", restore)


class SnapshotRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="Snapshot id or alias.")


def register_tools(node: Node) -> None:
    snapshots = node.snapshots

    async def snapshot_create(ctx: ToolContext, args: SnapshotCreate) -> SnapshotInfo:
        return await snapshots.create(args.alias)

    async def snapshot_restore(ctx: ToolContext, args: SnapshotRef) -> SnapshotInfo:
        return await snapshots.restore(args.id)

    node.tools.add(Tool(
        "snapshot_create",
        "Capture the whole workspace (contents, modes, links, empty folders) so that it can "
        "be restored exactly later; give an alias to name it.",
        SnapshotCreate, snapshot_create, writes=True,
    ))
    node.tools.add(Tool(
        "snapshot_restore",
        "Put the workspace back exactly as a snapshot (id or alias) captured it: files added "
        "since are removed, changed and deleted ones come back.",
        SnapshotRef, snapshot_restore, writes=True,
    ))
