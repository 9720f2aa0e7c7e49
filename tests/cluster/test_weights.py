"""Weight sources: local files, S3 (moto over HTTP), timm through the HF hub cache; the sha256; the CLI."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from vitpipe.cluster.weights import local_weights_file, pretrained_backbone, read_weights_source, weights_digest
from vitpipe.models.settings import ViTSpec
from vitpipe.models.weights import WeightsError
from vitpipe.pipelines.cli import main

SPEC = ViTSpec(arch="vitpipe_tiny_patch4_32", overrides={"depth": 2})


def tiny_state(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return SPEC.build(num_classes=10).state_dict()


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def weights_file(tmp_path) -> Path:
    path = tmp_path / "encoder.safetensors"
    safetensors.torch.save_file(tiny_state(), path)
    return path


def test_local_safetensors_and_its_digest(weights_file):
    state, digest = read_weights_source(str(weights_file))
    assert_same(state, tiny_state())
    assert digest == sha(weights_file) == weights_digest(str(weights_file))


def test_pth_release_is_unwrapped(tmp_path):
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": tiny_state(), "epoch": 799}, path)
    state, digest = read_weights_source(str(path))
    assert_same(state, tiny_state())
    assert digest == sha(path)


class _Marker:
    """Unpickling this runs Path.touch: the marker file shows whether any code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pth"
    torch.save({"model": tiny_state(), "hook": _Marker(marker)}, path)
    with pytest.raises(WeightsError) as err:
        read_weights_source(str(path))
    msg = str(err.value)
    assert "\n" not in msg and "weights_only=True" in msg and "Unsupported global" in msg
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really does run code when fully unpickled
    assert marker.exists()


@pytest.mark.parametrize("name, message", [("nope.safetensors", "no such file"), ("w.npz", "unknown file type"),
                                           ("bad.safetensors", "not a valid safetensors file"),
                                           ("gs://b/w.safetensors", "unsupported URI scheme")])
def test_bad_sources(tmp_path, name, message):
    if name in ("w.npz", "bad.safetensors"):
        (tmp_path / name).write_bytes(b"not weights")
    source = name if "://" in name else str(tmp_path / name)
    with pytest.raises(WeightsError, match=f"^weights {source}: {message}"):
        read_weights_source(source)


def test_s3_source_is_cached_by_etag(s3_bucket, s3_client, weights_file, tmp_path):
    bucket = s3_bucket[len("s3://"):].split("/")[0]
    uri, cache = f"s3://{bucket}/models/encoder.safetensors", tmp_path / "cache"
    s3_client.upload_file(str(weights_file), bucket, "models/encoder.safetensors")
    state, digest = read_weights_source(uri, cache_dir=cache)
    assert_same(state, tiny_state())
    assert digest == sha(weights_file)
    first = local_weights_file(uri, cache_dir=cache)
    assert first.is_relative_to(cache) and weights_digest(uri, cache_dir=cache) == digest

    safetensors.torch.save_file(tiny_state(seed=2), weights_file)  # a new object under the same key
    s3_client.upload_file(str(weights_file), bucket, "models/encoder.safetensors")
    state, digest = read_weights_source(uri, cache_dir=cache)
    assert_same(state, tiny_state(seed=2))
    assert digest == sha(weights_file)
    assert local_weights_file(uri, cache_dir=cache) != first
    with pytest.raises(WeightsError, match=f"s3://{bucket}/nope.pth: no such object"):
        read_weights_source(f"s3://{bucket}/nope.pth", cache_dir=cache)


def test_pretrained_backbone_checks_the_key_sha(weights_file):
    model, report, digest = pretrained_backbone(SPEC, str(weights_file), num_classes=3)
    assert report.ok and set(report.dropped) == {"head.weight", "head.bias"} and model.head.out_features == 3
    assert torch.equal(model.blocks[1].mlp.fc2.weight, tiny_state()["blocks.1.mlp.fc2.weight"])
    assert pretrained_backbone(SPEC, str(weights_file), expected_sha256=digest)[2] == digest
    with pytest.raises(WeightsError, match="is not the stage key's 000000000000"):
        pretrained_backbone(SPEC, str(weights_file), expected_sha256="0" * 64)


# --- timm: through the HF hub's local cache, as on a cluster node that downloaded it before -------------

TIMM_NAME = "vit_tiny_patch16_224.augreg_in21k"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline HF hub cache holding timm/<TIMM_NAME>'s model.safetensors (a random full-size ViT-Ti)."""
    from huggingface_hub import constants

    revision = "0" * 40
    repo = tmp_path / "hub" / f"models--timm--{TIMM_NAME}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    torch.manual_seed(4)
    import timm

    state = timm.create_model("vit_tiny_patch16_224", num_classes=21843).state_dict()
    safetensors.torch.save_file(state, repo / "snapshots" / revision / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / revision / "model.safetensors"


def test_timm_source_reads_the_hub_file_through_timm(hub_cache):
    source = f"timm:{TIMM_NAME}"
    assert local_weights_file(source) == hub_cache and weights_digest(source) == sha(hub_cache)
    state, digest = read_weights_source(source)
    assert_same(state, safetensors.torch.load_file(hub_cache))
    assert digest == sha(hub_cache)
    # At 32 px (a 2x2 grid) the 14x14 position grid is resampled; the blocks load unchanged.
    model, report, _ = pretrained_backbone(ViTSpec(arch="vit_tiny_patch16_224", img_size=32), source)
    assert report.resampled == ("pos_embed (1, 197, 192) -> (1, 5, 192)",) and model.pos_embed.shape == (1, 5, 192)
    assert torch.equal(model.blocks[11].attn.qkv.weight, state["blocks.11.attn.qkv.weight"])


def test_timm_source_not_cached_offline_is_one_line(hub_cache):
    with pytest.raises(WeightsError, match="not in the HF cache and the hub is unreachable"):
        weights_digest("timm:vit_small_patch16_224.augreg_in21k")


# --- the CLI ------------------------------------------------------------------------------------------


def test_cli_inspect_prints_counts_and_sha(weights_file, capsys):
    assert main(["weights", "inspect", str(weights_file), "--arch", "vitpipe_tiny_patch4_32", "--img-size", "16"]) == 1
    out = capsys.readouterr().out
    # depth 4 vs the file's 2: blocks 2-3 are missing; the 8x8 position grid is resampled to 4x4.
    assert "matched, 24 missing, 0 unexpected, 0 shape mismatches, 2 dropped, 1 resampled" in out
    assert "missing    blocks.2.norm1.weight" in out and "resampled  pos_embed (1, 65, 64) -> (1, 17, 64)" in out
    assert f"sha256 {sha(weights_file)}" in out


def test_cli_inspect_bad_input_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"hook": _Marker(tmp_path / "ran")}, path)
    for argv in (["weights", "inspect", str(path), "--arch", "vitpipe_tiny_patch4_32"],
                 ["weights", "inspect", str(path), "--arch", "no_such_arch"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitpipe: error: ") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "ran")
