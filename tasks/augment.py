"""Per-image random augmentations driven by an explicit torch.Generator (reproducible, resumable).

images: uint8 (B, 3, H, W) in, float in [-1, 1] out.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF

from vitpipe.tasks.classification import normalize


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def random_resized_crop(img: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """img: (3, H, W) -> (3, H, W): a random area fraction and aspect ratio, resized back."""
    _, h, w = img.shape
    for _ in range(10):
        area = h * w * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, math.log(ratio[0]), math.log(ratio[1])))
        ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
        if 0 < ch <= h and 0 < cw <= w:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return TF.resized_crop(img, top, left, ch, cw, [h, w], antialias=True)
    return img


def _flip(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return img.flip(-1) if float(torch.rand((), generator=gen)) < 0.5 else img


def colour_distort(img: torch.Tensor, gen: torch.Generator, strength: float = 0.8) -> torch.Tensor:
    """SimCLR's recipe: ColorJitter(0.8, 0.8, 0.8, 0.2) with p = 0.8, then grayscale with p = 0.2."""
    if float(torch.rand((), generator=gen)) < 0.8:
        jitter = [
            lambda x: TF.adjust_brightness(x, _uniform(gen, 1 - strength, 1 + strength)),
            lambda x: TF.adjust_contrast(x, _uniform(gen, 1 - strength, 1 + strength)),
            lambda x: TF.adjust_saturation(x, _uniform(gen, 1 - strength, 1 + strength)),
            lambda x: TF.adjust_hue(x, _uniform(gen, -0.2, 0.2)),
        ]
        for i in torch.randperm(4, generator=gen).tolist():
            img = jitter[i](img)
    if float(torch.rand((), generator=gen)) < 0.2:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return img


def mim_view(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(0.2-1) + flip, the MIM recipe."""
    return normalize(torch.stack([_flip(random_resized_crop(x, gen), gen) for x in images]))


def contrastive_view(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop + flip + colour distortion, the SimCLR recipe."""
    return normalize(torch.stack([colour_distort(_flip(random_resized_crop(x, gen, (0.08, 1.0)), gen), gen)
                                  for x in images]))
