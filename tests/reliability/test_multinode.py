"""A lost node: a Ray cluster of a 0-CPU head and two worker nodes (ray.cluster_utils.Cluster, real raylets on
this machine) runs a pipeline whose fine-tune trains on 2 workers; after the first Ray Train checkpoint the node
that hosts a training worker is removed without grace. The run must finish on the other node, with the planned
keys, and leave no RUNNING run.

The cluster runs in a child process: the test session already has its own Ray (one per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from vitpipe.pipelines.dag import plan
from vitpipe.pipelines.spec import load_config

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import io, json, sys, threading, time
from pathlib import Path
import ray
from ray._private import state
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)

from vitpipe.pipelines.runner import run
from vitpipe.pipelines.spec import load_config

cfg = load_config(sys.argv[1])
removed = {}

def remove_a_training_node_after_the_first_checkpoint():
    while not list(Path(cfg.work_dir, "ray-train").glob("*/checkpoint_manager_snapshot.json")):
        time.sleep(0.2)
    training = {a["Address"]["NodeID"] for a in state.actors(actor_state_name="ALIVE").values()
                if a["ActorClassName"] == "RayTrainWorker"}
    victim = next(w for w in workers if w.node_id in training)
    removed["node"] = victim.node_id
    cluster.remove_node(victim, allow_graceful=False)

threading.Thread(target=remove_a_training_node_after_the_first_checkpoint, daemon=True).start()
out = io.StringIO()
summary = run(cfg, out)
print(json.dumps({"ok": summary.ok, "removed": removed.get("node"), "parent": summary.run_id,
                  "outcomes": {o.node.name: [o.status, o.key] for o in summary.outcomes},
                  "console": out.getvalue()}))
ray.shutdown()
cluster.shutdown()
"""


def test_a_worker_node_removed_mid_training_and_the_run_still_finishes(tmp_path: Path) -> None:
    config = tmp_path / "multinode.yaml"
    config.write_text(yaml.safe_dump({
        "name": "multinode", "seed": 0, "work_dir": str(tmp_path / "work"), "experiment": "test-multinode",
        "tasks": {"faces": {"source": "faces"}},
        "stages": {"finetune": {
            "methods": ["linear"],
            "train": {"steps": 40, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 4,
                      "max_failures": 3},
            "resources": {"num_workers": 2, "cpus_per_worker": 1}}},
    }))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", DRIVER, str(config)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["removed"] is not None, "no node was removed: no checkpoint, or no training worker on a worker node"
    assert result["ok"], result["outcomes"]

    cfg = load_config(config)
    planned = {node.name: key for node, key, _ in plan(cfg)}
    assert {name: key for name, (_, key) in result["outcomes"].items()} == planned  # the same keys
    assert {status for status, _ in result["outcomes"].values()} == {"ran"}
    assert "Traceback" not in result["console"]

    client = MlflowClient(cfg.tracking)
    experiment = client.get_experiment_by_name(cfg.experiment).experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    assert client.get_run(result["parent"]).info.status == "FINISHED"
