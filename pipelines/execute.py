"""Running one node: `run_stage` (context, run, manifest committed last) and its Ray task `execute_node`.

`run_stage` is the one way a stage runs: the runner's Ray task, the tests and the benchmarks call it.
This module imports little (no torch, no MLflow): a fresh Ray worker loads it before the node's clock starts, so
what a node imports is counted in its own time (its manifest's timings and its MLflow run's duration).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from vitpipe.cluster.retry import DEFAULT_RETRY, RetryPolicy

if TYPE_CHECKING:
    from vitpipe.cluster.manifest import Manifest
    from vitpipe.cluster.store import ArtifactStore
    from vitpipe.cluster.tracking import Tracker
    from vitpipe.tasks.spec import Node


def run_stage(kind: str, key: str, cfg: Any, inputs: dict[str, Manifest], store: ArtifactStore, *,
              train_storage: str, seed: int = 0, node: str | None = None, tracker: Tracker | None = None,
              run_id: str | None = None, board: Any = None, retry: RetryPolicy = DEFAULT_RETRY,
              before_commit: Callable[[], None] | None = None, started_at: float | None = None) -> Manifest:
    """Run the stage `kind` on its node config and input manifests, and commit its manifest (last); then remove
    its Ray Train runs, so that a re-run of a deleted manifest starts over. `before_commit()` may refuse the
    commit by raising (the runner checks it still holds the stage's lease). `started_at`: when the node began
    (time.time(); default: now), for its timings."""
    from vitpipe.cluster.checkpoints import discard_train_run
    from vitpipe.cluster.context import StageContext
    from vitpipe.cluster.manifest import StageWriter
    from vitpipe.tasks.stages import STAGES

    started_at = time.time() if started_at is None else started_at
    writer = StageWriter(store, kind, key)
    ctx = StageContext(node=node or kind, kind=kind, key=key, seed=seed, store=store, writer=writer,
                       tracker=tracker, run_id=run_id, train_storage=train_storage, board=board)
    result = STAGES[kind].run()(ctx, cfg, inputs)
    if before_commit is not None:
        before_commit()
    finished_at = time.time()
    manifest = writer.commit(metrics=result.metrics, outputs=result.outputs_json(), mlflow_run_id=run_id,
                             timings={"seconds": finished_at - started_at, "started_at": started_at,
                                      "finished_at": finished_at})
    for name in dict.fromkeys([key, *ctx.train_runs]):
        discard_train_run(train_storage, name, retry)
    return manifest


@dataclass(frozen=True)
class NodeEnv:
    """What a node's Ray task needs to reach the store, MLflow and the progress board."""

    store_uri: str
    retry: RetryPolicy
    tracker: Tracker
    seed: int
    train_storage: str
    board: Any
    run_id: str = ""


@ray.remote
def execute_node(node: Node, key: str, env: NodeEnv, roles: list[str], *upstream: Manifest) -> Manifest:
    """Run one node and commit its manifest; reuse a manifest another runner committed meanwhile."""
    started_at = time.time()
    import torch

    from vitpipe.cluster.lease import claim_stage
    from vitpipe.cluster.manifest import canonical_json, load_manifest
    from vitpipe.cluster.store import open_store

    # as many intra-op threads as CPUs the node holds: Ray reuses worker processes across nodes of any size
    torch.set_num_threads(max(1, int(node.task_options()["num_cpus"])))
    store = open_store(env.store_uri, env.retry)
    done = load_manifest(store, node.kind, key)
    if done is not None:
        return done
    with claim_stage(store, node.kind, key) as claim:  # another runner may be computing this key
        if claim.manifest is not None:
            return claim.manifest
        manifest = run_stage(node.kind, key, node.cfg, dict(zip(roles, upstream, strict=True)), store,
                             train_storage=env.train_storage, seed=env.seed, node=node.name, tracker=env.tracker,
                             run_id=env.run_id, board=env.board, retry=env.retry, before_commit=claim.check_held,
                             started_at=started_at)
    env.tracker.log_metrics(env.run_id, manifest.metrics)
    env.tracker.log_bytes(env.run_id, "manifest.json", canonical_json(manifest.model_dump(mode="json")))
    return manifest
