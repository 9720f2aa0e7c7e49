"""The run summary: task x method table, VTAB-style group means, heat-map."""

from __future__ import annotations

import io

from cluster.manifest import Manifest
from pipelines.dag import Node
from pipelines.report import group_means, print_summary, summary_artifacts
from pipelines.runner import NodeOutcome

ACC = {("a", "linear"): 0.5, ("b", "linear"): 0.7, ("c", "linear"): 0.9, ("a", "lora"): 0.6}
GROUPS = {"a": "natural", "b": "natural", "c": "structured"}


def outcomes() -> list[NodeOutcome]:
    out = []
    for (task, method), acc in ACC.items():
        node = Node(f"finetune/{task}/{method}", "finetune", {})
        manifest = Manifest(kind="finetune", key="k" * 64, files={}, metrics={"test_accuracy": acc},
                            outputs={"task": task, "method": method}, mlflow_run_id=None, timings={},
                            created_at="2026-11-25T00:00:00Z")
        out.append(NodeOutcome(node, "k" * 64, "ran", 1.0, manifest))
    return out


def test_group_means_follow_the_papers_convention() -> None:
    means = group_means(outcomes(), GROUPS)
    assert means["linear"]["mean"] == (0.5 + 0.7 + 0.9) / 3
    assert means["linear"]["natural"] == 0.6 and means["linear"]["structured"] == 0.9
    assert means["linear"]["mean_of_groups"] == (0.6 + 0.9) / 2  # groups weigh equally, not tasks
    assert means["lora"] == {"mean": 0.6, "natural": 0.6}


def test_summary_prints_table_and_makes_a_png() -> None:
    buf = io.StringIO()
    print_summary(outcomes(), GROUPS, buf)
    text = buf.getvalue()
    assert "test accuracy (task x method)" in text and "mean_of_groups" in text
    metrics, artifacts = summary_artifacts(outcomes(), GROUPS)
    assert metrics["mean_of_groups_test_accuracy.linear"] == 0.75
    assert artifacts["accuracy_heatmap.png"].startswith(b"\x89PNG")
    assert artifacts["accuracy_table.csv"].decode().splitlines()[0] == "task,linear,lora"
