"""The data stage's declaration: dataset entries, the data node, its outputs, one node per task (and corpus)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from vitpipe.tasks.config import Frozen
from vitpipe.tasks.spec import Node, Outputs, Pipeline, Plan, PlanError, StageSpec

if TYPE_CHECKING:
    from vitpipe.cluster.store import ArtifactStore


class DatasetSpec(Frozen):
    """A `tasks:` or `corpus:` entry: a bundled source name, `imagefolder:PATH` or `vtab1k:PATH` (PATH local
    or s3://), and an optional task group for the summary's group means."""

    source: str
    group: str | None = None

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        from vitpipe.tasks.data import DataError, resolve_source

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
        """A relative local folder is made absolute here: the node runs in a Ray worker with another cwd. The
        source's digest (which reads a user folder's listing) decides whether its data changed."""
        from vitpipe.tasks.data import IMPORTERS, source_digest

        kind, sep, location = spec.source.partition(":")
        source = spec.source
        if sep and kind in IMPORTERS and "://" not in location:
            source = f"{kind}:{os.path.abspath(location)}"
        return cls(source=source, digest=source_digest(source))


class DataOutputs(Outputs):
    """Where the shards are, what they hold, and the dataset's fingerprint (sha256 of its shard digests)."""

    shards: str = Field(description="the shards' folder, relative to the store: a moved store keeps working")
    source: str
    classes: tuple[str, ...]
    counts: dict[str, int]
    fingerprint: str

    def uri(self, store: ArtifactStore) -> str:
        """Where readers (pyarrow, Ray Data) open the shards, in `store` as it is now."""
        return f"{store.uri.rstrip('/')}/{self.shards}"


def data_node(plan: Plan, name: str, spec: DatasetSpec, where: str) -> str:
    """Declare (once) the data node of a dataset entry at config path `where`; returns its node name."""
    from vitpipe.tasks.data import DataError

    if f"data/{name}" not in plan.nodes:
        try:
            plan.add(Node(f"data/{name}", "data", DataNode.of(spec), cpus=1.0))
        except DataError as err:
            raise PlanError(f"{where}.source: {err}") from None
    return f"data/{name}"


def corpus_node(pipeline: Pipeline, plan: Plan, stage: str) -> str:
    """The corpus's data node, for a stage that trains on it."""
    if pipeline.corpus is None:
        raise PlanError(f"stages.{stage}: it trains on the unlabeled corpus: the pipeline needs a `corpus:` dataset")
    return data_node(plan, "corpus", pipeline.corpus, "corpus")


def declare(pipeline: Pipeline, plan: Plan) -> None:
    for task, spec in pipeline.tasks.items():
        data_node(plan, task, spec, f"tasks.{task}")


SPEC = StageSpec(kind="data", node=DataNode, outputs=DataOutputs, entry="vitpipe.tasks.prepare.stage:run",
                 declare=declare)
