"""The policies' general solvers (``pluralign.policies._solvers``) against independent oracles.

Each solver is called directly on small random instances and checked against something that does
not share its code: ``scipy.optimize.linprog`` written out here (the matrix game's value from the
column player's side, the epigraph LPs over all ``m·K`` probabilities), brute force over every
deterministic policy, dense grids, and closed forms (``m = 1, K = 2``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linprog

from pluralign.confidence import ConfidenceSet
from pluralign.data import PreferenceData, TargetStates
from pluralign.errors import PluralignError
from pluralign.policies._solvers import (
    SimplexGeometry,
    best_response,
    cutting_plane_lp,
    double_oracle,
    escape_cone,
    kelley_cutting_planes,
    line_search,
    matrix_game,
    mix_vertices,
    pairwise_corrective,
    pairwise_frank_wolfe,
    restricted_dual,
)
from pluralign.rewards import Linear


def _geometry(seed: int, m: int = 3, n_actions: int = 3, d: int = 4) -> SimplexGeometry:
    rng = np.random.default_rng(seed)
    ref = rng.dirichlet(np.ones(n_actions), size=m)
    return SimplexGeometry(rng.normal(size=(m, n_actions, d)), ref)


def _simplex_eq(m: int, n_actions: int, extra: int) -> np.ndarray:
    """Dense ``Σ_a π(a|j) = 1`` rows over ``[vec π, extra variables]`` (written independently)."""
    a_eq = np.zeros((m, m * n_actions + extra))
    for j in range(m):
        a_eq[j, j * n_actions : (j + 1) * n_actions] = 1.0
    return a_eq


def _wbar(geometry: SimplexGeometry, probs: np.ndarray) -> np.ndarray:
    """``(1/m) Σ_j Σ_a (π − π_ref)(a|j) φ(j, a)`` by explicit loops."""
    m, n_actions, d = geometry.phi.shape
    out = np.zeros(d)
    for j in range(m):
        for a in range(n_actions):
            out += (probs[j, a] - geometry.ref[j, a]) * geometry.phi[j, a]
    return out / m


def _max_min_lp(geometry: SimplexGeometry, points: np.ndarray) -> float:
    """``max_π min_c θ_cᵀw̄(π)`` for finitely many ``θ_c`` (rows of ``points``): the epigraph LP
    over ``[vec π, t]`` with HiGHS, coefficients from :func:`_wbar` (not the solver's code)."""
    m, n_actions, _ = geometry.phi.shape
    size = m * n_actions
    eye = np.eye(size)
    # θᵀw̄(π) is affine in vec π: coefficients from the basis vectors, offset at π = 0.
    offset = _wbar(geometry, np.zeros((m, n_actions)))
    coef = np.array([_wbar(geometry, e.reshape(m, n_actions)) - offset for e in eye])  # (size, d)
    a_ub = np.hstack([-(coef @ points.T).T, np.ones((len(points), 1))])
    b_ub = points @ offset
    c = np.zeros(size + 1)
    c[-1] = -1.0
    res = linprog(
        c,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=_simplex_eq(m, n_actions, 1),
        b_eq=np.ones(m),
        bounds=[(0, None)] * size + [(None, None)],
        method="highs",
    )
    assert res.status == 0
    return -float(res.fun)


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("seed", range(4))
def test_geometry_wbar_and_gain_match_the_definition(seed):
    geometry = _geometry(seed)
    rng = np.random.default_rng(100 + seed)
    probs = rng.dirichlet(np.ones(3), size=3)
    np.testing.assert_allclose(geometry.wbar(probs), _wbar(geometry, probs), atol=1e-14)
    c = rng.normal(size=4)
    # cᵀw̄(π) = gain(c)·vec π for every policy (the π_ref term cancels: Σ_a π(a|j) = 1)
    assert geometry.gain(c) @ probs.ravel() == pytest.approx(c @ _wbar(geometry, probs), abs=1e-13)
    np.testing.assert_allclose(
        np.einsum("ja,jad->d", probs, geometry.gains) / 3, _wbar(geometry, probs), atol=1e-14
    )
    np.testing.assert_array_equal(geometry.simplex_rows.toarray(), _simplex_eq(3, 3, 0))


def test_best_response_is_the_best_deterministic_policy_by_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(10):
        m, n_actions = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        scores = rng.normal(size=(m, n_actions))
        best, value = best_response(scores)
        brute = max(
            np.mean([scores[j, a] for j, a in enumerate(acts)])
            for acts in itertools.product(range(n_actions), repeat=m)
        )
        assert value == pytest.approx(brute, abs=1e-14)
        assert np.mean(scores[np.arange(m), best]) == value
    # ties go to the first maximiser, as ``one_hot_argmax``
    np.testing.assert_array_equal(best_response(np.zeros((2, 3)))[0], [0, 0])


def test_mix_vertices_sums_weights_per_state():
    probs = mix_vertices([0.5, 0.3, 0.2], [np.array([0, 1]), np.array([0, 2]), np.array([1, 1])], 3)
    np.testing.assert_allclose(probs, [[0.8, 0.2, 0.0], [0.0, 0.7, 0.3]])


# --------------------------------------------------------------------------- matrix game
def test_matrix_game_value_and_strategies_against_linprog_and_a_closed_form():
    rng = np.random.default_rng(1)
    for _ in range(12):
        game = rng.normal(size=(int(rng.integers(1, 6)), int(rng.integers(1, 6))))
        mu, nu = matrix_game(game)
        assert mu.min() >= 0 and nu.min() >= 0
        assert mu.sum() == pytest.approx(1.0) and nu.sum() == pytest.approx(1.0)
        # the column player's LP, min s s.t. (Gν)_r ≤ s, Σν = 1, ν ≥ 0, solved independently
        n_rows, n_cols = game.shape
        res = linprog(
            np.append(np.zeros(n_cols), 1.0),
            A_ub=np.hstack([game, -np.ones((n_rows, 1))]),
            b_ub=np.zeros(n_rows),
            A_eq=np.append(np.ones(n_cols), 0.0)[None, :],
            b_eq=[1.0],
            bounds=[(0, None)] * n_cols + [(None, None)],
            method="highs",
        )
        value = float(res.fun)
        # μ guarantees the value against every column, ν concedes at most it to every row
        assert (mu @ game).min() == pytest.approx(value, abs=1e-9)
        assert (game @ nu).max() == pytest.approx(value, abs=1e-9)
    # matching pennies: value 0, both players uniform
    mu, nu = matrix_game(np.array([[1.0, -1.0], [-1.0, 1.0]]))
    np.testing.assert_allclose(mu, [0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(nu, [0.5, 0.5], atol=1e-12)
    # a 2×2 game without a saddle point, with D = a − b − c + d:
    # μ_1 = (d − c)/D, ν_1 = (d − b)/D, value (ad − bc)/D
    a, b, c, d = 3.0, -1.0, -2.0, 1.0
    mu, nu = matrix_game(np.array([[a, b], [c, d]]))
    denom = a - b - c + d
    assert mu[0] == pytest.approx((d - c) / denom, abs=1e-12)
    assert nu[0] == pytest.approx((d - b) / denom, abs=1e-12)
    assert mu @ np.array([[a, b], [c, d]]) @ nu == pytest.approx((a * d - b * c) / denom, abs=1e-12)


# --------------------------------------------------------------------------- double oracle
@pytest.mark.parametrize("seed", range(6))
def test_double_oracle_on_a_polytope_matches_the_epigraph_lp(seed):
    """``S = conv{θ_1..θ_C}``: ``min_{θ∈S} θᵀw`` is a minimum over the points, so the max–min is
    an LP over the ``m·K`` probabilities, solved here independently."""
    geometry = _geometry(seed)
    points = np.random.default_rng(50 + seed).normal(size=(4, 4))

    def oracle(w):
        values = points @ w
        return float(values.min()), points[int(np.argmin(values))]

    sol = double_oracle(geometry, [points.mean(axis=0)], oracle, tol=1e-10, max_iter=200)
    optimum = _max_min_lp(geometry, points)
    assert sol.lower <= optimum + 1e-9 <= sol.upper + 2e-9
    assert sol.duality_gap <= 1e-10
    assert sol.lower == pytest.approx(optimum, abs=1e-9)
    np.testing.assert_allclose(sol.probs.sum(axis=1), 1.0, atol=1e-12)
    assert (sol.probs >= 0).all()
    # lower is the true objective of the returned mixture
    assert sol.lower == pytest.approx(float((points @ _wbar(geometry, sol.probs)).min()), abs=1e-12)


def test_double_oracle_gap_is_certified_when_stopped_early():
    geometry = _geometry(7, m=6, n_actions=4, d=5)
    points = np.random.default_rng(7).normal(size=(12, 5))

    def oracle(w):
        values = points @ w
        return float(values.min()), points[int(np.argmin(values))]

    sol = double_oracle(geometry, [points[0]], oracle, tol=1e-12, max_iter=2)
    optimum = _max_min_lp(geometry, points)
    assert sol.n_iter == 2
    assert sol.lower - 1e-12 <= optimum <= sol.upper + 1e-12
    assert optimum - sol.lower <= sol.duality_gap + 1e-12


# --------------------------------------------------------------------------- cutting planes
def test_cutting_plane_lp_matches_a_dense_linprog_and_its_duals_price_the_cuts():
    geometry = _geometry(3)
    rng = np.random.default_rng(3)
    thetas = rng.normal(size=(3, 4))
    cuts = [(u, geometry.gain(thetas[u])) for u in range(3)]
    lp = cutting_plane_lp(geometry, cuts, {})
    assert lp.bound == pytest.approx(_max_min_lp(geometry, thetas), abs=1e-9)
    values = thetas @ _wbar(geometry, lp.probs)
    assert values.min() == pytest.approx(lp.bound, abs=1e-9)
    # duals (≤ 0 for ≤ rows) sum to −1 (the t column) and are 0 on slack cuts
    assert lp.duals.sum() == pytest.approx(-1.0, abs=1e-9)
    assert np.all(np.abs(lp.duals[values > lp.bound + 1e-7]) <= 1e-12)
    # a fixed user's cut is a floor: user 0 kept at its level, t maximised over users 1, 2
    best_0 = best_response(geometry.gain(thetas[0]).reshape(3, 3) * 3)[1]  # max_π Δ_0(π)
    level = 0.5 * (values[0] + best_0)  # halfway between its value above and its best
    lp2 = cutting_plane_lp(geometry, cuts, {0: level})
    values2 = thetas @ _wbar(geometry, lp2.probs)
    assert values2[0] >= level - 1e-9
    assert values2[1:].min() == pytest.approx(lp2.bound, abs=1e-9)
    # the same LP written out: max t s.t. t ≤ Δ_1, Δ_2, Δ_0 ≥ level
    size = 9
    offset = _wbar(geometry, np.zeros((3, 3)))
    coef = np.array([_wbar(geometry, e.reshape(3, 3)) - offset for e in np.eye(size)]) @ thetas.T
    a_ub = np.vstack(
        [
            np.append(-coef[:, 0], 0.0),
            np.append(-coef[:, 1], 1.0),
            np.append(-coef[:, 2], 1.0),
        ]
    )
    b_ub = np.array([thetas[0] @ offset - level, thetas[1] @ offset, thetas[2] @ offset])
    res = linprog(
        np.append(np.zeros(size), -1.0),
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=_simplex_eq(3, 3, 1),
        b_eq=np.ones(3),
        bounds=[(0, None)] * size + [(None, None)],
        method="highs",
    )
    assert lp2.bound == pytest.approx(-res.fun, abs=1e-9)


def test_cutting_plane_lp_reports_infeasible_floors():
    geometry = _geometry(4)
    theta = np.random.default_rng(4).normal(size=4)
    with pytest.raises(PluralignError, match="LP failed"):
        cutting_plane_lp(geometry, [(0, geometry.gain(theta))], {0: 1e6})


@pytest.mark.parametrize("seed", range(4))
def test_kelley_on_ellipsoids_is_certified_and_bounds_a_finite_inner_approximation(seed):
    """Users with ellipsoids ``{θ̂_u + β_u L_u s : ‖s‖ ≤ 1}``: Kelley's value is certified, and no
    better than the max–min against any finite set of points of the ellipsoids (an LP here), which
    it approaches as the set grows."""
    geometry = _geometry(seed, m=3, n_actions=3, d=3)
    rng = np.random.default_rng(10 + seed)
    n_users = 3
    centers = rng.normal(size=(n_users, 3)) * 2
    chol = [
        0.3 * np.linalg.cholesky(np.eye(3) + 0.5 * np.diag(rng.uniform(size=3)))
        for _ in range(n_users)
    ]

    def oracle(w):
        values, worst = [], []
        for u in range(n_users):
            s = chol[u].T @ w
            norm = np.linalg.norm(s)
            theta = centers[u] - chol[u] @ s / norm if norm > 0 else centers[u]
            values.append(theta @ w)
            worst.append(theta)
        return np.array(values), np.array(worst)

    cuts = [(u, geometry.gain(centers[u])) for u in range(n_users)]
    sol = kelley_cutting_planes(
        geometry, oracle, list(range(n_users)), {}, cuts, tol=1e-7, max_iter=500
    )
    assert sol.duality_gap <= 1e-7
    assert oracle(_wbar(geometry, sol.probs))[0].min() == pytest.approx(sol.value, abs=1e-12)
    assert len(cuts) > n_users  # extended in place
    # inner approximation: many points on each ellipsoid's boundary, the worst user's LP
    dirs = rng.normal(size=(400, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    inner = []
    for u in range(n_users):
        inner.append(centers[u] + dirs @ chol[u].T)
    # max_π min_u min_{θ ∈ finite set} ≥ the true max–min (fewer θ to fear)
    assert _max_min_lp(geometry, np.vstack(inner)) >= sol.value - 1e-7
    assert _max_min_lp(geometry, np.vstack(inner)) <= sol.value + 0.05


def _floors_lp(geometry: SimplexGeometry, points: list[np.ndarray], fixed: dict) -> float:
    """``max t`` s.t. ``t ≤ θᵀw̄(π)`` for every point of the free users, ``level_u ≤ θᵀw̄(π)`` for
    every point of a fixed user (dense, HiGHS, coefficients from :func:`_wbar`)."""
    m, n_actions, _ = geometry.phi.shape
    size = m * n_actions
    offset = _wbar(geometry, np.zeros((m, n_actions)))
    coef = np.array([_wbar(geometry, e.reshape(m, n_actions)) - offset for e in np.eye(size)])
    rows, rhs = [], []
    for u, pts in enumerate(points):
        for theta in pts:
            if u in fixed:
                rows.append(np.append(-coef @ theta, 0.0))
                rhs.append(theta @ offset - fixed[u])
            else:
                rows.append(np.append(-coef @ theta, 1.0))
                rhs.append(theta @ offset)
    res = linprog(
        np.append(np.zeros(size), -1.0),
        A_ub=np.array(rows),
        b_ub=np.array(rhs),
        A_eq=_simplex_eq(m, n_actions, 1),
        b_eq=np.ones(m),
        bounds=[(0, None)] * size + [(None, None)],
        method="highs",
    )
    assert res.status == 0
    return -float(res.fun)


@pytest.mark.parametrize("seed", range(4))
def test_kelley_with_fixed_floors_matches_the_lp_over_finite_sets(seed):
    """Users ``Δ̲_u(π) = min_c θ_{u,c}ᵀw̄(π)`` over finitely many points: the second leximin level
    (worst user fixed at the first level) is an LP, solved here with every point written out."""
    geometry = _geometry(20 + seed, m=4, n_actions=3, d=3)
    rng = np.random.default_rng(20 + seed)
    points = [rng.normal(size=(5, 3)) + rng.normal(size=3) for _ in range(3)]

    def oracle(w):
        values = np.array([float((pts @ w).min()) for pts in points])
        worst = np.array([pts[int(np.argmin(pts @ w))] for pts in points])
        return values, worst

    cuts = [(u, geometry.gain(pts.mean(axis=0))) for u, pts in enumerate(points)]
    first = kelley_cutting_planes(geometry, oracle, [0, 1, 2], {}, cuts, tol=1e-9, max_iter=500)
    assert first.value == pytest.approx(_floors_lp(geometry, points, {}), abs=1e-8)
    assert first.duality_gap <= 1e-9
    worst_user = int(np.argmin(oracle(_wbar(geometry, first.probs))[0]))
    fixed = {worst_user: first.value - 1e-9}
    free = [u for u in range(3) if u != worst_user]
    # fresh cuts: the fixed user's floor must be enforced by the cuts Kelley adds itself
    fresh = [(u, geometry.gain(pts.mean(axis=0))) for u, pts in enumerate(points)]
    second = kelley_cutting_planes(geometry, oracle, free, fixed, fresh, tol=1e-9, max_iter=500)
    values = oracle(_wbar(geometry, second.probs))[0]
    assert values[worst_user] >= fixed[worst_user] - 1e-9  # the floor holds
    assert values[free].min() == pytest.approx(second.value, abs=1e-12)
    assert second.value == pytest.approx(_floors_lp(geometry, points, fixed), abs=1e-8)
    assert second.value >= first.value - 1e-8


# --------------------------------------------------------------------------- Frank–Wolfe
def _one_state_instance(seed: int, margin: float):
    """m = 1, K = 2, uniform reference: ``w(p) = (p − ½)Δ`` and
    ``f(p) = (p − ½)a − β|p − ½|s`` with ``a = θ̂ᵀΔ``, ``s = ‖Δ‖_{M⁻¹}``: the optimum is the
    better action with value ``(|a| − βs)/2`` if ``|a| > βs``, else ``p = ½`` with value 0."""
    rng = np.random.default_rng(seed)
    k = 3
    while True:  # draw until θ = 0 ∉ C (the policy handles 0 ∈ C before calling the solver)
        phi = rng.normal(size=(1, 2, k))
        delta = phi[0, 1] - phi[0, 0]
        a_ = rng.normal(size=(k, k))
        M = a_ @ a_.T / k + 0.2 * np.eye(k)
        center = rng.normal(size=k)
        a, s = float(center @ delta), float(np.sqrt(delta @ np.linalg.solve(M, delta)))
        beta = abs(a) / s / margin
        if center @ M @ center > 1.01 * beta**2:
            break
    cs = ConfidenceSet(
        center, M, beta, lam=0.1, n=30, kind="design", bound_feature=1.0, bound_theta=1.0
    )
    data = PreferenceData(
        None, rng.normal(size=(10, k)), rng.normal(size=(10, k)), rng.integers(0, 2, 10)
    )
    return Linear(l2=0.1).fit(data), cs, TargetStates(None, phi), a, s


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("margin", [2.0, 0.5])
def test_frank_wolfe_closed_form_one_state_two_actions(seed, margin):
    model, cs, targets, a, s = _one_state_instance(seed, margin)
    assert not cs.contains(np.zeros(cs.n_params))
    w_ref = targets.phi.mean(axis=1)[0]
    sol = pairwise_frank_wolfe(model, cs, targets, w_ref, tol=1e-9, max_iter=200)
    expected = max(abs(a) - cs.beta * s, 0.0) / 2
    assert sol.value == pytest.approx(expected, abs=1e-8)
    assert -1e-12 <= sol.duality_gap <= 1e-9  # not clipped: rounding may give −1e-17
    if margin > 1:  # |a| > βs: the better action, deterministically
        np.testing.assert_allclose(sol.probs[0], np.eye(2)[int(a > 0)], atol=1e-9)
    else:  # the reference (½, ½) is optimal; any policy with value 0 is p = ½
        np.testing.assert_allclose(sol.probs[0], [0.5, 0.5], atol=1e-6)


def test_frank_wolfe_beats_every_deterministic_policy_and_its_gap_holds():
    rng = np.random.default_rng(11)
    k, m, n_actions = 3, 3, 3
    center = rng.normal(size=k)
    M = np.eye(k)
    beta = 0.6 * np.linalg.norm(center)
    cs = ConfidenceSet(
        center, M, beta, lam=0.1, n=30, kind="design", bound_feature=1.0, bound_theta=1.0
    )
    data = PreferenceData(
        None, rng.normal(size=(10, k)), rng.normal(size=(10, k)), rng.integers(0, 2, 10)
    )
    model = Linear(l2=0.1).fit(data)
    phi = rng.normal(size=(m, n_actions, k))
    w_ref = phi.mean(axis=(0, 1))
    sol = pairwise_frank_wolfe(model, cs, TargetStates(None, phi), w_ref, tol=1e-9, max_iter=500)

    def f(probs):
        w = np.einsum("ja,jak->k", probs, phi) / m - w_ref
        return center @ w - beta * np.linalg.norm(w)

    assert f(sol.probs) == pytest.approx(sol.value, abs=1e-12)
    eye = np.eye(n_actions)
    vertex_best = max(f(eye[list(acts)]) for acts in itertools.product(range(n_actions), repeat=m))
    assert sol.value >= vertex_best - 1e-12
    # weak duality at many θ ∈ C: h(θ) ≥ f(π̂), and the gap certifies the best of them
    for _ in range(200):
        u = rng.normal(size=k)
        theta = center + beta * rng.uniform() ** (1 / k) * u / np.linalg.norm(u)
        h = best_response(phi @ theta)[1] - theta @ w_ref
        assert h >= sol.value - 1e-12


# --------------------------------------------------------------------------- active-set pieces
def test_line_search_matches_a_dense_grid():
    rng = np.random.default_rng(5)
    grid = np.linspace(0.0, 1.0, 200001)
    for _ in range(30):
        # q(γ) = ‖u + γv‖² for random u, v keeps c, e, g a valid quadratic (Δ = cg − e² ≥ 0)
        u, v = rng.normal(size=3), rng.normal(size=3)
        c, e, g = float(u @ u), float(u @ v), float(v @ v)
        b, beta = float(rng.normal()), float(rng.uniform(0.1, 2.0))
        gamma = line_search(b, c, e, g, beta)
        values = grid * b - beta * np.sqrt(np.maximum(c + 2 * grid * e + grid**2 * g, 0))
        best = values.max()
        assert 0.0 <= gamma <= 1.0
        assert gamma * b - beta * np.sqrt(max(c + 2 * gamma * e + gamma**2 * g, 0)) >= best - 1e-9


def _simplex_grid(n: int, steps: int) -> np.ndarray:
    pts = [p for p in itertools.product(range(steps + 1), repeat=n - 1) if sum(p) <= steps]
    return np.array([[*p, steps - sum(p)] for p in pts], float) / steps


def test_corrective_and_escape_cone_reach_the_simplex_optimum_on_a_grid():
    rng = np.random.default_rng(6)
    grid = _simplex_grid(3, 300)
    for _ in range(8):
        vecs = rng.normal(size=(3, 2))
        gram = vecs @ vecs.T
        lin = rng.normal(size=3)
        beta = float(rng.uniform(0.2, 1.5))

        def g(lam, lin=lin, gram=gram, beta=beta):
            return lin @ lam - beta * np.sqrt(max(lam @ gram @ lam, 0.0))

        grid_best = float(
            np.max(
                grid @ lin
                - beta * np.sqrt(np.maximum(np.einsum("pi,ij,pj->p", grid, gram, grid), 0))
            )
        )
        lam = pairwise_corrective(lin, gram, np.eye(3)[int(np.argmax(lin))], beta, 1e-12, 5000)
        escaped = escape_cone(lin, gram, lam, beta)
        assert g(escaped) >= g(lam) - 1e-15  # escape_cone only keeps improvements
        assert abs(escaped.sum() - 1.0) < 1e-12 and escaped.min() >= 0
        assert g(escaped) >= grid_best - 1e-6
        assert g(escaped) <= grid_best + 0.02  # the grid is within its resolution


def test_restricted_dual_is_feasible_and_closes_the_gap():
    """The dual point ``θ = θ̂ + βΣα_i M⁻¹v_i`` lies in ``C`` (``αᵀGα ≤ 1``) and its
    ``max_i θᵀv_i`` is ``min_{θ∈C} max_i θᵀv_i``: checked against a polar grid of the ball
    (``M = I``, ``v_i ∈ R²``, so ``θ − θ̂ = βδ`` with ``‖δ‖ ≤ 1``), and bounded below by
    ``max_λ g(λ)`` on a simplex grid (weak duality), including at the cone point where the
    optimum has ``Σλ_i v_i = 0``."""
    rng = np.random.default_rng(8)
    angles = np.linspace(0.0, 2 * np.pi, 1441)
    radii = np.linspace(0.0, 1.0, 301)
    disc = (radii[:, None, None] * np.stack([np.cos(angles), np.sin(angles)], -1)).reshape(-1, 2)
    simplex = _simplex_grid(4, 40)
    for case in range(6):
        vecs = rng.normal(size=(4, 2))
        if case % 2:  # make 0 a convex combination: the cone point
            vecs[3] = -vecs[:3].mean(axis=0) * 3
        gram = vecs @ vecs.T
        lin = rng.normal(size=4) * 0.1
        beta = 1.0
        alpha = restricted_dual(lin, gram, beta)
        assert alpha @ gram @ alpha <= 1.0 + 1e-9
        dual = float(np.max(lin + beta * gram @ alpha))
        on_grid = float(np.min(np.max(lin[None, :] + beta * disc @ vecs.T, axis=1)))
        assert dual <= on_grid + 1e-9  # no grid point of C does better
        assert dual >= on_grid - 2e-3  # and the grid comes close (its resolution)
        quad = np.maximum(np.einsum("pi,ij,pj->p", simplex, gram, simplex), 0.0)
        primal = float(np.max(simplex @ lin - beta * np.sqrt(quad)))
        assert dual >= primal - 1e-9  # weak duality
