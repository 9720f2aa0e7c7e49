"""Datasets built from real images that ship inside scikit-image and scikit-learn (no download)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from vitpipe.tasks.data.shards import SPLITS, Record, SourceData, encode_png
from vitpipe.tasks.data.splits import stratified_splits

# scikit-image photos stored in its wheel (the others are fetched with pooch on first use).
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field",
                  "immunohistochemistry", "moon", "retina", "rocket")
PHOTO_CROPS = 1536
CROP_SIZE = 64
MIN_CROP_STD = 2.5  # grey levels; the black border of retina is ~0.8, low-contrast moon crops ~2-6
TEXTURES = ("brick", "grass", "gravel")
TEXTURE_CROPS = {"train": 90, "val": 30, "test": 30}  # per class


def labeled_arrays(
    pixels: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], seed: int, provenance: dict
) -> SourceData:
    """(N, H, W[, 3]) uint8 images with labels -> SourceData with stratified seeded splits."""
    order = stratified_splits(labels, np.random.default_rng(seed))
    records = [(encode_png(pixels[i]), int(labels[i]), split) for split in SPLITS for i in order[split]]
    counts = {split: len(idx) for split, idx in order.items()}
    return SourceData(classes, counts, records, {**provenance, "seed": seed, "counts": counts})


def _photo_arrays() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images  # slow import; see digits()

    photos = {f"skimage:{name}": getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    photos["skimage:motorcycle_left"] = skimage.data.stereo_motorcycle()[0]
    sample = load_sample_images()
    for filename, img in zip(sample.filenames, sample.images, strict=True):
        photos[f"sklearn:{Path(filename).name}"] = img
    return photos


def _random_crop(img: np.ndarray, side: int, out: int, rng: np.random.Generator) -> np.ndarray:
    y = int(rng.integers(0, img.shape[0] - side + 1))
    x = int(rng.integers(0, img.shape[1] - side + 1))
    crop = Image.fromarray(img[y:y + side, x:x + side])
    return np.asarray(crop.resize((out, out), Image.Resampling.BILINEAR) if side != out else crop)


def photos(seed: int) -> SourceData:
    """Unlabeled pre-training corpus: random multi-scale 64x64 crops of the bundled photos; flat crops
    (the black border around retina) are redrawn."""
    rng = np.random.default_rng(seed)
    arrays = _photo_arrays()
    names = sorted(arrays)
    records: list[Record] = []
    while len(records) < PHOTO_CROPS:
        img = arrays[names[int(rng.integers(len(names)))]]
        side = int(rng.integers(CROP_SIZE, min(2 * CROP_SIZE, *img.shape[:2]) + 1))
        crop = _random_crop(img, side, CROP_SIZE, rng)
        if crop.std() >= MIN_CROP_STD:
            records.append((encode_png(crop), -1, "train"))
    counts = {"train": PHOTO_CROPS}
    provenance = {"images": names, "crop": CROP_SIZE, "crop_sides": [CROP_SIZE, 2 * CROP_SIZE],
                  "min_crop_std": MIN_CROP_STD, "seed": seed, "counts": counts}
    return SourceData((), counts, records, provenance)


def digits(seed: int) -> SourceData:
    """sklearn's 1797 handwritten 8x8 digits (0..16 grey levels -> 0..255), classes "0".."9"."""
    # Imported here: sklearn takes seconds to import, and every Ray Data worker imports this package.
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.round(data.images * (255 / 16)).astype(np.uint8)
    classes = tuple(str(d) for d in range(10))
    return labeled_arrays(pixels, data.target, classes, seed, {"images": "sklearn.datasets.load_digits"})


def faces(seed: int) -> SourceData:
    """scikit-image's lfw_subset: 25x25 crops, the first 100 faces and the last 100 non-faces."""
    pixels = np.round(skimage.data.lfw_subset() * 255).astype(np.uint8)
    labels = np.array([1] * 100 + [0] * 100)
    return labeled_arrays(pixels, labels, ("non_face", "face"), seed,
                          {"images": "skimage.data.lfw_subset"})


def textures(seed: int) -> SourceData:
    """64x64 crops of brick / grass / gravel. Each split crops its own band of rows (top 60% train,
    next 20% val, last 20% test), so no pixel is shared between splits."""
    rng = np.random.default_rng(seed)
    bands = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
    records: list[Record] = []
    for split in SPLITS:
        items = []
        for label, name in enumerate(TEXTURES):
            img = getattr(skimage.data, name)()
            top, bottom = (round(f * img.shape[0]) for f in bands[split])
            band = img[top:bottom]
            items += [(encode_png(_random_crop(band, CROP_SIZE, CROP_SIZE, rng)), label, split)
                      for _ in range(TEXTURE_CROPS[split])]
        records += [items[i] for i in rng.permutation(len(items))]
    counts = {split: n * len(TEXTURES) for split, n in TEXTURE_CROPS.items()}
    provenance = {"images": [f"skimage:{name}" for name in TEXTURES], "crop": CROP_SIZE,
                  "split_bands": bands, "seed": seed, "counts": counts}
    return SourceData(TEXTURES, counts, records, provenance)


def write_imagefolder(data: SourceData, root: str | Path, per_class: int | None = None) -> dict[str, int]:
    """Write a labeled source as an ImageFolder of JPEGs (ROOT/<class>/<split>-<n>.jpg), e.g. to try the
    "your own data" walk-through on real images; at most `per_class` images per class. Returns the counts."""
    root = Path(root)
    written = dict.fromkeys(data.classes, 0)
    for encoded, label, split in data.records:
        cls = data.classes[label]
        if per_class is not None and written[cls] >= per_class:
            continue
        (root / cls).mkdir(parents=True, exist_ok=True)
        image = Image.open(io.BytesIO(encoded)).convert("RGB")
        image.save(root / cls / f"{split}-{written[cls]:04d}.jpg", quality=95)
        written[cls] += 1
    return written
