"""BitFit (Zaken et al., ACL 2022): only the bias vectors of the encoder train.

Trained biases: every nn.Linear and nn.LayerNorm of the encoder (qkv, proj, fc1, fc2, norm1, norm2
and the final norm): 102,144 on ViT-B/16, METHODS.md's "~0.10M". The patch-embedding conv bias
(768 more) is not a Linear/LayerNorm bias and stays frozen, as METHODS.md words it.
"""

from __future__ import annotations

from typing import ClassVar

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.peft.base import PeftConfig, PeftMethod


class BitFit(PeftMethod):
    """Bias-only tuning; mergeable trivially (the biases are the model's own parameters)."""

    name: ClassVar[str] = "bitfit"
    mergeable: ClassVar[bool] = True

    def inject(self, model: VisionTransformer, cfg: PeftConfig) -> None:
        for name, module in model.named_modules():
            is_head = name == "head" or name.startswith("head.")
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None and not is_head:
                module.bias.requires_grad_(True)
