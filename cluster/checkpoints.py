"""Digests for Ray Train checkpoints, so that only a checkpoint exactly as it was written is restored.

Every rank writes its files into its own directory, records their sha256 in `digests.rank<R>.json`
(written last), and reports the directory; Ray Train copies all ranks' files into one checkpoint
folder. A checkpoint is intact when the digest files of all ranks are there, every file they list
matches, and no file is unlisted. Verification reads bytes only: it runs before DeepSpeed unpickles
anything, so a truncated, partly written (disk full) or planted checkpoint is never loaded.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, ValidationError

from vitpipe.cluster.fs import arrow_filesystem
from vitpipe.cluster.manifest import FileEntry
from vitpipe.cluster.retry import DEFAULT_RETRY, RetryPolicy

log = logging.getLogger("vitpipe.train")

DIGESTS = re.compile(r"digests\.rank(\d+)\.json")


class CheckpointError(Exception):
    """A training checkpoint that must not be used: missing, incomplete or altered since it was written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> dict[str, Path]:
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}


class RankDigests(BaseModel):
    """`digests.rank<R>.json`: the files one rank wrote into a checkpoint, recorded when it wrote them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int
    world_size: int
    files: dict[str, FileEntry]


def write_digests(directory: str, rank: int, world_size: int) -> None:
    """Record size and sha256 of every file in `directory` (this rank's part of a checkpoint), last."""
    files = {name: FileEntry(size=p.stat().st_size, sha256=_sha256(p)) for name, p in _files(Path(directory)).items()}
    record = RankDigests(rank=rank, world_size=world_size, files=files)
    Path(directory, f"digests.rank{rank}.json").write_text(record.model_dump_json(indent=1))


def _read_digests(present: dict[str, Path]) -> dict[int, RankDigests]:
    """{rank: digests} of all ranks; raises CheckpointError naming a missing or unreadable digest file."""
    records = {}
    for name, path in present.items():
        if match := DIGESTS.fullmatch(name):
            try:
                records[int(match[1])] = RankDigests.model_validate_json(path.read_bytes())
            except (OSError, ValidationError):
                raise CheckpointError(f"{name}: unreadable") from None
    if not records:
        raise CheckpointError("no digests.rank<R>.json (incomplete, or written without digests)")
    worlds = {r.world_size for r in records.values()}
    ranks = set(range(max(worlds)))
    if missing := sorted(ranks - set(records)):
        raise CheckpointError(f"digests.rank{missing[0]}.json: missing")
    if len(worlds) > 1 or set(records) != ranks or any(r.rank != rank for rank, r in records.items()):
        raise CheckpointError(f"digest files disagree on the ranks: {sorted(records)} of {sorted(worlds)}")
    return records


def _check_file(name: str, path: Path | None, entry: FileEntry) -> None:
    if path is None:
        raise CheckpointError(f"{name}: missing")
    if path.stat().st_size != entry.size:
        raise CheckpointError(f"{name}: {path.stat().st_size} bytes, {entry.size} when written")
    if _sha256(path) != entry.sha256:
        raise CheckpointError(f"{name}: sha256 differs from the one recorded when it was written")


def verify_checkpoint(directory: str) -> None:
    """Raise CheckpointError naming the first file that makes this checkpoint unusable."""
    present = _files(Path(directory))
    listed = {name for name in present if DIGESTS.fullmatch(name)}
    for record in _read_digests(present).values():
        for name, entry in record.files.items():
            _check_file(name, present.get(name), entry)
            listed.add(name)
    unlisted = sorted(set(present) - listed)
    if unlisted:
        raise CheckpointError(f"{unlisted[0]}: not listed in any digests.rank<R>.json")


def discard_train_run(storage_path: str, name: str, retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Delete the Ray Train run folder `<storage_path>/<name>/` (local or S3), so that a later run of the
    same name trains from scratch. Best effort: the stage's output is already committed, so a failure is
    one warning, and what stays behind is still verified before any use."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a Ray Train run name: {name!r}")
    fs, root = arrow_filesystem(storage_path, retry)
    run = f"{root}/{name}"
    try:
        if fs.get_file_info(run).type != pafs.FileType.NotFound:
            fs.delete_dir(run)
    except OSError as err:
        log.warning("Ray Train run %s/%s was not removed: %s", storage_path.rstrip("/"), name, err)
