"""Two `vitpipe run` of the same config against the same store: each stage is computed exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from vitpipe.cluster.lease import lease_key
from vitpipe.cluster.manifest import load_manifest
from vitpipe.cluster.store import open_store
from vitpipe.pipelines.spec import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_second_runner_waits_for_the_first_and_reuses_its_outputs(ray_local: str, mlflow_server: str,
                                                                   tmp_path: Path) -> None:
    config = {
        "name": "race", "seed": 0, "work_dir": str(tmp_path / "work"), "experiment": "test-race",
        "tracking_uri": mlflow_server, "tasks": {"faces": {"source": "faces"}},
        "stages": {"finetune": {
            "methods": ["linear"],
            # long enough (~10 s here) for the second runner to arrive while the first one trains (linear trains on
            # cached features: 400 steps took 7.5 s)
            "train": {"steps": 800, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 200, "log_every": 100},
            "resources": {"num_workers": 1, "cpus_per_worker": 1}}},
    }
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    store = open_store(cfg.store_uri)
    env = {**os.environ, "RAY_ADDRESS": ray_local}

    gated = ("import pathlib, sys, time; import vitpipe.pipelines.cli as cli\n"  # imports done before the gate opens
             "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.05)\n"
             "sys.exit(cli.main(['run', sys.argv[2]]))")

    def start(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")
        gate = tmp_path / f"{name}.go"
        return subprocess.Popen([sys.executable, "-c", gated, str(gate), str(path)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    def finetune_lease_held() -> bool:
        return any(json.loads(store.read_bytes(k))["state"] == "held" for k in store.list("leases/finetune"))

    first, second = start("first"), start("second")  # both import now; each runs once its gate opens
    (tmp_path / "first.go").touch()
    deadline = time.monotonic() + 300
    try:  # let the second runner go while the first one is computing the finetune stage
        while not finetune_lease_held():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first runner never started fine-tuning"
            time.sleep(0.2)
        (tmp_path / "second.go").touch()
        assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-3000:]
        assert first.wait(timeout=400) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("test-race").experiment_id
    parents = client.search_runs([experiment], "tags.`vitpipe.pipeline` = 'race'", order_by=["start_time ASC"])
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    children = {p.info.run_id: {c.data.tags["vitpipe.node"]: c for c in client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{p.info.run_id}'")} for p in parents}
    first_runs, second_runs = children[parents[0].info.run_id], children[parents[1].info.run_id]
    assert {n: r.data.tags["vitpipe.cached"] for n, r in first_runs.items()} == {
        "data/faces": "no", "finetune/faces/linear": "no"}
    assert {n: r.data.tags["vitpipe.cached"] for n, r in second_runs.items()} == {
        "data/faces": "yes", "finetune/faces/linear": "yes"}
    # The second runner found no manifest, waited on the lease, and then reused the first one's output.
    computed = first_runs["finetune/faces/linear"].info.run_id
    assert second_runs["finetune/faces/linear"].data.tags["vitpipe.computed_by"] == computed
    assert "test_accuracy" in second_runs["finetune/faces/linear"].data.metrics
    assert "reused   finetune/faces/linear" in (tmp_path / "second.log").read_text()
    hint = f"audit it with: vitpipe audit {parents[0].info.run_id} --tracking-uri {mlflow_server}"
    assert hint in (tmp_path / "first.log").read_text()  # this run's tracking server, not the default one

    for name, run in first_runs.items():
        kind, key = run.data.tags["vitpipe.stage.kind"], run.data.tags["vitpipe.stage.key"]
        assert second_runs[name].data.tags["vitpipe.stage.key"] == key
        manifest = load_manifest(store, kind, key)
        assert manifest is not None and manifest.mlflow_run_id == first_runs[name].info.run_id
        assert json.loads(store.read_bytes(lease_key(kind, key)))["state"] == "released"
    # The one fine-tuning that happened committed, and its checkpoints went with the commit.
    assert list(Path(cfg.work_dir, "ray-train").glob("*/checkpoint_*")) == []
