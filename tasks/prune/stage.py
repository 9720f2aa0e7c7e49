"""The prune stage: one fine-tuned (task, PEFT method) model -> a pruned, merged, deployable model (METHODS.md 6).

The PEFT delta is merged into the backbone where the method is mergeable (else the branch is kept); ResRep or
C-SGD trains briefly on the task's train split through the shared loop, at the configured keep ratio, and folds
exactly into narrower layers. The head is refitted as a linear probe on the pruned features and, optionally, the
whole model fine-tuned to recover (ResRep's recovery), each kept only when better on val. The model is deployed
at the configured ToMe degree with ToCom Delta(r_src -> r_tgt) merged into its q / v weights (scale picked on
val), evaluated on test, exported with models.deploy and registered in MLflow's model registry. Accuracy, params,
FLOPs, CPU latency (batch 1) and throughput (batch 64) are reported before (the merged, unpruned fine-tuned
model) and after.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitpipe.cluster.batches import TensorBatches
from vitpipe.cluster.context import StageContext, StageResult
from vitpipe.cluster.manifest import Manifest, read_bytes
from vitpipe.cluster.train import Recipe
from vitpipe.models.deploy import export
from vitpipe.models.heads import fold_whitening
from vitpipe.models.peft import PEFT_METHODS
from vitpipe.models.prune import PRUNERS, block_widths, count_flops, count_params, merge_tocom_pruned
from vitpipe.models.settings import PruneSettings
from vitpipe.models.tocom import load_tocom
from vitpipe.models.tome import apply_tome, tome_r
from vitpipe.tasks.classification import accuracy, cached_split, classification_loss, flip, logits, probed_head
from vitpipe.tasks.evaluate.stage import check_backbones
from vitpipe.tasks.finetune.spec import FinetuneNode, FinetuneOutputs, trained_node
from vitpipe.tasks.finetune.stage import load_task_model
from vitpipe.tasks.prepare.spec import DataOutputs
from vitpipe.tasks.prune.spec import UNFIT, PruneNode, PruneOutputs

# tasks.classification.normalize maps uint8 x to x / 127.5 - 1, i.e. (x / 255 - 0.5) / 0.5 per channel.
PREPROCESS = {"input": "RGB, uint8 scaled to [0, 1]", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def prunable(baseline: nn.Module, pruner: str, settings: PruneSettings) -> nn.Module:
    """A copy of the fine-tuned model prepared for pruning, every parameter trainable (the Recipe's model)."""
    model = PRUNERS[pruner].prepare(copy.deepcopy(baseline), settings)
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


def merge_tocom(ctx: StageContext, cfg: PruneNode, model: VisionTransformer, structure: list[dict[str, list[int]]],
                inputs: dict[str, Manifest], r_src: int, r_tgt: int) -> dict[str, Any] | None:
    """Fold ToCom Delta(r_src -> r_tgt) into the q / v weights at the scale best on val; None without ToCom."""
    if "tocom" not in inputs or r_src == r_tgt:
        return None
    check_backbones(ctx, inputs, cfg.model.backbone)
    tocom = load_tocom(read_bytes(ctx.store, inputs["tocom"], "tocom.safetensors")).eval()
    uri, size = DataOutputs.of(inputs["data"]).uri(ctx.store), cfg.model.backbone.img_size
    delta = (min(r_src, tocom.max_r), min(r_tgt, tocom.max_r))
    val = {}
    for scale in cfg.tocom_scales:
        candidate = merge_tocom_pruned(copy.deepcopy(model), tocom, structure, *delta, scale)
        val[scale] = accuracy(candidate, uri, "val", size)
    scale = max(cfg.tocom_scales, key=val.__getitem__)
    merge_tocom_pruned(model, tocom, structure, *delta, scale)
    return {"delta": list(delta), "scale": scale, "val_accuracy": val[scale]}


def _task_data(cfg: PruneNode, uri: str, size: int) -> TensorBatches:
    return TensorBatches(functools.partial(cached_split, uri, "train", size), flip if cfg.model.augment else None)


def _val_accuracy(uri: str, size: int, model: nn.Module) -> dict[str, float]:
    return {"val_accuracy": accuracy(model, uri, "val", size)}


def merged_baseline(ctx: StageContext, ft: FinetuneNode, inputs: dict[str, Manifest]) -> nn.Module:
    """The fine-tuned task model, its PEFT delta merged into the backbone where the method allows it, frozen."""
    baseline = load_task_model(ctx.store, ft, inputs, ctx.seed)
    peft = PEFT_METHODS[ft.method.name]
    if peft.mergeable:
        peft.merge(baseline)
    return baseline.requires_grad_(False).eval()


def prune_and_convert(ctx: StageContext, cfg: PruneNode, baseline: nn.Module, uri: str, size: int
                      ) -> tuple[nn.Module, list[dict[str, list[int]]], dict[str, float]]:
    """Train the pruner's structure (compactors / centripetal clusters) on the task, then fold it into a
    narrower plain model; returns (pruned model, kept units per block, the training's and the conversion's
    metrics)."""
    recipe = Recipe(functools.partial(prunable, baseline, cfg.pruner, cfg.settings()), _task_data(cfg, uri, size),
                    classification_loss)
    fitted = ctx.fit(recipe, cfg.train, cfg.resources)
    model = fitted.model.requires_grad_(False).eval()
    trained = logits(model, uri, "val", size)
    structure = PRUNERS[cfg.pruner].convert(model)  # PruneError if training did not reach the structure
    diff = float((logits(model, uri, "val", size) - trained).abs().max())
    return model, structure, {**fitted.final, "convert_max_abs_diff": diff,
                              "convert_max_rel_diff": diff / float(trained.abs().max())}


def reprobe(model: nn.Module, uri: str, size: int) -> tuple[nn.Module, bool]:
    """The converted model's features are not the ones its head was fitted to: a new head at the linear
    probe's optimum on them (whitened, tasks.classification.probed_head), kept only if it is better on val;
    returns (model, whether the new head was kept). Measured on the demo's digits fact_tt model at keep 0.5:
    0.14 converted, 0.94 with the new head (0.905 unpruned)."""
    candidate = copy.deepcopy(model)
    candidate.head = probed_head(candidate, *cached_split(uri, "train", size))
    if accuracy(candidate, uri, "val", size) <= accuracy(model, uri, "val", size):
        return model, False
    return candidate, True


def trainable_copy(model: nn.Module) -> nn.Module:
    """The Recipe model of the recovery fine-tune: a copy of the pruned model, every weight trainable."""
    return copy.deepcopy(model).requires_grad_(True).train()


def recover(ctx: StageContext, cfg: PruneNode, pruned: nn.Module, uri: str, size: int) -> tuple[nn.Module, bool]:
    """ResRep's recovery: fine-tune the converted model on the task, keeping the checkpoint best on val, and
    only if it beats the converted model there; returns (model, whether the recovered weights were kept)."""
    if cfg.recover is None:
        return pruned, False
    recipe = Recipe(functools.partial(trainable_copy, pruned), _task_data(cfg, uri, size), classification_loss,
                    evaluate=functools.partial(_val_accuracy, uri, size), select_metric="val_accuracy")
    recovered = ctx.fit(recipe, cfg.recover, cfg.resources, phase="recover").model.requires_grad_(False).eval()
    if accuracy(recovered, uri, "val", size) < accuracy(pruned, uri, "val", size):
        return pruned, False
    return recovered, True


def compare(baseline: nn.Module, model: nn.Module, uri: str, size: int, repeats: int
            ) -> tuple[dict[str, float], dict[str, float]]:
    """Test accuracy, params, FLOPs, CPU latency and throughput of the unpruned and the deployed model."""
    before = {"test_accuracy": accuracy(baseline, uri, "test", size), **_cost(baseline, size)}
    after = {"test_accuracy": accuracy(model, uri, "test", size), **_cost(model, size)}
    speed = cpu_speed({"before": baseline, "after": model}, size, repeats)
    return before | speed["before"], after | speed["after"]


def flags(before: dict[str, float], after: dict[str, float], num_classes: int, n_test: int) -> dict[str, str]:
    """What makes the deployed model one a user would not keep, by kind: "chance" (test accuracy within two
    standard errors of guessing), "slower" (slower than its unpruned parent at batch 1 and at batch 64);
    "slower_b1" / "slower_b64" alone are worth a word but not withholding it (the other batch size gains)."""
    found = {}
    chance = 1 / num_classes
    bar = chance + 2 * math.sqrt(chance * (1 - chance) / n_test)
    if after["test_accuracy"] <= bar:
        found["chance"] = (f"test accuracy {after['test_accuracy']:.3f} is at chance ({chance:.3f} + 2 s.e. on "
                           f"{n_test} images = {bar:.3f})")
    latency = after["latency_ms_b1"] / before["latency_ms_b1"]
    throughput = after["throughput_b64"] / before["throughput_b64"]
    if latency > 1 and throughput < 1:
        found["slower"] = (f"slower than the unpruned model (latency b1 x{latency:.2f}, "
                           f"throughput b64 x{throughput:.2f})")
    elif latency > 1:
        found["slower_b1"] = f"slower at batch 1 (latency x{latency:.2f}), faster at batch 64 (x{throughput:.2f})"
    elif throughput < 1:
        found["slower_b64"] = f"slower at batch 64 (throughput x{throughput:.2f}), faster at batch 1"
    return found


def export_and_register(ctx: StageContext, cfg: PruneNode, model: nn.Module, meta: dict[str, Any],
                        tags: dict[str, float], flagged: dict[str, str], example: torch.Tensor
                        ) -> dict[str, str] | None:
    """Write the deployable export (models.deploy) to the stage output and register it in MLflow, unless it is
    flagged unfit (and the config does not register those too)."""
    ft = cfg.model
    peft = PEFT_METHODS[ft.method.name]
    ctx.set_tags({f"vitpipe.flag.{kind}": text for kind, text in flagged.items()})
    with tempfile.TemporaryDirectory() as d:
        export(model, d, meta, peft=None if peft.mergeable else (peft, ft.method.params))
        for name in ("model.safetensors", "model.json"):
            ctx.writer.put_file(f"deploy/{name}", str(Path(d) / name))
        if any(kind in UNFIT for kind in flagged) and not cfg.register_flagged:
            return None
        registered = ctx.register_model(f"{cfg.registry_prefix}-{ft.task}-{ft.method.name}-{cfg.pruner}", d,
                                        {k: f"{v:.6g}" for k, v in tags.items()},
                                        example.permute(0, 2, 3, 1).contiguous().numpy())  # (N, H, W, 3) uint8
    return None if registered is None else {"name": registered[0], "version": registered[1]}


def run(ctx: StageContext, cfg: PruneNode, inputs: dict[str, Manifest]) -> StageResult:
    """inputs: "model" (finetune), "data", optional "backbone" (pretrained encoder) and "tocom" (distill)."""
    # the task model as it was trained (with the scale its finetune node chose): what is merged and exported
    cfg = cfg.model_copy(update={"model": trained_node(cfg.model, FinetuneOutputs.of(inputs["model"]))})
    ft, data = cfg.model, DataOutputs.of(inputs["data"])
    uri, size, r_src = data.uri(ctx.store), ft.backbone.img_size, ft.r_src
    baseline = merged_baseline(ctx, ft, inputs)
    started = time.perf_counter()
    model, structure, trained = prune_and_convert(ctx, cfg, baseline, uri, size)
    pruned_accuracy = accuracy(model, uri, "test", size)
    model, reprobed = reprobe(model, uri, size)
    reprobed_accuracy = accuracy(model, uri, "test", size)
    model, recovered = recover(ctx, cfg, model, uri, size)
    model.head = fold_whitening(model.head)  # a plain timm ViT again, for ToMe, ToCom and export
    train_seconds = time.perf_counter() - started
    recovered_accuracy = accuracy(model, uri, "test", size)
    r_tgt = deploy_tome(ctx, model, cfg.r_tgt)
    tome_accuracy = accuracy(model, uri, "test", size)
    tocom = merge_tocom(ctx, cfg, model, structure, inputs, r_src, r_tgt)
    # ToMe (and ToCom) change the features once more: the head of the deployed model is refitted to them
    model, reprobed_deployed = reprobe(model, uri, size)
    model.head = fold_whitening(model.head)
    before, after = compare(baseline, model, uri, size, cfg.latency_repeats)

    metrics = {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}
    meta = {"task": ft.task, "classes": list(data.classes), "finetune_method": ft.method.name, "pruner": cfg.pruner,
            "keep_ratio": cfg.keep_ratio, "head_keep_ratio": cfg.settings().heads_ratio, "structure": structure,
            "tocom": tocom, "preprocess": {"img_size": size, **PREPROCESS}}
    flagged = flags(before, after, len(data.classes), len(cached_split(uri, "test", size)[1]))
    registered = export_and_register(ctx, cfg, model, meta, metrics, flagged, cached_split(uri, "test", size)[0][:2])
    metrics |= {
        "test_accuracy": after["test_accuracy"], "pruned_test_accuracy": pruned_accuracy,
        "reprobed_test_accuracy": reprobed_accuracy,
        "recovered_test_accuracy": recovered_accuracy, "tome_test_accuracy": tome_accuracy,
        "train_seconds": train_seconds,
        "params_ratio": after["params"] / before["params"], "flops_ratio": after["flops"] / before["flops"],
        "latency_ratio": after["latency_ms_b1"] / before["latency_ms_b1"],
        "throughput_ratio": after["throughput_b64"] / before["throughput_b64"],
        **trained,
    }
    outputs = PruneOutputs(task=ft.task, method=ft.method.name, pruner=cfg.pruner, keep_ratio=cfg.keep_ratio,
                           merged=PEFT_METHODS[ft.method.name].mergeable, reprobed=reprobed, recovered=recovered,
                           reprobed_deployed=reprobed_deployed, r_src=r_src, r_tgt=r_tgt, tocom=tocom,
                           widths=block_widths(model), before=before, after=after,
                           torch_threads=torch.get_num_threads(), registered=registered, flags=flagged)
    return StageResult(metrics=metrics, outputs=outputs)
