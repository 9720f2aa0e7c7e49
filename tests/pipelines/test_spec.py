"""Pipeline YAML validation: shipped configs validate; bad input names the path."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitpipe.pipelines.spec import ConfigError, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


def _base() -> dict:
    return {"tasks": {"faces": {"source": "faces"}},
            "stages": {"finetune": {"methods": ["linear", "full"], "train": {"steps": 5}}}}


@pytest.mark.parametrize("name", ["demo.yaml", "vtab1k.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.tasks and cfg.stages.finetune.methods


def test_vtab1k_lists_the_19_tasks_in_three_groups() -> None:
    cfg = load_config(CONFIGS / "vtab1k.yaml")
    assert len(cfg.tasks) == 19
    groups = [t.group for t in cfg.tasks.values()]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    assert cfg.backbone.arch == "vit_base_patch16_224" and cfg.backbone.img_size == 224


def test_config_is_frozen() -> None:
    cfg = parse_config(_base())
    with pytest.raises(Exception, match="frozen"):
        cfg.stages.finetune.train.steps = 3  # type: ignore[misc]


def test_unknown_key_names_its_path() -> None:
    data = _base()
    data["stages"]["finetune"]["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match=r"^x.yaml: stages\.finetune\.train\.stepz: Extra inputs"):
        parse_config(data, "x.yaml")


def test_unknown_method_names_its_index() -> None:
    data = _base()
    data["stages"]["finetune"]["methods"].append("lora2")
    with pytest.raises(ConfigError, match=r"stages\.finetune\.methods\[2\]: unknown fine-tuning method 'lora2'"):
        parse_config(data)


def test_bad_value_and_unknown_source() -> None:
    data = _base()
    data["stages"]["finetune"]["train"]["steps"] = -1
    with pytest.raises(ConfigError, match=r"stages\.finetune\.train\.steps: Input should be greater than 0"):
        parse_config(data)
    data = _base()
    data["tasks"]["faces"]["source"] = "nope"
    with pytest.raises(ConfigError, match=r"tasks\.faces\.source: unknown data source 'nope'"):
        parse_config(data)


def test_set_overrides_parse_values_and_reject_bad_paths() -> None:
    data = _base()
    data["stages"]["finetune"]["methods"] = ["linear", {"name": "full"}]
    cfg = parse_config(data, overrides=("stages.finetune.train.steps=7", "stages.finetune.methods.1.lr=0.5",
                                        "ray.num_cpus=2"))
    assert cfg.stages.finetune.train.steps == 7
    assert cfg.stages.finetune.methods[1].lr == 0.5 and cfg.ray.num_cpus == 2
    with pytest.raises(ConfigError, match="--set stages.finetune.methods.9.lr"):
        parse_config(_base(), overrides=("stages.finetune.methods.9.lr=1",))
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        parse_config(_base(), overrides=("steps",))


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntasks: {faces: {source: faces}\nstages: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: invalid YAML"):
        load_config(path)
