"""Fetch a real public Python project's source release, and wheels for the checks, with pip.

    python examples/fetch_project.py                      # more-itertools 10.5.0 into work/
    python examples/fetch_project.py attrs==24.2.0 --into /tmp/attrs

The sdist is unpacked into the target folder, and the wheels of the check tools (pytest,
ruff, mypy) go into its `wheelhouse/`, so the nodes install them with no network at all.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DEFAULT_PROJECT = "more-itertools==10.5.0"
CHECK_TOOLS = ["pytest", "ruff", "mypy"]
IMAGE_PYTHON = "3.11"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                   check=True)


def fetch(requirement: str, into: Path) -> Path:
    """Download and unpack the sdist; return the project's folder."""
    with tempfile.TemporaryDirectory() as scratch:
        pip("download", "--quiet", "--no-deps", "--no-binary", ":all:", "--dest", scratch,
            requirement)
        archive = next(Path(scratch).glob("*.tar.gz"))
        name = archive.name.removesuffix(".tar.gz")
        target = into / name
        if target.exists():
            print(f"{target} is already there")
            return target
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as bundle:
            bundle.extractall(into, filter="data")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requirement", nargs="?", default=DEFAULT_PROJECT)
    parser.add_argument("--into", type=Path, default=Path(__file__).parent.parent / "work")
    args = parser.parse_args()

    project = fetch(args.requirement, args.into)
    wheelhouse = project / "wheelhouse"
    # Wheels for the node image's Python (3.11) and for this one, which local nodes use.
    for version in sorted({IMAGE_PYTHON, f"{sys.version_info[0]}.{sys.version_info[1]}"}):
        pip("download", "--quiet", "--only-binary", ":all:", "--python-version", version,
            "--dest", str(wheelhouse), *CHECK_TOOLS)
    print(f"project: {project}")
    print(f"wheels:  {wheelhouse} ({len(list(wheelhouse.glob('*.whl')))} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
