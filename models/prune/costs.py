"""Shapes after pruning, ToCom merged into pruned heads, and cost counters (params, FLOPs)."""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitpipe.models.prune.base import PruneError
from vitpipe.models.tocom import TokenCompensator


def unpruned_structure(model: VisionTransformer) -> list[dict[str, list[int]]]:
    """The `structure` of a model that kept everything (for merge_tocom_pruned on an unpruned model)."""
    return [{"mlp": list(range(b.mlp.fc1.out_features)), "heads": list(range(b.attn.num_heads))}
            for b in model.blocks]


def block_widths(model: VisionTransformer) -> list[dict[str, int]]:
    """Per block: MLP hidden units and heads (head_dim is unchanged by pruning)."""
    return [{"mlp_hidden": b.mlp.fc1.out_features, "num_heads": b.attn.num_heads} for b in model.blocks]


@torch.no_grad()
def merge_tocom_pruned(model: VisionTransformer, tocom: TokenCompensator, structure: list[dict[str, list[int]]],
                       source_r: int, target_r: int, scale: float) -> VisionTransformer:
    """models.tocom.merge_into_weights for a head-pruned model: s * Delta(source_r -> target_r) of the q and v
    rows of each kept head (its original index in `structure`) is added to the new qkv rows, in place."""
    if len(model.blocks) != tocom.depth or model.embed_dim != tocom.width:
        raise PruneError(f"ToCom for depth {tocom.depth} width {tocom.width} does not fit this ViT")
    mask = tocom.delta_mask(source_r, target_r)
    for block, comp, kept in zip(model.blocks, tocom.blocks, structure, strict=True):
        attn = block.attn
        d, rows = attn.head_dim, attn.num_heads * attn.head_dim
        original = (torch.tensor(kept["heads"])[:, None] * d + torch.arange(d)).flatten()
        delta_q, delta_v = comp.weight_deltas(mask.to(comp.a_q.weight.dtype))
        weight = attn.qkv.weight
        weight[:rows] += (scale * delta_q[original]).to(weight)
        weight[2 * rows:] += (scale * delta_v[original]).to(weight)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, img_size: int, batch: int = 1) -> int:
    """FLOPs of one forward at (batch, 3, img_size, img_size), counted by torch's FlopCounterMode (a
    multiply-add is 2). Fused attention is switched off while counting so the attention matmuls count."""
    fused = {m: m.fused_attn for m in model.modules() if isinstance(m, Attention)}
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    try:
        for m in fused:
            m.fused_attn = False
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(batch, 3, img_size, img_size, device=param.device, dtype=param.dtype))
    finally:
        for m, value in fused.items():
            m.fused_attn = value
        model.train(was_training)
    return int(counter.get_total_flops())
