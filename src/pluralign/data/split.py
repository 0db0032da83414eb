"""Per-user train/test splits shared by ``pluralign fit`` and ``pluralign train-rm``."""

from __future__ import annotations

import numpy as np

__all__ = ["per_user_test_mask"]


def per_user_test_mask(users: np.ndarray, test_size: float, seed: int) -> np.ndarray:
    """A boolean mask of held-out rows: per user, a seeded ``round(test_size · n_u)`` share of
    its rows, at least one when ``test_size > 0`` and ``n_u ≥ 2`` and never all of them (a user
    with a single row stays in training)."""
    if not 0.0 <= test_size < 1.0:
        raise ValueError(f"test_size must be in [0, 1), got {test_size}")
    users = np.asarray(users)
    n = len(users)
    if test_size == 0.0 or n == 0:
        return np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    _, index, counts = np.unique(users.astype(str), return_inverse=True, return_counts=True)
    order = np.lexsort((rng.random(n), index))  # random order within each user
    rank = np.empty(n, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    n_test = np.where(counts >= 2, np.clip(np.round(test_size * counts), 1, counts - 1), 0)
    return rank < n_test[index]
