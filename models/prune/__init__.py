"""Structured pruning of timm ViTs: MLP hidden units (fc1 rows / fc2 columns) and attention heads (qkv rows /
proj columns), by ResRep (compactors) or C-SGD (centripetal clusters); METHODS.md section 6.

Life cycle, the same for both methods:
    pruner = PRUNERS["resrep"]
    pruner.prepare(model, PruneSettings(keep_ratio=0.5, steps=N))   # in place: compactors / centripetal layers
    ... N training forwards with the task loss (every parameter may train) ...
    structure = pruner.convert(model)   # exact fold into a plain, narrower timm ViT
Over the first half of the N forwards the structure is chosen, over the second what the conversion drops fades
to zero, so the trained model equals the converted one; `convert` refuses (PruneError) a model that has not got
there, and `impose` forces the structure on a model that did not train (lossy).
The converted model is a timm VisionTransformer whose blocks have narrower fc1/fc2 and fewer heads (attn.num_heads
smaller, head_dim unchanged); `structure` lists the original indices each block kept.
"""

from __future__ import annotations

from typing import Protocol

from timm.models.vision_transformer import VisionTransformer

from vitpipe.models.prune.base import PruneError, keep_count
from vitpipe.models.prune.costs import block_widths, count_flops, count_params, merge_tocom_pruned, unpruned_structure
from vitpipe.models.prune.csgd import CSGD, kmeans
from vitpipe.models.prune.resrep import Compactor, ResRep
from vitpipe.models.settings import PruneSettings

__all__ = ["CSGD", "PRUNERS", "Compactor", "PruneError", "PruneSettings", "Pruner", "ResRep", "block_widths",
           "count_flops", "count_params", "keep_count", "kmeans", "merge_tocom_pruned", "unpruned_structure"]


class Pruner(Protocol):
    """A structured pruner: `prepare` adds its trainable structure in place, training with the task loss for
    the settings' steps makes that structure exact, `convert` folds it into a plain, narrower timm ViT and
    returns the kept units (refusing a model whose structure is not exact); `impose` makes it exact now."""

    name: str

    def prepare(self, model: VisionTransformer, cfg: PruneSettings) -> VisionTransformer: ...

    def impose(self, model: VisionTransformer) -> VisionTransformer: ...

    def convert(self, model: VisionTransformer, tolerance: float = 1e-4) -> list[dict[str, list[int]]]: ...


PRUNERS: dict[str, Pruner] = {"resrep": ResRep(), "csgd": CSGD()}
