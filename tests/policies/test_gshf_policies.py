"""GSHF (seed 002) in the bandit layer: the KL bandit's exact quantities and the Gibbs policies.

Oracles are brute force (a grid over the simplex, a generic optimizer over logits) or closed
forms (the Gibbs variational principle, ``J_η(π*) − J_η(π) = η KL(π‖π*)``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.data import TargetStates
from pluralign.envs import KLBandit
from pluralign.errors import ConfigError, PluralignError
from pluralign.policies import Gibbs, PessimisticGibbs, gibbs_probs, kl_divergence, soft_value
from pluralign.rewards import Linear


def simplex_grid(k: int, steps: int) -> np.ndarray:
    """Every point of the simplex in R^k with coordinates in multiples of 1/steps."""
    pts = [c for c in itertools.product(range(steps + 1), repeat=k - 1) if sum(c) <= steps]
    grid = np.array([[*c, steps - sum(c)] for c in pts], dtype=float)
    return grid / steps


def per_state_objective(
    probs: np.ndarray, rewards: np.ndarray, ref: np.ndarray, eta: float
) -> np.ndarray:
    """``Σ_a π r − η KL(π‖π0)`` for rows of candidate policies of one state."""
    return probs @ rewards - eta * kl_divergence(probs, ref[None, :])


# ---------------------------------------------------------------------- Gibbs = argmax J_η
@pytest.mark.parametrize("eta", [0.1, 0.5, 2.0])
def test_gibbs_equals_brute_force_maximisation_of_J_eta(eta):
    env = KLBandit(d=3, n_actions=3, eta=eta, ref_scale=1.5, seed=7)
    states = env.sample_targets(4, seed=1)
    rewards, ref = env.true_reward(states), env.reference_probs(states)
    gibbs = env.optimal_probs(states)
    grid = simplex_grid(3, 200)
    for j in range(states.m):
        values = per_state_objective(grid, rewards[j], ref[j], eta)
        best = grid[np.argmax(values)]
        gibbs_value = per_state_objective(gibbs[j][None], rewards[j], ref[j], eta)[0]
        assert gibbs_value >= values.max() - 1e-12  # no grid policy beats it
        assert np.abs(best - gibbs[j]).max() <= 1.5 / 200  # the grid optimum is next to it

        # a generic optimizer over logits lands on it too
        def neg(logits, j=j):
            p = softmax(logits)
            return -per_state_objective(p[None], rewards[j], ref[j], eta)[0]

        found = min(
            (
                minimize(neg, x0, method="BFGS", options={"gtol": 1e-10})
                for x0 in np.random.default_rng(j).normal(size=(5, 3))
            ),
            key=lambda r: r.fun,
        )
        np.testing.assert_allclose(softmax(found.x), gibbs[j], atol=1e-5)
    # the policy-level value is the sum of the per-state maxima
    assert env.policy_value(gibbs, states) == pytest.approx(env.optimal_value(states), rel=1e-12)


def test_gibbs_policy_of_a_model_matches_the_formula():
    env = KLBandit(d=4, n_actions=5, eta=0.3, seed=2)
    model = Linear(l2=1e-3).fit(env.sample_offline(200, seed=3))
    states = env.sample_targets(10, seed=4)
    probs = Gibbs(model, env.eta, reference=env.reference_probs).probs(states)
    weights = env.reference_probs(states) * np.exp(states.phi @ model.theta_ / env.eta)
    np.testing.assert_allclose(probs, weights / weights.sum(axis=1, keepdims=True), rtol=1e-12)
    # uniform reference by default: a softmax of r/η
    np.testing.assert_allclose(
        Gibbs(model, 0.3).probs(states),
        softmax(states.phi @ model.theta_ / 0.3, axis=1),
        rtol=1e-12,
    )


def test_gibbs_is_exact_for_extreme_temperatures_and_zero_reference_mass():
    rewards = np.array([[0.0, 500.0, -500.0]])
    ref = np.array([[0.5, 0.5, 0.0]])
    probs = gibbs_probs(rewards, ref, 1e-3)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, [[0.0, 1.0, 0.0]])
    assert soft_value(rewards, ref, 1e-3)[0] == pytest.approx(500.0 + 1e-3 * np.log(0.5))
    with pytest.raises(PluralignError):
        gibbs_probs(rewards, ref, 0.0)


# ---------------------------------------------------------------------- exact J_η and KL
def test_optimal_value_closed_form_and_gap_identity():
    env = KLBandit(d=6, n_actions=7, eta=0.25, ref_alignment=0.3, seed=11)
    states = env.sample_targets(50, seed=12)
    opt = env.optimal_probs(states)
    assert env.policy_value(opt, states) == pytest.approx(env.optimal_value(states), rel=1e-12)
    # closed form by hand: η E log Σ π0 exp(r/η)
    by_hand = env.eta * np.mean(
        np.log(
            np.sum(env.reference_probs(states) * np.exp(env.true_reward(states) / env.eta), axis=1)
        )
    )
    assert env.optimal_value(states) == pytest.approx(by_hand, rel=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(20):
        probs = rng.dirichlet(np.full(7, 0.5), size=50)
        gap = env.gap(probs, states)
        assert gap > 0
        assert env.optimal_value(states) - env.policy_value(probs, states) == pytest.approx(
            gap, rel=1e-9, abs=1e-12
        )
        assert env.policy_value(probs, states) < env.optimal_value(states)
    assert env.gap(opt, states) == pytest.approx(0.0, abs=1e-15)


def test_kl_is_non_negative_and_zero_only_at_the_reference():
    env = KLBandit(d=5, n_actions=6, eta=0.5, seed=3)
    states = env.sample_targets(40, seed=4)
    ref = env.reference_probs(states)
    assert env.kl(ref, states) == 0.0
    rng = np.random.default_rng(5)
    for scale in (1e-3, 1e-1, 1.0, 10.0):
        logits = np.log(ref) + scale * rng.normal(size=ref.shape)
        probs = softmax(logits, axis=1)
        per_state = kl_divergence(probs, ref)
        assert (per_state > 0).all()
        assert env.kl(probs, states) > 0
    # deterministic policies: KL = −log π0(a|x); zero-probability actions contribute 0
    action = np.argmax(rng.random(ref.shape), axis=1)
    onehot = np.eye(6)[action]
    np.testing.assert_allclose(kl_divergence(onehot, ref), -np.log(ref[np.arange(40), action]))
    # off the reference's support the divergence is infinite, never negative or NaN
    assert kl_divergence(np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]))[0] == np.inf


# ---------------------------------------------------------------------- simulator
def test_kl_bandit_sampling_coverage_and_reference():
    env = KLBandit(
        d=8, n_actions=5, eta=0.2, coverage=0.25, uncovered_dim=3, uncovered_reward=0.0, seed=9
    )
    deploy, source = env.sample_targets(100, seed=1), env.source_states(100, seed=1)
    basis = env.uncovered_basis
    np.testing.assert_allclose(source.phi @ basis, 0.25 * deploy.phi @ basis, atol=1e-12)
    rest = deploy.phi - deploy.phi @ basis @ basis.T
    np.testing.assert_allclose(source.phi - source.phi @ basis @ basis.T, rest, atol=1e-12)
    assert np.allclose(basis.T @ env.theta_star, 0.0)  # reward only in the covered part
    assert np.linalg.norm(env.theta_star) == pytest.approx(np.sqrt(8))
    np.testing.assert_allclose(env.reference_probs(deploy).sum(axis=1), 1.0)
    data = env.sample_offline(4000, seed=2)
    assert (np.abs(data.phi1 - data.phi0).sum(axis=1) > 0).all()  # two distinct responses
    p = 1 / (1 + np.exp(-(data.delta_phi @ env.theta_star)))
    assert abs(np.mean(data.y) - np.mean(p)) < 4 * np.sqrt(np.mean(p * (1 - p)) / data.n)
    flat = KLBandit(d=4, n_actions=3, ref_scale=0.0, seed=0)
    np.testing.assert_allclose(flat.reference_probs(flat.sample_targets(3, seed=0)), 1 / 3)
    for bad in (
        {"coverage": 0.0},
        {"behavior": "greedy"},
        {"ref_alignment": 2.0},
        {"uncovered_reward": 0.5, "uncovered_dim": 0},
        {"n_actions": 1},
    ):
        with pytest.raises(ConfigError):
            KLBandit(**{"d": 4, **bad})


# ---------------------------------------------------------------------- pessimism
@pytest.fixture(scope="module")
def offline_problem():
    """A small offline problem whose confidence set excludes 0 (so pessimism is not trivial)."""
    env = KLBandit(d=3, n_actions=4, eta=0.3, coverage=0.3, uncovered_dim=1, seed=21)
    data = env.sample_offline(150, seed=22)
    model = Linear(l2=1.0 / data.n).fit(data)
    cs = ConfidenceSet.fit(model, data, beta=0.5 * beta_rate(3, data.n))
    states = env.sample_targets(12, seed=23)
    assert not cs.contains(np.zeros(3))
    return env, model, cs, states


def ball_grid(k: int, n_dirs: int, radii: tuple[float, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_dirs, k))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.concatenate([np.zeros((1, k)), *[r * dirs for r in radii]])


def test_option1_certified_gap_and_beats_gibbs_policies_of_a_grid_of_C(offline_problem):
    env, model, cs, states = offline_problem
    ref = env.reference_probs(states)
    policy = PessimisticGibbs(model, cs, env.eta, reference=env.reference_probs, tol=1e-9)
    probs = policy.probs(states)
    assert policy.converged_ and 0.0 <= policy.duality_gap_ <= 1e-9
    value = policy.pessimistic_value_
    assert value == pytest.approx(policy.objective(probs, states), abs=1e-12)
    assert value > 0.0  # better than π0 (f(π0) = 0) under every θ in C
    # every θ in C on a grid (centre, boundary and interior), mapped to its Gibbs policy
    chol = np.linalg.cholesky(cs.M)
    thetas = (
        cs.center
        + cs.beta * np.linalg.solve(chol.T, ball_grid(3, 300, (0.3, 0.7, 1.0), seed=1).T).T
    )
    assert all(cs.contains(t) for t in thetas)
    grid_values = [
        policy.objective(gibbs_probs(states.phi @ t, ref, env.eta), states) for t in thetas
    ]
    assert value >= max(grid_values) - 1e-12
    # and the other offline policies
    for other in (
        PessimisticGibbs(model, cs, env.eta, reference=ref, pointwise=True),
        Gibbs(model, env.eta, reference=ref),
    ):
        assert value >= policy.objective(other.probs(states), states) - 1e-12
    # weak duality: the solver's θ is in C, and its Gibbs policy is the returned one
    assert cs.contains(policy.theta_)
    np.testing.assert_allclose(probs, gibbs_probs(states.phi @ policy.theta_, ref, env.eta))


def test_option1_matches_a_brute_force_policy_optimizer(offline_problem):
    env, model, cs, states = offline_problem
    policy = PessimisticGibbs(model, cs, env.eta, reference=env.reference_probs, tol=1e-10)
    policy.probs(states)
    shape = (states.m, states.n_actions)
    ref = env.reference_probs(states)

    def neg(logits):
        """−f(softmax(logits)) and its gradient (chain rule through the worst-case θ)."""
        log_probs = log_softmax(logits.reshape(shape), axis=1)
        probs = np.exp(log_probs)
        w = np.einsum("ja,jad->d", probs - ref, states.phi) / states.m
        theta = cs.worst_theta(w)  # the supergradient of min_θ θᵀw
        grad_p = (states.phi @ theta - env.eta * (log_probs - np.log(ref) + 1.0)) / states.m
        grad_logits = probs * (grad_p - np.sum(probs * grad_p, axis=1, keepdims=True))
        return -policy.objective(probs, states), -grad_logits.ravel()

    rng = np.random.default_rng(0)
    best = min(
        minimize(
            neg,
            rng.normal(size=np.prod(shape)),
            jac=True,
            method="BFGS",
            options={"maxiter": 20000, "gtol": 1e-11},
        ).fun
        for _ in range(2)
    )
    # the generic optimizer never beats the certified solution, and gets close to it
    assert policy.pessimistic_value_ >= -best - 1e-9
    assert policy.pessimistic_value_ <= -best + 1e-5


def test_option1_returns_the_reference_when_zero_is_in_the_set(offline_problem):
    env, model, _, states = offline_problem
    data = env.sample_offline(150, seed=22)
    wide = ConfidenceSet.fit(model, data, beta=1e6)
    policy = PessimisticGibbs(model, wide, env.eta, reference=env.reference_probs)
    np.testing.assert_allclose(policy.probs(states), env.reference_probs(states))
    assert policy.pessimistic_value_ == 0.0 and policy.duality_gap_ == 0.0


def test_option2_is_the_gibbs_policy_of_the_pointwise_lower_bound(offline_problem):
    env, model, cs, states = offline_problem
    ref = env.reference_probs(states)
    probs = PessimisticGibbs(model, cs, env.eta, reference=ref, pointwise=True).probs(states)
    nu = np.einsum("ja,jad->jd", ref, states.phi)
    diff = states.phi - nu[:, None, :]
    width = np.sqrt(np.einsum("jad,de,jae->ja", diff, np.linalg.inv(cs.M), diff))
    lcb = states.phi @ model.theta_ - cs.beta * width
    expected = ref * np.exp((lcb - lcb.max(axis=1, keepdims=True)) / env.eta)
    np.testing.assert_allclose(probs, expected / expected.sum(axis=1, keepdims=True), rtol=1e-9)
    # β = 0: both options reduce to the MLE-Gibbs policy
    zero = ConfidenceSet(
        cs.center,
        cs.M,
        0.0,
        lam=cs.lam,
        n=cs.n,
        kind=cs.kind,
        bound_feature=cs.bound_feature,
        bound_theta=cs.bound_theta,
    )
    mle = Gibbs(model, env.eta, reference=ref).probs(states)
    for pointwise in (True, False):
        pess = PessimisticGibbs(model, zero, env.eta, reference=ref, pointwise=pointwise)
        np.testing.assert_allclose(pess.probs(states), mle, atol=1e-9)


def test_pessimistic_gibbs_refuses_mismatched_inputs(offline_problem):
    env, model, cs, states = offline_problem
    small = Linear().fit(KLBandit(d=2, n_actions=3, seed=0).sample_offline(50, seed=0))
    with pytest.raises(PluralignError):
        PessimisticGibbs(small, cs, env.eta)
    with pytest.raises(PluralignError):
        PessimisticGibbs(model, cs, -1.0)
    with pytest.raises(PluralignError):
        PessimisticGibbs(model, cs, env.eta, reference="nope").probs(states)
    states_bad = TargetStates(None, states.phi[:, :2])
    with pytest.raises(PluralignError):
        PessimisticGibbs(model, cs, env.eta, reference=np.full((12, 4), 0.25)).probs(states_bad)
