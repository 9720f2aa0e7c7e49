"""The runner: DAG of plain Ray tasks over the durable stage cache, tracked in MLflow.

Every node is looked up by key first; a verified manifest is a hit and nothing runs. Misses run as
Ray tasks, launched once their upstream nodes have committed (they receive the upstream manifests),
so independent nodes run concurrently within the cluster's resources. A node commits its manifest
last, which makes a killed pipeline resumable: the re-run skips committed nodes and a half-trained
node resumes from its last verified checkpoint. A node's MLflow child run opens when it starts.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import ray

from vitpipe.cluster.fs import is_s3
from vitpipe.cluster.lease import process_gone, this_process
from vitpipe.cluster.manifest import Manifest, load_manifest
from vitpipe.cluster.preflight import preflight
from vitpipe.cluster.progress import ConsoleProgress
from vitpipe.cluster.provenance import PACKAGE_ROOT, code_version, git_commit
from vitpipe.cluster.ray_connect import connect_ray, progress_board
from vitpipe.cluster.retry import DiskFull, TransientError, disk_full, task_retry_options
from vitpipe.cluster.store import ArtifactStore, open_store
from vitpipe.cluster.tracking import Tracker, flatten
from vitpipe.pipelines.dag import build_dag, critical_path, stage_keys
from vitpipe.pipelines.execute import NodeEnv, execute_node
from vitpipe.pipelines.report import print_summary, stage_sections, summary_artifacts
from vitpipe.pipelines.spec import PipelineConfig
from vitpipe.tasks.prepare.spec import DataOutputs
from vitpipe.tasks.spec import Node
from vitpipe.tasks.stages import STAGES

DRIVER_TAG = "vitpipe.driver"  # the process that runs a pipeline: {"host", "pidns", "pid"} (cluster.lease)

log = logging.getLogger("vitpipe")


@dataclass
class NodeOutcome:
    node: Node
    key: str
    status: str  # cached | ran | failed | skipped
    seconds: float = 0.0
    manifest: Manifest | None = None
    error: str | None = None


@dataclass
class RunSummary:
    run_id: str
    outcomes: list[NodeOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.status in ("cached", "ran") for o in self.outcomes)


def train_storage(cfg: PipelineConfig, store: ArtifactStore) -> str:
    """Ray Train's checkpoints: beside the artifacts (S3 on a cluster, the work dir locally)."""
    if is_s3(store.uri):
        return f"{store.uri.rstrip('/')}/ray-train"
    return str(Path(cfg.work_dir).resolve() / "ray-train")


class _Run:
    """One pipeline run: launches nodes, follows them, records the outcome in MLflow."""

    def __init__(self, cfg: PipelineConfig, out: TextIO) -> None:
        self.cfg, self.out = cfg, out
        self.nodes = build_dag(cfg)  # a config problem stops here, before anything is created
        self.store = open_store(cfg.store_uri, cfg.retry)
        self.tracker = Tracker(cfg.tracking, cfg.experiment, cfg.retry)
        preflight(self.store, self.tracker, train_storage(cfg, self.store), cfg.retry)
        self.version = code_version()
        self.keys = stage_keys(self.nodes, cfg.seed, self.version)
        self.driver = json.dumps(this_process(), sort_keys=True)
        self.source_tags = source_tags(cfg.name)
        self.abort: DiskFull | None = None  # set by the first stage that finds the disk full
        self.progress = ConsoleProgress(out)
        self.child: dict[str, str] = {}
        self.outcomes: dict[str, NodeOutcome] = {}
        self.pending: dict[Any, tuple[Node, float]] = {}
        self.waiting: list[Node] = []
        self.parent: str | None = None
        self.open_runs: set[str] = set()  # MLflow runs this driver started and has not ended yet
        self.env: NodeEnv | None = None  # set when Ray starts; each launch adds its node's MLflow run
        self.capacity: dict[str, float] = {}  # the cluster's CPUs and GPUs, when Ray starts

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.tracker.finish(run_id, status)
        self.open_runs.discard(run_id)

    def end_open_runs(self, status: str) -> None:
        """On any failure of the driver: no run it started may stay RUNNING (best effort: the failure may
        be the tracking store itself, and the original error is what the user must see)."""
        runs = sorted(self.open_runs - {self.parent}) + ([self.parent] if self.parent else [])
        for i, run_id in enumerate(runs):
            try:
                self.finish(run_id, status)
            except Exception as err:  # noqa: BLE001 - keep ending the others, unless the tracking store is gone
                if disk_full(err, self.cfg.work_dir) is not None or isinstance(err, TransientError):
                    log.warning("could not end %d MLflow run(s): %s; the next run marks them KILLED",
                                len(runs) - i, error_line(err))
                    return
                log.warning("could not end MLflow run %s: %s", run_id, error_line(err))

    def reap(self) -> None:
        """Runs left RUNNING by a driver of this machine that is gone (killed, out of memory, power lost) are
        marked KILLED, so the MLflow UI shows no phantom live runs; another machine's runs are left alone."""
        for run_id, driver in self.tracker.running(DRIVER_TAG).items():
            try:
                gone = process_gone(json.loads(driver))
            except (ValueError, TypeError):
                continue
            if gone:
                self.tracker.set_tags(run_id, {"vitpipe.error": "its driver process was gone (found by a later run)"})
                self.tracker.finish(run_id, "KILLED")
                log.warning("MLflow run %s was left RUNNING by a driver that is gone: marked KILLED", run_id)

    def start_parent(self) -> str:
        """The pipeline's parent run, named <pipeline>-<UTC time>-<4 hex> so that runs of one pipeline differ."""
        self.reap()
        commit = git_commit(PACKAGE_ROOT) or "unknown"
        tags = {**self.source_tags, "vitpipe.pipeline": self.cfg.name, "vitpipe.git_commit": commit,
                "vitpipe.code_version": self.version, "vitpipe.store": self.store.uri,
                "vitpipe.config_sha": _sha(self.cfg.model_dump(mode="json")), DRIVER_TAG: self.driver}
        name = f"{self.cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.urandom(2).hex()}"
        self.parent = self.tracker.start_run(name, tags)
        self.open_runs.add(self.parent)
        self.tracker.log_params(self.parent, flatten(self.cfg.model_dump(mode="json")))
        return self.parent

    def lineage_tags(self, node: Node, cached: bool) -> dict[str, str]:
        tags = {**self.source_tags, "vitpipe.node": node.name, "vitpipe.stage.kind": node.kind, DRIVER_TAG: self.driver,
                "vitpipe.stage.key": self.keys[node.name], "vitpipe.cached": "yes" if cached else "no",
                "vitpipe.upstream": json.dumps({r: self.keys[d] for r, d in node.deps.items()}),
                "vitpipe.code_version": self.version, "vitpipe.store": self.store.uri}
        tags.update(self.input_tags(node))
        return tags

    def input_tags(self, node: Node) -> dict[str, str]:
        """Fingerprints of the datasets a node reads, once its data node has a manifest."""
        data = self.outcomes.get(node.deps.get("data", ""))
        if data is None or data.manifest is None:
            return {}
        return {"vitpipe.data.fingerprint": DataOutputs.of(data.manifest).fingerprint}

    def start_child(self, node: Node, cached: bool) -> str:
        """The node's child run, opened when the node starts (or is found cached, or skipped), so that its
        MLflow duration is the node's own."""
        run_id = self.tracker.start_run(node.name, self.lineage_tags(node, cached), self.parent)
        self.child[node.name] = run_id
        self.open_runs.add(run_id)
        self.tracker.log_params(run_id, flatten(node.cfg.tracked_params()))
        for role in ("data", "corpus"):  # MLflow's datasets table: what the node reads
            made = self.outcomes.get(node.deps.get(role, ""))
            if made is not None and made.manifest is not None:
                out = DataOutputs.of(made.manifest)
                profile = {"rows": out.counts, "classes": len(out.classes), "source": out.source}
                self.tracker.log_dataset(run_id, node.deps[role].removeprefix("data/"), out.fingerprint,
                                         out.uri(self.store), profile, "training")
        return run_id

    def open_node(self, node: Node) -> None:
        """A cache hit is recorded at once in its child run; a miss waits to be scheduled."""
        key = self.keys[node.name]
        cached = load_manifest(self.store, node.kind, key)
        if cached is None:
            self.waiting.append(node)
            return
        run_id = self.start_child(node, cached=True)
        self.tracker.log_metrics(run_id, cached.metrics)
        self.finish(run_id)
        self.outcomes[node.name] = NodeOutcome(node, key, "cached", manifest=cached)
        self.progress.print(f"  cached   {node.name}  ({key[:12]})")

    def schedule(self) -> None:
        """Launch waiting nodes whose inputs are ready while the cluster has room for their workers.

        One node always may run even if it asks for more than the cluster has now, so an
        autoscaling cluster sees the demand and grows.
        """
        for node in list(self.waiting):
            states = [self.outcomes[d].status if d in self.outcomes else None for d in node.deps.values()]
            if any(s in ("failed", "skipped") for s in states):
                self.waiting.remove(node)
                self.skip(node)
                continue
            if any(s not in ("cached", "ran") for s in states):
                continue
            need = node.demand()
            busy = [n.demand() for n, _ in self.pending.values()]
            fits = all(sum(b.get(r, 0) for b in busy) + v <= self.capacity.get(r, 0) for r, v in need.items())
            if self.pending and not fits:
                continue
            self.waiting.remove(node)
            self.launch(node)

    def launch(self, node: Node) -> None:
        roles = list(node.deps)
        run_id = self.start_child(node, cached=False)
        env = replace(self.env, run_id=run_id)
        options = {**node.task_options(), "name": node.name, **task_retry_options(self.cfg.retry)}
        ref = execute_node.options(**options).remote(
            node, self.keys[node.name], env, roles, *[self.outcomes[node.deps[r]].manifest for r in roles])
        self.pending[ref] = (node, time.perf_counter())

    def skip(self, node: Node) -> None:
        message = "an upstream node failed"
        self.outcomes[node.name] = NodeOutcome(node, self.keys[node.name], "skipped", error=message)
        self.finish(self.start_child(node, cached=False), "KILLED")
        self.progress.print(f"  skipped  {node.name}: {message}")

    def collect(self, ref: Any) -> None:
        node, started = self.pending.pop(ref)
        key, run_id = self.keys[node.name], self.child[node.name]
        seconds = time.perf_counter() - started
        try:
            manifest = ray.get(ref)
        except Exception as err:  # a stage failed: record it, keep the independent branches going
            full = disk_full(err, self.cfg.work_dir)
            if full is not None:  # ... unless the disk is full: every other stage would fail the same way
                self.abort = full
            message = str(full) if full is not None else error_line(err)
            self.outcomes[node.name] = NodeOutcome(node, key, "failed", seconds, error=message)
            self.tracker.set_tags(run_id, {"vitpipe.error": message[:5000]})
            self.finish(run_id, "FAILED")
            self.progress.print(f"  failed   {node.name}: {message}")
            return
        if manifest.mlflow_run_id != run_id:  # committed by a concurrent runner while this one waited
            self.tracker.set_tags(run_id, {"vitpipe.cached": "yes",
                                           "vitpipe.computed_by": manifest.mlflow_run_id or "unknown"})
            self.tracker.log_metrics(run_id, manifest.metrics)
            self.finish(run_id)
            self.outcomes[node.name] = NodeOutcome(node, key, "cached", seconds, manifest=manifest)
            self.progress.print(f"  reused   {node.name}  ({key[:12]}, computed by another runner)")
            return
        self.outcomes[node.name] = NodeOutcome(node, key, "ran", seconds, manifest=manifest)
        self.finish(run_id)
        headline = ", ".join(f"{k} {manifest.metrics[k]:.4f}" for k in STAGES[node.kind].headline
                             if k in manifest.metrics)
        self.progress.print(f"  done     {node.name}  {seconds:6.1f}s  {headline}")

    def follow(self) -> None:
        board_refresh = 0.0
        self.schedule()
        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
            for ref in ready:
                self.collect(ref)
            if self.abort is not None:
                for ref in self.pending:
                    ray.cancel(ref, force=True)
                self.progress.clear()
                raise self.abort
            if ready:
                self.schedule()
            if time.monotonic() - board_refresh > 0.5 and self.env.board is not None:
                board_refresh = time.monotonic()
                self.draw_progress()
        self.progress.clear()

    def draw_progress(self) -> None:
        running = [n.name for n, _ in self.pending.values()]
        try:
            self.progress.draw(running, ray.get(self.env.board.snapshot.remote(), timeout=10))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            self.progress.print(f"  vitpipe: progress bars stop here (their actor is gone: {type(err).__name__}); "
                                "the stages go on")
            self.env = replace(self.env, board=None)

    def start_ray(self) -> None:
        """Ray is only started when something has to run: a fully cached re-run needs none."""
        connect_ray(self.cfg.ray.address, self.cfg.ray.num_cpus, self.cfg.ray.num_gpus)
        self.capacity = {r: v for r, v in ray.cluster_resources().items() if r in ("CPU", "GPU")}
        self.waiting = self.fit_gpus(self.waiting)
        self.tracker.set_tags(self.parent, {"vitpipe.ray_address": ray.get_runtime_context().gcs_address})
        self.env = NodeEnv(store_uri=self.store.uri, retry=self.cfg.retry, tracker=self.tracker, seed=self.cfg.seed,
                           train_storage=train_storage(self.cfg, self.store), board=progress_board())

    def fit_gpus(self, nodes: list[Node]) -> list[Node]:
        """On a cluster without GPUs, GPU requests become 0 (one warning), unless ray.gpu_fallback is off.

        Resources are not part of a stage key, so the CPU run fills the same cache entry.
        """
        asking = [n for n in nodes if n.resources is not None and n.resources.gpus_per_worker > 0]
        if not asking or self.capacity.get("GPU", 0) > 0 or not self.cfg.ray.gpu_fallback:
            return nodes
        log.warning("the Ray cluster has no GPUs: %d node(s) that ask for GPUs run on CPU "
                    "(gpus_per_worker -> 0; set ray.gpu_fallback: false to wait for GPU nodes instead)",
                    len(asking))
        return [n.with_resources(n.resources.model_copy(update={"gpus_per_worker": 0.0})) if n in asking else n
                for n in nodes]

    def execute(self) -> RunSummary:
        try:
            self.start_parent()
            self.out.write(f"vitpipe: run {self.parent} of {self.cfg.name!r}: {len(self.nodes)} nodes\n")
            for node in self.nodes:
                self.open_node(node)
            if self.waiting:
                path = critical_path(self.nodes)
                self.waiting.sort(key=lambda node: path[node.name], reverse=True)
                self.start_ray()
                try:
                    self.follow()
                finally:
                    if self.env.board is not None:
                        ray.kill(self.env.board)
            summary = RunSummary(self.parent, [self.outcomes[n.name] for n in self.nodes])
            self.record(summary)
            self.finish(self.parent, "FINISHED" if summary.ok else "FAILED")
        except BaseException as err:
            self.end_open_runs("KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED")
            raise
        return summary

    def record(self, summary: RunSummary) -> None:
        counts = {s: sum(o.status == s for o in summary.outcomes) for s in ("cached", "ran", "failed")}
        self.tracker.set_tags(self.parent, {f"vitpipe.nodes_{k}": str(v) for k, v in counts.items()})
        sections = stage_sections(summary.outcomes, self.cfg)
        metrics, artifacts = summary_artifacts(summary.outcomes, sections)
        self.tracker.log_metrics(self.parent, metrics)
        for name, data in artifacts.items():
            self.tracker.log_bytes(self.parent, name, data)
        for section in sections:  # tables the MLflow UI can show and compare
            for name, columns in section.tables.items():
                self.tracker.log_table(self.parent, columns, name)
        print_summary(summary.outcomes, sections, self.out)


def source_tags(pipeline: str) -> dict[str, str]:
    """MLflow's standard tags, which its fluent API sets and the client API leaves to the caller: who ran it,
    what, and at which commit (the UI's User, Source and Version columns)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    tags = {"mlflow.user": user, "mlflow.source.type": "LOCAL", "mlflow.source.name": f"vitpipe run {pipeline}"}
    commit = git_commit(PACKAGE_ROOT)
    return tags | ({"mlflow.source.git.commit": commit} if commit else {})


def run(cfg: PipelineConfig, out: TextIO = sys.stdout) -> RunSummary:
    """Run the pipeline; returns each node's outcome (cached, ran, failed, skipped)."""
    return _Run(cfg, out).execute()


def _sha(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def error_line(err: BaseException) -> str:
    """The root cause of a (possibly Ray-wrapped) exception as one line: its whole message, lines joined by " | "
    (a pydantic error's details are on the lines after its first)."""
    cause = getattr(err, "cause", None) or err
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    # Ray Train wraps the worker's traceback: its last "SomeError: message" line is the root cause.
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b.*?:", ln)]
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines) and raised:
        return raised[-1]
    return f"{type(cause).__name__}: {' | '.join(lines)}" if lines else type(cause).__name__
