"""What a stage declares, torch-free: its config section, node model, typed outputs, nodes and summary section.

A stage is a package `tasks/<stage>/`: `spec.py` holds its `StageSpec` (this module's types), importable
without torch so that `vitpipe plan` validates a pipeline in about a second; `stage.py` holds
`run(ctx, cfg, inputs) -> StageResult`, imported only where a node runs. Generic code (the pipeline spec, the
DAG, the runner, the report) iterates `tasks.stages.STAGES` and knows no stage by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from vitpipe.cluster.config import Resources, TrainConfig
from vitpipe.tasks.config import Frozen


class PlanError(ValueError):
    """A pipeline whose stages cannot be wired as configured; the message starts with the config path."""


@dataclass(frozen=True)
class Node:
    """One stage invocation. `cfg` is the stage's validated node model; `deps` maps an input role ("data",
    "backbone") to an upstream node's name."""

    name: str
    kind: str
    cfg: BaseModel
    deps: dict[str, str] = field(default_factory=dict)
    cpus: float = 0.0  # the node's own Ray task, besides the training workers it asks for

    @property
    def resources(self) -> Resources | None:
        """The training workers the node asks for (None: it trains nothing)."""
        return getattr(self.cfg, "resources", None)

    @property
    def work(self) -> int:
        """A rough size of the node for scheduling: the optimizer steps of all its training phases, at least 1."""
        return max(1, sum(value.steps for _, value in self.cfg if isinstance(value, TrainConfig)))

    def demand(self) -> dict[str, float]:
        """Cluster resources the node occupies while it runs (its task plus its training workers)."""
        res = self.resources
        if res is None:
            return {"CPU": self.cpus}
        n = res.num_workers
        return {"CPU": self.cpus + n * res.cpus_per_worker, "GPU": n * res.gpus_per_worker}

    def task_options(self) -> dict[str, float]:
        """Ray resources of the node's own task: itself, plus its one worker when it trains in that process."""
        res = self.resources
        if res is None or not res.in_process:
            return {"num_cpus": self.cpus}
        options = {"num_cpus": self.cpus + res.cpus_per_worker, "num_gpus": res.gpus_per_worker}
        return options | ({"memory": res.memory_gb * 2**30} if res.memory_gb else {})

    def with_resources(self, resources: Resources) -> Node:
        return replace(self, cfg=self.cfg.model_copy(update={"resources": resources}))


class Pipeline(Protocol):
    """What a stage's declaration reads of the pipeline config (pipelines.spec.PipelineConfig)."""

    tasks: dict[str, Any]
    corpus: Any
    backbone: Any
    stages: Any


class Plan:
    """A pipeline's DAG while its stages declare their nodes, in the registry's (topological) order."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.nodes: dict[str, Node] = {}

    def add(self, node: Node) -> Node:
        missing = [dep for dep in node.deps.values() if dep not in self.nodes]
        if missing:
            raise PlanError(f"{node.name}: its inputs {missing} are not declared before it")
        self.nodes.setdefault(node.name, node)
        return self.nodes[node.name]

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def backbone(self) -> dict[str, str]:
        """The input role of the pipeline's pretrained encoder, when a stage produces one."""
        return {"backbone": "pretrain"} if "pretrain" in self.nodes else {}


OutputsT = TypeVar("OutputsT", bound="Outputs")


class Outputs(Frozen):
    """Base of a stage's typed outputs: what its manifest's `outputs` hold, validated where they are read."""

    @classmethod
    def of(cls: type[OutputsT], manifest: Any) -> OutputsT:
        """The outputs of a committed manifest (cluster.manifest.Manifest)."""
        return cls.model_validate(manifest.outputs)


@dataclass(frozen=True)
class Committed:
    """A node that has a manifest, as a summary section reads it."""

    node: Node
    outputs: Any  # the stage's Outputs model
    metrics: dict[str, float]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns under a header and a rule: how summary sections print their tables."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


@dataclass(frozen=True)
class Section:
    """A stage's part of the end-of-run summary: text for the console, and what the parent MLflow run records."""

    text: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    tables: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # MLflow table name -> columns


@dataclass(frozen=True)
class StageSpec:
    """Everything generic code needs of a stage.

    declare(pipeline, plan): add the stage's nodes to `plan` (its inputs are declared already); called only when
    the stage is on. summary(committed, pipeline): its summary section over its committed nodes.
    """

    kind: str
    node: type[Frozen]
    outputs: type[Outputs]
    entry: str  # "module:function" of run(ctx, cfg, inputs), imported where the node runs
    declare: Callable[[Pipeline, Plan], None]
    section: type[Frozen] | None = None  # its `stages.<kind>` model; None: not configured there (data)
    on_by_default: bool = False  # the section applies with its defaults when the YAML leaves it out
    summary: Callable[[list[Committed], Pipeline], Section] | None = None
    headline: tuple[str, ...] = ()  # metrics shown when a node finishes and in the summary's node table

    def run(self) -> Callable[..., Any]:
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)
