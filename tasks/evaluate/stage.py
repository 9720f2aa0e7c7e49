"""The evaluate stage: a task model fine-tuned at ToMe degree r_src, deployed at each r_tgt, with and without
ToCom (METHODS.md section 4, "Deployment").

Without ToCom the model simply runs at r_tgt; with ToCom, s * Delta(r_src -> r_tgt) is plugged into q and v,
s chosen on the validation split. At r_tgt = r_src, Delta is exactly zero, so both accuracies agree.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from timm.models.vision_transformer import VisionTransformer

from vitpipe.cluster.context import StageContext, StageResult
from vitpipe.cluster.manifest import Manifest, read_bytes
from vitpipe.models.settings import ViTSpec
from vitpipe.models.tocom import ToComPlug, load_tocom, plug, unplug
from vitpipe.models.tome import apply_tome, set_tome_r
from vitpipe.tasks.backbone import backbone_identity
from vitpipe.tasks.classification import accuracy
from vitpipe.tasks.distill.spec import DistillOutputs
from vitpipe.tasks.evaluate.spec import DegreeRow, EvaluateNode, EvaluateOutputs
from vitpipe.tasks.finetune.stage import load_task_model
from vitpipe.tasks.prepare.spec import DataOutputs


def evaluate_degree(model: VisionTransformer, state: ToComPlug, uri: str, size: int, r_src: int, r_tgt: int,
                    tocom_scales: tuple[float, ...]) -> DegreeRow:
    """One row: test accuracy at r_tgt without ToCom, and with Delta(r_src -> r_tgt) at the s best on val.

    Degrees above the ToCom's R use Delta up to R: it has no sub-plugins beyond (and when R was clamped to
    the token count, higher degrees are the same model anyway). Ties in val accuracy go to the first s, as at
    r_tgt = r_src, where Delta is zero and the row is the model without ToCom.
    """
    set_tome_r(model, r_tgt)
    state.enabled = False
    without, val_without = accuracy(model, uri, "test", size), accuracy(model, uri, "val", size)
    delta = min(r_src, state.tocom.max_r), min(r_tgt, state.tocom.max_r)
    if delta[0] == delta[1]:  # Delta(m -> m) is zero (models/tocom.py): with ToCom is this model, at every s
        return DegreeRow(r_tgt=r_tgt, acc_without=without, acc_with=without, scale=tocom_scales[0],
                         val_without=val_without, val_with=val_without, tocom_delta=delta)
    state.enabled = True
    state.source_r, state.target_r = delta
    val = {}
    for scale in tocom_scales:
        state.scale = scale
        val[scale] = accuracy(model, uri, "val", size)
    state.scale = max(tocom_scales, key=val.__getitem__)
    return DegreeRow(r_tgt=r_tgt, acc_without=without, acc_with=accuracy(model, uri, "test", size),
                     scale=state.scale, val_without=val_without, val_with=val[state.scale],
                     tocom_delta=(state.source_r, state.target_r))


def plot_accuracy(rows: list[DegreeRow], r_src: int, title: str) -> bytes:
    """PNG bytes: test accuracy vs r_tgt, with and without ToCom, r_src marked."""
    fig = Figure(figsize=(5.5, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    r = [row.r_tgt for row in rows]
    ax.plot(r, [row.acc_without for row in rows], "o-", label="ToMe only")
    ax.plot(r, [row.acc_with for row in rows], "s--", label="ToMe + ToCom")
    ax.axvline(r_src, color="grey", linestyle=":", label=f"fine-tuned at r = {r_src}")
    ax.set(xlabel="deployment ToMe degree r_tgt", ylabel="test accuracy", title=title)
    ax.set_xticks(r)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def check_backbones(ctx: StageContext, inputs: dict[str, Manifest], spec: ViTSpec) -> None:
    """The ToCom must come from the backbone the task model was fine-tuned from."""
    tocom_from = DistillOutputs.of(inputs["tocom"]).backbone_key
    task_from = backbone_identity(inputs, spec)
    if tocom_from != task_from:
        raise ValueError(f"ToCom {inputs['tocom'].key} was distilled on backbone {tocom_from}, "
                         f"the task model was fine-tuned from {task_from}")
    if task_from is None:
        ctx.log.warning("%s: random-init backbones: ToCom and the task model start from different weights",
                        ctx.node)


def run(ctx: StageContext, cfg: EvaluateNode, inputs: dict[str, Manifest]) -> StageResult:
    """inputs: "model" (finetune), "data", "tocom" (distill), optional "backbone" (the pretrained encoder)."""
    check_backbones(ctx, inputs, cfg.model.backbone)
    r_src, uri, size = cfg.model.r_src, DataOutputs.of(inputs["data"]).uri(ctx.store), cfg.model.backbone.img_size
    model = apply_tome(load_task_model(ctx.store, cfg.model, inputs, ctx.seed), r_src)
    tocom = load_tocom(read_bytes(ctx.store, inputs["tocom"], "tocom.safetensors")).eval()
    state = plug(model, tocom, 0, 0)
    rows = [evaluate_degree(model, state, uri, size, r_src, r_tgt, cfg.tocom_scales) for r_tgt in cfg.r_targets]
    unplug(model)

    task, method = cfg.model.task, cfg.model.method.name
    outputs = EvaluateOutputs(task=task, method=method, r_src=r_src, rows=tuple(rows))
    ctx.writer.put_json("eval.json", outputs.model_dump(mode="json"))
    png = plot_accuracy(rows, r_src, f"{task} / {method}: fine-tuned at r = {r_src}")
    ctx.writer.put_bytes("tome_tocom.png", png)
    ctx.log_artifact("tome_tocom.png", png)

    metrics = {}
    for row in rows:
        metrics[f"acc_r{row.r_tgt}"] = row.acc_without
        metrics[f"acc_tocom_r{row.r_tgt}"] = row.acc_with
    gains = [row.acc_with - row.acc_without for row in rows if row.r_tgt != r_src]
    if gains:
        metrics["tocom_gain_mean"] = sum(gains) / len(gains)
    return StageResult(metrics=metrics, outputs=outputs)
