"""Random augmentations of a whole batch at once, driven by an explicit torch.Generator (reproducible, resumable).

images: uint8 (B, 3, H, W) in, float in [-1, 1] out. Every image draws its own crop, flip and colour factors, as
with per-image transforms, but each transform is a few batched tensor ops: per-image torchvision calls (64 crops
and 256 colour adjustments for a SimCLR batch of 64) took 43-53 ms a view on 2 CPU threads, in the training
worker or in Ray Data's map tasks.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align

_GREY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, torchvision's rgb_to_grayscale
_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0])[None, :, None, None]


def _uniform(n: int, gen: torch.Generator, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) draws (made on the generator's device, the CPU) -> (B, 1, 1, 1) on the images' device."""
    return values.to(like.device)[:, None, None, None]


def crop_boxes(n: int, h: int, w: int, gen: torch.Generator, scale: tuple[float, float] = (0.2, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop's boxes, (n, 4) pixel edges (left, top, right, bottom): per image the first of `tries`
    draws of area fraction and log-uniform aspect ratio that fits the image, else the whole image."""
    area = h * w * _uniform(n * tries, gen, *scale).view(n, tries)
    aspect = torch.exp(_uniform(n * tries, gen, math.log(ratio[0]), math.log(ratio[1]))).view(n, tries)
    ch, cw = torch.sqrt(area / aspect).round(), torch.sqrt(area * aspect).round()
    fits = (ch > 0) & (ch <= h) & (cw > 0) & (cw <= w)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first fitting draw (0 when none fits: replaced below)
    ch, cw, any_fits = ch.gather(1, first)[:, 0], cw.gather(1, first)[:, 0], fits.any(dim=1)
    ch, cw = torch.where(any_fits, ch, float(h)), torch.where(any_fits, cw, float(w))
    top = (torch.rand(n, generator=gen) * (h - ch + 1)).floor()
    left = (torch.rand(n, generator=gen) * (w - cw + 1)).floor()
    return torch.stack([left, top, left + cw, top + ch], dim=1)


def random_resized_crop(images: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """float (B, 3, H, W) -> (B, 3, H, W): a random box per image, resized back to H x W bilinearly.

    One roi_align: each output pixel samples the box at its own centre, as F.interpolate(align_corners=False)
    does for the cropped image (a crop never shrinks, so antialiasing has nothing to do); at the box's edge the
    sample may blend in the pixel just outside the box where the crop would repeat its edge pixel."""
    b, _, h, w = images.shape
    boxes = torch.cat([torch.arange(b)[:, None], crop_boxes(b, h, w, gen, scale, ratio)], dim=1)
    boxes = boxes.to(images.device, images.dtype)
    return roi_align(images, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def random_flip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Horizontal flip, one coin per image."""
    coins = torch.rand(len(images), generator=gen) < 0.5
    return torch.where(_per_image(coins, images), images.flip(-1), images)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = images.unbind(dim=1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b)[:, None]


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_image(factor, images)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by `shift` (a fraction of the colour circle, in [-0.5, 0.5]) in HSV space: value
    V = max and chroma C = max - min stay, the hue H in [0, 6) moves by 6 * shift."""
    value, largest = images.max(dim=1, keepdim=True)
    chroma = value - images.amin(dim=1, keepdim=True)
    # H = 2 * i + (next - previous) / C for the largest channel i, (next, previous) its cyclic neighbours
    sides = images[:, [1, 2, 0]] - images[:, [2, 0, 1]]
    hue = (2 * largest + sides.gather(1, largest) / chroma.clamp_min(1e-12)) * (chroma > 0)
    hue = hue + 6 * _per_image(shift, images)
    # HSV -> RGB: channel k is V - C * clamp(min(p, 4 - p), 0, 1), p = (n_k + H) mod 6 for n = 5, 3, 1
    p = (_HSV_OFFSETS.to(images.device) + hue).remainder(6)
    return value - chroma * torch.minimum(p, 4 - p).clamp(0, 1)


def colour_distort(images: torch.Tensor, gen: torch.Generator, strength: float = 0.8) -> torch.Tensor:
    """SimCLR's recipe on float images in [0, 1]: with p = 0.8 ColorJitter(0.8, 0.8, 0.8, 0.2) (brightness,
    contrast, saturation, hue in a random order per image), then grayscale with p = 0.2."""
    n = len(images)
    jitter = torch.rand(n, generator=gen) < 0.8
    factors = [_uniform(n, gen, 1 - strength, 1 + strength) for _ in range(3)] + [_uniform(n, gen, -0.2, 0.2)]
    order = torch.rand(n, 4, generator=gen).argsort(dim=1)  # a random permutation of the four per image
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    out = images.clone()
    for position in range(4):
        for k, op in enumerate(ops):  # each op on just the images that take it at this position
            chosen = (jitter & (order[:, position] == k)).nonzero()[:, 0]
            if len(chosen):
                rows = chosen.to(out.device)
                out[rows] = op(out[rows], factors[k][chosen])
    grey = torch.rand(n, generator=gen) < 0.2
    return torch.where(_per_image(grey, out), grayscale(out).expand_as(out), out)


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255.0)


def mim_view(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(0.2-1) + flip, the MIM recipe."""
    return random_flip(random_resized_crop(_unit(images), gen), gen).mul(2).sub(1)


def contrastive_view(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(0.08-1) + flip + colour distortion, the SimCLR recipe."""
    view = random_flip(random_resized_crop(_unit(images), gen, (0.08, 1.0)), gen)
    return colour_distort(view, gen).mul(2).sub(1)
