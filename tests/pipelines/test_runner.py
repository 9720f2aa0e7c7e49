"""The runner end to end on real components: local Ray, DeepSpeed (gloo), MLflow, local and S3 stores."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cluster.manifest import load_manifest, stage_prefix
from cluster.store import open_store
from pipelines.audit import audit
from pipelines.runner import plan, run
from pipelines.spec import PipelineConfig, load_config

PRETRAIN = {
    "objective": {"weights": {"localmim": 1.0, "infocl": 1.0},
                  "localmim": {"taps": [0, 1, 2, 3], "dec_dim": 32, "dec_heads": 2},
                  "infocl": {"rc_widths": [16, 16, 16, 16]}},
    "train": {"steps": 6, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 3},
}


def write_config(tmp_path: Path, name: str, tasks=("faces", "textures"), methods=("linear",), steps=12,
                 cpus_per_worker=1, pretrain: bool = False, **top) -> Path:
    data = {
        "name": name, "seed": 0, "work_dir": str(tmp_path / "work"), "experiment": f"test-{name}",
        "tasks": {t: {"source": t} for t in tasks},
        "stages": {"finetune": {
            "methods": list(methods),
            "train": {"steps": steps, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 4},
            "resources": {"num_workers": 1, "cpus_per_worker": cpus_per_worker}}},
        **top,
    }
    if pretrain:
        data["corpus"] = {"source": "photos"}
        data["stages"]["pretrain"] = PRETRAIN
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def statuses(summary) -> dict[str, str]:
    return {o.node.name: o.status for o in summary.outcomes}


def checkpoint_dirs(cfg: PipelineConfig) -> list[Path]:
    return sorted(Path(cfg.work_dir, "ray-train").glob("*/checkpoint_*"))


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory: pytest.TempPathFactory):
    """Pretrain + 2 tasks x 2 methods; the 4 finetune nodes ask for 1 CPU and 0.25 GPU each (none here)."""
    tmp = tmp_path_factory.mktemp("demo")
    cfg = load_config(write_config(tmp, "e2e", methods=("linear", "lora"), pretrain=True),
                      ("stages.finetune.resources.gpus_per_worker=0.25",))
    out, warnings = io.StringIO(), _Warnings()
    logging.getLogger("vitpipe").addHandler(warnings)
    try:
        summary = run(cfg, out)
    finally:
        logging.getLogger("vitpipe").removeHandler(warnings)
    return cfg, summary, out.getvalue(), warnings.messages


def test_pipeline_runs_every_node_and_tracks_it_in_mlflow(first_run) -> None:
    cfg, summary, console, _ = first_run
    assert summary.ok, console
    assert statuses(summary) == {
        "data/faces": "ran", "data/textures": "ran", "data/corpus": "ran", "pretrain": "ran",
        "finetune/faces/linear": "ran", "finetune/faces/lora": "ran",
        "finetune/textures/linear": "ran", "finetune/textures/lora": "ran"}
    assert "test accuracy (task x method)" in console
    client = MlflowClient(cfg.tracking)
    parent = client.get_run(summary.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["vitpipe.git_commit"] and parent.data.tags["vitpipe.nodes_ran"] == "8"
    assert "mean_test_accuracy.linear" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert artifacts >= {"summary.json", "accuracy_table.csv", "accuracy_heatmap.png"}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary.run_id}'")
    assert len(children) == 8
    store = open_store(cfg.store_uri)
    keys = {o.node.name: o.key for o in summary.outcomes}  # not re-planned: a commit meanwhile changes keys
    pretrain = load_manifest(store, "pretrain", keys["pretrain"])
    assert set(pretrain.files) == {"encoder.safetensors", "decoders.safetensors", "history.json"}
    assert {"probe_accuracy.faces", "probe_accuracy_random_init.faces"} <= set(pretrain.metrics)
    for child in children:
        tags = child.data.tags
        assert tags["vitpipe.cached"] == "no" and child.info.status == "FINISHED"
        manifest = load_manifest(store, tags["vitpipe.stage.kind"], tags["vitpipe.stage.key"])
        assert manifest is not None and manifest.mlflow_run_id == child.info.run_id
        assert "manifest.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
        if tags["vitpipe.stage.kind"] == "finetune":
            assert set(json.loads(tags["vitpipe.upstream"])) == {"data", "backbone"}
            assert 0.0 <= child.data.metrics["test_accuracy"] <= 1.0
            assert child.data.tags["backbone"] == "pretrained"
            assert json.loads(tags["vitpipe.upstream"])["backbone"] == keys["pretrain"]
            assert "loss" in child.data.metrics and "images_per_s" in child.data.metrics
            assert len(tags["vitpipe.data.fingerprint"]) == 64
            assert set(manifest.files) == {"delta.safetensors", "history.json"}


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of [start, end] intervals that contain one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_gpu_requests_fall_back_to_cpu_and_four_one_cpu_nodes_share_two_cpus(first_run) -> None:
    _, summary, _, warnings = first_run
    assert len(warnings) == 1 and "no GPUs: 4 node(s)" in warnings[0], warnings
    finetunes = [o.manifest for o in summary.outcomes if o.node.kind == "finetune"]
    assert len(finetunes) == 4 and all(o.status == "ran" for o in summary.outcomes)
    spans = [(m.timings["started_at"], m.timings["finished_at"]) for m in finetunes]
    assert max_overlap(spans) == 2, spans  # 2 CPUs (Ray's local test instance): two at a time, never more


def test_rerun_trains_nothing(first_run) -> None:
    cfg, _, _, _ = first_run
    before = checkpoint_dirs(cfg)
    out = io.StringIO()
    again = run(cfg, out)
    assert set(statuses(again).values()) == {"cached"}
    assert "all 8 nodes cached: nothing was trained." in out.getvalue()
    assert checkpoint_dirs(cfg) == before
    assert all(status == "cached" for _, _, status in plan(cfg))


def test_tampered_artifact_is_detected_and_recomputed(first_run) -> None:
    cfg, summary, _, _ = first_run
    store = open_store(cfg.store_uri)
    key = next(k for n, k, _ in plan(cfg) if n.name == "finetune/faces/linear")
    weights = Path(store.local_path(f"{stage_prefix('finetune', key)}/delta.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    _, rows = audit(summary.run_id, cfg.tracking)
    corrupt = {r.node: r.problems for r in rows if r.problems}
    assert list(corrupt) == ["finetune/faces/linear"] and "sha256 mismatch" in corrupt["finetune/faces/linear"][0]
    assert {n.name for n, _, s in plan(cfg) if s == "pending"} == {"finetune/faces/linear"}

    again = run(cfg, io.StringIO())
    assert statuses(again)["finetune/faces/linear"] == "ran"
    assert [s for n, s in statuses(again).items() if n != "finetune/faces/linear"] == ["cached"] * 7
    assert load_manifest(store, "finetune", key) is not None


def test_driver_killed_mid_run_resumes_only_unfinished_nodes(ray_local: str, tmp_path: Path) -> None:
    # Each finetune node takes both CPUs, so they run one after another; kill after the first commits.
    path = write_config(tmp_path, "killed", steps=16, cpus_per_worker=2)
    cfg = load_config(path)
    store = open_store(cfg.store_uri)
    env = {**os.environ, "RAY_ADDRESS": ray_local}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    try:
        while not store.list("stages/finetune") or not any(
                k.endswith("manifest.json") for k in store.list("stages/finetune")):
            assert proc.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "no finetune node finished in time"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = {n.name for n, _, s in plan(cfg) if s == "cached"}
    assert {"data/faces", "data/textures"} <= done_before and len(done_before) == 3

    client = MlflowClient(cfg.tracking)
    experiment = client.get_experiment_by_name(cfg.experiment).experiment_id
    left_running = {r.info.run_id for r in client.search_runs([experiment], "attributes.status = 'RUNNING'")}
    assert left_running  # what a killed driver leaves: its parent and open children

    resumed = run(cfg, io.StringIO())
    assert resumed.ok
    assert {n for n, s in statuses(resumed).items() if s == "ran"} == {
        "finetune/faces/linear", "finetune/textures/linear"} - done_before
    # the re-run found the killed driver's runs and ended them: no phantom live runs in the UI
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    assert {client.get_run(r).info.status for r in left_running} == {"KILLED"}


def test_mlflow_server_and_s3_store(ray_local, mlflow_server: str, s3_bucket: str, tmp_path: Path) -> None:
    path = write_config(tmp_path, "remote", tasks=("faces",), tracking_uri=mlflow_server, store=s3_bucket)
    cfg = load_config(path)
    summary = run(cfg, io.StringIO())
    assert summary.ok
    client = MlflowClient(mlflow_server)
    assert client.get_run(summary.run_id).data.tags["vitpipe.store"] == s3_bucket
    tags, rows = audit(summary.run_id, mlflow_server)
    assert [r.node for r in rows] == ["data/faces", "finetune/faces/linear"]
    assert all(not r.problems for r in rows)
    store = open_store(s3_bucket)
    assert any(k.endswith("delta.safetensors") for k in store.list("stages/finetune"))
    child = next(c for c in client.search_runs([client.get_run(summary.run_id).info.experiment_id],
                                                f"tags.mlflow.parentRunId = '{summary.run_id}'")
                 if c.data.tags["vitpipe.stage.kind"] == "finetune")
    assert "manifest.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
