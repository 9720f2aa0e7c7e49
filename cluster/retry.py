"""How calls to remote endpoints (S3, the MLflow server) and stage tasks retry: one policy, from the YAML.

Each S3 or MLflow call is tried `attempts` times with exponential backoff and per-try timeouts, then
fails with one line naming the endpoint. An error that is still transient then (the endpoint stayed
unreachable) is a `TransientError`, and the runner retries the whole stage task `stage_retries` times.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
from pathlib import Path

from botocore.config import Config
from pydantic import BaseModel, ConfigDict, Field


class TransientError(Exception):
    """An endpoint stayed unreachable through every retry; trying the whole stage again later may work."""


class DiskFull(Exception):
    """A write found its disk full. Not transient: retrying only repeats it, so a run stops at the first."""


_DISK_FULL = re.compile(r"\[Errno 28\] No space left on device(?:: '([^']*)')?|database or disk is full")


def disk_full(err: BaseException, where: str) -> DiskFull | None:
    """A DiskFull naming the path and its free space when `err` (or what it wraps: Ray's task errors keep the
    original message) is ENOSPC or SQLite's "database or disk is full"; None for any other error. `where`: the
    folder to report when the error names no file."""
    found = _DISK_FULL.search(str(err)) or _DISK_FULL.search(repr(getattr(err, "cause", None)))
    if found is None and not (isinstance(err, OSError) and err.errno == errno.ENOSPC):
        return None
    path = str((found.group(1) if found else None) or getattr(err, "filename", None) or where)
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"disk full writing {path} ({free} on {probe}); free space and run again "
                    "(finished stages are kept)")


class RetryPolicy(BaseModel):
    """Retries and timeouts of S3 and MLflow calls, and of stage tasks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(5, ge=1, description="tries of one S3 or MLflow call, the first included")
    backoff_s: float = Field(0.5, ge=0, description="MLflow: wait before the second try, doubling after")
    timeout_s: float = Field(30.0, gt=0, description="connect and read timeout of one try")
    stage_retries: int = Field(2, ge=0, description="re-runs of a stage task after a transient failure")

    def botocore_config(self) -> Config:
        """boto3's standard retry mode: exponential backoff with jitter, `attempts` tries in all."""
        return Config(retries={"max_attempts": self.attempts, "mode": "standard"},
                      connect_timeout=self.timeout_s, read_timeout=self.timeout_s)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed try number `attempt` (0-based)."""
        return self.backoff_s * 2**attempt

    def configure_mlflow_http(self) -> None:
        """MLflow's HTTP client reads its retries and timeout from the environment on every request.

        Its own retries are turned off so that the Tracker's loop (this policy) is the only one;
        otherwise both multiply and an unreachable server takes minutes to report. Its "View run at
        <tracking URI>" lines are turned off too: they would print a password inside the URI.
        """
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(self.timeout_s)))
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


DEFAULT_RETRY = RetryPolicy()


def task_retry_options(retry: RetryPolicy) -> dict[str, object]:
    """Ray task options: re-run after a lost worker process or a TransientError, never after a bug."""
    return {"max_retries": retry.stage_retries, "retry_exceptions": [TransientError]}
