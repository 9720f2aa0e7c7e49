"""A Recipe's data sources: deterministic micro-batches from tensors, or a worker's shard of a Ray Dataset."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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

    Ray Data starts a stream again at every pass (it lists the shards and reads and maps the first blocks before
    the first batch: seconds). Where the shard is the whole Dataset (a one-worker job in the node's process), the
    next pass starts while this one is consumed, so training does not wait at the seam; Ray Train's split of a
    multi-worker job runs one pass at a time.
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
        passes = (shard.iter_torch_batches(
            batch_size=ctx.micro_batch, drop_last=True, prefetch_batches=self.prefetch_batches,
            local_shuffle_buffer_size=self.shuffle_buffer,
            local_shuffle_seed=hash((ctx.seed, ctx.start_step, ctx.rank, epoch)) % 2**31)
            for epoch in itertools.count())
        needed = (ctx.steps - ctx.start_step) * ctx.grad_accum
        chain = overlapped(passes, needed) if _runs_passes_at_once(shard) else one_by_one(passes)
        for chunk, batch in enumerate(chain):
            tensors = tuple(batch[c] for c in self.columns)
            if self.transform is not None:
                gen = torch.Generator().manual_seed(hash((ctx.seed, ctx.start_step, ctx.rank, chunk)) % 2**63)
                tensors = self.transform(tensors, gen)
            yield tensors
        raise RuntimeError(f"dataset {self.name!r}: a pass over it held no full micro-batch of {ctx.micro_batch} rows")


def _runs_passes_at_once(shard: Any) -> bool:
    """A Ray Dataset runs each iteration as its own execution; Ray Train's split iterator has one at a time."""
    import ray.data

    return isinstance(shard, ray.data.Dataset)


_END = object()


def one_by_one(passes: Iterator[Iterable[Any]]) -> Iterator[Any]:
    """The items of each pass in turn, each pass started when the one before it ends; stops at an empty pass."""
    for items in passes:
        it = iter(items)
        first = next(it, _END)
        if first is _END:
            return
        yield first
        yield from it


def overlapped(passes: Iterator[Iterable[Any]], needed: int | None = None) -> Iterator[Any]:
    """The items of each pass in turn, each pass started (its first item fetched on a thread) once the one before
    it has given its first item, unless `needed` items will be given before it (a pass taken to be as long as the
    last whole one); stops at an empty pass. Closing it closes the passes it started."""
    started: list[Iterator[Any]] = []  # not yet closed, the current pass first
    head: Future | None = None  # the following pass's first item
    pool = ThreadPoolExecutor(1, thread_name_prefix="vitpipe-next-pass")
    given, last = 0, 0
    try:
        started.append(iter(next(passes)))
        first = next(started[0], _END)
        while first is not _END:
            if needed is None or given + last < needed:
                started.append(iter(next(passes)))
                head = pool.submit(next, started[1], _END)
            yield first
            last = 1
            for item in started[0]:
                yield item
                last += 1
            given += last
            _close(started.pop(0))
            if head is None:
                started.append(iter(next(passes)))
                first = next(started[0], _END)
            else:
                first, head = head.result(), None
    finally:
        pool.shutdown(wait=False)
        for it in started:
            if head is not None and it is started[-1]:  # closed once the thread has left it
                head.add_done_callback(lambda _, it=it: _close(it))
            else:
                _close(it)


def _close(it: Iterator[Any]) -> None:
    if hasattr(it, "close"):
        it.close()
