"""ToCom, the Token Compensator (ECCV 2024): a plugin that moves a ViT between ToMe degrees.

Per block, LoRA-style low-rank updates of q and v (k untouched, so the ToMe metric is unchanged), both
reading the block's LN1 output. The R * rho hidden channels are R slices of rho; slice k is the
sub-plugin P_k for degree step k-1 -> k, and Delta(m -> n) masks the hidden channels with
mask(n) - mask(m): additive, antisymmetric, exactly zero at m = n. Trained once on the backbone by
self-distillation (teacher at r = m, student at r = n + Delta(m -> n)), it plugs into any model
fine-tuned from that backbone, as forward hooks on the qkv projections or folded into their weights.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

import safetensors.torch
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.hooks import RemovableHandle

_FORMAT = "vitpipe.tocom.v1"


class CompensatorBlock(nn.Module):
    """The q and v low-rank updates of one block: Delta(x) = B (mask * dropout(A x))."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.a_q = nn.Linear(width, hidden, bias=False)
        self.b_q = nn.Linear(hidden, width, bias=False)
        self.a_v = nn.Linear(width, hidden, bias=False)
        self.b_v = nn.Linear(hidden, width, bias=False)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.b_q.weight)
        nn.init.zeros_(self.b_v.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, C) LN1 output, mask: (R * rho,) in {-1, 0, 1} -> (Delta_q, Delta_v), each (B, N, C)."""
        delta_q = self.b_q(self.dropout(self.a_q(x)) * mask)
        delta_v = self.b_v(self.dropout(self.a_v(x)) * mask)
        return delta_q, delta_v

    def add_delta_(self, qkv: torch.Tensor, x: torch.Tensor, lo: int, hi: int, alpha: float) -> None:
        """qkv's q and v thirds += alpha * (Delta_q, Delta_v) in place, computed from hidden channels lo:hi only
        (where a Delta mask is non-zero, all of one sign, folded into alpha), each add fused into its matmul.

        qkv: (B, N, 3C) contiguous attn.qkv output; x: (B, N, C) its input. Equals forward() with that mask.
        """
        c = x.shape[-1]
        x2, out = x.reshape(-1, c), qkv.view(-1, 3 * c)
        for a, b, cols in ((self.a_q, self.b_q, slice(0, c)), (self.a_v, self.b_v, slice(2 * c, 3 * c))):
            hidden = self.dropout(F.linear(x2, a.weight[lo:hi]))
            out[:, cols].addmm_(hidden, b.weight[:, lo:hi].t(), alpha=alpha)

    def weight_deltas(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dropout-free update as (C, C) matrices: B diag(mask) A, for q and for v."""
        return self.b_q.weight * mask @ self.a_q.weight, self.b_v.weight * mask @ self.a_v.weight


class TokenCompensator(nn.Module):
    """ToCom for a backbone of `depth` blocks and `width` channels; degrees 0..max_r, rho channels each."""

    def __init__(self, depth: int, width: int, rho: int = 2, max_r: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        if min(depth, width, rho, max_r) < 1:
            raise ValueError(f"ToCom needs positive depth, width, rho, max_r; got {depth}, {width}, {rho}, {max_r}")
        self.depth, self.width, self.rho, self.max_r = depth, width, rho, max_r
        self.blocks = nn.ModuleList(CompensatorBlock(width, rho * max_r, dropout) for _ in range(depth))

    @classmethod
    def for_backbone(cls, model: VisionTransformer, rho: int = 2, max_r: int = 16) -> TokenCompensator:
        """A zero-initialised ToCom shaped for `model` (depth and width read from it)."""
        return cls(depth=len(model.blocks), width=model.embed_dim, rho=rho, max_r=max_r)

    def degree_mask(self, n: int) -> torch.Tensor:
        """(R * rho,) float mask selecting the first n slices, i.e. sub-plugins P_1..P_n."""
        if not 0 <= n <= self.max_r:
            raise ValueError(f"ToCom degree {n} outside 0..{self.max_r}")
        mask = torch.zeros(self.max_r * self.rho, device=self.blocks[0].a_q.weight.device)
        mask[: n * self.rho] = 1.0
        return mask

    def delta_mask(self, source_r: int, target_r: int) -> torch.Tensor:
        """mask(n) - mask(m) for Delta(m -> n): +1 on P_{m+1..n} when n > m, -1 on P_{n+1..m} when n < m."""
        return self.degree_mask(target_r) - self.degree_mask(source_r)

    def delta(self, block: int, x: torch.Tensor, source_r: int, target_r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled (Delta_q, Delta_v) of block `block` for m -> n; x: (B, N, C) LN1 output."""
        mask = self.delta_mask(source_r, target_r).to(x.dtype)
        return self.blocks[block](x, mask)


def _check_shape(model: VisionTransformer, tocom: TokenCompensator) -> None:
    width = model.embed_dim
    qkv_ok = all(block.attn.qkv.out_features == 3 * width for block in model.blocks)
    if len(model.blocks) != tocom.depth or width != tocom.width or not qkv_ok:
        raise ValueError(
            f"ToCom for depth {tocom.depth} width {tocom.width} does not fit a ViT of depth "
            f"{len(model.blocks)} width {width} (qkv must be 3 x width)"
        )


@dataclass
class ToComPlug:
    """A ToCom plugged into a model; degrees, scale and enabled may be changed between forwards."""

    tocom: TokenCompensator
    source_r: int
    target_r: int
    scale: float
    enabled: bool = True
    handles: list[RemovableHandle] = field(default_factory=list, repr=False)


def _qkv_hook(plug: ToComPlug, block: int):
    """Forward hook on attn.qkv: its input is the LN1 output; s Dq and s Dv are added in place to the q and v
    thirds of its output (the Linear's backward does not need its output, so autograd allows it).

    Delta(m -> n)'s mask is +1 on the hidden channels of degrees m+1..n (n > m) or -1 on n+1..m (n < m) and 0
    elsewhere, so only that channel range is computed, with the sign in the scale.
    """

    def hook(module: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor | None:
        m, n = plug.source_r, plug.target_r
        if not plug.enabled or m == n:
            return None
        if not (0 <= m <= plug.tocom.max_r and 0 <= n <= plug.tocom.max_r):
            raise ValueError(f"ToCom degrees {m} -> {n} outside 0..{plug.tocom.max_r}")
        rho, sign = plug.tocom.rho, 1.0 if n > m else -1.0
        plug.tocom.blocks[block].add_delta_(output, inputs[0], min(m, n) * rho, max(m, n) * rho, sign * plug.scale)
        return output

    return hook


def plug(
    model: VisionTransformer, tocom: TokenCompensator, source_r: int, target_r: int, scale: float = 0.1
) -> ToComPlug:
    """Add s * Delta(source_r -> target_r) to q and v of every block of `model`, without training.

    Works with plain timm and with apply_tome (both call attn.qkv on the LN1 output). The backbone's
    parameters are not touched; a model holds one plug at a time (a new one replaces the old).
    Dropout follows tocom.training, independent of the model's mode.
    """
    _check_shape(model, tocom)
    tocom.delta_mask(source_r, target_r)  # validates the degrees now rather than at forward
    unplug(model)
    state = ToComPlug(tocom, source_r, target_r, scale)
    for i, block in enumerate(model.blocks):
        state.handles.append(block.attn.qkv.register_forward_hook(_qkv_hook(state, i)))
    model._tocom_plug = state
    return state


def unplug(model: VisionTransformer) -> None:
    """Remove a plugged ToCom (no-op when there is none); the model is the plain backbone again."""
    state = getattr(model, "_tocom_plug", None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    del model._tocom_plug


@torch.no_grad()
def merge_into_weights(
    model: VisionTransformer, tocom: TokenCompensator, source_r: int, target_r: int, scale: float = 0.1
) -> VisionTransformer:
    """Fold s * Delta(source_r -> target_r) into the q and v rows of each qkv weight, in place.

    Delta is linear in the LN1 output, so W_q += s B_q diag(mask) A_q is exact: zero inference cost.
    Merging (target_r -> source_r) afterwards undoes it (antisymmetry), up to float rounding.
    """
    _check_shape(model, tocom)
    mask = tocom.delta_mask(source_r, target_r)
    width = tocom.width
    for block, comp in zip(model.blocks, tocom.blocks, strict=True):
        weight = block.attn.qkv.weight
        delta_q, delta_v = comp.weight_deltas(mask.to(comp.a_q.weight.dtype))
        weight[:width] += (scale * delta_q).to(weight)
        weight[2 * width :] += (scale * delta_v).to(weight)
    return model


def save_tocom(tocom: TokenCompensator, path: str | os.PathLike | None = None) -> bytes:
    """Serialise to safetensors bytes (config in its metadata, no pickle); also write them to `path`."""
    metadata = {"format": _FORMAT, "depth": str(tocom.depth), "width": str(tocom.width)}
    metadata |= {"rho": str(tocom.rho), "max_r": str(tocom.max_r)}
    tensors = {name: t.detach().contiguous().cpu() for name, t in tocom.state_dict().items()}
    data = safetensors.torch.save(tensors, metadata=metadata)
    if path is not None:
        with open(path, "wb") as f:
            f.write(data)
    return data


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header: 8-byte little-endian length, then JSON with a "__metadata__" entry."""
    (header_len,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}


def load_tocom(source: str | os.PathLike | bytes) -> TokenCompensator:
    """Rebuild a TokenCompensator from save_tocom's bytes or file; independent of any backbone."""
    if not isinstance(source, bytes):
        with open(source, "rb") as f:
            source = f.read()
    meta = _metadata(source)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"not a ToCom safetensors file (format {meta.get('format')!r})")
    tocom = TokenCompensator(**{key: int(meta[key]) for key in ("depth", "width", "rho", "max_r")})
    tocom.load_state_dict(safetensors.torch.load(source), strict=True)
    return tocom


def tocom_kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(softmax(t / tau) || softmax(s / tau)) * tau^2, mean over the batch; logits: (B, K).

    The teacher is a fixed target (detached).
    """
    teacher = F.log_softmax(teacher_logits.detach() / tau, dim=-1)
    student = F.log_softmax(student_logits / tau, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * tau**2
