"""The data stage: turn a source (bundled images, ImageFolder, VTAB-1k) into Parquet shards in the store."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from pydantic import Field, field_validator

from cluster.context import StageContext, StageResult
from tasks.config import Frozen
from tasks.data import IMPORTERS, DataError, prepare, resolve_source, source_digest


class DatasetSpec(Frozen):
    """A `tasks:` or `corpus:` entry: a bundled source name, `imagefolder:PATH` or `vtab1k:PATH` (PATH local
    or s3://), and an optional task group for the summary's group means."""

    source: str
    group: str | None = None

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        try:
            resolve_source(source)
        except DataError as err:
            raise ValueError(str(err)) from None
        return source


class DataNode(Frozen):
    """One data node: the source and, for a user folder, the digest of its listing (part of the key)."""

    source: str
    digest: str | None = Field(None, description="tasks.data.source_digest of the source when planned")
    rows_per_shard: int = Field(2048, gt=0)

    @classmethod
    def of(cls, spec: DatasetSpec) -> DataNode:
        """A relative local folder is made absolute here: the node runs in a Ray worker with another cwd."""
        kind, sep, location = spec.source.partition(":")
        source = spec.source
        if sep and kind in IMPORTERS and "://" not in location:
            source = f"{kind}:{os.path.abspath(location)}"
        return cls(source=source, digest=source_digest(source))


def run(ctx: StageContext, cfg: DataNode, inputs: dict[str, Any]) -> StageResult:
    """Shards are written locally first, then committed file by file (checksummed) to the store."""
    with tempfile.TemporaryDirectory() as tmp:
        info = prepare(cfg.source, tmp, seed=ctx.seed, rows_per_shard=cfg.rows_per_shard)
        for name in sorted(os.listdir(tmp)):
            ctx.writer.put_file(f"shards/{name}", os.path.join(tmp, name))
    outputs = {
        "uri": ctx.dataset_uri("shards"),
        "source": cfg.source,
        "classes": list(info.classes),
        "counts": info.counts,
        "fingerprint": info.fingerprint,
    }
    ctx.set_tags({"vitpipe.data.fingerprint": info.fingerprint, "vitpipe.data.source": cfg.source})
    return StageResult(metrics={f"rows_{k}": float(v) for k, v in info.counts.items()}, outputs=outputs)
