"""Fitting released checkpoint layouts onto a timm ViT: exact loads, dropped/resampled keys, clear misfits."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from vitpipe.models.vit import build_vit
from vitpipe.models.weights import (
    WeightsError,
    adapt_state_dict,
    load_into,
    timm_state_dict,
    timm_weights_location,
    unwrap_checkpoint,
)

ARCH = "vitpipe_tiny_patch4_32"  # 32 px, patch 4 (8x8 grid), width 64


def tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_vit(ARCH, **{"depth": 2, **overrides})


def source_state(seed: int = 1, **overrides) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny(seed, **overrides).state_dict().items()}


def assert_loaded(model, state: dict[str, torch.Tensor], keys) -> None:
    got = model.state_dict()
    for key in keys:
        assert torch.equal(got[key], state[key]), key


def test_round_trip_is_bit_exact():
    state = source_state()
    model = tiny(seed=0)
    report = load_into(model, state, "mem")
    assert report.ok and set(report.matched) == set(state) and not (report.dropped or report.resampled)
    assert_loaded(model, state, state)


def test_head_is_always_dropped_and_the_models_head_left_alone():
    state = source_state(num_classes=10)
    model = tiny(seed=0, num_classes=5)
    head = model.head.weight.clone()
    report = load_into(model, state, "mem")
    assert set(report.dropped) == {"head.weight", "head.bias"} and not report.missing
    assert torch.equal(model.head.weight, head)
    assert_loaded(model, state, [k for k in state if not k.startswith("head.")])


def test_mae_release_drops_decoder_and_mask_token():
    encoder = source_state()
    extra = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
             "decoder_pos_embed": torch.randn(1, 65, 32), "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32),
             "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.randn(48, 32)}
    state = unwrap_checkpoint({"model": {**encoder, **extra}}, "mae.pth")
    model = tiny()
    report = load_into(model, state, "mae.pth")
    assert set(report.dropped) == set(extra) and set(report.matched) == set(encoder)
    assert_loaded(model, encoder, encoder)


def test_localmim_release_takes_the_last_tap_norm_as_final_norm():
    encoder = source_state()
    final = {k: encoder.pop(k) for k in ("norm.weight", "norm.bias")}
    taps = {f"norm.{i}.{p}": torch.randn(64) for i in range(3) for p in ("weight", "bias")}
    taps |= {"norm.3.weight": final["norm.weight"], "norm.3.bias": final["norm.bias"]}
    decoders = {"decoder.0.embed.weight": torch.randn(16, 64), "decoder.3.pred.0.weight": torch.randn(27, 16, 1, 1),
                "hog_enc.0.conv.weight": torch.randn(2, 1, 3, 3)}
    model = tiny()
    report = load_into(model, unwrap_checkpoint({"model": {**encoder, **taps, **decoders}}, "localmim.pth"), "x")
    assert report.renamed == ("norm.3 -> norm",)
    assert set(report.dropped) == set(decoders) | {k for k in taps if not k.startswith("norm.3.")}
    assert torch.equal(model.norm.weight, final["norm.weight"]) and torch.equal(model.norm.bias, final["norm.bias"])


def test_deit_release_drops_the_distillation_token_and_its_position():
    state = source_state(num_classes=10)
    pos = state["pos_embed"]  # (1, 1 + 64, C): class position, then the grid
    dist_pos = torch.randn(1, 1, 64)
    deit = {**state, "dist_token": torch.randn(1, 1, 64), "head_dist.weight": torch.randn(10, 64),
            "head_dist.bias": torch.zeros(10), "pos_embed": torch.cat([pos[:, :1], dist_pos, pos[:, 1:]], dim=1)}
    model = tiny()
    report = load_into(model, unwrap_checkpoint({"model": deit}, "deit.pth"), "deit.pth")
    assert {"dist_token", "head_dist.weight", "head.weight"} <= set(report.dropped)
    assert torch.equal(model.pos_embed, pos)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_pos_embed_resampled_from_a_16px_grid_keeps_the_class_position():
    state = source_state(img_size=16)  # 4x4 grid
    model = tiny(img_size=32)  # 8x8 grid
    report = load_into(model, state, "mem")
    assert report.resampled == ("pos_embed (1, 17, 64) -> (1, 65, 64)",)
    assert torch.equal(model.pos_embed[:, :1], state["pos_embed"][:, :1])
    grid = state["pos_embed"][:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 64, 64)
    torch.testing.assert_close(model.pos_embed[:, 1:], want)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_patch_size_change_resamples_the_patch_kernel():
    state = source_state(patch_size=4, img_size=16)  # 4x4 grid of 4 px patches
    model = tiny(patch_size=8)  # 4x4 grid of 8 px patches at 32 px: the same pos_embed
    report = load_into(model, state, "mem")
    assert report.resampled == ("patch_embed.proj.weight (64, 3, 4, 4) -> (64, 3, 8, 8)",)
    # FlexiViT's resize is exact upwards: a patch resized to 8 px meets the new kernel as it met the old one.
    patch = torch.randn(5, 3, 4, 4)
    bigger = F.interpolate(patch, size=(8, 8), mode="bicubic", antialias=True)
    want = F.conv2d(patch, state["patch_embed.proj.weight"])
    torch.testing.assert_close(F.conv2d(bigger, model.patch_embed.proj.weight), want, atol=1e-4, rtol=1e-4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_missing_key_is_a_one_line_error_that_names_it():
    state = source_state()
    del state["blocks.1.attn.qkv.weight"]
    with pytest.raises(WeightsError) as err:
        load_into(tiny(), state, "/x/y.pth", arch=ARCH)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("weights /x/y.pth: 1 keys do not fit vitpipe_tiny_patch4_32")
    assert "missing blocks.1.attn.qkv.weight" in msg


def test_width_mismatch_and_unknown_keys_are_reported():
    state = {**source_state(embed_dim=32, num_heads=2), "pre_logits.fc.weight": torch.randn(4, 4)}
    adapted, report = adapt_state_dict(state, tiny())
    assert not report.ok and report.unexpected == ("pre_logits.fc.weight",)
    assert "blocks.0.norm1.weight (32,) vs (64,)" in report.mismatched and not adapted.get("blocks.0.norm1.weight")
    with pytest.raises(WeightsError, match=r"unexpected pre_logits.fc.weight; shape cls_token"):
        load_into(tiny(), state, "w")


def test_fc_norm_weights_fit_an_average_pooled_model_and_say_so_otherwise():
    state = source_state(global_pool="avg")  # MAE fine-tune layout: fc_norm.*, no norm.*
    assert "fc_norm.weight" in state and "norm.weight" not in state
    load_into(tiny(global_pool="avg"), state, "ft.pth")
    with pytest.raises(WeightsError, match="global_pool='avg'"):
        load_into(tiny(), state, "ft.pth")


def test_unwrap_strips_ddp_prefix_and_refuses_non_tensors():
    state = source_state()
    assert unwrap_checkpoint({"state_dict": {f"module.{k}": v for k, v in state.items()}}, "s").keys() == state.keys()
    with pytest.raises(WeightsError, match="w.pth: 1 entries are not tensors: epoch"):
        unwrap_checkpoint({**state, "epoch": 3}, "w.pth")


# --- timm's own pretrained loader, fed a local file through pretrained_cfg_overlay ------------------------

TIMM_NAME = "vit_tiny_patch16_224.augreg_in21k"
TIMM_TINY = dict(img_size=32, depth=2, num_classes=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_loader_reads_the_same_tensors(tmp_path, suffix):
    import timm

    torch.manual_seed(3)
    state = timm.create_model("vit_tiny_patch16_224", **TIMM_TINY).state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    loaded = timm_state_dict(TIMM_NAME, str(path), **TIMM_TINY)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    model = build_vit("vit_tiny_patch16_224", img_size=32, depth=2)
    report = load_into(model, loaded, f"timm:{TIMM_NAME}")
    assert set(report.matched) == set(state)


def test_timm_location_is_the_hub_repo_and_unknown_names_fail():
    where = timm_weights_location(TIMM_NAME)
    assert (where.kind, where.location, where.custom_load) == ("hf-hub", f"timm/{TIMM_NAME}", False)
    for name in ("vitpipe_tiny_patch4_32", "vit_tiny_patch16_224.nope"):
        with pytest.raises(WeightsError, match=f"no pretrained weights named '{name}'"):
            timm_weights_location(name)
        with pytest.raises(WeightsError):
            timm_state_dict(name, "/nonexistent.safetensors")
