"""MLflow tracking: a parent run per pipeline run, a nested child run per DAG node.

Everything goes through `MlflowClient` with explicit run ids, so the driver, Ray tasks and Ray
Train workers (other processes, other machines) all log into the same runs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitpipe.cluster.fs import redact
from vitpipe.cluster.retry import DEFAULT_RETRY, RetryPolicy, TransientError, disk_full
from vitpipe.cluster.store import StoreError, clean_key

if TYPE_CHECKING:  # MLflow is imported where a client is made: a Tracker travels to Ray tasks without it
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PARAM_LIMIT = 6000  # MLflow's maximum param value length
BATCH = 100


class TrackingError(Exception):
    """The tracking server cannot be reached or refused a request; names the tracking URI."""


class TrackingUnavailable(TrackingError, TransientError):
    """The tracking server did not answer (or kept failing with 5xx) through every retry."""


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


def _open_sqlite_store(uri: str) -> MlflowClient:
    """A client on a SQLite tracking DB, created and migrated under a file lock: MLflow's first use of a new DB
    runs its alembic migrations, and two first runs on a fresh work_dir would otherwise both migrate and one
    fail."""
    import fcntl

    from mlflow.tracking import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # opens the store: creates / migrates the schema
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


@dataclass
class Tracker:
    """Thin, picklable handle on one MLflow experiment."""

    uri: str
    experiment: str = "vitpipe"
    retry: RetryPolicy = DEFAULT_RETRY
    _client: MlflowClient | None = field(default=None, repr=False, compare=False)
    _experiment_id: str | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"Tracker({redact(self.uri)!r}, {self.experiment!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment": self.experiment, "retry": self.retry, "_client": None,
                "_experiment_id": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            if self.uri.startswith(("http://", "https://")):
                self.retry.configure_mlflow_http()
            if self.uri.startswith("sqlite:///"):
                self._client = _open_sqlite_store(self.uri)
            else:
                from mlflow.tracking import MlflowClient

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
                self.experiment, artifact_location=default_artifact_root(self.uri), tags=EXPERIMENT_TAGS)
        except Exception:  # created concurrently by another process
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _call(self, what: str, fn, *args, **kwargs):
        """Retry transient failures with backoff, then fail with one line naming the tracking URI."""
        attempts = self.retry.attempts
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                transient = _is_transient(err)
                if attempt == attempts - 1 or not transient:
                    lines = redact(str(err)).strip().splitlines() or [type(err).__name__]
                    where = f"MLflow at {redact(self.uri)}: cannot {what}"
                    if transient:
                        raise TrackingUnavailable(f"{where} after {attempts} tries: {lines[0][:300]}") from None
                    raise TrackingError(f"{where}: {lines[0][:300]}") from None
                time.sleep(self.retry.backoff(attempt))
        raise AssertionError("unreachable")

    def check_reachable(self) -> None:
        """Preflight: the tracking store answers a read (nothing is created)."""
        self._call("reach the tracking server", self.client.search_experiments, max_results=1)

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        tags = {k: redact(str(v)) for k, v in tags.items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self._call("create a run", self.client.create_run, self.experiment_id,
                         run_name=name, tags=tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(v)) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self._call("log params", self.client.log_batch, run_id, params=items[i:i + BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), BATCH):
            self._call("log metrics", self.client.log_batch, run_id, metrics=items[i:i + BATCH])

    def log_dataset(self, run_id: str, name: str, fingerprint: str, uri: str, profile: dict[str, Any],
                    context: str) -> None:
        """A dataset the run read, in MLflow's datasets table: its content fingerprint as the digest (the first
        36 hex digits: MLflow's column width), its location, its row and class counts, its role."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source = json.dumps({"uri": redact(uri)})
        dataset = Dataset(name, fingerprint[:36], "s3" if uri.startswith("s3://") else "local", source,
                          profile=redact(json.dumps(profile, sort_keys=True)))
        tags = [InputTag("mlflow.data.context", context)]
        self._call("log a dataset", self.client.log_inputs, run_id, datasets=[DatasetInput(dataset, tags)])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("set tags", self.client.log_batch, run_id,
                   tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_bytes(self, run_id: str, name: str, data: bytes) -> None:
        """A small artifact (JSON, PNG, a manifest) under the run's artifact root."""
        try:
            clean_key(name)
        except StoreError as err:
            raise TrackingError(f"MLflow artifact name: {err}") from None
        with tempfile.TemporaryDirectory() as d:
            path = Path(d, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            folder = str(Path(name).parent) if Path(name).parent != Path(".") else None
            self._call("log an artifact", self.client.log_artifact, run_id, str(path), folder)

    def log_table(self, run_id: str, columns: dict[str, list[Any]], name: str) -> None:
        """A table artifact the MLflow UI shows as a table (its artifact view and run comparison)."""
        self._call("log a table", self.client.log_table, run_id, columns, name)

    def register_model(self, run_id: str, name: str, local_dir: str, artifact_path: str,
                       tags: dict[str, str], example: Any) -> tuple[str, str]:
        """The exported model folder as an MLflow pyfunc model (an MLmodel with a signature and `example` as its
        input example; save_pyfunc): logged under the run's `artifact_path`, logged as an MLflow 3 LoggedModel of
        the run (the UI's "Logged models" list, tags = `tags`), and registered as a new version of model `name`
        from that LoggedModel (the registered model is created on first use); returns (name, version)."""
        tags = {k: str(v) for k, v in tags.items()}
        with tempfile.TemporaryDirectory() as d:
            pyfunc = str(Path(d) / "pyfunc")
            save_pyfunc(local_dir, pyfunc, example)
            self._call("log model files", self.client.log_artifacts, run_id, pyfunc, artifact_path)
            logged = self._call("create a logged model", self.client.create_logged_model, self.experiment_id,
                                name=name, source_run_id=run_id, tags=tags, model_type="vitpipe-deploy")
            self._call("log the logged model's files", self.client.log_model_artifacts, logged.model_id, pyfunc)
            self._call("finalize a logged model", self.client.finalize_logged_model, logged.model_id, "READY")
        try:
            self.client.create_registered_model(name)
        except Exception:  # it exists (registered by an earlier run, or concurrently by another node)
            self._call("look up a registered model", self.client.get_registered_model, name)
        version = self._call("register a model version", self.client.create_model_version, name,
                             logged.artifact_location, run_id, tags=tags, model_id=logged.model_id)
        return name, str(version.version)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("end a run", self.client.set_terminated, run_id, status)

    def running(self, tag: str) -> dict[str, str]:
        """{run id: value of `tag`} of this experiment's runs that are RUNNING and carry `tag`."""
        runs = self._call("search runs", self.client.search_runs, [self.experiment_id],
                          filter_string="attributes.status = 'RUNNING'", max_results=5000)
        return {r.info.run_id: r.data.tags[tag] for r in runs if tag in r.data.tags}


def save_pyfunc(exported: str, target: str, example: Any) -> None:
    """The pyfunc model of an exported task model folder (models.deploy), written to `target`: the folder as its
    artifact, the `vitpipe.models` package as code, cluster/serving.py as the model's code (no pickle), a signature
    inferred from `example` (uint8 images) and the output columns, and the packages that load it."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import infer_signature

    classes = json.loads((Path(exported) / "model.json").read_text())["classes"]
    outputs = pd.DataFrame({"label": [classes[0]], "probability": [1.0], **{f"p_{c}": [0.0] for c in classes}})
    root = Path(__file__).resolve().parents[1]
    requirements = [f"{p}=={version(p)}" for p in ("torch", "timm", "safetensors", "numpy", "pandas")]
    with tempfile.TemporaryDirectory() as code:  # the model's code/ gets vitpipe/models: `vitpipe.models` imports
        shutil.copytree(root / "models", Path(code) / "vitpipe" / "models",
                        ignore=shutil.ignore_patterns("__pycache__"))
        mlflow.pyfunc.save_model(target, python_model=str(root / "cluster" / "serving.py"),
                                 artifacts={"model": exported}, code_paths=[str(Path(code) / "vitpipe")],
                                 signature=infer_signature(example, outputs), input_example=example,
                                 pip_requirements=requirements)


# The UI opens a model-training experiment in its training view (not the GenAI one) and shows the description.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "vitpipe pipeline runs: one parent run per `vitpipe run`, one child run per stage node "
                           "(tags vitpipe.node, vitpipe.stage.key); models are registered by the prune stage.",
}


def _is_transient(err: Exception) -> bool:
    """A client error (4xx other than 429: bad value, missing run) or a full disk will not go away by retrying."""
    from mlflow.exceptions import MlflowException

    if disk_full(err, "") is not None:
        return False
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return not (400 <= status < 500 and status != 429)
    return True


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
