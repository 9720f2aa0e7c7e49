"""Importers for a user's images: an ImageFolder tree or a VTAB-1k folder (local path or s3:// URI)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from vitpipe.cluster.fs import arrow_filesystem
from vitpipe.tasks.data.loading import decode_error
from vitpipe.tasks.data.shards import SPLITS, DataError, Record, SourceData, encode_png
from vitpipe.tasks.data.splits import stratified_splits

# every suffix of a format PIL can open (PNG, JPEG, BMP, GIF, TIFF, WebP, ...); non-PNG/JPEG files are stored as PNG
IMAGE_SUFFIXES = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))
log = logging.getLogger("vitpipe.data")
VTAB_VAL_ROWS = 200

Entry = tuple[str, int, str, str]  # (image path in fs, label, split, where-for-messages)


def verified_bytes(fs: pafs.FileSystem, path: str, where: str) -> bytes:
    """The file's bytes, verbatim if PNG/JPEG, else re-encoded as PNG; it must decode fully."""
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except OSError as err:
        raise DataError(f"{where}: cannot read image ({err})") from err
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format in ("PNG", "JPEG"):
                return data
            return encode_png(np.asarray(img.convert("RGB")))
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise decode_error(where, data, err) from None


def _read_entries(fs: pafs.FileSystem, entries: list[Entry]) -> Iterator[Record]:
    for path, label, split, where in entries:
        yield verified_bytes(fs, path, where), label, split


def _source_data(fs: pafs.FileSystem, classes: tuple[str, ...], entries: list[Entry],
                 provenance: dict) -> SourceData:
    counts = {split: sum(e[2] == split for e in entries) for split in SPLITS}
    return SourceData(classes, counts, _read_entries(fs, entries), {**provenance, "counts": counts})


def _subdirs(fs: pafs.FileSystem, path: str) -> list[str]:
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(e.base_name for e in entries
                  if e.type == pafs.FileType.Directory and not e.base_name.startswith("."))


def _class_files(fs: pafs.FileSystem, path: str, skipped: list[str]) -> dict[str, list[str]]:
    """{class folder name: sorted image paths directly inside it}; files of no image format PIL opens (and
    not hidden) are appended to `skipped`."""
    found = {}
    for name in _subdirs(fs, path):
        entries = fs.get_file_info(pafs.FileSelector(f"{path}/{name}", recursive=False))
        files = [e for e in entries if e.type == pafs.FileType.File and not e.base_name.startswith(".")]
        found[name] = sorted(e.path for e in files if e.base_name.lower().endswith(IMAGE_SUFFIXES))
        skipped += sorted(e.path for e in files if not e.base_name.lower().endswith(IMAGE_SUFFIXES))
    return found


def imagefolder(root: str, seed: int) -> SourceData:
    """ROOT/<class>/*.{png,jpg,jpeg}, classes sorted by name; ROOT/{train,val,test}/<class>/... when
    those folders exist, else a seeded stratified 60/20/20 split."""
    fs, path = arrow_filesystem(root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise DataError(f"imagefolder {root}: not a directory")
    top = _subdirs(fs, path)
    split_layout = any(split in top for split in SPLITS)
    skipped: list[str] = []
    if split_layout:
        missing = [split for split in SPLITS if split not in top]
        if missing:
            raise DataError(f"imagefolder {root}: has split folders but no {', '.join(missing)}/")
        per_split = {split: _class_files(fs, f"{path}/{split}", skipped) for split in SPLITS}
    else:
        per_split = {"all": _class_files(fs, path, skipped)}
    classes = tuple(sorted({name for files in per_split.values() for name in files}))
    if not classes:
        raise DataError(f"imagefolder {root}: no class folders")
    for cls in classes:
        if not any(files.get(cls) for files in per_split.values()):
            raise DataError(f"imagefolder {root}: class folder {cls!r} has no images (of a format PIL opens)")
    labeled = [(file, classes.index(cls), split) for split, files in per_split.items()
               for cls in classes for file in files.get(cls, [])]
    if not split_layout:
        order = stratified_splits(np.array([label for _, label, _ in labeled]), np.random.default_rng(seed))
        labeled = [(labeled[i][0], labeled[i][1], split) for split in SPLITS for i in order[split]]
    entries = [(file, label, split, file) for file, label, split in labeled]
    layout = "train/val/test folders" if split_layout else "seeded stratified 60/20/20"
    if skipped:
        log.warning("imagefolder %s: skipped %d files that are no image PIL opens: %s", root, len(skipped),
                    ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else ""))
    return _source_data(fs, classes, entries, {"path": root, "layout": layout, "seed": seed,
                                               "skipped": {"count": len(skipped), "first": skipped[:10]}})


def _read_list(fs: pafs.FileSystem, path: str) -> list[tuple[str, int, str]]:
    """VTAB list file lines `relative/path.jpg LABEL` -> (relative path, label, "<file> line <n>")."""
    with fs.open_input_stream(path) as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            raise DataError(f"{where}: expected '<image path> <label>', got {line!r}")
        rows.append((parts[0].strip(), int(parts[1]), where))
    return rows


def _vtab_lists(fs: pafs.FileSystem, path: str, root: str) -> dict[str, list[tuple[str, int, str]]]:
    def exists(name: str) -> bool:
        return fs.get_file_info(f"{path}/{name}").type == pafs.FileType.File

    if not exists("test.txt"):
        raise DataError(f"vtab1k {root}: no test.txt")
    lists = {"test": _read_list(fs, f"{path}/test.txt")}
    if exists("train800.txt") and exists("val200.txt"):
        lists["train"] = _read_list(fs, f"{path}/train800.txt")
        lists["val"] = _read_list(fs, f"{path}/val200.txt")
    elif exists("train800val200.txt"):
        both = _read_list(fs, f"{path}/train800val200.txt")
        if len(both) <= VTAB_VAL_ROWS:
            raise DataError(f"{path}/train800val200.txt: {len(both)} lines, need more than {VTAB_VAL_ROWS}")
        lists["train"], lists["val"] = both[:-VTAB_VAL_ROWS], both[-VTAB_VAL_ROWS:]
    else:
        raise DataError(f"vtab1k {root}: needs train800.txt + val200.txt, or train800val200.txt")
    for split, rows in lists.items():
        if not rows:
            raise DataError(f"vtab1k {root}: split {split!r} list is empty")
    return lists


def vtab1k(root: str, seed: int) -> SourceData:
    """A VTAB-1k task folder: train800.txt / val200.txt (or train800val200.txt, last 200 lines = val)
    and test.txt list images relative to ROOT; classes are "0".."K-1"."""
    fs, path = arrow_filesystem(root)
    lists = _vtab_lists(fs, path, root)
    num_classes = 1 + max(label for rows in lists.values() for _, label, _ in rows)
    entries = [(f"{path}/{rel}", label, split, f"{where} ({rel})")
               for split in SPLITS for rel, label, where in lists[split]]
    return _source_data(fs, tuple(str(k) for k in range(num_classes)), entries,
                        {"path": root, "layout": "vtab-1k lists", "seed": seed})
