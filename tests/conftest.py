"""Shared fixtures that start real components (S3 over HTTP, ...) for the tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.client import BaseClient
from moto.server import ThreadedMotoServer

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
def ray_local() -> Iterator[None]:
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    yield
    ray.shutdown()
