"""What every pruner shares: settings, errors, keep counts, and narrowing timm layers to kept units."""

from __future__ import annotations

import math

import torch
from timm.layers import Attention
from torch import nn


class PruneError(ValueError):
    """A model cannot be pruned as asked (bad keep ratio, unsupported layer, not prepared)."""


class Schedule(nn.Module):
    """Where a pruner's training is, in forwards: over the first half the structure is chosen (ResRep's forget
    set grows), over the second the part the conversion drops fades linearly to exactly zero (`fade`: 1 -> 0),
    so that the model trained to the end *is* the converted model. The count is a buffer: it is checkpointed
    and resumed with the weights."""

    step: torch.Tensor

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps, self.ramp = steps, steps // 2
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def advance(self, module: nn.Module) -> None:
        """Count one forward of `module` when it trains with gradients (not evaluation forwards)."""
        if module.training and torch.is_grad_enabled():
            self.step += 1

    @property
    def growth(self) -> float:
        """Fraction of the structure chosen: 0 -> 1 over the first half, in tenths (ResRep re-chooses its
        forget set at intervals, not every step)."""
        return 1.0 if self.ramp == 0 else min(1.0, math.floor(10 * int(self.step) / self.ramp) / 10)

    @property
    def fade(self) -> float:
        """Weight of what the conversion drops: 1 until the first half ends, then linearly to 0 at the end."""
        step = int(self.step)
        if step <= self.ramp:
            return 1.0
        return max(0.0, (self.steps - step) / (self.steps - self.ramp))


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
