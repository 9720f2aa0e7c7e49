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


def build_dag(cfg: PipelineConfig) -> list[Node]:
    """Nodes in topological order: data preparation per task, then finetune per (task, method)."""
    nodes: list[Node] = []
    for task, spec in cfg.tasks.items():
        data_cfg: dict[str, Any] = {"source": spec.source}
        if (digest := _source_digest(spec.source)) is not None:
            data_cfg["source_digest"] = digest
        nodes.append(Node(f"data/{task}", "data", data_cfg, cpus=1.0))
    ft = cfg.stages.finetune
    for task in cfg.tasks:
        for method in ft.methods:
            stage_cfg = {
                "task": task,
                "method": method.model_dump(exclude_none=True),
                "backbone": cfg.backbone.model_dump(),
                "train": ft.train.model_dump(),
                "resources": ft.resources.model_dump(),
            }
            nodes.append(Node(f"finetune/{task}/{method.name}", "finetune", stage_cfg,
                              deps={"data": f"data/{task}"}))
    return nodes


def stage_keys(nodes: list[Node], seed: int, version: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for node in nodes:
        payload = {
            "kind": node.kind,
            # Resources change where a stage runs, not what it computes (data parallelism is exact).
            "cfg": {k: v for k, v in node.cfg.items() if k != "resources"},
            "upstream": {role: keys[dep] for role, dep in sorted(node.deps.items())},
            "seed": seed,
            "code": version,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        keys[node.name] = hashlib.sha256(blob).hexdigest()
    return keys
