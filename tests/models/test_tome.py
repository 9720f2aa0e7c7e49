"""ToMe on the tiny timm ViT: exactness at r = 0, the merge schedule, and what merging conserves."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitpipe.models.tome import (
    apply_tome,
    bipartite_soft_matching,
    merge_wavg,
    set_tome_r,
    tome_info,
    tome_r,
)
from vitpipe.models.vit import build_vit

CLS = dict()
AVG = dict(class_token=False, global_pool="avg")


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    return build_vit("vitpipe_tiny_patch4_32", num_classes=10, **overrides).eval()


def set_fused(model: VisionTransformer, fused: bool) -> None:
    for block in model.blocks:
        block.attn.fused_attn = fused


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def expected_counts(tokens: int, r: int, depth: int, cls: bool) -> list[int]:
    counts = []
    for _ in range(depth):
        tokens -= min(r, (tokens - int(cls)) // 2)
        counts.append(tokens)
    return counts


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pool", [CLS, AVG], ids=["cls", "avg"])
def test_r0_is_bit_identical_to_timm(pool: dict, fused: bool) -> None:
    plain = tiny_vit(**pool)
    patched = apply_tome(copy.deepcopy(plain), r=0)
    set_fused(plain, fused)
    set_fused(patched, fused)
    x = images()
    with torch.no_grad():
        assert torch.equal(patched(x), plain(x))
        assert torch.equal(patched.forward_features(x), plain.forward_features(x))
    assert tome_info(patched).token_counts == [65 if pool is CLS else 64] * 4


@pytest.mark.parametrize("r", [8, 20, 100])
@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(class_token=False, global_pool="avg"),
        dict(embed_dim=32, depth=3, num_heads=2, patch_size=8),
    ],
    ids=["cls", "avg", "patch8-width32-depth3"],
)
def test_token_counts_follow_the_capped_schedule(config: dict, r: int) -> None:
    model = apply_tome(tiny_vit(**config), r=r)
    with torch.no_grad():
        out = model(images())
    cls = model.cls_token is not None
    tokens = model.patch_embed.num_patches + int(cls)
    assert tome_info(model).token_counts == expected_counts(tokens, r, len(model.blocks), cls)
    assert out.shape == (4, 10)
    if config == {} and r == 8:
        assert tome_info(model).token_counts == [57, 49, 41, 33]


def duplicate_metric(t: int = 9, dim: int = 64) -> torch.Tensor:
    """Random keys (nearly orthogonal) where A token 2 equals B token 5 and A token 6 equals B token 1."""
    metric = torch.randn(1, t, dim, generator=torch.Generator().manual_seed(0))
    metric[:, 2] = metric[:, 5]
    metric[:, 6] = 2.0 * metric[:, 1]  # cosine similarity ignores the norm
    return metric


def test_matching_merges_the_most_similar_pairs_by_size_weighted_average() -> None:
    x = torch.randn(1, 9, 3, generator=torch.Generator().manual_seed(1))
    size = torch.tensor([1.0, 1, 3, 1, 1, 1, 2, 1, 1]).view(1, 9, 1)
    merge, unmerge = bipartite_soft_matching(duplicate_metric(), r=2, protect_cls=True)
    merged, merged_size = merge_wavg(merge, x, size)
    # A = tokens 0,2,4,6,8 and B = 1,3,5,7: unmerged A in order (cls first), then B with partners merged.
    assert merged.shape == (1, 7, 3)
    assert torch.equal(merged[:, :3], x[:, [0, 4, 8]])
    assert torch.allclose(merged[0, 3], (x[0, 1] * 1 + x[0, 6] * 2) / 3)
    assert torch.allclose(merged[0, 5], (x[0, 5] * 1 + x[0, 2] * 3) / 4)
    assert torch.equal(merged[:, [4, 6]], x[:, [3, 7]])
    assert merged_size.flatten().tolist() == [1, 1, 1, 3, 1, 4, 1]
    assert torch.allclose((merged * merged_size).sum(1), (x * size).sum(1))  # mass is conserved
    restored = unmerge(merged)
    assert restored.shape == x.shape
    assert torch.equal(restored[:, 2], merged[:, 5]) and torch.equal(restored[:, 6], merged[:, 3])
    assert torch.equal(restored[:, [0, 4, 8, 3, 7]], x[:, [0, 4, 8, 3, 7]])


def test_cls_is_never_merged_and_r_is_capped() -> None:
    metric = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(3))
    metric[:, 0] = metric[:, 7]  # cls is the only A token with a near-identical B token
    x = torch.randn(1, 9, 3, generator=torch.Generator().manual_seed(2))
    merge, _ = bipartite_soft_matching(metric, r=1, protect_cls=False)
    assert not torch.equal(merge(x)[:, 0], x[:, 0])  # unprotected, cls would be merged first
    merge, _ = bipartite_soft_matching(metric, r=100, protect_cls=True)
    merged, size = merge_wavg(merge, x)
    assert merged.shape[1] == 9 - (9 - 1) // 2
    assert torch.equal(merged[:, 0], x[:, 0]) and size[0, 0, 0] == 1
    assert size.sum() == 9


def test_model_sizes_and_sources_partition_the_input_tokens() -> None:
    model = apply_tome(tiny_vit(), r=8, trace_source=True)
    with torch.no_grad():
        model(images())
    info = tome_info(model)
    assert info.size.shape == (4, 33, 1)
    assert torch.equal(info.size.sum(dim=1), torch.full((4, 1), 65.0))
    assert torch.equal(info.source.sum(dim=1), torch.ones(4, 65))  # each input token in one output token
    assert torch.equal(info.source.sum(dim=2, keepdim=True), info.size)
    assert torch.equal(info.source[:, 0], torch.eye(65)[0].expand(4, -1))  # cls alone, at position 0


def test_set_tome_r_switches_degree_and_back() -> None:
    plain = tiny_vit()
    model = apply_tome(copy.deepcopy(plain), r=0)
    x = images()
    with torch.no_grad():
        reference = plain(x)
        set_tome_r(model, 8)
        merged = model(x)
        assert tome_r(model) == 8 and tome_info(model).token_counts == [57, 49, 41, 33]
        set_tome_r(model, 0)
        assert torch.equal(model(x), reference)
    assert not torch.equal(merged, reference)
    assert tome_r(plain) == 0
    with pytest.raises(ValueError):
        set_tome_r(model, -1)
    with pytest.raises(ValueError):
        set_tome_r(plain, 4)


def test_proportional_attention_is_the_same_fused_or_not_and_matters() -> None:
    model = apply_tome(tiny_vit(), r=12)
    x = images()
    outputs = {}
    with torch.no_grad():
        for fused in (True, False):
            set_fused(model, fused)
            outputs[fused] = model(x)
        apply_tome(model, r=12, prop_attn=False)
        without_prop = model(x)
    assert torch.allclose(outputs[True], outputs[False], atol=1e-5)
    assert not torch.allclose(outputs[True], without_prop, atol=1e-5)


def test_gradients_flow_through_merging() -> None:
    model = apply_tome(tiny_vit(**AVG), r=8).train()
    model(images()).logsumexp(dim=-1).sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_rejects_non_vit() -> None:
    with pytest.raises(TypeError):
        apply_tome(torch.nn.Linear(2, 2), r=1)


def test_parallel_adapter_blocks_merge_before_their_mlp_and_adapter() -> None:
    """A PEFT model with adapters beside the MLP (adaptformer, bi_adapter) patches too: exact at r = 0, the adapter
    still acts at r > 0 (zeroing it changes the merged model's output)."""
    from vitpipe.models.peft import PEFT_METHODS

    model = PEFT_METHODS["adaptformer"].apply(tiny_vit()).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.adapter.up.weight, std=0.5)
    x = images()
    with torch.no_grad():
        plain = model(x)
        patched = apply_tome(copy.deepcopy(model), r=0)
        assert torch.equal(patched(x), plain)
        set_tome_r(patched, 4)
        merged = patched(x)
        assert tome_info(patched).token_counts == expected_counts(65, 4, 4, cls=True)
        for block in patched.blocks:
            torch.nn.init.zeros_(block.adapter.up.weight)
        assert not torch.allclose(patched(x), merged, atol=1e-4)


def test_merging_and_a_plugged_tocom_compile_to_one_graph() -> None:
    """The GPU path (train.compile, bench_gpu --compile) compiles a merging model whole: matching, merging, the
    size-biased SDPA and ToCom's hooks in one graph (fullgraph fails on any break back to Python), with the same
    outputs as eager."""
    from vitpipe.models.tocom import TokenCompensator, plug

    model = apply_tome(tiny_vit(), r=4)
    tocom = TokenCompensator(depth=len(model.blocks), width=model.embed_dim, max_r=8).eval()
    for name, weight in tocom.named_parameters():  # B starts at zero: give Delta a value to carry
        torch.nn.init.normal_(weight, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    plug(model, tocom, 0, 4, scale=1.0)
    x = images()
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # graph capture, no C++ build
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
        assert tome_info(model).token_counts == expected_counts(65, 4, len(model.blocks), cls=True)
        plugged = model(x)
        model._tocom_plug.enabled = False
        assert not torch.allclose(plugged, model(x), atol=1e-4), "the plugged ToCom changed nothing"
