"""Online iterative GSHF: the enhancer's constraint and search, the baselines, the loop."""

from __future__ import annotations

import numpy as np
import pytest

from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.envs import KLBandit
from pluralign.errors import PluralignError
from pluralign.online import Enhancer, OnlineGSHF, RoundState, Symmetric, Uniform, sample_actions
from pluralign.policies import gibbs_probs, kl_divergence
from pluralign.rewards import Linear


def round_state(n_data: int, eta: float, seed: int = 0) -> tuple[KLBandit, RoundState]:
    """A round of the loop: the main agent fitted on ``n_data`` comparisons (0: no data)."""
    env = KLBandit(d=5, n_actions=6, eta=eta, seed=seed)
    states = env.sample_states(40, seed=seed + 1)
    if n_data:
        data = env.sample_offline(n_data, seed=seed + 2)
        model = Linear(l2=1.0 / n_data).fit(data)
        theta = model.theta_
        cs = ConfidenceSet.fit(model, data, beta=beta_rate(5, n_data))
    else:
        theta = np.zeros(5)
        cs = ConfidenceSet(theta, np.eye(5), beta_rate(5, 1), lam=1.0, n=0, kind="design",
                           bound_feature=0.0, bound_theta=0.0)
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


def test_enhancer_is_the_best_feasible_point_of_its_search_family():
    """No feasible Gibbs policy on a fine grid of scales along its directions has larger U,
    and the chosen policy sits on the constraint's boundary (the search is not lazy)."""
    _, state = round_state(200, 0.2, seed=3)
    enhancer = Enhancer(n_directions=3)
    probs, info = enhancer.second_policy(state)
    vecs, _ = enhancer.directions(state)
    ref = state.main_probs
    best_grid = 0.0
    for v in np.concatenate([vecs, -vecs], axis=1).T:
        for c in np.geomspace(1e-3, 1e3, 400) * state.confidence.beta:
            cand = gibbs_probs(state.states.phi @ (c * v), ref, state.eta)
            unc = uncertainty_of(state, cand)
            if state.eta * np.mean(kl_divergence(cand, ref)) <= unc:
                best_grid = max(best_grid, unc)
    assert info["uncertainty"] >= best_grid * (1 - 1e-6)
    kl = float(np.mean(kl_divergence(probs, ref)))
    assert state.eta * kl == pytest.approx(info["uncertainty"], rel=1e-6)
    # the directions are generalized eigenvectors of (Σ_π, M), M-orthonormal, largest first
    vecs, lam = enhancer.directions(state)
    np.testing.assert_allclose(vecs.T @ state.confidence.M @ vecs, np.eye(3), atol=1e-10)
    assert np.all(np.diff(lam) <= 0)


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
    return env, env.sample_states(200, seed=6)


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
        env, offline=offline, eval_states=states)
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
    for bad in ({"batch_size": 0}, {"n_rounds": 1.5}, {"exploration": "greedy"},
                {"ridge": 0.0}):
        with pytest.raises(PluralignError):
            run_loop(env, states, **bad)
    with pytest.raises(PluralignError):
        Enhancer(n_directions=0)
