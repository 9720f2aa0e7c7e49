"""The batched augmentations: each image's transform equals torchvision's per-image one with the same draws."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from vitpipe.tasks.augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    colour_distort,
    contrastive_view,
    crop_boxes,
    grayscale,
    mim_view,
    random_resized_crop,
)


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("ours", "theirs", "factors"), [
    (adjust_brightness, TF.adjust_brightness, [0.2, 0.7, 1.0, 1.3, 1.8]),
    (adjust_contrast, TF.adjust_contrast, [0.2, 0.7, 1.0, 1.3, 1.8]),
    (adjust_saturation, TF.adjust_saturation, [0.2, 0.7, 1.0, 1.3, 1.8]),
    (adjust_hue, TF.adjust_hue, [-0.2, -0.05, 0.0, 0.1, 0.2]),
])
def test_colour_adjustments_equal_torchvisions_per_image(ours, theirs, factors: list[float]) -> None:
    images = _images(len(factors))
    batched = ours(images, torch.tensor(factors))
    for image, factor, got in zip(images, factors, batched, strict=True):
        assert torch.allclose(got, theirs(image, factor), atol=1e-5), factor


def test_grayscale_is_torchvisions() -> None:
    images = _images()
    assert torch.allclose(grayscale(images), TF.rgb_to_grayscale(images), atol=1e-6)


def test_crop_boxes_fit_the_image_with_the_asked_area_and_aspect() -> None:
    boxes = crop_boxes(4000, 32, 32, torch.Generator().manual_seed(0), scale=(0.2, 1.0))
    left, top, right, bottom = boxes.unbind(dim=1)
    width, height = right - left, bottom - top
    assert (left >= 0).all() and (top >= 0).all() and (right <= 32).all() and (bottom <= 32).all()
    assert (width >= 1).all() and (height >= 1).all() and torch.equal(boxes, boxes.round())
    area = width * height / 32**2
    assert 0.18 <= area.min() and area.max() <= 1.0  # 0.2-1 before rounding to whole pixels
    assert 0.5 < area.mean() < 0.7  # uniform on [0.2, 1]: 0.6, a little less where tall or wide draws fall back
    assert ((width == 32) & (height == 32)).float().mean() < 0.2


def test_a_crop_is_the_resized_box() -> None:
    """A box of whole pixels resized back to the image size: bilinear, as TF.resized_crop away from the edges."""
    images = _images(3)
    gen = torch.Generator().manual_seed(1)
    boxes = crop_boxes(3, 32, 32, torch.Generator().manual_seed(1))
    crops = random_resized_crop(images, gen)
    for image, (left, top, right, bottom), crop in zip(images, boxes.int().tolist(), crops, strict=True):
        expected = TF.resized_crop(image, top, left, bottom - top, right - left, [32, 32], antialias=False)
        assert torch.allclose(crop[:, 2:-2, 2:-2], expected[:, 2:-2, 2:-2], atol=1e-5)


def test_the_full_box_is_the_image() -> None:
    images = _images(2)
    crops = random_resized_crop(images, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(crops, images, atol=1e-6)


def test_views_are_normalised_reproducible_and_differ_per_image() -> None:
    images = (_images(64) * 255).to(torch.uint8)
    for view in (mim_view, contrastive_view):
        a = view(images, torch.Generator().manual_seed(3))
        assert a.shape == (64, 3, 32, 32) and a.dtype == torch.float32
        assert -1.0 - 1e-6 <= a.min() and a.max() <= 1.0 + 1e-6
        assert torch.equal(a, view(images, torch.Generator().manual_seed(3)))
        assert not torch.equal(a, view(images, torch.Generator().manual_seed(4)))
    same = images[:1].expand(64, -1, -1, -1)
    views = contrastive_view(same, torch.Generator().manual_seed(0))
    assert len({v.sum().item() for v in views}) == 64  # every image its own draws


def test_colour_distortion_rates() -> None:
    """Jitter with p = 0.8, grayscale with p = 0.2: count the images left unchanged and the grey ones."""
    images = _images(4000, seed=2)
    out = colour_distort(images, torch.Generator().manual_seed(0))
    unchanged = (out == images).flatten(1).all(dim=1).float().mean()
    grey = (out[:, 0] == out[:, 1]).flatten(1).all(dim=1) & (out[:, 1] == out[:, 2]).flatten(1).all(dim=1)
    assert 0.14 <= float(unchanged) <= 0.18  # no jitter and no grayscale: 0.2 * 0.8
    assert 0.18 <= float(grey.float().mean()) <= 0.22
