"""What a stage receives besides its config and inputs: where to write, where to log, where to train."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from torch import nn

from vitpipe.cluster.config import Resources, TrainConfig
from vitpipe.cluster.manifest import StageWriter, canonical_json
from vitpipe.cluster.store import ArtifactStore
from vitpipe.cluster.tracking import StepLogger, Tracker
from vitpipe.cluster.train import Recipe, TrainJob, fit, trainable_state


@dataclass(frozen=True)
class Fitted:
    """A stage's trained model (rebuilt by the recipe, the trained state loaded), with what training reported."""

    model: nn.Module
    metrics: dict[str, float]  # final_<loss part>, best_score, best_step and the best evaluation's metrics
    history: list[dict[str, float]]
    seconds: float

    @property
    def final(self) -> dict[str, float]:
        """The last step's losses, as final_<name>."""
        return {k: v for k, v in self.metrics.items() if k.startswith("final_")}

    @property
    def best(self) -> dict[str, float]:
        """The best-on-val checkpoint's score and step, as best_score / best_step."""
        return {k: v for k, v in self.metrics.items() if k.startswith("best_")}


def load_trained(model: nn.Module, state: dict[str, Any], where: str) -> None:
    """Load a `fit` result into a freshly built model: exactly its trainable parameters and buffers."""
    expected = set(trainable_state(model))
    if missing := sorted(expected - state.keys()):
        raise RuntimeError(f"{where}: the trained state lacks {missing[:3]} (of {len(missing)} missing)")
    if unexpected := sorted(state.keys() - expected):
        raise RuntimeError(f"{where}: the trained state has {unexpected[:3]}, which the rebuilt model does not "
                           f"train ({len(unexpected)} unexpected)")
    model.load_state_dict(state, strict=False)  # the frozen rest is the recipe's own build


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

    def fit(self, recipe: Recipe, train: TrainConfig, resources: Resources, phase: str | None = None,
            datasets: dict[str, Any] | None = None) -> Fitted:
        """Train `recipe` as this stage's training run (or its `phase`), logging steps to the child run; the
        model is rebuilt by `recipe.build_model` with the trained state; the loss history is written to the
        stage output as history.json (history-<phase>.json)."""
        started = time.perf_counter()
        result = fit(TrainJob(self.train_run(phase), recipe, train, resources, self.train_storage, self.seed,
                              on_log=self.step_logger(), datasets=datasets or {}))
        seconds = time.perf_counter() - started
        model = recipe.build_model()
        load_trained(model, result.state, f"{self.node}: training run {self.key}")
        history = "history.json" if phase is None else f"history-{phase}.json"
        self.put_logged(history, canonical_json(result.history))
        return Fitted(model, result.metrics, result.history, seconds)

    def step_logger(self) -> StepLogger:
        return StepLogger(self.tracker, self.run_id, self.node, self.board)

    def put_logged(self, name: str, data: bytes) -> None:
        """A stage output file that the child run shows too (a model's delta, a loss history)."""
        self.writer.put_bytes(name, data)
        self.log_artifact(name, data)

    def log_artifact(self, name: str, data: bytes) -> None:
        if self.tracker and self.run_id:
            self.tracker.log_bytes(self.run_id, name, data)

    def register_model(self, name: str, local_dir: str, tags: dict[str, str], example: Any
                       ) -> tuple[str, str] | None:
        """Register the exported model in `local_dir` in MLflow's model registry as a pyfunc model with
        `example` as its input example; (name, version), or None when the stage runs without tracking."""
        if self.tracker and self.run_id:
            return self.tracker.register_model(self.run_id, name, local_dir, "model", tags, example)
        return None

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.tracker and self.run_id:
            self.tracker.set_tags(self.run_id, tags)



@dataclass(frozen=True)
class StageResult:
    """What a stage returns: its metrics, and its typed outputs (the stage's Outputs model, tasks/<stage>/spec.py);
    the runner puts both in the manifest and the metrics in the MLflow child run."""

    outputs: BaseModel
    metrics: dict[str, float] = field(default_factory=dict)

    def outputs_json(self) -> dict[str, Any]:
        return self.outputs.model_dump(mode="json")
