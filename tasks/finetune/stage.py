"""The finetune stage: one (task, PEFT method) pair, trained on the shared DeepSpeed/Ray Train loop.

The checkpoint is picked on the validation split; the stage stores only what the method trains
(for `linear` the head, for `full` everything) and reports test accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable

import torch
from torch import nn

from vitpipe.cluster.batches import TensorBatches
from vitpipe.cluster.context import Fitted, StageContext, StageResult
from vitpipe.cluster.manifest import Manifest, read_weights, weights_bytes
from vitpipe.cluster.store import ArtifactStore
from vitpipe.cluster.train import Recipe
from vitpipe.models.heads import fold_whitening
from vitpipe.models.peft import PEFT_METHODS
from vitpipe.models.tome import apply_tome
from vitpipe.tasks.backbone import BackboneWeights, backbone_identity, backbone_tag, starting_weights
from vitpipe.tasks.classification import accuracy, cached_split, classification_loss, features, flip, probed_head
from vitpipe.tasks.finetune.spec import FinetuneNode, FinetuneOutputs, trained_node
from vitpipe.tasks.prepare.spec import DataOutputs


def _backbone_model(cfg: FinetuneNode, num_classes: int, backbone: BackboneWeights | None, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = cfg.backbone.build(num_classes=num_classes)
    if backbone is not None:
        backbone.load_into(model, cfg.backbone.arch)
    return model


def build_model(cfg: FinetuneNode, num_classes: int, backbone: BackboneWeights | None, seed: int,
                head: nn.Module | None = None) -> nn.Module:
    """The task model: the backbone (starting weights when given), a new head (a copy of `head` when given),
    the method applied; head and method initialisation follow `seed`."""
    model = _backbone_model(cfg, num_classes, backbone, seed)
    if head is not None:
        model.head = copy.deepcopy(head)
    model = PEFT_METHODS[cfg.method.name].apply(model, cfg.method.config())
    return apply_tome(model, cfg.r_src) if cfg.r_src else model


_PROBED: dict[tuple, nn.Module] = {}  # this process's probed heads: a fan-out's methods on one task share one


def starting_head(cfg: FinetuneNode, num_classes: int, backbone: BackboneWeights | None, backbone_id: str | None,
                  seed: int, uri: str) -> nn.Module | None:
    """With head_init "probe": the head whitened and at the linear probe's optimum on the backbone's own train
    features (models/heads.py); None: timm's initialisation. It depends only on the backbone (`backbone_id`
    names it), the data and the seed, not on the method, so the fine-tune nodes of one task that run in one
    process compute it once."""
    if cfg.head_init != "probe":
        return None
    key = (backbone_id, cfg.backbone.model_dump_json(), num_classes, seed, uri)
    if key not in _PROBED:
        model = _backbone_model(cfg, num_classes, backbone, seed)
        if len(_PROBED) >= 8:  # small (a whitening and a Linear each); the oldest goes
            del _PROBED[next(iter(_PROBED))]
        _PROBED[key] = probed_head(model, *cached_split(uri, "train", cfg.backbone.img_size))
    return copy.deepcopy(_PROBED[key])


def load_task_model(store: ArtifactStore, cfg: FinetuneNode, inputs: dict[str, Manifest], seed: int) -> nn.Module:
    """The fine-tuned task model of a finetune node (`inputs`: its "model" manifest, its "data" manifest
    and the pipeline's "backbone" manifest when there is one), in eval mode, with the settings it was trained
    with (the chosen scale, when the node chose one)."""
    cfg = trained_node(cfg, FinetuneOutputs.of(inputs["model"]))
    backbone = starting_weights(store, inputs, cfg.backbone)
    model = build_model(cfg, len(DataOutputs.of(inputs["data"]).classes), backbone, seed)
    PEFT_METHODS[cfg.method.name].load_delta(model, read_weights(store, inputs["model"], "delta.safetensors"))
    return model.eval()


def _val_accuracy(uri: str, size: int, model: nn.Module) -> dict[str, float]:
    return {"val_accuracy": accuracy(model, uri, "val", size)}


def on_cached_features(cfg: FinetuneNode, train_images: int) -> bool:
    """Whether the node trains its head on the frozen backbone's features, computed once: for a head-only method
    (linear) whose training would see each image (each orientation, with flips) more than once. The same function
    of the same batches (flips pick the flipped image's features with the same coins), at the cost of one
    forward pass over the train and val splits instead of one per step."""
    train = cfg.effective_train
    views = train_images * (2 if cfg.augment else 1)
    return PEFT_METHODS[cfg.method.name].head_only and train.steps * train.batch_size > views


def _given(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tensors


def _flip_features(batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`flip` on cached features: (features, features of the flipped images, labels), the same coins."""
    f, f_flipped, y = batch
    coins = torch.rand(len(f), generator=gen) < 0.5
    return torch.where(coins[:, None], f_flipped, f), y


def _head_loss(head: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    f, y = batch
    logits = head(f)
    return nn.functional.cross_entropy(logits, y), {"train_accuracy": (logits.argmax(-1) == y).float().mean()}


def _head_val_accuracy(f: torch.Tensor, y: torch.Tensor, head: nn.Module) -> dict[str, float]:
    logits = head(f.to(next(head.parameters()).device)).cpu()
    return {"val_accuracy": float((logits.argmax(-1) == y).float().mean())}


def head_recipe(model: nn.Module, uri: str, size: int, augment: bool) -> Recipe:
    """The Recipe that trains `model.head` alone on `model`'s features of the train split (and of its flipped
    images with `augment`), picked on the val split's; the backbone runs once here, on a GPU when this process
    has one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = copy.deepcopy(model).to(device)
    x, y = cached_split(uri, "train", size)
    train = (features(backbone, x).cpu(), *([features(backbone, x.flip(-1)).cpu()] if augment else []), y)
    val_x, val_y = cached_split(uri, "val", size)
    return Recipe(
        build_model=functools.partial(copy.deepcopy, model.head),
        data=TensorBatches(functools.partial(_given, train), _flip_features if augment else None),
        loss=_head_loss,
        evaluate=functools.partial(_head_val_accuracy, features(backbone, val_x).cpu(), val_y),
        select_metric="val_accuracy",
    )


def with_scale(cfg: FinetuneNode, scale: float) -> FinetuneNode:
    settings = {**cfg.method.config().model_dump(mode="json"), "scale": scale}
    return cfg.model_copy(update={"methods": (cfg.method.with_settings(settings),)})


def choose_scale(cfg: FinetuneNode, fit: Callable[[FinetuneNode, str], Fitted]
                 ) -> tuple[FinetuneNode, Fitted, dict[str, float]]:
    """Train once per value of the method's scale grid and keep the model best on val (the first on a tie), as
    the FacT, Convpass and 1-bit adapter papers choose s per task; returns (its node, it, val accuracy per s)."""
    best: tuple[FinetuneNode, Fitted] | None = None
    tried = {}
    for i, scale in enumerate(cfg.method.scales):
        node = with_scale(cfg, scale)
        fitted = fit(node, f"scale{i}")
        tried[f"val_accuracy.scale_{scale:g}"] = fitted.metrics["val_accuracy"]
        if best is None or fitted.metrics["val_accuracy"] > best[1].metrics["val_accuracy"]:
            best = node, fitted
    return *best, tried


def run(ctx: StageContext, cfg: FinetuneNode, inputs: dict[str, Manifest]) -> StageResult:
    data = DataOutputs.of(inputs["data"])
    uri, num_classes, size = data.uri(ctx.store), len(data.classes), cfg.backbone.img_size
    backbone = starting_weights(ctx.store, inputs, cfg.backbone)
    ctx.set_tags({"vitpipe.backbone": backbone_tag(backbone)})
    train_split = functools.partial(cached_split, uri, "train", size)
    head = starting_head(cfg, num_classes, backbone, backbone_identity(inputs, cfg.backbone), ctx.seed, uri)

    def fit(node: FinetuneNode, phase: str | None = None) -> Fitted:
        if on_cached_features(node, len(train_split()[0])):
            model = build_model(node, num_classes, backbone, ctx.seed, head)
            fitted = ctx.fit(head_recipe(model, uri, size, node.augment), node.effective_train, node.resources,
                             phase=phase)
            model.head = fitted.model
            return dataclasses.replace(fitted, model=model)
        recipe = Recipe(
            build_model=functools.partial(build_model, node, num_classes, backbone, ctx.seed, head),
            data=TensorBatches(train_split, flip if node.augment else None),
            loss=classification_loss,
            evaluate=functools.partial(_val_accuracy, uri, size),
            select_metric="val_accuracy",
        )
        return ctx.fit(recipe, node.effective_train, node.resources, phase=phase)

    started, chosen = time.perf_counter(), {}
    if cfg.method.scales:
        cfg, fitted, tried = choose_scale(cfg, fit)
        chosen = {"scale": cfg.method.config().scale, **tried}
    else:
        fitted = fit(cfg)
    model = fitted.model
    model.head = fold_whitening(model.head)  # a plain Linear again: the delta fits a plain timm ViT
    method = PEFT_METHODS[cfg.method.name]
    delta = method.delta_state(model)
    metrics = {
        "test_accuracy": accuracy(model, uri, "test", size),
        "val_accuracy": fitted.metrics["val_accuracy"],  # the best checkpoint's: measured on these weights
        "trainable_params": float(sum(p.numel() for p in method.trainable_parameters(model).values())),
        "delta_bytes": float(method.delta_nbytes(delta)),
        "train_seconds": time.perf_counter() - started,
        **fitted.final, **fitted.best, **chosen,
    }
    ctx.put_logged("delta.safetensors", weights_bytes(delta, metadata={"method": cfg.method.name}))
    for name, data in method.adapter_files(delta, cfg.method.config()).items():
        ctx.log_artifact(f"peft_adapter/{name}", data)
    outputs = FinetuneOutputs(task=cfg.task, method=cfg.method.name, num_classes=num_classes,
                              settings=cfg.method.config().model_dump(mode="json"))
    return StageResult(metrics=metrics, outputs=outputs)
