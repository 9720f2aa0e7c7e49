"""The deployable model: safetensors weights + a JSON that describes how to rebuild them.

    export(model, "out/", meta)     # out/model.safetensors, out/model.json
    model = load("out/")            # a timm VisionTransformer (pruned widths, ToMe r set), eval mode

`load` needs torch, timm, safetensors and models.tome only (models.peft too, for a model that kept an unmergeable
PEFT branch); nothing of the training code, and nothing is unpickled. The JSON holds the timm constructor
arguments, every block's MLP width and heads, the ToMe degree, and whatever the caller adds in `meta` (keep
ratios, preprocessing: image size, mean / std).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitpipe.models.tome import apply_tome, tome_r

FORMAT = "vitpipe.deploy.v1"
WEIGHTS, CONFIG = "model.safetensors", "model.json"
PEFT_PREFIX = "peft."


class DeployError(ValueError):
    """An exported model cannot be written or rebuilt; names the file."""


def _is(module: nn.Module | None) -> bool:
    return module is not None and not isinstance(module, nn.Identity)


def architecture(model: VisionTransformer) -> dict[str, Any]:
    """timm VisionTransformer kwargs that rebuild `model`'s layout, plus each block's widths."""
    first = model.blocks[0]
    timm_kwargs = {
        "img_size": list(model.patch_embed.img_size), "patch_size": list(model.patch_embed.patch_size),
        "in_chans": model.patch_embed.proj.in_channels, "num_classes": model.num_classes,
        "global_pool": model.global_pool, "embed_dim": model.embed_dim, "depth": len(model.blocks),
        "num_heads": first.attn.num_heads, "qkv_bias": first.attn.qkv.bias is not None,
        "qk_norm": _is(first.attn.q_norm), "proj_bias": first.attn.proj.bias is not None,
        "init_values": 1.0 if isinstance(first.ls1, LayerScale) else None,
        "class_token": model.cls_token is not None, "no_embed_class": model.no_embed_class,
        "reg_tokens": model.num_reg_tokens, "pre_norm": _is(model.norm_pre),
        "final_norm": _is(model.norm) or _is(model.fc_norm),  # timm builds fc_norm only with final_norm
        "fc_norm": _is(model.fc_norm), "dynamic_img_size": model.dynamic_img_size,
    }
    blocks = [{"num_heads": b.attn.num_heads, "head_dim": b.attn.head_dim, "mlp_hidden": b.mlp.fc1.out_features,
               "act": type(b.mlp.act).__name__} for b in model.blocks]
    return {"timm": timm_kwargs, "blocks": blocks}


def build(arch: dict[str, Any]) -> VisionTransformer:
    """An uninitialised-weights ViT with the exported layout: per block, fc1/fc2 and qkv/proj resized."""
    kwargs = dict(arch["timm"])
    kwargs["img_size"], kwargs["patch_size"] = tuple(kwargs["img_size"]), tuple(kwargs["patch_size"])
    model = VisionTransformer(**kwargs, weight_init="skip")
    width = model.embed_dim
    for i, (block, spec) in enumerate(zip(model.blocks, arch["blocks"], strict=True)):
        if type(block.mlp.act).__name__ != spec["act"]:
            raise DeployError(f"block {i}: activation {spec['act']} is not timm's default here")
        mlp, attn = block.mlp, block.attn
        mlp.fc1 = nn.Linear(width, spec["mlp_hidden"], bias=mlp.fc1.bias is not None)
        mlp.fc2 = nn.Linear(spec["mlp_hidden"], width, bias=mlp.fc2.bias is not None)
        attn_dim = spec["num_heads"] * spec["head_dim"]
        attn.num_heads, attn.head_dim, attn.attn_dim = spec["num_heads"], spec["head_dim"], attn_dim
        attn.scale = spec["head_dim"] ** -0.5
        attn.qkv = nn.Linear(width, 3 * attn_dim, bias=attn.qkv.bias is not None)
        attn.proj = nn.Linear(attn_dim, width, bias=attn.proj.bias is not None)
    return model


def export(model: VisionTransformer, path: str | os.PathLike, meta: dict[str, Any] | None = None,
           peft: tuple[Any, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write `path`/model.safetensors and `path`/model.json; returns the JSON written.

    peft: (method, config) when the model still carries an unmerged PEFT branch; its delta is stored through the
    method's own delta_state (e.g. packed 1-bit codes) under "peft." and re-applied by `load`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config: dict[str, Any] = {"format": FORMAT, "architecture": architecture(model), **(meta or {})}
    info = getattr(model, "_tome_info", None)
    config["tome"] = {"r": tome_r(model), "prop_attn": info.prop_attn if info else True}
    if peft is not None:
        method, peft_cfg = peft
        delta = method.delta_state(model)
        own = set(method.trainable_parameters(model))
        state = {k: v for k, v in state.items() if k not in own}
        state |= {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in delta.items()}
        config["peft"] = {"name": method.name, "config": dict(peft_cfg)}
    safetensors.torch.save_file(state, str(path / WEIGHTS), metadata={"format": FORMAT})
    (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


def load(path: str | os.PathLike) -> VisionTransformer:
    """Rebuild an exported model from `path` (a directory written by `export`), in eval mode."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise DeployError(f"{path / CONFIG}: no exported model here") from None
    if config.get("format") != FORMAT:
        raise DeployError(f"{path / CONFIG}: format {config.get('format')!r}, expected {FORMAT}")
    state = safetensors.torch.load_file(str(path / WEIGHTS))
    model = build(config["architecture"])
    delta = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items() if k.startswith(PEFT_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(PEFT_PREFIX)}
    method = None
    if "peft" in config:
        from vitpipe.models.peft import PEFT_METHODS  # only for a model that kept an unmergeable branch

        method = PEFT_METHODS[config["peft"]["name"]]
        model = method.apply(model, config["peft"]["config"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = set(method.trainable_parameters(model)) if method is not None else set()
    if unexpected or set(missing) - own:
        raise DeployError(f"{path / WEIGHTS} does not fit {path / CONFIG}: missing {sorted(set(missing) - own)[:5]}, "
                          f"unexpected {unexpected[:5]}")
    if method is not None:
        method.load_delta(model, delta)
    tome = config.get("tome", {})
    if tome.get("r", 0) > 0:
        apply_tome(model, tome["r"], prop_attn=tome.get("prop_attn", True))
    return model.requires_grad_(False).eval()
