"""`vitpipe audit RUN_ID`: the lineage of a finished run from MLflow, with every artifact re-verified."""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from cluster.manifest import load_manifest, verify_manifest
from cluster.store import open_store


class AuditError(Exception):
    """The run cannot be audited (unknown run id, not a vitpipe parent run)."""


@dataclass
class AuditRow:
    node: str
    kind: str
    key: str
    cached: str
    upstream: dict[str, str]
    problems: list[str]


def audit(run_id: str, tracking_uri: str) -> tuple[dict[str, str], list[AuditRow]]:
    """(parent tags, one row per node) where each row lists the node's checksum problems (none = ok)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        parent = client.get_run(run_id)
    except Exception:
        raise AuditError(f"{tracking_uri}: no run {run_id!r}") from None
    tags = parent.data.tags
    if "vitpipe.store" not in tags:
        raise AuditError(f"run {run_id} is not a vitpipe pipeline run (no vitpipe.store tag)")
    store = open_store(tags["vitpipe.store"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                                  max_results=10_000)
    rows = []
    for child in sorted(children, key=lambda r: r.info.start_time):
        t = child.data.tags
        kind, key = t["vitpipe.stage.kind"], t["vitpipe.stage.key"]
        manifest = load_manifest(store, kind, key, verify=False)
        problems = ["manifest missing"] if manifest is None else verify_manifest(store, manifest)
        rows.append(AuditRow(t["vitpipe.node"], kind, key, t.get("vitpipe.cached", "?"),
                             json.loads(t.get("vitpipe.upstream", "{}")), problems))
    return tags, rows


def format_audit(run_id: str, tags: dict[str, str], rows: list[AuditRow]) -> str:
    lines = [f"run {run_id}: pipeline {tags.get('vitpipe.pipeline')}, commit {tags.get('vitpipe.git_commit')}, "
             f"code {tags.get('vitpipe.code_version')}", f"store {tags['vitpipe.store']}"]
    for r in rows:
        state = "ok" if not r.problems else "CORRUPT: " + "; ".join(r.problems)
        up = ", ".join(f"{role}={k[:12]}" for role, k in r.upstream.items()) or "-"
        lines.append(f"  {r.node:<36} {r.key[:12]}  cached={r.cached:<3}  <- {up}  [{state}]")
    bad = sum(bool(r.problems) for r in rows)
    lines.append(f"{len(rows)} nodes, {len(rows) - bad} verified, {bad} with problems")
    return "\n".join(lines)
