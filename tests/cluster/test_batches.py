"""Chaining a stream's passes: each pass starts while the one before is consumed, and closing stops them all."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from vitpipe.cluster.batches import DataContext, StreamedBatches, one_by_one, overlapped


class Passes:
    """Passes of `size` items; records which passes have started (first item asked for) and which were closed."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.started: dict[int, threading.Event] = {k: threading.Event() for k in range(len(sizes))}
        self.closed: set[int] = set()
        self.gates: dict[int, threading.Event] = {k: threading.Event() for k in range(len(sizes))}
        for gate in self.gates.values():  # a pass's first item waits for its gate
            gate.set()

    def one(self, k: int) -> Iterator[tuple[int, int]]:
        self.started[k].set()
        self.gates[k].wait()
        try:
            yield from ((k, i) for i in range(self.sizes[k]))
        finally:
            self.closed.add(k)

    def __iter__(self) -> Iterator[Iterator[tuple[int, int]]]:
        return (self.one(k) for k in range(len(self.sizes)))


def test_overlapped_starts_the_next_pass_while_this_one_is_consumed() -> None:
    passes = Passes([3, 3, 2, 0])
    chained = overlapped(iter(passes))
    assert next(chained) == (0, 0)
    assert next(chained) == (0, 1)
    assert passes.started[1].wait(10), "pass 1 did not start while pass 0 was consumed"
    assert not passes.started[2].is_set()
    assert list(chained) == [(0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]  # stops at the empty pass
    assert passes.closed == {0, 1, 2, 3}


def test_closing_overlapped_closes_the_pass_it_started_ahead() -> None:
    passes = Passes([4, 4, 4])
    chained = overlapped(iter(passes))
    assert [next(chained) for _ in range(2)] == [(0, 0), (0, 1)]
    assert passes.started[1].wait(10)
    chained.close()
    assert passes.closed == {0, 1} and not passes.started[2].is_set()


def test_overlapped_starts_no_pass_the_needed_items_do_not_reach() -> None:
    passes = Passes([3, 3, 3, 3, 0])
    assert list(overlapped(iter(passes), needed=7)) == [(k, i) for k in range(4) for i in range(3)]  # all, if asked
    passes = Passes([3, 3, 3, 3, 3])
    chained = overlapped(iter(passes), needed=7)
    assert [next(chained) for _ in range(7)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    chained.close()
    assert {k for k, e in passes.started.items() if e.is_set()} == {0, 1, 2}  # 3 + 3 given, 3 more expected
    assert passes.closed == {0, 1, 2}


def test_closing_overlapped_does_not_wait_for_the_pass_it_is_starting() -> None:
    passes = Passes([2, 2, 2])
    passes.gates[1].clear()  # pass 1's first item does not come
    chained = overlapped(iter(passes))
    assert next(chained) == (0, 0) and next(chained) == (0, 1)
    assert passes.started[1].wait(10)
    opener = threading.Timer(5, passes.gates[1].set)  # a close that waited for pass 1 would not return before
    opener.start()
    chained.close()
    assert passes.closed == {0}, "close waited for the pass being started"
    opener.cancel()
    passes.gates[1].set()
    for _ in range(100):
        if 1 in passes.closed:
            break
        threading.Event().wait(0.1)
    assert passes.closed == {0, 1}


def test_one_by_one_starts_each_pass_when_the_one_before_ends() -> None:
    passes = Passes([2, 2, 0, 5])
    chained = one_by_one(iter(passes))
    assert next(chained) == (0, 0) and next(chained) == (0, 1)
    assert not passes.started[1].is_set()
    assert list(chained) == [(1, 0), (1, 1)]
    assert not passes.started[3].is_set()


def test_a_stream_without_a_full_micro_batch_fails_instead_of_looping(ray_local) -> None:
    import ray.data

    dataset = ray.data.from_items([{"x": i} for i in range(5)])  # a split of it (one_by_one) stops the same way
    ctx = DataContext(0, 1, 8, 1, 0, 10, 0, lambda name: dataset)
    with pytest.raises(RuntimeError, match=r"dataset 'train': a pass over it held no full micro-batch of 8 rows"):
        next(StreamedBatches("train", ("x",))(ctx))
