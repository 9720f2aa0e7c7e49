"""Artifact store: a local directory or an S3 prefix behind one small byte-oriented interface.

Keys are relative POSIX paths ("stages/finetune/<key>/manifest.json"); every key is checked so
nothing can be read or written outside the store root.
"""

from __future__ import annotations

import abc
import fcntl
import os
import shutil
import tempfile
import uuid

from vitpipe.cluster.fs import is_s3
from vitpipe.cluster.retry import DEFAULT_RETRY, RetryPolicy, TransientError

# Temporary files of in-flight local writes start with this; keys may not, so list() can skip them.
_TMP_PREFIX = ".vitpipe-tmp-"


class StoreError(Exception):
    """An artifact store operation failed; the message names the store URI and the key."""


class StoreNotFound(StoreError):
    """A read-only command was pointed at a local store directory that does not exist."""


class StoreUnavailable(StoreError, TransientError):
    """The store's endpoint did not answer (or kept answering 5xx/throttling) through every retry."""


def clean_key(key: str) -> str:
    """Return `key` if it is a safe relative POSIX path inside the store, else raise StoreError."""
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid key {key!r}: must be a non-empty string")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise StoreError(f"invalid key {key!r}: contains control characters")
    if "\\" in key:
        raise StoreError(f"invalid key {key!r}: contains a backslash")
    if key.startswith("/"):
        raise StoreError(f"invalid key {key!r}: must be relative")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise StoreError(f"invalid key {key!r}: empty, '.' or '..' path component")
        if part.startswith(_TMP_PREFIX):
            raise StoreError(f"invalid key {key!r}: component starts with reserved {_TMP_PREFIX!r}")
    return key


def _clean_prefix(prefix: str) -> str:
    """A directory prefix: "" (the whole store) or a clean key; one trailing slash is tolerated."""
    prefix = prefix[:-1] if prefix.endswith("/") else prefix
    return clean_key(prefix) if prefix else ""


class ArtifactStore(abc.ABC):
    """Byte-level access to artifacts under one root; `uri` names the root in messages and configs."""

    uri: str

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write `data` atomically: readers see the old object or the new one, never a partial one."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; StoreError if it does not exist."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object (not a directory) exists at `key`."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to the store root) of all objects under directory `prefix`."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under directory `prefix` (which must not be empty)."""

    @abc.abstractmethod
    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes) -> bool:
        """Atomically write `data` iff the object's bytes are `expected` (None: iff it does not
        exist); False when they differ. Of racing writers expecting the same bytes, one wins."""

    def local_path(self, key: str) -> str | None:
        """A filesystem path for `key` when the store is local, else None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStore(ArtifactStore):
    """A directory on a local (or mounted shared) filesystem; created if missing, unless `create` is False
    (read-only commands: then a missing directory is a StoreNotFound)."""

    def __init__(self, root: str, create: bool = True) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.uri = self.root
        if not create:
            if not os.path.isdir(self.root):
                raise StoreNotFound(f"store not found at {self.root}")
            return
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.uri}: cannot create store directory: {e.strerror}") from e

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *clean_key(key).split("/"))

    def local_path(self, key: str) -> str | None:
        return self._path(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        parent = os.path.dirname(path)
        tmp = None
        try:
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            _fsync_dir(parent)
        except OSError as e:
            raise StoreError(f"{self.uri}: {key}: write failed: {e.strerror or e}") from e
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            raise StoreError(f"{self.uri}: {key}: no such object") from e
        except OSError as e:
            raise StoreError(f"{self.uri}: {key}: read failed: {e.strerror or e}") from e

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def list(self, prefix: str = "") -> list[str]:
        prefix = _clean_prefix(prefix)
        top = self._path(prefix) if prefix else self.root
        keys = []
        for dirpath, _, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in filenames:
                if not name.startswith(_TMP_PREFIX):
                    keys.append(name if rel == "." else f"{rel}/{name}")
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"{self.uri}: {key}: delete failed: {e.strerror or e}") from e

    def delete_prefix(self, prefix: str) -> None:
        prefix = _clean_prefix(prefix)
        if not prefix:
            raise StoreError(f"{self.uri}: refusing to delete the whole store (empty prefix)")
        path = self._path(prefix)
        try:
            if os.path.isdir(path):
                shutil.rmtree(path)
        except OSError as e:
            raise StoreError(f"{self.uri}: {prefix}/: delete failed: {e.strerror or e}") from e

    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes) -> bool:
        # The read-compare-replace runs under an flock on a sidecar file (hidden from list()); flock
        # is released when its holder dies, and NFS maps it onto POSIX locks.
        path = self._path(key)
        lock = os.path.join(os.path.dirname(path), f"{_TMP_PREFIX}lock-{os.path.basename(path)}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"{self.uri}: {key}: cannot open lock file: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                with open(path, "rb") as f:
                    current: bytes | None = f.read()
            except FileNotFoundError:
                current = None
            if current != expected:
                return False
            self.write_bytes(key, data)
            return True
        except OSError as e:
            raise StoreError(f"{self.uri}: {key}: compare-and-swap failed: {e.strerror or e}") from e
        finally:
            os.close(fd)


def _fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_store(uri: str, retry: RetryPolicy = DEFAULT_RETRY, create: bool = True) -> ArtifactStore:
    """`s3://bucket/prefix` -> S3Store; a local path -> LocalStore (directory created if missing, unless
    `create` is False: read-only commands create nothing)."""
    if is_s3(uri):
        from vitpipe.cluster.s3store import S3Store  # boto3 only where S3 is used

        bucket, _, prefix = uri[len("s3://") :].partition("/")
        return S3Store(bucket, prefix, retry=retry)
    if "://" in uri:
        raise StoreError(f"{uri}: unsupported store URI scheme (use a local path or s3://bucket/prefix)")
    return LocalStore(uri, create=create)


def check_writable(store: ArtifactStore) -> None:
    """Preflight: write, read back and delete a small probe object; StoreError naming the store."""
    key = f".vitpipe-probe-{uuid.uuid4().hex}"
    payload = b"vitpipe probe " + key.encode()
    try:
        store.write_bytes(key, payload)
        if store.read_bytes(key) != payload:
            raise StoreError(f"{store.uri}: {key}: probe read back different bytes")
        store.delete(key)
    except StoreError as e:
        raise StoreError(f"artifact store {store.uri} is not writable: {e}") from e
