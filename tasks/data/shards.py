"""The on-disk dataset format: Parquet shards with `image`/`label`/`split` columns, class names and
provenance in the schema metadata; writing, listing, metadata, per-split counts and fingerprints."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby, islice

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from vitpipe.cluster.fs import arrow_filesystem

SPLITS = ("train", "val", "test")
CLASSES_KEY = b"vitpipe.classes"
SOURCE_KEY = b"vitpipe.source"
PROVENANCE_KEY = b"vitpipe.provenance"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32()), ("split", pa.string())])
# Rows of one split per row group, so a split reader can skip the others' image bytes.
ROW_GROUP_ROWS = 256

Record = tuple[bytes, int, str]  # (encoded PNG/JPEG bytes, label or -1, split)


class DataError(Exception):
    """Bad or missing data; the message names the dataset/source and, where known, file and row."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a prepared dataset holds: class names (empty when unlabeled), rows per split (train, val and
    test always present, 0 when absent) and the shard fingerprint."""

    uri: str
    source: str
    classes: tuple[str, ...]
    counts: dict[str, int]
    fingerprint: str


@dataclass
class SourceData:
    """A source's output before writing: `records` are streamed, in storage order."""

    classes: tuple[str, ...]
    counts: dict[str, int]
    records: Iterable[Record]
    provenance: dict = field(default_factory=dict)


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes (deterministic: no timestamps in PNG output)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _natural_key(name: str) -> list:
    """shard-2 before shard-10."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def base_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def shard_paths(fs: pafs.FileSystem, path: str, uri: str) -> list[str]:
    """Visible *.parquet files directly under `path` (or `path` itself if it is one), natural order."""
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        return [path]
    if kind == pafs.FileType.NotFound:
        raise DataError(f"dataset {uri}: not found")
    files = [
        entry.path
        for entry in fs.get_file_info(pafs.FileSelector(path, recursive=False))
        if entry.type == pafs.FileType.File
        and entry.base_name.endswith(".parquet")
        and not entry.base_name.startswith((".", "_"))
    ]
    if not files:
        raise DataError(f"dataset {uri}: no Parquet shards")
    return sorted(files, key=lambda p: _natural_key(base_name(p)))


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def _row_groups(shard: list[Record]) -> Iterator[pa.Table]:
    """Tables of at most ROW_GROUP_ROWS rows, never mixing splits."""
    for _, same_split in groupby(shard, key=lambda rec: rec[2]):
        for chunk in _chunks(same_split, ROW_GROUP_ROWS):
            images, labels, splits = zip(*chunk, strict=True)
            yield pa.table(
                [pa.array(images, pa.binary()), pa.array(labels, pa.int32()), pa.array(splits, pa.string())],
                schema=SCHEMA,
            )


def write_shards(
    fs: pafs.FileSystem, directory: str, source: str, data: SourceData, rows_per_shard: int
) -> list[str]:
    """Write `data.records` as shard-0.parquet, shard-1.parquet, ... under `directory`; returns names."""
    schema = SCHEMA.with_metadata({
        CLASSES_KEY: json.dumps(list(data.classes)).encode(),
        SOURCE_KEY: source.encode(),
        PROVENANCE_KEY: json.dumps(data.provenance, sort_keys=True).encode(),
    })
    names: list[str] = []
    written = dict.fromkeys(SPLITS, 0)
    for shard in _chunks(data.records, rows_per_shard):
        names.append(f"shard-{len(names)}.parquet")
        with pq.ParquetWriter(f"{directory}/{names[-1]}", schema, filesystem=fs) as writer:
            for table in _row_groups(shard):
                writer.write_table(table.replace_schema_metadata(schema.metadata))
        for _, _, split in shard:
            written[split] = written.get(split, 0) + 1
    if not names:
        raise DataError(f"source {source}: produced no images")
    expected = dict.fromkeys(SPLITS, 0) | data.counts
    if written != expected:
        raise DataError(f"source {source}: wrote {written} rows per split, announced {expected}")
    return names


@dataclass(frozen=True)
class ShardMeta:
    source: str
    classes: tuple[str, ...]


def shard_meta(pf: pq.ParquetFile, name: str) -> ShardMeta:
    """Check a shard's columns and read its class list / source from the schema metadata."""
    schema = pf.schema_arrow
    for col in SCHEMA:
        if col.name not in schema.names:
            raise DataError(f"{name}: missing column {col.name!r}")
    meta = schema.metadata or {}
    if CLASSES_KEY not in meta:
        raise DataError(f"{name}: schema metadata has no {CLASSES_KEY.decode()!r}")
    try:
        classes = json.loads(meta[CLASSES_KEY])
    except ValueError as err:
        raise DataError(f"{name}: {CLASSES_KEY.decode()} is not JSON ({err})") from err
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{name}: {CLASSES_KEY.decode()} must be a JSON list of strings")
    return ShardMeta(source=meta.get(SOURCE_KEY, b"").decode(), classes=tuple(classes))


def _read_meta(fs: pafs.FileSystem, path: str) -> ShardMeta:
    with fs.open_input_file(path) as f:
        return shard_meta(pq.ParquetFile(f), base_name(path))


def dataset_meta(fs: pafs.FileSystem, paths: list[str]) -> ShardMeta:
    """The metadata every shard agrees on; shards from different datasets are an error."""
    first = _read_meta(fs, paths[0])
    for path in paths[1:]:
        meta = _read_meta(fs, path)
        if meta != first:
            raise DataError(f"{base_name(path)}: metadata {meta} differs from {base_name(paths[0])}: {first}")
    return first


def _split_counts(pf: pq.ParquetFile, name: str) -> dict[str, int]:
    splits = pf.read(columns=["split"]).column("split")
    counts = {entry["values"].as_py(): entry["counts"].as_py() for entry in splits.value_counts()}
    for value in counts:
        if value not in SPLITS:
            row = splits.to_pylist().index(value)
            raise DataError(f"{name} row {row}: split {value!r} is not one of {', '.join(SPLITS)}")
    return counts


def fingerprint(uri: str) -> str:
    """sha256 hex of the canonical JSON of the sorted [shard file name, sha256 of its bytes] list."""
    fs, path = arrow_filesystem(uri)
    digests = []
    for shard in shard_paths(fs, path, uri):
        digest = hashlib.sha256()
        with fs.open_input_stream(shard) as f:
            while block := f.read(1 << 20):
                digest.update(block)
        digests.append([base_name(shard), digest.hexdigest()])
    return hashlib.sha256(json.dumps(sorted(digests), separators=(",", ":")).encode()).hexdigest()


def read_info(uri: str) -> DatasetInfo:
    """Class names and source from the shards' schema metadata, rows per split, fingerprint."""
    fs, path = arrow_filesystem(uri)
    paths = shard_paths(fs, path, uri)
    meta = dataset_meta(fs, paths)
    counts = dict.fromkeys(SPLITS, 0)
    for shard in paths:
        with fs.open_input_file(shard) as f:
            for split, n in _split_counts(pq.ParquetFile(f), base_name(shard)).items():
                counts[split] += n
    return DatasetInfo(uri=uri, source=meta.source, classes=meta.classes, counts=counts,
                       fingerprint=fingerprint(uri))
