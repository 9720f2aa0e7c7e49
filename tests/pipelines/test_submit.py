"""`vitpipe submit` to a real `ray start --head` on loopback: the Ray Job runs the pipeline against an
MLflow server process and moto's S3 server, with credentials forwarded only through --env."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port
from vitpipe.cluster.manifest import load_manifest
from vitpipe.cluster.ray_connect import RAY_DATA_ENV
from vitpipe.cluster.store import open_store
from vitpipe.pipelines.dag import build_dag, stage_keys
from vitpipe.pipelines.spec import load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "configs" / "demo.yaml"
BIN = Path(sys.executable).parent
# The head gets none of these: the job must receive what it needs through `vitpipe submit`.
NOT_ON_THE_CLUSTER = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                      "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI",
                      *RAY_DATA_ENV)  # a driver that joins the cluster brings these
SCALED_DOWN = (  # the demo pipeline, shrunk to one task, one method, a few steps, no pretraining
    "tasks={faces: {source: faces}}", "stages.pretrain=null", "stages.distill=null", "stages.evaluate=null",
    "stages.prune=null", "stages.finetune.methods=[linear]",
    "stages.finetune.train={steps: 8, batch_size: 32, warmup_steps: 1, checkpoint_every: 4, log_every: 4}",
)


def _stop_ray_started_in(temp_dir: str) -> None:
    """Stop only this head's processes (their command lines name its temp dir) and their children;
    `ray stop` would also stop every other Ray instance on the machine."""
    ours = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                ours += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
    for proc in ours:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(ours, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def ray_head(s3_endpoint: str) -> Iterator[str]:
    """A 2-CPU Ray head with its dashboard (Jobs API) on loopback, in its own temp dir and ports."""
    temp_dir = tempfile.mkdtemp(prefix="vitpipe-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    gcs, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in NOT_ON_THE_CLUSTER}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_ray_started_in(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def vitpipe(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "vitpipe.pipelines.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_wait_runs_the_pipeline_as_a_ray_job(ray_head: str, mlflow_server: str, s3_bucket: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = f"sentinel-{uuid.uuid4().hex}"
    monkeypatch.setenv("VITPIPE_TEST_TOKEN", sentinel)
    overrides = (*SCALED_DOWN, f"store={s3_bucket}", f"tracking_uri={mlflow_server}", "experiment=test-submit")
    sets = [a for o in overrides for a in ("--set", o)]
    started = time.monotonic()
    done = vitpipe("submit", str(DEMO), "--address", ray_head, "--wait", "--env", "AWS_ACCESS_KEY_ID",
                   "--env", "AWS_SECRET_ACCESS_KEY", "--env", "VITPIPE_TEST_TOKEN", *sets)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    job_id = next(w for w in done.stdout.split() if w.startswith("vitpipe-demo-"))
    assert f"vitpipe logs {job_id} --address {ray_head} --follow" in done.stdout
    assert "AWS_SECRET_ACCESS_KEY" in done.stdout and f"job {job_id} SUCCEEDED" in done.stdout
    assert sentinel not in done.stdout + done.stderr
    print(f"submit --wait took {seconds:.0f}s")

    status = vitpipe("status", job_id, "--address", ray_head, timeout=120)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    assert "VITPIPE_TEST_TOKEN" in status.stdout and sentinel not in status.stdout  # forwarded, never shown
    commit = status.stdout.split("(commit ")[1].split(")")[0]

    # The job's MLflow runs exist on the server, and it computed the keys a local run computes.
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("test-submit").experiment_id
    parent = next(r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED" and parent.data.tags["vitpipe.git_commit"] == commit
    assert f"MLflow run {parent.info.run_id}" in done.stdout
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    cfg = load_config(DEMO, overrides)
    nodes = build_dag(cfg)
    keys = stage_keys(nodes, cfg.seed, parent.data.tags["vitpipe.code_version"])
    assert f"+{commit};" in parent.data.tags["vitpipe.code_version"]
    assert {c.data.tags["vitpipe.node"]: c.data.tags["vitpipe.stage.key"] for c in children} == keys
    assert all(c.info.status == "FINISHED" and c.data.tags["vitpipe.cached"] == "no" for c in children)
    store = open_store(s3_bucket)
    for node in nodes:
        manifest = load_manifest(store, node.kind, keys[node.name])
        assert manifest is not None and manifest.mlflow_run_id in {c.info.run_id for c in children}

    listing = vitpipe("status", "--address", ray_head, timeout=120)
    assert job_id in listing.stdout and "demo" in listing.stdout
    logs = vitpipe("logs", job_id, "--address", ray_head, timeout=120)
    assert logs.returncode == 0 and f"MLflow run {parent.info.run_id}" in logs.stdout
    assert sentinel not in logs.stdout


def test_a_failing_job_fails_submit_wait_and_unknown_jobs_are_one_line_errors(ray_head: str, s3_endpoint: str,
                                                                            mlflow_server: str) -> None:
    missing = f"s3://vitpipe-no-such-bucket-{uuid.uuid4().hex[:8]}/root"
    done = vitpipe("submit", str(DEMO), "--address", ray_head, "--wait", "--env", "AWS_ACCESS_KEY_ID",
                   "--env", "AWS_SECRET_ACCESS_KEY", "--set", f"store={missing}", "--set",
                   f"tracking_uri={mlflow_server}", *[a for o in SCALED_DOWN for a in ("--set", o)])
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAILED" in done.stdout and missing in done.stdout  # the job's preflight names the store

    unknown = vitpipe("status", "vitpipe-no-such-job", "--address", ray_head, timeout=120)
    assert unknown.returncode == 2 and unknown.stderr.startswith("vitpipe: error: job vitpipe-no-such-job")
    assert len(unknown.stderr.strip().splitlines()) == 1
    nowhere = vitpipe("status", "--address", f"http://127.0.0.1:{free_port()}", timeout=120)
    assert nowhere.returncode == 2 and "cannot reach the Ray Jobs API" in nowhere.stderr


# A job whose driver joins the cluster through connect_ray and prints what a task of its sees of RAY_DATA_ENV.
READ_BACK = """
import os, ray
from vitpipe.cluster.ray_connect import RAY_DATA_ENV, connect_ray
connect_ray("auto")
print("seen", ray.get(ray.remote(lambda: {n: os.environ.get(n) for n in RAY_DATA_ENV}).remote()))
"""
SUBMIT_AND_WAIT = """
import shlex, sys, time
from ray.job_submission import JobStatus
from vitpipe.cluster.submit import connect
client = connect(sys.argv[1])
job = client.submit_job(entrypoint="python -c " + shlex.quote(sys.argv[2]))
while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    time.sleep(0.5)
print(client.get_job_status(job), client.get_job_logs(job))
"""


def test_a_driver_that_joins_the_cluster_gives_its_workers_the_ray_data_settings(ray_head: str) -> None:
    """The head runs without RAY_DATA_ENV: the job's driver brings it to its workers (runtime_env)."""
    done = subprocess.run([sys.executable, "-c", SUBMIT_AND_WAIT, ray_head, READ_BACK], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("SUCCEEDED"), done.stdout[-3000:] + done.stderr[-3000:]
    assert f"seen {RAY_DATA_ENV}" in done.stdout
