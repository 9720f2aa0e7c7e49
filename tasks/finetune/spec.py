"""The finetune stage's declaration: `stages.finetune`, one node per (task, method), outputs, accuracy table."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitpipe.cluster.config import Resources, TrainConfig
from vitpipe.models.settings import PEFT_SETTINGS, PeftConfig, ViTSpec
from vitpipe.tasks.config import Frozen
from vitpipe.tasks.finetune.summary import summary
from vitpipe.tasks.spec import Node, Outputs, Pipeline, Plan, StageSpec


class PeftMethodSpec(BaseModel):
    """A method entry of `stages.finetune.methods`: its registry name, an optional learning rate, and the
    method's own hyperparameters (validated by the method's settings class; defaults = the paper's)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    lr: float | None = Field(None, gt=0, description="overrides the stage's train.lr for this method")
    scale_grid: tuple[Annotated[float, Field(gt=0)], ...] | Literal["paper"] | None = Field(
        None, description="choose the method's scale s per task: one training per value, the best on val is kept; "
        "'paper': the grid its paper searches (models/settings.py: paper_scale_grid)")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known(self) -> PeftMethodSpec:
        if self.name not in PEFT_SETTINGS:
            raise ValueError(f"unknown fine-tuning method {self.name!r} (known: {', '.join(PEFT_SETTINGS)})")
        try:
            self.config()
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{self.name}: {where}: {first['msg']}") from None
        settings = PEFT_SETTINGS[self.name]
        if self.scale_grid is not None and "scale" not in settings.model_fields:
            raise ValueError(f"{self.name}: scale_grid: the method has no scale s")
        if self.scale_grid == "paper" and not settings.paper_scale_grid:
            raise ValueError(f"{self.name}: scale_grid: its paper publishes no grid; give the values")
        if self.scale_grid is not None and "scale" in self.params:
            raise ValueError(f"{self.name}: give scale or scale_grid, not both")
        return self

    def config(self) -> PeftConfig:
        return PEFT_SETTINGS[self.name](**self.params)

    @property
    def scales(self) -> tuple[float, ...]:
        """The values of s to choose from (empty: no choice, the settings' own s)."""
        if self.scale_grid == "paper":
            return PEFT_SETTINGS[self.name].paper_scale_grid
        return self.scale_grid or ()

    def with_settings(self, settings: dict[str, Any]) -> PeftMethodSpec:
        """This entry with the method's settings replaced (no scale to choose any more)."""
        return PeftMethodSpec(name=self.name, lr=self.lr, **settings)


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


class FinetuneOutputs(Outputs):
    """Which task model this is (its delta: delta.safetensors) and the method settings it was trained with."""

    task: str
    method: str = Field(description="the PEFT method")
    num_classes: int
    settings: dict[str, Any] = Field(description="the method's settings in effect (the chosen s, with scale_grid)")


def trained_node(node: FinetuneNode, outputs: FinetuneOutputs) -> FinetuneNode:
    """The finetune node as its task model was trained: the method's settings in effect (the chosen scale)."""
    return node.model_copy(update={"methods": (node.method.with_settings(outputs.settings),)})


def declare(pipeline: Pipeline, plan: Plan) -> None:
    section = pipeline.stages.finetune
    for task in pipeline.tasks:
        for method in section.methods:
            node = FinetuneNode.of(section, task, method, pipeline.backbone)
            plan.add(Node(f"finetune/{task}/{method.name}", "finetune", node,
                          deps={"data": f"data/{task}", **plan.backbone()}))


def downstream_inputs(plan: Plan, finetuned: Node) -> dict[str, str]:
    """What a stage that deploys a task model reads: the model, its task data, the backbone and the ToCom."""
    tocom = {"tocom": "distill"} if "distill" in plan.nodes else {}
    return {"model": finetuned.name, **finetuned.deps, **tocom}


SPEC = StageSpec(kind="finetune", node=FinetuneNode, outputs=FinetuneOutputs, entry="vitpipe.tasks.finetune.stage:run",
                 declare=declare, section=FinetuneConfig, on_by_default=True, summary=summary,
                 headline=("test_accuracy",))
