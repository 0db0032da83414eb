"""Estimators against independent oracles: a rank-constrained solver built from scikit-learn
logistic fits (for ``LowRank``) and choix (for item-level Bradley–Terry through ``Linear``)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from pluralign.data import PreferenceData
from pluralign.rewards import Linear, LowRank

# Tight fits below the float64 floor of their problem end with the precision-floor warning.
AT_FLOOR = pytest.mark.filterwarnings(
    "ignore:.*stopped decreasing at float64 precision:pluralign.errors.ConvergenceWarning"
)


# --------------------------------------------------------------------------- the oracles
def penalized_objective(
    theta: np.ndarray, x: np.ndarray, dphi: np.ndarray, y: np.ndarray, l2: float
) -> float:
    """``(1/N) Σ softplus(−s_i x_iᵀΘΔφ_i) + (λ/2)‖Θ‖²_F``, written out with numpy."""
    margins = np.einsum("ni,ij,nj->n", x, theta, dphi)
    return float(
        np.mean(np.logaddexp(0.0, -(2.0 * y - 1.0) * margins)) + 0.5 * l2 * np.sum(theta**2)
    )


def _kron(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise ``vec(a_i b_iᵀ)`` (row-major)."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def _logistic(
    z: np.ndarray, y: np.ndarray, l2: float, start: np.ndarray | None = None
) -> np.ndarray:
    """scikit-learn's ridge logistic regression (lbfgs, optionally warm-started at ``start``):
    ``C = 1/(N λ)`` gives the mean loss plus ``(λ/2)‖w‖²``, pluralign's convention
    (``rewards/base.py``)."""
    fit = LogisticRegression(
        fit_intercept=False,
        C=1.0 / (len(y) * l2),
        tol=1e-12,
        max_iter=10_000,
        warm_start=start is not None,
    )
    if start is not None:
        fit.coef_ = np.asarray(start, dtype=np.float64)[None, :].copy()
    return fit.fit(z, y).coef_.ravel()


def alternating_rank_solver(
    x: np.ndarray,
    dphi: np.ndarray,
    y: np.ndarray,
    rank: int,
    l2: float,
    *,
    free_rows: int = 0,
    starts: int = 3,
    iters: int = 200,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """Best ``min_{Θ = [Θ_f; Θ_r], rank Θ_r ≤ r} ℓ(Θ) + (λ/2)‖Θ‖²_F`` over random starts, by
    exact block minimization with scikit-learn.

    With the row space of ``Θ_r`` fixed to an orthonormal ``Q_R`` (``Θ_r = L Q_Rᵀ``,
    ``‖Θ_r‖_F = ‖L‖_F``) the problem in ``(Θ_f, L)`` is a ridge logistic regression on
    ``[x_f ⊗ Δφ, x_r ⊗ Q_RᵀΔφ]``; with the column space fixed to ``Q_L`` (``Θ_r = Q_L R``) it is
    one on ``[x_f ⊗ Δφ, Q_Lᵀx_r ⊗ Δφ]``. Each step is an exact minimization over a set that
    contains the current point (where it is warm-started), so the objective never increases."""
    f, d_phi = free_rows, dphi.shape[1]
    x_f, x_r = x[:, :f], x[:, f:]
    z_f = _kron(x_f, dphi)
    rng = np.random.default_rng(seed)
    best, best_theta = np.inf, None
    for _ in range(starts):
        q_right = np.linalg.qr(rng.standard_normal((d_phi, rank)))[0]
        theta_f, theta_r = np.zeros((f, d_phi)), np.zeros((x_r.shape[1], d_phi))
        previous = np.inf
        for _ in range(iters):
            w = _logistic(
                np.hstack([z_f, _kron(x_r, dphi @ q_right)]),
                y,
                l2,
                np.concatenate([theta_f.ravel(), (theta_r @ q_right).ravel()]),
            )
            theta_f = w[: f * d_phi].reshape(f, d_phi)
            left = w[f * d_phi :].reshape(x_r.shape[1], rank)
            theta_r = left @ q_right.T
            q_left = np.linalg.qr(left)[0]
            w = _logistic(
                np.hstack([z_f, _kron(x_r @ q_left, dphi)]),
                y,
                l2,
                np.concatenate([theta_f.ravel(), (q_left.T @ theta_r).ravel()]),
            )
            theta_f = w[: f * d_phi].reshape(f, d_phi)
            right = w[f * d_phi :].reshape(rank, d_phi)
            theta_r = q_left @ right
            q_right = np.linalg.qr(right.T)[0]
            theta = np.vstack([theta_f, theta_r])
            value = penalized_objective(theta, x, dphi, y, l2)
            if previous - value < 1e-11:
                break
            previous = value
        if value < best:
            best, best_theta = value, theta
    return best, best_theta


def lowrank_data(n: int, d_x: int, d_phi: int, rank: int, seed: int) -> PreferenceData:
    """Bradley–Terry comparisons from a rank-``rank`` truth plus a small full-rank part (so that
    the rank constraint binds)."""
    rng = np.random.default_rng(seed)
    truth = 1.5 * rng.standard_normal((d_x, rank)) @ rng.standard_normal((rank, d_phi))
    truth += 0.3 * rng.standard_normal((d_x, d_phi))
    x = rng.standard_normal((n, d_x))
    phi0, phi1 = rng.standard_normal((n, d_phi)), rng.standard_normal((n, d_phi))
    margin = np.einsum("ni,ij,nj->n", x, truth, phi1 - phi0) / np.sqrt(d_x)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-margin))).astype(np.int8)
    return PreferenceData(x=x, phi0=phi0, phi1=phi1, y=y)


# --------------------------------------------------------------------------- LowRank
@pytest.mark.parametrize(("rank", "l2", "seed"), [(1, 1e-2, 0), (2, 3e-3, 1)])
@AT_FLOOR
def test_lowrank_below_full_rank_reaches_the_rank_constrained_optimum(rank, l2, seed):
    """``LowRank`` (spectral start, Burer–Monteiro) is no worse on the penalized objective, and
    a rank-``r`` estimate, than the best of several starts of an independent alternating
    solver on explicit features; at these sizes both find the same optimum."""
    data = lowrank_data(n=300, d_x=4, d_phi=5, rank=rank, seed=seed)
    dphi = data.delta_phi
    model = LowRank(rank, l2, tol=1e-9, max_iter=5000).fit(data)
    assert np.linalg.matrix_rank(model.theta_, tol=1e-8) == rank
    ours = penalized_objective(model.theta_, data.x, dphi, data.y, l2)
    oracle, oracle_theta = alternating_rank_solver(data.x, dphi, data.y, rank, l2)
    assert ours <= oracle + 1e-7
    # Not a vacuous comparison: the rank constraint binds (the full-rank optimum is better) and
    # the optimum is well separated from a rank-(r−1) one, so a wrong rank or ridge would fail.
    full = _logistic(_kron(data.x, dphi), data.y, l2).reshape(4, 5)
    assert penalized_objective(full, data.x, dphi, data.y, l2) < oracle - 1e-4
    np.testing.assert_allclose(model.theta_, oracle_theta, atol=1e-3)


# --------------------------------------------------------------------------- choix
@pytest.mark.parametrize("alpha", [0.5, 5.0])
@AT_FLOOR
def test_item_level_linear_matches_choix(alpha):
    """Item-level Bradley–Terry: ``Linear`` on one-hot items equals ``choix.opt_pairwise``'s MAP
    estimate. choix minimises ``Σ_i −log σ(θ_w − θ_l) + α‖θ‖²`` (``PairwiseFcts.objective``);
    pluralign the mean plus ``(λ/2)‖θ‖²``, so ``λ = 2α/N``. Compared up to the gauge (centred)."""
    import choix

    rng = np.random.default_rng(7)
    n_items, n = 8, 240
    strengths = rng.standard_normal(n_items)
    a = rng.integers(n_items, size=n)
    b = (a + rng.integers(1, n_items, size=n)) % n_items
    a_wins = rng.random(n) < 1.0 / (1.0 + np.exp(-(strengths[a] - strengths[b])))
    winners, losers = np.where(a_wins, a, b), np.where(a_wins, b, a)
    pairs = list(zip(winners.tolist(), losers.tolist(), strict=True))
    flip = rng.random(n) < 0.5  # half stored (winner, loser) with y = 0
    eye = np.eye(n_items)
    data = PreferenceData(
        x=None,
        phi0=eye[np.where(flip, winners, losers)],
        phi1=eye[np.where(flip, losers, winners)],
        y=(~flip).astype(np.int8),
    )
    ours = Linear(l2=2.0 * alpha / n, tol=1e-10, max_iter=10_000).fit(data).theta_
    theirs = choix.opt_pairwise(n_items, pairs, alpha=alpha, method="Newton-CG", tol=1e-12)
    np.testing.assert_allclose(ours - ours.mean(), theirs - theirs.mean(), atol=1e-4)
    # the ridge matters at this α: a factor-2 slip in λ = 2α/N would move the estimate
    other = choix.opt_pairwise(n_items, pairs, alpha=2 * alpha, method="Newton-CG", tol=1e-12)
    assert np.abs((other - other.mean()) - (theirs - theirs.mean())).max() > 1e-2
