"""Policy budgets: the PRS (max–min pessimistic) solve at high dimension (P4)."""

from __future__ import annotations

import time

import numpy as np

from benchmarks._common import contextual_data
from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.data import TargetStates
from pluralign.policies import Pessimistic
from pluralign.rewards import LowRank, RTVReduced


def bench_prs_solve() -> dict:
    """P4: PRS on m=10k target states, K=16, d_x=d_phi=384, r=4: ≤ 10 s to a certified duality
    gap of 1e-6 (the solve only; the gap-1e-4 solve is timed too)."""
    d, r, m, k_actions = 384, 4, 10_000, 16
    data, _ = contextual_data(20_000, d, d, rank=r, seed=3)
    start = time.perf_counter()
    low = LowRank(r, l2=1 / data.n, dtype="float32").fit(data)
    reduced = RTVReduced(low, l2=1 / data.n).fit(data)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # c = 0.1: a radius small enough that the max–min policy deviates from the reference
    cs = ConfidenceSet.fit(reduced, data, beta=0.1 * beta_rate(reduced.n_params, data.n))
    confidence_seconds = time.perf_counter() - start
    rng = np.random.default_rng(4)
    phi = rng.standard_normal((m, k_actions, d)) / np.sqrt(d)
    targets = TargetStates(rng.standard_normal((m, d)) / np.sqrt(d) + 0.05, phi)
    policy = Pessimistic(reduced, cs, tol=1e-4)
    start = time.perf_counter()
    policy.probs(targets)
    solve_seconds = time.perf_counter() - start
    tight = Pessimistic(reduced, cs, tol=1e-6)
    start = time.perf_counter()
    tight.probs(targets)
    tight_seconds = time.perf_counter() - start
    return {
        "setting": f"m={m} K={k_actions} d_x=d_phi={d} r={r} p={reduced.n_params} N={data.n}",
        "prs_solve_seconds_gap_1e-4": round(solve_seconds, 2),
        "prs_solve_seconds_gap_1e-6": round(tight_seconds, 2),
        "frank_wolfe_iterations_gap_1e-4": policy.n_iter_,
        "frank_wolfe_iterations_gap_1e-6": tight.n_iter_,
        "active_vertices_gap_1e-6": tight.n_active_,
        "duality_gap_1e-4_run": float(policy.duality_gap_),
        "duality_gap_1e-6_run": float(tight.duality_gap_),
        "converged": bool(policy.converged_ and tight.converged_),
        "pessimistic_value_gap_1e-6": float(tight.pessimistic_value_),
        "lowrank_plus_rtv_fit_seconds": round(fit_seconds, 2),
        "confidence_set_seconds": round(confidence_seconds, 2),
        "budget_solve<=10s (gap 1e-6)": tight_seconds <= 10,
    }
