"""Pretrained backbone weights: unwrap a release's checkpoint, fit it onto a timm ViT, load it.

    state = unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True), path)
    report = load_into(model, state, source=path)    # WeightsError (one line) when it does not fit

Accepted layouts: a plain timm VisionTransformer state dict (also vitpipe's encoder.safetensors), MAE and
LocalMIM pre-training releases (`{'model': ...}` with decoders and mask tokens), DeiT releases (with the
distillation token). The classification head is always dropped: downstream stages build their own.
Reading files, S3 and the HF hub is cluster/weights.py's job; this module only sees tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from timm import create_model
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import PretrainedCfg, get_pretrained_cfg
from torch import Tensor, nn

# Weight-key prefixes of heads: always dropped from the weights, and allowed to stay missing in the model.
HEAD_PREFIXES = ("head.", "head_dist.")
# What pre-training releases carry besides the encoder; dropped when the model has no such key.
PRETRAINING_ONLY = (
    ("decoder", "MAE/LocalMIM decoder"),  # decoder_embed, decoder_blocks.*, decoder.<scale>.* (LocalMIM)
    ("mask_token", "MIM mask token"),
    ("hog_enc.", "LocalMIM HOG targets"),
    ("dist_token", "DeiT distillation token"),
)
_SHOWN = 3  # key names an error message lists per kind before "(+N more)"


class WeightsError(ValueError):
    """Pretrained weights cannot be read or do not fit the model; the message names the source."""


@dataclass(frozen=True)
class WeightsReport:
    """How a checkpoint's keys met the model's: `ok` when every non-head model key got a tensor."""

    matched: tuple[str, ...]
    missing: tuple[str, ...]  # model keys with no tensor (heads excluded: the stage builds its own)
    unexpected: tuple[str, ...]  # checkpoint keys the model has no place for
    mismatched: tuple[str, ...]  # "key (checkpoint shape) vs (model shape)"
    dropped: tuple[str, ...]  # checkpoint keys removed on purpose: heads, decoders, tokens
    resampled: tuple[str, ...]  # "key (old shape) -> (new shape)"
    renamed: tuple[str, ...]  # "old -> new" (LocalMIM's last tap norm becomes the final norm)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (f"{len(self.matched)} matched, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.mismatched)} shape mismatches, {len(self.dropped)} dropped, "
                f"{len(self.resampled)} resampled, {len(self.renamed)} renamed")

    def misfit(self, source: str, arch: str) -> str:
        """The one-line error for a report that is not `ok`."""
        count = len(self.missing) + len(self.unexpected) + len(self.mismatched)
        parts = [f"{kind} {_first(keys)}" for kind, keys in
                 (("missing", self.missing), ("unexpected", self.unexpected), ("shape", self.mismatched)) if keys]
        hint = ""
        if any(k.startswith("fc_norm.") for k in self.unexpected) and any(k.startswith("norm.") for k in self.missing):
            hint = " (the weights pooled by global average: build the model with global_pool='avg')"
        return f"weights {source}: {count} keys do not fit {arch}: {'; '.join(parts)}{hint}"


def _first(keys: tuple[str, ...]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def unwrap_checkpoint(checkpoint: object, source: str) -> dict[str, Tensor]:
    """The flat state dict inside a loaded checkpoint: `{'model': ...}` (MAE, DeiT, LocalMIM) or
    `{'state_dict': ...}` unwrapped, a DDP `module.` prefix stripped, every value a tensor."""
    state = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"weights {source}: not a state dict (got {type(checkpoint).__name__})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"weights {source}: {len(bad)} entries are not tensors: {_first(tuple(bad))}")
    return dict(state)


def adapt_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], WeightsReport]:
    """Fit a timm-layout state dict to `model` (a timm VisionTransformer): drop heads and pre-training
    parts, take LocalMIM's last tap norm as the final norm, resample pos_embed and patch_embed.proj."""
    target = model.state_dict()
    state = dict(state)
    had_dist_token = "dist_token" in state and "dist_token" not in target
    src_prefix = _prefix_tokens(state)
    dropped = _drop_pretraining_keys(state, target)
    renamed = _take_last_tap_norm(state, target, dropped)
    resampled = _fit_pos_embed(state, model, src_prefix, had_dist_token)
    resampled += _fit_patch_embed(state, target)

    matched, mismatched = [], []
    for key, value in state.items():
        if key in target and value.shape == target[key].shape:
            matched.append(key)
        elif key in target:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}")
    missing = [k for k in target if k not in state and not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in target]
    report = WeightsReport(tuple(matched), tuple(missing), tuple(unexpected), tuple(mismatched),
                           tuple(dropped), tuple(resampled), tuple(renamed))
    return {k: state[k] for k in matched}, report


def load_into(model: nn.Module, state: Mapping[str, Tensor], source: str, arch: str | None = None) -> WeightsReport:
    """Adapt `state` to `model` and load it in place; WeightsError naming `source`, `arch` (default: the
    model's timm name) and the keys on a misfit."""
    adapted, report = adapt_state_dict(state, model)
    if not report.ok:
        raise WeightsError(report.misfit(source, arch or arch_name(model)))
    model.load_state_dict(adapted, strict=False)
    return report


def arch_name(model: nn.Module) -> str:
    """The timm registry name a model was built from, else its class name (for messages)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _prefix_tokens(state: Mapping[str, Tensor]) -> int:
    """Tokens a checkpoint puts before the patch tokens: class, distillation, registers."""
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    return ("cls_token" in state) + ("dist_token" in state) + regs


def _drop_pretraining_keys(state: dict[str, Tensor], target: Mapping[str, Tensor]) -> list[str]:
    dropped = [k for k in state if k.startswith(HEAD_PREFIXES)]
    dropped += [k for k in state if k not in target and k not in dropped
                and any(k.startswith(prefix) for prefix, _ in PRETRAINING_ONLY)]
    for key in dropped:
        del state[key]
    return dropped


def _take_last_tap_norm(state: dict[str, Tensor], target: Mapping[str, Tensor], dropped: list[str]) -> list[str]:
    """LocalMIM keeps one norm per tap (`norm.<i>.*`) and no final norm; its last tap sits on the last
    block, so that norm is the encoder's final `norm` and the others only fed the decoders."""
    per_tap = {k: re.fullmatch(r"norm\.(\d+)\.(\w+)", k) for k in state}
    per_tap = {k: m for k, m in per_tap.items() if m}
    if not per_tap or "norm.weight" not in target or "norm.weight" in state:
        return []
    last = max(int(m[1]) for m in per_tap.values())
    for key, m in per_tap.items():
        value = state.pop(key)
        if int(m[1]) == last:
            state[f"norm.{m[2]}"] = value
        else:
            dropped.append(key)
    return [f"norm.{last} -> norm"]


def _fit_pos_embed(state: dict[str, Tensor], model: nn.Module, src_prefix: int, drop_dist: bool) -> list[str]:
    """Resample the absolute position embedding to the model's patch grid, keeping the prefix tokens'
    positions as they are; DeiT's distillation position (index 1, after the class token) goes with its token."""
    pos, target = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.ndim != 3:
        return []
    n = pos.shape[1]
    if _is_square(n - src_prefix):
        pos_prefix = src_prefix
    elif _is_square(n):
        pos_prefix = 0
    else:
        return []
    if drop_dist and pos_prefix >= 2:
        pos, pos_prefix = torch.cat([pos[:, :1], pos[:, 2:]], dim=1), pos_prefix - 1
    model_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    if pos_prefix != model_prefix or pos.shape[2] != target.shape[2]:
        return []
    side = math.isqrt(pos.shape[1] - pos_prefix)
    new = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size), old_size=[side, side],
                                 num_prefix_tokens=pos_prefix)
    if new is state["pos_embed"]:
        return []
    resampled = f"pos_embed {tuple(state['pos_embed'].shape)} -> {tuple(new.shape)}"
    state["pos_embed"] = new
    return [resampled]


def _fit_patch_embed(state: dict[str, Tensor], target: Mapping[str, Tensor]) -> list[str]:
    """A different patch size: resample the patch kernel (FlexiViT's pseudo-inverse resize, via timm)."""
    key = "patch_embed.proj.weight"
    weight, want = state.get(key), target.get(key)
    if weight is None or want is None or weight.ndim != 4 or weight.shape == want.shape:
        return []
    if weight.shape[:2] != want.shape[:2]:
        return []
    state[key] = resample_patch_embed(weight, new_size=list(want.shape[-2:]))
    return [f"{key} {tuple(weight.shape)} -> {tuple(want.shape)}"]


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


@dataclass(frozen=True)
class TimmWeights:
    """Where timm's pretrained config says a model's weights live, resolved as timm's loader would."""

    kind: str  # "file", "hf-hub" or "url"
    location: str  # a path, a hub repo id ("timm/vit_...", optionally "@revision"), or a URL
    filename: str | None  # hub file timm asks for (None: model.safetensors, else pytorch_model.bin)
    custom_load: bool  # the file is in a foreign format (e.g. JAX .npz) that model.load_pretrained reads


def timm_weights_location(name: str) -> TimmWeights:
    """timm's pretrained weights for `name` ("arch.tag"; the default tag without one), without fetching
    them: local file first, then the HF hub, then a URL (timm's own order)."""
    cfg = _pretrained_cfg(name)
    if cfg.file:
        return TimmWeights("file", cfg.file, None, bool(cfg.custom_load))
    if cfg.hf_hub_id:
        # timm reads a hub file with model.load_pretrained only for custom_load="hf" and a named file.
        custom = cfg.custom_load == "hf" and bool(cfg.hf_hub_filename)
        return TimmWeights("hf-hub", cfg.hf_hub_id, cfg.hf_hub_filename, custom)
    if cfg.url:
        return TimmWeights("url", cfg.url, None, bool(cfg.custom_load))
    raise WeightsError(f"weights timm:{name}: timm's config for {name!r} names no weight file")


def _pretrained_cfg(name: str) -> PretrainedCfg:
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # a known architecture with an unknown tag
        cfg = None
    if cfg is None:
        raise WeightsError(f"weights timm:{name}: timm has no pretrained weights named {name!r}")
    return cfg


def timm_state_dict(name: str, file: str, custom_load: bool = False, **model_kwargs) -> dict[str, Tensor]:
    """The state dict timm's own pretrained loader makes of `file` for model `name`: the model is built
    at its registered shape (`model_kwargs` override it) with pretrained=True and the file as overlay,
    so timm's per-release conversions (JAX .npz, CLIP, DINOv2, ...) run exactly as on the hub route."""
    _pretrained_cfg(name)  # an architecture without pretrained configs would ignore the overlay
    overlay = dict(file=file, custom_load=custom_load)
    try:
        model = create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)
    except (RuntimeError, ValueError, OSError) as e:
        raise WeightsError(f"weights timm:{name}: timm could not load {file}: {str(e).splitlines()[0]}") from e
    return model.state_dict()
