"""LocalMIM (Wang et al., CVPR 2023): masked image modeling with local multi-scale reconstruction.

MAE-style masking feeds only the visible patches to the encoder; several intermediate blocks ("taps")
each get their own small local decoder that predicts HOG targets of the masked cells at its own scale
(low taps fine, high taps coarse), so the lower layers are guided directly.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer

from vitpipe.models.hog import hog_pyramid
from vitpipe.models.settings import LocalMIMConfig


def resolve_taps(taps: tuple[int, ...], depth: int) -> list[int]:
    """Map possibly negative tap indices onto [0, depth); they must end up strictly increasing."""
    if any(not -depth <= t < depth for t in taps):
        raise ValueError(f"taps {taps} out of range for depth {depth}")
    resolved = [t % depth for t in taps]
    if any(a >= b for a, b in pairwise(resolved)):
        raise ValueError(f"taps {taps} resolve to {resolved} at depth {depth}: choose distinct increasing taps")
    return resolved


def random_masking(
    x: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (MAE).

    x: (B, N, C) -> x_visible (B, N_vis, C), mask (B, N) with 1 = masked, ids_restore (B, N) that
    un-shuffles [visible, masked] back to patch order. `generator` must live on x's device.
    """
    b, n, c = x.shape
    keep = int(n * (1 - ratio))
    noise = torch.rand(b, n, generator=generator, device=x.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    x_visible = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, c))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    return x_visible, mask.gather(1, ids_restore), ids_restore


def encode_visible(
    vit: VisionTransformer,
    images: torch.Tensor,
    mask_ratio: float,
    taps: list[int],
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Run the encoder on the visible patches only; return the tap block outputs, mask and ids_restore.

    images: (B, 3, H, W) -> [(B, P + N_vis, C) per tap] (P prefix tokens, cls first; no final norm),
    mask (B, N), ids_restore (B, N). Blocks after the last tap are not run.
    """
    tokens = vit._pos_embed(vit.patch_embed(images))  # prefix + position embeddings, as in timm's forward
    prefix, patches = tokens[:, : vit.num_prefix_tokens], tokens[:, vit.num_prefix_tokens :]
    visible, mask, ids_restore = random_masking(patches, mask_ratio, generator)
    x = vit.norm_pre(torch.cat([prefix, visible], dim=1))
    outputs = []
    for index, block in enumerate(vit.blocks[: taps[-1] + 1]):
        x = block(x)
        if index in taps:
            outputs.append(x)
    return outputs, mask, ids_restore


def scale_head(dim: int, scale: float, out_channels: int) -> nn.Sequential:
    """Feature map (B, dim, h, w) -> (B, out_channels, h * scale, w * scale).

    x4: ConvT k2s2 -> LayerNorm2d -> GELU -> ConvT k2s2 -> 1x1; x2: ConvT k2s2 -> 1x1; x1: 1x1;
    x0.5: AvgPool 2 -> 1x1. Each ConvT halves the channels.
    """
    layers: list[nn.Module] = []
    if scale < 1:
        layers.append(nn.AvgPool2d(round(1 / scale)))
    for step in range(round(math.log2(scale))):
        if step:
            layers += [LayerNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        dim //= 2
    layers.append(nn.Conv2d(dim, out_channels, kernel_size=1))
    return nn.Sequential(*layers)


class LocalDecoder(nn.Module):
    """One tap's local decoder: visible tokens (B, P + N_vis, C) -> prediction (B, out, gh * s, gw * s)."""

    def __init__(
        self,
        width: int,
        grid: tuple[int, int],
        scale: float,
        dec_dim: int = 256,
        heads: int = 8,
        out_channels: int = 27,
        num_prefix: int = 1,
    ) -> None:
        super().__init__()
        self.grid, self.num_prefix = grid, num_prefix
        self.norm_in = nn.LayerNorm(width)
        self.embed = nn.Linear(width, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        trunc_normal_(self.mask_token, std=0.02)
        pos = build_sincos2d_pos_embed(list(grid), dec_dim)  # (gh * gw, dec_dim), row-major like the patches
        self.register_buffer("pos_embed", torch.cat([pos.new_zeros(num_prefix, dec_dim), pos])[None], persistent=False)
        self.block = Block(dec_dim, heads, mlp_ratio=4.0, qkv_bias=True)
        self.norm_out = nn.LayerNorm(dec_dim)
        self.head = scale_head(dec_dim, scale, out_channels)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.norm_in(x))
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, n = ids_restore.shape
        masked = self.mask_token.expand(b, n - visible.shape[1], -1)
        patches = torch.cat([visible, masked], dim=1).gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = self.block(torch.cat([prefix, patches], dim=1) + self.pos_embed)
        x = self.norm_out(x)[:, self.num_prefix :]
        return self.head(x.transpose(1, 2).reshape(b, -1, *self.grid))


def mask_at_scale(mask: torch.Tensor, grid: tuple[int, int], scale: float) -> torch.Tensor:
    """Patch mask (B, N) -> per-cell weights (B, gh * s, gw * s): nearest-upsample (s >= 1), average (s < 1)."""
    m = mask.view(-1, 1, *grid).float()
    if scale >= 1:
        m = F.interpolate(m, scale_factor=int(scale), mode="nearest")
    else:
        m = F.avg_pool2d(m, round(1 / scale))
    return m[:, 0]


def hog_cells(patch: int, grid: tuple[int, int], scales: tuple[float, ...]) -> list[int]:
    """HOG cell size per scale, patch / s; it must be a whole number of pixels and tile the patch grid."""
    cells = []
    for s in scales:
        cell = patch / s
        if cell < 1 or cell % 1 or (s < 1 and any(g % round(1 / s) for g in grid)):
            raise ValueError(f"scale {s} does not give whole HOG cells for patch {patch} on a {grid} grid")
        cells.append(int(cell))
    return cells


class LocalMIM(nn.Module):
    """The LocalMIM objective for a given encoder: one local decoder per tap, HOG targets at each tap's scale."""

    num_views = 1

    def __init__(self, vit: VisionTransformer, cfg: LocalMIMConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or LocalMIMConfig()
        self.taps = resolve_taps(cfg.taps, len(vit.blocks))
        self.grid = tuple(vit.patch_embed.grid_size)
        self.cells = hog_cells(vit.patch_embed.patch_size[0], self.grid, cfg.scales)
        self.local_decoders = nn.ModuleList(
            LocalDecoder(vit.embed_dim, self.grid, s, cfg.dec_dim, cfg.dec_heads, 3 * cfg.nbins, vit.num_prefix_tokens)
            for s in cfg.scales
        )

    def tap_losses(
        self, vit: VisionTransformer, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """One scalar per tap: HOG-target MSE averaged over the masked cells (weighted by the resampled mask)."""
        features, mask, ids_restore = encode_visible(vit, images, self.cfg.mask_ratio, self.taps, generator)
        losses = []
        targets = hog_pyramid(images, tuple(self.cells), self.cfg.nbins)
        per_tap = zip(features, self.local_decoders, self.cfg.scales, targets, strict=True)
        for feature, decoder, scale, target in per_tap:
            prediction = decoder(feature, ids_restore)
            weight = mask_at_scale(mask, self.grid, scale)
            per_cell = (prediction.float() - target).pow(2).mean(dim=1)
            losses.append((per_cell * weight).sum() / weight.sum())
        return losses

    def forward(
        self, vit: VisionTransformer, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images: (B, 3, H, W) normalised -> (weighted sum of the tap losses, {"mim_tap{k}": loss_k detached})."""
        losses = self.tap_losses(vit, images, generator)
        total = sum(w * loss for w, loss in zip(self.cfg.weights, losses, strict=True))
        return total, {f"mim_tap{k}": loss.detach() for k, loss in zip(self.taps, losses, strict=True)}
