"""Reading prepared datasets: a whole split into tensors (small task datasets), or a Ray Data stream
of decoded batches (the large pre-training corpus)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from vitpipe.cluster.fs import arrow_filesystem
from vitpipe.tasks.data.shards import DataError, base_name, dataset_meta, shard_paths

if TYPE_CHECKING:
    import ray.data
    import torch


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image -> (3, S, S) uint8 RGB: the shorter side resized bilinearly to S (PIL antialiases when
    shrinking), then the centre S x S, as timm's eval transform does (crop_pct 1): no stretching."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    if rgb.size != (image_size, image_size):
        w, h = rgb.size
        scale = image_size / min(w, h)
        size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
        left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        rgb = rgb.resize(size, Image.Resampling.BILINEAR).crop((left, top, left + image_size, top + image_size))
    return np.asarray(rgb).transpose(2, 0, 1).copy()


def _decode_or_raise(data: bytes, image_size: int, where: str) -> np.ndarray:
    try:
        return decode_image(data, image_size)
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise decode_error(where, data, err) from None


def decode_error(where: str, data: bytes, err: Exception) -> DataError:
    """The one-line error for bytes PIL cannot decode (its UnidentifiedImageError shows a BytesIO repr)."""
    if isinstance(err, UnidentifiedImageError):
        return DataError(f"{where}: cannot decode image (not an image format PIL recognises; {len(data)} bytes, "
                         f"starting {data[:8]!r})")
    return DataError(f"{where}: cannot decode image ({type(err).__name__}: {err})")


def check_label(label: int, num_classes: int, where: str) -> None:
    """Labeled datasets need 0 <= label < num_classes; unlabeled ones (no classes) need -1."""
    if num_classes == 0 and label != -1:
        raise DataError(f"{where}: label {label} in an unlabeled dataset (expected -1)")
    if num_classes > 0 and not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} outside [0, {num_classes})")


def _split_rows(fs: pafs.FileSystem, paths: list[str], split: str) -> Iterator[tuple[str, bytes, int]]:
    """(where = "<shard> row <i>", image bytes, label) of one split, in shard-name then row order."""
    for path in paths:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            offset = 0
            for group in range(pf.num_row_groups):
                splits = pf.read_row_group(group, columns=["split"]).column("split").to_pylist()
                if split in splits:
                    table = pf.read_row_group(group, columns=["image", "label"])
                    images, labels = table.column("image"), table.column("label").to_pylist()
                    for i, value in enumerate(splits):
                        if value == split:
                            yield f"{base_name(path)} row {offset + i}", images[i].as_py(), labels[i]
                offset += len(splits)


def load_split(uri: str, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of `split`: images (N, 3, S, S) uint8 and labels (N,) int64 (-1 when unlabeled).

    Errors name the shard and its 0-based row; an empty split names the dataset.
    """
    import torch  # imported here so Ray Data workers that only decode skip its start-up cost

    if image_size < 1:
        raise DataError(f"dataset {uri}: image_size must be positive, got {image_size}")
    fs, path = arrow_filesystem(uri)
    paths = shard_paths(fs, path, uri)
    num_classes = len(dataset_meta(fs, paths).classes)
    rows = list(_split_rows(fs, paths, split))
    if not rows:
        raise DataError(f"dataset {uri}: split {split!r} is empty")
    for where, _, label in rows:
        check_label(label, num_classes, where)
    # PIL releases the GIL while decoding and resizing, so threads help.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda row: _decode_or_raise(row[1], image_size, row[0]), rows))
    labels = torch.tensor([label for _, _, label in rows], dtype=torch.int64)
    return torch.from_numpy(np.stack(images)), labels


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int, num_classes: int, split: str | None
) -> dict[str, np.ndarray]:
    """Ray Data batch of shard rows -> {"image": (B, 3, S, S) uint8, "label": (B,) int64}."""
    keep = np.ones(len(batch["label"]), bool) if split is None else batch["split"] == split
    images, labels = [], []
    rows = zip(batch["image"][keep], batch["label"][keep], batch["path"][keep], strict=True)
    for data, label, path in rows:
        where = base_name(str(path))
        check_label(int(label), num_classes, where)
        images.append(_decode_or_raise(data, image_size, where))
        labels.append(int(label))
    stacked = np.stack(images) if images else np.empty((0, 3, image_size, image_size), np.uint8)
    return {"image": stacked, "label": np.asarray(labels, np.int64)}


def ray_dataset(uri: str, image_size: int, split: str | None = None) -> ray.data.Dataset:
    """A lazy Ray Data stream of decoded batches over the shards (all rows, or one split's).

    Bad rows raise DataError naming the shard file (Ray Data does not expose row numbers); it reaches
    the consumer wrapped in Ray's RayTaskError, message kept.
    """
    import ray.data  # heavy; only the streaming path needs it

    fs, path = arrow_filesystem(uri)
    paths = shard_paths(fs, path, uri)
    num_classes = len(dataset_meta(fs, paths).classes)
    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True, partitioning=None)
    return ds.map_batches(
        decode_batch,
        batch_format="numpy",
        fn_kwargs={"image_size": image_size, "num_classes": num_classes, "split": split},
    )
