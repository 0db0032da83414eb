"""P-ShareLoRA (linear): multi-user (aggregated) policies (from the former test_multi_user.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from pluralign.confidence import ConfidenceSet
from pluralign.data import PreferenceData, TargetStates
from pluralign.envs import MultiUser
from pluralign.policies import Leximin, PerUserPolicies, Pessimistic, Utilitarian
from pluralign.rewards import PerUser, SharedBasis

# Tests that ask for a gradient tolerance below the float64 floor of their problem (~1e-9) fit
# until the objective stops decreasing, the most accurate estimate float64 gives; the
# precision-floor ConvergenceWarning that says so is expected there. Only that variant is ignored.
AT_FLOOR = pytest.mark.filterwarnings(
    "ignore:.*stopped decreasing at float64 precision:pluralign.errors.ConvergenceWarning"
)


@pytest.fixture(scope="module")
def env() -> MultiUser:
    return MultiUser(n_users=6, d_phi=5, rank=2, diversity=1.0, n_per_user=60, seed=3)


@pytest.fixture(scope="module")
def train(env: MultiUser) -> PreferenceData:
    return env.sample_offline(seed=[1])


# --------------------------------------------------------------------------- policies
def _truth_model(env: MultiUser) -> PerUser:
    return PerUser.from_arrays(
        {"theta0": env.theta0_star, "thetas": env.thetas_star, "user_counts": np.ones(env.n_users)},
        env.users,
        n_train=1,
    )


def _gains(thetas: np.ndarray, targets) -> np.ndarray:
    """``G[u, j·K + a] = θ_uᵀ(φ(j, a) − φ̄_j)/m``: user u's improvement over the uniform
    reference is ``G[u] @ vec(π)``, linear in the policy."""
    ref = targets.phi.mean(axis=1, keepdims=True)
    return np.einsum("mkd,ud->umk", targets.phi - ref, thetas).reshape(len(thetas), -1) / targets.m


def _simplex_rows(m: int, k: int, extra: int = 0) -> np.ndarray:
    """Equality rows ``Σ_a π(a|j) = 1`` over ``[vec π, extra variables]``."""
    a_eq = np.zeros((m, m * k + extra))
    for j in range(m):
        a_eq[j, j * k : (j + 1) * k] = 1.0
    return a_eq


def _ordered_sums_oracle(gains: np.ndarray, m: int, k: int, slack: float = 1e-9) -> np.ndarray:
    """Leximin by Ogryczak's cumulative ordered outcomes (an LP per level, scipy linprog):
    level ℓ maximises ``S_ℓ(π)`` = the sum of the ℓ smallest ``Δ_u(π)``, written as
    ``max ℓτ − Σ_u d_u, d_u ≥ τ − Δ_u(π), d ≥ 0``, subject to ``S_i(π) ≥ S_i* − slack`` for the
    earlier levels. Lexicographically maximising ``(S_1, …, S_U)`` is leximin. Returns
    ``(S_1*, …, S_U*)``."""
    from scipy.optimize import linprog

    n_users, size = gains.shape
    block = 1 + n_users  # (τ_ℓ, d_ℓ) per level
    sums: list[float] = []
    for level in range(1, n_users + 1):
        n_var = size + level * block
        rows, rhs = [], []
        for i in range(level):  # τ_i − G_u π − d_{i,u} ≤ 0
            for u in range(n_users):
                row = np.zeros(n_var)
                row[:size] = -gains[u]
                row[size + i * block] = 1.0
                row[size + i * block + 1 + u] = -1.0
                rows.append(row)
                rhs.append(0.0)
        for i, value in enumerate(sums):  # −(i+1)τ_i + Σ d_i ≤ −(S_i* − slack)
            row = np.zeros(n_var)
            row[size + i * block] = -(i + 1.0)
            row[size + i * block + 1 : size + (i + 1) * block] = 1.0
            rows.append(row)
            rhs.append(-(value - slack))
        c = np.zeros(n_var)
        c[size + (level - 1) * block] = -float(level)
        c[size + (level - 1) * block + 1 :] = 1.0
        bounds = [(0, None)] * size + ([(None, None)] + [(0, None)] * n_users) * level
        res = linprog(
            c,
            A_ub=np.array(rows),
            b_ub=rhs,
            A_eq=_simplex_rows(m, k, n_var - size),
            b_eq=np.ones(m),
            bounds=bounds,
            method="highs",
        )
        assert res.status == 0
        sums.append(-res.fun)
    return np.array(sums)


def _lcb_stack(model, data, beta: float) -> list[tuple[np.ndarray, ...]]:
    """Each user's view ``A``, centre, ``M⁻¹`` and ``β`` (the inputs of the aggregate solvers)."""
    out = []
    for u in model.users_:
        view = model.user_model(u)
        cs = ConfidenceSet.fit(view, model.confidence_rows(u, data), beta=beta)
        out.append((view.basis, cs.center, np.linalg.inv(cs.M), cs.beta))
    return out


def _lcb_values(pi: np.ndarray, targets, stack) -> tuple[np.ndarray, np.ndarray]:
    """``Δ̲_u(π) = v̂_uᵀAᵀw̄ − β_u‖Aᵀw̄‖_{M_u⁻¹}`` (w̄ = mean over states of E_π φ − φ̄) for every
    user, and their gradients in ``vec π``, written out with numpy."""
    m, k, d = targets.phi.shape
    flat = targets.phi.reshape(m * k, d) / m
    w = pi @ flat - targets.phi.mean(axis=1).mean(axis=0)
    values, grads = [], []
    for basis, center, m_inv, beta in stack:
        g = basis.T @ w
        norm = np.sqrt(max(g @ m_inv @ g, 1e-300))
        values.append(center @ g - beta * norm)
        grads.append(flat @ (basis @ (center - beta * (m_inv @ g) / norm)))
    return np.array(values), np.array(grads)


def _slsqp_oracle(targets, stack, aggregate: str, starts: int = 4, seed: int = 0) -> float:
    """Best of several SLSQP runs from random interior policies over the product of simplices:
    ``max mean_u Δ̲_u(π)`` (utilitarian) or, in epigraph form, ``max t s.t. Δ̲_u(π) ≥ t``
    (max–min). Both objectives are concave, so any run that converges is at the optimum."""
    m, k = targets.phi.shape[:2]
    size = m * k
    rng = np.random.default_rng(seed)
    a_eq = _simplex_rows(m, k, 1)
    eq = {"type": "eq", "fun": lambda z: a_eq @ z - 1.0, "jac": lambda z: a_eq}
    best = -np.inf
    for _ in range(starts):
        pi0 = rng.dirichlet(np.ones(k), size=m).ravel()
        t0 = _lcb_values(pi0, targets, stack)[0].min()
        if aggregate == "mean":

            def fun(z):
                values, grads = _lcb_values(z[:size], targets, stack)
                return -values.mean(), np.append(-grads.mean(axis=0), 0.0)

            constraints = [eq]
        else:

            def fun(z):
                return -z[-1], np.append(np.zeros(size), -1.0)

            def ineq(z):
                return _lcb_values(z[:size], targets, stack)[0] - z[-1]

            def ineq_jac(z):
                grads = _lcb_values(z[:size], targets, stack)[1]
                return np.hstack([grads, -np.ones((len(grads), 1))])

            constraints = [eq, {"type": "ineq", "fun": ineq, "jac": ineq_jac}]
        res = minimize(
            fun,
            np.append(pi0, t0),
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * size + [(None, None)],
            constraints=constraints,
            options={"ftol": 1e-13, "maxiter": 500},
        )
        pi = np.clip(res.x[:size], 0.0, None).reshape(m, k)
        pi /= pi.sum(axis=1, keepdims=True)  # project onto the simplices: a feasible policy
        values = _lcb_values(pi.ravel(), targets, stack)[0]
        best = max(best, values.mean() if aggregate == "mean" else values.min())
    return float(best)


def test_plug_in_utilitarian_is_greedy_on_the_mean_reward(env):
    """Without pessimism the weighted mean improvement is linear in π: its maximum over the
    product of simplices, by an independent LP (scipy linprog, HiGHS), is reached."""
    from scipy.optimize import linprog

    targets = env.sample_targets(30, seed=[3])
    weights = np.array([1, 2, 3, 0, 0, 1])
    policy = Utilitarian(_truth_model(env), weights=weights)
    probs = policy.probs(targets)
    mean = weights @ env.thetas_star / weights.sum()
    np.testing.assert_array_equal(probs.argmax(1), (targets.phi @ mean).argmax(1))
    objective = weights @ _gains(env.thetas_star, targets) / weights.sum()
    m, k = targets.phi.shape[:2]
    res = linprog(
        -objective, A_eq=_simplex_rows(m, k), b_eq=np.ones(m), bounds=(0, None), method="highs"
    )
    achieved = env.user_values(probs, targets) - env.user_values(np.full((m, k), 1 / k), targets)
    assert weights @ achieved / weights.sum() == pytest.approx(-res.fun, abs=1e-10)
    assert policy.objective_ == pytest.approx(-res.fun, abs=1e-10)


def test_plug_in_leximin_matches_the_dual_by_grid_search():
    """Two users: max_π min_u Δ_u(π) = min_{λ∈[0,1]} mean_j max_a (λΔ_1 + (1−λ)Δ_2)(j, a)."""
    env = MultiUser(n_users=2, d_phi=4, rank=2, diversity=2.0, n_actions=4, seed=5)
    targets = env.sample_targets(15, seed=[2])
    policy = Leximin(_truth_model(env), levels=1)
    probs = policy.probs(targets)
    ref = targets.phi.mean(axis=1, keepdims=True)
    gains = np.einsum("mkd,ud->umk", targets.phi - ref, env.thetas_star)  # Δ_u(j, a)
    lams = np.linspace(0.0, 1.0, 20001)
    dual = min(np.mean(np.max(lam * gains[0] + (1 - lam) * gains[1], axis=1)) for lam in lams)
    assert policy.objective_ == pytest.approx(dual, abs=1e-4)
    achieved = np.einsum("mk,umk->u", probs, gains) / targets.m
    assert achieved.min() == pytest.approx(policy.objective_, abs=1e-9)
    assert policy.converged_


def _check_leximin(model, targets, thetas, tol=2e-6) -> np.ndarray:
    """Full leximin's sorted user improvements against the ordered-sums oracle, every level."""
    gains = _gains(thetas, targets)
    oracle = _ordered_sums_oracle(gains, targets.m, targets.phi.shape[1])
    lex = Leximin(model)
    probs = lex.probs(targets)
    assert np.allclose(probs.sum(1), 1.0) and (probs >= 0).all()
    ours = np.cumsum(np.sort(gains @ probs.ravel()))
    assert ours[0] == pytest.approx(oracle[0], abs=tol)  # pluralign fixes levels at level − tol
    assert ours[1] >= oracle[1] - tol  # the second level
    assert np.all(ours >= oracle - 5 * tol)
    assert np.all(np.diff(lex.levels_) >= -1e-6)
    return oracle


def test_full_leximin_raises_the_second_level(env):
    """Full leximin against an independent exact oracle (Ogryczak's cumulative ordered sums, one
    LP per level): the returned policy's sorted user improvements reach the oracle's at every
    level. A generic instance has a unique max–min policy, so the second level is tested on a
    built one where the max–min optimum is a whole face: user 0 is the bottleneck (its best is
    1/6, from state 0 alone), and any split q ∈ [4/9, 5/9] of state 1 between users 1 and 2
    keeps both above it; only q = 1/2 (both at 1/4) raises the second level."""
    targets = env.sample_targets(20, seed=[7])
    _check_leximin(_truth_model(env), targets, env.thetas_star)

    thetas = np.array([[0.5, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    phi = np.array(
        [
            [[1.0, 0, 0], [0, 0, 0], [0, 0, 0]],  # state 0: only user 0 cares
            [[0, 3.0, 0], [0, 0, 3.0], [0, 0, 0]],
        ]
    )  # state 1: users 1 and 2 trade off
    model = PerUser.from_arrays(
        {"theta0": thetas.mean(0), "thetas": thetas, "user_counts": np.ones(3)},
        [0, 1, 2],
        n_train=1,
    )
    oracle = _check_leximin(model, TargetStates(None, phi), thetas)
    np.testing.assert_allclose(
        np.diff(np.concatenate([[0.0], oracle])), [1 / 6, 0.25, 0.25], atol=1e-8
    )


def test_pessimistic_aggregates_with_one_user_equal_pessimistic(env, train):
    model = SharedBasis(2, 1.0 / train.n).fit(train)
    targets = env.sample_targets(25, seed=[8])
    per_user = PerUserPolicies(model, train, beta=0.5)
    single = per_user.policy(3)
    assert isinstance(single, Pessimistic)
    single.probs(targets)
    for cls in (Utilitarian, Leximin):
        policy = cls(model, train, users=[3], beta=0.5, tol=1e-8)
        policy.probs(targets)
        assert policy.objective_ == pytest.approx(single.pessimistic_value_, abs=1e-5)


def test_pessimistic_utilitarian_is_optimal_and_certified(env, train):
    """The pessimistic utilitarian objective mean_u Δ̲_u(π), written out in the test from each
    user's confidence set, maximised by SLSQP over the product of simplices from several random
    starts: pluralign's value is no worse, and its certified gap bounds the distance."""
    model = PerUser(1.0 / train.n).fit(train)
    targets = env.sample_targets(5, seed=[9])
    policy = Utilitarian(model, train, beta=0.3, tol=1e-6)
    probs = policy.probs(targets)
    assert policy.converged_ and policy.duality_gap_ <= 1e-6
    stack = _lcb_stack(model, train, 0.3)
    ours = _lcb_values(probs.ravel(), targets, stack)[0].mean()
    assert ours == pytest.approx(policy.objective_, abs=1e-9)
    oracle = _slsqp_oracle(targets, stack, "mean")
    assert ours >= oracle - 1e-7
    assert oracle <= ours + policy.duality_gap_ + 1e-9
    assert oracle >= ours - 1e-6  # the oracle reached the optimum too (ours is feasible)
    # pessimism matters here: the plug-in greedy policy of the mean reward is clearly worse
    greedy = Utilitarian(model).probs(targets)
    assert _lcb_values(greedy.ravel(), targets, stack)[0].mean() < oracle - 1e-4


def test_pessimistic_leximin_is_the_max_min_optimum(env, train):
    """Max–min of the pessimistic improvements Δ̲_u(π) (SharedBasis views), against SLSQP on
    the epigraph form max t s.t. Δ̲_u(π) ≥ t over the product of simplices, several starts."""
    model = SharedBasis(2, 1.0 / train.n).fit(train)
    targets = env.sample_targets(5, seed=[10])
    policy = Leximin(model, train, beta=0.5, levels=1, tol=1e-7)
    probs = policy.probs(targets)
    assert policy.converged_
    stack = _lcb_stack(model, train, 0.5)
    ours = _lcb_values(probs.ravel(), targets, stack)[0].min()
    assert ours == pytest.approx(policy.objective_, abs=1e-9)
    oracle = _slsqp_oracle(targets, stack, "min")
    assert ours >= oracle - 1e-7
    assert oracle <= ours + policy.duality_gap_ + 1e-9
    assert oracle >= ours - 1e-6  # the oracle reached the optimum too (ours is feasible)
    greedy = Utilitarian(model).probs(targets)
    assert _lcb_values(greedy.ravel(), targets, stack)[0].min() < oracle - 1e-3


@AT_FLOOR
def test_frozen_basis_fit_matches_independent_solvers():
    """The frozen-basis fit (the core of ``adapt_user``): ŵ minimises (1/n) Σ −log σ(s_i(θ0 +
    B w_{u_i})ᵀΔφ_i) + (λ/2)‖W‖². Checked three independent ways: the closed-form gradient of
    that objective vanishes at ŵ; a Newton solver written here (exact Hessian) reaches the same
    ŵ; and with θ0 = 0 (no offset) ŵ is scikit-learn's LogisticRegression on the explicit
    features e_u ⊗ BᵀΔφ with C = 1/(nλ)."""
    from sklearn.linear_model import LogisticRegression

    from pluralign.rewards.shared_basis import _FrozenBasis

    rng = np.random.default_rng(5)
    d_phi, k, n_users, n, l2 = 6, 2, 3, 400, 1e-2
    theta0, basis = rng.standard_normal(d_phi), np.linalg.qr(rng.standard_normal((d_phi, k)))[0]
    users = rng.integers(0, n_users, size=n)
    x = np.eye(n_users)[users]
    phi0, phi1 = rng.standard_normal((n, d_phi)), rng.standard_normal((n, d_phi))
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(phi1 - phi0) @ (theta0 + basis[:, 0])))).astype(int)
    data = PreferenceData(x, phi0, phi1, y)
    z = (x[:, :, None] * ((phi1 - phi0) @ basis)[:, None, :]).reshape(n, -1)  # e_u ⊗ BᵀΔφ
    sign = 2.0 * y - 1.0

    def grad_hess(w, offset):
        margin = offset + z @ w
        p = 1.0 / (1.0 + np.exp(sign * margin))  # σ(−s m)
        grad = -(z * (sign * p)[:, None]).mean(axis=0) + l2 * w
        hess = (z * (p * (1 - p))[:, None]).T @ z / n + l2 * np.eye(z.shape[1])
        return grad, hess

    for offset_theta in (theta0, np.zeros(d_phi)):
        offset = (phi1 - phi0) @ offset_theta
        model = _FrozenBasis(offset_theta, basis, n_users, l2=l2, tol=1e-10).fit(data)
        w_hat = model.weights_.ravel()
        assert np.abs(grad_hess(w_hat, offset)[0]).max() < 1e-7
        w = np.zeros(z.shape[1])
        for _ in range(30):
            grad, hess = grad_hess(w, offset)
            w = w - np.linalg.solve(hess, grad)
        np.testing.assert_allclose(w_hat, w, atol=1e-6)
        thetas = offset_theta + model.weights_ @ basis.T
        np.testing.assert_allclose(model.reward(x, phi1), np.sum(thetas[users] * phi1, axis=1))
    sk = LogisticRegression(fit_intercept=False, C=1.0 / (n * l2), tol=1e-12, max_iter=10_000)
    np.testing.assert_allclose(w_hat, sk.fit(z, y).coef_.ravel(), atol=1e-6)
