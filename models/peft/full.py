"""Full fine-tuning: every parameter trains and the whole model is the per-task delta."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from vitpipe.models.peft.base import PeftMethod


class FullFinetune(PeftMethod):
    """Everything trains (85.8M on ViT-B/16 without the head, as in METHODS.md); merge is a no-op."""

    name: ClassVar[str] = "full"
    mergeable: ClassVar[bool] = True

    def method_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if not name.startswith("head.")}
