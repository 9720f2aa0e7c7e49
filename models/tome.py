"""ToMe token merging (Bolya et al., ICLR 2023) for timm VisionTransformers, patched in place.

In every block, between attention and MLP, bipartite soft matching merges the r most similar token
pairs (similarity = cosine of the head-averaged attention keys) by size-weighted average; attention
adds log(size) to its logits (proportional attention). r = 0 runs timm's own forward, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

Merge = Callable[..., torch.Tensor]


def _identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_cls: bool) -> tuple[Merge, Merge]:
    """Match alternate tokens A -> B by cosine similarity; return (merge, unmerge) for the r best.

    metric: (B, t, c). merge(x: (B, t, C), mode) -> (B, t - r, C): the unmerged A tokens in their
    original order (cls first when protected), then the B tokens with their A partners reduced in.
    unmerge(x: (B, t - r, C)) -> (B, t, C) gives each merged A token its destination's value.
    r is capped at floor(mergeable / 2) so every merge has a distinct source in A.
    """
    t = metric.shape[1]
    r = min(r, (t - int(protect_cls)) // 2)
    if r <= 0:
        return _identity, _identity

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if protect_cls:
            scores[:, 0, :] = -torch.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1).values  # keeps spatial order, cls (index 0) first
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, s, c = src.shape
        unm = src.gather(dim=1, index=unm_idx.expand(n, s - r, c))
        src = src.gather(dim=1, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[:, :unm_len], x[:, unm_len:]
        n, _, c = unm.shape
        out = x.new_zeros(n, t, c)
        out[:, 1::2] = dst
        out.scatter_(1, (2 * unm_idx).expand(n, unm_len, c), unm)
        out.scatter_(1, (2 * src_idx).expand(n, r, c), dst.gather(dim=1, index=dst_idx.expand(n, r, c)))
        return out

    return merge, unmerge


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge. x: (B, t, C), size: (B, t, 1) or None (all ones) -> merged both."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: Merge, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    """Track which input tokens each token holds. source: (B, t, N0) 0/1 -> (B, t - r, N0)."""
    if source is None:
        source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
    return merge(source, mode="amax")


@dataclass
class ToMeInfo:
    """ToMe state shared by a model's blocks; size, source and token_counts are reset per forward."""

    r: int
    prop_attn: bool
    trace_source: bool
    protect_cls: bool
    size: torch.Tensor | None = None  # (B, t, 1): input tokens merged into each token
    source: torch.Tensor | None = None  # (B, t, N0) when trace_source
    token_counts: list[int] = field(default_factory=list)  # tokens after each block


def _attention_with_metric(
    attn: Attention, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention with log(size) added to the logits; x: (B, N, C) -> (out (B, N, C), keys' mean (B, N, c))."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
    if attn.fused_attn:
        dropout_p = attn.attn_drop.p if attn.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        x = attn.attn_drop(logits.softmax(dim=-1)) @ v
    x = attn.norm(x.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x)), k.mean(dim=1)


class ToMeBlock(Block):
    """timm Block that merges r tokens between attention and MLP; r = 0 is the block's own forward unchanged.

    A Block subclass that adds to the MLP half (a parallel adapter) patches as well if it exposes that half as
    `mlp_residual(x) -> x + MLP branch + its additions`: ToMe then merges before calling it.
    """

    _tome_info: ToMeInfo
    _tome_first: bool

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        info = self._tome_info
        if self._tome_first:
            info.size, info.source, info.token_counts = None, None, []
        if info.r == 0:
            x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            info.token_counts.append(x.shape[1])
            return x
        if attn_mask is not None or is_causal:
            raise ValueError("ToMe with r > 0 does not support attention masks")

        x_attn, metric = _attention_with_metric(self.attn, self.norm1(x), info.size if info.prop_attn else None)
        x = x + self.drop_path1(self.ls1(x_attn))
        merge, _ = bipartite_soft_matching(metric, info.r, info.protect_cls)
        if info.trace_source:
            info.source = merge_source(merge, x, info.source)
        x, info.size = merge_wavg(merge, x, info.size)
        if hasattr(self, "mlp_residual"):
            x = self.mlp_residual(x)
        else:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        info.token_counts.append(x.shape[1])
        return x


def apply_tome(
    model: VisionTransformer, r: int, prop_attn: bool = True, trace_source: bool = False
) -> VisionTransformer:
    """Patch `model` in place so every block merges r tokens; returns the same object.

    Works with or without a cls token (num_prefix_tokens <= 1) and with fused attention on or off.
    Applying it again only updates r, prop_attn and trace_source.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"ToMe patches timm VisionTransformer, got {type(model).__name__}")
    if model.num_prefix_tokens > 1:
        raise ValueError("ToMe here protects at most one prefix token (cls); register tokens are unsupported")
    info = ToMeInfo(r=0, prop_attn=prop_attn, trace_source=trace_source, protect_cls=model.cls_token is not None)
    for i, block in enumerate(model.blocks):
        patched = _tome_class(type(block))
        if patched is None or not isinstance(block.attn, Attention):
            raise TypeError(f"block {i} is {type(block).__name__}; ToMe needs a timm Block with Attention "
                            "(or a Block subclass that defines mlp_residual)")
        block.__class__ = patched
        block._tome_info, block._tome_first = info, i == 0
    model._tome_info = info
    set_tome_r(model, r)
    return model


_TOME_CLASSES: dict[type, type] = {Block: ToMeBlock}


def _tome_class(cls: type) -> type | None:
    """ToMeBlock for timm's Block; ToMe<cls>(ToMeBlock, cls) for a Block subclass with mlp_residual."""
    if issubclass(cls, ToMeBlock):
        return cls
    if cls not in _TOME_CLASSES and issubclass(cls, Block) and hasattr(cls, "mlp_residual"):
        _TOME_CLASSES[cls] = type(f"ToMe{cls.__name__}", (ToMeBlock, cls), {"__module__": cls.__module__})
    return _TOME_CLASSES.get(cls)


def set_tome_r(model: VisionTransformer, r: int) -> None:
    """Set the tokens merged per block (the compression degree) of a ToMe-patched model."""
    if not hasattr(model, "_tome_info"):
        raise ValueError("model is not ToMe-patched; call apply_tome first")
    if int(r) != r or r < 0:
        raise ValueError(f"ToMe r must be a non-negative integer, got {r!r}")
    model._tome_info.r = int(r)


def tome_r(model: VisionTransformer) -> int:
    """The compression degree r of a ToMe-patched model (0 when it is not patched)."""
    info = getattr(model, "_tome_info", None)
    return 0 if info is None else info.r


def tome_info(model: VisionTransformer) -> ToMeInfo:
    """The ToMe state of a patched model: after a forward, per-block token counts, sizes and sources."""
    if not hasattr(model, "_tome_info"):
        raise ValueError("model is not ToMe-patched; call apply_tome first")
    return model._tome_info
