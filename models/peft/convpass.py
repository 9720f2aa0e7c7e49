"""Convpass (Jie & Deng, 2022): convolutional bypasses beside each block's MHSA and MLP.

    h = norm1(x);  x = x + attn(h) + bypass_attn(h);   h = norm2(x);  x = x + mlp(h) + bypass_mlp(h)
    bypass(h) = s * Up(dropout(QuickGELU(Conv3x3(QuickGELU(Down(h))))))

Down: C -> 8 (xavier), Conv3x3: 8 -> 8 on the patch tokens laid out on their grid (identity at the
centre tap, zero elsewhere), prefix tokens (cls) through the same conv as 1x1 maps (so only its centre
tap acts), Up: 8 -> C zero-initialised; all with biases. Per bypass on ViT-B/16: 6,152 + 584 + 6,912
= 13,648; x 2 x 12 = 327,552, METHODS.md's count. Not mergeable: the conv mixes neighbouring tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitpipe.models.peft.base import PeftMethod, swap_class
from vitpipe.models.settings import ConvpassSettings


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ConvBypass(nn.Module):
    """h: (B, P + gh * gw, C) -> (B, P + gh * gw, C); P prefix tokens, then the patch grid row-major."""

    def __init__(self, width: int, dim: int, grid: tuple[int, int], num_prefix: int, scale: float, dropout: float):
        super().__init__()
        self.down, self.up = nn.Linear(width, dim), nn.Linear(dim, width)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        nn.init.xavier_uniform_(self.down.weight)
        for tensor in (self.down.bias, self.up.weight, self.up.bias, self.conv.weight, self.conv.bias):
            nn.init.zeros_(tensor)
        with torch.no_grad():
            self.conv.weight[:, :, 1, 1] = torch.eye(dim)
        self.dropout = nn.Dropout(dropout)
        self.grid, self.num_prefix, self.scale = grid, num_prefix, scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = quick_gelu(self.down(h))
        b, _, d = z.shape
        prefix, patches = z[:, : self.num_prefix], z[:, self.num_prefix :]
        patches = self.conv(patches.transpose(1, 2).reshape(b, d, *self.grid)).flatten(2).transpose(1, 2)
        prefix = self.conv(prefix.reshape(-1, d, 1, 1)).reshape(b, -1, d)
        z = self.dropout(quick_gelu(torch.cat([prefix, patches], dim=1)))
        return self.up(z) * self.scale


class ConvpassBlock(Block):
    """timm Block with a ConvBypass beside attention and one beside the MLP, on the normalised input."""

    bypass_attn: ConvBypass
    bypass_mlp: ConvBypass

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop_path1(self.ls1(self.attn(h, attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path1(self.bypass_attn(h))
        h = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(h))) + self.drop_path2(self.bypass_mlp(h))


class Convpass(PeftMethod):
    """Two convolutional bypasses per block; not mergeable."""

    name: ClassVar[str] = "convpass"
    scopes: ClassVar[tuple[str, ...]] = ("bypass_attn", "bypass_mlp")

    def inject(self, model: VisionTransformer, cfg: ConvpassSettings) -> None:
        grid = tuple(model.patch_embed.grid_size)
        for block in model.blocks:
            swap_class(block, ConvpassBlock)
            for name in ("bypass_attn", "bypass_mlp"):
                bypass = ConvBypass(model.embed_dim, cfg.dim, grid, model.num_prefix_tokens, cfg.scale, cfg.dropout)
                setattr(block, name, bypass)
