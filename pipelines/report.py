"""The end-of-run summary: a node table, then each stage's own section (tasks/<stage>/spec.py), printed and
recorded in the parent MLflow run."""

from __future__ import annotations

import json
from typing import Any, TextIO

from vitpipe.tasks.spec import Committed, Pipeline, Section, format_table
from vitpipe.tasks.stages import STAGES


def committed(outcomes: list[Any], kind: str) -> list[Committed]:
    """A stage's nodes that have a manifest, with their typed outputs."""
    outputs = STAGES[kind].outputs
    return [Committed(o.node, outputs.of(o.manifest), o.manifest.metrics)
            for o in outcomes if o.node.kind == kind and o.manifest is not None]


def stage_sections(outcomes: list[Any], pipeline: Pipeline) -> list[Section]:
    return [spec.summary(committed(outcomes, kind), pipeline) for kind, spec in STAGES.items() if spec.summary]


def headline(o: Any) -> str:
    """A node's headline figure (its stage's first headline metric), or its error."""
    if o.manifest is not None:
        for name in STAGES[o.node.kind].headline:
            if name in o.manifest.metrics:
                return f"{o.manifest.metrics[name]:.4f}"
    return (o.error or "")[:60]


def print_summary(outcomes: list[Any], sections: list[Section], out: TextIO) -> None:
    rows = [[o.node.name, o.status, o.key[:12], f"{o.seconds:.1f}s" if o.status == "ran" else "-", headline(o)]
            for o in outcomes]
    out.write("\n" + format_table(["node", "status", "key", "time", "test acc / error"], rows) + "\n")
    for section in sections:
        out.write(section.text)
    cached = sum(o.status == "cached" for o in outcomes)
    if cached == len(outcomes):
        out.write(f"\nall {cached} nodes cached: nothing was trained.\n")
    else:
        ran = sum(o.status == "ran" for o in outcomes)
        failed = sum(o.status in ("failed", "skipped") for o in outcomes)
        out.write(f"\n{ran} ran, {cached} cached, {failed} failed or skipped.\n")
    out.flush()


def summary_artifacts(outcomes: list[Any], sections: list[Section]) -> tuple[dict[str, float], dict[str, bytes]]:
    """Parent-run metrics and artifacts: every section's, and summary.json (each node's status and metrics)."""
    nodes = [{"node": o.node.name, "status": o.status, "key": o.key, "seconds": round(o.seconds, 2),
              "metrics": o.manifest.metrics if o.manifest else {}, "error": o.error} for o in outcomes]
    metrics: dict[str, float] = {}
    artifacts = {"summary.json": json.dumps(nodes, indent=2).encode()}
    for section in sections:
        metrics |= section.metrics
        artifacts |= section.artifacts
    return metrics, artifacts
