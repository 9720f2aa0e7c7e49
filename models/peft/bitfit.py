"""BitFit (Zaken et al., ACL 2022): only the bias vectors of the encoder train.

Trained biases: every nn.Linear and nn.LayerNorm of the encoder (qkv, proj, fc1, fc2, norm1, norm2
and the final norm): 102,144 on ViT-B/16, METHODS.md's "~0.10M". The patch-embedding conv bias
(768 more) is not a Linear/LayerNorm bias and stays frozen, as METHODS.md words it.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from vitpipe.models.peft.base import PeftMethod


class BitFit(PeftMethod):
    """Bias-only tuning; mergeable trivially (the biases are the model's own parameters)."""

    name: ClassVar[str] = "bitfit"
    mergeable: ClassVar[bool] = True

    def method_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {
            f"{name}.bias": module.bias
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.LayerNorm))
            and module.bias is not None
            and not (name == "head" or name.startswith("head."))
        }
