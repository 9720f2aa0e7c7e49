"""The README's "your own data" walk-through, end to end on real components: a folder of JPEGs written here
becomes a task, is fine-tuned and pruned through `vitpipe run`'s runner, and the export reloads."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from vitpipe.cluster.manifest import load_manifest, read_bytes
from vitpipe.cluster.store import open_store
from vitpipe.models.deploy import load
from vitpipe.pipelines.runner import run
from vitpipe.pipelines.spec import load_config
from vitpipe.tasks.classification import accuracy
from vitpipe.tasks.data.bundled import textures, write_imagefolder
from vitpipe.tasks.prepare.spec import DataOutputs


@pytest.fixture(scope="module")
def own_run(ray_local, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("own-data")
    counts = write_imagefolder(textures(seed=3), tmp / "my_images", per_class=60)
    assert counts == {"brick": 60, "grass": 60, "gravel": 60}
    train = {"steps": 30, "batch_size": 32, "warmup_steps": 3, "checkpoint_every": 10, "log_every": 10}
    pipeline = {
        "name": "own", "work_dir": str(tmp / "work"), "experiment": "test-own-data",
        "tasks": {"surfaces": {"source": f"imagefolder:{tmp / 'my_images'}"}},
        "stages": {
            "finetune": {"methods": [{"name": "fact_tt", "lr": 0.005}], "train": train,
                         "resources": {"num_workers": 1, "cpus_per_worker": 1}},
            "prune": {"keep_ratio": 0.5, "train": {**train, "lr": 0.002}, "recover": None, "latency_repeats": 3,
                      "resources": {"num_workers": 1, "cpus_per_worker": 1}},
        },
    }
    path = tmp / "my_pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    cfg = load_config(path)
    out = io.StringIO()
    return cfg, run(cfg, out), out.getvalue(), tmp


def test_a_folder_of_jpegs_becomes_a_fine_tuned_pruned_model(own_run) -> None:
    cfg, summary, console, tmp = own_run
    assert summary.ok, console
    assert [o.node.name for o in summary.outcomes] == ["data/surfaces", "finetune/surfaces/fact_tt",
                                                      "prune/surfaces/fact_tt"]
    store = open_store(cfg.store_uri)
    manifests = {o.node.name: o.manifest for o in summary.outcomes}
    data = manifests["data/surfaces"].outputs
    shards = DataOutputs.of(manifests["data/surfaces"]).uri(store)
    assert data["classes"] == ["brick", "grass", "gravel"] and sum(data["counts"].values()) == 180
    finetuned = manifests["finetune/surfaces/fact_tt"].metrics["test_accuracy"]
    assert finetuned > 0.5, console  # three classes: chance is 1/3
    prune = load_manifest(store, "prune", summary.outcomes[2].key)
    for name in ("model.safetensors", "model.json"):
        (tmp / name).write_bytes(read_bytes(store, prune, f"deploy/{name}"))
    deployed = load(tmp)
    assert accuracy(deployed, shards, "test", 32) == pytest.approx(prune.metrics["test_accuracy_after"])
    assert prune.metrics["params_ratio"] < 0.8


def test_editing_the_folder_changes_only_its_branch(own_run) -> None:
    from vitpipe.pipelines.dag import plan

    cfg, summary, _, tmp = own_run
    assert {status for _, _, status in plan(cfg)} == {"cached"}
    extra = next((tmp / "my_images" / "brick").iterdir())
    Path(tmp / "my_images" / "brick" / "copy.jpg").write_bytes(extra.read_bytes())
    assert [status for _, _, status in plan(cfg)] == ["pending"] * 3
