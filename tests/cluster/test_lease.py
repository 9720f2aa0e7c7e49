"""Stage leases on a local directory and on S3 (moto over HTTP): one runner computes, the rest reuse."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import threading
import time

import pytest

from vitpipe.cluster.lease import Claim, StageLease, claim_stage, lease_key
from vitpipe.cluster.manifest import StageWriter, load_manifest
from vitpipe.cluster.store import ArtifactStore, StoreError

KEY = "a" * 64


def test_compare_and_swap(store: ArtifactStore) -> None:
    assert store.compare_and_swap("locks/x", None, b"one")
    assert not store.compare_and_swap("locks/x", None, b"two")
    assert not store.compare_and_swap("locks/x", b"other", b"two")
    assert store.compare_and_swap("locks/x", b"one", b"two")
    assert store.read_bytes("locks/x") == b"two"
    assert store.list("locks") == ["locks/x"]  # the local lock file is not an object
    assert not store.compare_and_swap("locks/missing", b"one", b"two")
    assert not store.exists("locks/missing")


def _race(store: ArtifactStore, worker: int, results) -> None:
    """One runner: claim the stage, and if no one committed it yet, compute (slowly) and commit."""
    with claim_stage(store, "demo", KEY, ttl=5.0, poll=0.1) as claim:
        if claim.manifest is not None:
            results.put((worker, "reused", claim.manifest.created_at))
            return
        writer = StageWriter(store, "demo", KEY)
        writer.put_bytes("out.bin", f"computed by {worker}".encode())
        time.sleep(1.5)
        claim.check_held()
        manifest = writer.commit(metrics={"worker": worker})
        results.put((worker, "computed", manifest.created_at))


def test_racing_runners_compute_once(store: ArtifactStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(store, i, results)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    computed = [o for o in outcomes if o[1] == "computed"]
    assert len(computed) == 1, outcomes
    manifest = load_manifest(store, "demo", KEY)
    assert manifest is not None and manifest.metrics == {"worker": computed[0][0]}
    # Every runner saw the one manifest: it was written once, never rewritten by a second computation.
    assert {o[2] for o in outcomes} == {manifest.created_at}
    assert store.read_bytes(f"stages/demo/{KEY}/out.bin") == f"computed by {computed[0][0]}".encode()
    assert json.loads(store.read_bytes(lease_key("demo", KEY)))["state"] == "released"


def _hold_and_die(store: ArtifactStore, ready) -> None:
    lease = StageLease(store, "demo", KEY, ttl=600.0)
    assert lease.try_acquire()
    ready.set()
    time.sleep(600)


def test_lease_of_a_dead_process_on_this_machine_is_taken_at_once(store: ArtifactStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_and_die, args=(store, ready))
    holder.start()
    assert ready.wait(60)
    assert not StageLease(store, "demo", KEY).try_acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    started = time.monotonic()
    with claim_stage(store, "demo", KEY, poll=0.1) as claim:
        assert claim.manifest is None and claim.lease.held
    assert time.monotonic() - started < 10  # far below the dead holder's ttl of 600 s


def test_silent_lease_of_another_machine_expires_after_its_ttl(store: ArtifactStore) -> None:
    record = {"state": "held", "owner": "elsewhere", "host": f"not-{socket.gethostname()}", "pid": 1,
              "beat": 0, "ttl": 1.5}
    store.write_bytes(lease_key("demo", KEY), json.dumps(record).encode())
    started = time.monotonic()
    with claim_stage(store, "demo", KEY, poll=0.2) as claim:
        waited = time.monotonic() - started
        assert claim.lease.held
    assert 1.5 <= waited < 10


def test_heartbeat_keeps_the_lease_and_release_frees_it(store: ArtifactStore) -> None:
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with claim_stage(store, "demo", KEY, ttl=1.0) as claim:
            assert claim.manifest is None
            holding.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    rival = StageLease(store, "demo", KEY, ttl=1.0)
    deadline = time.monotonic() + 3.0  # three ttls: a lease without heartbeat would have gone stale
    while time.monotonic() < deadline:
        assert not rival.try_acquire()
        time.sleep(0.1)
    assert json.loads(store.read_bytes(lease_key("demo", KEY)))["beat"] >= 4
    done.set()
    holder.join()
    assert rival.try_acquire()


def test_a_holder_that_stalled_past_its_ttl_loses_the_lease(store: ArtifactStore) -> None:
    stalled = StageLease(store, "demo", KEY, ttl=0.5)
    assert stalled.try_acquire()  # and then no heartbeat
    with claim_stage(store, "demo", KEY, ttl=0.5, poll=0.1) as claim:
        assert claim.manifest is None
        assert not stalled.renew() and stalled.lost
        stalled.release()  # must not release the new holder's lease
        assert json.loads(store.read_bytes(lease_key("demo", KEY)))["owner"] == claim.lease.owner
    with pytest.raises(StoreError, match="lease lost"):
        Claim(stalled).check_held()
