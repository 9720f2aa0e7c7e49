"""PEFT life cycle on the tiny ViT, for every registered method: freezing, deltas, merging."""

from __future__ import annotations

import pydantic
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from vitpipe.models.peft import PEFT_METHODS, PeftError, PeftMethod
from vitpipe.models.vit import build_vit

METHODS = list(PEFT_METHODS)
MERGEABLE = {"linear", "full", "bitfit", "lora", "fact_tt", "fact_tk", "consolidator"}


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return build_vit("vitpipe_tiny_patch4_32", num_classes=10)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb(method: PeftMethod, model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every trainable tensor away from its init (zero-initialised branches included)."""
    gen = torch.Generator().manual_seed(1)
    for p in method.trainable_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=gen) * scale)


def trained(name: str, seed: int = 0) -> torch.nn.Module:
    method = PEFT_METHODS[name]
    model = method.apply(tiny_vit(seed))
    perturb(method, model)
    return model.eval()


def test_registry_names_configs_and_mergeability() -> None:
    assert set(METHODS) == {
        "linear",
        "full",
        "bitfit",
        "lora",
        "adaptformer",
        "bi_adapter",
        "fact_tt",
        "fact_tk",
        "convpass",
        "consolidator",
        "vpt",
    }
    for name, method in PEFT_METHODS.items():
        assert method.name == name
        assert method.mergeable == (name in MERGEABLE)
        cfg = method.config()
        assert method.config(cfg.model_dump()) == cfg
        with pytest.raises(pydantic.ValidationError):
            method.config({"not_a_field": 1})
        if cfg.model_fields:
            with pytest.raises(pydantic.ValidationError):  # frozen
                setattr(cfg, next(iter(cfg.model_fields)), 3)


@pytest.mark.parametrize("name", METHODS)
def test_only_method_params_and_head_train(name: str) -> None:
    method = PEFT_METHODS[name]
    model = tiny_vit()
    backbone_names = {n for n, _ in model.named_parameters() if not n.startswith("head.")}
    model = method.apply(model)
    trainable = method.trainable_parameters(model)
    assert set(trainable) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= set(trainable)

    backbone_trained = {n for n in trainable if n in backbone_names or n.replace(".base_layer", "") in backbone_names}
    if name == "full":
        assert backbone_trained == backbone_names
    elif name == "bitfit":
        assert backbone_trained and all(n.endswith(".bias") for n in backbone_trained)
        assert "patch_embed.proj.bias" not in backbone_trained
    else:
        assert not backbone_trained
        assert (len(trainable) > 2) == (name != "linear")

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # every parameter goes to the optimizer: frozen ones must stay untouched on their own (no grad)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    F.cross_entropy(model(images(8)), torch.arange(8)).backward()
    assert all(p.grad is not None for p in trainable.values()), "a method parameter is not in the graph"
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(trainable)
    unchanged = {n for n in before if n not in trainable}
    assert all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in unchanged)
    assert {"head.weight", "head.bias"} <= changed
    if name != "linear":
        assert changed - {"head.weight", "head.bias"}


@pytest.mark.parametrize("name", METHODS)
def test_delta_roundtrip_reproduces_outputs_exactly(name: str) -> None:
    method = PEFT_METHODS[name]
    model = trained(name).requires_grad_(False)  # frozen for evaluation: the delta is found by name
    x = images()
    with torch.no_grad():
        expected = model(x)
    state = safetensors.torch.load(safetensors.torch.save(method.delta_state(model)))  # as tasks store it
    if name not in ("full", "bitfit"):
        backbone = set(tiny_vit().state_dict()) - {"head.weight", "head.bias"}
        assert not set(state) & backbone, "the delta must not repeat backbone weights"

    fresh = method.apply(tiny_vit())  # same backbone weights, freshly initialised method params
    with torch.no_grad():
        assert not torch.equal(fresh.eval()(x), expected)
    method.load_delta(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)


def test_load_delta_rejects_a_mismatching_delta() -> None:
    vpt = PEFT_METHODS["vpt"]
    state = vpt.delta_state(vpt.apply(tiny_vit()))
    with pytest.raises(PeftError, match="shape"):
        vpt.load_delta(vpt.apply(tiny_vit(), {"num_prompts": 5}), state)
    with pytest.raises(PeftError, match="missing"):
        PEFT_METHODS["fact_tt"].load_delta(PEFT_METHODS["fact_tt"].apply(tiny_vit()), state)


def test_applying_twice_is_refused() -> None:
    model = PEFT_METHODS["adaptformer"].apply(tiny_vit())
    with pytest.raises(PeftError, match="already patched"):
        PEFT_METHODS["vpt"].apply(model)


@pytest.mark.parametrize("name", sorted(MERGEABLE))
def test_merge_matches_unmerged_and_leaves_plain_timm(name: str) -> None:
    method = PEFT_METHODS[name]
    model = trained(name)
    x = images()
    with torch.no_grad():
        expected = model(x)
        merged = method.merge(model)
        got = merged(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    plain = tiny_vit()
    assert list(merged.state_dict()) == list(plain.state_dict())
    assert {n: type(m) for n, m in merged.named_modules()} == {n: type(m) for n, m in plain.named_modules()}
    assert set(vars(merged)) == set(vars(plain))  # no leftover attributes either
    if name not in ("linear", "full", "bitfit"):  # the branch went into the weights, not away
        qkv = merged.blocks[0].attn.qkv.weight
        assert not torch.equal(qkv, plain.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("name", sorted(set(METHODS) - MERGEABLE))
def test_merge_refused_for_nonlinear_methods(name: str) -> None:
    with pytest.raises(PeftError, match="not mergeable"):
        PEFT_METHODS[name].merge(trained(name))


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"lora"}))
def test_backbone_state_dict_keys_unchanged_by_apply(name: str) -> None:
    """Class-swap patching keeps timm's names, so a backbone checkpoint still loads after apply."""
    plain = tiny_vit(seed=1).state_dict()
    model = PEFT_METHODS[name].apply(tiny_vit())
    assert set(plain) <= set(model.state_dict())
    model.load_state_dict(plain, strict=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())


def test_vpt_prompts_reach_every_block_and_are_dropped() -> None:
    model = PEFT_METHODS["vpt"].apply(tiny_vit()).eval()
    x = images(2)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 65, 64)
        out = model(x)
        model.blocks[3].prompts.add_(1.0)
        assert not torch.equal(model(x), out)


def test_convpass_mixes_neighbouring_patches_only() -> None:
    """Changing one patch moves the bypass output at that patch and its 3x3 neighbours, nowhere else."""
    block = PEFT_METHODS["convpass"].apply(tiny_vit()).eval().blocks[0]
    bypass = block.bypass_attn
    perturb(PEFT_METHODS["convpass"], block)
    h = torch.randn(1, 65, 64)
    h2 = h.clone()
    h2[0, 1 + 3 * 8 + 3] += 1.0  # patch (3, 3) of the 8 x 8 grid
    with torch.no_grad():
        moved = (bypass(h2) - bypass(h)).abs().sum(-1)[0, 1:].view(8, 8) > 0
    assert moved[2:5, 2:5].all() and moved.sum() == 9


def test_fact_slices_and_consolidator_groups_have_their_structure() -> None:
    fact = trained("fact_tt")
    qkv = fact.blocks[0].attn.qkv
    delta = qkv.branch.delta_weight()
    assert torch.linalg.matrix_rank(delta[:64]) <= 8 and delta.shape == (192, 64)
    assert fact.fact.sigma.shape == (4 * 12, 8, 8)  # 4 blocks x (q, k, v, o, 4 x fc1, 4 x fc2)

    method = PEFT_METHODS["consolidator"]
    model = method.apply(tiny_vit(), {"groups": (8, 32), "shuffle": True})
    perturb(method, model)
    delta = model.blocks[0].mlp.fc2.branch.delta_weight()  # (64, 256)
    assert delta.count_nonzero() <= 64 * 256 // 8 + 64 * 256 // 32
    assert delta.count_nonzero() > 64 * 256 // 8
    branch = model.blocks[0].mlp.fc2.branch.eval()  # trains group by group, merges as that dense matrix
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        assert torch.allclose(branch(x), torch.nn.functional.linear(x, delta, branch.bias), atol=1e-6)


def test_every_method_has_its_torch_free_settings_and_no_other() -> None:
    from vitpipe.models.settings import PEFT_SETTINGS

    assert list(PEFT_METHODS) == list(PEFT_SETTINGS)
    assert {name for name, s in PEFT_SETTINGS.items() if not s.token_merging} == {"convpass", "vpt"}


def test_a_branch_bias_merges_into_a_linear_that_had_none() -> None:
    from vitpipe.models.peft.base import add_branch, unbranch
    from vitpipe.models.peft.consolidator import ConsolidatorBranch
    from vitpipe.models.settings import ConsolidatorSettings

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=False)
    add_branch(linear, ConsolidatorBranch(16, 8, ConsolidatorSettings(groups=(4,), drop_path=0.0)))
    with torch.no_grad():
        linear.branch.bias.normal_()
    x = torch.randn(3, 16)
    before = linear.eval()(x)
    unbranch(linear)
    assert type(linear) is torch.nn.Linear and linear.bias is not None
    torch.testing.assert_close(linear(x), before)
