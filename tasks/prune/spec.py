"""The prune stage's declaration: `stages.prune`, one node per chosen task model, outputs, the before/after table."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from vitpipe.cluster.config import Resources
from vitpipe.models.settings import TOCOM_SCALES, Pruner, PruneSettings
from vitpipe.tasks.config import Frozen, paper_train
from vitpipe.tasks.finetune.spec import FinetuneNode, downstream_inputs
from vitpipe.tasks.spec import Committed, Node, Outputs, Pipeline, Plan, PlanError, Section, StageSpec, format_table

UNFIT = ("chance", "slower")  # flags that withhold registration unless register_flagged


class PruneConfig(Frozen):
    """`stages.prune`: which fine-tuned models to prune, how, and how they are deployed."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)

    pruner: Pruner = "resrep"
    peft_methods: tuple[str, ...] | None = Field(None, description="fine-tuned models to prune; None: all")
    keep_ratio: float = Field(0.5, gt=0, le=1, description="fraction of MLP hidden units kept")
    head_keep_ratio: float | None = Field(None, gt=0, le=1, description="fraction of heads kept; None: keep_ratio")
    lam: float = Field(1e-4, gt=0, alias="lambda", description="ResRep group-lasso strength")
    criterion: Literal["saliency", "norm"] = Field(
        "saliency", description="ResRep: what chooses the forget set (models.prune.resrep.Compactor)")
    selection: Literal["layer", "global"] = Field(
        "layer", description="ResRep: the ratio kept in every block, or the same total chosen model-wide")
    centripetal: float = Field(3e-3, ge=0, description="C-SGD centripetal strength")
    train: paper_train(steps=100, lr=1e-3, warmup_steps=5, weight_decay=0.0)
    # ResRep's recovery: the converted, narrower model fine-tuned (every weight) on the task; null: none.
    recover: paper_train(optional=True, steps=100, lr=1e-4, warmup_steps=5, weight_decay=0.0)
    r_tgt: int = Field(0, ge=0, description="ToMe degree r_tgt of the deployed model")
    tocom_scales: tuple[Annotated[float, Field(gt=0)], ...] = Field(TOCOM_SCALES, min_length=1)
    resources: Resources = Resources()
    latency_repeats: int = Field(20, gt=0, description="timed forwards per model and batch size")
    registry_prefix: str = Field("vitpipe", description="registered models are named <prefix>-<task>-<method>-<pruner>")
    register_flagged: bool = Field(False, description="register a model flagged as unfit too: at chance on the "
                                   "test split, or slower than its unpruned parent at batch 1 and at batch 64")

    @model_validator(mode="after")
    def _resrep_options(self) -> PruneConfig:
        if self.selection == "global" and self.pruner != "resrep":
            raise ValueError(f"selection: global is ResRep's global selection; {self.pruner} prunes every block "
                             "at keep_ratio")
        return self

    def settings(self) -> PruneSettings:
        """The pruner's schedule runs over every training forward (micro-batches)."""
        return PruneSettings(keep_ratio=self.keep_ratio, head_keep_ratio=self.head_keep_ratio, lam=self.lam,
                             criterion=self.criterion, selection=self.selection,
                             steps=self.train.steps * self.train.grad_accum, centripetal=self.centripetal)


class PruneNode(PruneConfig):
    """One prune node: the stage config for the task model of one finetune node."""

    model: FinetuneNode

    @classmethod
    def of(cls, stage: PruneConfig, model: FinetuneNode) -> PruneNode:
        return cls(**{**dict(stage), "peft_methods": (model.method.name,)}, model=model)


class ModelCost(Frozen):
    """A model's test accuracy and costs: params, FLOPs, median CPU latency at batch 1, throughput at batch 64."""

    test_accuracy: float
    params: float
    flops: float
    latency_ms_b1: float
    throughput_b64: float


class MergedToCom(Frozen):
    delta: tuple[int, int] = Field(description="(source, target) degrees of the Delta folded into q / v")
    scale: float
    val_accuracy: float


class Registered(Frozen):
    name: str
    version: str


class PruneOutputs(Outputs):
    task: str
    method: str = Field(description="the PEFT method of the pruned task model")
    pruner: str
    keep_ratio: float
    merged: bool = Field(description="the PEFT delta was merged into the backbone")
    reprobed: bool
    recovered: bool
    reprobed_deployed: bool
    r_src: int
    r_tgt: int
    tocom: MergedToCom | None
    widths: tuple[dict[str, int], ...] = Field(description="per block: MLP hidden units and heads kept")
    before: ModelCost = Field(description="the merged, unpruned fine-tuned model")
    after: ModelCost = Field(description="the deployed model")
    torch_threads: int
    registered: Registered | None
    flags: dict[str, str] = Field(description="why a user might not keep it, by kind (tasks.prune.stage.flags)")


def declare(pipeline: Pipeline, plan: Plan) -> None:
    section = pipeline.stages.prune
    trained = [n.cfg.method.name for n in plan.of_kind("finetune")]
    for i, name in enumerate(section.peft_methods or ()):
        if name not in trained:
            raise PlanError(f"stages.prune.peft_methods[{i}]: {name!r} is not a stages.finetune method "
                            f"({', '.join(dict.fromkeys(trained))})")
    for finetuned in plan.of_kind("finetune"):
        if section.peft_methods is None or finetuned.cfg.method.name in section.peft_methods:
            name = finetuned.name.replace("finetune/", "prune/", 1)
            node = PruneNode.of(section, finetuned.cfg)
            plan.add(Node(name, "prune", node, deps=downstream_inputs(plan, finetuned)))


def summary(committed: list[Committed], pipeline: Pipeline) -> Section:
    """Per pruned model: accuracy, params, FLOPs, CPU latency (batch 1), throughput (batch 64), before -> after;
    then each flag, saying when it withheld the model from the registry."""
    if not committed:
        return Section()
    header = ["task", "method", "pruner", "keep", "r", "test acc", "params", "GFLOPs", "latency b1 ms",
              "img/s b64"]
    rows = []
    for p in (d.outputs for d in committed):
        b, a = p.before, p.after
        rows.append([p.task, p.method, p.pruner, f"{p.keep_ratio:g}", f"{p.r_src}->{p.r_tgt}",
                     f"{b.test_accuracy:.3f}->{a.test_accuracy:.3f}", f"{b.params / 1e6:.3f}M->{a.params / 1e6:.3f}M",
                     f"{b.flops / 1e9:.3f}->{a.flops / 1e9:.3f}", f"{b.latency_ms_b1:.2f}->{a.latency_ms_b1:.2f}",
                     f"{b.throughput_b64:.0f}->{a.throughput_b64:.0f}"])
    text = ("\npruned + merged models against the unpruned fine-tuned model (before -> after)\n"
            + format_table(header, rows) + "\n")
    for p in (d.outputs for d in committed):
        for kind, why in p.flags.items():
            withheld = kind in UNFIT and p.registered is None
            note = "; not registered (stages.prune.register_flagged: true registers it)" if withheld else ""
            text += f"flagged  {p.task}/{p.method}/{p.pruner}: {why}{note}\n"
    return Section(text)


SPEC = StageSpec(kind="prune", node=PruneNode, outputs=PruneOutputs, entry="vitpipe.tasks.prune.stage:run",
                 declare=declare, section=PruneConfig, summary=summary, headline=("test_accuracy",))
