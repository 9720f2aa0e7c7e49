"""Pipeline YAML -> frozen, validated pydantic config. Errors name the offending path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.retry import RetryPolicy
from cluster.submit import SubmitConfig
from cluster.train import Resources, TrainConfig
from models.pretrain_objectives import PretrainObjectiveConfig
from models.vit import ViTSpec
from tasks.data import DataError, resolve_source
from tasks.distill import DistillConfig
from tasks.finetune import FinetuneMethod
from tasks.pretrain import PretrainConfig
from tasks.prune import PruneConfig, PrunerName, PruneTrain


class ConfigError(Exception):
    """A pipeline configuration problem; the message names the file and the config path."""


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatasetSpec(Frozen):
    """Where a dataset comes from: a bundled source name, `imagefolder:PATH` or `vtab1k:PATH`."""

    source: str
    group: str | None = None

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        try:
            resolve_source(source)
        except DataError as err:
            raise ValueError(str(err)) from None
        return source


class FinetuneStage(Frozen):
    methods: tuple[FinetuneMethod, ...] = (FinetuneMethod(name="linear"),)
    train: TrainConfig = TrainConfig()
    resources: Resources = Resources()
    tome_r: int = Field(0, ge=0, description="ToMe degree the task models train at (r_src)")

    @field_validator("methods", mode="before")
    @classmethod
    def _names_to_specs(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [{"name": m} if isinstance(m, str) else m for m in value]
        return value


class PretrainStage(Frozen):
    objective: PretrainObjectiveConfig = PretrainObjectiveConfig()
    train: TrainConfig = PretrainConfig.model_fields["train"].default
    resources: Resources = Resources()
    probe: bool = Field(True, description="linear-probe every downstream task at the end of pretraining")


class DistillStage(Frozen):
    """ToCom self-distillation on the corpus; the fields of tasks.distill.DistillConfig minus the backbone."""

    max_r: int = Field(16, ge=1)
    rho: int = Field(2, ge=1)
    tau: float = Field(1.0, gt=0)
    scale: float = Field(0.1, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    train: TrainConfig = DistillConfig.model_fields["train"].default
    resources: Resources = Resources()
    heldout: int = Field(256, gt=0)


class EvaluateStage(Frozen):
    """Per fine-tuned model: test accuracy at each deployment ToMe degree, with and without ToCom."""

    r_targets: tuple[int, ...] = (0, 2, 4, 8)
    scales: tuple[float, ...] = (0.05, 0.08, 0.1, 0.12, 0.15)


class PruneStage(Frozen):
    """Per fine-tuned model: structured pruning, then ToMe at tome_r with ToCom merged, export, registry."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)

    method: PrunerName = "resrep"
    keep_ratio: float = 0.5
    head_keep_ratio: float | None = None
    lam: float = Field(1e-4, gt=0, alias="lambda")
    centripetal: float = Field(3e-3, ge=0)
    tome_r: int = Field(0, ge=0, description="ToMe degree of the deployed model")
    tocom_scales: tuple[float, ...] = PruneConfig.model_fields["tocom_scales"].default
    finetune_methods: tuple[str, ...] | None = Field(None, description="fine-tuned models to prune; None: all")
    train: PruneTrain = PruneConfig.model_fields["train"].default
    resources: Resources = Resources()
    latency_repeats: int = Field(20, gt=0)

    @field_validator("keep_ratio", "head_keep_ratio")
    @classmethod
    def _ratio(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"keep ratio must satisfy 0 < k <= 1 (the fraction of units kept), got {value}")
        return value



class Stages(Frozen):
    pretrain: PretrainStage | None = None
    distill: DistillStage | None = None
    finetune: FinetuneStage = FinetuneStage()
    evaluate: EvaluateStage | None = None
    prune: PruneStage | None = None


class RayConfig(Frozen):
    address: str | None = None
    num_cpus: int | None = Field(None, gt=0)
    num_gpus: int | None = Field(None, ge=0)
    gpu_fallback: bool = Field(True, description="on a cluster without GPUs, run GPU stages on CPU (one "
                               "warning); false for autoscaling clusters whose GPU nodes start on demand")


class PipelineConfig(Frozen):
    name: str = "vitpipe"
    seed: int = 0
    work_dir: str = "vitpipe-work"
    store: str | None = None
    tracking_uri: str | None = None
    experiment: str = "vitpipe"
    ray: RayConfig = RayConfig()
    retry: RetryPolicy = RetryPolicy()
    submit: SubmitConfig = SubmitConfig()
    backbone: ViTSpec = ViTSpec()
    corpus: DatasetSpec | None = None
    tasks: dict[str, DatasetSpec]
    stages: Stages = Stages()

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if not self.tasks:
            raise ValueError("a pipeline needs at least one downstream task")
        if (self.stages.pretrain or self.stages.distill) and self.corpus is None:
            raise ValueError("stages.pretrain and stages.distill need a `corpus:` dataset")
        if self.stages.evaluate is not None and self.stages.distill is None:
            raise ValueError("stages.evaluate compares with and without ToCom: it needs stages.distill")
        if self.stages.prune is not None and self.stages.prune.finetune_methods is not None:
            known = [m.name for m in self.stages.finetune.methods]
            for i, name in enumerate(self.stages.prune.finetune_methods):
                if name not in known:
                    raise ValueError(f"stages.prune.finetune_methods[{i}]: {name!r} is not a stages.finetune method "
                                     f"({', '.join(known)})")
        return self

    @property
    def store_uri(self) -> str:
        return self.store or str(Path(self.work_dir) / "artifacts")

    @property
    def tracking(self) -> str:
        return self.tracking_uri or f"sqlite:///{Path(self.work_dir).resolve() / 'mlflow.db'}"


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    """`a.b.0.c=value`: the value is parsed as YAML, so numbers, lists and booleans work."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    node: Any = data
    parts = path.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:i])
                raise ConfigError(f"--set {path}: {part!r} is not an index of the list at {where}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {path}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[part] = yaml.safe_load(raw)
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def parse_config(data: Any, source: str = "<config>", overrides: tuple[str, ...] = ()) -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    for assignment in overrides:
        _apply_override(data, assignment)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = _format_loc(first["loc"]) or "<top level>"
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"{source}: {where}: {msg}{more}") from None


def load_config(path: str | Path, overrides: tuple[str, ...] = ()) -> PipelineConfig:
    """Read a pipeline YAML (safe-loaded), apply `--set` overrides, validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    return parse_config(data, str(path), overrides)
