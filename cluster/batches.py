"""A Recipe's data sources: deterministic micro-batches from tensors, or a worker's shard of a Ray Dataset."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DataContext:
    """What a recipe's data source needs to yield this rank's share of each global batch."""

    rank: int
    world_size: int
    micro_batch: int
    grad_accum: int
    start_step: int
    steps: int
    seed: int
    dataset_shard: Callable[[str], Any] | None = None  # this rank's part of one of the job's Ray Datasets


@dataclass(frozen=True)
class TensorBatches:
    """Deterministic micro-batches from in-memory tensors (a Recipe's `data`).

    The sample stream is a concatenation of seeded per-epoch permutations; optimizer step s takes
    the next global batch from it, cut into grad_accum chunks, each chunk split evenly by rank.
    `transform(batch, generator)` augments with a generator seeded by (seed, step, rank, chunk).
    """

    load: Callable[[], tuple[torch.Tensor, ...]]
    transform: Callable[[tuple[torch.Tensor, ...], torch.Generator], Any] | None = None

    def __call__(self, ctx: DataContext) -> Iterator[Any]:
        tensors = self.load()
        n = len(tensors[0])
        chunk = ctx.micro_batch * ctx.world_size
        perms: dict[int, torch.Tensor] = {}

        def positions(start: int, count: int) -> torch.Tensor:
            pos = torch.arange(start, start + count)
            for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
                if epoch not in perms:
                    gen = torch.Generator().manual_seed(ctx.seed + epoch)
                    perms[epoch] = torch.randperm(n, generator=gen)
            return torch.stack([perms[int(p) // n][int(p) % n] for p in pos])

        for step in range(ctx.start_step, ctx.steps):
            for a in range(ctx.grad_accum):
                begin = (step * ctx.grad_accum + a) * chunk + ctx.rank * ctx.micro_batch
                idx = positions(begin, ctx.micro_batch)
                batch = tuple(t[idx] for t in tensors)
                if self.transform is not None:
                    gen = torch.Generator().manual_seed(hash((ctx.seed, step, ctx.rank, a)) % 2**63)
                    batch = self.transform(batch, gen)
                yield batch


@dataclass(frozen=True)
class StreamedBatches:
    """Micro-batches streamed from this worker's shard of a Ray Dataset (a Recipe's `data`).

    For corpora too large for memory: `fit` hands `TrainJob.datasets[name]` to the session (Ray Train splits the
    stream across workers); each worker reads `columns` in micro-batches with a seeded local shuffle and
    re-reads the stream for as many passes as the steps need. Unlike TensorBatches, the sample order
    depends on the worker count and a resumed run starts a fresh pass: the price of streaming.
    """

    name: str
    columns: tuple[str, ...]
    transform: Callable[[tuple[torch.Tensor, ...], torch.Generator], Any] | None = None
    shuffle_buffer: int = 1024
    prefetch_batches: int = 4  # made ready by Ray Data while the worker trains on the current one

    def __call__(self, ctx: DataContext) -> Iterator[Any]:
        if ctx.dataset_shard is None:
            raise RuntimeError(f"StreamedBatches({self.name!r}) runs only inside `fit`, which hands it the dataset")
        shard = ctx.dataset_shard(self.name)
        chunk = 0
        for epoch in itertools.count():
            batches = shard.iter_torch_batches(
                batch_size=ctx.micro_batch, drop_last=True, prefetch_batches=self.prefetch_batches,
                local_shuffle_buffer_size=self.shuffle_buffer,
                local_shuffle_seed=hash((ctx.seed, ctx.start_step, ctx.rank, epoch)) % 2**31)
            for batch in batches:
                tensors = tuple(batch[c] for c in self.columns)
                if self.transform is not None:
                    gen = torch.Generator().manual_seed(hash((ctx.seed, ctx.start_step, ctx.rank, chunk)) % 2**63)
                    tensors = self.transform(tensors, gen)
                chunk += 1
                yield tensors
