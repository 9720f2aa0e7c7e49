"""1-bit adapters (Jie et al., ICCV 2023, "Revisiting the parameter efficiency of adapters from the
perspective of precision redundancy"): AdaptFormer branches whose weights are quantized.

Branch: d = 32, Down / Up without biases, input = x after the attention residual, ReLU, dropout 0.1,
times s, beside the MLP (adaptformer.ParallelAdapterBlock). Every adapter matrix W is fake-quantized
in the forward: standardise by its own mean / std, snap each entry to the nearest of 2^bits levels of a
quantizer of N(0, 1) (Lloyd-Max's by default, or the authors' median levels), de-standardise; gradients reach
the latent float
W straight through. The delta stores the level indices bit-packed (8 per byte at 1 bit) plus mean and
std per matrix (float32), and the head in float. ViT-B/16 at d = 32, 1 bit: 589,824 weights ->
73,728 bytes of codes + 24 x 8 bytes of statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitpipe.models.peft.adaptformer import Adapter, add_parallel_adapters
from vitpipe.models.peft.base import PeftError, PeftMethod, copy_into
from vitpipe.models.settings import BiAdapterSettings


def _centroids(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional means of N(0, 1) in the cells between level midpoints (n,), and their Jacobian (n, n).

    c_i = (pdf(a) - pdf(b)) / (cdf(b) - cdf(a)) on the cell [a, b]; dc_i/da = pdf(a) (c_i - a) / mass,
    dc_i/db = pdf(b) (b - c_i) / mass, and each inner edge is the mean of its two levels.
    """
    inf = levels.new_tensor([math.inf])
    edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
    pdf = torch.exp(-0.5 * edges**2) / math.sqrt(2 * math.pi)
    lo, hi = edges[:-1], edges[1:]
    ndtr = torch.special.ndtr  # upper-tail masses from the mirrored cdf, to keep them accurate
    mass = torch.where(lo > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))
    centroids = (pdf[:-1] - pdf[1:]) / mass
    d_lo = pdf[1:-1] * (centroids[1:] - edges[1:-1]) / mass[1:] / 2
    d_hi = pdf[1:-1] * (edges[1:-1] - centroids[:-1]) / mass[:-1] / 2
    i = torch.arange(levels.numel() - 1, device=levels.device)
    jac = levels.new_zeros(levels.numel(), levels.numel())
    jac[i + 1, i] += d_lo
    jac[i + 1, i + 1] += d_lo
    jac[i, i] += d_hi
    jac[i, i + 1] += d_hi
    return centroids, jac


@functools.cache
def lloyd_max_normal(bits: int, tol: float = 1e-9, max_iter: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels (2^bits,) and decision boundaries (2^bits - 1,) of the MSE-optimal N(0, 1) quantizer.

    Solves Lloyd's fixed point (levels = centroids of their cells, boundaries = level midpoints) by
    Newton's method from the quantile initialisation: plain Lloyd iteration needs ~10^5 steps at 8
    bits, Newton ~6. 1 bit: levels +-sqrt(2 / pi) = +-0.7979, boundary 0. float64 on CPU.
    """
    n = 2**bits
    levels = torch.special.ndtri((torch.arange(n, dtype=torch.float64, device="cpu") + 0.5) / n)
    eye = torch.eye(n, dtype=torch.float64, device="cpu")
    for _ in range(max_iter):
        centroids, jac = _centroids(levels)
        residual = levels - centroids
        if residual.abs().max() < tol:
            break
        levels = levels - torch.linalg.solve(eye - jac, residual)
    else:
        raise PeftError(f"Lloyd-Max quantizer for {bits} bits did not converge")
    return levels, (levels[1:] + levels[:-1]) / 2


@functools.cache
def median_levels_normal(bits: int, iterations: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels (2^bits,) and boundaries of the authors' quantizer (PETL-ViT binary_adapter, QLinear.quantize):
    from all zeros, `iterations` times: boundaries = level midpoints, each level = the median of N(0, 1) in its
    cell (the inverse cdf of the cell's probability midpoint). 1 bit: +-ndtri(0.75) = +-0.6745. float64."""
    n = 2**bits
    levels = torch.zeros(n, dtype=torch.float64)
    for _ in range(iterations):
        bounds = (levels[1:] + levels[:-1]) / 2
        cdf = torch.cat([levels.new_zeros(1), torch.special.ndtr(bounds), levels.new_ones(1)])
        levels = torch.special.ndtri((cdf[1:] + cdf[:-1]) / 2)
    return levels, (levels[1:] + levels[:-1]) / 2


QUANTIZERS = {"official": median_levels_normal, "lloyd_max": lloyd_max_normal}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Level indices (any shape, values < 2^bits) -> uint8 (ceil(n * bits / 8),), low bits first."""
    per_byte = 8 // bits
    flat = codes.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per_byte)])
    shifts = torch.arange(per_byte, device=flat.device, dtype=torch.uint8) * bits
    return (flat.view(-1, per_byte) << shifts).sum(-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 (m,) -> int64 level indices (numel,)."""
    shifts = torch.arange(8 // bits, device=packed.device, dtype=torch.int64) * bits
    return ((packed.long().unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten()[:numel]


class QuantizedLinear(nn.Linear):
    """Bias-free Linear with fake-quantized weights: y = x Q(W)^T, x: (..., in) -> (..., out).

    Q(W) = mean + std * level[code] takes exactly 2^bits values. mean / std are W's own, unless pinned
    by `load` (a loaded delta must reproduce the stored values exactly, and a matrix made of those
    values has other statistics); further training then keeps the stored statistics.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, levels: str = "lloyd_max") -> None:
        super().__init__(in_features, out_features, bias=False)
        self.bits, self.quantizer = bits, QUANTIZERS[levels]
        self.register_buffer("pinned_mean", None, persistent=False)
        self.register_buffer("pinned_std", None, persistent=False)

    @torch.no_grad()
    def quantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dequantized W, codes (out, in) int64, mean (), std ()) of the current latent weight."""
        w = self.weight.detach()
        if self.pinned_mean is not None:
            mean, std = self.pinned_mean, self.pinned_std
        else:
            mean, std = w.mean(), w.std().clamp_min(torch.finfo(w.dtype).tiny)
        levels, bounds = (t.to(device=w.device, dtype=w.dtype) for t in self.quantizer(self.bits))
        codes = torch.bucketize((w - mean) / std, bounds)
        return mean + std * levels[codes], codes, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat = self.quantize()[0]
        # value: exactly w_hat (w - w.detach() is exactly 0); gradient: straight through to W
        return F.linear(x, w_hat + (self.weight - self.weight.detach()))

    def dump(self) -> dict[str, torch.Tensor]:
        """{"codes": uint8 packed, "mean": (), "std": ()}: what is stored for this matrix."""
        _, codes, mean, std = self.quantize()
        return {"codes": pack_codes(codes, self.bits), "mean": mean.clone(), "std": std.clone()}

    @torch.no_grad()
    def load(self, codes: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set W to the stored dequantized values and pin the stored statistics."""
        expected = math.ceil(self.weight.numel() * self.bits / 8)
        if codes.dtype != torch.uint8 or codes.numel() != expected:
            raise PeftError(f"bi_adapter: {codes.numel()} code bytes ({codes.dtype}), expected {expected} uint8")
        self.pinned_mean = mean.to(self.weight).reshape(())
        self.pinned_std = std.to(self.weight).reshape(())
        levels = self.quantizer(self.bits)[0].to(self.weight)
        index = unpack_codes(codes.to(self.weight.device), self.bits, self.weight.numel())
        self.weight.copy_((self.pinned_mean + self.pinned_std * levels[index]).view_as(self.weight))


def bi_adapter(width: int, cfg: BiAdapterSettings) -> Adapter:
    """Down: nn.Linear's default init; Up: tiny truncated normal (an all-zero matrix has no std)."""
    down = QuantizedLinear(width, cfg.dim, cfg.bits, cfg.levels)
    up = QuantizedLinear(cfg.dim, width, cfg.bits, cfg.levels)
    nn.init.trunc_normal_(up.weight, std=1e-3, a=-2e-3, b=2e-3)
    return Adapter(down, up, cfg.scale, cfg.dropout)


def _quantized(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


class BiAdapter(PeftMethod):
    """Quantized parallel adapters; the delta holds packed codes + per-matrix mean / std + the head."""

    name: ClassVar[str] = "bi_adapter"
    scopes: ClassVar[tuple[str, ...]] = ("adapter",)

    def inject(self, model: VisionTransformer, cfg: BiAdapterSettings) -> None:
        add_parallel_adapters(model, lambda width: bi_adapter(width, cfg))

    def delta_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        quantized = _quantized(model)
        latent = {f"{name}.weight" for name in quantized}
        state = {n: p.detach().clone() for n, p in self.trainable_parameters(model).items() if n not in latent}
        for name, module in quantized.items():
            state.update({f"{name}.{key}": value for key, value in module.dump().items()})
        return state

    def load_delta(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
        rest = dict(state)
        for name, module in _quantized(model).items():
            try:
                module.load(*(rest.pop(f"{name}.{key}") for key in ("codes", "mean", "std")))
            except KeyError as err:
                raise PeftError(f"bi_adapter: delta lacks {err} for {name}") from None
        latent = {f"{name}.weight" for name in _quantized(model)}
        copy_into(model, rest, expected=set(self.trainable_parameters(model)) - latent, method=self.name)
        return model
