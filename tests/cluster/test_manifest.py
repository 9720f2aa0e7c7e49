"""Stage outputs: manifest written last, sha256-verified on load, safetensors round trip."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from vitpipe.cluster.manifest import (
    MANIFEST_NAME,
    Manifest,
    StageWriter,
    load_manifest,
    read_bytes,
    read_json,
    read_weights,
    stage_prefix,
    verify_manifest,
)
from vitpipe.cluster.store import ArtifactStore, LocalStore, StoreError

KEY = "3f" * 32


def _write_finetune(store: ArtifactStore, tmp_path) -> Manifest:
    plot = tmp_path / "loss.png"
    plot.write_bytes(b"\x89PNG fake plot bytes")
    writer = StageWriter(store, "finetune", KEY)
    writer.put_weights("model.safetensors", {"w": torch.randn(4, 3), "b": torch.zeros(3)}, {"method": "lora"})
    writer.put_weights("delta/weights.safetensors", {"a": torch.ones(2, 2)})
    writer.put_json("eval.json", {"acc": 0.5, "per_class": [1, 0]})
    writer.put_file("plots/loss.png", str(plot))
    return writer.commit(
        metrics={"acc": 0.5, "loss": 1.25},
        outputs={"num_classes": 10, "dataset": {"uri": "s3://d/x", "fingerprint": "ab" * 32}},
        mlflow_run_id="run123",
        timings={"train_s": 3.5},
    )


def test_commit_then_load_verifies(store: ArtifactStore, tmp_path) -> None:
    written = _write_finetune(store, tmp_path)
    loaded = load_manifest(store, "finetune", KEY)
    assert loaded == written
    assert sorted(loaded.files) == ["delta/weights.safetensors", "eval.json", "model.safetensors",
                                    "plots/loss.png"]
    assert loaded.outputs["dataset"]["fingerprint"] == "ab" * 32 and loaded.mlflow_run_id == "run123"
    assert loaded.created_at.endswith("Z")
    assert verify_manifest(store, loaded) == []
    assert read_json(store, loaded, "eval.json") == {"acc": 0.5, "per_class": [1, 0]}
    assert read_bytes(store, loaded, "plots/loss.png") == b"\x89PNG fake plot bytes"
    raw = store.read_bytes(f"{stage_prefix('finetune', KEY)}/{MANIFEST_NAME}")
    assert raw == (json.dumps(json.loads(raw), sort_keys=True, indent=2) + "\n").encode()  # canonical
    assert load_manifest(store, "finetune", "other-key") is None


def test_corrupt_weights_make_stage_not_done(store: ArtifactStore, tmp_path, caplog) -> None:
    manifest = _write_finetune(store, tmp_path)
    path = f"{stage_prefix('finetune', KEY)}/model.safetensors"
    data = bytearray(store.read_bytes(path))
    data[-1] ^= 0x01
    if isinstance(store, LocalStore):
        with open(store.local_path(path), "r+b") as f:  # flip the byte in place, as a disk error would
            f.seek(len(data) - 1)
            f.write(data[-1:])
    else:
        store.write_bytes(path, bytes(data))

    problem = f"stages/finetune/{KEY}/model.safetensors: sha256 mismatch"
    with caplog.at_level(logging.WARNING, logger="vitpipe.cluster.manifest"):
        assert load_manifest(store, "finetune", KEY) is None
    assert problem in caplog.text
    assert verify_manifest(store, manifest) == [problem]
    assert load_manifest(store, "finetune", KEY, verify=False) == manifest
    with pytest.raises(StoreError, match="model.safetensors: sha256 mismatch"):
        read_weights(store, manifest, "model.safetensors")
    assert read_weights(store, manifest, "delta/weights.safetensors")["a"].sum() == 4


def test_missing_or_truncated_files_are_named(store: ArtifactStore, tmp_path) -> None:
    manifest = _write_finetune(store, tmp_path)
    prefix = stage_prefix("finetune", KEY)
    store.delete(f"{prefix}/eval.json")
    store.write_bytes(f"{prefix}/plots/loss.png", b"short")
    assert verify_manifest(store, manifest) == [
        f"{prefix}/eval.json: missing",
        f"{prefix}/plots/loss.png: size mismatch (5 bytes, manifest says 20)",
    ]
    assert load_manifest(store, "finetune", KEY) is None


def test_uncommitted_writer_leaves_no_manifest(store: ArtifactStore) -> None:
    writer = StageWriter(store, "distill", KEY)
    writer.put_weights("model.safetensors", {"w": torch.ones(3)})
    assert store.list(stage_prefix("distill", KEY)) == [f"stages/distill/{KEY}/model.safetensors"]
    assert load_manifest(store, "distill", KEY) is None


def test_manifest_is_written_last(tmp_path) -> None:
    class RecordingStore(LocalStore):
        def write_bytes(self, key: str, data: bytes) -> None:
            self.writes.append(key)
            super().write_bytes(key, data)

    store = RecordingStore(str(tmp_path / "root"))
    store.writes = []
    _write_finetune(store, tmp_path)
    assert len(store.writes) == 5 and store.writes[-1] == f"stages/finetune/{KEY}/manifest.json"


def test_rerun_removes_old_manifest_before_writing(store: ArtifactStore, tmp_path) -> None:
    _write_finetune(store, tmp_path)
    writer = StageWriter(store, "finetune", KEY)  # a re-run starts: the key must stop counting as done
    assert load_manifest(store, "finetune", KEY, verify=False) is None
    writer.put_bytes("model.safetensors", b"new")
    assert writer.commit().files["model.safetensors"].size == 3
    assert load_manifest(store, "finetune", KEY) is not None


def test_invalid_manifest_is_treated_as_missing(store: ArtifactStore, caplog) -> None:
    path = f"{stage_prefix('prune', KEY)}/{MANIFEST_NAME}"
    with caplog.at_level(logging.WARNING, logger="vitpipe.cluster.manifest"):
        store.write_bytes(path, b"{not json")
        assert load_manifest(store, "prune", KEY) is None
        store.write_bytes(path, json.dumps({"kind": "prune", "key": KEY}).encode())
        assert load_manifest(store, "prune", KEY) is None
    assert caplog.text.count("invalid manifest") == 2 and path in caplog.text


def test_safetensors_round_trip_is_exact(store: ArtifactStore) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(5, 7, generator=g),
        "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "i64": torch.arange(-5, 5),
        "mask": torch.rand(6, generator=g) > 0.5,
        "transposed": torch.randn(4, 6, generator=g).t(),  # non-contiguous
        "scalar": torch.tensor(3.25, dtype=torch.float64),
    }
    writer = StageWriter(store, "pretrain", KEY)
    writer.put_weights("backbone/model.safetensors", tensors, metadata={"arch": "vit_tiny"})
    manifest = writer.commit()
    loaded = read_weights(store, manifest, "backbone/model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


@pytest.mark.parametrize("name", ["../escape", "/abs", "a//b", "a\\b", "manifest.json", ""])
def test_unsafe_or_reserved_names_rejected(tmp_path, name: str) -> None:
    writer = StageWriter(LocalStore(str(tmp_path / "root")), "finetune", KEY)
    with pytest.raises(StoreError):
        writer.put_bytes(name, b"x")
    with pytest.raises(StoreError):
        StageWriter(LocalStore(str(tmp_path / "root")), "finetune", "a/../b")


def test_commit_is_final_and_outputs_must_be_json(tmp_path) -> None:
    store = LocalStore(str(tmp_path / "root"))
    writer = StageWriter(store, "evaluate", KEY)
    writer.commit()
    with pytest.raises(StoreError, match="already committed"):
        writer.put_bytes("late.json", b"{}")
    with pytest.raises(StoreError, match="not JSON-able"):
        StageWriter(store, "evaluate", "k2").commit(outputs={"tensor": torch.ones(1)})
    assert load_manifest(store, "evaluate", "k2") is None
