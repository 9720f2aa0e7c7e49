"""ResRep (Ding et al., ICCV 2021): compactors, gradient resetting on the forget set, exact conversion."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitpipe.models.prune.base import (
    PruneError,
    Schedule,
    _attention,
    _head_rows,
    _narrow,
    _set_heads,
    keep_count,
)
from vitpipe.models.settings import PruneSettings

CRITERIA = ("saliency", "norm")


class _ResetGradient(torch.autograd.Function):
    """Identity forward; backward as the official ResRep: the task gradient is masked on the forgotten rows
    and the group-lasso gradient lambda * M_g / ||M_g|| of each row's group is added to every row."""

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
        return torch.where(forget[:, None], 0.0, grad) + penalty, None, None, None


class Compactor(nn.Module):
    """A (n, n) matrix M, identity-initialised, applied as x @ M (x: (..., n)); row i carries input channel i.

    Rows form groups of `group_size` (1 for MLP units, head_dim for a head). Over the first half of the
    schedule the forget set grows, in tenths, to groups - keep: at each growth the groups that matter least
    are chosen; then it is fixed (`forget`, a buffer) and its rows fade to zero over the second half. Forgotten
    rows get only the penalty gradient. The lasso alone does not get there in a short schedule (AdamW moves a
    row by about lr a step: 100 steps at lr 1e-3 left norms of 0.95), so the fade is what makes the conversion
    exact.

    What "matters least" means (`criterion`): "norm" is ResRep's own, the groups with the smallest ||M_g||;
    "saliency" (default) is the output a group carries, sum over its rows i of E[x_i^2] ||W M_i^T||^2 with W
    the next layer's weight and E[x_i^2] averaged over the forwards seen so far. On a schedule of tens of
    steps the identity-initialised rows all keep norms near 1, so "norm" chooses by noise.
    """

    forget: torch.Tensor
    energy: torch.Tensor
    budget: torch.Tensor

    def __init__(self, width: int, group_size: int, keep: int, lam: float, steps: int,
                 criterion: str = "saliency") -> None:
        super().__init__()
        if criterion not in CRITERIA:
            raise PruneError(f"unknown ResRep criterion {criterion!r} (known: {', '.join(CRITERIA)})")
        self.weight = nn.Parameter(torch.eye(width))
        self.group_size, self.lam, self.criterion = group_size, lam, criterion
        self.schedule = Schedule(steps)
        self.pool: GlobalSelection | None = None  # set by ResRep.prepare with selection "global"
        self.register_buffer("forget", torch.zeros(width // group_size, dtype=torch.bool))
        self.register_buffer("energy", torch.zeros(width))
        self.register_buffer("budget", torch.tensor(keep))  # groups kept at the end (global selection sets it)

    @property
    def groups(self) -> int:
        return self.weight.shape[0] // self.group_size

    @property
    def keep(self) -> int:
        return int(self.budget)

    def scores(self, out_weight: torch.Tensor | None = None) -> torch.Tensor:
        """(groups,): how much each group matters by the criterion (norm without the next layer's weight)."""
        m = self.weight.detach().float()
        if self.criterion == "norm" or out_weight is None:
            per_row = m.pow(2).sum(dim=1)
        else:
            energy = self.energy.clone()
            if torch.distributed.is_initialized():  # every rank saw other data: choose from the same figures
                torch.distributed.all_reduce(energy)
                energy /= torch.distributed.get_world_size()
            per_row = energy * (out_weight.detach().float() @ m.T).pow(2).sum(dim=0)
        return per_row.reshape(self.groups, self.group_size).sum(dim=1)

    def smallest(self, count: int | None = None, out_weight: torch.Tensor | None = None) -> torch.Tensor:
        """(groups,) bool: the `count` groups that matter least (default: all but `keep`); ties by index."""
        count = self.groups - self.keep if count is None else count
        order = torch.sort(self.scores(out_weight), stable=True).indices
        forget = torch.zeros(self.groups, dtype=torch.bool, device=self.weight.device)
        forget[order[:count]] = True
        return forget

    @property
    def complete(self) -> bool:
        """Whether the forget set has its final size (groups - keep)."""
        return int(self.forget.sum()) == self.groups - self.keep

    def effective(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """M (or `weight`, M on its way through autograd) as the model uses it now: the forgotten rows scaled
        by the schedule's fade."""
        weight = self.weight if weight is None else weight
        rows = self.forget.repeat_interleave(self.group_size)
        return weight * torch.where(rows, self.schedule.fade, 1.0)[:, None].to(weight)

    def forward(self, x: torch.Tensor, out_weight: torch.Tensor | None = None) -> torch.Tensor:
        """x @ M as the schedule has it; `out_weight`: the next layer's weight, for the saliency criterion."""
        self.schedule.advance(self)
        if not (self.training and torch.is_grad_enabled()):
            return x @ self.effective().to(x.dtype)
        if self.schedule.fade == 1.0:  # choosing: keep the mean squared input of every channel
            with torch.no_grad():
                seen = x.detach().float().pow(2).reshape(-1, x.shape[-1]).mean(dim=0)
                self.energy += (seen - self.energy) / int(self.schedule.step)
        if self.pool is not None:
            self.pool.choose(self.schedule.growth)
        else:
            count = round((self.groups - self.keep) * self.schedule.growth)
            if count != int(self.forget.sum()) and (self.schedule.fade == 1.0 or not self.complete):
                self.forget.copy_(self.smallest(count, out_weight))
        rows = self.forget.repeat_interleave(self.group_size)
        weight = _ResetGradient.apply(self.weight, rows, self.group_size, self.lam)
        return x @ self.effective(weight).to(x.dtype)

    @torch.no_grad()
    def impose(self) -> None:
        """Zero the rows of the final forget set now (lossy): the structure the schedule reaches at its end."""
        if self.pool is not None:
            self.pool.choose(1.0)
        elif not self.complete:
            self.forget.copy_(self.smallest())
        self.weight[self.forget.repeat_interleave(self.group_size)] = 0.0

    def residual(self) -> float:
        """Largest norm of a forgotten row group as the model uses it: 0 once the schedule has reached its end."""
        if not self.complete:
            return float("inf")
        norms = self.effective().detach().reshape(self.groups, -1).norm(dim=1)
        return float(norms[self.forget].max()) if self.forget.any() else 0.0


class GlobalSelection:
    """ResRep's global selection over the compactors of one kind (MLP units, or heads): their forget sets are
    chosen together, the groups that matter least model-wide (the scores compare across blocks: fc2 and proj
    both write into the residual stream), at least one group kept per compactor, and the total kept equal to
    the per-block ratios' total. Each member calls `choose` at its forward; the first to reach a new growth
    level chooses for all. A plain object (not a module): state_dict holds the members' forget sets and budgets.
    """

    def __init__(self, members: list[tuple[Compactor, nn.Linear]]) -> None:
        self.members = members
        self.total_forget = sum(c.groups - c.keep for c, _ in members)
        self.level = -1.0

    @torch.no_grad()
    def choose(self, growth: float) -> None:
        """Re-choose every member's forget set for this growth level (once per level); at 1.0 the members'
        budgets become what they keep. A model rebuilt or resumed past its final choice keeps that choice."""
        if growth == self.level:
            return
        final = all(c.groups - c.keep == int(c.forget.sum()) for c, _ in self.members)
        self.level = growth
        if growth == 1.0 and final:  # consistent already: a resumed model's final choice, or 0.9's was complete
            return
        count = round(self.total_forget * growth)
        candidates = []  # (score, member, group): every group but each member's best
        for m, (c, linear) in enumerate(self.members):
            scores = c.scores(linear.weight)
            best = int(torch.argmax(scores))
            candidates += [(v, m, g) for g, v in enumerate(scores.tolist()) if g != best]
        candidates.sort(key=lambda t: t[0])  # stable: ties go by member, then group
        forget = [torch.zeros_like(c.forget) for c, _ in self.members]
        for _, m, g in candidates[:count]:
            forget[m][g] = True
        for (c, _), chosen in zip(self.members, forget, strict=True):
            c.forget.copy_(chosen)
            if growth == 1.0:
                c.budget.fill_(c.groups - int(chosen.sum()))


class CompactedLinear(nn.Module):
    """A Linear that reads its input through a compactor: linear(x @ M); x: (..., n)."""

    def __init__(self, compactor: Compactor, linear: nn.Linear) -> None:
        super().__init__()
        self.compactor, self.linear = compactor, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.compactor(x, self.linear.weight))

    @torch.no_grad()
    def fold(self, kept_rows: torch.Tensor) -> nn.Linear:
        """linear' = linear @ M[kept]^T: reading only the kept channels, exact when the other rows are zero."""
        m = self.compactor.effective()[kept_rows].to(self.linear.weight.dtype)
        return _narrow(self.linear, self.linear.weight @ m.T, self.linear.bias)


class ResRep:
    """ResRep (Ding et al., ICCV 2021): compactors after fc1's activation (on fc2's input) and after the heads
    (on proj's input); penalty gradients only on the forget set; conversion drops the forgotten rows."""

    name: ClassVar[str] = "resrep"

    def prepare(self, model: VisionTransformer, cfg: PruneSettings) -> VisionTransformer:
        """Compactors on every block's fc2 and proj input; with `selection: global`, pooled per kind."""
        for i, block in enumerate(model.blocks):
            attn, mlp = _attention(block, i), block.mlp
            hidden, heads = mlp.fc2.in_features, attn.num_heads
            device = mlp.fc2.weight.device
            mlp.fc2 = CompactedLinear(
                Compactor(hidden, 1, keep_count(hidden, cfg.keep_ratio), cfg.lam, cfg.steps, cfg.criterion), mlp.fc2
            ).to(device)
            attn.proj = CompactedLinear(
                Compactor(heads * attn.head_dim, attn.head_dim, keep_count(heads, cfg.heads_ratio), cfg.lam,
                          cfg.steps, cfg.criterion), attn.proj
            ).to(device)
        if cfg.selection == "global":
            for kind in ("mlp.fc2", "attn.proj"):
                layers = [block.get_submodule(kind) for block in model.blocks]
                pool = GlobalSelection([(layer.compactor, layer.linear) for layer in layers])
                for layer in layers:
                    layer.compactor.pool = pool
        return model

    @staticmethod
    def _compacted(model: VisionTransformer) -> list[tuple[CompactedLinear, CompactedLinear]]:
        pairs = [(block.mlp.fc2, block.attn.proj) for block in model.blocks]
        if not all(isinstance(m, CompactedLinear) and isinstance(a, CompactedLinear) for m, a in pairs):
            raise PruneError("model has no ResRep compactors: call PRUNERS['resrep'].prepare first")
        return pairs

    def impose(self, model: VisionTransformer) -> VisionTransformer:
        """Zero every compactor's final forget set now (in place, lossy): what the schedule reaches at its end."""
        for fc2, proj in self._compacted(model):
            fc2.compactor.impose()
            proj.compactor.impose()
        return model

    @torch.no_grad()
    def convert(self, model: VisionTransformer, tolerance: float = 1e-4) -> list[dict[str, list[int]]]:
        """Fold every compactor into a narrower plain layer: exact, because it refuses (PruneError) while a
        forgotten row group still has a norm above `tolerance` (training has not reached its schedule's end)."""
        pairs = self._compacted(model)
        for i, (fc2, proj) in enumerate(pairs):
            for where, compacted in (("mlp", fc2), ("heads", proj)):
                left = compacted.compactor.residual()
                if left > tolerance:
                    step = compacted.compactor.schedule
                    raise PruneError(
                        f"ResRep: block {i} {where}: the forgotten rows still have norm {left:.3g} > {tolerance:g} "
                        f"at forward {int(step.step)} of {step.steps}: train to the end of the schedule (or impose)")
        structure = []
        for block, (fc2, proj) in zip(model.blocks, pairs, strict=True):
            units = (~fc2.compactor.forget).nonzero().flatten().cpu()
            heads = (~proj.compactor.forget).nonzero().flatten().cpu()
            mlp, attn = block.mlp, block.attn
            mlp.fc1 = _narrow(mlp.fc1, mlp.fc1.weight[units], None if mlp.fc1.bias is None else mlp.fc1.bias[units])
            mlp.fc2 = fc2.fold(units)
            rows = _head_rows(heads, attn.num_heads, attn.head_dim)
            qkv = _narrow(attn.qkv, attn.qkv.weight[rows], None if attn.qkv.bias is None else attn.qkv.bias[rows])
            channels = (heads[:, None] * attn.head_dim + torch.arange(attn.head_dim)).flatten()
            _set_heads(attn, qkv, proj.fold(channels), len(heads))
            structure.append({"mlp": units.tolist(), "heads": heads.tolist()})
        return structure
