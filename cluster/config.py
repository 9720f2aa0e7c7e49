"""The training settings of a stage, as data: optimisation (`TrainConfig`) and placement (`Resources`).

Torch-free, so that a pipeline YAML validates before torch, Ray or DeepSpeed are imported.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """Optimisation and DeepSpeed settings shared by every training stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(200, gt=0, description="optimizer steps")
    batch_size: int = Field(64, gt=0, description="global batch (all workers, all accumulation steps)")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    checkpoint_every: int = Field(100, gt=0)
    eval_every: int | None = Field(None, gt=0, description="the stage's evaluation (best-on-val, held-out reports) "
                                   "at the checkpoints on a multiple of this and at the last step; default: at "
                                   "every checkpoint. A multiple of checkpoint_every")
    log_every: int = Field(10, gt=0)
    max_failures: int = Field(2, ge=-1)
    compile: str | None = Field(None, description="torch.compile the model with this backend, e.g. inductor: "
                                "opt-in, for GPU workers, where it fuses the ViT's kernels (on CPU it mostly adds "
                                "compile time); the weights and checkpoints are the same as without")

    @model_validator(mode="after")
    def _evaluations_fall_on_checkpoints(self) -> TrainConfig:
        if self.eval_every is not None and self.eval_every % self.checkpoint_every:
            raise ValueError(f"eval_every ({self.eval_every}) must be a multiple of checkpoint_every "
                             f"({self.checkpoint_every}): evaluations happen at checkpoints")
        return self

    def evaluates_at(self, step: int) -> bool:
        """Whether the checkpoint at `step` runs the stage's evaluation."""
        return step == self.steps or step % (self.eval_every or self.checkpoint_every) == 0


class Resources(BaseModel):
    """Where a training stage runs: mapped onto Ray Train's ScalingConfig."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    launcher: Literal["auto", "ray_train"] = Field(
        "auto", description="auto: a one-worker job trains in its node's own process, warm across nodes "
        "(cluster/sessions.py); ray_train: always through Ray Train's controller and workers")

    @model_validator(mode="after")
    def _whole_gpus_when_distributed(self) -> Resources:
        if self.num_workers > 1 and 0 < self.gpus_per_worker < 1:
            raise ValueError("fractional gpus_per_worker needs num_workers = 1")
        return self

    @property
    def in_process(self) -> bool:
        """The job trains in the calling process (a node's Ray task holding these resources itself)."""
        return self.num_workers == 1 and self.launcher == "auto"

    def ray_resources(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}
        if self.memory_gb:
            res["memory"] = self.memory_gb * 2**30
        return res
