"""Stage-task retries on a real Ray: transient endpoint failures are retried, bugs are not."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from vitpipe.cluster.retry import RetryPolicy, task_retry_options
from vitpipe.cluster.store import StoreError, StoreUnavailable
from vitpipe.cluster.tracking import TrackingUnavailable

ERRORS = {"store down": StoreUnavailable, "mlflow down": TrackingUnavailable, "bug": StoreError}


@ray.remote
def fails_twice(counter: str, error: str) -> int:
    """Counts its tries in a file; raises `error` on the first two."""
    path = Path(counter)
    tries = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(tries))
    if tries <= 2:
        raise ERRORS[error](f"try {tries}")
    return tries


@pytest.mark.parametrize("error", ["store down", "mlflow down"])
def test_transient_failures_are_retried(ray_local, tmp_path: Path, error: str) -> None:
    counter = tmp_path / "tries"
    options = task_retry_options(RetryPolicy(stage_retries=2))
    assert ray.get(fails_twice.options(**options).remote(str(counter), error)) == 3


def test_retries_run_out(ray_local, tmp_path: Path) -> None:
    counter = tmp_path / "tries"
    options = task_retry_options(RetryPolicy(stage_retries=1))
    with pytest.raises(StoreUnavailable, match="try 2"):
        ray.get(fails_twice.options(**options).remote(str(counter), "store down"))
    assert counter.read_text() == "2"


def test_other_errors_are_not_retried(ray_local, tmp_path: Path) -> None:
    counter = tmp_path / "tries"
    options = task_retry_options(RetryPolicy(stage_retries=2))
    with pytest.raises(StoreError, match="try 1"):
        ray.get(fails_twice.options(**options).remote(str(counter), "bug"))
    assert counter.read_text() == "1"
