"""The evaluate stage's declaration: `stages.evaluate`, one node per ToMe-patchable task model, its rows."""

from __future__ import annotations

from statistics import fmean
from typing import Annotated

from pydantic import Field

from vitpipe.models.settings import PEFT_SETTINGS, TOCOM_SCALES
from vitpipe.tasks.config import Frozen
from vitpipe.tasks.finetune.spec import FinetuneNode, downstream_inputs
from vitpipe.tasks.spec import Committed, Node, Outputs, Pipeline, Plan, PlanError, Section, StageSpec, format_table


class EvaluateConfig(Frozen):
    """`stages.evaluate`: the deployment ToMe degrees r_tgt, and the ToCom scales s searched on val."""

    r_targets: tuple[Annotated[int, Field(ge=0)], ...] = Field((0, 2, 4, 8), min_length=1)
    tocom_scales: tuple[Annotated[float, Field(gt=0)], ...] = Field(TOCOM_SCALES, min_length=1)


class EvaluateNode(EvaluateConfig):
    """One evaluate node: the sweep, for the task model of one finetune node."""

    model: FinetuneNode


class DegreeRow(Frozen):
    """One deployment degree: test accuracy without ToCom, and with Delta(r_src -> r_tgt) at the s best on val."""

    r_tgt: int
    acc_without: float
    acc_with: float
    scale: float
    val_without: float
    val_with: float
    tocom_delta: tuple[int, int] = Field(description="the (source, target) degrees of the Delta plugged in")


class EvaluateOutputs(Outputs):
    task: str
    method: str = Field(description="the PEFT method")
    r_src: int
    rows: tuple[DegreeRow, ...]


def declare(pipeline: Pipeline, plan: Plan) -> None:
    """Only for task models whose blocks ToMe can patch (models.settings: `token_merging`)."""
    if "distill" not in plan.nodes:
        raise PlanError("stages.evaluate: it compares with and without ToCom: it needs stages.distill")
    section = pipeline.stages.evaluate
    for finetuned in plan.of_kind("finetune"):
        if PEFT_SETTINGS[finetuned.cfg.method.name].token_merging:
            node = EvaluateNode(**dict(section), model=finetuned.cfg)
            name = finetuned.name.replace("finetune/", "evaluate/", 1)
            plan.add(Node(name, "evaluate", node, deps=downstream_inputs(plan, finetuned), cpus=1.0))


def summary(committed: list[Committed], pipeline: Pipeline) -> Section:
    """Accuracy at each deployment ToMe degree, without -> with ToCom, one line per task model."""
    if not committed:
        return Section()
    degrees = [row.r_tgt for row in committed[0].outputs.rows]
    header = ["task", "method", "r_src", *(f"r={r}" for r in degrees), "mean gain"]
    rows = []
    for e in (d.outputs for d in committed):
        cells = [f"{r.acc_without:.3f}->{r.acc_with:.3f}" for r in e.rows]
        gains = [r.acc_with - r.acc_without for r in e.rows if r.r_tgt != e.r_src]
        rows.append([e.task, e.method, str(e.r_src), *cells, f"{fmean(gains):+.4f}" if gains else "-"])
    return Section("\ntest accuracy at deployment ToMe degree r (without -> with ToCom)\n"
                   + format_table(header, rows) + "\n")


SPEC = StageSpec(kind="evaluate", node=EvaluateNode, outputs=EvaluateOutputs, entry="vitpipe.tasks.evaluate.stage:run",
                 declare=declare, section=EvaluateConfig, summary=summary)
