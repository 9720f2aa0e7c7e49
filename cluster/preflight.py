"""Before anything trains: the tracking server answers and the artifact store takes writes.

A pipeline that would fail an hour in, at its first checkpoint or manifest, fails here in seconds
with one line naming the URI. The checks leave nothing behind: MLflow is only read, and every
probe object is deleted again.
"""

from __future__ import annotations

import uuid

import pyarrow as pa

from vitpipe.cluster.fs import arrow_filesystem, is_s3
from vitpipe.cluster.retry import RetryPolicy
from vitpipe.cluster.store import ArtifactStore, StoreError, StoreUnavailable, check_writable
from vitpipe.cluster.tracking import Tracker, TrackingError


def preflight(store: ArtifactStore, tracker: Tracker, train_storage: str, retry: RetryPolicy) -> None:
    """Raise TrackingError or StoreError (one line: "preflight: <what> <URI> ...") unless all work."""
    try:
        tracker.check_reachable()
    except TrackingError as err:
        raise type(err)(f"preflight: {err}") from None
    try:
        check_writable(store)
        if is_s3(train_storage):
            check_train_storage(train_storage, retry)
    except StoreError as err:
        raise type(err)(f"preflight: {err}") from None


def check_train_storage(uri: str, retry: RetryPolicy) -> None:
    """Ray Train checkpoints go through pyarrow's S3 client, not boto3's: probe that one too."""
    fs, root = arrow_filesystem(uri, retry)
    probe = f"{root}/.vitpipe-probe-{uuid.uuid4().hex}"
    payload = b"vitpipe probe"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(payload)
        with fs.open_input_stream(probe) as f:
            same = f.read() == payload
        fs.delete_file(probe)
    except (OSError, pa.ArrowException) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StoreUnavailable(f"Ray Train storage {uri} is not writable: {reason}") from None
    if not same:
        raise StoreError(f"Ray Train storage {uri}: probe read back different bytes")
