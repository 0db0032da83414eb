"""Per-user train/test splits (:func:`pluralign.data.split.per_user_test_mask`), against a
brute-force oracle written from the docstring: per user ``u`` with ``n_u`` rows, ``n_test =
clip(round(test_size · n_u), 1, n_u − 1)`` rows (none when ``n_u = 1``), the rows with the
smallest seeded uniform draws."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pluralign.data.split import per_user_test_mask


def oracle_counts(users: list, test_size: float) -> dict[str, int]:
    """How many rows of each user are held out, one user at a time."""
    out = {}
    for user, n_u in Counter(str(u) for u in users).items():
        if test_size == 0 or n_u < 2:
            out[user] = 0
        else:
            out[user] = min(max(round(test_size * n_u), 1), n_u - 1)
    return out


def oracle_mask(users: list, test_size: float, seed: int) -> np.ndarray:
    """The held-out rows: per user, the ``n_test`` rows with the smallest seeded draws."""
    n = len(users)
    mask = np.zeros(n, dtype=bool)
    if test_size == 0 or n == 0:
        return mask
    draws = np.random.default_rng(seed).random(n)
    counts = oracle_counts(users, test_size)
    for user, k in counts.items():
        rows = [i for i in range(n) if str(users[i]) == user]
        for i in sorted(rows, key=lambda i: draws[i])[:k]:
            mask[i] = True
    return mask


def random_users(rng: np.random.Generator, n: int, n_users: int) -> list:
    """``n`` rows of ``n_users`` users, shuffled, with some users of one row only."""
    users = [f"u{int(i)}" for i in rng.integers(0, n_users, size=n)]
    users += [f"single{i}" for i in range(3)]
    rng.shuffle(users)
    return users


@pytest.mark.parametrize("case", range(12))
def test_mask_matches_the_oracle(case):
    rng = np.random.default_rng(case)
    users = random_users(rng, int(rng.integers(5, 80)), int(rng.integers(1, 9)))
    test_size = float(rng.choice([0.0, 0.1, 0.2, 0.25, 0.5, 0.75, 0.9, 0.99]))
    seed = int(rng.integers(0, 1000))
    mask = per_user_test_mask(np.array(users), test_size, seed)
    assert mask.dtype == bool and mask.shape == (len(users),)
    np.testing.assert_array_equal(mask, oracle_mask(users, test_size, seed))
    held = Counter(u for u, m in zip(users, mask, strict=True) if m)
    total = Counter(users)
    for user, k in oracle_counts(users, test_size).items():
        assert held[user] == k  # the share per user
        assert total[user] - held[user] >= 1  # every user keeps a training row
        if test_size > 0 and total[user] >= 2:
            assert held[user] >= 1  # and gives at least one to the test set
    for i in range(3):
        assert not mask[users.index(f"single{i}")]  # one comparison: stays in training


def test_the_share_is_rounded_per_user_and_clipped():
    users = np.array(["a"] * 10 + ["b"] * 3 + ["c"] * 2 + ["d"])
    held = Counter(users[per_user_test_mask(users, 0.25, seed=0)].tolist())
    # a: round(2.5) = 2 (half to even), b: round(0.75) = 1, c: round(0.5) = 0 -> 1, d: 1 row
    assert held == {"a": 2, "b": 1, "c": 1}
    held = Counter(users[per_user_test_mask(users, 0.9, seed=0)].tolist())
    assert held == {"a": 9, "b": 2, "c": 1}  # never all of a user's rows


def test_seeded_reproducible_and_seed_dependent():
    users = np.array([f"u{i % 4}" for i in range(200)])
    first = per_user_test_mask(users, 0.3, seed=5)
    np.testing.assert_array_equal(first, per_user_test_mask(users, 0.3, seed=5))
    others = [per_user_test_mask(users, 0.3, seed=s) for s in range(6, 10)]
    assert all(not np.array_equal(first, other) for other in others)
    assert all(other.sum() == first.sum() == 60 for other in others)


def test_every_row_of_a_user_is_equally_likely_to_be_held_out():
    users = np.array(["a", "b"] * 5)  # 5 rows each, 2 held out: probability 0.4 per row
    freq = np.mean([per_user_test_mask(users, 0.4, seed=s) for s in range(2000)], axis=0)
    np.testing.assert_allclose(freq, 0.4, atol=0.05)  # binomial sd ≈ 0.011


def test_integer_user_ids_and_edge_cases():
    users = np.array([7, 7, 7, 8, 8, 9])
    mask = per_user_test_mask(users, 0.5, seed=1)
    np.testing.assert_array_equal(mask, oracle_mask(users.tolist(), 0.5, 1))
    assert per_user_test_mask(np.array([], dtype=str), 0.5, seed=0).shape == (0,)
    assert not per_user_test_mask(users, 0.0, seed=0).any()
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="test_size must be in"):
            per_user_test_mask(users, bad, seed=0)
