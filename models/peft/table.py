"""`peft_table`: trainable parameters and stored bytes of every PEFT method at its default config.

Built on the meta device: shapes only, no weights and no compute, so ViT-B/16 costs milliseconds.
"""

from __future__ import annotations

import torch

from vitpipe.models.peft import PEFT_METHODS
from vitpipe.models.vit import build_vit


def _is_head(name: str) -> bool:
    return name.startswith("head.")


def peft_table(arch: str = "vit_base_patch16_224", num_classes: int = 0) -> list[dict]:
    """One row per method: trainable params and delta bytes (both without the head), mergeable."""
    rows = []
    for name, method in PEFT_METHODS.items():
        with torch.device("meta"):
            model = build_vit(arch, num_classes=num_classes)
        method.apply(model)
        delta = {k: v for k, v in method.delta_state(model).items() if not _is_head(k)}
        rows.append(
            {
                "method": name,
                "trainable_params": sum(p.numel() for p in method.method_parameters(model).values()),
                "delta_bytes": method.delta_nbytes(delta),
                "mergeable": method.mergeable,
            }
        )
    return rows
