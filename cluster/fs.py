"""Resolve a dataset/artifact URI (local path or s3://bucket/prefix) to a pyarrow filesystem."""

from __future__ import annotations

import os
import re

import pyarrow.fs as pafs

from vitpipe.cluster.retry import DEFAULT_RETRY, RetryPolicy

_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@]*@")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def redact(text: str) -> str:
    """Drop `user:password@` from every URI in `text` before it is logged or shown."""
    return _USERINFO.sub(r"\1", text)


def arrow_filesystem(uri: str, retry: RetryPolicy = DEFAULT_RETRY) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for `uri`; S3 honours AWS_ENDPOINT_URL(_S3) like boto3 does."""
    if is_s3(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            allow_bucket_creation=False,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=retry.attempts),
            connect_timeout=retry.timeout_s,
            request_timeout=retry.timeout_s,
        )
        return fs, uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)
