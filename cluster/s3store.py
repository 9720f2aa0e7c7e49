"""The S3 artifact store (boto3): conditional writes for compare-and-swap, the manifest put last."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import boto3
from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from vitpipe.cluster.retry import DEFAULT_RETRY, RetryPolicy
from vitpipe.cluster.store import ArtifactStore, StoreError, StoreUnavailable, _clean_prefix, clean_key

_S3_DELETE_BATCH = 1000
_S3_ERRORS = (ClientError, BotoCoreError)
T = TypeVar("T")
# A conditional put that lost: the precondition failed, or a concurrent conditional write won.
_LOST_RACE = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class S3Store(ArtifactStore):
    """Objects under `s3://bucket/prefix` via boto3; endpoint and credentials come from boto3's usual
    sources (AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, ...), so MinIO and other S3 clones work.

    The client is created lazily and dropped when pickled, so a store can be shipped to Ray workers.
    """

    def __init__(self, bucket: str, prefix: str = "", *, retry: RetryPolicy = DEFAULT_RETRY) -> None:
        if not bucket or "/" in bucket:
            raise StoreError(f"s3://{bucket}: invalid bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = _clean_prefix(prefix)
        self.retry = retry
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client: BaseClient | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> BaseClient:
        if self._client is None:
            try:
                # A private session: creating clients from boto3's default session is not thread-safe.
                self._client = boto3.session.Session().client("s3", config=self.retry.botocore_config())
            except (BotoCoreError, ValueError) as e:
                raise StoreError(f"{self.uri}: cannot create S3 client: {e}") from e
        return self._client

    def _object_key(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _dir_key(self, prefix: str) -> str:
        """The S3 key prefix (ending in "/", or "" for the root) of directory `prefix`."""
        prefix = _clean_prefix(prefix)
        full = "/".join(p for p in (self.prefix, prefix) if p)
        return f"{full}/" if full else ""

    def _error(self, key: str, what: str, e: Exception) -> StoreError:
        """A StoreError naming store, endpoint and key; botocore messages carry no credentials."""
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            reason = f"{err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
        else:
            reason = str(e)
        endpoint = self._client.meta.endpoint_url if self._client is not None else "<none>"
        where = f"{self.uri} (endpoint {endpoint}): {key}: {what} failed"
        if _is_transient(e):
            return StoreUnavailable(f"{where} after {self.retry.attempts} tries: {reason}")
        return StoreError(f"{where}: {reason}")

    def write_bytes(self, key: str, data: bytes) -> None:
        obj = self._object_key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=obj, Body=data)
        except _S3_ERRORS as e:
            raise self._error(key, "put", e) from e

    def _unless_missing(self, key: str, what: str, request: Callable[[], T]) -> T | None:
        """`request()`; None when the object does not exist; any other failure is a StoreError naming it."""
        try:
            return request()
        except ClientError as e:
            if _is_not_found(e):
                return None
            raise self._error(key, what, e) from e
        except BotoCoreError as e:
            raise self._error(key, what, e) from e

    def _get(self, key: str) -> tuple[bytes, str] | None:
        """(body, ETag) of the object, None when there is none."""
        def request() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            return response["Body"].read(), response["ETag"]

        return self._unless_missing(key, "get", request)

    def read_bytes(self, key: str) -> bytes:
        found = self._get(key)
        if found is None:
            raise StoreError(f"{self.uri}: {key}: no such object")
        return found[0]

    def exists(self, key: str) -> bool:
        request = lambda: self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))  # noqa: E731
        return self._unless_missing(key, "head", request) is not None

    def _list_objects(self, prefix: str) -> list[str]:
        """Full S3 keys of the objects under directory `prefix`."""
        dir_key = self._dir_key(prefix)
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=dir_key)
            for page in pages:
                found.extend(obj["Key"] for obj in page.get("Contents", []))
        except _S3_ERRORS as e:
            raise self._error(prefix or "/", "list", e) from e
        return found

    def list(self, prefix: str = "") -> list[str]:
        strip = len(self._dir_key(""))
        return sorted(k[strip:] for k in self._list_objects(prefix))

    def delete(self, key: str) -> None:
        obj = self._object_key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=obj)
        except _S3_ERRORS as e:
            raise self._error(key, "delete", e) from e

    def delete_prefix(self, prefix: str) -> None:
        if not _clean_prefix(prefix):
            raise StoreError(f"{self.uri}: refusing to delete the whole store (empty prefix)")
        keys = self._list_objects(prefix)
        for i in range(0, len(keys), _S3_DELETE_BATCH):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + _S3_DELETE_BATCH]], "Quiet": True}
            try:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete=batch)
            except _S3_ERRORS as e:
                raise self._error(prefix, "delete", e) from e
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StoreError(
                    f"{self.uri}: {prefix}: delete failed for {len(resp['Errors'])} objects, "
                    f"first {first.get('Key')}: {first.get('Code')}"
                )

    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes) -> bool:
        # S3 conditional writes: If-None-Match "*" creates only if absent, If-Match replaces only the
        # version whose ETag we compared (AWS since 2024, MinIO, moto).
        obj = self._object_key(key)
        condition = {"IfNoneMatch": "*"}
        if expected is not None:
            current = self._get(key)
            if current is None or current[0] != expected:
                return False
            condition = {"IfMatch": current[1]}
        try:
            self.client.put_object(Bucket=self.bucket, Key=obj, Body=data, **condition)
        except ClientError as e:
            if _is_not_found(e) or e.response.get("Error", {}).get("Code") in _LOST_RACE:
                return False
            raise self._error(key, "conditional put", e) from e
        except BotoCoreError as e:
            raise self._error(key, "conditional put", e) from e
        return True


def _is_not_found(e: ClientError) -> bool:
    return e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _is_transient(e: Exception) -> bool:
    """No connection, a timeout, a 5xx or throttling: the kinds of failure that go away by themselves."""
    if isinstance(e, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or e.response.get("Error", {}).get("Code") in ("SlowDown", "Throttling")
    return False
