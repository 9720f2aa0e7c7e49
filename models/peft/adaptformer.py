"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck branch parallel to each block's MLP.

    x' = x + attn(norm1(x));   out = x' + mlp(norm2(x')) + s * Up(dropout(ReLU(Down(x'))))

Down: C -> d, Up: d -> C zero-initialised (the model starts as the backbone), s = 0.1, dropout 0.1;
the branch reads x' after the attention residual, unnormalised, as in the authors' code. Count on
ViT-B/16, d = 8: 12 x (768 x 8 + 8 + 8 x 768 + 768) = 156,768 with biases (METHODS.md's "~0.16M");
147,456 without them. Not mergeable: the ReLU sits between Down and Up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitpipe.models.peft.base import PeftMethod, swap_class
from vitpipe.models.settings import AdaptFormerSettings


class Adapter(nn.Module):
    """x: (B, N, C) -> s * Up(dropout(ReLU(Down(x)))): (B, N, C)."""

    def __init__(self, down: nn.Linear, up: nn.Linear, scale: float, dropout: float) -> None:
        super().__init__()
        self.down, self.up = down, up
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class ParallelAdapterBlock(Block):
    """timm Block whose MLP has `self.adapter` beside it, fed the post-attention residual stream."""

    adapter: Adapter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return self.mlp_residual(x)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The block's second half, MLP and adapter side by side (ToMe merges tokens just before it)."""
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.adapter(x)


def add_parallel_adapters(model: VisionTransformer, make_adapter: Callable[[int], Adapter]) -> None:
    """Patch every block into a ParallelAdapterBlock with `make_adapter(width)`."""
    for block in model.blocks:
        swap_class(block, ParallelAdapterBlock)
        block.adapter = make_adapter(model.embed_dim)


def adaptformer_adapter(width: int, cfg: AdaptFormerSettings) -> Adapter:
    """Down kaiming-uniform (as nn.Linear / LoRA's A), Up and both biases zero."""
    down, up = nn.Linear(width, cfg.dim, bias=cfg.bias), nn.Linear(cfg.dim, width, bias=cfg.bias)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)
    for layer in (down, up):
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return Adapter(down, up, cfg.scale, cfg.dropout)


class AdaptFormer(PeftMethod):
    """Parallel bottleneck adapters beside the MLPs; not mergeable."""

    name: ClassVar[str] = "adaptformer"
    scopes: ClassVar[tuple[str, ...]] = ("adapter",)

    def inject(self, model: VisionTransformer, cfg: AdaptFormerSettings) -> None:
        add_parallel_adapters(model, lambda width: adaptformer_adapter(width, cfg))
