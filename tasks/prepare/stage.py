"""The data stage: turn a source (bundled images, ImageFolder, VTAB-1k) into Parquet shards in the store."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from vitpipe.cluster.context import StageContext, StageResult
from vitpipe.tasks.data import prepare
from vitpipe.tasks.prepare.spec import DataNode, DataOutputs


def run(ctx: StageContext, cfg: DataNode, inputs: dict[str, Any]) -> StageResult:
    """Shards are written locally first, then committed file by file (checksummed) to the store."""
    with tempfile.TemporaryDirectory() as tmp:
        info = prepare(cfg.source, tmp, seed=ctx.seed, rows_per_shard=cfg.rows_per_shard)
        for name in sorted(os.listdir(tmp)):
            ctx.writer.put_file(f"shards/{name}", os.path.join(tmp, name))
    outputs = DataOutputs(shards=f"{ctx.writer.prefix}/shards", source=cfg.source, classes=tuple(info.classes),
                          counts=info.counts, fingerprint=info.fingerprint)
    ctx.set_tags({"vitpipe.data.fingerprint": info.fingerprint, "vitpipe.data.source": cfg.source})
    return StageResult(metrics={f"rows_{k}": float(v) for k, v in info.counts.items()}, outputs=outputs)
