"""The pretrain stage: w_mim * LocalMIM + w_cl * (contrastive + InfoCL regularizer) on the unlabeled corpus.

Outputs the encoder (timm ViT weights, no head) and, separately, the objective's decoders and heads.
At the end a frozen-encoder linear probe on each downstream task is compared with the same probe on a
randomly initialised encoder, so a run shows whether pretraining helped.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from vitpipe.cluster.batches import StreamedBatches, TensorBatches
from vitpipe.cluster.context import StageContext, StageResult
from vitpipe.cluster.manifest import Manifest
from vitpipe.cluster.train import Recipe
from vitpipe.models.heads import probe_head
from vitpipe.models.pretrain_objectives import PretrainObjective
from vitpipe.models.settings import PretrainObjectiveConfig, ViTSpec
from vitpipe.tasks.augment import contrastive_view, mim_view
from vitpipe.tasks.backbone import BackboneWeights, backbone_tag, starting_weights
from vitpipe.tasks.classification import cached_split, features
from vitpipe.tasks.data import ray_dataset
from vitpipe.tasks.prepare.spec import DataOutputs
from vitpipe.tasks.pretrain.spec import PROBE_PREFIX, PretrainNode, PretrainOutputs


class PretrainModel(nn.Module):
    """The encoder and the objective's decoders/heads as one module, so one optimizer trains both."""

    def __init__(self, backbone: ViTSpec, objective: PretrainObjectiveConfig,
                 init: BackboneWeights | None = None) -> None:
        super().__init__()
        self.vit = backbone.build(num_classes=0)
        if init is not None:  # continued pretraining from `backbone.weights`
            init.load_into(self.vit, backbone.arch)
        self.objective = PretrainObjective(self.vit, objective)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(self.vit, view1, view2)


def two_views(contrastive: bool, batch: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator):
    """(uint8 images, labels) -> (view1, view2): SimCLR views when the contrastive branch is on (LocalMIM
    masks view1 itself), else one RandomResizedCrop + flip view, passed twice."""
    images, _ = batch
    if contrastive:
        return contrastive_view(images, gen), contrastive_view(images, gen)
    view = mim_view(images, gen)
    return view, view


def views_batch(batch: dict[str, np.ndarray], contrastive: bool) -> dict[str, np.ndarray]:
    """Ray Data map: decoded images -> their views, computed on Ray Data's CPUs instead of the training
    worker's ("view1", and "view2" when the contrastive branch is on). Fresh randomness per call, so every pass
    over the stream draws new views (not reproducible, like the stream's order)."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    view1, view2 = two_views(contrastive, (torch.from_numpy(batch["image"]), None), gen)
    return {"view1": view1.numpy(), "view2": view2.numpy()} if contrastive else {"view1": view1.numpy()}


def _one_view_twice(batch: tuple[torch.Tensor, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0], batch[0]  # LocalMIM masks view1 itself: without the contrastive branch both are one view


def streamed_views(corpus: str, size: int, contrastive: bool) -> tuple[StreamedBatches, dict[str, Any]]:
    """The recipe's data and the job's datasets for a corpus streamed through Ray Data, decoded and augmented
    there (see `views_batch`), so the training worker only trains."""
    dataset = ray_dataset(corpus, size, "train").map_batches(
        views_batch, batch_format="numpy", fn_kwargs={"contrastive": contrastive})
    if contrastive:
        return StreamedBatches("train", ("view1", "view2")), {"train": dataset}
    return StreamedBatches("train", ("view1",), _one_view_twice), {"train": dataset}


def pretrain_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    return model(*batch)


def linear_probe(vit: nn.Module, uri: str, size: int) -> float:
    """Test accuracy of a linear probe on frozen features: the one the finetune stage starts its heads at
    (models.heads.probe_head: ZCA whitening, then logistic regression at C = 1, fitted on the train split), so
    the figure is what the `linear` method of a task starts from.

    Not StandardScaler + sklearn's LogisticRegression: MIM features are badly conditioned, and per-dimension
    scaling left that probe 0.1-0.2 below the whitened one on digits (docs/decisions.md)."""
    x_train, y_train = cached_split(uri, "train", size)
    x_test, y_test = cached_split(uri, "test", size)
    train_features = features(vit, x_train)
    head = nn.Linear(train_features.shape[1], int(y_train.max()) + 1, device=train_features.device)
    head = probe_head(head, train_features, y_train)
    with torch.no_grad():
        return float((head(features(vit, x_test)).argmax(-1).cpu() == y_test).float().mean())


def run(ctx: StageContext, cfg: PretrainNode, inputs: dict[str, Manifest]) -> StageResult:
    corpus = DataOutputs.of(inputs["corpus"]).uri(ctx.store)
    size = cfg.backbone.img_size
    contrastive = cfg.objective.weights.get("infocl", 0) > 0
    if cfg.loader == "ray_data":
        data, datasets = streamed_views(corpus, size, contrastive)
    else:
        load = functools.partial(cached_split, corpus, "train", size)
        data, datasets = TensorBatches(load, functools.partial(two_views, contrastive)), {}
    init = starting_weights(ctx.store, {}, cfg.backbone)  # continued pretraining when backbone.weights is set
    recipe = Recipe(functools.partial(PretrainModel, cfg.backbone, cfg.objective, init), data, pretrain_loss)
    fitted = ctx.fit(recipe, cfg.train, cfg.resources, datasets=datasets)
    metrics = {"train_seconds": fitted.seconds, **fitted.final}
    model = fitted.model
    ctx.writer.put_weights("encoder.safetensors", model.vit.state_dict(), metadata={"arch": cfg.backbone.arch})
    ctx.writer.put_weights("decoders.safetensors", model.objective.state_dict())

    torch.manual_seed(ctx.seed)
    random_vit = cfg.backbone.build(num_classes=0)
    for role, manifest in inputs.items():
        if role.startswith(PROBE_PREFIX):
            task, uri = role.removeprefix(PROBE_PREFIX), DataOutputs.of(manifest).uri(ctx.store)
            metrics[f"probe_accuracy.{task}"] = linear_probe(model.vit, uri, size)
            metrics[f"probe_accuracy_random_init.{task}"] = linear_probe(random_vit, uri, size)
            if init is not None:
                metrics[f"probe_accuracy_start.{task}"] = linear_probe(PretrainModel(
                    cfg.backbone, cfg.objective, init).vit, uri, size)
    ctx.set_tags({"backbone": "pretrained-here", "vitpipe.backbone.start": backbone_tag(init),
                  "objective.weights": str(dict(cfg.objective.weights))})
    return StageResult(metrics=metrics, outputs=PretrainOutputs(arch=cfg.backbone.arch, img_size=size))
