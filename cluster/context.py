"""What a stage receives besides its config and inputs: where to write, where to log, where to train."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from cluster.manifest import StageWriter
from cluster.store import ArtifactStore
from cluster.tracking import StepLogger, Tracker


@dataclass
class StageContext:
    """Side effects of a stage go through here (STYLE rule 1): store, MLflow child run, logger."""

    node: str
    kind: str
    key: str
    seed: int
    store: ArtifactStore
    writer: StageWriter
    tracker: Tracker | None
    run_id: str | None
    train_storage: str
    board: Any = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("vitpipe.stage"))
    train_runs: list[str] = field(default_factory=list)  # Ray Train runs of this stage, removed on commit

    def train_run(self, phase: str | None = None) -> str:
        """The Ray Train run name of one training phase of this stage (its key, or key-phase): a re-run of the
        same key resumes it from its last verified checkpoint."""
        name = self.key if phase is None else f"{self.key}-{phase}"
        self.train_runs.append(name)
        return name

    def step_logger(self) -> StepLogger:
        return StepLogger(self.tracker, self.run_id, self.node, self.board)

    def log_artifact(self, name: str, data: bytes) -> None:
        if self.tracker and self.run_id:
            self.tracker.log_bytes(self.run_id, name, data)

    def register_model(self, name: str, local_dir: str, tags: dict[str, str]) -> tuple[str, str] | None:
        """Register the model files in `local_dir` in MLflow's model registry; (name, version), or None
        when the stage runs without tracking."""
        if self.tracker and self.run_id:
            return self.tracker.register_model(self.run_id, name, local_dir, "model", tags)
        return None

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.tracker and self.run_id:
            self.tracker.set_tags(self.run_id, tags)

    def dataset_uri(self, name: str) -> str:
        """URI of a file this stage writes, for readers that open it by URI (pyarrow, Ray Data)."""
        return f"{self.store.uri.rstrip('/')}/{self.writer.prefix}/{name}"


@dataclass(frozen=True)
class StageResult:
    """What a stage returns; the runner puts it in the manifest and the MLflow child run."""

    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
