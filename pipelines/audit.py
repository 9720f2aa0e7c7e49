"""`vitpipe audit RUN_ID`: the lineage of a finished run from MLflow, with every artifact re-verified."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from vitpipe.cluster.fs import redact
from vitpipe.cluster.manifest import load_manifest, verify_manifest
from vitpipe.cluster.store import StoreNotFound, open_store


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
    run_id: str  # the node's MLflow child run
    names: str = ""  # what the node's outputs name outside the store: its data source, its registered model


def outside_names(outputs: dict) -> str:
    """A data node's source, a prune node's registered model version (or that it was not registered)."""
    if "source" in outputs:
        return f"source {outputs['source']}"
    if "registered" in outputs:
        model = outputs["registered"]
        return f"registered models:/{model['name']}/{model['version']}" if model else "not registered"
    return ""


def audit(run_id: str, tracking_uri: str, store_uri: str | None = None
          ) -> tuple[dict[str, str], list[AuditRow], str]:
    """(parent tags, one row per node listing its checksum problems (none = ok), the store read). Reads only:
    a missing SQLite file or store folder is an AuditError, never created. `store_uri`: where the run's store
    is now, when it moved (default: the one the run recorded)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise AuditError(f"no MLflow database at {tracking_uri.removeprefix('sqlite:///')} (give --tracking-uri)")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        parent = client.get_run(run_id)
    except Exception:
        raise AuditError(f"{redact(tracking_uri)}: no run {run_id!r}") from None
    tags = parent.data.tags
    if "vitpipe.store" not in tags:
        raise AuditError(f"run {run_id} is not a vitpipe pipeline run (no vitpipe.store tag)")
    store_uri = store_uri or tags["vitpipe.store"]
    try:
        store = open_store(store_uri, create=False)
    except StoreNotFound:
        raise AuditError(f"store not found at {store_uri} (moved? give its place with --store)") from None
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
                             json.loads(t.get("vitpipe.upstream", "{}")), problems, child.info.run_id,
                             outside_names(manifest.outputs) if manifest else ""))
    return tags, rows, store.uri


def format_audit(run_id: str, tags: dict[str, str], rows: list[AuditRow], tracking_uri: str, store: str) -> str:
    lines = [f"run {run_id}: pipeline {tags.get('vitpipe.pipeline')}, commit {tags.get('vitpipe.git_commit')}, "
             f"code {tags.get('vitpipe.code_version')}", f"tracking {redact(tracking_uri)}; store {store}"]
    for r in rows:
        state = "ok" if not r.problems else "CORRUPT: " + "; ".join(r.problems)
        up = ", ".join(f"{role}={k[:12]}" for role, k in r.upstream.items()) or "-"
        names = f"  {r.names}" if r.names else ""
        lines.append(f"  {r.node:<36} {r.key[:12]}  run {r.run_id}  cached={r.cached:<3}  <- {up}  [{state}]{names}")
    bad = sum(bool(r.problems) for r in rows)
    lines.append(f"{len(rows)} nodes, {len(rows) - bad} verified, {bad} with problems")
    return "\n".join(lines)
