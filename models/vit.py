"""ViT factory on timm: every backbone is a timm VisionTransformer named by a registry string."""

from __future__ import annotations

from timm import create_model
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


@register_model
def vitpipe_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The CPU/test backbone: 32 px, patch 4 (64 tokens), width 64, depth 4, 4 heads."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
    for hub_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(hub_only, None)
    return VisionTransformer(**{**defaults, **kwargs})


def build_vit(arch: str, num_classes: int = 0, img_size: int | None = None, **overrides) -> VisionTransformer:
    """A randomly initialised timm ViT; `overrides` go to VisionTransformer (depth, embed_dim, ...).

    Weights never come from a hub: pretrained backbones are loaded from the artifact store.
    """
    kwargs = dict(overrides)
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{arch!r} is not a timm VisionTransformer")
    return model


