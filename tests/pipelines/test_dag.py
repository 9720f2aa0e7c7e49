"""DAG building and content-addressed keys (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitpipe.pipelines.dag import build_dag, critical_path, stage_keys
from vitpipe.pipelines.spec import ConfigError, load_config
from vitpipe.tasks.stages import STAGES

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "demo.yaml"


def keys(*overrides: str) -> dict[str, str]:
    cfg = load_config(DEMO, overrides)
    return stage_keys(build_dag(cfg), cfg.seed, "test-version")


def test_demo_dag_wires_pretrain_distill_finetune_and_evaluate() -> None:
    nodes = {n.name: n for n in build_dag(load_config(DEMO))}
    assert nodes["pretrain"].deps == {"corpus": "data/corpus", "probe:digits": "data/digits",
                                      "probe:faces": "data/faces", "probe:textures": "data/textures"}
    assert nodes["distill"].deps == {"corpus": "data/corpus", "backbone": "pretrain"}
    assert nodes["finetune/faces/lora"].deps == {"data": "data/faces", "backbone": "pretrain"}
    assert nodes["evaluate/faces/lora"].deps == {"model": "finetune/faces/lora", "data": "data/faces",
                                                  "tocom": "distill", "backbone": "pretrain"}
    finetunes = [n for n in nodes if n.startswith("finetune/")]
    assert len(finetunes) == 12 and len([n for n in nodes if n.startswith("evaluate/")]) == 12
    order = list(nodes)
    for node in nodes.values():  # topological: every input comes earlier
        assert all(order.index(dep) < order.index(node.name) for dep in node.deps.values())


def test_ready_nodes_launch_longest_remaining_path_first() -> None:
    nodes = build_dag(load_config(DEMO))
    path = critical_path(nodes)
    work = {n.name: n.work for n in nodes}
    assert work["prune/faces/fact_tt"] == 60 + 30 and work["evaluate/faces/lora"] == 1  # train + recover steps
    assert path["data/corpus"] > path["pretrain"] > path["distill"] == path["finetune/faces/fact_tt"]
    # a fine-tune that pruning follows, before one that only evaluation follows; pruning before evaluation
    assert path["finetune/faces/fact_tt"] > path["finetune/faces/lora"] > path["prune/faces/fact_tt"]
    assert path["prune/faces/fact_tt"] > path["evaluate/faces/fact_tt"] == 1


def test_keys_are_stable_and_change_only_downstream_of_an_edit() -> None:
    base = keys()
    assert base == keys()
    edited = keys("stages.finetune.methods.1.lr=0.01")  # lora's learning rate
    changed = {n for n in base if base[n] != edited[n]}
    assert changed == {f"{kind}/{task}/lora" for kind in ("finetune", "evaluate")
                       for task in ("digits", "faces", "textures")}


def test_resources_do_not_change_keys_but_seed_and_code_do() -> None:
    base = keys()
    assert keys("stages.finetune.resources.cpus_per_worker=2", "stages.pretrain.resources.num_workers=2") == base
    cfg = load_config(DEMO)
    assert stage_keys(build_dag(cfg), cfg.seed + 1, "test-version")["data/digits"] != base["data/digits"]
    assert stage_keys(build_dag(cfg), cfg.seed, "other-version")["data/digits"] != base["data/digits"]


def test_no_evaluate_node_for_methods_that_token_merging_cannot_patch(tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO.read_text())
    data["stages"]["finetune"]["methods"] = ["linear", "convpass", "vpt"]
    del data["stages"]["prune"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "p.yaml")
    names = {n.name for n in build_dag(cfg)}
    assert {"finetune/digits/convpass", "finetune/digits/vpt", "evaluate/digits/linear"} <= names
    assert not {"evaluate/digits/convpass", "evaluate/digits/vpt"} & names


def _vtab_sources(tmp_path: Path) -> tuple[str, ...]:
    """--set overrides pointing every vtab1k.yaml task at an (empty) folder here: planning only lists them."""
    cfg = yaml.safe_load((DEMO.parent / "vtab1k.yaml").read_text())
    for task in cfg["tasks"]:
        (tmp_path / task).mkdir()
    sources = tuple(f"tasks.{task}.source=vtab1k:{tmp_path / task}" for task in cfg["tasks"])
    return (*sources, "backbone.weights=null")  # timm's hub is not reachable here


def _imagefolder(root: Path, classes: tuple[str, ...] = ("cats", "dogs")) -> Path:
    for cls in classes:
        (root / cls).mkdir(parents=True)
        (root / cls / "a.png").write_bytes(b"not decoded when planning")
    return root


@pytest.mark.parametrize("name", ["demo.yaml", "vtab1k.yaml", "imagefolder"])
def test_yaml_round_trips_spec_to_dag_to_node_config(name: str, tmp_path: Path) -> None:
    """What the YAML says reaches each node's config, and a node config survives the trip to its Ray task."""
    if name == "imagefolder":
        folder = _imagefolder(tmp_path / "pets")
        cfg = load_config(DEMO, (f"tasks.pets.source=imagefolder:{folder}",))
    else:
        cfg = load_config(DEMO.parent / name, _vtab_sources(tmp_path) if name == "vtab1k.yaml" else ())
    nodes = build_dag(cfg)
    for node in nodes:
        dumped = node.cfg.model_dump(mode="json", by_alias=True)
        assert STAGES[node.kind].node.model_validate(dumped) == node.cfg, node.name
    by_name = {n.name: n.cfg for n in nodes}
    for task in cfg.tasks:
        assert by_name[f"data/{task}"].source == cfg.tasks[task].source
        for method in cfg.stages.finetune.methods:
            node = by_name[f"finetune/{task}/{method.name}"]
            assert (node.task, node.method, node.backbone) == (task, method, cfg.backbone)
            assert node.train == cfg.stages.finetune.train and node.r_src == cfg.stages.finetune.r_src
    if name == "imagefolder":
        assert by_name["data/pets"].digest is not None and by_name["data/digits"].digest is None
    if cfg.stages.distill is not None:
        assert by_name["distill"].train == cfg.stages.distill.train and by_name["distill"].backbone == cfg.backbone
    if cfg.stages.prune is not None:
        prune = next(n for n in nodes if n.kind == "prune").cfg
        assert prune.r_tgt == cfg.stages.prune.r_tgt and prune.train == cfg.stages.prune.train


def test_partial_train_blocks_keep_each_stage_paper_defaults() -> None:
    cfg = load_config(DEMO, ("stages.distill.train={steps: 7}", "stages.pretrain.train={steps: 5}",
                             "stages.prune.train={steps: 3}"))
    nodes = {n.name: n.cfg for n in build_dag(cfg)}
    distill = nodes["distill"].train
    assert (distill.steps, distill.lr, distill.weight_decay) == (7, 2e-3, 0.05)
    assert (nodes["pretrain"].train.lr, nodes["pretrain"].train.betas) == (1.5e-4, (0.9, 0.95))
    assert (nodes["prune/digits/fact_tt"].train.lr, nodes["prune/digits/fact_tt"].train.warmup_steps) == (1e-3, 5)


def test_user_folder_edits_change_the_data_key(tmp_path: Path) -> None:
    folder = _imagefolder(tmp_path / "pets")
    override = (f"tasks.pets.source=imagefolder:{folder}",)
    before = keys(*override)
    (folder / "dogs" / "b.png").write_bytes(b"another image")
    after = keys(*override)
    assert before["data/pets"] != after["data/pets"] and before["finetune/pets/lora"] != after["finetune/pets/lora"]
    assert before["data/digits"] == after["data/digits"]


@pytest.mark.parametrize(("override", "message"), [
    ("stages.evaluate.r_targets=[-1]", r"stages\.evaluate\.r_targets\[0\]: Input should be greater than or equal"),
    ("tasks.pets.source=imagefolder:/no/such/folder", r"tasks\.pets\.source: .* is not a directory"),
    ("tasks.pets.source=imagefolder:{one_class}", r"tasks\.pets\.source: .*needs at least two class folders"),
])
def test_bad_values_fail_when_the_pipeline_is_planned(override: str, message: str, tmp_path: Path) -> None:
    one_class = _imagefolder(tmp_path / "one", ("cats",))
    with pytest.raises(ConfigError, match=message):
        build_dag(load_config(DEMO, (override.format(one_class=one_class),)))


def test_backbone_weights_sha256_goes_into_every_downstream_key(tmp_path: Path) -> None:
    import hashlib

    import torch
    from safetensors.torch import save_file

    from vitpipe.models.settings import ViTSpec

    path = tmp_path / "encoder.safetensors"
    torch.manual_seed(1)
    save_file(ViTSpec().build().state_dict(), str(path))
    cfg = load_config(DEMO, (f"backbone.weights={path}",))
    nodes = build_dag(cfg)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert {n.cfg.backbone.weights_sha256 for n in nodes if hasattr(n.cfg, "backbone")} == {sha}
    before = keys(f"backbone.weights={path}")
    torch.manual_seed(2)
    save_file(ViTSpec().build().state_dict(), str(path))
    after = keys(f"backbone.weights={path}")
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {name for name in before if not name.startswith("data/")}
    with pytest.raises(ConfigError, match=r"backbone\.weights_sha256: .* not the pinned 0000"):
        build_dag(load_config(DEMO, (f"backbone.weights={path}", "backbone.weights_sha256='0000'")))
    with pytest.raises(ConfigError, match=r"^backbone\.weights: "):
        build_dag(load_config(DEMO, (f"backbone.weights={tmp_path / 'missing.safetensors'}",)))
