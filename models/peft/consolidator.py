"""Consolidator (Hao et al., ICLR 2023): mergeable multi-branch grouped connections beside each Linear.

Each encoder Linear (qkv, proj, fc1, fc2) gets a parallel branch: dropout on its input, the sum of grouped
(block-diagonal) linear maps with group counts g (each optionally preceded by ShuffleNet's channel shuffle with g
groups, so a group draws its inputs from across the width), a bias, and DropPath on the output. All maps are
linear, so after training they consolidate into one (out, in) matrix and one bias per Linear, which `merge` adds
into W and b: no extra inference cost. A group count is reduced to gcd(g, in, out) where it does not divide both
widths. Defaults, the authors' VTAB-1k setup: one branch of g = 384, uniform(+-1e-3) init, a bias, DropPath 0.1,
no shuffle: 84,934,656 / 384 = 221,184 weights + 82,944 biases = 304,128 parameters on ViT-B/16 (0.35%, the
paper's budget). The delta keeps the branch weights themselves so a loaded delta reproduces the training-time
outputs exactly.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitpipe.models.peft.base import PeftMethod, add_branch, encoder_linears, unbranch_all
from vitpipe.models.settings import ConsolidatorSettings


def channel_shuffle(width: int, groups: int) -> torch.Tensor:
    """The permutation (width,) of ShuffleNet's channel shuffle: (groups, width / groups) transposed."""
    return torch.arange(width).view(groups, width // groups).t().flatten()


class GroupedConnection(nn.Module):
    """y = blockdiag(W_1 .. W_g) x[perm]: x (..., in) -> (..., out); weight (g, out / g, in / g); perm is the
    channel shuffle, or the identity."""

    def __init__(self, in_features: int, out_features: int, groups: int, shuffle: bool, init: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(groups, out_features // groups, in_features // groups))
        if init == "uniform":
            nn.init.uniform_(self.weight, -1e-3, 1e-3)
        perm = channel_shuffle(in_features, groups) if shuffle else torch.arange(in_features)
        self.register_buffer("perm", perm if shuffle else None, persistent=False)
        self.register_buffer("inverse_perm", torch.argsort(perm), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Group by group: (..., in) -> (..., g, in / g) -> (..., g, out / g) -> (..., out); g times fewer
        multiply-adds than the dense matrix."""
        if self.perm is not None:
            x = x[..., self.perm]
        return torch.einsum("...gi,goi->...go", x.unflatten(-1, (self.weight.shape[0], -1)), self.weight).flatten(-2)

    def delta_weight(self) -> torch.Tensor:
        """The dense (out, in) matrix of this map: block diagonal in the reordered input coordinates.

        blockdiag @ x[perm] = dense @ x with dense[:, perm[k]] = blockdiag[:, k].
        """
        g, o, i = self.weight.shape
        eye = torch.eye(g, dtype=self.weight.dtype, device=self.weight.device)
        blocks = torch.einsum("gh,goi->gohi", eye, self.weight).reshape(g * o, g * i)
        return blocks[:, self.inverse_perm]


class ConsolidatorBranch(nn.Module):
    """x (..., in) -> drop_path(sum_b GroupedConnection_b(dropout(x)) + bias): (..., out)."""

    def __init__(self, in_features: int, out_features: int, cfg: ConsolidatorSettings) -> None:
        super().__init__()
        counts = [math.gcd(g, in_features, out_features) for g in cfg.groups]
        self.maps = nn.ModuleList(GroupedConnection(in_features, out_features, g, cfg.shuffle, cfg.init)
                                  for g in counts)
        self.bias = nn.Parameter(torch.zeros(out_features)) if cfg.bias else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(cfg.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        out = sum(grouped(x) for grouped in self.maps)
        return self.drop_path(out if self.bias is None else out + self.bias)

    def delta_weight(self) -> torch.Tensor:
        """All branches consolidated into one (out, in) matrix."""
        return sum(grouped.delta_weight() for grouped in self.maps)

    def delta_bias(self) -> torch.Tensor | None:
        return self.bias


class Consolidator(PeftMethod):
    """Grouped multi-branch adapters on every encoder Linear; mergeable."""

    name: ClassVar[str] = "consolidator"
    mergeable: ClassVar[bool] = True
    scopes: ClassVar[tuple[str, ...]] = ("branch",)

    def inject(self, model: VisionTransformer, cfg: ConsolidatorSettings) -> None:
        for _, linear in list(encoder_linears(model)):
            branch = ConsolidatorBranch(linear.in_features, linear.out_features, cfg)
            add_branch(linear, branch)

    def fold(self, model: nn.Module) -> None:
        unbranch_all(model)
