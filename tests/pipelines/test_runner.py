"""The runner end to end on real components: local Ray, DeepSpeed (gloo), MLflow, local and S3 stores."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from vitpipe.cluster.manifest import load_manifest, read_weights, stage_prefix
from vitpipe.cluster.store import open_store
from vitpipe.pipelines.audit import audit
from vitpipe.pipelines.dag import plan
from vitpipe.pipelines.runner import run
from vitpipe.pipelines.spec import PipelineConfig, load_config

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
    assert parent.info.run_name.startswith("e2e-20")  # <pipeline>-<UTC time>-<hex>: runs of one pipeline differ
    assert parent.data.tags["mlflow.source.name"] == "vitpipe run e2e" and parent.data.tags["mlflow.user"]
    assert parent.data.tags["mlflow.source.git.commit"] == parent.data.tags["vitpipe.git_commit"]
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view
    assert "mean_test_accuracy.linear" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert artifacts >= {"summary.json", "accuracy_table.csv", "accuracy_heatmap.png", "accuracy_table.json"}
    table = json.loads(Path(client.download_artifacts(summary.run_id, "accuracy_table.json")).read_text())
    assert table["columns"] == ["task", "linear", "lora"] and [row[0] for row in table["data"]] == ["faces", "textures"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary.run_id}'")
    assert len(children) == 8
    store = open_store(cfg.store_uri)
    keys = {o.node.name: o.key for o in summary.outcomes}  # not re-planned: a commit meanwhile changes keys
    pretrain = load_manifest(store, "pretrain", keys["pretrain"])
    assert set(pretrain.files) == {"encoder.safetensors", "decoders.safetensors", "history.json"}
    assert {"probe_accuracy.faces", "probe_accuracy_random_init.faces"} <= set(pretrain.metrics)
    by_node = {c.data.tags["vitpipe.node"]: c for c in children}
    for child in children:
        tags = child.data.tags
        assert tags["vitpipe.cached"] == "no" and child.info.status == "FINISHED"
        manifest = load_manifest(store, tags["vitpipe.stage.kind"], tags["vitpipe.stage.key"])
        assert manifest is not None and manifest.mlflow_run_id == child.info.run_id
        # MLflow's duration is the node's: its run opens when the node is launched, before the node's clock
        # starts in its Ray task (Ray's dispatch and a fresh worker's start come between: well under 1 s idle,
        # 6.7 s seen with two other test shards keeping both cores busy), and closes once the node has committed
        # its manifest and logged it (under a second idle)
        started, finished = (child.info.start_time / 1000, child.info.end_time / 1000)
        assert 0 <= manifest.timings["started_at"] - started < 30, (tags, manifest.timings, started)
        assert 0 <= finished - manifest.timings["finished_at"] < 10, (tags, manifest.timings, finished)
        assert "manifest.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
        if tags["vitpipe.stage.kind"] == "finetune":
            assert set(json.loads(tags["vitpipe.upstream"])) == {"data", "backbone"}
            classes = load_manifest(store, "data", keys[f"data/{manifest.outputs['task']}"]).outputs["classes"]
            assert child.data.metrics["test_accuracy"] > 1.5 / len(classes), child.data.metrics
            # opened when the node started, so its MLflow duration is the node's: after its backbone was made
            assert child.info.start_time >= by_node["pretrain"].info.end_time
            assert child.data.params["train.lr"] and "lr" not in child.data.params["methods"]  # the one in effect
            curve = client.get_metric_history(child.info.run_id, "eval/val_accuracy")  # start and every checkpoint
            assert sorted(m.step for m in curve) == [0, 4, 8, 12]
            assert child.data.tags["vitpipe.backbone"] == "pretrained"
            assert json.loads(tags["vitpipe.upstream"])["backbone"] == keys["pretrain"]
            assert "loss" in child.data.metrics and "images_per_s" in child.data.metrics
            assert len(tags["vitpipe.data.fingerprint"]) == 64
            logged = child.inputs.dataset_inputs  # MLflow's datasets table: the task data it read
            assert [(d.dataset.name, d.dataset.digest) for d in logged] == [
                (manifest.outputs["task"], tags["vitpipe.data.fingerprint"][:36])]
            assert set(manifest.files) == {"delta.safetensors", "history.json"}
            logged = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"delta.safetensors", "history.json"} <= logged  # the run holds the model, not only a pointer
            assert ("peft_adapter" in logged) == (manifest.outputs["method"] == "lora")
    node = next(o for o in summary.outcomes if o.node.name == "finetune/faces/lora")
    assert_peft_loads_the_adapter(client, store, node, by_node[node.node.name].info.run_id, keys)


def assert_peft_loads_the_adapter(client, store, outcome, run_id: str, keys: dict[str, str]) -> None:
    """The logged LoRA adapter is Hugging Face peft's format: PeftModel on the same timm ViT is the task model."""
    from peft import PeftModel

    from vitpipe.tasks.finetune.stage import load_task_model

    cfg = outcome.node.cfg
    inputs = {"model": outcome.manifest, "data": load_manifest(store, "data", keys["data/faces"]),
              "backbone": load_manifest(store, "pretrain", keys["pretrain"])}
    ours = load_task_model(store, cfg, inputs, seed=0)
    base = cfg.backbone.build(num_classes=len(inputs["data"].outputs["classes"]))
    base.load_state_dict(read_weights(store, inputs["backbone"], "encoder.safetensors"), strict=False)
    folder = client.download_artifacts(run_id, "peft_adapter")
    theirs = PeftModel.from_pretrained(base, folder).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)


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
    # 2 CPUs (Ray's local test instance): never more than two at a time. (Whether two do overlap depends on
    # timing: a warm worker process trains one of these nodes in ~1-2 s, often before a second process is up.)
    assert max_overlap(spans) <= 2, spans


def test_rerun_trains_nothing(first_run) -> None:
    cfg, _, _, _ = first_run
    before = checkpoint_dirs(cfg)
    out = io.StringIO()
    again = run(cfg, out)
    assert set(statuses(again).values()) == {"cached"}
    assert "all 8 nodes cached: nothing was trained." in out.getvalue()
    assert checkpoint_dirs(cfg) == before
    assert all(status == "cached" for _, _, status in plan(cfg))


def test_audit_reads_a_moved_store_when_told_where_and_says_so_when_not(first_run, tmp_path: Path, capsys) -> None:
    from vitpipe.pipelines.cli import main

    cfg, summary, _, _ = first_run
    recorded = Path(cfg.store_uri).resolve()
    moved = tmp_path / "moved-store"
    recorded.rename(moved)
    try:
        assert main(["audit", summary.run_id, "--tracking-uri", cfg.tracking]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert err == [f"vitpipe: error: store not found at {recorded} (moved? give its place with --store)"]
        assert main(["audit", summary.run_id, "--tracking-uri", cfg.tracking, "--store", str(moved)]) == 0
        out = capsys.readouterr().out
        assert f"store {moved}" in out and "8 nodes, 8 verified, 0 with problems" in out
        assert not recorded.exists()  # a read-only command created nothing
    finally:
        moved.rename(recorded)


def test_a_copied_work_folder_is_relocated_then_audited_where_it_is(first_run, tmp_path: Path, capsys) -> None:
    """MLflow records absolute artifact locations; `vitpipe relocate` points a copy's records into the copy."""
    from vitpipe.pipelines.cli import main

    cfg, summary, _, _ = first_run
    original = Path(cfg.work_dir).resolve()
    copy = (tmp_path / "elsewhere" / "work").resolve()
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("ray-train", "*.lock"))
    tracking = f"sqlite:///{copy / 'mlflow.db'}"
    client = MlflowClient(tracking)
    child = next(o.manifest.mlflow_run_id for o in summary.outcomes if o.node.name == "finetune/faces/lora")
    assert client.get_run(child).info.artifact_uri.startswith(original.as_uri() + "/")  # the copy's records

    assert main(["relocate", str(copy)]) == 0
    assert f"MLflow records now point here (were under {original})" in capsys.readouterr().out
    assert client.get_run(child).info.artifact_uri.startswith(copy.as_uri() + "/")
    got = Path(client.download_artifacts(child, "manifest.json", str(tmp_path)))
    assert got.read_bytes() == next(copy.glob(f"mlflow-artifacts/**/{child}/artifacts/manifest.json")).read_bytes()
    assert client.get_run(summary.run_id).data.tags["vitpipe.store"] == str(copy / "artifacts")
    assert main(["audit", summary.run_id, "--tracking-uri", tracking]) == 0  # no --store: the copy's own
    out = capsys.readouterr().out
    assert f"store {copy / 'artifacts'}" in out and "8 nodes, 8 verified, 0 with problems" in out
    assert f"run {child}" in out and "source faces" in out  # MLflow run ids and data sources listed
    assert MlflowClient(cfg.tracking).get_run(child).info.artifact_uri.startswith(original.as_uri() + "/")
    assert main(["relocate", str(copy)]) == 0 and "already point here" in capsys.readouterr().out
    assert main(["relocate", str(tmp_path)]) == 2 and "no mlflow.db here" in capsys.readouterr().err


def test_plan_and_audit_create_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    from vitpipe.pipelines.cli import main

    monkeypatch.chdir(tmp_path)  # the demo's relative work_dir, which does not exist here
    assert main(["plan"]) == 0
    assert f"store {tmp_path}/vitpipe-work/artifacts; tracking sqlite:///{tmp_path}" in capsys.readouterr().out
    assert main(["audit", "0123abcd"]) == 2
    assert "no MLflow database at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_tampered_artifact_is_detected_and_recomputed(first_run) -> None:
    cfg, summary, _, _ = first_run
    store = open_store(cfg.store_uri)
    key = next(k for n, k, _ in plan(cfg) if n.name == "finetune/faces/linear")
    weights = Path(store.local_path(f"{stage_prefix('finetune', key)}/delta.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    _, rows, _ = audit(summary.run_id, cfg.tracking)
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
    proc = subprocess.Popen([sys.executable, "-m", "vitpipe.pipelines.cli", "run", str(path)], env=env,
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
    tags, rows, _ = audit(summary.run_id, mlflow_server)
    assert [r.node for r in rows] == ["data/faces", "finetune/faces/linear"]
    assert all(not r.problems for r in rows)
    store = open_store(s3_bucket)
    assert any(k.endswith("delta.safetensors") for k in store.list("stages/finetune"))
    child = next(c for c in client.search_runs([client.get_run(summary.run_id).info.experiment_id],
                                                f"tags.mlflow.parentRunId = '{summary.run_id}'")
                 if c.data.tags["vitpipe.stage.kind"] == "finetune")
    assert "manifest.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
