"""P6: item-level Bradley–Terry (one-hot items) through ``Linear`` against ``choix.opt_pairwise``.

Items ``i = 1..n_items`` with strengths ``θ_i``; a comparison "``w`` beats ``l``" is, in
pluralign's terms, ``φ0 = e_l``, ``φ1 = e_w``, ``y = 1`` (half the pairs are stored the other
way round, ``y = 0``). choix minimises the summed negative log-likelihood plus ``α‖θ‖²``;
``Linear`` minimises the mean plus ``(λ/2)‖θ‖²``, so ``λ = 2α/N`` gives the same optimum.
Both are run to tight tolerances and must agree to 1e-4; the report is the time ratio.
"""

from __future__ import annotations

import numpy as np

from benchmarks._common import best_time
from pluralign.data import PreferenceData
from pluralign.rewards import Linear

N_ITEMS, N_COMPARISONS, ALPHA = 100, 20_000, 1e-2


def item_comparisons(n_items: int, n: int, seed: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """``(winner, loser)`` pairs from Bradley–Terry strengths ``θ ~ N(0, 1)``."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(n_items)
    a = rng.integers(n_items, size=n)
    b = (a + rng.integers(1, n_items, size=n)) % n_items  # b ≠ a
    p_a = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
    a_wins = rng.random(n) < p_a
    winners, losers = np.where(a_wins, a, b), np.where(a_wins, b, a)
    return list(zip(winners.tolist(), losers.tolist(), strict=True)), theta


def as_preference_data(pairs: list[tuple[int, int]], n_items: int, seed: int = 0) -> PreferenceData:
    """One-hot items; a seeded half of the pairs stored as ``(winner, loser)`` with ``y = 0``."""
    winners, losers = np.array(pairs).T
    flip = np.random.default_rng(seed).random(len(pairs)) < 0.5
    eye = np.eye(n_items)
    first = np.where(flip, winners, losers)
    second = np.where(flip, losers, winners)
    return PreferenceData(x=None, phi0=eye[first], phi1=eye[second], y=(~flip).astype(np.int8))


def bench_item_bt_vs_choix() -> dict:
    """P6: Linear on one-hot items vs choix.opt_pairwise (same MAP estimate; time ratio)."""
    import choix

    pairs, truth = item_comparisons(N_ITEMS, N_COMPARISONS, seed=0)
    data = as_preference_data(pairs, N_ITEMS)
    l2 = 2.0 * ALPHA / data.n
    t_ours, ours = best_time(lambda: Linear(l2=l2, tol=1e-10, max_iter=10_000).fit(data))
    t_choix, theirs = best_time(
        lambda: choix.opt_pairwise(N_ITEMS, pairs, alpha=ALPHA, method="Newton-CG", tol=1e-10),
        repeats=1,
    )  # choix loops in Python: one timing is enough
    t_bfgs, bfgs = best_time(
        lambda: choix.opt_pairwise(N_ITEMS, pairs, alpha=ALPHA, method="BFGS", tol=1e-8), repeats=1
    )
    diff = float(np.abs(ours.theta_ - theirs).max())
    corr = float(np.corrcoef(ours.theta_, truth)[0, 1])
    return {
        "setting": f"items={N_ITEMS} comparisons={N_COMPARISONS} alpha={ALPHA} (l2=2α/N)",
        "pluralign_seconds": round(t_ours, 4),
        "choix_newton_cg_seconds": round(t_choix, 4),
        "choix_bfgs_seconds": round(t_bfgs, 4),
        "time_ratio_ours_over_choix_newton": round(t_ours / t_choix, 3),
        "time_ratio_ours_over_choix_bfgs": round(t_ours / t_bfgs, 3),
        "max_abs_dtheta_vs_newton": diff,
        "max_abs_dtheta_vs_bfgs": float(np.abs(ours.theta_ - bfgs).max()),
        "same_estimate_1e-4": bool(diff <= 1e-4),
        "corr_with_truth": round(corr, 4),
    }
