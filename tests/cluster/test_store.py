"""Artifact stores: the same behaviour for a local directory and for S3 over real HTTP (moto)."""

from __future__ import annotations

import os
import pickle
import time

import pytest

from vitpipe.cluster.retry import RetryPolicy
from vitpipe.cluster.s3store import S3Store
from vitpipe.cluster.store import (
    ArtifactStore,
    LocalStore,
    StoreError,
    StoreUnavailable,
    check_writable,
    open_store,
)

BAD_KEYS = ["", "/etc/passwd", "../escape", "a/../../escape", "a\\b", "a//b", "a/", "./a", "a/.", "a\x00b",
            "a\nb", ".vitpipe-tmp-x"]


def test_round_trip_and_overwrite(store: ArtifactStore) -> None:
    payload = bytes(range(256)) * 3
    store.write_bytes("stages/pretrain/k1/weights.bin", payload)
    assert store.read_bytes("stages/pretrain/k1/weights.bin") == payload
    store.write_bytes("stages/pretrain/k1/weights.bin", b"v2")
    assert store.read_bytes("stages/pretrain/k1/weights.bin") == b"v2"
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""


def test_exists_list_delete(store: ArtifactStore) -> None:
    for key in ["a/b/2", "a/b/1", "a/c", "ab/x", "top"]:
        store.write_bytes(key, key.encode())
    assert store.list() == ["a/b/1", "a/b/2", "a/c", "ab/x", "top"]
    assert store.list("a") == ["a/b/1", "a/b/2", "a/c"]  # "a" is a directory: "ab/x" is not under it
    assert store.list("a/") == store.list("a")
    assert store.list("nothing/here") == []
    assert store.exists("a/c") and not store.exists("a") and not store.exists("a/d")

    store.delete_prefix("a/b")
    assert store.list() == ["a/c", "ab/x", "top"]
    store.delete("a/c")
    store.delete("a/c")  # deleting a missing object is fine
    store.delete_prefix("not/there")
    assert store.list() == ["ab/x", "top"]
    with pytest.raises(StoreError, match="whole store"):
        store.delete_prefix("")


def test_missing_key_error_names_store_and_key(store: ArtifactStore) -> None:
    with pytest.raises(StoreError) as err:
        store.read_bytes("stages/finetune/abc/missing.json")
    assert "stages/finetune/abc/missing.json" in str(err.value) and store.uri in str(err.value)


def test_unsafe_keys_rejected(store: ArtifactStore) -> None:
    for key in BAD_KEYS:
        for op in (store.read_bytes, store.exists, store.delete, lambda k: store.write_bytes(k, b"x")):
            with pytest.raises(StoreError, match="invalid key"):
                op(key)
    assert store.list() == []


def test_traversal_cannot_escape_local_root(tmp_path) -> None:
    store = LocalStore(str(tmp_path / "root"))
    with pytest.raises(StoreError):
        store.write_bytes("x/../../outside", b"x")
    with pytest.raises(StoreError):
        store.list("..")
    assert sorted(os.listdir(tmp_path)) == ["root"]


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path) -> None:
    store = LocalStore(str(tmp_path / "root"))
    for i in range(5):
        store.write_bytes("d/model.safetensors", bytes([i]) * 1000)
    with pytest.raises(TypeError):
        store.write_bytes("d/model.safetensors", object())  # fails after the temp file was created
    assert store.read_bytes("d/model.safetensors") == bytes([4]) * 1000
    assert os.listdir(tmp_path / "root" / "d") == ["model.safetensors"]


def test_local_path(store: ArtifactStore) -> None:
    store.write_bytes("a/f.txt", b"hello")
    path = store.local_path("a/f.txt")
    if isinstance(store, LocalStore):
        assert path is not None and open(path, "rb").read() == b"hello"
    else:
        assert path is None


def test_check_writable(store: ArtifactStore) -> None:
    check_writable(store)
    assert store.list() == []  # the probe is removed


def test_check_writable_fails_for_missing_bucket(s3_endpoint: str) -> None:
    store = S3Store("vitpipe-no-such-bucket", "p")
    with pytest.raises(StoreError, match=r"s3://vitpipe-no-such-bucket/p is not writable.*NoSuchBucket"):
        check_writable(store)


def test_s3_prefixes_are_isolated(s3_bucket: str) -> None:
    a, b = open_store(s3_bucket), open_store(s3_bucket + "2")
    a.write_bytes("k", b"a")
    b.write_bytes("k", b"b")
    assert a.list() == ["k"] and b.list() == ["k"]
    a.delete_prefix("k")  # "k" is an object, not a directory: nothing under it
    assert a.read_bytes("k") == b"a" and b.read_bytes("k") == b"b"


def test_s3_store_pickles_for_ray_workers(s3_bucket: str) -> None:
    store = open_store(s3_bucket)
    store.write_bytes("x", b"1")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read_bytes("x") == b"1" and clone.uri == store.uri


def test_unreachable_endpoint_fails_fast_naming_endpoint(s3_endpoint: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRET-must-not-appear")
    store = S3Store("bucket", "prefix", retry=RetryPolicy(attempts=2, timeout_s=2))
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as err:
        store.read_bytes("stages/x/k/manifest.json")
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "http://127.0.0.1:1" in msg and "stages/x/k/manifest.json" in msg and "s3://bucket/prefix" in msg
    assert "after 2 tries" in msg
    assert "SECRET" not in msg and "\n" not in msg


def test_open_store(tmp_path) -> None:
    s3 = open_store("s3://my-bucket/some/prefix")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("my-bucket", "some/prefix")
    assert open_store("s3://my-bucket").uri == "s3://my-bucket"
    local = open_store(str(tmp_path / "new" / "store"))
    assert isinstance(local, LocalStore) and os.path.isdir(tmp_path / "new" / "store")
    for bad in ("s3://", "s3://b/../x", "gs://bucket/x"):
        with pytest.raises(StoreError):
            open_store(bad)
