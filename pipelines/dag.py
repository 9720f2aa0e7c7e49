"""Pipeline config -> DAG of stage nodes, each with a content-addressed key.

key = sha256(canonical JSON of: stage kind, stage config, upstream keys, seed, code version).
So an unchanged pipeline maps to the same keys (everything cached), and a changed task config
changes only the keys of that task's branch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.tracking import git_commit
from models.peft import PEFT_METHODS
from pipelines.spec import PipelineConfig
from tasks.stages import STAGES

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Node:
    """One stage invocation. `deps` maps an input role ("data", "backbone") to an upstream node."""

    name: str
    kind: str
    cfg: dict[str, Any]
    deps: dict[str, str] = field(default_factory=dict)
    cpus: float = 0.0  # the node's own Ray task; training stages reserve workers through Ray Train

    def config(self):
        return STAGES[self.kind].config.model_validate(self.cfg)

    def demand(self) -> dict[str, float]:
        """Cluster resources the node occupies while it runs (its task plus its training workers)."""
        res = self.cfg.get("resources")
        if res is None:
            return {"CPU": self.cpus}
        n = res["num_workers"]
        return {"CPU": self.cpus + n * res["cpus_per_worker"], "GPU": n * res["gpus_per_worker"]}


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("vitpipe")
    except PackageNotFoundError:
        pkg = "dev"
    return f"{pkg}+{git_commit(PACKAGE_ROOT) or 'nogit'}"


def _source_digest(source: str) -> str | None:
    """For a user folder, a cheap digest of its listing (names, sizes, mtimes), so edits change keys."""
    kind, _, path = source.partition(":")
    if kind not in ("imagefolder", "vtab1k") or path.startswith("s3://") or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            rel = os.path.relpath(os.path.join(root, name), path)
            h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _data_node(name: str, source: str) -> Node:
    data_cfg: dict[str, Any] = {"source": source}
    if (digest := _source_digest(source)) is not None:
        data_cfg["source_digest"] = digest
    return Node(f"data/{name}", "data", data_cfg, cpus=1.0)


def _pretrain_node(cfg: PipelineConfig) -> Node:
    stage = cfg.stages.pretrain
    probes = tuple(cfg.tasks) if stage.probe else ()
    stage_cfg = {"backbone": cfg.backbone.model_dump(), "objective": stage.objective.model_dump(),
                 "train": stage.train.model_dump(), "resources": stage.resources.model_dump(),
                 "probe_tasks": list(probes)}
    deps = {"corpus": "data/corpus", **{f"probe:{t}": f"data/{t}" for t in probes}}
    return Node("pretrain", "pretrain", stage_cfg, deps=deps)


def build_dag(cfg: PipelineConfig) -> list[Node]:
    """Nodes in topological order: data per task (and corpus), pretrain, distill, then per (task, method):
    finetune, evaluate, prune."""
    nodes = [_data_node(task, spec.source) for task, spec in cfg.tasks.items()]
    backbone: dict[str, str] = {}
    if cfg.stages.pretrain is not None:
        nodes += [_data_node("corpus", cfg.corpus.source), _pretrain_node(cfg)]
        backbone = {"backbone": "pretrain"}
    if cfg.stages.distill is not None:
        if cfg.stages.pretrain is None:
            nodes.append(_data_node("corpus", cfg.corpus.source))
        distill_cfg = {"backbone": cfg.backbone.model_dump(), **cfg.stages.distill.model_dump()}
        nodes.append(Node("distill", "distill", distill_cfg, deps={"corpus": "data/corpus", **backbone}))
    ft = cfg.stages.finetune
    for task in cfg.tasks:
        for method in ft.methods:
            stage_cfg = {
                "task": task,
                "method": method.model_dump(exclude_none=True),
                "backbone": cfg.backbone.model_dump(),
                "train": ft.train.model_dump(),
                "resources": ft.resources.model_dump(),
                "tome_r": ft.tome_r,
            }
            name = f"finetune/{task}/{method.name}"
            nodes.append(Node(name, "finetune", stage_cfg, deps={"data": f"data/{task}", **backbone}))
            # evaluate deploys at other ToMe degrees: only for methods whose blocks ToMe can patch
            if cfg.stages.evaluate is not None and PEFT_METHODS[method.name].token_merging:
                eval_cfg = {"finetune": stage_cfg, **cfg.stages.evaluate.model_dump()}
                deps = {"model": name, "data": f"data/{task}", "tocom": "distill", **backbone}
                nodes.append(Node(f"evaluate/{task}/{method.name}", "evaluate", eval_cfg, deps=deps, cpus=1.0))
            prune = cfg.stages.prune
            if prune is not None and (prune.finetune_methods is None or method.name in prune.finetune_methods):
                prune_cfg = {"finetune": stage_cfg, **prune.model_dump(by_alias=True, exclude={"finetune_methods"})}
                deps = {"model": name, "data": f"data/{task}", **backbone}
                if cfg.stages.distill is not None:
                    deps["tocom"] = "distill"
                nodes.append(Node(f"prune/{task}/{method.name}", "prune", prune_cfg, deps=deps))
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
            "cfg": _without_resources(node.cfg),
            "upstream": {role: keys[dep] for role, dep in sorted(node.deps.items())},
            "seed": seed,
            "code": version,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        keys[node.name] = hashlib.sha256(blob).hexdigest()
    return keys
