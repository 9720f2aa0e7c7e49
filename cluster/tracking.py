"""MLflow tracking: a parent run per pipeline run, a nested child run per DAG node.

Everything goes through `MlflowClient` with explicit run ids, so the driver, Ray tasks and Ray
Train workers (other processes, other machines) all log into the same runs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PARAM_LIMIT = 6000  # MLflow's maximum param value length
BATCH = 100


class TrackingError(Exception):
    """The tracking server cannot be reached or refused a request; names the tracking URI."""


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": [1, 2]}} -> {"a.b": "[1, 2]"}: nested config as MLflow params."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    value = json.dumps(tree) if isinstance(tree, list | tuple) else str(tree)
    return {prefix: value[:PARAM_LIMIT]}


def default_artifact_root(tracking_uri: str) -> str | None:
    """For a SQLite store, keep artifacts beside the database (not in ./mlruns of the cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlflow-artifacts").resolve().as_uri()
    return None


@dataclass
class Tracker:
    """Thin, picklable handle on one MLflow experiment."""

    uri: str
    experiment: str = "vitpipe"
    _client: MlflowClient | None = field(default=None, repr=False, compare=False)
    _experiment_id: str | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment": self.experiment, "_client": None, "_experiment_id": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._call("open the experiment", self._get_or_create_experiment)
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(
                self.experiment, artifact_location=default_artifact_root(self.uri))
        except Exception:  # created concurrently by another process
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _call(self, what: str, fn, *args, attempts: int = 4, **kwargs):
        """Retry with backoff, then fail with an error naming the tracking URI."""
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if attempt == attempts - 1:
                    raise TrackingError(f"MLflow at {_redact(self.uri)}: cannot {what}: "
                                        f"{str(err).splitlines()[0][:200]}") from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def check_reachable(self) -> None:
        """Preflight: the tracking store answers and the experiment exists."""
        _ = self.experiment_id

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        tags = dict(tags)
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self._call("create a run", self.client.create_run, self.experiment_id,
                         run_name=name, tags=tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self._call("log params", self.client.log_batch, run_id, params=items[i:i + BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), BATCH):
            self._call("log metrics", self.client.log_batch, run_id, metrics=items[i:i + BATCH])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._call("set tags", self.client.log_batch, run_id,
                   tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_bytes(self, run_id: str, name: str, data: bytes) -> None:
        """A small artifact (JSON, PNG, a manifest) under the run's artifact root."""
        with tempfile.TemporaryDirectory() as d:
            path = Path(d, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            folder = str(Path(name).parent) if Path(name).parent != Path(".") else None
            self._call("log an artifact", self.client.log_artifact, run_id, str(path), folder)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("end a run", self.client.set_terminated, run_id, status)


def _redact(uri: str) -> str:
    """Drop user:password@ from a URI before it appears in a message."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return uri


@dataclass
class StepLogger:
    """Called by rank 0 of a training run every few steps: metrics to MLflow, progress to the board."""

    tracker: Tracker | None
    run_id: str | None
    node: str
    board: Any = None

    def __call__(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if self.board is not None:
            self.board.update.remote(self.node, step, total, metrics)
        if self.tracker is not None and self.run_id is not None:
            try:
                self.tracker.log_metrics(self.run_id, metrics, step=step)
            except TrackingError as err:  # never kill a training run over a metrics point
                log.warning("%s", err)


def git_commit(path: str | os.PathLike[str] = ".") -> str | None:
    """The checkout's commit, when the code runs from a git work tree."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
