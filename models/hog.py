"""HOG targets for LocalMIM: per-colour-channel histograms of oriented gradients on a regular cell grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def hog_targets(images: torch.Tensor, cell: int, nbins: int = 9) -> torch.Tensor:
    """HOG of normalised images: (B, 3, H, W) -> (B, 3 * nbins, H / cell, W / cell), no gradient.

    Per colour channel: Sobel gx, gy (3x3, reflect pad) -> magnitude and unsigned angle atan2(gx, gy) in [0, pi),
    hard-assigned to `nbins` orientation bins with the magnitude summed into its bin, average-pooled
    over cell x cell pixels, then L2-normalised over the bins of each cell and channel (a cell with
    no gradient stays all zero). Output channel c * nbins + b holds colour c, orientation bin b.
    """
    return hog_pyramid(images, (cell,), nbins)[0]


@torch.no_grad()
def hog_pyramid(images: torch.Tensor, cells: tuple[int, ...], nbins: int = 9) -> list[torch.Tensor]:
    """`hog_targets(images, cell, nbins)` for each cell size, the per-pixel histograms computed once (LocalMIM
    asks for four cell sizes of the same images: the gradients and their binning were 3/4 of the work)."""
    b, c, h, w = images.shape
    for cell in cells:
        if h % cell or w % cell:
            raise ValueError(f"image size {h}x{w} is not a multiple of the HOG cell {cell}")
    padded = F.pad(images.float(), (1, 1, 1, 1), mode="reflect")
    # Separable Sobel: [1, 2, 1] smoothing across, [-1, 0, 1] difference along. A difference of two
    # reflected copies is exactly 0, so border pixels get no spurious orientation from rounding.
    smooth_y = padded[:, :, :-2] + 2 * padded[:, :, 1:-1] + padded[:, :, 2:]
    smooth_x = padded[..., :-2] + 2 * padded[..., 1:-1] + padded[..., 2:]
    gx = smooth_y[..., 2:] - smooth_y[..., :-2]
    gy = smooth_x[:, :, 2:] - smooth_x[:, :, :-2]
    magnitude = torch.sqrt(gx**2 + gy**2)
    # LocalMIM's HOGLayerC (after MaskFeat / SlowFast) takes phase = atan2(gx, gy): the angle from the y axis,
    # not from x. Matched here, so the bins are the reference's (with atan2(gy, gx) 90% of pixels differ).
    angle = torch.atan2(gx, gy) % math.pi
    bins = (angle / (math.pi / nbins)).long().clamp_(max=nbins - 1)
    pixels = torch.zeros(b, c, nbins, h, w, device=images.device)
    pixels.scatter_(2, bins[:, :, None], magnitude[:, :, None])
    pixels = pixels.view(b, c * nbins, h, w)
    targets = []
    for cell in cells:
        hist = (F.avg_pool2d(pixels, cell) if cell > 1 else pixels).view(b, c, nbins, h // cell, w // cell)
        norm = hist.square().sum(dim=2, keepdim=True).sqrt().clamp_min(1e-12)  # F.normalize, minus its slow norm
        targets.append((hist / norm).flatten(1, 2).to(images.dtype))
    return targets
