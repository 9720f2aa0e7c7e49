"""The `vitpipe` command line: data prepare, plan, run, audit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitpipe", description="ViT pre-train -> many compact task models.")
    sub = p.add_subparsers(dest="command", required=True)

    def pipeline_cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="pipeline YAML (default: demo)")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set stages.finetune.train.steps=50")
        return c

    pipeline_cmd("plan", "print the DAG with each node's key and cached/pending status")
    run = pipeline_cmd("run", "run the pipeline (cached nodes are reused)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")

    audit = sub.add_parser("audit", help="lineage of a finished run, with checksums re-verified")
    audit.add_argument("run_id")
    audit.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI, else the demo's)")

    table = sub.add_parser("peft-table", help="trainable parameters and stored delta size of every PEFT method")
    table.add_argument("--arch", default="vit_base_patch16_224", help="timm ViT name (architecture only)")
    table.add_argument("--json", action="store_true", help="print JSON instead of a table")

    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="write a source as Parquet shards")
    prep.add_argument("--source", required=True,
                      help="photos, digits, faces, textures, imagefolder:PATH, vtab1k:PATH")
    prep.add_argument("--out", required=True, help="local folder or s3://bucket/prefix")
    prep.add_argument("--seed", type=int, default=0)
    return p


def _load(args: argparse.Namespace):
    from pipelines.spec import load_config

    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"ray.address={args.address}")
    return load_config(args.config, tuple(overrides))


def cmd_plan(args: argparse.Namespace) -> int:
    from pipelines.runner import plan

    rows = plan(_load(args))
    for node, key, status in rows:
        deps = ", ".join(node.deps.values()) or "-"
        print(f"{status:<8} {node.name:<38} {key[:12]}  <- {deps}")
    pending = sum(s == "pending" for _, _, s in rows)
    print(f"{len(rows)} nodes: {len(rows) - pending} cached, {pending} pending")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.runner import run

    summary = run(_load(args))
    print(f"MLflow run {summary.run_id}; audit it with: vitpipe audit {summary.run_id}")
    return 0 if summary.ok else 1


def cmd_audit(args: argparse.Namespace) -> int:
    from pipelines.audit import audit, format_audit
    from pipelines.spec import load_config

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or load_config(DEFAULT_CONFIG).tracking
    tags, rows = audit(args.run_id, uri)
    print(format_audit(args.run_id, tags, rows))
    return 0 if all(not r.problems for r in rows) else 1


def cmd_data(args: argparse.Namespace) -> int:
    from tasks.data import prepare

    info = prepare(args.source, args.out, seed=args.seed)
    counts = ", ".join(f"{k} {v}" for k, v in info.counts.items())
    print(f"{info.uri}: {info.source}, {len(info.classes)} classes, {counts}; fingerprint {info.fingerprint}")
    return 0


def cmd_peft_table(args: argparse.Namespace) -> int:
    import json

    from models.peft.table import peft_table

    rows = peft_table(args.arch)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'method':<14} {'trainable (no head)':>20} {'delta bytes':>13}  mergeable")
    for r in rows:
        merges = "yes" if r["mergeable"] else "no"
        print(f"{r['method']:<14} {r['trainable_params']:>20,} {r['delta_bytes']:>13,}  {merges}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Domain errors become one line on stderr and exit code 2."""
    from cluster.store import StoreError
    from cluster.tracking import TrackingError
    from pipelines.audit import AuditError
    from pipelines.spec import ConfigError
    from tasks.data import DataError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    args = _parser().parse_args(argv)
    handlers = {"plan": cmd_plan, "run": cmd_run, "audit": cmd_audit, "data": cmd_data,
                "peft-table": cmd_peft_table}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, StoreError, TrackingError, AuditError) as err:
        print(f"vitpipe: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
