"""The prune stage: one fine-tuned (task, PEFT method) model -> a pruned, merged, deployable model (METHODS.md 6).

The PEFT delta is merged into the backbone where the method is mergeable (else the branch is kept); ResRep or
C-SGD trains briefly on the task's train split through the shared loop, at the configured keep ratio, and folds
exactly into narrower layers; the model is deployed at the configured ToMe degree with ToCom Delta(r_src ->
r_tgt) merged into its q / v weights (scale picked on val), evaluated on test, exported with models.deploy and
registered in MLflow's model registry. Accuracy, params, FLOPs, CPU latency (batch 1) and throughput (batch 64)
are reported before (the merged, unpruned fine-tuned model) and after.
"""

from __future__ import annotations

import copy
import functools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cluster.context import StageContext, StageResult
from cluster.manifest import Manifest, read_bytes
from cluster.train import Recipe, Resources, TensorBatches, TrainConfig, TrainJob, fit
from models.deploy import export
from models.peft import PEFT_METHODS
from models.prune import PRUNERS, PruneSettings, block_widths, count_flops, count_params, merge_tocom_pruned
from models.tocom import load_tocom
from models.tome import apply_tome, tome_r
from tasks.finetune import FinetuneConfig, _split, accuracy, classification_loss, flip, load_task_model

TRAIN_DEFAULTS = {"steps": 100, "lr": 1e-3, "warmup_steps": 5, "weight_decay": 0.0}
# tasks.finetune.normalize maps uint8 x to x / 127.5 - 1, i.e. (x / 255 - 0.5) / 0.5 per channel.


def _known_pruner(method: str) -> str:
    if method not in PRUNERS:
        raise ValueError(f"unknown pruning method {method!r} (known: {', '.join(PRUNERS)})")
    return method


def _with_train_defaults(value: Any) -> Any:
    """Unnamed train fields take the prune stage's defaults, not TrainConfig's."""
    return {**TRAIN_DEFAULTS, **value} if isinstance(value, dict) else value


# Shared by PruneConfig and the pipeline YAML's stages.prune (pipelines.spec.PruneStage).
PrunerName = Annotated[str, AfterValidator(_known_pruner)]
PruneTrain = Annotated[TrainConfig, BeforeValidator(_with_train_defaults)]
PREPROCESS = {"input": "RGB, uint8 scaled to [0, 1]", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


class PruneConfig(BaseModel):
    """The validated config of one prune node: the finetune node it prunes, the method and its strengths."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)

    finetune: FinetuneConfig
    method: PrunerName = "resrep"
    keep_ratio: float = Field(0.5, gt=0, le=1, description="fraction of MLP hidden units kept")
    head_keep_ratio: float | None = Field(None, gt=0, le=1, description="fraction of heads kept; None: keep_ratio")
    lam: float = Field(1e-4, gt=0, alias="lambda", description="ResRep group-lasso strength")
    centripetal: float = Field(3e-3, ge=0, description="C-SGD centripetal strength")
    tome_r: int = Field(0, ge=0, description="ToMe degree r_tgt of the deployed model")
    tocom_scales: tuple[Annotated[float, Field(gt=0)], ...] = Field((0.05, 0.08, 0.1, 0.12, 0.15), min_length=1)
    train: PruneTrain = TrainConfig(**TRAIN_DEFAULTS)
    resources: Resources = Resources()
    latency_repeats: int = Field(20, gt=0, description="timed forwards per model and batch size")
    registry_prefix: str = "vitpipe"

    def settings(self) -> PruneSettings:
        """ResRep's forget set grows over the first half of the training forwards."""
        ramp = max(1, self.train.steps * self.train.grad_accum // 2)
        return PruneSettings(keep_ratio=self.keep_ratio, head_keep_ratio=self.head_keep_ratio, lam=self.lam,
                             ramp_steps=ramp, centripetal=self.centripetal)


def prunable(baseline: nn.Module, method: str, settings: PruneSettings) -> nn.Module:
    """A copy of the fine-tuned model prepared for pruning, every parameter trainable (the Recipe's model)."""
    model = PRUNERS[method].prepare(copy.deepcopy(baseline), settings)
    return model.requires_grad_(True).train()


def _timed(model: nn.Module, x: torch.Tensor) -> float:
    started = time.perf_counter()
    model(x)
    return time.perf_counter() - started


@torch.no_grad()
def cpu_speed(models: dict[str, nn.Module], img_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per model: median CPU latency (ms) at batch 1 and throughput (img/s) at batch 64. The models are timed
    in alternation, round by round, so that load from other processes affects them alike."""
    one, batch = torch.zeros(1, 3, img_size, img_size), torch.zeros(64, 3, img_size, img_size)
    for model in models.values():
        model.eval()
        _timed(model, one), _timed(model, batch)  # warm-up
    times: dict[str, dict[str, list[float]]] = {name: {"b1": [], "b64": []} for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name]["b1"].append(_timed(model, one))
            times[name]["b64"].append(_timed(model, batch))
    return {name: {"latency_ms_b1": 1000 * statistics.median(t["b1"]),
                   "throughput_b64": 64 / statistics.median(t["b64"])} for name, t in times.items()}


def _cost(model: nn.Module, img_size: int) -> dict[str, float]:
    return {"params": float(count_params(model)), "flops": float(count_flops(model, img_size))}


def deploy_tome(ctx: StageContext, model: VisionTransformer, r: int) -> int:
    """Run `model` at ToMe degree r where its blocks allow it; returns the degree it runs at."""
    if r == tome_r(model):
        return r
    try:
        apply_tome(model, r)
    except TypeError as err:  # e.g. an unmerged adapter patched the blocks
        ctx.log.warning("%s: ToMe not applied (%s); deploying at r = %d", ctx.node, err, tome_r(model))
    return tome_r(model)


def merge_tocom(ctx: StageContext, cfg: PruneConfig, model: VisionTransformer, structure: list[dict[str, list[int]]],
                inputs: dict[str, Manifest], r_src: int, r_tgt: int) -> dict[str, Any] | None:
    """Fold ToCom Delta(r_src -> r_tgt) into the q / v weights at the scale best on val; None without ToCom."""
    if "tocom" not in inputs or r_src == r_tgt:
        return None
    tocom_from = inputs["tocom"].outputs.get("backbone_key")
    task_from = inputs["backbone"].key if "backbone" in inputs else None
    if tocom_from != task_from:
        raise ValueError(f"ToCom {inputs['tocom'].key} was distilled on backbone {tocom_from}, "
                         f"the task model was fine-tuned from {task_from}")
    tocom = load_tocom(read_bytes(ctx.store, inputs["tocom"], "tocom.safetensors")).eval()
    uri, size = inputs["data"].outputs["uri"], cfg.finetune.backbone.img_size
    delta = (min(r_src, tocom.max_r), min(r_tgt, tocom.max_r))
    val = {}
    for scale in cfg.tocom_scales:
        candidate = merge_tocom_pruned(copy.deepcopy(model), tocom, structure, *delta, scale)
        val[scale] = accuracy(candidate, uri, "val", size)
    scale = max(cfg.tocom_scales, key=val.__getitem__)
    merge_tocom_pruned(model, tocom, structure, *delta, scale)
    return {"delta": list(delta), "scale": scale, "val_accuracy": val[scale]}


def run(ctx: StageContext, cfg: PruneConfig, inputs: dict[str, Manifest]) -> StageResult:
    """inputs: "model" (finetune), "data", optional "backbone" (pretrained encoder) and "tocom" (distill)."""
    ft, data = cfg.finetune, inputs["data"].outputs
    uri, size, r_src = data["uri"], ft.backbone.img_size, ft.tome_r
    peft = PEFT_METHODS[ft.method.name]
    baseline = load_task_model(ctx.store, ft, inputs)
    if peft.mergeable:
        peft.merge(baseline)
    baseline.requires_grad_(False).eval()

    recipe = Recipe(
        build_model=functools.partial(prunable, baseline, cfg.method, cfg.settings()),
        data=TensorBatches(functools.partial(_split, uri, "train", size), flip if ft.augment else None),
        loss=classification_loss,
    )
    started = time.perf_counter()
    result = fit(TrainJob(ctx.key, recipe, cfg.train, cfg.resources, ctx.train_storage, ctx.seed,
                          on_log=ctx.step_logger()))
    train_seconds = time.perf_counter() - started
    model = prunable(baseline, cfg.method, cfg.settings())
    model.load_state_dict(result.state, strict=False)
    structure = PRUNERS[cfg.method].convert(model)
    model.requires_grad_(False).eval()
    pruned_accuracy = accuracy(model, uri, "test", size)

    r_tgt = deploy_tome(ctx, model, cfg.tome_r)
    tome_accuracy = accuracy(model, uri, "test", size)
    tocom = merge_tocom(ctx, cfg, model, structure, inputs, r_src, r_tgt)

    before = {"test_accuracy": accuracy(baseline, uri, "test", size), **_cost(baseline, size)}
    after = {"test_accuracy": accuracy(model, uri, "test", size), **_cost(model, size)}
    speed = cpu_speed({"before": baseline, "after": model}, size, cfg.latency_repeats)
    before |= speed["before"]
    after |= speed["after"]

    task, method = ft.task, ft.method.name
    meta = {"task": task, "classes": data["classes"], "finetune_method": method, "pruner": cfg.method,
            "keep_ratio": cfg.keep_ratio, "head_keep_ratio": cfg.settings().heads_ratio, "structure": structure,
            "tocom": tocom, "preprocess": {"img_size": size, **PREPROCESS}}
    with tempfile.TemporaryDirectory() as d:
        export(model, d, meta, peft=None if peft.mergeable else (peft, ft.method.params))
        for name in ("model.safetensors", "model.json"):
            ctx.writer.put_file(f"deploy/{name}", str(Path(d) / name))
        metrics = {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}
        registered = ctx.register_model(f"{cfg.registry_prefix}-{task}-{method}-{cfg.method}", d,
                                        {k: f"{v:.6g}" for k, v in metrics.items()})

    metrics |= {
        "test_accuracy": after["test_accuracy"], "pruned_test_accuracy": pruned_accuracy,
        "tome_test_accuracy": tome_accuracy, "train_seconds": train_seconds,
        "params_ratio": after["params"] / before["params"], "flops_ratio": after["flops"] / before["flops"],
        "latency_ratio": after["latency_ms_b1"] / before["latency_ms_b1"],
        "throughput_ratio": after["throughput_b64"] / before["throughput_b64"],
        **{k: v for k, v in result.metrics.items() if k.startswith("final_")},
    }
    ctx.writer.put_json("history.json", result.history)
    outputs = {"task": task, "method": method, "pruner": cfg.method, "keep_ratio": cfg.keep_ratio,
               "merged": peft.mergeable, "r_src": r_src, "tome_r": r_tgt, "tocom": tocom,
               "widths": block_widths(model), "before": before, "after": after,
               "torch_threads": torch.get_num_threads(),
               "registered": None if registered is None else {"name": registered[0], "version": registered[1]}}
    return StageResult(metrics=metrics, outputs=outputs)
