"""C-SGD (Ding et al., CVPR 2019): k-means clusters, centripetal gradients, exact fold."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitpipe.models.prune.base import PruneError, Schedule, _attention, _narrow, _set_heads, keep_count
from vitpipe.models.settings import PruneSettings


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
    """nn.Linear whose output rows are tied in groups (`row_groups`: (out,) ids) by centripetal gradients.

    Over the second half of the schedule each row's deviation from its group mean fades linearly to zero, so
    that every group is identical at the end: the centripetal pull alone leaves a spread (0.516 -> 0.465 in
    100 steps at lr 1e-3), and folding a group that is not identical is lossy.
    """

    row_groups: torch.Tensor
    strength: float
    schedule: Schedule

    @property
    def count(self) -> int:
        return int(self.row_groups.max()) + 1

    def effective(self, t: torch.Tensor) -> torch.Tensor:
        """A weight or bias as the layer uses it now: group mean + fade * (row - group mean)."""
        fade = self.schedule.fade
        if fade == 1.0:
            return t
        mean = _group_mean(t, self.row_groups, self.count)
        return mean + fade * (t - mean)

    def residual(self) -> float:
        """Largest distance of a row (with its bias) from its group's mean row, as the layer uses it now."""
        rows = self.weight if self.bias is None else torch.cat([self.weight, self.bias[:, None]], dim=1)
        rows = self.effective(rows.detach())
        return float((rows - _group_mean(rows, self.row_groups, self.count)).norm(dim=1).max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.schedule.advance(self)
        weight, bias = self.weight, self.bias
        if self.training and torch.is_grad_enabled():
            weight = _Centripetal.apply(weight, self.row_groups, self.count, self.strength)
            bias = None if bias is None else _Centripetal.apply(bias, self.row_groups, self.count, self.strength)
        return F.linear(x, self.effective(weight), None if bias is None else self.effective(bias))


def _make_centripetal(linear: nn.Linear, row_groups: torch.Tensor, strength: float, steps: int) -> None:
    linear.__class__ = CentripetalLinear
    linear.register_buffer("row_groups", row_groups.to(linear.weight.device))
    linear.strength = strength
    linear.schedule = Schedule(steps).to(linear.weight.device)


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
            _make_centripetal(fc1, units, cfg.centripetal, cfg.steps)
            _make_centripetal(attn.qkv, rows.flatten(), cfg.centripetal, cfg.steps)
        return model

    @staticmethod
    def _prepared(model: VisionTransformer) -> None:
        if not all(isinstance(b.mlp.fc1, CentripetalLinear) for b in model.blocks):
            raise PruneError("model has no C-SGD clusters: call PRUNERS['csgd'].prepare first")

    @torch.no_grad()
    def impose(self, model: VisionTransformer) -> VisionTransformer:
        """Make every cluster identical now (each row set to its cluster mean; in place, lossy): what the
        schedule reaches at its end."""
        self._prepared(model)
        for block in model.blocks:
            for linear in (block.mlp.fc1, block.attn.qkv):
                for t in (linear.weight, linear.bias):
                    if t is not None:
                        t.copy_(_group_mean(t, linear.row_groups, linear.count))
        return model

    @torch.no_grad()
    def convert(self, model: VisionTransformer, tolerance: float = 1e-4) -> list[dict[str, list[int]]]:
        """Keep one unit per cluster (the cluster mean) and sum the clustered fc2 / proj columns: exact, because
        it refuses (PruneError) while a row is farther than `tolerance` from its cluster's mean row (training
        has not reached its schedule's end). Kept indices name each cluster's first member."""
        self._prepared(model)
        for i, block in enumerate(model.blocks):
            for where, linear in (("mlp", block.mlp.fc1), ("heads", block.attn.qkv)):
                left = linear.residual()
                if left > tolerance:
                    raise PruneError(
                        f"C-SGD: block {i} {where}: a row is still {left:.3g} > {tolerance:g} from its cluster's "
                        f"mean at forward {int(linear.schedule.step)} of {linear.schedule.steps}: train to the end "
                        "of the schedule (or impose)")
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
