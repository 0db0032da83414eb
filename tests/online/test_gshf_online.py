"""Online iterative GSHF: the enhancer's constraint and search, the baselines, the loop."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.data import TargetStates
from pluralign.envs import KLBandit
from pluralign.errors import PluralignError
from pluralign.online import Enhancer, OnlineGSHF, RoundState, Symmetric, Uniform, sample_actions
from pluralign.policies import gibbs_probs, kl_divergence
from pluralign.rewards import Linear


def round_state(n_data: int, eta: float, seed: int = 0) -> tuple[KLBandit, RoundState]:
    """A round of the loop: the main agent fitted on ``n_data`` comparisons (0: no data)."""
    env = KLBandit(d=5, n_actions=6, eta=eta, seed=seed)
    states = env.sample_targets(40, seed=seed + 1)
    if n_data:
        data = env.sample_offline(n_data, seed=seed + 2)
        model = Linear(l2=1.0 / n_data).fit(data)
        theta = model.theta_
        cs = ConfidenceSet.fit(model, data, beta=beta_rate(5, n_data))
    else:
        theta = np.zeros(5)
        cs = ConfidenceSet(
            theta,
            np.eye(5),
            beta_rate(5, 1),
            lam=1.0,
            n=0,
            kind="design",
            bound_feature=0.0,
            bound_theta=0.0,
        )
    main = gibbs_probs(states.phi @ theta, env.reference_probs(states), eta)
    return env, RoundState(states=states, main_probs=main, theta=theta, confidence=cs, eta=eta)


def uncertainty_of(state: RoundState, probs: np.ndarray) -> float:
    """``β ‖E_x[φ(π¹) − φ(π′)]‖_{M⁻¹}`` with an explicit inverse (an independent computation)."""
    w = np.einsum("ja,jad->d", state.main_probs - probs, state.states.phi) / state.states.m
    return float(state.confidence.beta * np.sqrt(w @ np.linalg.inv(state.confidence.M) @ w))


@pytest.mark.parametrize(("n_data", "eta"), [(0, 0.2), (50, 0.2), (400, 0.05), (400, 1.0)])
def test_enhancer_choice_respects_its_kl_constraint(n_data, eta):
    _, state = round_state(n_data, eta)
    probs, info = Enhancer(n_directions=3).second_policy(state)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    unc = uncertainty_of(state, probs)
    kl = float(np.mean(kl_divergence(probs, state.main_probs)))
    assert unc > 0.0 and kl > 0.0  # it explored
    assert eta * kl <= unc  # the constraint η KL(π′‖π¹) ≤ U(π′)
    assert info["uncertainty"] == pytest.approx(unc, rel=1e-9)
    assert info["explore_kl"] == pytest.approx(kl, rel=1e-9, abs=1e-12)


def tiny_state(seed: int, m: int, n_actions: int, d: int, beta: float, eta: float) -> RoundState:
    """A random round: Gaussian features, a Dirichlet main agent, a random SPD ``M``."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(m, n_actions, d))
    main = rng.dirichlet(np.ones(n_actions), size=m)
    a = rng.normal(size=(d, d))
    cs = ConfidenceSet(
        np.zeros(d),
        a @ a.T / d + 0.3 * np.eye(d),
        beta,
        lam=1.0,
        n=0,
        kind="design",
        bound_feature=0.0,
        bound_theta=0.0,
    )
    return RoundState(
        states=TargetStates(None, phi), main_probs=main, theta=np.zeros(d), confidence=cs, eta=eta
    )


def constrained_optimum(state: RoundState, n_starts: int = 12) -> float:
    """``max U(π′)`` s.t. ``η E_x KL(π′‖π¹) ≤ U(π′)`` over *all* policies: SLSQP over the
    product of simplices (``m·K`` variables) from random Dirichlet starts, explicit ``M⁻¹``;
    independent of the enhancer's Gibbs-tilt parametrization."""
    phi, main, eta = state.states.phi, state.main_probs, state.eta
    m, k, _ = phi.shape
    m_inv, beta = np.linalg.inv(state.confidence.M), state.confidence.beta
    mu1 = np.einsum("ja,jad->d", main, phi) / m

    def unc(p):
        w = mu1 - np.einsum("ja,jad->d", p.reshape(m, k), phi) / m
        return beta * np.sqrt(w @ m_inv @ w)

    def d_unc(p):
        w = mu1 - np.einsum("ja,jad->d", p.reshape(m, k), phi) / m
        return (-beta * (phi @ (m_inv @ w)) / (m * max(np.sqrt(w @ m_inv @ w), 1e-300))).ravel()

    def kl(p):
        q = np.maximum(p.reshape(m, k), 1e-300)
        return float(np.sum(q * np.log(q / main)) / m)

    def d_kl(p):
        return ((np.log(np.maximum(p.reshape(m, k), 1e-300) / main) + 1) / m).ravel()

    constraints = [
        {
            "type": "eq",
            "fun": lambda p: p.reshape(m, k).sum(axis=1) - 1,
            "jac": lambda p: np.kron(np.eye(m), np.ones((1, k))),
        },
        {
            "type": "ineq",
            "fun": lambda p: unc(p) - eta * kl(p),
            "jac": lambda p: d_unc(p) - eta * d_kl(p),
        },
    ]
    rng = np.random.default_rng(0)
    best = 0.0
    for _ in range(n_starts):
        start = rng.dirichlet(np.full(k, 0.5), size=m).ravel()
        res = minimize(
            lambda p: -unc(p),
            start,
            jac=lambda p: -d_unc(p),
            method="SLSQP",
            bounds=[(1e-12, 1.0)] * (m * k),
            constraints=constraints,
            options={"maxiter": 500, "ftol": 1e-14},
        )
        p = np.maximum(res.x.reshape(m, k), 0.0)
        p = (p / p.sum(axis=1, keepdims=True)).ravel()
        if eta * kl(p) <= unc(p) * (1 + 1e-7):
            best = max(best, unc(p))
    return best


# instances where the constraint binds and the eigen-direction scan alone falls 2–9% short
@pytest.mark.parametrize(
    ("seed", "m", "n_actions", "d", "beta", "eta"),
    [
        (0, 3, 4, 3, 0.3, 0.3),
        (0, 3, 4, 2, 1.0, 1.0),
        (4, 3, 4, 2, 1.0, 1.0),
        (6, 3, 4, 3, 0.3, 0.3),
    ],
)
def test_enhancer_reaches_the_constrained_optimum_over_all_policies(
    seed, m, n_actions, d, beta, eta
):
    state = tiny_state(seed, m, n_actions, d, beta, eta)
    optimum = constrained_optimum(state)
    enhancer = Enhancer(n_directions=d)
    probs, info = enhancer.second_policy(state)
    unc = uncertainty_of(state, probs)
    kl = float(np.mean(kl_divergence(probs, state.main_probs)))
    assert eta * kl <= unc  # feasible, recomputed independently
    assert unc == pytest.approx(optimum, rel=1e-3)
    # the certificate is a valid upper bound on the optimum over all policies
    assert enhancer.bound_ >= optimum * (1 - 1e-9)
    assert info["explore_certified_gap"] == pytest.approx(enhancer.bound_ - unc, abs=1e-9)
    # the test discriminates: the eigen-direction scan alone stops short of the optimum
    _, scan = Enhancer(n_directions=d, exact=False).second_policy(state)
    assert scan["uncertainty"] < optimum * (1 - 1e-2)
    assert "explore_bound" not in scan


def test_enhancer_directions_are_generalized_eigenvectors():
    _, state = round_state(200, 0.2, seed=3)
    enhancer = Enhancer(n_directions=3)
    _, info = enhancer.second_policy(state)
    assert info["uncertainty"] >= info["explore_eigen_uncertainty"]  # never worse than the scan
    vecs, lam = enhancer.directions(state)
    np.testing.assert_allclose(vecs.T @ state.confidence.M @ vecs, np.eye(3), atol=1e-10)
    assert np.all(np.diff(lam) <= 0)
    cov = (
        sum(
            np.cov(state.states.phi[j].T, aweights=state.main_probs[j], bias=True)
            for j in range(state.states.m)
        )
        / state.states.m
    )
    np.testing.assert_allclose(cov @ vecs, state.confidence.M @ vecs * lam, atol=1e-9)


def test_symmetric_and_uniform_second_policies():
    _, state = round_state(100, 0.3)
    same, info = Symmetric().second_policy(state)
    np.testing.assert_array_equal(same, state.main_probs)
    assert info["uncertainty"] == 0.0
    flat, info = Uniform().second_policy(state)
    np.testing.assert_allclose(flat, 1 / 6)
    assert info["uncertainty"] == pytest.approx(uncertainty_of(state, flat))


def test_sample_actions_follows_the_probabilities():
    rng = np.random.default_rng(0)
    probs = np.tile([0.1, 0.0, 0.6, 0.3], (20000, 1))
    actions = sample_actions(probs, rng)
    freq = np.bincount(actions, minlength=4) / actions.size
    np.testing.assert_allclose(freq, probs[0], atol=0.015)
    assert freq[1] == 0.0


@pytest.fixture(scope="module")
def small_env():
    env = KLBandit(d=4, n_actions=5, eta=0.3, seed=5)
    return env, env.sample_targets(200, seed=6)


def run_loop(env, states, **kwargs):
    params = {"batch_size": 60, "n_rounds": 3, "seed": 7, **kwargs}
    return OnlineGSHF(**params).fit(env, eval_states=states)


def without_time(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.parametrize("exploration", ["enhancer", "symmetric", "uniform"])
def test_loop_reproduces_exactly_from_its_seed(small_env, exploration):
    env, states = small_env
    first = run_loop(env, states, exploration=exploration)
    again = run_loop(env, states, exploration=exploration)
    assert without_time(first.history_) == without_time(again.history_)
    for name in ("phi0", "phi1", "y"):
        np.testing.assert_array_equal(getattr(first.data_, name), getattr(again.data_, name))
    np.testing.assert_array_equal(first.theta_, again.theta_)
    other = run_loop(env, states, exploration=exploration, seed=8)
    assert not np.array_equal(first.data_.phi0, other.data_.phi0)


def test_loop_records_rounds_budget_and_gap(small_env):
    env, states = small_env
    loop = run_loop(env, states, exploration="enhancer", n_rounds=4)
    history = loop.history_
    assert [h["round"] for h in history] == [0, 1, 2, 3, 4]
    assert [h["comparisons"] for h in history] == [0, 60, 120, 180, 240]
    assert loop.data_.n == 240
    assert history[0]["gap"] == pytest.approx(env.gap(env.reference_probs(states), states))
    assert all(h["gap"] >= 0 for h in history)
    assert history[-1]["gap"] < history[0]["gap"]  # learning beats π0
    # the recorded gap is that of the returned main agent
    assert env.gap(loop.policy_.probs(states), states) == pytest.approx(history[-1]["gap"])
    assert all(h["uncertainty"] > 0 for h in history[1:])


def test_hybrid_starts_from_the_offline_mle(small_env):
    env, states = small_env
    offline = env.sample_offline(150, seed=9)
    loop = OnlineGSHF("symmetric", batch_size=50, n_rounds=2, seed=1).fit(
        env, offline=offline, eval_states=states
    )
    mle = Linear(l2=1.0 / 150).fit(offline)
    start = gibbs_probs(states.phi @ mle.theta_, env.reference_probs(states), env.eta)
    assert loop.history_[0]["gap"] == pytest.approx(env.gap(start, states), rel=1e-6)
    assert [h["total_comparisons"] for h in loop.history_] == [150, 200, 250]
    np.testing.assert_array_equal(loop.data_.phi0[:150], offline.phi0)


def test_distinct_pairs_never_compares_a_response_with_itself(small_env):
    env, states = small_env
    loop = run_loop(env, states, exploration="symmetric", distinct_pairs=True, n_rounds=2)
    assert (np.abs(loop.data_.delta_phi).sum(axis=1) > 0).all()
    assert all(h["identical_pairs"] == 0.0 for h in loop.history_[1:])


def test_loop_validates_its_parameters(small_env):
    env, states = small_env
    for bad in ({"batch_size": 0}, {"n_rounds": 1.5}, {"exploration": "greedy"}, {"ridge": 0.0}):
        with pytest.raises(PluralignError):
            run_loop(env, states, **bad)
    with pytest.raises(PluralignError):
        Enhancer(n_directions=0)
