"""ToCom: model arithmetic, exact plug/merge/save, and that self-distillation closes the ToMe gap."""

from __future__ import annotations

import copy
import random

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer

from vitpipe.models.tocom import (
    TokenCompensator,
    load_tocom,
    merge_into_weights,
    plug,
    save_tocom,
    tocom_kl_loss,
    unplug,
)
from vitpipe.models.tome import apply_tome, set_tome_r
from vitpipe.models.vit import build_vit

MAX_R = 4  # degrees 0..4 on 65 tokens: 65 -> 61 -> ... -> 49 at r = 4


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    return build_vit("vitpipe_tiny_patch4_32", num_classes=10, **overrides).eval()


def random_tocom(model: VisionTransformer, seed: int = 0, std: float = 0.05) -> TokenCompensator:
    """A ToCom with every weight random (B is zero at init, which would make most checks vacuous)."""
    tocom = TokenCompensator.for_backbone(model, max_r=MAX_R).eval()
    torch.manual_seed(seed)
    for param in tocom.parameters():
        torch.nn.init.normal_(param, std=std)
    return tocom


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


def same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_shape_and_zero_init_of_B() -> None:
    model = tiny_vit()
    tocom = TokenCompensator.for_backbone(model, max_r=16)
    assert sum(p.numel() for p in tocom.parameters()) == 2 * 64 * 32 * 2 * 4  # 2 C R rho * 2 proj * D
    assert all(not block.b_q.weight.any() and not block.b_v.weight.any() for block in tocom.blocks)
    assert tocom.degree_mask(3).tolist() == [1.0] * 6 + [0.0] * 26
    assert tocom.delta_mask(5, 2).tolist() == [0.0] * 4 + [-1.0] * 6 + [0.0] * 22
    with pytest.raises(ValueError):
        tocom.degree_mask(17)
    with pytest.raises(ValueError):
        plug(tiny_vit(embed_dim=32), tocom, 0, 1)


def test_model_arithmetic_is_additive_and_antisymmetric() -> None:
    tocom = random_tocom(tiny_vit())
    x = torch.randn(2, 65, 64)

    def delta(m: int, n: int) -> torch.Tensor:
        return torch.cat(tocom.delta(2, x, m, n), dim=-1)

    for a, b, c in [(0, 2, 4), (3, 1, 4), (4, 0, 2), (1, 3, 0)]:
        assert torch.allclose(delta(a, b) + delta(b, c), delta(a, c), atol=1e-6)
        assert torch.allclose(delta(a, b), -delta(b, a), atol=1e-7)
        assert delta(a, a).abs().max() == 0
    block = tocom.blocks[2]  # Delta(k-1 -> k) is sub-plugin P_k: the k-th slice of rho channels only
    dq, dv = block.weight_deltas(tocom.delta_mask(2, 3))
    assert torch.allclose(dq, block.b_q.weight[:, 4:6] @ block.a_q.weight[4:6], atol=1e-7)
    assert torch.allclose(dv, block.b_v.weight[:, 4:6] @ block.a_v.weight[4:6], atol=1e-7)


@pytest.mark.parametrize("pool", [dict(), dict(class_token=False, global_pool="avg")], ids=["cls", "avg"])
def test_student_at_same_degree_equals_teacher_exactly(pool: dict) -> None:
    model = apply_tome(tiny_vit(**pool), r=0)
    tocom = random_tocom(model)
    x = images()
    with torch.no_grad():
        for m in (0, 3):
            set_tome_r(model, m)
            teacher = model(x)
            state = plug(model, tocom, m, m, scale=0.5)
            assert torch.equal(model(x), teacher)
            state.target_r = (m + 1) % (MAX_R + 1)  # the hooks are live: a real Delta moves the output
            assert not torch.allclose(model(x), teacher, atol=1e-4)
            unplug(model)


def test_plug_unplug_leaves_the_backbone_untouched() -> None:
    model = apply_tome(tiny_vit(), r=2)
    before, x = snapshot(model), images()
    with torch.no_grad():
        reference = model(x)
        plug(model, random_tocom(model), 0, 4, scale=1.0)
        plugged = model(x)
        assert same_state(model, before) and len(list(model.parameters())) == len(before)
        unplug(model)
        assert torch.equal(model(x), reference)
    assert not torch.allclose(plugged, reference, atol=1e-4)
    assert same_state(model, before)
    assert all(not block.attn.qkv._forward_hooks for block in model.blocks)


@pytest.mark.parametrize("fused", [True, False])
def test_merge_into_weights_matches_plug_without_extra_modules(fused: bool) -> None:
    model = apply_tome(tiny_vit(), r=3)
    for block in model.blocks:
        block.attn.fused_attn = fused
    tocom, x = random_tocom(model), images()
    plain_state = snapshot(model)
    with torch.no_grad():
        reference = model(x)
        plug(model, tocom, 1, 3, scale=0.7)
        plugged = model(x)
        unplug(model)
        merged_model = merge_into_weights(copy.deepcopy(model), tocom, 1, 3, scale=0.7)
        merged = merged_model(x)
        assert (plugged - reference).abs().max() > 1e-3
        assert torch.allclose(merged, plugged, atol=2e-5)
        assert merged_model.state_dict().keys() == plain_state.keys()
        assert sum(p.numel() for p in merged_model.parameters()) == sum(t.numel() for t in plain_state.values())
        assert all(not block.attn.qkv._forward_hooks for block in merged_model.blocks)
        qkv = merged_model.blocks[0].attn.qkv.weight
        assert torch.equal(qkv[64:128], plain_state["blocks.0.attn.qkv.weight"][64:128])  # k untouched
        merge_into_weights(merged_model, tocom, 3, 1, scale=0.7)  # antisymmetry undoes the merge
        assert torch.allclose(merged_model(x), reference, atol=2e-5)


def test_save_load_roundtrip_is_exact(tmp_path) -> None:
    tocom = random_tocom(tiny_vit())
    data = save_tocom(tocom, tmp_path / "tocom.safetensors")
    for source in (data, tmp_path / "tocom.safetensors"):
        loaded = load_tocom(source)
        assert (loaded.depth, loaded.width, loaded.rho, loaded.max_r) == (4, 64, 2, MAX_R)
        assert same_state(loaded, tocom.state_dict())
    with safetensors.safe_open(tmp_path / "tocom.safetensors", framework="pt") as f:
        assert f.metadata()["max_r"] == str(MAX_R) and len(f.keys()) == 4 * 4
    with pytest.raises(ValueError):
        load_tocom(safetensors.torch.save({"w": torch.zeros(1)}))


def test_kl_loss_matches_its_definition() -> None:
    t, s = torch.randn(8, 10), torch.randn(8, 10)
    for tau in (1.0, 2.0):
        p, q = F.softmax(t / tau, dim=-1), F.softmax(s / tau, dim=-1)
        expected = (p * (p.log() - q.log())).sum(-1).mean() * tau**2
        assert torch.allclose(tocom_kl_loss(t, s, tau), expected, atol=1e-6)
    assert tocom_kl_loss(t, t).abs() < 1e-6


# ---------------------------------------------------------------------------------------------
# Self-distillation on real images (sklearn digits at 32 px) with a random-init backbone.
# The avg-pooled backbone is used: timm's unweighted token mean makes its output move with r, while
# a random-init cls readout barely does (KL ~1e-8), which would leave nothing to compensate.
# ---------------------------------------------------------------------------------------------

PAIRS = [(m, n) for m in range(MAX_R + 1) for n in range(MAX_R + 1) if m != n]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, held-out images, train labels): 8x8 digits upscaled to 32x32 RGB in [-1, 1]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1) * 2 - 1
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held = order[:1500], order[1500:1564]
    return x[train], x[held], torch.tensor(data.target)[train]


def backbone() -> VisionTransformer:
    model = tiny_vit(class_token=False, global_pool="avg")
    torch.nn.init.normal_(model.head.weight, std=0.3)  # a random head with spread-out logits
    return apply_tome(model.requires_grad_(False), r=0)


@torch.no_grad()
def mean_kl(model: VisionTransformer, tocom: TokenCompensator, x: torch.Tensor) -> tuple[float, float]:
    """KL(model@m || model@n) without and with ToCom(m -> n), each averaged over pairs m != n."""
    state = plug(model, tocom, 0, 0, scale=1.0)
    without = with_tocom = 0.0
    for m, n in PAIRS:
        set_tome_r(model, m)
        state.enabled = False
        teacher = model(x)
        set_tome_r(model, n)
        without += tocom_kl_loss(teacher, model(x)).item()
        state.enabled, state.source_r, state.target_r = True, m, n
        with_tocom += tocom_kl_loss(teacher, model(x)).item()
    unplug(model)
    return without / len(PAIRS), with_tocom / len(PAIRS)


def distill(model: VisionTransformer, x: torch.Tensor, steps: int = 100) -> TokenCompensator:
    """Teacher = frozen model at r = m, student = the same model at r = n + ToCom(m -> n)."""
    tocom = TokenCompensator.for_backbone(model, max_r=MAX_R).train()
    state = plug(model, tocom, 0, 0, scale=1.0)
    optimizer = torch.optim.AdamW(tocom.parameters(), lr=2e-3, weight_decay=0.05)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = x[torch.randint(len(x), (16,), generator=gen)]
        m, n = rng.sample(range(MAX_R + 1), 2)
        set_tome_r(model, m)
        state.enabled = False
        with torch.no_grad():
            teacher = model(batch)
        set_tome_r(model, n)
        state.enabled, state.source_r, state.target_r = True, m, n
        loss = tocom_kl_loss(teacher, model(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unplug(model)
    return tocom.eval()


@pytest.fixture(scope="module")
def distilled(digits) -> tuple[VisionTransformer, dict[str, torch.Tensor], TokenCompensator]:
    model = backbone()
    before = snapshot(model)
    return model, before, distill(model, digits[0])


def test_distillation_lowers_held_out_kl(distilled, digits) -> None:
    model, before, tocom = distilled
    without, with_tocom = mean_kl(model, tocom, digits[1])
    assert without > 1e-2  # the ToMe gap is real before we claim to close it
    assert with_tocom < 0.8 * without, f"KL {without:.4f} -> {with_tocom:.4f}"  # measured: ~0.074 -> ~0.006
    assert same_state(model, before)  # only ToCom trained


def test_tocom_transfers_to_a_separately_finetuned_copy(distilled, digits) -> None:
    """Fine-tune a copy on the digit labels (all weights, a few steps), then plug the unchanged ToCom."""
    model, _, tocom = distilled
    finetuned = copy.deepcopy(model).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(finetuned.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    x, y = digits[0], digits[2]
    for _ in range(20):
        idx = torch.randint(len(x), (16,), generator=gen)
        loss = F.cross_entropy(finetuned(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    finetuned.eval()
    moved = max((a - b).abs().max().item() for a, b in zip(finetuned.parameters(), model.parameters(), strict=True))
    assert moved > 1e-3  # a different model, not the distillation backbone
    without, with_tocom = mean_kl(finetuned, tocom, digits[1])
    assert with_tocom < 0.8 * without, f"KL {without:.4f} -> {with_tocom:.4f}"
