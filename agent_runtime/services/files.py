"""Files: read, write, list, move and delete workspace files, over HTTP and as tools.

    GET    /api/v1/files/{path}  a file's bytes (one Range: 206, or 416) or a folder's listing
    PUT    /api/v1/files/{path}  write the streamed body atomically -> FileInfo (201 or 200)
    DELETE /api/v1/files/{path}  a file, a link, or a folder with ?recursive=1 -> 204
    GET    /api/v1/stat/{path}   FileInfo of the path itself (a final symlink is not followed)
    POST   /api/v1/mkdir/{path}  a folder and its parents -> FileInfo (201 or 200)
    POST   /api/v1/move          MoveRequest -> FileInfo of dst

Every path is workspace-relative and confined by Workspace.resolve (403 for anything that would
leave the workspace, a symlink pointing outside included). A folder listing is a FileListing,
{"entries": [FileInfo], "truncated": bool}, rather than a bare list, so that a recursive listing
cut at LISTING_CAP entries says so. Paths in answers are real workspace-relative paths: something
reached through a symlink inside the workspace is reported where it lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import re
import shutil
import stat
import tempfile
from email.utils import formatdate
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Callable, Iterator, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ToolError,
    Unavailable,
)
from mesh.models import FileInfo, FileListing, MoveRequest

from ..http import json_response, read_model
from ..tools import Tool, ToolContext
from ..workspace import Workspace

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["Files", "RangeNotSatisfiable", "add_routes", "register_tools"]

log = structlog.get_logger("agent_runtime.files")

T = TypeVar("T")

LISTING_CAP = 10_000
TOOL_LISTING_CAP = 1_000
TEXT_CAP = 256 * 1024
EDIT_CAP = 8 * 1024 * 1024
SEARCH_FILE_CAP = 16 * 1024 * 1024
SEARCH_LINE_CHARS = 300
WRITE_CHUNK = 1024 * 1024
READ_CHUNK = 1024 * 1024
SNIFF_BYTES = 8192
DEFAULT_MODE = 0o644


class RangeNotSatisfiable(ApiError):
    """416: the Range asked for lies outside the file, or is not one byte range."""

    status = 416
    code = "range_not_satisfiable"


# -- blocking helpers (run in threads) --------------------------------------------------------


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking `fn` in a thread; when cancelled, let it finish first, as it may use an fd."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _file_info(rel: str, st: os.stat_result) -> FileInfo:
    return FileInfo(
        path=rel,
        type=_kind(st.st_mode),  # type: ignore[arg-type]
        size=st.st_size,
        mode=f"{stat.S_IMODE(st.st_mode):04o}",
        mtime=st.st_mtime,
    )


def _api_error(exc: OSError, details: dict[str, Any]) -> ApiError | None:
    if isinstance(exc, FileNotFoundError):
        return NotFound("no such file or folder", details=details)
    if isinstance(exc, PermissionError):
        return Forbidden("permission denied", details=details)
    if exc.errno == errno.ENOTEMPTY:
        return Conflict("folder is not empty", details=details)
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return Conflict("a file is in the way", details=details)
    if isinstance(exc, IsADirectoryError):
        return Conflict("a folder is in the way", details=details)
    if exc.errno == errno.EXDEV:
        return Conflict("source and destination are on different filesystems", details=details)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Unavailable("no space left on the node's disk", details=details)
    return None


@contextlib.contextmanager
def _os_errors(**details: Any) -> Iterator[None]:
    """Turn a filesystem refusal into the API error it means, naming the path."""
    try:
        yield
    except ApiError:
        # Forbidden is also a PermissionError; it is already what we mean.
        raise
    except OSError as exc:
        error = _api_error(exc, details)
        if error is None:
            raise
        raise error from exc


def _open_readable(path: Path) -> tuple[int, os.stat_result]:
    """An fd on a regular file or folder; O_NONBLOCK so that a FIFO cannot hang the open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return fd, st
    os.close(fd)
    raise Conflict("not a regular file or folder")


def _sorted_entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _walk(
    folder: Path, *, recursive: bool, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[Path, os.stat_result]]:
    """Entries under `folder` in name order, depth first; symlinks are never followed."""
    stack = [iter(_sorted_entries(folder))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            # Removed while we were listing.
            continue
        path = Path(entry.path)
        yield path, st
        if recursive and stat.S_ISDIR(st.st_mode) and entry.name not in skip:
            try:
                stack.append(iter(_sorted_entries(path)))
            except (PermissionError, FileNotFoundError):
                continue


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable, not just the renamed file's bytes."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _AtomicFile:
    """A temp file beside `target` that either replaces it whole or vanishes."""

    def __init__(self, target: Path) -> None:
        self.target = target
        if target.is_dir():
            raise Conflict("a folder is in the way")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name[:200]}.", suffix=".part"
        )
        self.tmp = Path(name)
        self.file = os.fdopen(fd, "wb")

    def write(self, data: bytes | bytearray) -> None:
        self.file.write(data)

    def commit(self, mode: int | None) -> bool:
        """Put the bytes in place; True when the target did not exist before."""
        self.file.flush()
        os.fsync(self.file.fileno())
        try:
            previous: int | None = stat.S_IMODE(os.stat(self.target).st_mode)
        except FileNotFoundError:
            previous = None

        # A replaced file keeps its permissions unless the caller names new ones.
        os.fchmod(self.file.fileno(), mode if mode is not None else previous or DEFAULT_MODE)
        self.file.close()
        os.replace(self.tmp, self.target)
        _fsync_folder(self.target.parent)
        return previous is None

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _delete(path: Path, recursive: bool) -> None:
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
    elif recursive:
        shutil.rmtree(path)
    else:
        try:
            os.rmdir(path)
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            raise Conflict("folder is not empty; pass recursive=1 to delete it all") from exc


def _make_folder(path: Path) -> bool:
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if path.is_dir():
            return False
        raise
    return True


def _move(src: Path, dst: Path, overwrite: bool) -> None:
    if src == dst:
        return
    if dst.is_relative_to(src):
        raise Conflict("cannot move a folder into itself")
    if os.path.lexists(dst) and not overwrite:
        raise Conflict("destination exists; set overwrite to replace it")

    # TODO: without overwrite, a dst created between the check above and the rename is
    # replaced; renameat2(RENAME_NOREPLACE) would close that gap but the stdlib lacks it.
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _read_lines(path: Path, first: int, count: int | None, cap: int) -> str:
    """Lines `first`.. of a text file, at most `count` lines and about `cap` characters."""
    fd, st = _open_readable(path)
    with os.fdopen(fd, "rb") as raw:
        if stat.S_ISDIR(st.st_mode):
            raise ToolError("is a folder; use list_files to see what it holds")
        if b"\0" in raw.read(SNIFF_BYTES):
            raise ToolError(
                f"binary file ({st.st_size} bytes), not shown as text; fetch its bytes with "
                "GET /api/v1/files/<path> and a Range header"
            )
        if first == 1 and count is None and st.st_size > cap:
            raise ToolError(
                f"file is {st.st_size} bytes, over the {cap // 1024} KiB read limit; read a "
                "range of it with offset_line and max_lines"
            )
        raw.seek(0)
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        return _take_lines(text, first, count, cap)


def _take_lines(text: io.TextIOWrapper, first: int, count: int | None, cap: int) -> str:
    taken: list[str] = []
    used = 0
    number = 0
    for number, line in enumerate(text, start=1):
        if number < first:
            continue
        full = count is not None and len(taken) == count
        if full or used + len(line) > cap:
            if not taken:
                # One line longer than the cap: show its head rather than nothing.
                return f"{line[:cap]}\n[line {number} cut at {cap // 1024} KiB]"
            more = f"continue with offset_line={number}"
            return "".join(taken) + f"\n[more lines follow; {more}]"
        taken.append(line)
        used += len(line)
    if number < first and first > 1:
        raise ToolError(f"the file has {number} lines; offset_line {first} is past its end")
    return "".join(taken)


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as handle:
        return b"\0" in handle.read(SNIFF_BYTES)


# -- the service ------------------------------------------------------------------------------


class Files:
    """Workspace file operations, shared by the HTTP routes and the file tools."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    async def start(self) -> None:
        """Nothing to start: every call opens what it needs."""

    async def close(self) -> None:
        """Nothing to close: no call keeps a file open past its own end."""

    def _rel(self, path: Path) -> str:
        return self.workspace.relative(path)

    def stat(self, raw: str) -> FileInfo:
        """FileInfo of the path itself; a final symlink is reported as one, not followed."""
        path = self.workspace.resolve(raw, follow=False)
        with _os_errors(path=raw):
            return _file_info(self._rel(path), os.lstat(path))

    async def open(self, raw: str) -> tuple[int, os.stat_result]:
        """A read-only fd on a file or folder, and its stat; the caller closes the fd."""
        path = self.workspace.resolve(raw, must_exist=True)
        with _os_errors(path=raw):
            return await asyncio.to_thread(_open_readable, path)

    async def listing(
        self,
        raw: str = "",
        *,
        recursive: bool = False,
        pattern: str | None = None,
        limit: int = LISTING_CAP,
    ) -> FileListing:
        """A folder's entries in name order (depth first when recursive), at most `limit`.

        `pattern` is a glob matched from the right of each path below the folder, so `*.py`
        matches at any depth and `src/*.py` only directly under a `src` folder.
        """
        folder = self.workspace.resolve(raw, must_exist=True)
        with _os_errors(path=raw):
            return await asyncio.to_thread(self._listing, folder, recursive, pattern, limit)

    def _listing(
        self, folder: Path, recursive: bool, pattern: str | None, limit: int
    ) -> FileListing:
        if not folder.is_dir():
            raise Conflict("not a folder", details={"path": self._rel(folder)})
        entries: list[FileInfo] = []
        for path, st in _walk(folder, recursive=recursive):
            if pattern and not PurePosixPath(path.relative_to(folder).as_posix()).match(pattern):
                continue
            if len(entries) == limit:
                return FileListing(entries=entries, truncated=True)
            entries.append(_file_info(self._rel(path), st))
        return FileListing(entries=entries)

    async def write(
        self, raw: str, chunks: AsyncIterable[bytes], *, mode: int | None = None
    ) -> tuple[FileInfo, bool]:
        """Stream `chunks` into a file atomically; its FileInfo, and True when it was created.

        The bytes go to a temp file in the same folder, are fsynced, then renamed over the
        target: a reader sees the old file or the new one, never a part, and a failed or
        aborted upload leaves the old file as it was and no temp file behind. Writing to a
        symlink inside the workspace writes its target. A replaced file keeps its mode.
        """
        target = self.workspace.resolve(raw)
        if target == self.workspace.root:
            raise Conflict("the workspace root is a folder", details={"path": raw})
        with _os_errors(path=raw):
            pending = await _in_thread(_AtomicFile, target)
            try:
                size = await self._fill(pending, chunks)
                created = await _in_thread(pending.commit, mode)
            except BaseException:
                pending.discard()
                raise
            info = _file_info(self._rel(target), os.stat(target))
        log.info("files.written", path=info.path, bytes=size, created=created)
        return info, created

    @staticmethod
    async def _fill(pending: _AtomicFile, chunks: AsyncIterable[bytes]) -> int:
        """Copy the stream to the temp file a megabyte at a time, each write off the loop."""
        size = 0
        buffer = bytearray()
        async for chunk in chunks:
            buffer += chunk
            size += len(chunk)
            if len(buffer) >= WRITE_CHUNK:
                full, buffer = buffer, bytearray()
                await _in_thread(pending.write, full)
        if buffer:
            await _in_thread(pending.write, buffer)
        return size

    async def write_bytes(self, raw: str, data: bytes) -> tuple[FileInfo, bool]:
        return await self.write(raw, _once(data))

    async def delete(self, raw: str, *, recursive: bool = False) -> None:
        """Delete a file, a folder (only with `recursive` unless empty), or a symlink itself."""
        path = self.workspace.resolve(raw, follow=False)
        if path == self.workspace.root:
            raise Forbidden("the workspace root cannot be deleted", details={"path": raw})
        with _os_errors(path=raw):
            await asyncio.to_thread(_delete, path, recursive)
        log.info("files.deleted", path=self._rel(path), recursive=recursive)

    async def mkdir(self, raw: str) -> tuple[FileInfo, bool]:
        """Create a folder and its parents; its FileInfo, and True when it was created."""
        path = self.workspace.resolve(raw)
        with _os_errors(path=raw):
            created = await asyncio.to_thread(_make_folder, path)
            return _file_info(self._rel(path), os.stat(path)), created

    async def move(self, src: str, dst: str, *, overwrite: bool = False) -> FileInfo:
        """Rename `src` to `dst` (a symlink moves as itself); FileInfo of the result."""
        source = self.workspace.resolve(src, follow=False, must_exist=True)
        target = self.workspace.resolve(dst, follow=False)
        if source == self.workspace.root:
            raise Forbidden("the workspace root cannot be moved", details={"src": src})
        if target == self.workspace.root:
            raise Conflict("the workspace root cannot be replaced", details={"dst": dst})
        with _os_errors(src=src, dst=dst):
            await asyncio.to_thread(_move, source, target, overwrite)
            info = _file_info(self._rel(target), os.lstat(target))
        log.info("files.moved", src=self._rel(source), dst=info.path)
        return info

    async def read_text(
        self, raw: str, *, offset_line: int = 1, max_lines: int | None = None
    ) -> str:
        """A text file's lines (UTF-8, bad bytes replaced); refuses binary and huge files."""
        path = self.workspace.resolve(raw, must_exist=True)
        with _os_errors(path=raw):
            return await asyncio.to_thread(_read_lines, path, offset_line, max_lines, TEXT_CAP)

    async def edit_text(self, raw: str, old: str, new: str, *, count: int = 1) -> int:
        """Replace exactly `count` occurrences of `old` with `new`; refuses any other number."""
        path = self.workspace.resolve(raw, must_exist=True)
        with _os_errors(path=raw):
            data = await asyncio.to_thread(self._read_for_edit, path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ToolError("not UTF-8 text, so edit_file cannot change it safely") from exc

        found = text.count(old)
        if found == 0:
            raise ToolError(f"text not found in {raw}")
        if found != count:
            raise ToolError(
                f"text found {found} times in {raw}; give more context or set count={found}"
            )
        # TODO: a write by someone else between this read and the write below is lost.
        await self.write_bytes(raw, text.replace(old, new, count).encode("utf-8"))
        return found

    @staticmethod
    def _read_for_edit(path: Path) -> bytes:
        fd, st = _open_readable(path)
        with os.fdopen(fd, "rb") as handle:
            if stat.S_ISDIR(st.st_mode):
                raise ToolError("is a folder, not a file")
            if st.st_size > EDIT_CAP:
                raise ToolError(
                    f"file is {st.st_size} bytes, over the {EDIT_CAP >> 20} MiB edit limit"
                )
            return handle.read()

    async def search(
        self, raw: str, pattern: str, *, glob: str | None = None, max_results: int = 200
    ) -> tuple[list[str], bool, int]:
        """grep: `path:line: text` for each matching line; (hits, cut short, files skipped).

        Skips binary files, files over SEARCH_FILE_CAP and `.git` folders.
        """
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ToolError(f"invalid regular expression {pattern!r}: {exc}") from exc
        top = self.workspace.resolve(raw, must_exist=True)
        with _os_errors(path=raw):
            return await asyncio.to_thread(self._search, top, regex, glob, max_results)

    def _search(
        self, top: Path, regex: re.Pattern[str], glob: str | None, limit: int
    ) -> tuple[list[str], bool, int]:
        if top.is_dir():
            candidates: Iterator[tuple[Path, os.stat_result]] = _walk(
                top, recursive=True, skip=frozenset({".git"})
            )
        else:
            candidates = iter([(top, os.stat(top))])
        hits: list[str] = []
        skipped = 0
        for path, st in candidates:
            if not stat.S_ISREG(st.st_mode):
                continue
            rel = path.name if path == top else path.relative_to(top).as_posix()
            if glob and not PurePosixPath(rel).match(glob):
                continue
            if st.st_size > SEARCH_FILE_CAP:
                skipped += 1
                continue
            try:
                if _is_binary(path):
                    continue
                with open(path, encoding="utf-8", errors="replace", newline="") as text:
                    for number, line in enumerate(text, start=1):
                        if not regex.search(line):
                            continue
                        if len(hits) == limit:
                            return hits, True, skipped
                        shown = line.rstrip("\r\n")[:SEARCH_LINE_CHARS]
                        hits.append(f"{self._rel(path)}:{number}: {shown}")
            except (PermissionError, FileNotFoundError):
                skipped += 1
        return hits, False, skipped


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


# -- HTTP -------------------------------------------------------------------------------------

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)
_MODE = re.compile(r"0?[0-7]{3,4}", re.ASCII)


def _bad_query(field: str, message: str) -> BadRequest:
    return BadRequest(
        f"invalid request: {field}: {message}",
        details={"errors": [{"field": field, "message": message}]},
    )


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "").lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _bad_query(name, "expected 1 or 0")


def _mode(request: web.Request) -> int | None:
    value = request.query.get("mode")
    if value is None:
        return None
    if not _MODE.fullmatch(value):
        raise _bad_query("mode", "expected octal permissions such as 0644")
    return int(value, 8)


def _byte_range(request: web.Request, size: int, validators: set[str]) -> tuple[int, int] | None:
    """The one byte range asked for as (start, end exclusive); None means the whole file.

    A Range in another unit is ignored, as is one whose If-Range names an older version (the
    client then gets the whole new file, not a splice of two versions).
    """
    header = request.headers.get("Range")
    if header is None or not header.strip().lower().startswith("bytes="):
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() not in validators:
        return None

    match = _RANGE.fullmatch(header.strip())
    if (match is None or match.groups() == ("", "")) and "," not in header:
        # Not a byte range at all: RFC 9110 has such a header ignored, not refused.
        return None
    if match is None or match.groups() == ("", ""):
        raise RangeNotSatisfiable(
            "only one byte range such as bytes=0-99, bytes=100- or bytes=-100 is supported",
            details={"range": header, "size": size},
        )
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size
    else:
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
    if start >= end:
        raise RangeNotSatisfiable(
            "range lies outside the file", details={"range": header, "size": size}
        )
    return start, end


async def _send_file(request: web.Request, fd: int, st: os.stat_result) -> web.StreamResponse:
    """Stream `fd` (or the range asked for) a chunk at a time; the whole file is never read."""
    size = st.st_size
    etag = f'"{st.st_mtime_ns:x}-{size:x}"'
    last_modified = formatdate(st.st_mtime, usegmt=True)
    try:
        span = _byte_range(request, size, {etag, last_modified})
    except RangeNotSatisfiable as exc:
        refused = json_response(exc.to_body(), status=exc.status)
        refused.headers["Content-Range"] = f"bytes */{size}"
        return refused

    start, end = span or (0, size)
    response = web.StreamResponse(status=206 if span else 200)
    response.content_type = "application/octet-stream"
    response.content_length = end - start
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["ETag"] = etag
    response.headers["Last-Modified"] = last_modified
    if span:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    await response.prepare(request)

    offset = start
    while request.method != "HEAD" and offset < end:
        chunk = await _in_thread(os.pread, fd, min(READ_CHUNK, end - offset), offset)
        if not chunk:
            # The file shrank while we sent it: close the connection so that the client
            # sees a short body instead of waiting for bytes that will never come.
            request.protocol.force_close()
            break
        await response.write(chunk)
        offset += len(chunk)
    await response.write_eof()
    return response


def add_routes(app: web.Application, node: Node) -> None:
    files = node.files

    async def get_path(request: web.Request) -> web.StreamResponse:
        raw = request.match_info.get("path", "")
        recursive = _flag(request, "recursive")
        fd, st = await files.open(raw)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            return json_response(await files.listing(raw, recursive=recursive))
        try:
            return await _send_file(request, fd, st)
        finally:
            os.close(fd)

    async def put_file(request: web.Request) -> web.Response:
        if request.match_info["path"].endswith("/"):
            raise BadRequest("a path ending in / names a folder; PUT writes a file (make "
                             "folders with POST /api/v1/mkdir/PATH)",
                             details={"path": request.match_info["path"]})
        # request.content is read as it arrives, so client_max_size (which only bounds
        # request.read()) does not cap uploads; the disk does.
        info, created = await files.write(
            request.match_info["path"], request.content.iter_any(), mode=_mode(request)
        )
        return json_response(info, status=201 if created else 200)

    async def delete_path(request: web.Request) -> web.Response:
        recursive = _flag(request, "recursive")
        await files.delete(request.match_info.get("path", ""), recursive=recursive)
        return web.Response(status=204)

    async def stat_path(request: web.Request) -> web.Response:
        return json_response(files.stat(request.match_info["path"]))

    async def make_folder(request: web.Request) -> web.Response:
        info, created = await files.mkdir(request.match_info["path"])
        return json_response(info, status=201 if created else 200)

    async def move(request: web.Request) -> web.Response:
        body = await read_model(request, MoveRequest)
        return json_response(await files.move(body.src, body.dst, overwrite=body.overwrite))

    # `{path:.*}` takes the rest of the URL; aiohttp has decoded `%2F` to `/` by then, and
    # Workspace.resolve refuses the `..` that may leave behind.
    app.router.add_get("/api/v1/files", get_path)
    app.router.add_get("/api/v1/files/{path:.*}", get_path)
    app.router.add_put("/api/v1/files/{path:.*}", put_file)
    app.router.add_delete("/api/v1/files", delete_path)
    app.router.add_delete("/api/v1/files/{path:.*}", delete_path)
    app.router.add_get("/api/v1/stat/{path:.*}", stat_path)
    app.router.add_post("/api/v1/mkdir/{path:.*}", make_folder)
    app.router.add_post("/api/v1/move", move)


# -- tools ------------------------------------------------------------------------------------


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReadFileArgs(_Args):
    path: str = Field(description="Workspace-relative path of a text file.")
    offset_line: int = Field(default=1, ge=1, description="First line to return, from 1.")
    max_lines: int | None = Field(default=None, ge=1, description="Return at most this many.")


class WriteFileArgs(_Args):
    path: str = Field(description="Workspace-relative path; missing folders are created.")
    content: str = Field(description="The whole new content of the file.")


class EditFileArgs(_Args):
    path: str = Field(description="Workspace-relative path of a text file.")
    old: str = Field(min_length=1, description="Exact text to replace, with enough context.")
    new: str = Field(description="Text to put in its place.")
    count: int = Field(default=1, ge=1, description="How many occurrences `old` must have.")


class ListFilesArgs(_Args):
    path: str = Field(default=".", description="Workspace-relative folder.")
    recursive: bool = Field(default=False, description="Include everything below, too.")
    pattern: str | None = Field(default=None, description="Glob such as *.py to filter by.")


class SearchFilesArgs(_Args):
    pattern: str = Field(min_length=1, description="Python regular expression to look for.")
    path: str = Field(default=".", description="Workspace-relative folder or file to search.")
    glob: str | None = Field(default=None, description="Only files matching, e.g. *.py.")
    max_results: int = Field(default=200, ge=1, le=10_000, description="Stop after this many.")


@contextlib.contextmanager
def _as_tool_error(path: str) -> Iterator[None]:
    """A refused path goes back to the model as its own mistake, naming the path."""
    try:
        yield
    except ApiError as exc:
        raise ToolError(f"{path}: {exc.message}") from exc


def _listing_text(listing: FileListing) -> str:
    lines = []
    for entry in listing.entries:
        if entry.type == "dir":
            lines.append(f"{entry.path}/")
        elif entry.type == "file":
            lines.append(f"{entry.path}  ({entry.size} bytes)")
        else:
            lines.append(f"{entry.path}  ({entry.type})")
    if listing.truncated:
        lines.append(
            f"[stopped at {len(listing.entries)} entries; narrow it with path or pattern]"
        )
    return "\n".join(lines) or "(nothing here)"


def register_tools(node: Node) -> None:
    files = node.files

    async def read_file(ctx: ToolContext, args: ReadFileArgs) -> str:
        with _as_tool_error(args.path):
            return await files.read_text(
                args.path, offset_line=args.offset_line, max_lines=args.max_lines
            )

    async def write_file(ctx: ToolContext, args: WriteFileArgs) -> FileInfo:
        with _as_tool_error(args.path):
            info, _ = await files.write_bytes(args.path, args.content.encode("utf-8"))
            return info

    async def edit_file(ctx: ToolContext, args: EditFileArgs) -> str:
        with _as_tool_error(args.path):
            replaced = await files.edit_text(args.path, args.old, args.new, count=args.count)
        return f"replaced {replaced} occurrence{'s' if replaced > 1 else ''} in {args.path}"

    async def list_files(ctx: ToolContext, args: ListFilesArgs) -> str:
        with _as_tool_error(args.path):
            listing = await files.listing(
                args.path,
                recursive=args.recursive,
                pattern=args.pattern,
                limit=TOOL_LISTING_CAP,
            )
        return _listing_text(listing)

    async def search_files(ctx: ToolContext, args: SearchFilesArgs) -> str:
        with _as_tool_error(args.path):
            hits, cut_short, skipped = await files.search(
                args.path, args.pattern, glob=args.glob, max_results=args.max_results
            )
        lines = hits or [f"no line matches {args.pattern!r} under {args.path}"]
        if cut_short:
            lines.append(f"[stopped at {args.max_results} results; narrow pattern, path or glob]")
        if skipped:
            lines.append(f"[{skipped} files skipped: unreadable or over 16 MiB]")
        return "\n".join(lines)

    for tool in (
        Tool(
            "read_file",
            "Read a text file of the workspace, whole (up to 256 KiB) or a range of lines.",
            ReadFileArgs,
            read_file,
        ),
        Tool(
            "write_file",
            "Create or replace a file with the given text, atomically.",
            WriteFileArgs,
            write_file,
            writes=True,
        ),
        Tool(
            "edit_file",
            "Replace an exact piece of text in a file; `old` must occur exactly `count` times.",
            EditFileArgs,
            edit_file,
            writes=True,
        ),
        Tool(
            "list_files",
            "List a folder of the workspace, optionally recursively and filtered by a glob.",
            ListFilesArgs,
            list_files,
        ),
        Tool(
            "search_files",
            "Search file contents for a regular expression; answers path:line: text lines.",
            SearchFilesArgs,
            search_files,
        ),
    ):
        node.tools.add(tool)
