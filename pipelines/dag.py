"""Pipeline config -> DAG of stage nodes, each with a content-addressed key.

key = sha256(canonical JSON of: stage kind, stage config, upstream keys, seed, code version).
So an unchanged pipeline maps to the same keys (everything cached), and a changed task config
changes only the keys of that task's branch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vitpipe.models.settings import ViTSpec
from vitpipe.pipelines.spec import ConfigError, PipelineConfig
from vitpipe.tasks.spec import Node, Plan, PlanError
from vitpipe.tasks.stages import STAGES


def planned_backbone(spec: ViTSpec) -> ViTSpec:
    """The backbone with its weights' sha256 filled in (it goes into every downstream key); a pinned sha256
    that the file no longer has, or weights that cannot be read, fail here with the config path."""
    if spec.weights is None:
        return spec
    from vitpipe.cluster.weights import weights_digest
    from vitpipe.models.weights import WeightsError

    try:
        sha = weights_digest(spec.weights)
    except WeightsError as err:
        raise ConfigError(f"backbone.weights: {str(err).splitlines()[0]}") from None
    if spec.weights_sha256 is not None and spec.weights_sha256 != sha:
        raise ConfigError(f"backbone.weights_sha256: {spec.weights} has sha256 {sha}, not the pinned "
                          f"{spec.weights_sha256}")
    return spec.model_copy(update={"weights_sha256": sha})


def build_dag(cfg: PipelineConfig) -> list[Node]:
    """Nodes in topological order: each stage that is on declares its nodes (tasks/<stage>/spec.py), in the
    registry's order. Every node's config is validated here, when the pipeline is planned."""
    cfg = cfg.model_copy(update={"backbone": planned_backbone(cfg.backbone)})
    plan = Plan(cfg)
    for kind, spec in STAGES.items():
        if spec.section is None or getattr(cfg.stages, kind) is not None:
            try:
                spec.declare(cfg, plan)
            except PlanError as err:
                raise ConfigError(str(err)) from None
    return list(plan.nodes.values())


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


def critical_path(nodes: list[Node]) -> dict[str, int]:
    """Each node's work plus the most work on any path below it. The runner launches ready nodes longest path
    first: the pretraining chain, then fine-tunes that a prune follows before those that only an evaluation
    follows, pruning before evaluation, so a fan-out ends on short nodes rather than on one late chain."""
    below: dict[str, list[str]] = {n.name: [] for n in nodes}
    for node in nodes:
        for dep in node.deps.values():
            below[dep].append(node.name)
    path: dict[str, int] = {}
    for node in reversed(nodes):  # topological order: every dependent is done first
        path[node.name] = node.work + max((path[d] for d in below[node.name]), default=0)
    return path


def plan(cfg: PipelineConfig) -> list[tuple[Node, str, str]]:
    """(node, key, "cached" | "pending") in topological order; runs nothing and creates nothing (a store that
    does not exist yet has nothing cached)."""
    nodes = build_dag(cfg)
    from vitpipe.cluster.manifest import load_manifest
    from vitpipe.cluster.provenance import code_version
    from vitpipe.cluster.store import StoreNotFound, open_store

    try:
        store = open_store(cfg.store_uri, cfg.retry, create=False)
    except StoreNotFound:
        store = None
    keys = stage_keys(nodes, cfg.seed, code_version())
    cached = {n.name for n in nodes if store is not None and load_manifest(store, n.kind, keys[n.name])}
    return [(n, keys[n.name], "cached" if n.name in cached else "pending") for n in nodes]
