"""Pipeline config -> DAG of stage nodes, each with a content-addressed key.

key = sha256(canonical JSON of: stage kind, stage config, upstream keys, seed, code version).
So an unchanged pipeline maps to the same keys (everything cached), and a changed task config
changes only the keys of that task's branch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cluster.tracking import git_commit
from cluster.train import Resources
from cluster.weights import weights_digest
from models.peft import PEFT_METHODS
from models.vit import ViTSpec
from models.weights import WeightsError
from pipelines.spec import ConfigError, PipelineConfig
from tasks.data import DataError
from tasks.distill import DistillNode
from tasks.evaluate import EvaluateNode
from tasks.finetune import FinetuneNode
from tasks.prepare import DataNode, DatasetSpec
from tasks.pretrain import PretrainNode
from tasks.prune import PruneNode

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Node:
    """One stage invocation. `cfg` is the stage's validated node model; `deps` maps an input role ("data",
    "backbone") to an upstream node."""

    name: str
    kind: str
    cfg: BaseModel
    deps: dict[str, str] = field(default_factory=dict)
    cpus: float = 0.0  # the node's own Ray task, besides the training workers it asks for

    @property
    def resources(self) -> Resources | None:
        """The training workers the node asks for (None: it trains nothing)."""
        return getattr(self.cfg, "resources", None)

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


# Packages whose versions shape the numbers a stage computes: a cache hit must not reuse their other versions' output.
NUMERIC_PACKAGES = ("torch", "timm", "deepspeed", "numpy")


def code_version() -> str:
    """The package version, the git commit, and the versions of the packages that shape numerics."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "none"

    pkg = installed("vitpipe").replace("none", "dev")
    deps = ",".join(f"{name}={installed(name)}" for name in NUMERIC_PACKAGES)
    return f"{pkg}+{git_commit(PACKAGE_ROOT) or 'nogit'};{deps}"


def _data_node(name: str, spec: DatasetSpec, where: str) -> Node:
    try:
        return Node(f"data/{name}", "data", DataNode.of(spec), cpus=1.0)
    except DataError as err:
        raise ConfigError(f"{where}.source: {err}") from None


def planned_backbone(spec: ViTSpec) -> ViTSpec:
    """The backbone with its weights' sha256 filled in (it goes into every downstream key); a pinned sha256
    that the file no longer has, or weights that cannot be read, fail here with the config path."""
    if spec.weights is None:
        return spec
    try:
        sha = weights_digest(spec.weights)
    except WeightsError as err:
        raise ConfigError(f"backbone.weights: {str(err).splitlines()[0]}") from None
    if spec.weights_sha256 is not None and spec.weights_sha256 != sha:
        raise ConfigError(f"backbone.weights_sha256: {spec.weights} has sha256 {sha}, not the pinned "
                          f"{spec.weights_sha256}")
    return spec.model_copy(update={"weights_sha256": sha})


def build_dag(cfg: PipelineConfig) -> list[Node]:
    """Nodes in topological order: data per task (and corpus), pretrain, distill, then per (task, method):
    finetune, evaluate, prune. Every node's config is validated here, when the pipeline is planned."""
    stages = cfg.stages
    cfg = cfg.model_copy(update={"backbone": planned_backbone(cfg.backbone)})
    nodes = [_data_node(task, spec, f"tasks.{task}") for task, spec in cfg.tasks.items()]
    if stages.pretrain is not None or stages.distill is not None:
        nodes.append(_data_node("corpus", cfg.corpus, "corpus"))
    backbone: dict[str, str] = {}
    if stages.pretrain is not None:
        probes = tuple(cfg.tasks) if stages.pretrain.probe else ()
        node = PretrainNode(**dict(stages.pretrain), backbone=cfg.backbone, probe_tasks=probes)
        deps = {"corpus": "data/corpus", **{f"probe:{t}": f"data/{t}" for t in probes}}
        nodes.append(Node("pretrain", "pretrain", node, deps=deps))
        backbone = {"backbone": "pretrain"}
    if stages.distill is not None:
        node = DistillNode(**dict(stages.distill), backbone=cfg.backbone)
        nodes.append(Node("distill", "distill", node, deps={"corpus": "data/corpus", **backbone}))
    tocom = {"tocom": "distill"} if stages.distill is not None else {}
    for task in cfg.tasks:
        for method in stages.finetune.methods:
            model = FinetuneNode.of(stages.finetune, task, method, cfg.backbone)
            name = f"finetune/{task}/{method.name}"
            nodes.append(Node(name, "finetune", model, deps={"data": f"data/{task}", **backbone}))
            inputs = {"model": name, "data": f"data/{task}", **tocom, **backbone}
            # evaluate deploys at other ToMe degrees: only for methods whose blocks ToMe can patch
            if stages.evaluate is not None and PEFT_METHODS[method.name].token_merging:
                node = EvaluateNode(**dict(stages.evaluate), model=model)
                nodes.append(Node(f"evaluate/{task}/{method.name}", "evaluate", node, deps=inputs, cpus=1.0))
            prune = stages.prune
            if prune is not None and (prune.peft_methods is None or method.name in prune.peft_methods):
                nodes.append(Node(f"prune/{task}/{method.name}", "prune", PruneNode.of(prune, model), deps=inputs))
    return nodes


def _without_resources(cfg: Any) -> Any:
    """Resources change where a stage runs, not what it computes (data parallelism is exact)."""
    if isinstance(cfg, dict):
        return {k: _without_resources(v) for k, v in cfg.items() if k != "resources"}
    return cfg


def stage_keys(nodes: list[Node], seed: int, version: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for node in nodes:
        payload = {
            "kind": node.kind,
            "cfg": _without_resources(node.cfg.model_dump(mode="json", by_alias=True)),
            "upstream": {role: keys[dep] for role, dep in sorted(node.deps.items())},
            "seed": seed,
            "code": version,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        keys[node.name] = hashlib.sha256(blob).hexdigest()
    return keys
