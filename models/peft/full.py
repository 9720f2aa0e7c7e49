"""Full fine-tuning: every parameter trains and the whole model is the per-task delta."""

from __future__ import annotations

from typing import ClassVar

from timm.models.vision_transformer import VisionTransformer

from models.peft.base import PeftConfig, PeftMethod


class FullFinetune(PeftMethod):
    """Everything trains (85.8M on ViT-B/16 without the head, as in METHODS.md); merge is a no-op."""

    name: ClassVar[str] = "full"
    mergeable: ClassVar[bool] = True

    def inject(self, model: VisionTransformer, cfg: PeftConfig) -> None:
        model.requires_grad_(True)
