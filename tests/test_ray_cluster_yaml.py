"""ray_cluster.yaml passes Ray's own cluster-config validation offline, and fits the VTAB-1k pipeline."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from vitpipe.pipelines.spec import load_config

ROOT = Path(__file__).resolve().parents[1]


def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_ray_validates_the_cluster_config() -> None:
    prepared = prepare_config(copy.deepcopy(cluster_config()))  # what `ray up` does before touching AWS
    validate_config(prepared)  # Ray's JSON schema of cluster configs
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_8x_h100"]["resources"]["GPU"] == 8 and types["gpu_1x_l4"]["resources"]["GPU"] == 1
    for name, node in types.items():
        if name != prepared["head_node_type"]:
            assert node["min_workers"] == 0 < node["max_workers"] <= prepared["max_workers"]
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert any("pip install" in c and "-e ~/vitpipe" in c for c in commands)
        assert any("VITPIPE_STORE" in c and "MLFLOW_TRACKING_URI" in c for c in commands)
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        assert any(c.startswith("source ~/vitpipe.env && ") and "ray start" in c for c in commands)
    assert prepared["file_mounts"] == {"~/vitpipe": "."}
    assert {".git", ".venv", "vitpipe-work"} <= set(prepared["rsync_exclude"])


def test_a_misspelled_field_is_caught() -> None:
    config = cluster_config()
    config["available_node_types"]["gpu_1x_l4"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


def test_every_vtab1k_stage_fits_a_worker_node_type() -> None:
    types = cluster_config()["available_node_types"]
    workers = [t["resources"] for name, t in types.items() if name != cluster_config()["head_node_type"]]
    cfg = load_config(ROOT / "pipelines" / "configs" / "vtab1k.yaml")
    stages = {name: getattr(cfg.stages, name) for name in type(cfg.stages).model_fields}
    for name, stage in stages.items():
        res = getattr(stage, "resources", None)
        if res is None:
            continue
        gpus, cpus = res.num_workers * res.gpus_per_worker, res.num_workers * res.cpus_per_worker
        fits = [w for w in workers if w.get("GPU", 0) >= gpus and w["CPU"] >= cpus]
        assert fits, f"stages.{name}: no worker node type has {gpus} GPUs and {cpus} CPUs"
        if 0 < res.gpus_per_worker < 1:  # fractional fan-out: a whole GPU's worth of nodes fits on one node
            share = round(1 / res.gpus_per_worker)
            assert any(w.get("GPU", 0) >= 1 and w["CPU"] >= share * res.cpus_per_worker for w in fits), name


def test_the_dashboard_and_its_jobs_api_listen_on_the_head_only() -> None:
    """The Jobs API runs code on the cluster unauthenticated: reachable through `ray dashboard`'s SSH tunnel, never
    from the network."""
    text = (Path(__file__).resolve().parents[1] / "ray_cluster.yaml").read_text()
    assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0" not in text
