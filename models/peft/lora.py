"""LoRA (Hu et al., ICLR 2022) through Hugging Face peft, on timm's fused attention `qkv` Linear.

peft's LoRA wraps each targeted Linear: y = W x + (alpha / r) B A x, A: (r, C_in), B: (C_out, r),
B zero-initialised. The target here is the whole fused qkv Linear (C -> 3C), so one rank-r update
covers q, k and v together (timm has no separate q / v Linears to target). Count on ViT-B/16, r = 8:
12 x (8 x 768 + 2304 x 8) = 294,912, which equals METHODS.md's 0.29M for separate rank-8 updates on
q and v (12 x 2 x (8 x 768 + 768 x 8) = 294,912): same budget, but one shared A for q, k, v and an
update on k too, instead of two independent rank-8 updates on q and v.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import ClassVar

import safetensors.torch
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitpipe.models.peft.base import PeftMethod
from vitpipe.models.settings import LoraSettings


class Lora(PeftMethod):
    """Hugging Face peft LoRA injected into the timm module; merge folds B A into W."""

    name: ClassVar[str] = "lora"
    mergeable: ClassVar[bool] = True
    scopes: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")

    def inject(self, model: VisionTransformer, cfg: LoraSettings) -> None:
        config = LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules)
        )
        inject_adapter_in_model(config, model)

    def adapter_files(self, delta: Mapping[str, torch.Tensor], cfg: LoraSettings) -> dict[str, bytes]:
        """peft's adapter folder (adapter_config.json + adapter_model.safetensors, the head as a module to save):
        `PeftModel.from_pretrained(<the same timm ViT>, folder)` is this task model."""
        config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                            target_modules=list(cfg.target_modules), modules_to_save=["head"])
        state = {"base_model.model." + name.replace(".default.", "."): t.detach().cpu().contiguous()
                 for name, t in delta.items()}
        return {"adapter_config.json": json.dumps(config.to_dict(), indent=2, default=sorted).encode(),
                "adapter_model.safetensors": safetensors.torch.save(state)}

    def fold(self, model: nn.Module) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, module.get_base_layer())
        vars(model).pop("peft_config", None)  # peft's bookkeeping attribute, meaningless once merged
