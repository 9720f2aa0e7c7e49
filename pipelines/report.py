"""The end-of-run summary: a node table and a task x method accuracy table, printed and logged."""

from __future__ import annotations

import csv
import io
import json
from typing import Any, TextIO


def accuracy_table(outcomes: list[Any]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(tasks, methods, {(task, method): test accuracy}) over the finetune nodes that have a manifest."""
    cells: dict[tuple[str, str], float] = {}
    for o in outcomes:
        if o.node.kind == "finetune" and o.manifest is not None:
            out = o.manifest.outputs
            cells[(out["task"], out["method"])] = o.manifest.metrics["test_accuracy"]
    tasks = list(dict.fromkeys(t for t, _ in cells))
    methods = list(dict.fromkeys(m for _, m in cells))
    return tasks, methods, cells


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _headline(o: Any) -> str:
    if o.manifest is not None and "test_accuracy" in o.manifest.metrics:
        return f"{o.manifest.metrics['test_accuracy']:.4f}"
    return (o.error or "")[:60]


def print_summary(outcomes: list[Any], out: TextIO) -> None:
    rows = [[o.node.name, o.status, o.key[:12], f"{o.seconds:.1f}s" if o.status == "ran" else "-",
             _headline(o)] for o in outcomes]
    out.write("\n" + _format_table(["node", "status", "key", "time", "test acc / error"], rows) + "\n")
    tasks, methods, cells = accuracy_table(outcomes)
    if cells:
        table = [[t, *(f"{cells[(t, m)]:.4f}" if (t, m) in cells else "-" for m in methods)] for t in tasks]
        out.write("\ntest accuracy (task x method)\n" + _format_table(["task", *methods], table) + "\n")
    cached = sum(o.status == "cached" for o in outcomes)
    if cached == len(outcomes):
        out.write(f"\nall {cached} nodes cached: nothing was trained.\n")
    else:
        ran = sum(o.status == "ran" for o in outcomes)
        failed = sum(o.status in ("failed", "skipped") for o in outcomes)
        out.write(f"\n{ran} ran, {cached} cached, {failed} failed or skipped.\n")
    out.flush()


def summary_artifacts(outcomes: list[Any]) -> tuple[dict[str, float], dict[str, bytes]]:
    """Parent-run metrics (mean accuracy per method) and artifacts (summary JSON, accuracy CSV)."""
    tasks, methods, cells = accuracy_table(outcomes)
    metrics = {}
    for m in methods:
        values = [cells[(t, m)] for t in tasks if (t, m) in cells]
        metrics[f"mean_test_accuracy.{m}"] = sum(values) / len(values)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", *methods])
    for t in tasks:
        writer.writerow([t, *(cells.get((t, m), "") for m in methods)])
    nodes = [{"node": o.node.name, "status": o.status, "key": o.key, "seconds": round(o.seconds, 2),
              "metrics": o.manifest.metrics if o.manifest else {}, "error": o.error} for o in outcomes]
    artifacts = {"summary.json": json.dumps(nodes, indent=2).encode()}
    if cells:
        artifacts["accuracy_table.csv"] = buf.getvalue().encode()
    return metrics, artifacts
