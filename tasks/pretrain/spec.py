"""The pretrain stage's declaration: `stages.pretrain`, its node (on the corpus, probing every task), outputs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vitpipe.cluster.config import Resources
from vitpipe.models.settings import PretrainObjectiveConfig, ViTSpec
from vitpipe.tasks.config import Frozen, paper_train
from vitpipe.tasks.prepare.spec import corpus_node
from vitpipe.tasks.spec import Committed, Node, Outputs, Pipeline, Plan, Section, StageSpec

PROBE_PREFIX = "probe:"


class PretrainConfig(Frozen):
    """`stages.pretrain`: the objective, its optimisation (defaults = MAE/LocalMIM's) and the end-of-stage probe."""

    objective: PretrainObjectiveConfig = PretrainObjectiveConfig()
    train: paper_train(lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    resources: Resources = Resources()
    probe: bool = Field(True, description="linear-probe every downstream task at the end of pretraining")
    loader: Literal["ray_data", "memory"] = Field(
        "ray_data", description="ray_data: stream the corpus shards through Ray Data into each worker (any size); "
        "memory: decode it into every worker (small corpora; the same sample order for any worker count)")


class PretrainNode(PretrainConfig):
    """The pretrain node: the stage config on the pipeline's backbone, probing these tasks."""

    backbone: ViTSpec
    probe_tasks: tuple[str, ...] = Field((), description="downstream tasks for the end-of-stage linear probe")


class PretrainOutputs(Outputs):
    """The encoder's architecture and input size (its weights: encoder.safetensors)."""

    arch: str
    img_size: int


def declare(pipeline: Pipeline, plan: Plan) -> None:
    section = pipeline.stages.pretrain
    corpus = corpus_node(pipeline, plan, "pretrain")
    probes = tuple(pipeline.tasks) if section.probe else ()
    node = PretrainNode(**dict(section), backbone=pipeline.backbone, probe_tasks=probes)
    plan.add(Node("pretrain", "pretrain", node, deps={"corpus": corpus, **{PROBE_PREFIX + t: f"data/{t}"
                                                                           for t in probes}}))


def summary(committed: list[Committed], pipeline: Pipeline) -> Section:
    """Linear-probe test accuracy on the frozen encoder, pretrained against randomly initialised."""
    lines = []
    for done in committed:
        for task in done.node.cfg.probe_tasks:
            ours, random = done.metrics.get(f"probe_accuracy.{task}"), done.metrics.get(
                f"probe_accuracy_random_init.{task}")
            if ours is not None and random is not None:
                lines.append(f"  {task:<20} {random:.3f} -> {ours:.3f}  ({ours - random:+.3f})")
    if not lines:
        return Section()
    return Section("\nlinear probe on the frozen encoder, test accuracy (random init -> pretrained)\n"
                   + "\n".join(lines) + "\n")


SPEC = StageSpec(kind="pretrain", node=PretrainNode, outputs=PretrainOutputs, entry="vitpipe.tasks.pretrain.stage:run",
                 declare=declare, section=PretrainConfig, summary=summary)
