"""The run summary: each stage's section (the task x method table, VTAB-style group means, heat-map) and the
node table, read through the stages' typed outputs."""

from __future__ import annotations

import io
from types import SimpleNamespace

from vitpipe.cluster.manifest import Manifest
from vitpipe.pipelines.report import print_summary, stage_sections, summary_artifacts
from vitpipe.pipelines.runner import NodeOutcome
from vitpipe.tasks.finetune.summary import group_means
from vitpipe.tasks.spec import Committed, Node

ACC = {("a", "linear"): 0.5, ("b", "linear"): 0.7, ("c", "linear"): 0.9, ("a", "lora"): 0.6}
GROUPS = {"a": "natural", "b": "natural", "c": "structured"}
PIPELINE = SimpleNamespace(tasks={t: SimpleNamespace(group=g) for t, g in GROUPS.items()})


def outcomes() -> list[NodeOutcome]:
    out = []
    for (task, method), acc in ACC.items():
        node = Node(f"finetune/{task}/{method}", "finetune", {})
        manifest = Manifest(kind="finetune", key="k" * 64, files={}, metrics={"test_accuracy": acc},
                            outputs={"task": task, "method": method, "num_classes": 2, "settings": {}},
                            mlflow_run_id=None, timings={}, created_at="2026-11-25T00:00:00Z")
        out.append(NodeOutcome(node, "k" * 64, "ran", 1.0, manifest))
    return out


def test_group_means_follow_the_papers_convention() -> None:
    done = [Committed(o.node, SimpleNamespace(**o.manifest.outputs), o.manifest.metrics) for o in outcomes()]
    means = group_means(done, GROUPS)
    assert means["linear"]["mean"] == (0.5 + 0.7 + 0.9) / 3
    assert means["linear"]["natural"] == 0.6 and means["linear"]["structured"] == 0.9
    assert means["linear"]["mean_of_groups"] == (0.6 + 0.9) / 2  # groups weigh equally, not tasks
    assert means["lora"] == {"mean": 0.6, "natural": 0.6}


def test_summary_prints_table_and_makes_a_png() -> None:
    buf = io.StringIO()
    sections = stage_sections(outcomes(), PIPELINE)
    print_summary(outcomes(), sections, buf)
    text = buf.getvalue()
    assert "test accuracy (task x method)" in text and "mean_of_groups" in text
    assert any(ln.startswith("finetune/a/lora ") and ln.rstrip().endswith(" 0.6000") for ln in text.splitlines())
    metrics, artifacts = summary_artifacts(outcomes(), sections)
    assert metrics["mean_of_groups_test_accuracy.linear"] == 0.75
    assert artifacts["accuracy_heatmap.png"].startswith(b"\x89PNG")
    assert artifacts["accuracy_table.csv"].decode().splitlines()[0] == "task,linear,lora"
    tables = [t for s in sections for t in s.tables.items()]
    assert tables == [("accuracy_table.json", {"task": ["a", "b", "c"], "linear": [0.5, 0.7, 0.9],
                                               "lora": [0.6, None, None]})]


def test_a_renamed_output_key_fails_where_it_is_read() -> None:
    bad = outcomes()[:1]
    bad[0].manifest.outputs.pop("task")
    try:
        stage_sections(bad, PIPELINE)
    except ValueError as err:  # pydantic's ValidationError: the finetune outputs lack "task"
        assert "task" in str(err) and "Field required" in str(err)
    else:
        raise AssertionError("outputs without 'task' were read")


def test_a_failed_nodes_error_is_its_whole_message_on_one_line() -> None:
    import pydantic

    from vitpipe.pipelines.runner import error_line

    class Small(pydantic.BaseModel):
        n: int

    try:
        Small(n="x")
    except pydantic.ValidationError as err:
        line = error_line(err)
    assert "\n" not in line and line.startswith("ValidationError: 1 validation error for Small | n | Input should")
    wrapped = RuntimeError("Traceback (most recent call last):\n  File x\nValueError: the root cause\n")
    assert error_line(wrapped) == "ValueError: the root cause"  # a Ray-wrapped worker traceback: its last raise
