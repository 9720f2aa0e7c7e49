"""Datasets: bundled sources, importers, fingerprints, validation errors and the Ray Data stream, on
real images (scikit-image, scikit-learn) and real Ray / S3 (moto over HTTP)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import skimage.data
import torch
from PIL import Image
from sklearn.datasets import load_digits

from vitpipe.tasks.data import (
    SOURCES,
    DataError,
    fingerprint,
    load_split,
    prepare,
    ray_dataset,
    read_info,
)

SPLITS = ("train", "val", "test")
COLORS = {"cat": (220, 30, 30), "dog": (30, 220, 30), "emu": (30, 30, 220)}


@pytest.fixture(scope="module")
def digits_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("digits"))
    prepare("digits", uri, seed=0, rows_per_shard=700)
    return uri


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path: Path, images: list[bytes], labels: list[int], classes: list[str]) -> None:
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int32()),
                      "split": pa.array(["train"] * len(images))})
    metadata = {b"vitpipe.classes": json.dumps(classes).encode()}
    # Two rows per row group, so a reader must count rows across groups to name the right one.
    pq.write_table(table.replace_schema_metadata(metadata), path, row_group_size=2)


def _label_lookup(pixels: np.ndarray, labels: np.ndarray) -> dict[bytes, set[int]]:
    lookup: dict[bytes, set[int]] = {}
    for img, label in zip(pixels, labels, strict=True):
        lookup.setdefault(img.tobytes(), set()).add(int(label))
    return lookup


@pytest.mark.parametrize(
    ("source", "classes", "total", "size"),
    [
        ("digits", tuple("0123456789"), 1797, 8),
        ("faces", ("non_face", "face"), 200, 25),
        ("textures", ("brick", "grass", "gravel"), 450, 64),
    ],
)
def test_labeled_source_splits_classes_and_tensors(
    tmp_path: Path, source: str, classes: tuple[str, ...], total: int, size: int
) -> None:
    info = prepare(source, str(tmp_path / source), seed=3, rows_per_shard=128)
    assert info.classes == classes and info.source == source
    assert sum(info.counts.values()) == total
    assert 0.55 * total <= info.counts["train"] <= 0.65 * total
    assert 0.15 * total <= info.counts["val"] <= 0.25 * total and info.counts["test"] == info.counts["val"]
    assert read_info(info.uri) == info
    seen: set[bytes] = set()
    for split in SPLITS:
        images, labels = load_split(info.uri, split, size)
        assert images.shape == (info.counts[split], 3, size, size) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64
        assert set(labels.tolist()) == set(range(len(classes)))  # stratified: every class in every split
        assert torch.equal(images[:, 0], images[:, 2])  # grey sources: RGB channels are equal
        seen |= {img.numpy().tobytes() for img in images}
    assert len(seen) >= 0.98 * total  # splits do not repeat images


@pytest.mark.parametrize(
    ("source", "pixels", "labels"),
    [
        ("faces", lambda: np.round(skimage.data.lfw_subset() * 255).astype(np.uint8),
         lambda: np.array([1] * 100 + [0] * 100)),  # lfw_subset docs: the first 100 are faces
        ("digits", lambda: np.round(load_digits().images * 255 / 16).astype(np.uint8),
         lambda: load_digits().target),
    ],
)
def test_labels_match_the_original_images(tmp_path: Path, source: str, pixels, labels) -> None:
    originals, targets = pixels(), labels()
    lookup = _label_lookup(originals, targets)
    info = prepare(source, str(tmp_path), seed=0)
    for split in SPLITS:
        images, got = load_split(info.uri, split, originals.shape[1])  # native size: no resampling
        for img, label in zip(images, got.tolist(), strict=True):
            assert label in lookup[img[0].numpy().tobytes()]


def test_photos_corpus_is_unlabeled_and_varied(tmp_path: Path) -> None:
    info = prepare("photos", str(tmp_path), seed=0, rows_per_shard=1000)
    assert info.classes == () and info.counts == {"train": 1536, "val": 0, "test": 0}
    assert len(list(tmp_path.glob("shard-*.parquet"))) == 2
    images, labels = load_split(info.uri, "train", 32)
    assert images.shape == (1536, 3, 32, 32) and bool((labels == -1).all())
    assert len({img.numpy().tobytes() for img in images}) == 1536
    grey = (images[:, 0] == images[:, 1]).flatten(1).all(1)
    assert 0 < int(grey.sum()) < 1536  # crops of both grey (camera, moon, ...) and colour photos
    with pytest.raises(DataError, match=r"split 'val' is empty") as err:
        load_split(info.uri, "val", 32)
    assert info.uri in str(err.value)


def test_fingerprint_is_stable_per_seed_and_prepare_replaces_shards(tmp_path: Path) -> None:
    a = prepare("faces", str(tmp_path / "a"), seed=0, rows_per_shard=50)
    b = prepare("faces", str(tmp_path / "b"), seed=0, rows_per_shard=50)
    c = prepare("faces", str(tmp_path / "c"), seed=1, rows_per_shard=50)
    assert a.fingerprint == b.fingerprint == fingerprint(b.uri) and len(a.fingerprint) == 64
    assert c.fingerprint != a.fingerprint
    assert len(list((tmp_path / "a").iterdir())) == 4
    x_a, y_a = load_split(a.uri, "train", 25)
    x_b, y_b = load_split(b.uri, "train", 25)
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)

    replaced = prepare("faces", a.uri, seed=1, rows_per_shard=200)  # 4 shards -> 1, no stale leftovers
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["shard-0.parquet"]
    assert sum(replaced.counts.values()) == 200 and replaced.fingerprint != a.fingerprint

    shard = tmp_path / "b" / "shard-3.parquet"
    shard.write_bytes(shard.read_bytes() + b"\0")
    assert fingerprint(b.uri) != a.fingerprint


def _imagefolder_tree(root: Path, per_class: int) -> dict[bytes, str]:
    """Solid-colour images per class, PNG and JPEG, various sizes; returns {file bytes: class}."""
    written = {}
    for cls, color in COLORS.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (20 + 3 * i, 16 + i), color)
            path = root / cls / (f"{i}.png" if i % 2 else f"{i}.JPG")
            img.save(path, format="PNG" if i % 2 else "JPEG")
            written[path.read_bytes()] = cls
    (root / "cat" / "notes.txt").write_text("not an image")
    return written


def _dominant_class(images: torch.Tensor) -> list[str]:
    names = list(COLORS)
    return [names[int(img.float().mean((1, 2)).argmax())] for img in images]


def test_imagefolder_seeded_split(tmp_path: Path) -> None:
    written = _imagefolder_tree(tmp_path / "tree", per_class=5)
    info = prepare(f"imagefolder:{tmp_path / 'tree'}", str(tmp_path / "out"), seed=0)
    assert info.classes == ("cat", "dog", "emu")
    assert info.counts == {"train": 9, "val": 3, "test": 3}
    stored = pq.read_table(tmp_path / "out").column("image").to_pylist()
    assert set(stored) == set(written)  # PNG/JPEG bytes stored verbatim
    for split in SPLITS:
        images, labels = load_split(info.uri, split, 16)
        assert images.shape == (info.counts[split], 3, 16, 16)
        assert _dominant_class(images) == [info.classes[k] for k in labels.tolist()]


def test_imagefolder_split_folders_and_bad_image(tmp_path: Path) -> None:
    for split, n in zip(SPLITS, (4, 2, 1), strict=True):
        _imagefolder_tree(tmp_path / "tree" / split, per_class=n)
    info = prepare(f"imagefolder:{tmp_path / 'tree'}", str(tmp_path / "out"))
    assert info.counts == {"train": 12, "val": 6, "test": 3}
    images, labels = load_split(info.uri, "val", 8)
    assert _dominant_class(images) == [info.classes[k] for k in labels.tolist()]

    (tmp_path / "tree" / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"dog/broken\.png: cannot decode image"):
        prepare(f"imagefolder:{tmp_path / 'tree'}", str(tmp_path / "out"))
    assert read_info(info.uri) == info  # the failed prepare left the old shards alone

    (tmp_path / "tree" / "test").rename(tmp_path / "tree" / "later")
    with pytest.raises(DataError, match=r"no test/"):
        prepare(f"imagefolder:{tmp_path / 'tree'}", str(tmp_path / "out"))


def test_imagefolder_takes_every_format_pil_opens_and_records_what_it_skipped(tmp_path: Path) -> None:
    _imagefolder_tree(tmp_path / "tree", per_class=4)
    for fmt in ("BMP", "WEBP", "TIFF", "GIF"):
        Image.new("RGB", (20, 20), COLORS["emu"]).save(tmp_path / "tree" / "emu" / f"x.{fmt.lower()}", format=fmt)
    (tmp_path / "tree" / "emu" / "notes.txt").write_text("not an image")
    (tmp_path / "tree" / "emu" / ".DS_Store").write_bytes(b"\0")  # hidden: not worth a word
    info = prepare(f"imagefolder:{tmp_path / 'tree'}", str(tmp_path / "out"), seed=0)
    assert sum(info.counts.values()) == 3 * 4 + 4
    stored = pq.read_table(tmp_path / "out").column("image").to_pylist()
    assert all(Image.open(io.BytesIO(b)).format in ("PNG", "JPEG") for b in stored)  # others stored as PNG
    schema = pq.read_schema(next((tmp_path / "out").glob("*.parquet")))
    skipped = json.loads(schema.metadata[b"vitpipe.provenance"])["skipped"]
    assert [name.split("tree/")[1] for name in skipped["first"]] == ["cat/notes.txt", "emu/notes.txt"]  # no .DS_Store


def test_a_non_square_image_is_centre_cropped_not_stretched() -> None:
    from vitpipe.tasks.data.loading import decode_image

    strip = np.zeros((32, 96, 3), np.uint8)  # red | green | blue thirds, each 32 x 32
    strip[:, :32, 0], strip[:, 32:64, 1], strip[:, 64:, 2] = 200, 200, 200
    for image in (strip, strip.transpose(1, 0, 2).copy()):  # wide, and tall
        out = decode_image(_png(image), 16)
        assert out.shape == (3, 16, 16)
        # only the middle third (bilinear filtering softens its edge columns); stretched, a third would be red
        assert (out[1] >= 150).all() and out[0].max() <= 60 and out[2].max() <= 60, out


def _vtab_tree(root: Path, labels: dict[str, int]) -> None:
    (root / "images").mkdir(parents=True)
    for name, label in labels.items():
        Image.new("RGB", (24, 24), (40 * label, 255 - 40 * label, 7)).save(root / "images" / name)


def test_vtab1k_lists(tmp_path: Path) -> None:
    labels = {f"{i}.jpg": i % 4 for i in range(12)}
    _vtab_tree(tmp_path, labels)
    lines = [f"images/{name} {label}" for name, label in labels.items()]
    (tmp_path / "train800.txt").write_text("\n".join(lines[:6]) + "\n")
    (tmp_path / "val200.txt").write_text("\n".join(lines[6:9]) + "\n\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[9:]))
    info = prepare(f"vtab1k:{tmp_path}", str(tmp_path / "out"))
    assert info.classes == ("0", "1", "2", "3")
    assert info.counts == {"train": 6, "val": 3, "test": 3}
    images, got = load_split(info.uri, "train", 24)
    assert got.tolist() == [label for label in list(labels.values())[:6]]  # list order is kept
    assert [round(img[0].float().mean().item() / 40) for img in images] == got.tolist()

    (tmp_path / "test.txt").write_text(f"{lines[9]}\n{lines[10]}\nimages/11.jpg three\n")
    with pytest.raises(DataError, match=r"test\.txt line 3: expected"):
        prepare(f"vtab1k:{tmp_path}", str(tmp_path / "out"))


def test_vtab1k_combined_list_last_200_are_val(tmp_path: Path) -> None:
    _vtab_tree(tmp_path, {"a.jpg": 0, "b.jpg": 1, "c.jpg": 2})
    rows = [f"images/{'abc'[i % 3]}.jpg {i % 3}" for i in range(210)]
    (tmp_path / "train800val200.txt").write_text("\n".join(rows))
    (tmp_path / "test.txt").write_text("images/a.jpg 0\nimages/missing.jpg 1\n")
    with pytest.raises(DataError, match=r"test\.txt line 2 \(images/missing\.jpg\): cannot read"):
        prepare(f"vtab1k:{tmp_path}", str(tmp_path / "out"))
    (tmp_path / "test.txt").write_text("images/a.jpg 0\nimages/b.jpg 1\n")
    info = prepare(f"vtab1k:{tmp_path}", str(tmp_path / "out"))
    assert info.counts == {"train": 10, "val": 200, "test": 2}
    _, val = load_split(info.uri, "val", 4)
    assert val.tolist() == [i % 3 for i in range(10, 210)]


def test_undecodable_row_and_bad_labels_name_file_and_row(tmp_path: Path) -> None:
    good = _png(np.full((6, 6, 3), 200, np.uint8))
    _write_shard(tmp_path / "shard-0.parquet", [good] * 3, [0, 1, 0], ["a", "b"])
    _write_shard(tmp_path / "shard-1.parquet", [good, good, good, b"garbage"], [1, 1, 0, 1], ["a", "b"])
    with pytest.raises(DataError, match=r"shard-1\.parquet row 3: cannot decode image"):
        load_split(str(tmp_path), "train", 8)

    _write_shard(tmp_path / "shard-1.parquet", [good] * 3, [1, 0, 2], ["a", "b"])
    with pytest.raises(DataError, match=r"shard-1\.parquet row 2: label 2 outside \[0, 2\)"):
        load_split(str(tmp_path), "train", 8)
    _write_shard(tmp_path / "shard-1.parquet", [good] * 3, [1, -1, 0], ["a", "b"])
    with pytest.raises(DataError, match=r"shard-1\.parquet row 1: label -1 outside"):
        load_split(str(tmp_path), "train", 8)

    _write_shard(tmp_path / "shard-1.parquet", [good] * 2, [1, 0], ["a", "b", "c"])
    with pytest.raises(DataError, match=r"shard-1\.parquet: metadata .* differs"):
        read_info(str(tmp_path))

    _write_shard(tmp_path / "shard-1.parquet", [good] * 2, [1, 0], ["a", "b"])
    images, labels = load_split(str(tmp_path), "train", 8)
    assert images.shape == (5, 3, 8, 8) and labels.tolist() == [0, 1, 0, 1, 0]
    assert bool((images == 200).all())


def test_unknown_source_and_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data source 'mnist'") as err:
        prepare("mnist", str(tmp_path))
    assert all(name in str(err.value) for name in [*SOURCES, "imagefolder:PATH", "vtab1k:PATH"])
    with pytest.raises(DataError, match="not found"):
        read_info(str(tmp_path / "nothing"))


def test_s3_round_trip_matches_local(tmp_path: Path, s3_bucket: str) -> None:
    local = prepare("faces", str(tmp_path), seed=0, rows_per_shard=64)
    remote = prepare("faces", f"{s3_bucket}/faces", seed=0, rows_per_shard=64)
    assert remote.fingerprint == local.fingerprint and remote.counts == local.counts
    x_local, y_local = load_split(local.uri, "test", 16)
    x_remote, y_remote = load_split(remote.uri, "test", 16)
    assert torch.equal(x_local, x_remote) and torch.equal(y_local, y_remote)


def _footer_readers() -> int:
    """Ray Data's Parquet footer-reader actors this Ray has started so far (dead ones included)."""
    from ray._private import state

    return sum(a["ActorClassName"] == "FooterReader" for a in state.actors().values())


def test_ray_dataset_streams_decoded_batches(digits_uri: str, ray_local: str, tmp_path: Path) -> None:
    ds = ray_dataset(digits_uri, 16)
    readers = _footer_readers()
    batches = list(ds.iter_batches(batch_size=256, batch_format="numpy"))
    assert _footer_readers() - readers == 1, "a pass read its shards' footers with more than one actor"
    first = batches[0]
    assert first["image"].shape == (256, 3, 16, 16) and first["image"].dtype == np.uint8
    assert first["label"].dtype == np.int64
    labels = np.concatenate([b["label"] for b in batches])
    assert len(labels) == 1797 and Counter(labels.tolist()) == Counter(load_digits().target.tolist())

    val = np.concatenate([b["label"] for b in ray_dataset(digits_uri, 8, split="val").iter_batches()])
    _, expected = load_split(digits_uri, "val", 8)
    assert sorted(val.tolist()) == sorted(expected.tolist())

    good = _png(np.zeros((4, 4), np.uint8))
    _write_shard(tmp_path / "shard-0.parquet", [good, good], [0, 1], ["a", "b"])
    _write_shard(tmp_path / "shard-1.parquet", [good, b"garbage"], [0, 1], ["a", "b"])
    with pytest.raises(ray.exceptions.RayTaskError, match=r"DataError: shard-1\.parquet: cannot decode"):
        list(ray_dataset(str(tmp_path), 8).iter_batches())  # Ray wraps the DataError, keeping its text
