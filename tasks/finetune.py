"""The finetune stage: one (task, PEFT method) pair, trained on the shared DeepSpeed/Ray Train loop.

The checkpoint is picked on the validation split; the stage stores only what the method trains
(for `linear` the head, for `full` everything) and reports test accuracy.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from cluster.batches import TensorBatches
from cluster.context import StageContext, StageResult
from cluster.manifest import Manifest, read_weights, weights_bytes
from cluster.store import ArtifactStore
from cluster.train import Recipe, Resources, TrainConfig
from models.heads import fold_whitening
from models.peft import PEFT_METHODS, PeftConfig
from models.tome import apply_tome
from models.vit import ViTSpec
from tasks.backbone import BackboneWeights, backbone_identity, backbone_tag, starting_weights
from tasks.classification import accuracy, cached_split, classification_loss, flip, probed_head
from tasks.config import Frozen


class PeftMethodSpec(BaseModel):
    """A method entry of `stages.finetune.methods`: its registry name, an optional learning rate, and the
    method's own hyperparameters (validated by the method's config class; defaults = the paper's)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    lr: float | None = Field(None, gt=0, description="overrides the stage's train.lr for this method")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known(self) -> PeftMethodSpec:
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


class FinetuneConfig(Frozen):
    """`stages.finetune`: the PEFT methods every task is fine-tuned with, and how."""

    methods: tuple[PeftMethodSpec, ...] = (PeftMethodSpec(name="linear"),)
    train: TrainConfig = TrainConfig()
    resources: Resources = Resources()
    r_src: int = Field(0, ge=0, description="ToMe degree r_src the task models train at")
    augment: bool = Field(True, description="random horizontal flips")
    head_init: Literal["probe", "random"] = Field(
        "probe", description="probe: whitened head input, head started at the linear probe's optimum (LP-FT); "
        "random: timm's initialisation")

    @field_validator("methods", mode="before")
    @classmethod
    def _names_to_specs(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [{"name": m} if isinstance(m, str) else m for m in value]
        return value


class FinetuneNode(FinetuneConfig):
    """One finetune node: the stage config narrowed to one task and one method, on the pipeline's backbone."""

    task: str
    backbone: ViTSpec

    @model_validator(mode="after")
    def _one_method(self) -> FinetuneNode:
        if len(self.methods) != 1:
            raise ValueError(f"a finetune node trains one method, got {len(self.methods)}")
        return self

    @classmethod
    def of(cls, stage: FinetuneConfig, task: str, method: PeftMethodSpec, backbone: ViTSpec) -> FinetuneNode:
        return cls(**{**dict(stage), "methods": (method,)}, task=task, backbone=backbone)

    @property
    def method(self) -> PeftMethodSpec:
        return self.methods[0]

    @property
    def effective_train(self) -> TrainConfig:
        """The stage's train settings with the method's own learning rate, when it has one."""
        return self.train if self.method.lr is None else self.train.model_copy(update={"lr": self.method.lr})

    def tracked_params(self) -> dict[str, Any]:
        """train.lr is the one in effect (the method's own, when it has one); the method entry keeps the rest."""
        params = super().tracked_params()
        params["train"] = self.effective_train.model_dump(mode="json")
        params["methods"] = [{k: v for k, v in m.items() if k != "lr"} for m in params["methods"]]
        return params


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
    and the pipeline's "backbone" manifest when there is one), in eval mode."""
    backbone = starting_weights(store, inputs, cfg.backbone)
    model = build_model(cfg, len(inputs["data"].outputs["classes"]), backbone, seed)
    PEFT_METHODS[cfg.method.name].load_delta(model, read_weights(store, inputs["model"], "delta.safetensors"))
    return model.eval()


def _val_accuracy(uri: str, size: int, model: nn.Module) -> dict[str, float]:
    return {"val_accuracy": accuracy(model, uri, "val", size)}


def run(ctx: StageContext, cfg: FinetuneNode, inputs: dict[str, Manifest]) -> StageResult:
    data = inputs["data"].outputs
    uri, num_classes, size = data["uri"], len(data["classes"]), cfg.backbone.img_size
    backbone = starting_weights(ctx.store, inputs, cfg.backbone)
    ctx.set_tags({"vitpipe.backbone": backbone_tag(backbone)})
    train_split = functools.partial(cached_split, uri, "train", size)
    head = starting_head(cfg, num_classes, backbone, backbone_identity(inputs, cfg.backbone), ctx.seed, uri)
    build = functools.partial(build_model, cfg, num_classes, backbone, ctx.seed, head)
    recipe = Recipe(
        build_model=build,
        data=TensorBatches(train_split, flip if cfg.augment else None),
        loss=classification_loss,
        evaluate=functools.partial(_val_accuracy, uri, size),
        select_metric="val_accuracy",
    )
    fitted = ctx.fit(recipe, cfg.effective_train, cfg.resources)
    model = fitted.model
    model.head = fold_whitening(model.head)  # a plain Linear again: the delta fits a plain timm ViT
    method = PEFT_METHODS[cfg.method.name]
    delta = method.delta_state(model)
    metrics = {
        "test_accuracy": accuracy(model, uri, "test", size),
        "val_accuracy": fitted.metrics["val_accuracy"],  # the best checkpoint's: measured on these weights
        "trainable_params": float(sum(p.numel() for p in method.trainable_parameters(model).values())),
        "delta_bytes": float(method.delta_nbytes(delta)),
        "train_seconds": fitted.seconds,
        **fitted.final, **fitted.best,
    }
    ctx.put_logged("delta.safetensors", weights_bytes(delta, metadata={"method": cfg.method.name}))
    for name, data in method.adapter_files(delta, cfg.method.config()).items():
        ctx.log_artifact(f"peft_adapter/{name}", data)
    return StageResult(metrics=metrics, outputs={"task": cfg.task, "method": cfg.method.name,
                                                 "num_classes": num_classes})
