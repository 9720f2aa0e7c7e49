"""The distill stage's declaration: `stages.distill`, its node (on the corpus and the backbone), outputs."""

from __future__ import annotations

from pydantic import Field

from vitpipe.cluster.config import Resources
from vitpipe.models.settings import ViTSpec
from vitpipe.tasks.config import Frozen, paper_train
from vitpipe.tasks.prepare.spec import corpus_node
from vitpipe.tasks.spec import Committed, Node, Outputs, Pipeline, Plan, Section, StageSpec


class DistillConfig(Frozen):
    """`stages.distill`: ToCom self-distillation on the corpus (METHODS.md 4; optimisation = the paper's)."""

    max_r: int = Field(16, ge=1, description="R, the largest ToMe degree ToCom covers")
    rho: int = Field(2, ge=1, description="hidden channels per degree step")
    tau: float = Field(1.0, gt=0)
    scale: float = Field(0.1, gt=0, description="s in q += s * Delta_q(x)")
    dropout: float = Field(0.1, ge=0, lt=1)
    train: paper_train(lr=2e-3, weight_decay=0.05)
    resources: Resources = Resources()
    heldout: int = Field(256, gt=0, description="corpus images held out for the KL report")


class DistillNode(DistillConfig):
    """The distill node: the stage config on the pipeline's backbone."""

    backbone: ViTSpec


class DistillOutputs(Outputs):
    """The trained ToCom's shape (tocom.safetensors) and the backbone it was distilled on."""

    max_r: int = Field(description="R after clamping to the backbone's token count")
    rho: int
    scale: float
    pairs: int = Field(description="degree pairs m != n of the held-out KL")
    backbone: str = Field(description="what the backbone started from (tasks.backbone.backbone_tag)")
    backbone_key: str | None = Field(description="identity of the backbone weights; None: random init")


def declare(pipeline: Pipeline, plan: Plan) -> None:
    node = DistillNode(**dict(pipeline.stages.distill), backbone=pipeline.backbone)
    corpus = corpus_node(pipeline, plan, "distill")
    plan.add(Node("distill", "distill", node, deps={"corpus": corpus, **plan.backbone()}))


def summary(committed: list[Committed], pipeline: Pipeline) -> Section:
    lines = [f"  held-out KL(teacher || student) over {d.outputs.pairs} degree pairs: "
             f"{d.metrics['heldout_kl_without']:.3g} without ToCom -> {d.metrics['heldout_kl_with']:.3g} with "
             f"(x{d.metrics['heldout_kl_ratio']:.3f})" for d in committed]
    return Section("\nToCom (distill)\n" + "\n".join(lines) + "\n") if lines else Section()


SPEC = StageSpec(kind="distill", node=DistillNode, outputs=DistillOutputs, entry="vitpipe.tasks.distill.stage:run",
                 declare=declare, section=DistillConfig, summary=summary)
