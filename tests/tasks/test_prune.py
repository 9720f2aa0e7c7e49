"""The prune stage on real components: local Ray Train + DeepSpeed, Parquet data from the data stage, a local
artifact store, MLflow (SQLite) with its model registry; the exported model reloads through models.deploy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import free_port, run_stage, seeded_encoder, shards_uri, wait_until_serving
from vitpipe.cluster.manifest import Manifest, StageWriter, read_bytes
from vitpipe.cluster.store import LocalStore
from vitpipe.cluster.tracking import Tracker
from vitpipe.models.deploy import load
from vitpipe.models.settings import ViTSpec
from vitpipe.models.tocom import TokenCompensator, save_tocom
from vitpipe.pipelines.dag import build_dag
from vitpipe.pipelines.spec import ConfigError, load_config
from vitpipe.tasks.classification import accuracy
from vitpipe.tasks.finetune.spec import FinetuneNode
from vitpipe.tasks.prepare.spec import DataNode
from vitpipe.tasks.prune import stage as prune
from vitpipe.tasks.prune.spec import PruneNode

BACKBONE = ViTSpec(overrides={"global_pool": "avg", "class_token": False})
ONE_WORKER = {"num_workers": 1, "cpus_per_worker": 1}
RECOVER = {"steps": 12, "batch_size": 32, "lr": 1e-3, "checkpoint_every": 6, "log_every": 6, "max_failures": 0}
DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Digits, a "pretrained" encoder (a seeded init) and a ToCom "distilled" on it (seeded, non-zero B)."""
    tmp = tmp_path_factory.mktemp("prune")
    store = LocalStore(str(tmp / "store"))
    encoder = seeded_encoder(store, BACKBONE)
    tocom = TokenCompensator(depth=4, width=64, rho=2, max_r=4)
    for block in tocom.blocks:
        torch.nn.init.normal_(block.b_q.weight, std=0.05)
        torch.nn.init.normal_(block.b_v.weight, std=0.05)
    distilled = StageWriter(store, "distill", "tocom")
    distilled.put_bytes("tocom.safetensors", save_tocom(tocom))
    digits = run_stage(store, tmp, "data", "digits", DataNode(source="digits"), {})
    outputs = {"max_r": 4, "rho": 2, "scale": 0.1, "pairs": 20, "backbone": "pretrained", "backbone_key": "seeded"}
    return {"tmp": tmp, "store": store, "backbone": encoder, "digits": digits,
            "tocom": distilled.commit(outputs=outputs),
            "tracker": Tracker(f"sqlite:///{tmp / 'mlflow.db'}", "test-prune")}


def finetune_config(method: str, **params) -> FinetuneNode:
    train = {"steps": 24, "batch_size": 32, "lr": 2e-3, "warmup_steps": 4, "checkpoint_every": 24, "log_every": 12,
             "max_failures": 0}
    return FinetuneNode(task="digits", methods=[{"name": method, **params}], backbone=BACKBONE,
                          train=train, resources=ONE_WORKER)


def prune_config(ft: FinetuneNode, pruner: str, **kwargs) -> PruneNode:
    train = {"steps": 30, "batch_size": 32, "lr": 5e-3, "checkpoint_every": 30, "log_every": 10, "max_failures": 0}
    return PruneNode(model=ft, pruner=pruner, train=train, resources=ONE_WORKER, latency_repeats=3, **kwargs)


def finetuned(world: dict, ft: FinetuneNode, key: str) -> Manifest:
    inputs = {"data": world["digits"], "backbone": world["backbone"]}
    return run_stage(world["store"], world["tmp"], "finetune", key, ft, inputs)


def exported(world: dict, manifest: Manifest, tmp: Path) -> Path:
    for name in ("model.safetensors", "model.json"):
        (tmp / name).write_bytes(read_bytes(world["store"], manifest, f"deploy/{name}"))
    return tmp


def test_resrep_on_a_merged_fact_model_with_tome_and_tocom(world: dict, tmp_path: Path) -> None:
    ft = finetune_config("fact_tt", rank=4)
    model = finetuned(world, ft, "digits-fact")
    # registered even if flagged: CPU timings of a loaded test machine may call it slower at both batch sizes
    cfg = prune_config(ft, "resrep", keep_ratio=0.5, r_tgt=4, recover=RECOVER, register_flagged=True,
                       **{"lambda": 1e-3})
    inputs = {"model": model, "data": world["digits"], "backbone": world["backbone"], "tocom": world["tocom"]}
    manifest = run_stage(world["store"], world["tmp"], "prune", "digits-fact-resrep", cfg, inputs,
                         world["tracker"])
    out, metrics = manifest.outputs, manifest.metrics
    assert out["widths"] == [{"mlp_hidden": 128, "num_heads": 2}] * 4 and out["merged"] is True
    assert (out["r_src"], out["r_tgt"]) == (0, 4)
    assert out["tocom"]["delta"] == [0, 4] and out["tocom"]["scale"] in cfg.tocom_scales
    before, after = out["before"], out["after"]
    assert after["params"] < 0.75 * before["params"] and after["flops"] < 0.6 * before["flops"]
    assert metrics["params_ratio"] == after["params"] / before["params"]
    assert before["test_accuracy"] == pytest.approx(model.metrics["test_accuracy"])  # merge kept the model
    assert before["test_accuracy"] > 0.5, metrics  # the LP-FT task model is a real one
    assert metrics["convert_max_rel_diff"] < 1e-5, metrics  # exact conversion: the trained model is the pruned one
    # keep 0.5 of a 4-block model trained 30 steps: the converted model's features are new ones, and the head
    # refitted to them (after ToMe + ToCom for the deployed model) brings it back from chance
    assert metrics["test_accuracy_after"] > 0.5 and metrics["test_accuracy_after"] > metrics["pruned_test_accuracy"]
    print({k: v for k, v in metrics.items() if "accuracy" in k})
    # the recovery fine-tune is kept only when it beats the converted model on val; else the model is unchanged
    if not out["recovered"]:
        assert metrics["recovered_test_accuracy"] == metrics["pruned_test_accuracy"]
    for side in (before, after):
        assert side["latency_ms_b1"] > 0 and side["throughput_b64"] > 0

    deploy = load(exported(world, manifest, tmp_path))
    assert deploy._tome_info.r == 4
    assert accuracy(deploy, shards_uri(world, "digits"), "test", 32) == metrics["test_accuracy_after"]
    config = json.loads((tmp_path / "model.json").read_text())
    assert config["keep_ratio"] == 0.5 and config["preprocess"]["img_size"] == 32 and "peft" not in config
    assert [len(block["heads"]) for block in config["structure"]] == [2] * 4

    client = MlflowClient(world["tracker"].uri)
    version = client.get_model_version(out["registered"]["name"], out["registered"]["version"])
    assert out["registered"]["name"] == "vitpipe-digits-fact_tt-resrep"
    assert version.run_id == manifest.mlflow_run_id
    assert float(version.tags["test_accuracy_after"]) == pytest.approx(metrics["test_accuracy_after"], rel=1e-5)
    logged = {f.path for f in client.list_artifacts(manifest.mlflow_run_id, "model")}
    assert {"model/MLmodel", "model/artifacts", "model/code"} <= logged
    run = client.get_run(manifest.mlflow_run_id)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])  # the UI's "Logged models"
    ours = [m for m in models if m.source_run_id == manifest.mlflow_run_id]
    assert len(ours) == 1 and str(ours[0].status) in ("READY", "LoggedModelStatus.READY")
    assert version.source == ours[0].artifact_location  # the version is the logged model
    assert_served_as_pyfunc(world, out["registered"], metrics["test_accuracy_after"])
    assert_served_over_http(world, out["registered"], deploy)


def assert_served_over_http(world: dict, registered: dict[str, str], deploy: torch.nn.Module) -> None:
    """`mlflow models serve` on loopback answers /invocations as models.deploy.load's model does, bit for bit:
    the same classes and probabilities (ToMe's matching is discrete, so serving must compute exactly what the
    stage measured: the same normalisation and memory layout)."""
    import subprocess
    import sys
    import urllib.request

    from vitpipe.tasks.classification import cached_split, normalize

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": world["tracker"].uri, "MLFLOW_REGISTRY_URI": world["tracker"].uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # the venv's uvicorn
    uri = f"models:/{registered['name']}/{registered['version']}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/ping", server, server.stderr.read)
        images, _ = cached_split(shards_uri(world, "digits"), "test", 32)
        images = images[:64]
        body = json.dumps({"inputs": images.permute(0, 2, 3, 1).tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    classes = world["digits"].outputs["classes"]
    with torch.no_grad():
        probs = deploy(normalize(images)).softmax(-1)
    assert [row["label"] for row in answer] == [classes[i] for i in probs.argmax(-1)]
    assert [row["probability"] for row in answer] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-6)


def assert_served_as_pyfunc(world: dict, registered: dict[str, str], test_accuracy: float) -> None:
    """A user's way in: the registered version loads with mlflow.pyfunc and classifies the task's test split as the
    stage measured (uint8 RGB images in, class names out)."""
    import mlflow.pyfunc

    from vitpipe.tasks.classification import cached_split

    uri = f"models:/{registered['name']}/{registered['version']}"
    mlflow.set_tracking_uri(world["tracker"].uri)  # models:/ resolves through both; MLflow's defaults would
    mlflow.set_registry_uri(world["tracker"].uri)  # create ./mlflow.db in the working directory
    try:
        served = mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(None)
    assert served.metadata.signature is not None and served.metadata.saved_input_example_info is not None
    images, labels = cached_split(shards_uri(world, "digits"), "test", 32)
    answer = served.predict(images.permute(0, 2, 3, 1).numpy())
    classes = world["digits"].outputs["classes"]
    predicted = torch.tensor([classes.index(c) for c in answer["label"]])
    assert (predicted == labels).float().mean().item() == pytest.approx(test_accuracy, abs=1e-6)
    assert list(answer.columns) == ["label", "probability", *(f"p_{c}" for c in classes)]


def test_csgd_keeps_an_unmergeable_adapter_and_merges_tokens_beside_it(world: dict, tmp_path: Path) -> None:
    ft = finetune_config("bi_adapter", dim=8)
    model = finetuned(world, ft, "digits-biadapter")
    cfg = prune_config(ft, "csgd", keep_ratio=0.75, head_keep_ratio=0.5, r_tgt=4, recover=None)
    inputs = {"model": model, "data": world["digits"], "backbone": world["backbone"]}
    manifest = run_stage(world["store"], world["tmp"], "prune", "digits-bi-csgd", cfg, inputs)
    out = manifest.outputs
    assert out["widths"] == [{"mlp_hidden": 192, "num_heads": 2}] * 4
    assert out["merged"] is False and out["recovered"] is False and out["r_tgt"] == 4
    assert out["tocom"] is None and out["registered"] is None
    deploy = load(exported(world, manifest, tmp_path))
    assert json.loads((tmp_path / "model.json").read_text())["peft"]["name"] == "bi_adapter"
    assert accuracy(deploy, shards_uri(world, "digits"), "test", 32) == manifest.metrics["test_accuracy_after"]


def test_resrep_global_selection_exports_blocks_of_different_widths(world: dict, tmp_path: Path) -> None:
    ft = finetune_config("lora", r=4)
    model = finetuned(world, ft, "digits-lora")
    cfg = prune_config(ft, "resrep", keep_ratio=0.5, selection="global", recover=None)
    inputs = {"model": model, "data": world["digits"], "backbone": world["backbone"]}
    manifest = run_stage(world["store"], world["tmp"], "prune", "digits-lora-global", cfg, inputs)
    widths = manifest.outputs["widths"]
    assert sum(w["mlp_hidden"] for w in widths) == 4 * 128 and sum(w["num_heads"] for w in widths) == 4 * 2
    assert manifest.metrics["convert_max_rel_diff"] < 1e-5, manifest.metrics  # exact, whatever the widths
    deploy = load(exported(world, manifest, tmp_path))
    assert accuracy(deploy, shards_uri(world, "digits"), "test", 32) == manifest.metrics["test_accuracy_after"]


def test_pipeline_config_wires_prune_nodes_and_rejects_keep_ratio_zero() -> None:
    cfg = load_config(DEMO)
    nodes = {n.name: n for n in build_dag(cfg)}
    pruned = sorted(n for n in nodes if n.startswith("prune/"))
    methods = cfg.stages.prune.peft_methods
    assert pruned == [f"prune/{t}/{m}" for t in ("digits", "faces", "textures") for m in methods]
    task, method = pruned[0].split("/")[1:]
    assert nodes[pruned[0]].deps == {"model": f"finetune/{task}/{method}", "data": f"data/{task}",
                                     "backbone": "pretrain", "tocom": "distill"}
    assert nodes[pruned[0]].cfg.model == nodes[f"finetune/{task}/{method}"].cfg
    with pytest.raises(ConfigError, match=r"stages\.prune\.keep_ratio: Input should be greater than 0"):
        load_config(DEMO, ("stages.prune.keep_ratio=0",))
    with pytest.raises(ConfigError, match=r"stages\.prune\.pruner: Input should be 'resrep' or 'csgd'"):
        load_config(DEMO, ("stages.prune.pruner=obd",))
    with pytest.raises(ConfigError, match=r"stages\.prune: selection: global is ResRep's global selection; csgd"):
        load_config(DEMO, ("stages.prune.pruner=csgd", "stages.prune.selection=global"))


def test_flags_name_models_a_user_would_not_keep() -> None:
    before = {"test_accuracy": 0.9, "latency_ms_b1": 2.0, "throughput_b64": 1000.0}
    fine = {"test_accuracy": 0.9, "latency_ms_b1": 1.0, "throughput_b64": 2000.0}
    assert prune.flags(before, fine, num_classes=10, n_test=360) == {}
    # 10 classes, 360 test images: chance 0.1, two standard errors 0.032
    guessing = prune.flags(before, {**fine, "test_accuracy": 0.109}, num_classes=10, n_test=360)
    assert list(guessing) == ["chance"]
    assert "0.109 is at chance (0.100 + 2 s.e. on 360 images = 0.132)" in guessing["chance"]
    assert prune.flags(before, {**fine, "test_accuracy": 0.2}, num_classes=10, n_test=360) == {}
    slower = prune.flags(before, {**fine, "latency_ms_b1": 2.5, "throughput_b64": 900.0}, 10, 360)
    assert list(slower) == ["slower"] and "latency b1 x1.25, throughput b64 x0.90" in slower["slower"]
    assert list(prune.flags(before, {**fine, "latency_ms_b1": 2.5}, 10, 360)) == ["slower_b1"]  # a word, kept
    assert set(prune.UNFIT) == {"chance", "slower"}


def test_the_summary_says_which_models_were_flagged_and_withheld() -> None:
    from types import SimpleNamespace

    from vitpipe.tasks.prune.spec import PruneOutputs, summary
    from vitpipe.tasks.spec import Committed

    side = {"test_accuracy": 0.1, "params": 1e6, "flops": 1e9, "latency_ms_b1": 1.0, "throughput_b64": 100.0}
    outputs = PruneOutputs(task="digits", method="lora", pruner="resrep", keep_ratio=0.5, merged=True,
                           reprobed=True, recovered=False, reprobed_deployed=False, r_src=0, r_tgt=4, tocom=None,
                           widths=(), before=side, after=side, torch_threads=1, registered=None,
                           flags={"chance": "test accuracy 0.100 is at chance", "slower_b1": "slower at batch 1"})
    section = summary([Committed(SimpleNamespace(name="prune/digits/lora"), outputs, {})], SimpleNamespace())
    lines = [ln for ln in section.text.splitlines() if ln.startswith("flagged")]
    assert lines == ["flagged  digits/lora/resrep: test accuracy 0.100 is at chance; not registered "
                     "(stages.prune.register_flagged: true registers it)",
                     "flagged  digits/lora/resrep: slower at batch 1"]
