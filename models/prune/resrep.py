"""ResRep (Ding et al., ICCV 2021): compactors, gradient resetting on the forget set, exact conversion."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.prune.base import PruneError, PruneSettings, _attention, _head_rows, _narrow, _set_heads, keep_count


class _ResetGradient(torch.autograd.Function):
    """Identity forward; backward: on forgotten rows, the task gradient is replaced by the group-lasso
    gradient lambda * M_g / ||M_g|| of the row's group; other rows keep the task gradient."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, forget: torch.Tensor, group_size: int, lam: float) -> torch.Tensor:
        ctx.save_for_backward(weight, forget)
        ctx.group_size, ctx.lam = group_size, lam
        return weight.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        weight, forget = ctx.saved_tensors
        norms = weight.reshape(-1, ctx.group_size * weight.shape[1]).norm(dim=1).clamp_min(1e-12)
        penalty = ctx.lam * weight / norms.repeat_interleave(ctx.group_size)[:, None]
        return torch.where(forget[:, None], penalty, grad), None, None, None


class Compactor(nn.Module):
    """A (n, n) matrix M, identity-initialised, applied as x @ M (x: (..., n)); row i carries input channel i.

    Rows form groups of `group_size` (1 for MLP units, head_dim for a head). While training, the groups with
    the smallest norms are the forget set (it grows to groups - keep over `ramp_steps` forwards); their rows get
    only the penalty gradient. A group whose rows are zero makes its input channels unused.
    """

    def __init__(self, width: int, group_size: int, keep: int, lam: float, ramp_steps: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(width))
        self.group_size, self.keep, self.lam, self.ramp_steps = group_size, keep, lam, ramp_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def groups(self) -> int:
        return self.weight.shape[0] // self.group_size

    def forget_set(self, count: int | None = None) -> torch.Tensor:
        """(groups,) bool: the `count` groups with the smallest norms (default: all but `keep`); ties by index."""
        count = self.groups - self.keep if count is None else count
        norms = self.weight.detach().reshape(self.groups, -1).norm(dim=1)
        order = torch.sort(norms, stable=True).indices
        forget = torch.zeros(self.groups, dtype=torch.bool, device=norms.device)
        forget[order[:count]] = True
        return forget

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.training and torch.is_grad_enabled():
            self.step += 1
            count = round((self.groups - self.keep) * min(1.0, int(self.step) / self.ramp_steps))
            rows = self.forget_set(count).repeat_interleave(self.group_size)
            weight = _ResetGradient.apply(weight, rows, self.group_size, self.lam)
        return x @ weight.to(x.dtype)


class CompactedLinear(nn.Module):
    """A Linear that reads its input through a compactor: linear(x @ M); x: (..., n)."""

    def __init__(self, compactor: Compactor, linear: nn.Linear) -> None:
        super().__init__()
        self.compactor, self.linear = compactor, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.compactor(x))

    @torch.no_grad()
    def fold(self, kept_rows: torch.Tensor) -> nn.Linear:
        """linear' = linear @ M[kept]^T: reading only the kept channels, exact when the other rows are zero."""
        m = self.compactor.weight[kept_rows].to(self.linear.weight.dtype)
        return _narrow(self.linear, self.linear.weight @ m.T, self.linear.bias)


class ResRep:
    """ResRep (Ding et al., ICCV 2021): compactors after fc1's activation (on fc2's input) and after the heads
    (on proj's input); penalty gradients only on the forget set; conversion drops the forgotten rows."""

    name: ClassVar[str] = "resrep"

    def prepare(self, model: VisionTransformer, cfg: PruneSettings) -> VisionTransformer:
        for i, block in enumerate(model.blocks):
            attn, mlp = _attention(block, i), block.mlp
            hidden, heads = mlp.fc2.in_features, attn.num_heads
            device = mlp.fc2.weight.device
            mlp.fc2 = CompactedLinear(
                Compactor(hidden, 1, keep_count(hidden, cfg.keep_ratio), cfg.lam, cfg.ramp_steps), mlp.fc2
            ).to(device)
            attn.proj = CompactedLinear(
                Compactor(heads * attn.head_dim, attn.head_dim, keep_count(heads, cfg.heads_ratio), cfg.lam,
                          cfg.ramp_steps), attn.proj
            ).to(device)
        return model

    @staticmethod
    def _compacted(model: VisionTransformer) -> list[tuple[CompactedLinear, CompactedLinear]]:
        pairs = [(block.mlp.fc2, block.attn.proj) for block in model.blocks]
        if not all(isinstance(m, CompactedLinear) and isinstance(a, CompactedLinear) for m, a in pairs):
            raise PruneError("model has no ResRep compactors: call PRUNERS['resrep'].prepare first")
        return pairs

    @torch.no_grad()
    def mask(self, model: VisionTransformer) -> VisionTransformer:
        """The masked model: zero the compactor rows of the final forget set (in place)."""
        for fc2, proj in self._compacted(model):
            for compacted in (fc2, proj):
                c = compacted.compactor
                c.weight[c.forget_set().repeat_interleave(c.group_size)] = 0.0
        return model

    @torch.no_grad()
    def convert(self, model: VisionTransformer) -> list[dict[str, list[int]]]:
        """Fold every compactor into a narrower plain layer; equals `mask(model)` exactly (float rounding)."""
        structure = []
        for block, (fc2, proj) in zip(model.blocks, self._compacted(model), strict=True):
            units = (~fc2.compactor.forget_set()).nonzero().flatten().cpu()
            heads = (~proj.compactor.forget_set()).nonzero().flatten().cpu()
            mlp, attn = block.mlp, block.attn
            mlp.fc1 = _narrow(mlp.fc1, mlp.fc1.weight[units], None if mlp.fc1.bias is None else mlp.fc1.bias[units])
            mlp.fc2 = fc2.fold(units)
            rows = _head_rows(heads, attn.num_heads, attn.head_dim)
            qkv = _narrow(attn.qkv, attn.qkv.weight[rows], None if attn.qkv.bias is None else attn.qkv.bias[rows])
            channels = (heads[:, None] * attn.head_dim + torch.arange(attn.head_dim)).flatten()
            _set_heads(attn, qkv, proj.fold(channels), len(heads))
            structure.append({"mlp": units.tolist(), "heads": heads.tolist()})
        return structure
