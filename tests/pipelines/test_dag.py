"""DAG building and content-addressed keys (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.dag import build_dag, stage_keys
from pipelines.spec import load_config

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
