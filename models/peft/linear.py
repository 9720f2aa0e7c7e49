"""Linear probing: the backbone is frozen, only the new classification head trains."""

from __future__ import annotations

from typing import ClassVar

from vitpipe.models.peft.base import PeftMethod


class LinearProbe(PeftMethod):
    """Head only: 0 trainable backbone parameters, nothing to merge (the model stays plain timm)."""

    name: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = True
    head_only: ClassVar[bool] = True
