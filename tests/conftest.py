"""Shared fixtures that start real components (S3 over HTTP, ...) for the tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from botocore.client import BaseClient
from moto.server import ThreadedMotoServer

from vitpipe.cluster.ray_connect import local_ray_env

# Every Ray the tests start (in-process, `ray start`, a CLI subprocess) runs Ray Train and Ray Data as the runner's
# local Ray does (workers polled every 0.2 s, no preemption watcher, one Parquet footer reader): the tests run
# dozens of short training stages.
local_ray_env()


# Fixtures that start or reach a Ray instance: modules using them train through Ray Train + DeepSpeed.
RAY_FIXTURES = {"ray_local", "ray_head", "ray_tmp"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests first, then the modules that train through Ray (module order kept within each group),
    so the Ray-free tests report quickly."""
    uses_ray = {item.module for item in items if RAY_FIXTURES & set(item.fixturenames)}
    items.sort(key=lambda item: item.module in uses_ray)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """Tiny models are overhead-bound: one intra-op thread is faster, and immune to a busy CI box.
    (Ray workers are other processes; the stages set their own thread counts.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded_encoder(store, spec, seed: int = 7):
    """A "pretrained" encoder: the backbone's seeded random init, committed as a pretrain stage's output."""
    import torch

    from vitpipe.cluster.manifest import StageWriter

    torch.manual_seed(seed)
    writer = StageWriter(store, "pretrain", "seeded")
    writer.put_weights("encoder.safetensors", spec.build(num_classes=0).state_dict())
    return writer.commit()


def run_stage(store, tmp: Path, kind: str, key: str, cfg, inputs, tracker=None, seed: int = 0):
    """Run a stage the way the runner does (pipelines.execute.run_stage), with an MLflow child run when `tracker`
    is given. Returns the manifest."""
    from vitpipe.pipelines.execute import run_stage as run

    run_id = tracker.start_run(key, {"vitpipe.stage.kind": kind}) if tracker else None
    return run(kind, key, cfg, inputs, store, train_storage=str(tmp / "ray"), seed=seed, tracker=tracker,
               run_id=run_id)


# ---------------------------------------------------------------------------------------------
# S3: moto's S3 server on loopback, reached over real HTTP through boto3's env configuration.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server; AWS_* env points boto3 at it (dummy credentials) for the session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(name, raising=False)
        # Keep a developer's ~/.aws config (which may name another endpoint or profile) out of the tests.
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", url)
        try:
            yield url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> BaseClient:
    """A boto3 S3 client for the moto server, for test setup and inspection."""
    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def s3_bucket(s3_client: BaseClient) -> str:
    """A fresh, uniquely named bucket on the moto server, as the store URI `s3://<bucket>/root`."""
    bucket = f"vitpipe-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/root"


# ---------------------------------------------------------------------------------------------
# Ray: one local instance for the session (2 CPUs, like CI), quiet, with the repo importable.
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[str]:
    """Started after the S3 endpoint so that Ray's worker processes inherit its AWS_* variables."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # always this test session's own, even beside a `ray start` cluster on the machine
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# ---------------------------------------------------------------------------------------------
# MLflow: a real `mlflow server` process on loopback (SQLite backend, proxied local artifacts).
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, output: Callable[[], str], timeout: float = 120) -> None:
    """Poll `url` until it answers; a RuntimeError with the tail of `output()` if `proc` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[:4]} did not start serving {url}: {output()[-2000:]}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def start_mlflow_server(root: Path, artifacts: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """An `mlflow server` process (SQLite in `root`, its output in root/server.log) on a free loopback port."""
    import signal

    port = free_port()
    env = {**(env if env is not None else os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", artifacts, "--workers", "1"]
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/health", proc, (root / "server.log").read_text)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    with start_mlflow_server(root, str(root / "artifacts")) as url:
        yield url


def shards_uri(world: dict, name: str) -> str:
    """Where a test world's data node `name` keeps its shards (its outputs hold them relative to the store)."""
    from vitpipe.tasks.prepare.spec import DataOutputs

    return DataOutputs.of(world[name]).uri(world["store"])
