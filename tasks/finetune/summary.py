"""The finetune stage's summary section: the task x method test accuracy table, its means, CSV and heat-map."""

from __future__ import annotations

import csv
import io
from statistics import fmean
from typing import Any

from vitpipe.tasks.spec import Committed, Pipeline, Section, format_table

Cells = dict[tuple[str, str], float]


def accuracy_table(committed: list[Committed]) -> tuple[list[str], list[str], Cells]:
    """(tasks, methods, {(task, method): test accuracy}) over the committed finetune nodes."""
    cells = {(d.outputs.task, d.outputs.method): d.metrics["test_accuracy"] for d in committed}
    tasks = list(dict.fromkeys(t for t, _ in cells))
    methods = list(dict.fromkeys(m for _, m in cells))
    return tasks, methods, cells


def group_means(committed: list[Committed], groups: dict[str, str | None]) -> dict[str, dict[str, float]]:
    """Per method: the mean over tasks, per task group, and (with groups) the papers' VTAB "mean",
    which averages the group means rather than the tasks."""
    tasks, methods, cells = accuracy_table(committed)
    out: dict[str, dict[str, float]] = {}
    for m in methods:
        done = [t for t in tasks if (t, m) in cells]
        row = {"mean": fmean([cells[(t, m)] for t in done])}
        named = sorted({groups.get(t) for t in done} - {None})
        for g in named:
            row[g] = fmean([cells[(t, m)] for t in done if groups.get(t) == g])
        if len(named) > 1:
            row["mean_of_groups"] = fmean([row[g] for g in named])
        out[m] = row
    return out


def heatmap_png(tasks: list[str], methods: list[str], cells: Cells) -> bytes:
    """Task x method test accuracy as a heat-map image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[cells.get((t, m), float("nan")) for m in methods] for t in tasks]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods), 1.0 + 0.45 * len(tasks)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8)
    fig.colorbar(image, ax=ax, label="test accuracy")
    ax.set_title("test accuracy (task x method)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _csv(tasks: list[str], methods: list[str], cells: Cells) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", *methods])
    for t in tasks:
        writer.writerow([t, *(cells.get((t, m), "") for m in methods)])
    return buf.getvalue().encode()


def summary(committed: list[Committed], pipeline: Pipeline) -> Section:
    """The table, the means per method (and per task group), and the parent run's metrics, CSV, heat-map and
    MLflow table."""
    tasks, methods, cells = accuracy_table(committed)
    if not cells:
        return Section()
    groups = {name: spec.group for name, spec in pipeline.tasks.items()}
    table = [[t, *(f"{cells[(t, m)]:.4f}" if (t, m) in cells else "-" for m in methods)] for t in tasks]
    text = "\ntest accuracy (task x method)\n" + format_table(["task", *methods], table) + "\n"
    means = group_means(committed, groups)
    stats = list(dict.fromkeys(k for row in means.values() for k in row))
    if len(stats) > 1:
        rows = [[stat, *(f"{means[m].get(stat, float('nan')):.4f}" for m in methods)] for stat in stats]
        text += "\n" + format_table(["mean over", *methods], rows) + "\n"
    columns: dict[str, list[Any]] = {"task": tasks, **{m: [cells.get((t, m)) for t in tasks] for m in methods}}
    return Section(
        text=text,
        metrics={f"{stat}_test_accuracy.{m}": v for m, row in means.items() for stat, v in row.items()},
        artifacts={"accuracy_table.csv": _csv(tasks, methods, cells),
                   "accuracy_heatmap.png": heatmap_png(tasks, methods, cells)},
        tables={"accuracy_table.json": columns},
    )
