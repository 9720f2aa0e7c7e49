"""Checkpoint digests and run-folder removal, on plain folders and on S3 (moto): no training here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vitpipe.cluster.checkpoints import CheckpointError, discard_train_run, verify_checkpoint, write_digests

pytestmark = pytest.mark.reliability


def _two_rank_checkpoint(root: Path) -> Path:
    """A checkpoint as Ray Train assembles it: each rank's files and digests merged into one folder."""
    ckpt = root / "checkpoint_0"
    for rank, files in enumerate(({"step/mp_rank_00_model_states.pt": b"model", "result.json": b"{}"},
                                  {"step/zero_pp_rank_1_optim_states.pt": b"optim-1"})):
        part = root / f"rank{rank}"
        for name, data in files.items():
            (part / name).parent.mkdir(parents=True, exist_ok=True)
            (part / name).write_bytes(data)
        write_digests(str(part), rank, world_size=2)
        for path in part.rglob("*"):
            if path.is_file():
                target = ckpt / path.relative_to(part)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return ckpt


def test_an_intact_multi_rank_checkpoint_verifies(tmp_path: Path) -> None:
    ckpt = _two_rank_checkpoint(tmp_path)
    assert sorted(p.name for p in ckpt.glob("digests.rank*.json")) == ["digests.rank0.json", "digests.rank1.json"]
    verify_checkpoint(str(ckpt))


@pytest.mark.parametrize(("damage", "named"), [
    (lambda c: (c / "step/mp_rank_00_model_states.pt").write_bytes(b"mode"), "mp_rank_00_model_states.pt: 4 bytes"),
    (lambda c: (c / "step/mp_rank_00_model_states.pt").write_bytes(b"MODEL"), "mp_rank_00_model_states.pt: sha256"),
    (lambda c: (c / "step/zero_pp_rank_1_optim_states.pt").unlink(), "zero_pp_rank_1_optim_states.pt: missing"),
    (lambda c: (c / "digests.rank1.json").unlink(), "digests.rank1.json: missing"),
    (lambda c: (c / "digests.rank0.json").write_bytes(b""), "digests.rank0.json: unreadable"),
    (lambda c: [p.unlink() for p in c.glob("digests.*")], "no digests.rank<R>.json"),
    (lambda c: (c / "step/planted.pt").write_bytes(b"x"), "step/planted.pt: not listed"),
], ids=["truncated", "altered", "missing-file", "missing-rank", "empty-digests", "no-digests", "unlisted"])
def test_a_damaged_or_incomplete_checkpoint_is_rejected_naming_the_file(tmp_path: Path, damage, named) -> None:
    ckpt = _two_rank_checkpoint(tmp_path)
    damage(ckpt)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        verify_checkpoint(str(ckpt))


def _runs(tmp_path: Path) -> Path:
    storage = tmp_path / "ray-train"
    for name in ("abc123", "abc1234"):  # a key that extends another is a different run
        (storage / name / "checkpoint_0").mkdir(parents=True)
        (storage / name / "checkpoint_0" / "best.safetensors").write_bytes(b"w")
        (storage / name / "checkpoint_manager_snapshot.json").write_text("{}")
    return storage


def test_discard_train_run_removes_exactly_that_run_locally(tmp_path: Path) -> None:
    storage = _runs(tmp_path)
    discard_train_run(str(storage), "abc123")
    assert sorted(p.name for p in storage.iterdir()) == ["abc1234"]
    discard_train_run(str(storage), "abc123")  # already gone: nothing to do
    with pytest.raises(ValueError):
        discard_train_run(str(storage), "../ray-train")


def test_discard_train_run_removes_exactly_that_run_on_s3(s3_bucket: str, s3_client) -> None:
    bucket, root = s3_bucket.removeprefix("s3://").split("/", 1)
    for key in ("abc123/checkpoint_0/best.safetensors", "abc123/checkpoint_manager_snapshot.json",
                "abc1234/checkpoint_0/best.safetensors"):
        s3_client.put_object(Bucket=bucket, Key=f"{root}/ray-train/{key}", Body=b"w")
    discard_train_run(f"{s3_bucket}/ray-train", "abc123")
    left = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert [k for k in left if "/abc123/" in k] == []
    assert f"{root}/ray-train/abc1234/checkpoint_0/best.safetensors" in left
