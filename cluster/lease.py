"""Stage leases: when two runners race for the same stage key, exactly one computes it.

A lease is a small JSON record at `leases/<kind>/<key>.json` in the artifact store, changed only by
compare-and-swap (`ArtifactStore.compare_and_swap`: an flock-guarded replace on a local or shared
filesystem, a conditional put with If-None-Match / If-Match on S3). The holder renews it with a
heartbeat; a waiter polls for the stage's manifest and takes the lease over only when it is released,
when its holder is a process on this machine that is gone, or when the record has not changed for
`ttl` seconds of the waiter's own clock (so clock skew between machines does not matter). Takeover is
itself a compare-and-swap against the record the waiter saw, so of several waiters only one wins.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

from vitpipe.cluster.manifest import MANIFEST_NAME, Manifest, load_manifest, stage_prefix
from vitpipe.cluster.store import ArtifactStore, StoreError, clean_key

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0
DEFAULT_POLL_S = 2.0


def lease_key(kind: str, key: str) -> str:
    """Store key of a stage's lease record (outside `stages/`, so it is never part of an output)."""
    stage_prefix(kind, key)  # validates kind and key
    return clean_key(f"leases/{kind}/{key}.json")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def this_process() -> dict[str, str | int]:
    """Who holds something (a lease, an MLflow run): this process, on this machine, in its pid namespace."""
    return {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid()}


def process_gone(record: dict) -> bool:
    """Whether the record's holder (this_process() then) is a process of this machine (same host, same pid
    namespace) that no longer exists; False when that cannot be told (another machine)."""
    if record.get("host") != socket.gethostname() or record.get("pidns") != _pid_namespace():
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return False


@dataclass
class StageLease:
    """The exclusive right to compute one stage key; `try_acquire`, then `renew` every ttl/4, `release`."""

    store: ArtifactStore
    kind: str
    key: str
    ttl: float = DEFAULT_TTL_S
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    beats: int = 0
    lost: bool = False
    _held: bytes | None = field(default=None, repr=False)
    _seen: tuple[bytes, float] | None = field(default=None, repr=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def path(self) -> str:
        return lease_key(self.kind, self.key)

    @property
    def held(self) -> bool:
        return self._held is not None

    def _record(self, state: str) -> bytes:
        return json.dumps({
            "stage": f"{self.kind}/{self.key}", "state": state, "owner": self.owner,
            **this_process(), "beat": self.beats, "ttl": self.ttl,
            "written_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }, sort_keys=True).encode()

    def _current(self) -> bytes | None:
        try:
            return self.store.read_bytes(self.path) if self.store.exists(self.path) else None
        except StoreError:
            if self.store.exists(self.path):
                raise
            return None  # deleted between exists and read

    def _free(self, current: bytes) -> bool:
        """Whether the record `current` may be taken over: released, its holder gone, or stale."""
        try:
            record = json.loads(current)
        except ValueError:
            record = {}
        if record.get("state") == "released" or process_gone(record):
            return True
        now = time.monotonic()
        if self._seen is None or self._seen[0] != current:
            self._seen = (current, now)  # a new heartbeat: start timing from here
            return False
        return now - self._seen[1] >= float(record.get("ttl", self.ttl))

    def try_acquire(self) -> bool:
        """Take the lease if it is absent, released, or abandoned; never blocks."""
        with self._mutex:
            current = self._current()
            if current is not None and not self._free(current):
                return False
            self.beats = 0
            mine = self._record("held")
            if not self.store.compare_and_swap(self.path, current, mine):
                return False
            self._held, self.lost = mine, False
            return True

    def renew(self) -> bool:
        """Heartbeat; False (and `lost`) when another runner took the lease over meanwhile."""
        with self._mutex:
            if self._held is None:
                return False
            self.beats += 1
            mine = self._record("held")
            if self.store.compare_and_swap(self.path, self._held, mine):
                self._held = mine
                return True
            self._held, self.lost = None, True
            return False

    def release(self) -> None:
        """Mark the lease released (kept as a record of the last holder), if still ours."""
        with self._mutex:
            if self._held is not None:
                self.store.compare_and_swap(self.path, self._held, self._record("released"))
                self._held = None


@dataclass
class Claim:
    """What `claim_stage` yields: `manifest` when another runner committed the stage while we waited
    (then no lease is held), else None with the lease held until the block ends."""

    lease: StageLease
    manifest: Manifest | None = None
    waited_s: float = 0.0

    def check_held(self) -> None:
        """Raise before committing if a stalled heartbeat let another runner take the stage over."""
        if self.lease.lost:
            raise StoreError(f"{self.lease.store.uri}: {self.lease.path}: lease lost to another runner "
                             f"(no heartbeat for {self.lease.ttl:.0f}s); not committing")


def _heartbeat(lease: StageLease, stop: threading.Event) -> None:
    while not stop.wait(lease.ttl / 4):
        try:
            if not lease.renew():
                log.error("%s: %s: lease taken over by another runner", lease.store.uri, lease.path)
                return
        except StoreError as err:  # keep trying: the lease only goes stale after a whole ttl
            log.warning("%s: lease heartbeat failed: %s", lease.path, err)


def _committed(store: ArtifactStore, kind: str, key: str) -> Manifest | None:
    """A verified manifest, checked cheaply first (polling must not re-hash outputs every time)."""
    if not store.exists(f"{stage_prefix(kind, key)}/{MANIFEST_NAME}"):
        return None
    return load_manifest(store, kind, key)


@contextmanager
def claim_stage(store: ArtifactStore, kind: str, key: str, *, ttl: float = DEFAULT_TTL_S,
                poll: float = DEFAULT_POLL_S) -> Iterator[Claim]:
    """Wait until this runner may compute the stage, or until another runner has committed it.

    Yields a Claim: with `manifest` set, reuse it; otherwise compute, `check_held()`, commit. The
    lease is renewed in the background and released when the block exits, even on an error.
    """
    lease = StageLease(store, kind, key, ttl=ttl)
    started = time.monotonic()
    while True:
        done = _committed(store, kind, key)
        if done is not None:
            yield Claim(lease, done, time.monotonic() - started)
            return
        if lease.try_acquire():
            break
        time.sleep(poll)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lease, stop), name=f"lease-{key[:12]}", daemon=True)
    beat.start()
    try:
        # Committed between our last look and the acquisition: reuse it, compute nothing.
        yield Claim(lease, _committed(store, kind, key), time.monotonic() - started)
    finally:
        stop.set()
        beat.join()
        lease.release()
