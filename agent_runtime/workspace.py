"""Confine every path a client names to the node's workspace."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from mesh.errors import BadRequest, Forbidden, NotFound

__all__ = ["Workspace"]


class Workspace:
    """Resolves client paths inside one root; anything that would leave it is Forbidden."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def resolve(self, raw: str, *, must_exist: bool = False, follow: bool = True) -> Path:
        """Map a workspace-relative path to a real path inside the root.

        `raw` is taken literally: the router has already decoded the URL once, so a name such
        as `%41.txt` names that very file. Refuses absolute paths, `..` segments, and symlinks
        whose target resolves outside. With follow=False a final symlink is not followed: the
        path names the link itself, for callers that stat, delete or rename it; only its
        folder must resolve inside.
        """
        if "\x00" in raw:
            raise BadRequest("path contains a NUL byte", details={"path": raw})

        pure = PurePosixPath(raw)
        if pure.is_absolute() or raw.startswith("~"):
            raise Forbidden("absolute paths are not allowed", details={"path": raw})
        if any(part == ".." for part in pure.parts):
            raise Forbidden("path leaves the workspace", details={"path": raw})

        candidate = self.root.joinpath(*pure.parts) if pure.parts else self.root
        if not follow and candidate != self.root:
            # The link itself lies inside when its folder does, wherever it points.
            folder = Path(os.path.realpath(candidate.parent))
            self._check_inside(folder, raw)
            path = folder / candidate.name
        else:
            path = Path(os.path.realpath(candidate))
            self._check_inside(path, raw)
        if must_exist and not os.path.lexists(path):
            raise NotFound("no such file or folder", details={"path": raw})
        return path

    def _check_inside(self, real: Path, raw: str) -> None:
        if real != self.root and self.root not in real.parents:
            raise Forbidden("path resolves outside the workspace", details={"path": raw})

    def relative(self, path: Path) -> str:
        rel = path.relative_to(self.root).as_posix()
        return "" if rel == "." else rel
