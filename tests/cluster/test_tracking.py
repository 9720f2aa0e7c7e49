"""MLflow tracking helpers on a real SQLite store: no credentials logged, safe artifact names, no retry of 4xx."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vitpipe.cluster.retry import RetryPolicy
from vitpipe.cluster.tracking import Tracker, TrackingError, TrackingUnavailable

SECRET = "s3cr3t-SENTINEL"


@pytest.fixture
def tracker(tmp_path: Path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", RetryPolicy(attempts=4, backoff_s=2.0))


def test_uri_credentials_never_reach_params_or_tags(tracker: Tracker) -> None:
    run_id = tracker.start_run("r", {"vitpipe.store": f"https://user:{SECRET}@minio.local/bucket"})
    tracker.log_params(run_id, {"tracking_uri": f"http://mlflow:{SECRET}@10.0.0.5:5000", "plain": "a@b"})
    tracker.set_tags(run_id, {"vitpipe.ray_address": f"ray://admin:{SECRET}@head:10001"})
    data = MlflowClient(tracker.uri).get_run(run_id).data
    values = [*data.params.values(), *data.tags.values()]
    assert not [v for v in values if SECRET in v]
    assert data.params["tracking_uri"] == "http://10.0.0.5:5000" and data.params["plain"] == "a@b"
    assert data.tags["vitpipe.store"] == "https://minio.local/bucket"
    assert data.tags["vitpipe.ray_address"] == "ray://head:10001"
    assert repr(Tracker(f"https://user:{SECRET}@mlflow.local", "e")) == "Tracker('https://mlflow.local', 'e')"


@pytest.mark.parametrize("name", ["../escape.json", "/tmp/abs.json", "a\\b.json", "a//b.json", "a/", ""])
def test_artifact_names_cannot_leave_the_run(tracker: Tracker, tmp_path: Path, name: str) -> None:
    run_id = tracker.start_run("r", {})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TrackingError, match="invalid key"):
        tracker.log_bytes(run_id, name, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert MlflowClient(tracker.uri).list_artifacts(run_id) == []


def test_client_errors_fail_at_once_without_retries(tracker: Tracker) -> None:
    run_id = tracker.start_run("r", {})
    tracker.log_params(run_id, {"lr": "0.1"})
    started = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tracker.log_params(run_id, {"lr": "0.2"})  # MLflow params are immutable: a 400, not an outage
    assert time.monotonic() - started < 2.0  # the policy's first backoff would be 2 s
    assert not isinstance(err.value, TrackingUnavailable) and "cannot log params" in str(err.value)
