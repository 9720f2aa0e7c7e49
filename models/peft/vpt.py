"""VPT-deep (Jia et al., ECCV 2022): p learnable prompt tokens at the input of every block.

Before block l, p prompts (its own, (p, C)) are inserted after the prefix (cls) tokens; the block's
outputs at those positions are dropped, so the next block gets fresh prompts and the model's output
keeps its shape. p x C x D parameters: 10 x 768 x 12 = 92,160 on ViT-B/16, METHODS.md's count.
Prompts get no position embedding; init uniform(+-sqrt(6 / (3 * patch area + C))) as in the VPT code.
Not mergeable: prompts are extra tokens every attention sees.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitpipe.models.peft.base import PeftMethod, swap_class
from vitpipe.models.settings import VptSettings


class PromptedBlock(Block):
    """timm Block that reads `prompts` (p, C) inserted after its `num_prefix_tokens` prefix tokens.

    x: (B, P + N, C) -> (B, P + N, C); inside, the block sees (B, P + p + N, C).
    """

    prompts: nn.Parameter
    prompt_dropout: nn.Dropout
    num_prefix_tokens: int

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        k, p = self.num_prefix_tokens, self.prompts.shape[0]
        prompts = self.prompt_dropout(self.prompts).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :k], prompts, x[:, k:]], dim=1)
        x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return torch.cat([x[:, :k], x[:, k + p :]], dim=1)


class Vpt(PeftMethod):
    """Deep visual prompts; not mergeable."""

    name: ClassVar[str] = "vpt"
    scopes: ClassVar[tuple[str, ...]] = ("prompts",)

    def inject(self, model: VisionTransformer, cfg: VptSettings) -> None:
        patch_area = math.prod(model.patch_embed.patch_size)
        bound = math.sqrt(6.0 / (3 * patch_area + model.embed_dim))
        for block in model.blocks:
            swap_class(block, PromptedBlock)
            block.prompts = nn.Parameter(torch.empty(cfg.num_prompts, model.embed_dim).uniform_(-bound, bound))
            block.prompt_dropout = nn.Dropout(cfg.dropout)
            block.num_prefix_tokens = model.num_prefix_tokens
