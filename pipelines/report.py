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


def _print_tocom(outcomes: list[Any], out: TextIO) -> None:
    """Accuracy at each deployment ToMe degree, without -> with ToCom, one line per task model."""
    evals = [o.manifest.outputs for o in outcomes if o.node.kind == "evaluate" and o.manifest is not None]
    if not evals:
        return
    degrees = [row["r_tgt"] for row in evals[0]["rows"]]
    header = ["task", "method", "r_src", *(f"r={r}" for r in degrees), "mean gain"]
    rows = []
    for e in evals:
        cells = [f"{r['acc_without']:.3f}->{r['acc_with']:.3f}" for r in e["rows"]]
        gains = [r["acc_with"] - r["acc_without"] for r in e["rows"] if r["r_tgt"] != e["r_src"]]
        rows.append([e["task"], e["method"], str(e["r_src"]), *cells, f"{_mean(gains):+.4f}" if gains else "-"])
    out.write("\ntest accuracy at deployment ToMe degree r (without -> with ToCom)\n"
              + _format_table(header, rows) + "\n")


def _print_prune(outcomes: list[Any], out: TextIO) -> None:
    """Per pruned model: accuracy, params, FLOPs, CPU latency (batch 1), throughput (batch 64), before -> after."""
    pruned = [o.manifest.outputs for o in outcomes if o.node.kind == "prune" and o.manifest is not None]
    if not pruned:
        return
    header = ["task", "method", "pruner", "keep", "r", "test acc", "params", "GFLOPs", "latency b1 ms",
              "img/s b64"]
    rows = []
    for p in pruned:
        b, a = p["before"], p["after"]
        rows.append([p["task"], p["method"], p["pruner"], f"{p['keep_ratio']:g}", f"{p['r_src']}->{p['r_tgt']}",
                     f"{b['test_accuracy']:.3f}->{a['test_accuracy']:.3f}", f"{b['params'] / 1e6:.3f}M->"
                     f"{a['params'] / 1e6:.3f}M", f"{b['flops'] / 1e9:.3f}->{a['flops'] / 1e9:.3f}",
                     f"{b['latency_ms_b1']:.2f}->{a['latency_ms_b1']:.2f}",
                     f"{b['throughput_b64']:.0f}->{a['throughput_b64']:.0f}"])
    out.write("\npruned + merged models against the unpruned fine-tuned model (before -> after)\n"
              + _format_table(header, rows) + "\n")
    for p in pruned:
        for kind, text in p.get("flags", {}).items():
            withheld = kind in ("chance", "slower") and p.get("registered") is None
            note = "; not registered (stages.prune.register_flagged: true registers it)" if withheld else ""
            out.write(f"flagged  {p['task']}/{p['method']}/{p['pruner']}: {text}{note}\n")


def print_summary(outcomes: list[Any], groups: dict[str, str | None], out: TextIO) -> None:
    rows = [[o.node.name, o.status, o.key[:12], f"{o.seconds:.1f}s" if o.status == "ran" else "-",
             _headline(o)] for o in outcomes]
    out.write("\n" + _format_table(["node", "status", "key", "time", "test acc / error"], rows) + "\n")
    tasks, methods, cells = accuracy_table(outcomes)
    if cells:
        table = [[t, *(f"{cells[(t, m)]:.4f}" if (t, m) in cells else "-" for m in methods)] for t in tasks]
        out.write("\ntest accuracy (task x method)\n" + _format_table(["task", *methods], table) + "\n")
        means = group_means(outcomes, groups)
        stats = list(dict.fromkeys(k for row in means.values() for k in row))
        if len(stats) > 1:
            rows = [[stat, *(f"{means[m].get(stat, float('nan')):.4f}" for m in methods)] for stat in stats]
            out.write("\n" + _format_table(["mean over", *methods], rows) + "\n")
    _print_tocom(outcomes, out)
    _print_prune(outcomes, out)
    cached = sum(o.status == "cached" for o in outcomes)
    if cached == len(outcomes):
        out.write(f"\nall {cached} nodes cached: nothing was trained.\n")
    else:
        ran = sum(o.status == "ran" for o in outcomes)
        failed = sum(o.status in ("failed", "skipped") for o in outcomes)
        out.write(f"\n{ran} ran, {cached} cached, {failed} failed or skipped.\n")
    out.flush()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def group_means(outcomes: list[Any], groups: dict[str, str | None]) -> dict[str, dict[str, float]]:
    """Per method: the mean over tasks, per task group, and (with groups) the papers' VTAB "mean",
    which averages the group means rather than the tasks."""
    tasks, methods, cells = accuracy_table(outcomes)
    out: dict[str, dict[str, float]] = {}
    for m in methods:
        done = [t for t in tasks if (t, m) in cells]
        row = {"mean": _mean([cells[(t, m)] for t in done])}
        named = sorted({groups.get(t) for t in done} - {None})
        for g in named:
            row[g] = _mean([cells[(t, m)] for t in done if groups.get(t) == g])
        if len(named) > 1:
            row["mean_of_groups"] = _mean([row[g] for g in named])
        out[m] = row
    return out


def heatmap_png(outcomes: list[Any]) -> bytes:
    """Task x method test accuracy as a heat-map image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, methods, cells = accuracy_table(outcomes)
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


def summary_artifacts(outcomes: list[Any], groups: dict[str, str | None]) -> tuple[dict[str, float], dict[str, bytes]]:
    """Parent-run metrics (mean accuracy per method and group) and artifacts (summary JSON, accuracy
    CSV, heat-map)."""
    tasks, methods, cells = accuracy_table(outcomes)
    metrics = {f"{stat}_test_accuracy.{m}": v
               for m, row in group_means(outcomes, groups).items() for stat, v in row.items()}
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
        artifacts["accuracy_heatmap.png"] = heatmap_png(outcomes)
    return metrics, artifacts
