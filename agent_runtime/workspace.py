"""Confine every path a client names to the node's workspace."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from mesh.errors import BadRequest, Forbidden, NotFound

__all__ = ["Workspace"]


class Workspace:
    """Resolves client paths inside one root; anything that would leave it is Forbidden."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def resolve(self, raw: str, *, must_exist: bool = False, follow: bool = True) -> Path:
        """Map a workspace-relative path to a real path inside the root.

        Refuses absolute paths, `..` segments (also percent-encoded ones, which a proxy or a
        client may have decoded only once), and symlinks whose target resolves outside.
        With follow=False a final symlink is not followed: the path names the link itself, for
        callers that delete or rename it (its folder must still resolve inside).
        """
        if "\x00" in raw:
            raise BadRequest("path contains a NUL byte", details={"path": raw})

        # A path that still holds percent escapes after the router decoded it once is
        # decoded again, so that `..%2f` cannot smuggle a traversal past the checks below.
        decoded = raw
        for _ in range(3):
            once = unquote(decoded)
            if once == decoded:
                break
            decoded = once

        pure = PurePosixPath(decoded)
        if pure.is_absolute() or decoded.startswith("~"):
            raise Forbidden("absolute paths are not allowed", details={"path": raw})
        if any(part == ".." for part in pure.parts):
            raise Forbidden("path leaves the workspace", details={"path": raw})

        candidate = self.root.joinpath(*pure.parts) if pure.parts else self.root
        real = Path(os.path.realpath(candidate))
        if real != self.root and self.root not in real.parents:
            raise Forbidden("path resolves outside the workspace", details={"path": raw})
        if must_exist and not os.path.lexists(candidate):
            raise NotFound("no such file or folder", details={"path": raw})
        if not follow and candidate != self.root:
            folder = Path(os.path.realpath(candidate.parent))
            if folder != self.root and self.root not in folder.parents:
                raise Forbidden("path resolves outside the workspace", details={"path": raw})
            return folder / candidate.name
        return real

    def relative(self, path: Path) -> str:
        rel = path.relative_to(self.root).as_posix()
        return "" if rel == "." else rel
