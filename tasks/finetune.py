"""The finetune stage: one (task, method) pair, trained on the shared DeepSpeed/Ray Train loop.

The checkpoint is picked on the validation split; the stage stores only what the method trains
(for `linear` the head, for `full` everything) and reports test accuracy.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from cluster.context import StageContext, StageResult
from cluster.manifest import Manifest, read_weights
from cluster.store import ArtifactStore
from cluster.train import Recipe, Resources, TensorBatches, TrainConfig, TrainJob, fit
from models.peft import PEFT_METHODS, PeftConfig
from models.tome import apply_tome
from models.vit import ViTSpec
from tasks.data import load_split


class FinetuneMethod(BaseModel):
    """A method entry of the pipeline YAML: its registry name, an optional learning rate, and the
    method's own hyperparameters (validated by the method's config class; defaults = the paper's)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    lr: float | None = Field(None, gt=0, description="overrides the stage's train.lr for this method")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known(self) -> FinetuneMethod:
        if self.name not in PEFT_METHODS:
            raise ValueError(f"unknown fine-tuning method {self.name!r} (known: {', '.join(PEFT_METHODS)})")
        try:
            PEFT_METHODS[self.name].config(self.params)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{self.name}: {where}: {first['msg']}") from None
        return self

    def config(self) -> PeftConfig:
        return PEFT_METHODS[self.name].config(self.params)


class FinetuneConfig(BaseModel):
    """The validated config of one finetune node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str
    method: FinetuneMethod
    backbone: ViTSpec
    train: TrainConfig
    resources: Resources
    augment: bool = True
    tome_r: int = Field(0, ge=0, description="ToMe degree r the task model trains at (r_src)")


@functools.lru_cache(maxsize=8)
def _split(uri: str, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return load_split(uri, split, size)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def flip(batch: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator):
    """Random horizontal flip, one coin per image."""
    x, y = batch
    coins = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(coins[:, None, None, None], x.flip(-1), x), y


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    logits = model(normalize(x))
    accuracy = (logits.argmax(-1) == y).float().mean().item()
    return nn.functional.cross_entropy(logits, y), {"train_accuracy": accuracy}


@torch.no_grad()
def accuracy(model: nn.Module, uri: str, split: str, size: int, batch: int = 256) -> float:
    x, y = _split(uri, split, size)
    was_training = model.training
    model.eval()
    hits = sum(int((model(normalize(x[i:i + batch])).argmax(-1) == y[i:i + batch]).sum())
               for i in range(0, len(x), batch))
    model.train(was_training)
    return hits / len(x)


def _val_accuracy(uri: str, size: int, model: nn.Module) -> dict[str, float]:
    return {"val_accuracy": accuracy(model, uri, "val", size)}


def build_model(cfg: FinetuneConfig, num_classes: int, backbone: dict[str, torch.Tensor] | None) -> nn.Module:
    """The task model: the pipeline's backbone (pretrained when given), a new head, the method applied."""
    torch.manual_seed(0)
    model = cfg.backbone.build(num_classes=num_classes)
    if backbone is not None:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise ValueError(f"backbone does not fit {cfg.backbone.arch}: missing {missing}, "
                             f"unexpected {unexpected}")
    model = PEFT_METHODS[cfg.method.name].apply(model, cfg.method.config())
    return apply_tome(model, cfg.tome_r) if cfg.tome_r else model


def load_task_model(store: ArtifactStore, cfg: FinetuneConfig, inputs: dict[str, Manifest]) -> nn.Module:
    """The fine-tuned task model of a finetune node (`inputs`: its "model" manifest, its "data" manifest
    and the pipeline's "backbone" manifest when there is one), in eval mode."""
    backbone = None
    if "backbone" in inputs:
        backbone = read_weights(store, inputs["backbone"], "encoder.safetensors")
    model = build_model(cfg, len(inputs["data"].outputs["classes"]), backbone)
    PEFT_METHODS[cfg.method.name].load_delta(model, read_weights(store, inputs["model"], "delta.safetensors"))
    return model.eval()


def run(ctx: StageContext, cfg: FinetuneConfig, inputs: dict[str, Manifest]) -> StageResult:
    data = inputs["data"].outputs
    uri, num_classes, size = data["uri"], len(data["classes"]), cfg.backbone.img_size
    backbone = None
    if "backbone" in inputs:
        backbone = read_weights(ctx.store, inputs["backbone"], "encoder.safetensors")
    ctx.set_tags({"backbone": "pretrained" if backbone is not None else "random-init"})
    train = cfg.train if cfg.method.lr is None else cfg.train.model_copy(update={"lr": cfg.method.lr})
    recipe = Recipe(
        build_model=functools.partial(build_model, cfg, num_classes, backbone),
        data=TensorBatches(functools.partial(_split, uri, "train", size), flip if cfg.augment else None),
        loss=classification_loss,
        evaluate=functools.partial(_val_accuracy, uri, size),
        select_metric="val_accuracy",
    )
    started = time.perf_counter()
    result = fit(TrainJob(ctx.key, recipe, train, cfg.resources, ctx.train_storage, ctx.seed,
                          on_log=ctx.step_logger()))
    train_seconds = time.perf_counter() - started

    model = build_model(cfg, num_classes, backbone)
    model.load_state_dict(result.state, strict=False)
    method = PEFT_METHODS[cfg.method.name]
    delta = method.delta_state(model)
    metrics = {
        "test_accuracy": accuracy(model, uri, "test", size),
        "val_accuracy": accuracy(model, uri, "val", size),
        "trainable_params": float(sum(p.numel() for p in method.trainable_parameters(model).values())),
        "delta_bytes": float(method.delta_nbytes(delta)),
        "train_seconds": train_seconds,
        **{k: v for k, v in result.metrics.items() if k.startswith(("final_", "best_"))},
    }
    ctx.writer.put_weights("delta.safetensors", delta, metadata={"method": cfg.method.name})
    ctx.writer.put_json("history.json", result.history)
    return StageResult(metrics=metrics, outputs={"task": cfg.task, "method": cfg.method.name,
                                                 "num_classes": num_classes})


def summary_row(manifest: Manifest) -> dict[str, Any]:
    """One cell of the task x method accuracy table."""
    return {"task": manifest.outputs["task"], "method": manifest.outputs["method"],
            "test_accuracy": manifest.metrics.get("test_accuracy")}
