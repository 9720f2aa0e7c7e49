"""Pipeline YAML -> frozen, validated pydantic config. Errors name the offending path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from vitpipe.cluster.retry import RetryPolicy
from vitpipe.cluster.submit import SubmitConfig
from vitpipe.models.settings import ViTSpec
from vitpipe.tasks.config import Frozen
from vitpipe.tasks.prepare.spec import DatasetSpec
from vitpipe.tasks.stages import STAGES


class ConfigError(Exception):
    """A pipeline configuration problem; the message names the file and the config path."""


def _stage_sections() -> type[Frozen]:
    """`stages:`: one field per registered stage that has a section, typed by the stage's own config model
    (defaults = the papers' values); a stage is off (None) unless the YAML names it or it is on by default."""
    fields = {kind: (spec.section, spec.section()) if spec.on_by_default else (spec.section | None, None)
              for kind, spec in STAGES.items() if spec.section is not None}
    return create_model("Stages", __base__=Frozen, **fields)


Stages = _stage_sections()


class RayConfig(Frozen):
    address: str | None = None
    num_cpus: int | None = Field(None, gt=0)
    num_gpus: int | None = Field(None, ge=0)
    gpu_fallback: bool = Field(True, description="on a cluster without GPUs, run GPU stages on CPU (one "
                               "warning); false for autoscaling clusters whose GPU nodes start on demand")


TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TRACKING_URI = re.compile(r"^(https?://|sqlite:///|databricks|(postgresql|mysql|mssql)(\+\w+)?://)")


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

    @field_validator("work_dir")
    @classmethod
    def _local_work_dir(cls, value: str) -> str:
        if "://" in value:
            raise ValueError(f"{value!r}: work_dir is a local folder (the SQLite MLflow DB and Ray Train's local "
                             "checkpoints live there); put artifacts in S3 with `store: s3://bucket/prefix`")
        return value

    @field_validator("store")
    @classmethod
    def _store_uri(cls, value: str | None) -> str | None:
        scheme = value.partition("://")[0] if value and "://" in value else None
        if scheme is not None and scheme != "s3":
            raise ValueError(f"{value!r}: a store is a local folder or s3://bucket/prefix, not {scheme}://")
        return value

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, value: str | None) -> str | None:
        if value is not None and not TRACKING_URI.match(value):
            raise ValueError(f"{value!r}: an MLflow tracking URI is http(s)://HOST[:PORT], sqlite:///PATH, "
                             "databricks or a database URL such as postgresql://...")
        return value

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: dict[str, DatasetSpec]) -> dict[str, DatasetSpec]:
        for name in tasks:  # a task name becomes part of MLflow run names, metric keys and registry names
            if not TASK_NAME.fullmatch(name):
                raise ValueError(f"task name {name!r}: use letters, digits, '_' and '-' (starting with a letter "
                                 "or digit)")
        return tasks

    @model_validator(mode="after")
    def _some_task(self) -> PipelineConfig:
        if not self.tasks:
            raise ValueError("a pipeline needs at least one downstream task")
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
