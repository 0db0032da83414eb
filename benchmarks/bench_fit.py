"""Fitting budgets: Bilinear and LowRank against scikit-learn on Kronecker features; LowRank at
high dimension (P1); LowRank speed against full-rank logistic regression (P2)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
from sklearn.linear_model import LogisticRegression

from benchmarks._common import best_time, contextual_data, kronecker, log_loss
from pluralign.rewards import Bilinear, LowRank

N, D, L2, TOL = 20_000, 32, 1e-4, 1e-8


def _sklearn(z: np.ndarray, y: np.ndarray, n: int) -> LogisticRegression:
    return LogisticRegression(fit_intercept=False, C=1.0 / (n * L2), tol=TOL,
                              max_iter=10_000).fit(z, y)


def bench_bilinear_vs_sklearn() -> dict:
    """Issue 2: Bilinear vs LogisticRegression on Kronecker features, N=20k, d_x=d_phi=32."""
    data, _ = contextual_data(N, D, D, rank=D, seed=0)
    z = kronecker(data)
    t_ours, ours = best_time(lambda: Bilinear(l2=L2, tol=TOL).fit(data))
    t_sk, sk = best_time(lambda: _sklearn(z, data.y, data.n))
    return {
        "setting": f"N={N} d_x=d_phi={D} l2={L2} tol={TOL} float64",
        "pluralign_seconds": round(t_ours, 3),
        "sklearn_seconds": round(t_sk, 3),
        "time_ratio_ours_over_sklearn": round(t_ours / t_sk, 3),
        "max_abs_dtheta": float(np.abs(ours.params_ - sk.coef_[0]).max()),
        "budget_ratio<=2": bool(t_ours / t_sk <= 2.0),
    }


def bench_lowrank_vs_fullrank_sklearn() -> dict:
    """P2: LowRank (r=2) vs LogisticRegression on Kronecker features, N=20k, d=32, rank-2 truth."""
    # Same truth: contextual_data draws Θ* first from the same seed, then fresh samples.
    heldout = contextual_data(40_000, D, D, rank=2, seed=1)[0].subset(slice(20_000, 40_000))
    data = contextual_data(40_000, D, D, rank=2, seed=1)[0].subset(slice(0, 20_000))
    z = kronecker(data)
    t_low, low = best_time(lambda: LowRank(2, l2=L2, tol=TOL).fit(data))
    t_sk, sk = best_time(lambda: _sklearn(z, data.y, data.n))
    z_held = kronecker(heldout)
    loss_low = log_loss(low.reward(heldout.x, heldout.phi1) - low.reward(heldout.x, heldout.phi0),
                        heldout.y)
    loss_sk = log_loss(z_held @ sk.coef_[0], heldout.y)
    return {
        "setting": f"N={N} d_x=d_phi={D} true rank 2, LowRank(rank=2) l2={L2} tol={TOL}",
        "lowrank_seconds": round(t_low, 3),
        "sklearn_seconds": round(t_sk, 3),
        "speedup_sklearn_over_lowrank": round(t_sk / t_low, 2),
        "heldout_logloss_lowrank": round(loss_low, 5),
        "heldout_logloss_sklearn": round(loss_sk, 5),
        "budget_speedup>=5": bool(t_sk / t_low >= 5.0),
        "budget_logloss<=sklearn+0.01": bool(loss_low <= loss_sk + 0.01),
    }


_P1_CHILD = textwrap.dedent(
    """
    import json, resource, time, sys
    import numpy as np, torch
    sys.path.insert(0, ".")
    from benchmarks._common import contextual_data
    from pluralign.rewards import LowRank
    data, theta = contextual_data(100_000, 384, 384, rank=4, seed=2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = LowRank(4, l2=1e-8, dtype="float32", tol=1e-9).fit(data)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = float(np.linalg.norm(model.theta_ - theta) / np.linalg.norm(theta))
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024,
                      "rss_before_fit_mb": before / 1024, "n_iter": model.n_iter_,
                      "relative_error": err, "threads": torch.get_num_threads()}))
    """
)


def bench_lowrank_high_dimension() -> dict:
    """P1: LowRank, N=100k, d_x=d_phi=384, r=4, float32 (tol 1e-9), 2 cores: ≤ 30 s, ≤ 2 GB RSS."""
    out = subprocess.run([sys.executable, "-c", _P1_CHILD], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "setting": "N=100k d_x=d_phi=384 r=4 float32 (fresh process; RSS includes the data)",
        "fit_seconds": round(result["seconds"], 2),
        "peak_rss_mb": round(result["peak_rss_mb"]),
        "rss_before_fit_mb": round(result["rss_before_fit_mb"]),
        "n_iter": result["n_iter"],
        "relative_error": round(result["relative_error"], 4),
        "budget_seconds<=30": result["seconds"] <= 30,
        "budget_rss<=2048MB": result["peak_rss_mb"] <= 2048,
    }
