"""Seeded split assignment for datasets that do not come with their own splits."""

from __future__ import annotations

import numpy as np

from vitpipe.tasks.data.shards import SPLITS

VAL_FRACTION = TEST_FRACTION = 0.2


def stratified_splits(labels: np.ndarray, rng: np.random.Generator) -> dict[str, list[int]]:
    """Indices per split: each class split ~60/20/20 by a seeded permutation; each split shuffled."""
    by_split: dict[str, list[int]] = {split: [] for split in SPLITS}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls)).tolist()
        n_val, n_test = round(VAL_FRACTION * len(idx)), round(TEST_FRACTION * len(idx))
        by_split["val"] += idx[:n_val]
        by_split["test"] += idx[n_val:n_val + n_test]
        by_split["train"] += idx[n_val + n_test:]
    return {split: rng.permutation(idx).tolist() for split, idx in by_split.items()}
