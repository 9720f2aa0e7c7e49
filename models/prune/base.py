"""What every pruner shares: settings, errors, keep counts, and narrowing timm layers to kept units."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from timm.layers import Attention
from torch import nn


class PruneError(ValueError):
    """A model cannot be pruned as asked (bad keep ratio, unsupported layer, not prepared)."""


class PruneSettings(BaseModel):
    """Keep ratios (0 < k <= 1) of MLP hidden units and of heads, and each method's strength."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keep_ratio: float = Field(0.5, gt=0, le=1, description="fraction of MLP hidden units kept per block")
    head_keep_ratio: float | None = Field(None, gt=0, le=1, description="fraction of heads kept; None: keep_ratio")
    lam: float = Field(1e-4, gt=0, description="ResRep group-lasso strength lambda")
    ramp_steps: int = Field(1, ge=1, description="ResRep: training forwards over which the forget set grows")
    centripetal: float = Field(3e-3, ge=0, description="C-SGD centripetal strength epsilon")
    seed: int = 0

    @property
    def heads_ratio(self) -> float:
        return self.keep_ratio if self.head_keep_ratio is None else self.head_keep_ratio


def keep_count(n: int, ratio: float) -> int:
    """Units kept of n at keep ratio `ratio` (at least one)."""
    if not 0 < ratio <= 1:
        raise PruneError(f"keep ratio must satisfy 0 < k <= 1, got {ratio}")
    return max(1, round(n * ratio))


def _attention(block: nn.Module, i: int) -> Attention:
    attn = block.attn
    if not isinstance(attn, Attention) or not isinstance(attn.norm, nn.Identity) or attn.gate is not None:
        raise PruneError(f"block {i}: pruning needs timm Attention without scale norm or gate")
    return attn


def _narrow(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain Linear with the given weight (out, in) and bias, on the device and dtype of `linear`."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out = out.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _head_rows(heads: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """qkv output rows of the given heads, in q, k, v order: (3 * len(heads) * head_dim,)."""
    per_head = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
    return torch.cat([t * num_heads * head_dim + per_head for t in range(3)])


def _set_heads(attn: Attention, qkv: nn.Linear, proj: nn.Linear, num_heads: int) -> None:
    attn.qkv, attn.proj = qkv, proj
    attn.num_heads, attn.attn_dim = num_heads, num_heads * attn.head_dim
