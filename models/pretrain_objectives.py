"""The pretraining objectives by name, and their weighted combination on one shared encoder."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from vitpipe.models.contrastive import InfoCL
from vitpipe.models.mim import LocalMIM
from vitpipe.models.settings import PretrainObjectiveConfig

# Each objective is built as cls(vit, cfg) and called as obj(vit, *views[: cls.num_views]).
PRETRAIN_OBJECTIVES: dict[str, type[nn.Module]] = {"localmim": LocalMIM, "infocl": InfoCL}


class PretrainObjective(nn.Module):
    """sum_k w_k * objective_k on a shared encoder: LocalMIM masks view1 itself, InfoCL sees both unmasked views.

    Only objectives with a non-zero weight are built, so a zero weight costs nothing.
    """

    def __init__(self, vit: VisionTransformer, cfg: PretrainObjectiveConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or PretrainObjectiveConfig()
        self.objectives = nn.ModuleDict(
            {name: PRETRAIN_OBJECTIVES[name](vit, getattr(cfg, name)) for name, w in cfg.weights.items() if w > 0}
        )

    def forward(
        self, vit: VisionTransformer, view1: torch.Tensor, view2: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """view1, view2: (N, 3, H, W) augmented views -> (total loss, per-objective and per-term detached
        values)."""
        total, stats = 0.0, {}
        for name, objective in self.objectives.items():
            loss, terms = objective(vit, *(view1, view2)[: objective.num_views])
            total = total + self.cfg.weights[name] * loss
            stats.update(terms, **{name: loss.detach()})
        return total, stats
