"""Durable stage outputs: files under `stages/<kind>/<key>/`, then `manifest.json` written LAST.

A key with a manifest whose files all match their sha256 is done; anything else (no manifest, an
unreadable manifest, a missing or altered file) is treated as not done, so the stage re-runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from vitpipe.cluster.store import ArtifactStore, StoreError, clean_key

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


class FileEntry(BaseModel):
    """Size and sha256 (hex) of one output file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int
    sha256: str


class Manifest(BaseModel):
    """What one stage run produced; its presence (with matching checksums) marks the key as done."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    key: str
    files: dict[str, FileEntry]
    metrics: dict[str, float]
    outputs: dict[str, Any]
    mlflow_run_id: str | None
    timings: dict[str, float]
    created_at: str


def stage_prefix(kind: str, key: str) -> str:
    """Store directory of one stage output: `stages/<kind>/<key>`."""
    for part, what in ((kind, "stage kind"), (key, "stage key")):
        if not isinstance(part, str) or "/" in part:
            raise StoreError(f"invalid {what} {part!r}: must be a single path component")
    return clean_key(f"stages/{kind}/{key}")


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, fixed indent, trailing newline)."""
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode()


def _entry(data: bytes) -> FileEntry:
    return FileEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def weights_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Tensors as safetensors bytes (moved to CPU and made contiguous)."""
    import safetensors.torch  # here: reading manifests (the runner, audit) needs no torch

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(cpu, metadata=metadata)


class StageWriter:
    """Writes one stage's files, recording size and sha256 of each; `commit` writes the manifest last.

    Creating a writer removes an existing manifest for the key first, so a re-run that dies halfway
    never leaves an old manifest pointing at a mix of old and new files.
    """

    def __init__(self, store: ArtifactStore, kind: str, key: str) -> None:
        self.store = store
        self.kind = kind
        self.key = key
        self.prefix = stage_prefix(kind, key)
        self.files: dict[str, FileEntry] = {}
        self._committed: Manifest | None = None
        store.delete(f"{self.prefix}/{MANIFEST_NAME}")

    def _name(self, name: str) -> str:
        if self._committed is not None:
            raise StoreError(f"{self.store.uri}: {self.prefix}: already committed, cannot add {name!r}")
        if clean_key(name) == MANIFEST_NAME:
            raise StoreError(f"{self.store.uri}: {self.prefix}/{name}: name is reserved for the manifest")
        return name

    def put_bytes(self, name: str, data: bytes) -> FileEntry:
        """Write one output file; `name` is a relative path such as "delta/weights.safetensors"."""
        name = self._name(name)
        self.store.write_bytes(f"{self.prefix}/{name}", data)
        self.files[name] = entry = _entry(data)
        return entry

    def put_json(self, name: str, obj: Any) -> FileEntry:
        """Write `obj` as canonical JSON."""
        return self.put_bytes(name, canonical_json(obj))

    def put_weights(
        self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> FileEntry:
        """Write tensors as safetensors (moved to CPU and made contiguous; no pickle involved)."""
        return self.put_bytes(name, weights_bytes(tensors, metadata))

    def put_file(self, name: str, local_path: str) -> FileEntry:
        """Copy a local file (e.g. a plot) into the stage output."""
        try:
            with open(local_path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise StoreError(f"{local_path}: cannot read file for {self.prefix}/{name}: {e.strerror}") from e
        return self.put_bytes(name, data)

    def commit(
        self,
        metrics: dict[str, float] | None = None,
        outputs: dict[str, Any] | None = None,
        mlflow_run_id: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> Manifest:
        """Write `manifest.json` after every file; from then on the key counts as done."""
        if self._committed is not None:
            raise StoreError(f"{self.store.uri}: {self.prefix}: already committed")
        manifest = Manifest(
            kind=self.kind,
            key=self.key,
            files=dict(self.files),
            metrics=metrics or {},
            outputs=outputs or {},
            mlflow_run_id=mlflow_run_id,
            timings=timings or {},
            created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        )
        try:
            data = canonical_json(manifest.model_dump())
        except (TypeError, ValueError) as e:
            where = f"{self.store.uri}: {self.prefix}/{MANIFEST_NAME}"
            raise StoreError(f"{where}: outputs not JSON-able: {e}") from e
        self.store.write_bytes(f"{self.prefix}/{MANIFEST_NAME}", data)
        self._committed = manifest
        return manifest


def load_manifest(store: ArtifactStore, kind: str, key: str, verify: bool = True) -> Manifest | None:
    """The manifest of a finished stage, or None when it is absent, unreadable or (with `verify`)
    any listed file is missing or fails its checksum; each such problem is logged as a warning."""
    path = f"{stage_prefix(kind, key)}/{MANIFEST_NAME}"
    if not store.exists(path):
        return None
    try:
        manifest = Manifest.model_validate_json(store.read_bytes(path))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        logger.warning(
            "%s: %s: invalid manifest (%s: %s); treating stage as not done",
            store.uri, path, where, first["msg"],
        )
        return None
    if (manifest.kind, manifest.key) != (kind, key):
        logger.warning(
            "%s: %s: manifest is for %s/%s; treating stage as not done",
            store.uri, path, manifest.kind, manifest.key,
        )
        return None
    if verify:
        problems = verify_manifest(store, manifest)
        for problem in problems:
            logger.warning("%s: %s; treating stage as not done", store.uri, problem)
        if problems:
            return None
    return manifest


def verify_manifest(store: ArtifactStore, manifest: Manifest) -> list[str]:
    """Problems with a manifest's files ("stages/<kind>/<key>/<name>: sha256 mismatch"); [] = ok."""
    prefix = stage_prefix(manifest.kind, manifest.key)
    problems = []
    for name, expected in sorted(manifest.files.items()):
        path = f"{prefix}/{name}"
        try:
            clean_key(path)
        except StoreError:
            problems.append(f"{path}: invalid file name in manifest")
            continue
        if not store.exists(path):
            problems.append(f"{path}: missing")
            continue
        actual = _entry(store.read_bytes(path))
        if actual.size != expected.size:
            problems.append(f"{path}: size mismatch ({actual.size} bytes, manifest says {expected.size})")
        elif actual.sha256 != expected.sha256:
            problems.append(f"{path}: sha256 mismatch")
    return problems


def read_bytes(store: ArtifactStore, manifest: Manifest, name: str) -> bytes:
    """One output file's bytes, checked against the manifest (StoreError on a mismatch)."""
    path = f"{stage_prefix(manifest.kind, manifest.key)}/{name}"
    expected = manifest.files.get(name)
    if expected is None:
        raise StoreError(f"{store.uri}: {path}: not listed in the manifest")
    data = store.read_bytes(path)
    if _entry(data) != expected:
        raise StoreError(f"{store.uri}: {path}: sha256 mismatch")
    return data


def read_json(store: ArtifactStore, manifest: Manifest, name: str) -> Any:
    """A JSON output file, checksum-verified."""
    return json.loads(read_bytes(store, manifest, name))


def read_weights(store: ArtifactStore, manifest: Manifest, name: str) -> dict[str, torch.Tensor]:
    """A safetensors output file as CPU tensors, checksum-verified (never unpickled)."""
    import safetensors.torch

    return safetensors.torch.load(read_bytes(store, manifest, name))
