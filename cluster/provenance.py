"""Which code computed a result: the package version, the git commit, a digest of the source that runs, and the
versions of the packages that shape numerics. All of it goes into every stage key (pipelines.dag.stage_keys), so
a cache hit never reuses an output that other code, committed or not, would compute differently."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("cluster", "models", "pipelines", "tasks")  # what a stage's computation imports of vitpipe
# Packages whose versions shape the numbers a stage computes: a cache hit must not reuse their other versions' output.
NUMERIC_PACKAGES = ("torch", "timm", "deepspeed", "numpy")
COMMIT_STAMP = ".vitpipe-commit"  # written by `vitpipe submit` into the source tree it ships without .git


def git_commit(path: str | os.PathLike[str] = ".") -> str | None:
    """The checkout's commit: the stamp that `vitpipe submit` writes into the source tree it ships
    without .git, else `git rev-parse HEAD` of the work tree."""
    stamp = Path(path) / COMMIT_STAMP
    if stamp.is_file():
        return stamp.read_text().strip() or None
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def source_digest(root: Path = PACKAGE_ROOT) -> str:
    """sha256 over the paths and bytes of vitpipe's Python source: an uncommitted edit changes it."""
    h = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


def code_version() -> str:
    """<package version>+<commit>;src=<source digest, 16 hex>;<numeric packages' versions>."""
    pkg = _installed("vitpipe").replace("none", "dev")
    deps = ",".join(f"{name}={_installed(name)}" for name in NUMERIC_PACKAGES)
    return f"{pkg}+{git_commit(PACKAGE_ROOT) or 'nogit'};src={source_digest()[:16]};{deps}"
