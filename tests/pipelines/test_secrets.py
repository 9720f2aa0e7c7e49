"""No credential ever leaves the environment: a real run with sentinel secrets, then every output is grepped.

The run is a `vitpipe run` process with its own local Ray (whose session logs go to a private temp dir),
artifacts on moto's S3 server, and an `mlflow server` process that keeps its artifacts on S3 too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml

from tests.conftest import ROOT, start_mlflow_server

SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
               "MLFLOW_TRACKING_PASSWORD")


def files_under(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield str(path), path.read_bytes()


def bucket_objects(bucket: str) -> Iterator[tuple[str, bytes]]:
    s3 = boto3.session.Session().client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            yield f"s3://{bucket}/{obj['Key']}", s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """Ray's temp dir for the run; short, because Ray puts Unix sockets in it."""
    path = Path(tempfile.mkdtemp(prefix="vp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_sentinel_secrets_appear_in_no_output(s3_endpoint: str, s3_bucket: str, tmp_path: Path,
                                              ray_tmp: Path) -> None:
    secrets = {name: f"SENTINEL{i}{uuid.uuid4().hex}" for i, name in enumerate(SECRET_VARS)}
    env = {**os.environ, **secrets, "MLFLOW_TRACKING_USERNAME": "vitpipe", "RAY_TMPDIR": str(ray_tmp),
           "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    bucket = s3_bucket.removeprefix("s3://").split("/")[0]
    server_root = tmp_path / "mlflow-server"
    server_root.mkdir()
    work = tmp_path / "work"
    with start_mlflow_server(server_root, f"s3://{bucket}/mlflow-artifacts", env) as url:
        # A password inside the tracking URI as well: it must not reach params, tags or messages either.
        password = secrets["MLFLOW_TRACKING_PASSWORD"]
        tracking = url.replace("http://", f"http://vitpipe:{password}@")
        config = {"name": "secrets", "work_dir": str(work), "experiment": "secrets-canary",
                  "store": s3_bucket, "tracking_uri": tracking, "ray": {"num_cpus": 2},
                  "tasks": {"faces": {"source": "faces"}},
                  "stages": {"finetune": {"methods": ["linear"],
                                          "train": {"steps": 4, "batch_size": 32, "warmup_steps": 1,
                                                    "checkpoint_every": 2, "log_every": 2}}}}
        path = tmp_path / "secrets.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run([sys.executable, "-m", "vitpipe.pipelines.cli", "run", str(path)], cwd=ROOT, env=env,
                              capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    outputs = [("stdout", done.stdout), ("stderr", done.stderr), *bucket_objects(bucket),
               *files_under(server_root), *files_under(ray_tmp), *files_under(work)]
    names = [name for name, _ in outputs]
    # The grep sees what the run wrote: manifests and MLflow artifacts on S3, the runs in MLflow's
    # database, Ray's session logs, the console (a stage's checkpoints are deleted when it commits).
    assert any(n.endswith("/manifest.json") and "/stages/finetune/" in n for n in names)
    assert any("/mlflow-artifacts/" in n and n.endswith("summary.json") for n in names)
    assert b"secrets-canary" in dict(outputs)[str(server_root / "mlflow.db")]
    assert any("/logs/" in n and "raylet" in n for n in names)
    assert b"MLflow run" in done.stdout

    leaks = [(name, var) for name, data in outputs for var, value in secrets.items() if value.encode() in data]
    assert not leaks, leaks
