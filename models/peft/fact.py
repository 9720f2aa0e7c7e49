"""FacT (Jie & Deng, AAAI 2023): factor-tuning of the stacked weight increments of the encoder.

Every encoder weight is viewed as C x C slices: q, k, v (the fused qkv Linear), o (proj), and fc1 /
fc2 as H / C slices each (H = mlp_ratio * C, 4 on ViT-B): 4 + 2 H / C slices per block, 144 on
ViT-B. Slice i gets the increment Delta W_i = s U Sigma_i V^T (U: C x r output side, zero-initialised;
V: C x r input side), computed as an extra path x -> V -> Sigma_i -> dropout -> U added to the
Linear's output (fc2's slices split its input instead of its output). Sigma_i comes from
  - TT: its own r x r core, stacked as sigma: (slices, r, r); 2 C r + slices r^2 parameters
    (ViT-B, r = 8: 2 x 768 x 8 + 144 x 64 = 21,504, METHODS.md's count);
  - TK: a shared core (r, r, r) and a slice factor P (slices, r): Sigma_i = sum_k core[:, :, k] P[i, k];
    2 C r + slices r + r^3 parameters (ViT-B, r = 32: 86,528).
U, V and the cores live once, at model.fact; each Linear's path holds a reference to them.
Mergeable: W_i += s U Sigma_i V^T, exact up to float rounding (dropout is off at inference).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitpipe.models.peft.base import PeftError, PeftMethod, add_branch, unbranch_all
from vitpipe.models.settings import FacTSettings


def _uniform(shape: tuple[int, ...], bound: float) -> torch.Tensor:
    return torch.empty(shape).uniform_(-bound, bound)


class FacTFactors(nn.Module):
    """Shared factors u (C, r), v (C, r) and the per-slice cores; `cores(a, b)` -> Sigma_a..b-1 (n, r, r)."""

    def __init__(self, width: int, rank: int, slices: int, kind: Literal["tt", "tk"]) -> None:
        super().__init__()
        self.kind = kind
        self.u = nn.Parameter(torch.zeros(width, rank))
        self.v = nn.Parameter(_uniform((width, rank), bound=1 / math.sqrt(width)))  # as nn.Linear(C, r)
        if kind == "tt":
            self.sigma = nn.Parameter(_uniform((slices, rank, rank), bound=1 / math.sqrt(rank)))
        else:
            self.core = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, rank, rank)))
            self.p = nn.Parameter(nn.init.xavier_uniform_(torch.empty(slices, rank)))

    def cores(self, start: int, stop: int) -> torch.Tensor:
        if self.kind == "tt":
            return self.sigma[start:stop]
        return torch.einsum("abk,ik->iab", self.core, self.p[start:stop])


class FacTPath(nn.Module):
    """The FacT path of one Linear, covering slices [start, start + n).

    along="out": x (..., C) -> (..., n C), slice i feeding output chunk i (qkv, proj, fc1);
    along="in":  x (..., n C) -> (..., C), input chunk i through slice i, summed (fc2).
    """

    def __init__(self, factors: FacTFactors, start: int, n: int, along: str, scale: float, dropout: float):
        super().__init__()
        self._factors = (factors,)  # a tuple, so the shared module stays registered once, at model.fact
        self.start, self.n, self.along, self.scale = start, n, along, scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # V Sigma is formed first (C x n r, tiny) and s goes on U (r x C), so the tokens meet two matmuls, not
        # three, and no elementwise op: the same function, 1.08-1.13x the steps/s on the tiny ViT (CPU, batch 64).
        f = self._factors[0]
        cores = f.cores(self.start, self.start + self.n)  # (n, r_out, r_in)
        u = f.u.T * self.scale  # (r, C)
        if self.along == "out":  # (..., C) -> (..., n r) -> (..., n, r) -> (..., n, C)
            z = x @ (f.v @ cores.permute(2, 0, 1).flatten(1))
            return (self.dropout(z.unflatten(-1, (self.n, -1))) @ u).flatten(-2)
        # (..., n C) -> (..., r): input chunk i through V Sigma_i^T, summed over i; -> (..., C)
        # bmm, not a broadcasting matmul: that one takes another path (other rounding) when v requires grad
        z = x @ torch.bmm(f.v.expand(self.n, -1, -1), cores.transpose(1, 2)).flatten(0, 1)
        return self.dropout(z) @ u

    def delta_weight(self) -> torch.Tensor:
        """The increment as one (out, in) matrix: slices stacked along the output or the input."""
        f = self._factors[0]
        blocks = self.scale * f.u @ f.cores(self.start, self.start + self.n) @ f.v.T  # (n, C, C)
        if self.along == "out":
            return blocks.flatten(0, 1)
        return blocks.permute(1, 0, 2).flatten(1)


def _slice_counts(model: VisionTransformer) -> list[tuple[str, int, str]]:
    """(Linear path in a block, number of C x C slices, along) for qkv, proj, fc1, fc2."""
    width, block = model.embed_dim, model.blocks[0]
    hidden = block.mlp.fc1.out_features
    if block.attn.qkv.out_features != 3 * width or hidden % width:
        shapes = f"C={width}, qkv={block.attn.qkv.out_features}, fc1={hidden}"
        raise PeftError(f"FacT needs qkv = 3 C and fc1 = k C to cut C x C slices; got {shapes}")
    k = hidden // width
    return [("attn.qkv", 3, "out"), ("attn.proj", 1, "out"), ("mlp.fc1", k, "out"), ("mlp.fc2", k, "in")]


class FacTTT(PeftMethod):
    """FacT with tensor-train factors; merge folds every slice into its Linear and drops model.fact."""

    name: ClassVar[str] = "fact_tt"
    mergeable: ClassVar[bool] = True
    scopes: ClassVar[tuple[str, ...]] = ("fact",)
    kind: ClassVar[Literal["tt", "tk"]] = "tt"

    def inject(self, model: VisionTransformer, cfg: FacTSettings) -> None:
        layout = _slice_counts(model)
        per_block = sum(n for _, n, _ in layout)
        model.fact = FacTFactors(model.embed_dim, cfg.rank, per_block * len(model.blocks), self.kind)
        start = 0
        for block in model.blocks:
            for path, n, along in layout:
                add_branch(block.get_submodule(path), FacTPath(model.fact, start, n, along, cfg.scale, cfg.dropout))
                start += n

    def fold(self, model: nn.Module) -> None:
        unbranch_all(model)
        del model.fact


class FacTTK(FacTTT):
    """FacT with Tucker factors (shared core and slice factor)."""

    name: ClassVar[str] = "fact_tk"
    kind: ClassVar[Literal["tt", "tk"]] = "tk"
