"""The max–min (PRS) solver of ``Pessimistic`` against oracles that do not share its code.

Tiny instances (m ≤ 4 states, K ≤ 3 actions, k ≤ 4 parameters) are solved independently with
SciPy's SLSQP over the product of simplices (the objective written out from explicit features,
several random starts, plus every deterministic policy), and a small plain Frank–Wolfe written
here shows what the pairwise / active-set steps buy on mixed optima.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from scipy.optimize import minimize

from pluralign.confidence import ConfidenceSet
from pluralign.data import PreferenceData, TargetStates
from pluralign.policies import Pessimistic
from pluralign.rewards import Linear

SEEDS = range(24)


def _instance(seed: int):
    """A random ``Linear`` model (``z = φ``) with a random ellipsoid that excludes ``θ = 0``."""
    rng = np.random.default_rng(seed)
    m, n_actions, k = int(rng.integers(2, 5)), int(rng.integers(2, 4)), int(rng.integers(2, 5))
    data = PreferenceData(
        None, rng.normal(size=(30, k)), rng.normal(size=(30, k)), rng.integers(0, 2, 30)
    )
    model = Linear(l2=0.1).fit(data)
    center = rng.normal(size=k)
    a = rng.normal(size=(k, k))
    M = a @ a.T / k + 0.1 * np.eye(k)
    beta = rng.uniform(0.3, 0.95) * np.sqrt(center @ M @ center)
    cs = ConfidenceSet(
        center, M, beta, lam=0.1, n=30, kind="design", bound_feature=1.0, bound_theta=1.0
    )
    assert not cs.contains(np.zeros(k))  # the ‖θ̂‖_M ≤ β shortcut is not what is tested here
    return model, cs, TargetStates(None, rng.normal(size=(m, n_actions, k)))


def _f(cs: ConfidenceSet, phi: np.ndarray, probs: np.ndarray) -> float:
    """``θ̂ᵀw − β‖w‖_{M⁻¹}`` with ``w = (1/m) Σ_j Σ_a (π(a|j) − 1/K) φ(j,a)`` (uniform reference)."""
    w = np.einsum("ja,jak->k", probs, phi) / phi.shape[0] - phi.mean(axis=(0, 1))
    return float(cs.center @ w - cs.beta * np.sqrt(max(w @ np.linalg.solve(cs.M, w), 0.0)))


def _oracle(
    cs: ConfidenceSet, phi: np.ndarray, starts: int = 12
) -> tuple[float, np.ndarray, float]:
    """(SLSQP optimum, its policy, best deterministic policy's value)."""
    m, n_actions, _ = phi.shape
    rng = np.random.default_rng(0)
    eye = np.eye(n_actions)
    vertex_best = max(
        _f(cs, phi, eye[list(acts)]) for acts in itertools.product(range(n_actions), repeat=m)
    )
    rows = [
        {"type": "eq", "fun": (lambda p, j=j: p.reshape(m, n_actions)[j].sum() - 1.0)}
        for j in range(m)
    ]
    best, best_probs = -np.inf, None
    inits = [rng.dirichlet(np.ones(n_actions), size=m) for _ in range(starts)]
    for start in [*inits, np.full((m, n_actions), 1.0 / n_actions)]:
        result = minimize(
            lambda p: -_f(cs, phi, p.reshape(m, n_actions)),
            start.ravel(),
            method="SLSQP",
            bounds=[(0.0, 1.0)] * (m * n_actions),
            constraints=rows,
            options={"ftol": 1e-14, "maxiter": 500},
        )
        probs = np.clip(result.x.reshape(m, n_actions), 0.0, None)
        probs /= probs.sum(axis=1, keepdims=True)
        value = _f(cs, phi, probs)
        if value > best:
            best, best_probs = value, probs
    return best, best_probs, vertex_best


def test_solver_agrees_with_slsqp_and_its_gap_bounds_the_true_suboptimality():
    mixed = 0
    for seed in SEEDS:
        model, cs, targets = _instance(seed)
        policy = Pessimistic(model, cs)  # the defaults
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ConvergenceWarning at the defaults
            probs = policy.probs(targets)
        assert policy.converged_ and policy.duality_gap_ >= -1e-12, seed
        assert policy.duality_gap_ <= policy.tol, seed
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
        assert (probs >= 0).all()
        value = _f(cs, targets.phi, probs)
        assert value == pytest.approx(policy.pessimistic_value_, abs=1e-10), seed
        best, best_probs, vertex_best = _oracle(cs, targets.phi)
        assert value >= best - policy.tol, seed
        # the certificate bounds the true sub-optimality (measured from the oracle's policy)
        assert _f(cs, targets.phi, best_probs) - value <= policy.duality_gap_ + 1e-9, seed
        assert value <= best + 1e-6, seed  # and the oracle found the optimum too
        mixed += best > vertex_best + 1e-6  # no deterministic policy is optimal
    assert mixed >= 8  # the check covers mixed (non-vertex) optima


@pytest.mark.parametrize("seed", [1, 4, 5])
def test_mixed_optimum_is_certified_in_few_steps_where_plain_frank_wolfe_zigzags(seed):
    model, cs, targets = _instance(seed)
    best, _, vertex_best = _oracle(cs, targets.phi)
    assert best > vertex_best + 1e-3  # a mixed optimum
    policy = Pessimistic(model, cs, tol=1e-8)
    policy.probs(targets)
    assert policy.converged_ and policy.n_iter_ <= 10
    plain = _plain_frank_wolfe_iterations(cs, targets.phi, tol=1e-8, max_iter=2000)
    assert plain > 2000  # not certified in 2,000 plain Frank–Wolfe iterations (> 200× more)


def _plain_frank_wolfe_iterations(
    cs: ConfidenceSet, phi: np.ndarray, tol: float, max_iter: int
) -> int:
    """Iterations plain Frank–Wolfe (greedy start, exact line search, the same certificate
    ``min_t h(θ_t) − f``) needs to reach ``tol``; ``max_iter + 1`` if it does not."""
    m, n_actions, _ = phi.shape
    m_inv = np.linalg.inv(cs.M)
    z_ref = phi.mean(axis=(0, 1))
    eye = np.eye(n_actions)
    probs = eye[np.argmax(phi @ cs.center, axis=1)]
    dual = np.inf
    for it in range(1, max_iter + 1):
        w = np.einsum("ja,jak->k", probs, phi) / m - z_ref
        size = np.sqrt(w @ m_inv @ w)
        theta = cs.center - cs.beta * m_inv @ w / size if size > 0 else cs.center
        scores = phi @ theta
        dual = min(dual, scores.max(axis=1).mean() - theta @ z_ref)
        if dual - (cs.center @ w - cs.beta * size) <= tol:
            return it
        vertex = eye[np.argmax(scores, axis=1)]
        d = np.einsum("ja,jak->k", vertex, phi) / m - z_ref - w

        def slope(gamma: float, w=w, d=d) -> float:
            u = w + gamma * d
            return cs.center @ d - cs.beta * (d @ m_inv @ u) / np.sqrt(max(u @ m_inv @ u, 1e-300))

        if slope(1.0) >= 0:
            gamma = 1.0
        elif slope(0.0) <= 0:
            gamma = 0.0
        else:
            lo, hi = 0.0, 1.0
            for _ in range(80):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
            gamma = 0.5 * (lo + hi)
        probs = (1 - gamma) * probs + gamma * vertex
    return max_iter + 1


def test_reference_optimal_without_zero_in_the_set_is_certified():
    """``f* = 0`` at the reference policy (the cone point ``w = 0``) while ``θ = 0 ∉ C``: the
    case plain Frank–Wolfe cannot certify. Seed 12 has m(K−1) = 3 < k = 4."""
    model, cs, targets = _instance(12)
    best, _, vertex_best = _oracle(cs, targets.phi)
    assert abs(best) <= 1e-6 and vertex_best < -0.1  # SLSQP, at a non-smooth point
    policy = Pessimistic(model, cs)
    probs = policy.probs(targets)
    assert policy.converged_ and abs(_f(cs, targets.phi, probs)) <= 1e-9
    assert _plain_frank_wolfe_iterations(cs, targets.phi, tol=1e-6, max_iter=500) > 500
