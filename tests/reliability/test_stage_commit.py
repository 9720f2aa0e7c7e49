"""The runner's side of issue 17: once a stage commits its manifest, its Ray Train run is gone, so a re-run
after the manifest is deleted trains from scratch instead of restoring whatever the old run left."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitpipe.cluster.manifest import load_manifest
from vitpipe.cluster.retry import RetryPolicy
from vitpipe.cluster.store import open_store
from vitpipe.cluster.tracking import Tracker
from vitpipe.pipelines.execute import NodeEnv, execute_node
from vitpipe.tasks.prepare.spec import DataNode
from vitpipe.tasks.spec import Node

pytestmark = pytest.mark.reliability


def test_committing_a_stage_removes_its_ray_train_run(tmp_path: Path) -> None:
    key, other = "a" * 64, "a" * 63 + "b"
    storage = tmp_path / "ray-train"
    for name in (key, other):  # a stale run of this stage's key, and another stage's run
        (storage / name / "checkpoint_0").mkdir(parents=True)
        (storage / name / "checkpoint_0" / "best.safetensors").write_bytes(b"stale")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "reliability")
    env = NodeEnv(str(tmp_path / "artifacts"), RetryPolicy(), tracker, seed=0, train_storage=str(storage),
                  board=None, run_id=tracker.start_run("data/faces", {}))
    node = Node("data/faces", "data", DataNode(source="faces"))
    execute_node._function(node, key, env, [])  # the Ray task's body, here: what it does, not where
    assert load_manifest(open_store(env.store_uri), "data", key) is not None
    assert sorted(p.name for p in storage.iterdir()) == [other]
