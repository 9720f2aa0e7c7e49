"""Structured pruning of timm ViTs: MLP hidden units (fc1 rows / fc2 columns) and attention heads (qkv rows /
proj columns), by ResRep (compactors) or C-SGD (centripetal clusters); METHODS.md section 6.

Life cycle, the same for both methods:
    pruner = PRUNERS["resrep"]
    pruner.prepare(model, PruneSettings(keep_ratio=0.5))   # in place: compactors / centripetal layers
    ... train with the task loss (every parameter may train) ...
    structure = pruner.convert(model)                       # exact fold into a plain, narrower timm ViT
The converted model is a timm VisionTransformer whose blocks have narrower fc1/fc2 and fewer heads (attn.num_heads
smaller, head_dim unchanged); `structure` lists the original indices each block kept.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.tocom import TokenCompensator


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


# ---------------------------------------------------------------------------------------------
# ResRep: compactors, gradient resetting, exact conversion.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# C-SGD: k-means clusters, centripetal gradients, exact fold.
# ---------------------------------------------------------------------------------------------


def kmeans(points: torch.Tensor, k: int, seed: int, iters: int = 50) -> torch.Tensor:
    """Cluster ids (n,) in 0..k-1 of points (n, f), every cluster non-empty; k-means++ init from `seed`."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise PruneError(f"cannot make {k} clusters of {n} units")
    points = points.detach().double().cpu()
    gen = torch.Generator().manual_seed(seed)
    centers = [points[torch.randint(n, (1,), generator=gen)]]
    for _ in range(1, k):
        dist = torch.cdist(points, torch.cat(centers)).min(dim=1).values ** 2
        weights = dist if dist.sum() > 0 else torch.ones(n, dtype=points.dtype)
        centers.append(points[torch.multinomial(weights, 1, generator=gen)])
    center = torch.cat(centers)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(points, center)
        assign = dist.argmin(dim=1)
        for c in range(k):  # an empty cluster takes the point farthest from its own center
            if not (assign == c).any():
                sizes = torch.bincount(assign, minlength=k)
                own = dist[torch.arange(n), assign].masked_fill(sizes[assign] < 2, -1.0)
                assign[own.argmax()] = c
        sizes = torch.bincount(assign, minlength=k).to(points)[:, None]
        new = points.new_zeros(k, points.shape[1]).index_add_(0, assign, points) / sizes
        if torch.equal(new, center):
            break
        center = new
    first = torch.stack([(assign == c).nonzero()[0, 0] for c in range(k)])
    return torch.argsort(torch.argsort(first))[assign]  # relabel: clusters ordered by their first member


def _group_mean(t: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """Each row of t (rows, ...) replaced by the mean of its group's rows."""
    flat = t.reshape(t.shape[0], -1)
    sums = flat.new_zeros(count, flat.shape[1]).index_add_(0, groups, flat)
    sizes = torch.bincount(groups, minlength=count).to(flat)[:, None]
    return (sums / sizes)[groups].reshape(t.shape)


class _Centripetal(torch.autograd.Function):
    """Identity forward; backward: each row gets its group's mean gradient plus epsilon * (row - group mean),
    so rows of a group move together and are pulled to their common centre (C-SGD's update)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, groups: torch.Tensor, count: int, strength: float) -> torch.Tensor:
        ctx.save_for_backward(t, groups)
        ctx.count, ctx.strength = count, strength
        return t.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        t, groups = ctx.saved_tensors
        pull = ctx.strength * (t - _group_mean(t, groups, ctx.count))
        return _group_mean(grad, groups, ctx.count) + pull, None, None, None


class CentripetalLinear(nn.Linear):
    """nn.Linear whose output rows are tied in groups (`row_groups`: (out,) ids) by centripetal gradients."""

    row_groups: torch.Tensor
    strength: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = int(self.row_groups.max()) + 1
        weight = _Centripetal.apply(self.weight, self.row_groups, count, self.strength)
        bias = None if self.bias is None else _Centripetal.apply(self.bias, self.row_groups, count, self.strength)
        return F.linear(x, weight, bias)


def _make_centripetal(linear: nn.Linear, row_groups: torch.Tensor, strength: float) -> None:
    linear.__class__ = CentripetalLinear
    linear.register_buffer("row_groups", row_groups.to(linear.weight.device))
    linear.strength = strength


def _make_plain(linear: nn.Linear) -> None:
    del linear.row_groups, linear.strength
    linear.__class__ = nn.Linear


class CSGD:
    """C-SGD (Ding et al., CVPR 2019): fc1 rows and heads clustered into as many clusters as units to keep;
    centripetal training makes each cluster identical; the fold keeps one unit per cluster."""

    name: ClassVar[str] = "csgd"

    def prepare(self, model: VisionTransformer, cfg: PruneSettings) -> VisionTransformer:
        for i, block in enumerate(model.blocks):
            attn, fc1 = _attention(block, i), block.mlp.fc1
            bias = [] if fc1.bias is None else [fc1.bias[:, None]]
            units = kmeans(torch.cat([fc1.weight, *bias], dim=1), keep_count(fc1.out_features, cfg.keep_ratio),
                           cfg.seed + i)
            h, d = attn.num_heads, attn.head_dim
            qkv = attn.qkv.weight.reshape(3, h, d, -1).transpose(0, 1).reshape(h, -1)
            if attn.qkv.bias is not None:
                qkv = torch.cat([qkv, attn.qkv.bias.reshape(3, h, d).transpose(0, 1).reshape(h, -1)], dim=1)
            kept = keep_count(h, cfg.heads_ratio)
            heads = kmeans(qkv, kept, cfg.seed + 1000 + i)
            # qkv row (t, head, j) is tied to the rows (t, head', j) of the heads in its cluster
            rows = (torch.arange(3)[:, None, None] * kept + heads[None, :, None]) * d + torch.arange(d)
            _make_centripetal(fc1, units, cfg.centripetal)
            _make_centripetal(attn.qkv, rows.flatten(), cfg.centripetal)
        return model

    @staticmethod
    def _prepared(model: VisionTransformer) -> None:
        if not all(isinstance(b.mlp.fc1, CentripetalLinear) for b in model.blocks):
            raise PruneError("model has no C-SGD clusters: call PRUNERS['csgd'].prepare first")

    @torch.no_grad()
    def snap(self, model: VisionTransformer) -> VisionTransformer:
        """Make every cluster exactly identical (each row set to its cluster mean), in place."""
        self._prepared(model)
        for block in model.blocks:
            for linear in (block.mlp.fc1, block.attn.qkv):
                count = int(linear.row_groups.max()) + 1
                for t in (linear.weight, linear.bias):
                    if t is not None:
                        t.copy_(_group_mean(t, linear.row_groups, count))
        return model

    @torch.no_grad()
    def convert(self, model: VisionTransformer) -> list[dict[str, list[int]]]:
        """Keep one unit per cluster (the cluster mean) and sum the clustered fc2 / proj columns: exact once
        every cluster is identical (see `snap`). Kept indices name each cluster's first member."""
        self._prepared(model)
        structure = []
        for block in model.blocks:
            mlp, attn = block.mlp, block.attn
            units = mlp.fc1.row_groups.cpu()
            k = int(units.max()) + 1
            onehot = F.one_hot(units, k).to(mlp.fc2.weight)  # (hidden, k)
            fc1 = _fold_rows(mlp.fc1, units, k)
            mlp.fc2 = _narrow(mlp.fc2, mlp.fc2.weight @ onehot, mlp.fc2.bias)
            mlp.fc1 = fc1

            d, h = attn.head_dim, attn.num_heads
            heads = attn.qkv.row_groups.cpu()[:h * d:d] // d  # cluster of each head, from its first q row
            kept = int(heads.max()) + 1
            qkv = _fold_rows(attn.qkv, attn.qkv.row_groups.cpu(), 3 * kept * d)
            columns = F.one_hot(heads, kept).to(attn.proj.weight).repeat_interleave(d, 0)  # (h d, kept)
            columns = (columns[:, :, None] * torch.eye(d).to(columns)[:, None, :].repeat(h, 1, 1)).flatten(1)
            _set_heads(attn, qkv, _narrow(attn.proj, attn.proj.weight @ columns, attn.proj.bias), kept)
            structure.append({"mlp": _first_members(units, k), "heads": _first_members(heads, kept)})
        return structure


def _fold_rows(linear: CentripetalLinear, groups: torch.Tensor, count: int) -> nn.Linear:
    """A plain Linear with one row per group: the group's mean row (and bias)."""
    sizes = torch.bincount(groups, minlength=count).to(linear.weight)[:, None]
    weight = linear.weight.new_zeros(count, linear.in_features).index_add_(0, groups.to(linear.weight.device),
                                                                          linear.weight) / sizes
    bias = None
    if linear.bias is not None:
        bias = linear.bias.new_zeros(count).index_add_(0, groups.to(linear.weight.device), linear.bias) / sizes[:, 0]
    return _narrow(linear, weight, bias)


def _first_members(groups: torch.Tensor, count: int) -> list[int]:
    return [int((groups == c).nonzero()[0, 0]) for c in range(count)]


PRUNERS: dict[str, ResRep | CSGD] = {"resrep": ResRep(), "csgd": CSGD()}


# ---------------------------------------------------------------------------------------------
# Shapes after pruning, ToCom on pruned heads, and cost counters.
# ---------------------------------------------------------------------------------------------


def unpruned_structure(model: VisionTransformer) -> list[dict[str, list[int]]]:
    """The `structure` of a model that kept everything (for merge_tocom_pruned on an unpruned model)."""
    return [{"mlp": list(range(b.mlp.fc1.out_features)), "heads": list(range(b.attn.num_heads))}
            for b in model.blocks]


def block_widths(model: VisionTransformer) -> list[dict[str, int]]:
    """Per block: MLP hidden units and heads (head_dim is unchanged by pruning)."""
    return [{"mlp_hidden": b.mlp.fc1.out_features, "num_heads": b.attn.num_heads} for b in model.blocks]


@torch.no_grad()
def merge_tocom_pruned(model: VisionTransformer, tocom: TokenCompensator, structure: list[dict[str, list[int]]],
                       source_r: int, target_r: int, scale: float) -> VisionTransformer:
    """models.tocom.merge_into_weights for a head-pruned model: s * Delta(source_r -> target_r) of the q and v
    rows of each kept head (its original index in `structure`) is added to the new qkv rows, in place."""
    if len(model.blocks) != tocom.depth or model.embed_dim != tocom.width:
        raise PruneError(f"ToCom for depth {tocom.depth} width {tocom.width} does not fit this ViT")
    mask = tocom.delta_mask(source_r, target_r)
    for block, comp, kept in zip(model.blocks, tocom.blocks, structure, strict=True):
        attn = block.attn
        d, rows = attn.head_dim, attn.num_heads * attn.head_dim
        original = (torch.tensor(kept["heads"])[:, None] * d + torch.arange(d)).flatten()
        delta_q, delta_v = comp.weight_deltas(mask.to(comp.a_q.weight.dtype))
        weight = attn.qkv.weight
        weight[:rows] += (scale * delta_q[original]).to(weight)
        weight[2 * rows:] += (scale * delta_v[original]).to(weight)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, img_size: int, batch: int = 1) -> int:
    """FLOPs of one forward at (batch, 3, img_size, img_size), counted by torch's FlopCounterMode (a
    multiply-add is 2). Fused attention is switched off while counting so the attention matmuls count."""
    fused = {m: m.fused_attn for m in model.modules() if isinstance(m, Attention)}
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    try:
        for m in fused:
            m.fused_attn = False
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(batch, 3, img_size, img_size, device=param.device, dtype=param.dtype))
    finally:
        for m, value in fused.items():
            m.fused_attn = value
        model.train(was_training)
    return int(counter.get_total_flops())
