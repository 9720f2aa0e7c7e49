"""LocalMIM on a tiny timm ViT: HOG targets, masking at every scale, tap isolation, and learning on real digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from scipy import ndimage
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer

from vitpipe.models.hog import hog_pyramid, hog_targets
from vitpipe.models.mim import (
    LocalDecoder,
    LocalMIM,
    LocalMIMConfig,
    encode_visible,
    mask_at_scale,
    random_masking,
    resolve_taps,
)
from vitpipe.models.vit import build_vit

SCALES = (4.0, 2.0, 1.0, 0.5)


def digits(n: int, size: int) -> torch.Tensor:
    """sklearn's 8x8 handwritten digits, upscaled to (n, 3, size, size) grey RGB in [-1, 1]."""
    d = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 16
    return (F.interpolate(d, size=(size, size), mode="bilinear") * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    return build_vit("vitpipe_tiny_patch4_32", **overrides)


def small_mim(seed: int = 0) -> tuple[VisionTransformer, LocalMIM]:
    """16 px, patch 4 (4x4 grid), width 32, depth 4, one tap per block: cheap enough to train in a test."""
    vit = tiny_vit(seed, img_size=16, embed_dim=32, num_heads=2, depth=4)
    return vit, LocalMIM(vit, LocalMIMConfig(taps=(0, 1, 2, 3), dec_dim=32, dec_heads=2))


# ----------------------------------------------------------------------------------------- HOG


def reference_hog(image: np.ndarray, cell: int, nbins: int = 9) -> np.ndarray:
    """Pixel-loop HOG in float64 with scipy's Sobel ("mirror" = reflect without repeating the edge)."""
    channels, h, w = image.shape
    hist = np.zeros((channels, nbins, h // cell, w // cell))
    for c in range(channels):
        gx, gy = ndimage.sobel(image[c], axis=1, mode="mirror"), ndimage.sobel(image[c], axis=0, mode="mirror")
        # LocalMIM's HOGLayerC: phase = atan2(gx, gy)
        bins = np.minimum((np.arctan2(gx, gy) % np.pi) // (np.pi / nbins), nbins - 1).astype(int)
        for i in range(h):
            for j in range(w):
                hist[c, bins[i, j], i // cell, j // cell] += np.hypot(gx[i, j], gy[i, j]) / cell**2
    norm = np.linalg.norm(hist, axis=1, keepdims=True)
    return np.where(norm > 0, hist / np.maximum(norm, 1e-300), 0.0)


@pytest.mark.parametrize("cell", [1, 2, 4, 8])
def test_hog_shape_and_unit_norm_bins(cell: int) -> None:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(cell)).requires_grad_()
    target = hog_targets(images, cell)
    assert target.shape == (2, 27, 32 // cell, 32 // cell)
    assert not target.requires_grad
    norms = target.view(2, 3, 9, 32 // cell, 32 // cell).norm(dim=2)
    has_gradient = torch.stack([torch.tensor(reference_hog(im.detach().numpy(), cell)) for im in images])
    has_gradient = has_gradient.norm(dim=2) > 0  # Sobel sees nothing in a reflect-padded corner pixel
    assert torch.allclose(norms[has_gradient], torch.ones(()), atol=1e-5)
    assert torch.equal(norms[~has_gradient], torch.zeros(int((~has_gradient).sum())))
    assert (target >= 0).all()
    assert torch.equal(hog_targets(torch.full((2, 3, 32, 32), 0.3), cell), torch.zeros_like(target))


@pytest.mark.parametrize("cell", [2, 4])
def test_hog_matches_a_pixel_loop_reference(cell: int) -> None:
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(cell))
    expected = torch.tensor(reference_hog(image.double().numpy(), cell), dtype=torch.float32).flatten(0, 1)
    assert torch.allclose(hog_targets(image[None], cell)[0], expected, atol=1e-5)


def test_hog_pyramid_matches_the_pixel_loop_reference_at_every_cell() -> None:
    """LocalMIM's four targets come from one set of per-pixel histograms, each cell size pooled on its own."""
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(5))
    cells = (1, 2, 4, 8)
    for cell, target in zip(cells, hog_pyramid(image[None], cells), strict=True):
        expected = torch.tensor(reference_hog(image.double().numpy(), cell), dtype=torch.float32).flatten(0, 1)
        assert torch.allclose(target[0], expected, atol=1e-5), cell


@pytest.mark.parametrize(
    "ramp, expected_bin",
    # atan2(gx, gy) (LocalMIM's convention), unsigned: pi/2, 0, pi/4, 3pi/4 over 9 bins of 20 deg
    [("x", 4), ("y", 0), ("x+y", 2), ("x-y", 6)],
)
def test_hog_orientation_bins(ramp: str, expected_bin: int) -> None:
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    image = {"x": x, "y": y, "x+y": x + y, "x-y": x - y}[ramp] / 16
    colours = torch.stack([image, 2 * image, -image])[None]  # a negated channel flips the sign, not the bin
    target = hog_targets(colours, 4).view(1, 3, 9, 4, 4)[..., 1:-1, 1:-1]  # interior cells: no padding effects
    one_hot = F.one_hot(torch.tensor(expected_bin), 9).float()[None, None, :, None, None].expand_as(target)
    assert torch.allclose(target, one_hot, atol=1e-6)


# ------------------------------------------------------------------------------------- masking


def test_random_masking_keeps_the_visible_tokens_and_inverts() -> None:
    x = torch.arange(64.0)[None, :, None].repeat(3, 1, 2)  # token n carries the value n
    visible, mask, ids_restore = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert visible.shape == (3, 16, 2) and mask.shape == (3, 64)
    assert torch.equal(mask.sum(1), torch.full((3,), 48.0))
    for b in range(3):
        assert torch.equal(visible[b, :, 0].sort().values, torch.nonzero(mask[b] == 0)[:, 0].float())
    placeholders = torch.full((3, 48, 2), -1.0)
    filled = torch.cat([visible, placeholders], dim=1).gather(1, ids_restore[..., None].expand(-1, -1, 2))
    assert torch.equal(filled[mask == 0], x[mask == 0])
    assert (filled[mask == 1] == -1).all()
    assert not torch.equal(mask[0], mask[1])  # per-sample noise


@pytest.mark.parametrize("ratio", [0.75, 0.5])
@pytest.mark.parametrize("scale", SCALES)
def test_resampled_mask_mean_equals_the_ratio(scale: float, ratio: float) -> None:
    _, mask, _ = random_masking(torch.zeros(4, 64, 1), ratio, torch.Generator().manual_seed(1))
    weights = mask_at_scale(mask, (8, 8), scale)
    side = int(8 * scale)
    assert weights.shape == (4, side, side)
    assert torch.allclose(weights.mean(dim=(1, 2)), torch.full((4,), ratio))
    if scale >= 1:
        assert torch.equal(weights[:, :: int(scale), :: int(scale)].flatten(1), mask)
    else:
        assert ((weights > 0) & (weights < 1)).any()  # 2x2 averages give fractional weights
        assert torch.equal(weights, mask.view(4, 4, 2, 4, 2).mean(dim=(2, 4)))


# ------------------------------------------------------------------------------------- encoder


def test_unmasked_encoding_matches_the_plain_vit() -> None:
    vit = tiny_vit().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        (tap1, tap3), mask, ids_restore = encode_visible(vit, images, 0.0, [1, 3])
        x = vit._pos_embed(vit.patch_embed(images))
        reference = []
        for block in vit.blocks:
            x = block(x)
            reference.append(x)
    assert mask.sum() == 0
    for tapped, expected in ((tap1, reference[1]), (tap3, reference[3])):
        patches = tapped[:, 1:].gather(1, ids_restore[..., None].expand(-1, -1, 64))
        assert torch.allclose(tapped[:, 0], expected[:, 0], atol=1e-5)
        assert torch.allclose(patches, expected[:, 1:], atol=1e-5)


def test_encoder_sees_only_visible_tokens_and_stops_after_the_last_tap() -> None:
    vit = tiny_vit(depth=8)
    calls = [0] * 8
    for i, block in enumerate(vit.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    outputs, _, _ = encode_visible(vit, torch.randn(2, 3, 32, 32), 0.75, [1, 3, 5])
    assert [o.shape for o in outputs] == [(2, 17, 64)] * 3
    assert calls == [1] * 6 + [0] * 2


@pytest.mark.parametrize("scale", SCALES)
def test_local_decoder_output_at_its_scale(scale: float) -> None:
    decoder = LocalDecoder(width=64, grid=(8, 8), scale=scale, dec_dim=32, heads=2)
    _, _, ids_restore = random_masking(torch.zeros(2, 64, 1), 0.75)
    out = decoder(torch.randn(2, 17, 64), ids_restore)
    assert out.shape == (2, 27, int(8 * scale), int(8 * scale))


def test_tap_defaults_and_config_validation() -> None:
    assert resolve_taps(LocalMIMConfig().taps, 12) == [1, 3, 9, 11]  # ViT-B: blocks 2, 4, 10, 12
    with pytest.raises(ValueError, match="distinct"):
        LocalMIM(tiny_vit(), LocalMIMConfig())  # depth 4: {1, 3, 1, 3}
    with pytest.raises(ValidationError):
        LocalMIMConfig(scales=(4.0, 3.0, 1.0, 0.5))
    with pytest.raises(ValueError, match="HOG cells"):
        LocalMIM(tiny_vit(depth=8), LocalMIMConfig(taps=(1, 3, 5, 7), scales=(8.0, 2.0, 1.0, 0.5)))


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("tap", [0, 1, 2])
def test_tap_loss_reaches_only_the_blocks_up_to_its_tap(tap: int) -> None:
    vit, mim = small_mim()
    losses = mim.tap_losses(vit, digits(4, 16))
    losses[tap].backward()
    for index, block in enumerate(vit.blocks):
        grads = [p.grad for p in block.parameters()]
        if index <= tap:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), index
        else:
            assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), index
    for index, decoder in enumerate(mim.local_decoders):
        assert all((p.grad is not None) == (index == tap) for p in decoder.parameters())


@pytest.mark.parametrize("where, changes", [("visible", False), ("masked", True)])
def test_tap_losses_count_only_masked_cells(where: str, changes: bool) -> None:
    vit, mim = small_mim()
    images = digits(4, 16)

    def perturb(decoder: LocalDecoder, inputs: tuple, output: torch.Tensor, scale: float) -> torch.Tensor:
        tokens, ids_restore = inputs
        mask = (ids_restore >= tokens.shape[1] - 1).float()  # restored positions past the visible ones
        weight = mask_at_scale(mask, (4, 4), scale)[:, None]
        return output + 10.0 * ((weight == 0) if where == "visible" else (weight > 0))

    with torch.no_grad():
        clean = mim.tap_losses(vit, images, torch.Generator().manual_seed(0))
        for decoder, scale in zip(mim.local_decoders, SCALES, strict=True):
            decoder.register_forward_hook(lambda d, i, o, s=scale: perturb(d, i, o, s))
        perturbed = mim.tap_losses(vit, images, torch.Generator().manual_seed(0))
    for a, b in zip(clean, perturbed, strict=True):
        assert torch.equal(a, b) != changes


def test_training_lowers_every_tap_loss() -> None:
    vit, mim = small_mim()
    images = digits(16, 16)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return mim(vit, images, torch.Generator().manual_seed(123))[1]

    before = evaluate()
    optimizer = torch.optim.AdamW([*vit.parameters(), *mim.parameters()], lr=2e-3, betas=(0.9, 0.95))
    for _ in range(100):
        loss, _ = mim(vit, images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert list(after) == ["mim_tap0", "mim_tap1", "mim_tap2", "mim_tap3"]
    for name in before:
        assert math.isfinite(after[name]) and after[name] < 0.7 * before[name], (name, before[name], after[name])
