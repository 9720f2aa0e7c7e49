"""The one training loop: Ray Train TorchTrainer workers, each driving a DeepSpeed engine.

A stage composes a `Recipe` (model builder, data, loss, optional evaluation) and calls `fit`.
Data parallelism is exact: every optimizer step consumes one global batch, split evenly across
ranks, so N workers follow the same loss trajectory as one worker with the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vitpipe.cluster.batches import DataContext
from vitpipe.cluster.checkpoints import CheckpointError, verify_checkpoint, write_digests
from vitpipe.cluster.config import Resources, TrainConfig
from vitpipe.cluster.sessions import LocalSession, Session, one_rank_world

log = logging.getLogger("vitpipe.train")

# DeepSpeed's fault-tolerance checkpoints (pickles) are written and read only by the workers of one Ray
# Train run, inside its own storage path, and loaded only after their digests verify; every artifact that
# leaves a stage is safetensors.
DS_TAG = "step"


@dataclass(frozen=True)
class Recipe:
    """A stage's training problem, composed from plain functions (all picklable).

    data(ctx) yields this rank's micro-batches in step order starting at ctx.start_step;
    loss(model, batch) -> (scalar loss, {name: detached 0-dim tensor}): the loop sums them on the device and
    reads them once per log or checkpoint step (StepMetrics); evaluate(model) -> metrics (rank 0 only);
    select_metric: keep the trainable state with the highest value of this evaluation metric.
    """

    build_model: Callable[[], nn.Module]
    data: Callable[[DataContext], Iterator[Any]]
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    select_metric: str | None = None


@dataclass
class TrainJob:
    name: str
    recipe: Recipe
    train: TrainConfig
    resources: Resources
    storage_path: str
    seed: int = 0
    on_log: Callable[[int, int, dict[str, float]], None] | None = None
    datasets: dict[str, Any] = field(default_factory=dict)  # Ray Datasets read by StreamedBatches


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    metrics: dict[str, float]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train plus all buffers: what a stage must store to rebuild the model."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().cpu().clone() for n, b in model.named_buffers()})
    return state


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (1-D or named)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith((".bias", "pos_embed", "cls_token", "mask_token"))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # DeepSpeed drops empty groups, which breaks the scheduler


def warmup_cosine(cfg: TrainConfig) -> Callable[[int], float]:
    """Per-iteration linear warm-up then cosine to min_lr, as a multiplier of cfg.lr."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise ValueError(
            f"batch_size {cfg.batch_size} is not divisible by workers x grad_accum "
            f"({world_size} x {cfg.grad_accum})"
        )
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size // (world_size * cfg.grad_accum),
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class StepMetrics:
    """Per-step training metrics kept on the device: micro-batch values are summed there (no host sync per
    micro-step), and the steps since the last read are averaged over ranks in one all-reduce and copied to the
    host in one transfer, at log and checkpoint steps only."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: tuple[str, ...] | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: list[torch.Tensor] = []
        self.steps: list[int] = []

    def add(self, values: dict[str, torch.Tensor | float], weight: float) -> None:
        for name, value in values.items():
            value = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)
            value = value.to(self.device, torch.float64, non_blocking=True) * weight
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def end_step(self, step: int) -> None:
        names = tuple(self.sums)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"the recipe's loss parts changed from {self.names} to {names} at step {step}")
        self.rows.append(torch.stack([self.sums[n] for n in names]))
        self.steps.append(step)
        self.sums = {}

    def read(self) -> list[dict[str, float]]:
        """The rows since the last read, averaged over ranks: [{"step": s, name: value, ...}]."""
        if not self.rows:
            return []
        table = torch.stack(self.rows)
        dist = torch.distributed
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(table)
            table /= dist.get_world_size()
        rows = [{"step": s, **dict(zip(self.names, values, strict=True))}
                for s, values in zip(self.steps, table.tolist(), strict=True)]
        self.rows, self.steps = [], []
        return rows


def _train_loop_per_worker(job: TrainJob) -> None:
    """Runs inside every Ray Train worker; see `fit`."""
    from vitpipe.cluster.sessions import RayTrainSession

    train_loop(job, RayTrainSession())


def train_loop(job: TrainJob, session: Session) -> None:
    """The loop of one rank: build, resume, step, log, evaluate, checkpoint (nothing else)."""
    import deepspeed

    cfg, recipe = job.train, job.recipe
    rank, world = session.rank, session.world
    on_gpu = torch.cuda.is_available() and job.resources.gpus_per_worker > 0
    device = torch.device(f"cuda:{session.local_rank}" if on_gpu else "cpu")
    torch.manual_seed(job.seed)

    # DeepSpeed's comm backend would JIT-compile a shared-memory all-reduce for CPU inference the first time a
    # process starts it (~90 CPU-s on a fresh 2-core machine, and a C++ toolchain). Training reduces through the
    # torch process group (gloo, NCCL), never through that op: it is marked unavailable instead of built
    # (DeepSpeed keeps this dict for the process's life and reads it when the backend starts).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = recipe.build_model()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, on_gpu),
        dist_init_required=False,
    )
    if cfg.compile:  # DeepSpeed's own call (it turns its NVTX ranges off); the module is compiled in place, so
        engine.compile(backend=cfg.compile)  # parameter names, state dicts and checkpoints are the plain model's

    state = _resume(engine, session)
    if state["step"] == 0 and rank == 0:
        _evaluate_start(engine, job, state)
    data = recipe.data(
        DataContext(rank, world, cfg.batch_size // (world * cfg.grad_accum), cfg.grad_accum,
                    state["step"], cfg.steps, job.seed, session.dataset_shard)
    )
    with contextlib.closing(data) if hasattr(data, "close") else contextlib.nullcontext():
        _train_steps(engine, job, state, data, session, device)  # closing the data stops a stream's next pass
    if state["step"] >= cfg.steps:  # restored from the final checkpoint: report it again as the result
        _checkpoint(engine, job, state, cfg.steps, session)
    engine.destroy()


def _train_steps(engine: Any, job: TrainJob, state: dict[str, Any], data: Iterator[Any], session: Session,
                 device: torch.device) -> None:
    """Optimizer steps from state["step"] to the last, logging and checkpointing on their schedule."""
    cfg, recipe, rank, world = job.train, job.recipe, session.rank, session.world
    tracked = StepMetrics(device)
    window_start, window_images = time.perf_counter(), 0
    for step in range(state["step"], cfg.steps):
        engine.train()
        for _ in range(cfg.grad_accum):
            batch = _to_device(next(data), device)
            loss, parts = recipe.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            window_images += _batch_len(batch) * world
            tracked.add({"loss": loss, **parts}, 1 / cfg.grad_accum)
        done = step + 1
        tracked.end_step(done)
        log_now = done % cfg.log_every == 0 or done == cfg.steps
        checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if log_now or checkpoint_now:
            state["history"] += tracked.read()  # the one host sync of these steps
        if log_now:
            elapsed = time.perf_counter() - window_start
            metrics = {k: v for k, v in state["history"][-1].items() if k != "step"}
            metrics["images_per_s"] = window_images / max(elapsed, 1e-9)
            metrics["lr"] = engine.get_lr()[0]
            window_start, window_images = time.perf_counter(), 0
            if rank == 0 and job.on_log is not None:
                job.on_log(done, cfg.steps, metrics)
        if checkpoint_now:
            _checkpoint(engine, job, state, done, session)


def _resume(engine: Any, session: Session) -> dict[str, Any]:
    """Restore from the session's latest checkpoint if it is intact (verified before DeepSpeed unpickles
    it), else start from step 0: a damaged checkpoint is never trusted, whatever the cause."""
    state: dict[str, Any] = {"step": 0, "history": [], "best": None, "best_state": None}
    with session.restore() as d:
        if d is None:
            return state
        try:
            verify_checkpoint(d)
        except CheckpointError as err:
            if session.rank == 0:
                log.warning("ignoring checkpoint %s, training from scratch: %s", d, err)
            return state
        _, client = engine.load_checkpoint(d, tag=DS_TAG)
        state.update(step=client["step"], history=client["history"], best=client["best"])
        best = Path(d) / "best.safetensors"
        if best.exists():
            state["best_state"] = load_file(str(best))
    return state


def _evaluate(engine: Any, job: TrainJob, step: int) -> dict[str, float]:
    """The recipe's evaluation of the model now (rank 0), logged at `step` as eval/<name>: the validation
    curve (the plain names are the stage's final figures)."""
    engine.eval()
    with torch.no_grad():
        evaluation = job.recipe.evaluate(engine.module)
    if job.on_log is not None and evaluation:
        job.on_log(step, job.train.steps, {f"eval/{k}": v for k, v in evaluation.items()})
    return evaluation


def _evaluate_start(engine: Any, job: TrainJob, state: dict[str, Any]) -> None:
    """The initial state is the first candidate for best-on-val: a run that only makes validation worse (a head
    started at the linear probe's optimum, then disturbed) returns what it started from."""
    recipe = job.recipe
    if recipe.evaluate is None or recipe.select_metric is None:
        return
    evaluation = _evaluate(engine, job, 0)
    state["best"] = {"score": evaluation.get(recipe.select_metric), "step": 0, **evaluation}
    state["best_state"] = trainable_state(engine.module)


def _checkpoint(engine: Any, job: TrainJob, state: dict[str, Any], step: int, session: Session) -> None:
    """Evaluate (rank 0, when TrainConfig.evaluates_at the step), keep the best trainable state, save a DeepSpeed
    checkpoint with this rank's digests, report."""
    recipe = job.recipe
    evaluation: dict[str, float] = {}
    if session.rank == 0:
        evaluated = recipe.evaluate is not None and job.train.evaluates_at(step)  # TrainConfig.eval_every
        if evaluated:
            evaluation = _evaluate(engine, job, step)
        score = evaluation.get(recipe.select_metric) if recipe.select_metric else None
        # best-on-val weighs evaluated checkpoints only; without a selection the last state is the result
        candidate = evaluated or recipe.evaluate is None or recipe.select_metric is None
        if state["best_state"] is None or candidate and (score is None or score > state["best"]["score"]):
            state["best"] = {"score": score, "step": step, **evaluation}
            state["best_state"] = trainable_state(engine.module)
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=DS_TAG, client_state={
            "step": step, "history": state["history"], "best": state["best"]})
        if session.rank == 0:
            save_file(state["best_state"], os.path.join(d, "best.safetensors"))
            Path(d, "result.json").write_text(json.dumps(
                {"step": step, "history": state["history"], "best": state["best"]}))
        write_digests(d, session.rank, session.world)
        session.report({"step": step, **evaluation}, d)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_len(batch: Any) -> int:
    while isinstance(batch, list | tuple | dict):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(batch.shape[0])


def _read_result(directory: str, label: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(result.json, best.safetensors) of the final checkpoint in `directory`, once it is verified intact."""
    try:
        verify_checkpoint(directory)
    except CheckpointError as err:
        raise CheckpointError(f"final checkpoint {label}: {err}") from None
    return json.loads(Path(directory, "result.json").read_text()), load_file(str(Path(directory) / "best.safetensors"))


def fit(job: TrainJob) -> TrainResult:
    """Train `job.recipe` on `job.resources.num_workers` workers; resume if interrupted.

    Re-running a job with the same name and storage path continues from its last checkpoint if that
    is intact, else starts over (cluster/checkpoints.py); the final checkpoint is verified before use.
    Returns the best (or last) trainable state, the per-step loss history and final metrics.
    """
    summary, state = _fit_here(job) if job.resources.in_process else _fit_ray_train(job)
    best = {k: v for k, v in (summary["best"] or {}).items() if isinstance(v, int | float)}
    last = summary["history"][-1] if summary["history"] else {}
    metrics = {f"final_{k}": v for k, v in last.items() if k != "step"}
    metrics.update({f"best_{k}" if k in ("score", "step") else k: v for k, v in best.items()})
    return TrainResult(state=state, history=summary["history"], metrics=metrics)


def _fit_here(job: TrainJob) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One worker, in this process (cluster/sessions.py); a failure resumes from the last checkpoint, up to
    `max_failures` times, as Ray Train restarts a failed worker."""
    session = LocalSession(job.storage_path, job.name, job.datasets)
    failures = 0
    with one_rank_world():
        while True:
            try:
                train_loop(job, session)
                break
            except Exception as err:
                failures += 1
                if 0 <= job.train.max_failures < failures:
                    raise
                log.warning("training run %s failed (%s); resuming from its last checkpoint (failure %d of %s)",
                            session.label, err, failures, job.train.max_failures)
    step = session.checkpoints()[-1][0]
    with session.restore() as d:
        return _read_result(d, f"{session.label}/checkpoint_{step:06d}")


def _fit_ray_train(job: TrainJob) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Any number of workers, started by Ray Train; it restarts failed workers from the last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = job.resources
    trainer = TorchTrainer(
        # The job travels inside the train function, which only the workers unpickle. As train_loop_config it would
        # reach Ray Train's controller too, which would import the recipe's modules to read it (timm and the task's
        # code: 2.2 CPU-s for pretrain's, 4.4 for finetune's, per fit). Its datasets travel as Ray Train's.
        functools.partial(_train_loop_per_worker, dataclasses.replace(job, datasets={})),
        datasets=job.datasets or None,
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=res.ray_resources(),
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=job.storage_path,
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {job.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return _read_result(d, result.checkpoint.path)
