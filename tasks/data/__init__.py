"""Datasets as Parquet shards: prepare them from bundled real images, an ImageFolder tree or a VTAB-1k
folder; read their info and fingerprint; load a split into tensors or stream it through Ray Data."""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable

import pyarrow.fs as pafs

from vitpipe.cluster.fs import arrow_filesystem
from vitpipe.tasks.data.bundled import digits, faces, photos, textures
from vitpipe.tasks.data.importers import imagefolder, vtab1k
from vitpipe.tasks.data.loading import load_split, ray_dataset
from vitpipe.tasks.data.shards import (
    SPLITS,
    DataError,
    DatasetInfo,
    SourceData,
    fingerprint,
    read_info,
    shard_paths,
    write_shards,
)

__all__ = ["IMPORTERS", "SOURCES", "SPLITS", "DataError", "DatasetInfo", "SourceData", "fingerprint",
           "load_split", "prepare", "ray_dataset", "read_info", "resolve_source", "source_digest"]

SOURCES: dict[str, Callable[[int], SourceData]] = {
    "photos": photos,
    "digits": digits,
    "faces": faces,
    "textures": textures,
}
# Parameterised sources, named "<kind>:<path or s3:// URI>".
IMPORTERS: dict[str, Callable[[str, int], SourceData]] = {
    "imagefolder": imagefolder,
    "vtab1k": vtab1k,
}


def resolve_source(source: str) -> Callable[[int], SourceData]:
    """The seed -> SourceData function for a source name such as "digits" or "vtab1k:/data/cifar"."""
    if source in SOURCES:
        return SOURCES[source]
    kind, sep, location = source.partition(":")
    if sep and kind in IMPORTERS:
        if not location:
            raise DataError(f"data source {source!r}: needs a path, e.g. {kind}:/data/my_images")
        return functools.partial(IMPORTERS[kind], location)
    known = [*SOURCES, *(f"{kind}:PATH" for kind in IMPORTERS)]
    raise DataError(f"unknown data source {source!r}; known: {', '.join(known)}")


def source_digest(source: str) -> str | None:
    """A cheap digest of a user folder's listing (relative names, sizes, modification times; local or s3://),
    so that edited, added or removed files change the data stage's key; None for the bundled sources, whose
    content is fixed by the installed packages. A missing folder, or an ImageFolder with fewer than two
    classes, is a DataError here, when the pipeline is planned."""
    resolve_source(source)
    kind, _, location = source.partition(":")
    if kind not in IMPORTERS:
        return None
    fs, path = arrow_filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise DataError(f"data source {source}: {location} is not a directory")
    files = sorted((f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                    if f.type == pafs.FileType.File), key=lambda f: f.path)
    relative = [f.path[len(path):].lstrip("/") for f in files]
    if kind == "imagefolder":
        parts = [name.split("/") for name in relative if "/" in name]
        classes = {p[1] if p[0] in SPLITS and len(p) > 2 else p[0] for p in parts}
        if len(classes) < 2:
            raise DataError(f"data source {source}: a classifier needs at least two class folders, "
                            f"found {len(classes)} ({', '.join(sorted(classes)) or 'none'})")
    h = hashlib.sha256()
    for name, f in zip(relative, files, strict=True):
        h.update(f"{name}:{f.size}:{f.mtime_ns}\n".encode())
    return h.hexdigest()


def prepare(source: str, out_uri: str, seed: int = 0, rows_per_shard: int = 2048) -> DatasetInfo:
    """Write `source` as shards under `out_uri`, replacing any shards already there.

    New shards are written into a hidden folder first, so a failing source leaves the old ones intact.
    """
    if rows_per_shard < 1:
        raise DataError(f"rows_per_shard must be positive, got {rows_per_shard}")
    data = resolve_source(source)(seed)
    labeled = bool(data.classes)
    for split in SPLITS if labeled else ("train",):
        if data.counts.get(split, 0) == 0:
            raise DataError(f"source {source}: split {split!r} would be empty ({data.counts})")
    fs, path = arrow_filesystem(out_uri)
    staging = f"{path}/.prepare-{uuid.uuid4().hex}"
    fs.create_dir(staging, recursive=True)
    try:
        names = write_shards(fs, staging, source, data, rows_per_shard)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            for old in _existing_shards(fs, path, out_uri):
                fs.delete_file(old)
        for name in names:
            fs.move(f"{staging}/{name}", f"{path}/{name}")
    finally:
        fs.delete_dir(staging)
    return read_info(out_uri)


def _existing_shards(fs: pafs.FileSystem, path: str, uri: str) -> list[str]:
    try:
        return shard_paths(fs, path, uri)
    except DataError:  # nothing there yet
        return []
