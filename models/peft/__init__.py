"""Parameter-efficient fine-tuning methods for timm ViTs, one file each, behind one life cycle.

Usage, the same for every method:
    method = PEFT_METHODS["fact_tt"]
    model = method.apply(model, cfg)          # freeze the backbone, inject; the head trains
    opt = AdamW(method.trainable_parameters(model).values())
    state = method.delta_state(model)         # what a task stores
    method.load_delta(method.apply(fresh_backbone, cfg), state)
    plain = method.merge(model)               # mergeable methods: back to plain timm weights
Adding a method: one file with a PeftMethod subclass and one line in PEFT_METHODS; its settings class and
one line in models/settings.py::PEFT_SETTINGS (torch-free, so that pipeline configs validate without torch).
"""

from __future__ import annotations

from vitpipe.models.peft.adaptformer import AdaptFormer
from vitpipe.models.peft.base import PeftError, PeftMethod
from vitpipe.models.peft.bi_adapter import BiAdapter
from vitpipe.models.peft.bitfit import BitFit
from vitpipe.models.peft.consolidator import Consolidator
from vitpipe.models.peft.convpass import Convpass
from vitpipe.models.peft.fact import FacTTK, FacTTT
from vitpipe.models.peft.full import FullFinetune
from vitpipe.models.peft.linear import LinearProbe
from vitpipe.models.peft.lora import Lora
from vitpipe.models.peft.vpt import Vpt
from vitpipe.models.settings import PeftConfig

PEFT_METHODS: dict[str, PeftMethod] = {
    "linear": LinearProbe(),
    "full": FullFinetune(),
    "bitfit": BitFit(),
    "lora": Lora(),
    "adaptformer": AdaptFormer(),
    "bi_adapter": BiAdapter(),
    "fact_tt": FacTTT(),
    "fact_tk": FacTTK(),
    "convpass": Convpass(),
    "consolidator": Consolidator(),
    "vpt": Vpt(),
}

__all__ = ["PEFT_METHODS", "PeftConfig", "PeftError", "PeftMethod"]
