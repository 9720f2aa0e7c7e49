"""The `vitpipe` command line: data prepare, plan, run, submit/status/logs (Ray Jobs), audit, weights inspect."""

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

    submit = pipeline_cmd("submit", "run the pipeline on a Ray cluster as a Ray Job")
    submit.add_argument("--address", help="the cluster's Ray dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    submit.add_argument("--wait", action="store_true", help="stream the job's output; exit 1 if the job fails")
    submit.add_argument("--runtime-env", choices=("image", "pip"),
                        help="image: the nodes already have vitpipe's dependencies; pip: Ray installs them per "
                             "job (default: the config's submit.runtime_env, else image)")
    submit.add_argument("--env", dest="env_names", action="append", default=[], metavar="NAME",
                        help="also forward this environment variable to the job (its value is never printed)")
    for name, what in (("status", "Ray Jobs on the cluster, or one job's status"),
                       ("logs", "a job's output (the pipeline driver's console)")):
        c = sub.add_parser(name, help=what)
        c.add_argument("job", nargs="?" if name == "status" else None, help="job id printed by submit")
        c.add_argument("--address", help="the cluster's Ray dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    logs = sub.choices["logs"]
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit 1 if it failed")

    audit = sub.add_parser("audit", help="lineage of a finished run, with checksums re-verified")
    audit.add_argument("run_id")
    audit.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI, else the demo's)")
    audit.add_argument("--store", help="the run's artifact store, if it moved (default: the one the run recorded)")

    move = sub.add_parser("relocate", help="after moving or copying a work_dir: point its MLflow records into it")
    move.add_argument("work_dir", help="the work folder where it is now (holding mlflow.db)")

    table = sub.add_parser("peft-table", help="trainable parameters and stored delta size of every PEFT method")
    table.add_argument("--arch", default="vit_base_patch16_224", help="timm ViT name (architecture only)")
    table.add_argument("--json", action="store_true", help="print JSON instead of a table")

    weights = sub.add_parser("weights", help="pretrained backbone weights")
    weights_sub = weights.add_subparsers(dest="weights_command", required=True)
    inspect = weights_sub.add_parser("inspect", help="how a checkpoint's keys fit a ViT, and its sha256")
    inspect.add_argument("source", help="a .safetensors/.pth path, s3://bucket/key, or timm:ARCH.TAG")
    inspect.add_argument("--arch", required=True, help="timm ViT name of the backbone to fit")
    inspect.add_argument("--img-size", type=int, help="input size of the backbone (default: the arch's)")

    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="write a source as Parquet shards")
    prep.add_argument("--source", required=True,
                      help="photos, digits, faces, textures, imagefolder:PATH, vtab1k:PATH")
    prep.add_argument("--out", required=True, help="local folder or s3://bucket/prefix")
    prep.add_argument("--seed", type=int, default=0)
    folder = data_sub.add_parser("imagefolder", help="write a bundled labeled dataset as a folder of JPEGs")
    folder.add_argument("--source", default="textures", help="digits, faces or textures (default: textures)")
    folder.add_argument("--out", required=True, help="folder to create, one sub-folder per class")
    folder.add_argument("--per-class", type=int, help="at most this many images per class")
    folder.add_argument("--seed", type=int, default=0)
    return p


def _load(args: argparse.Namespace):
    from vitpipe.pipelines.spec import load_config

    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"ray.address={args.address}")
    return _environment_defaults(load_config(args.config, tuple(overrides)))


def _environment_defaults(cfg):
    """A YAML without `store:` / `tracking_uri:` takes VITPIPE_STORE / MLFLOW_TRACKING_URI from the
    environment: how a cluster's nodes (ray_cluster.yaml) name their S3 prefix and MLflow server."""
    update = {field: os.environ[name] for field, name in (("store", "VITPIPE_STORE"),
                                                          ("tracking_uri", "MLFLOW_TRACKING_URI"))
              if getattr(cfg, field) is None and os.environ.get(name)}
    return cfg.model_copy(update=update) if update else cfg


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = _load(args)  # a bad config fails here, before the heavy imports (torch, Ray, MLflow)
    from vitpipe.cluster.fs import redact
    from vitpipe.pipelines.dag import plan

    rows = plan(cfg)
    store = cfg.store_uri if "://" in cfg.store_uri else os.path.abspath(cfg.store_uri)
    print(f"store {store}; tracking {redact(cfg.tracking)}")
    for node, key, status in rows:
        deps = ", ".join(node.deps.values()) or "-"
        print(f"{status:<8} {node.name:<38} {key[:12]}  <- {deps}")
    pending = sum(s == "pending" for _, _, s in rows)
    print(f"{len(rows)} nodes: {len(rows) - pending} cached, {pending} pending")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)  # a bad config fails here, before the heavy imports (torch, Ray, MLflow)
    from vitpipe.cluster.fs import redact
    from vitpipe.pipelines.runner import run
    from vitpipe.pipelines.spec import load_config

    summary = run(cfg)
    # audit's default tracking URI is the default config's; name this run's when it is another one
    where = "" if cfg.tracking == load_config(DEFAULT_CONFIG).tracking else f" --tracking-uri {redact(cfg.tracking)}"
    print(f"MLflow run {summary.run_id}; audit it with: vitpipe audit {summary.run_id}{where}")
    return 0 if summary.ok else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from vitpipe.cluster.provenance import PACKAGE_ROOT, git_commit
    from vitpipe.cluster.submit import cluster_warnings, connect, job_spec, staged_project, submit
    from vitpipe.pipelines.spec import load_config

    cfg = _environment_defaults(load_config(args.config, tuple(args.overrides)))  # fails here, not on the cluster
    settings = cfg.submit.model_copy(update={"runtime_env": args.runtime_env or cfg.submit.runtime_env})
    for note in cluster_warnings(cfg.store, cfg.tracking_uri):
        print(f"vitpipe: warning: {note}", file=sys.stderr)
    commit = git_commit(PACKAGE_ROOT)
    spec = job_spec(Path(args.config).name, cfg.name, tuple(args.overrides), settings, os.environ,
                    tuple(args.env_names), commit)
    client = connect(args.address)
    with staged_project(PACKAGE_ROOT, Path(args.config), commit, settings.excludes) as working_dir:
        job_id = submit(client, spec, working_dir, {n: os.environ[n] for n in spec.forwarded})
    hint = f" --address {args.address}" if args.address else ""
    print(f"submitted Ray job {job_id} ({cfg.name!r}, runtime_env {settings.runtime_env}) to {client.get_address()}")
    if spec.forwarded:
        print(f"  environment forwarded: {', '.join(spec.forwarded)} (values not shown)")
    print(f"  follow it:  vitpipe logs {job_id}{hint} --follow   (or: ray job logs -f {job_id}{hint})")
    print(f"  status:     vitpipe status {job_id}{hint}")
    return _follow(client, job_id, hint) if args.wait else 0


def _follow(client, job_id: str, hint: str) -> int:
    """Stream a job's output until it ends; 0 if it succeeded, 1 if it failed or was stopped."""
    from vitpipe.cluster.submit import print_logs, wait_until_done

    try:
        print_logs(client, job_id, sys.stdout, follow=True)
    except KeyboardInterrupt:
        print(f"\nvitpipe: stopped following; job {job_id} keeps running (vitpipe logs {job_id}{hint} -f)",
              file=sys.stderr)
        return 130
    info = wait_until_done(client, job_id)
    detail = f": {info.message}" if str(info.status) != "SUCCEEDED" and info.message else ""
    print(f"vitpipe: job {job_id} {info.status}{detail}")
    return 0 if str(info.status) == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from datetime import datetime

    from vitpipe.cluster.submit import connect, job_info, list_jobs

    def when(ms: int | None) -> str:
        return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"

    client = connect(args.address)
    if args.job:
        info = job_info(client, args.job)
        print(f"{args.job}: {info.status}" + (f" ({info.message})" if info.message else ""))
        metadata, env = info.metadata or {}, (info.runtime_env or {}).get("env_vars") or {}
        commit = metadata.get("vitpipe.git_commit") or "-"
        print(f"  pipeline:   {metadata.get('vitpipe.pipeline', '-')}  (commit {commit})")
        print(f"  started:    {when(info.start_time)}   ended: {when(info.end_time)}")
        print(f"  entrypoint: {info.entrypoint}")
        print(f"  env:        {', '.join(sorted(env)) or '-'}  (values not shown)")
        return 0
    jobs = list_jobs(client)
    print(f"{'job':<44} {'status':<10} {'started':<19}  pipeline")
    for job in jobs:
        job_id = job.submission_id or job.job_id or "-"
        pipeline = (job.metadata or {}).get("vitpipe.pipeline", "-")
        print(f"{job_id:<44} {job.status!s:<10} {when(job.start_time):<19}  {pipeline}")
    print(f"{len(jobs)} jobs at {client.get_address()}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from vitpipe.cluster.submit import connect, print_logs

    client = connect(args.address)
    if args.follow:
        return _follow(client, args.job, f" --address {args.address}" if args.address else "")
    print_logs(client, args.job, sys.stdout)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from vitpipe.pipelines.audit import audit, format_audit
    from vitpipe.pipelines.spec import load_config

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or load_config(DEFAULT_CONFIG).tracking
    tags, rows, store = audit(args.run_id, uri, args.store)
    print(format_audit(args.run_id, tags, rows, uri, store))
    return 0 if all(not r.problems for r in rows) else 1


def cmd_relocate(args: argparse.Namespace) -> int:
    from vitpipe.pipelines.relocate import relocate

    moved = relocate(args.work_dir)
    if not moved.old:
        print(f"{moved.new}: MLflow's records already point here")
    else:
        print(f"{moved.new}: {moved.rows} MLflow records now point here (were under {', '.join(moved.old)})")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from vitpipe.tasks.data import DataError, prepare, resolve_source

    if args.data_command == "imagefolder":
        from vitpipe.tasks.data.bundled import write_imagefolder

        data = resolve_source(args.source)(args.seed)
        if not data.classes:
            raise DataError(f"--source {args.source}: unlabeled, an ImageFolder needs classes")
        counts = write_imagefolder(data, args.out, args.per_class)
        print(f"{args.out}: {', '.join(f'{cls} {n}' for cls, n in counts.items())} JPEGs")
        return 0
    try:
        info = prepare(args.source, args.out, seed=args.seed)
    except OSError as err:  # pyarrow: S3 unreachable or refusing, disk full, no permission
        raise DataError(f"--out {args.out}: cannot write the shards: {str(err).splitlines()[0]}") from None
    counts = ", ".join(f"{k} {v}" for k, v in info.counts.items())
    print(f"{info.uri}: {info.source}, {len(info.classes)} classes, {counts}; fingerprint {info.fingerprint}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """Counts of matched/missing/unexpected/... keys and the sha256; exit 1 when the weights do not fit."""
    import timm

    from vitpipe.cluster.weights import read_weights_source
    from vitpipe.models.vit import build_vit
    from vitpipe.models.weights import WeightsError, adapt_state_dict

    if not timm.is_model(args.arch):
        raise WeightsError(f"--arch {args.arch}: not a timm model name")
    try:
        model = build_vit(args.arch, img_size=args.img_size)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"--arch {args.arch}: {e}") from e
    state, sha = read_weights_source(args.source)
    _, report = adapt_state_dict(state, model)
    print(f"{args.source} -> {args.arch}: {report.summary()}")
    for kind in ("missing", "unexpected", "mismatched", "dropped", "resampled", "renamed"):
        for key in getattr(report, kind):
            print(f"  {kind:<10} {key}")
    print(f"sha256 {sha}")
    return 0 if report.ok else 1


def cmd_peft_table(args: argparse.Namespace) -> int:
    import json

    from vitpipe.models.peft.table import peft_table

    rows = peft_table(args.arch)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'method':<14} {'trainable (no head)':>20} {'delta bytes':>13}  mergeable")
    for r in rows:
        merges = "yes" if r["mergeable"] else "no"
        print(f"{r['method']:<14} {r['trainable_params']:>20,} {r['delta_bytes']:>13,}  {merges}")
    return 0


# Errors that mean bad input or an unreachable service: one line on stderr and exit code 2, no traceback.
DOMAIN_ERRORS = tuple((f"vitpipe.{module}", name) for module, name in (
    ("cluster.store", "StoreError"), ("cluster.retry", "DiskFull"), ("cluster.submit", "SubmitError"),
    ("cluster.tracking", "TrackingError"), ("pipelines.audit", "AuditError"), ("pipelines.spec", "ConfigError"),
    ("tasks.data", "DataError"), ("models.weights", "WeightsError"), ("pipelines.relocate", "RelocateError")))


def _is_domain_error(err: Exception) -> bool:
    """Looked up among the modules already imported (one that is not cannot have raised), so that a
    command imports only what it uses: `vitpipe status` needs no torch."""
    loaded = tuple(getattr(sys.modules[module], name) for module, name in DOMAIN_ERRORS if module in sys.modules)
    return isinstance(err, loaded)


def main(argv: Sequence[str] | None = None) -> int:
    """Domain errors become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    args = _parser().parse_args(argv)
    handlers = {"plan": cmd_plan, "run": cmd_run, "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs,
                "audit": cmd_audit, "relocate": cmd_relocate, "data": cmd_data, "peft-table": cmd_peft_table,
                "weights": cmd_weights}
    try:
        return handlers[args.command](args)
    except Exception as err:
        if not _is_domain_error(err):
            raise
        print(f"vitpipe: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
