"""GSHF pair designs: distinct pairs, identical-pair rates, per-pair choices, the exact enhancer.

Oracles: the closed-form identical-pair rate ``E_x Σ_a π¹π²`` and conditional laws (binomial
standard errors), brute force over the drawn candidates with an explicit ``M⁻¹``, and an
independent SLSQP solver over *all* policies (the product of simplices) for the enhancer.
"""

from __future__ import annotations

import numpy as np
import pytest

from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.data import TargetStates
from pluralign.envs import KLBandit
from pluralign.errors import PluralignError
from pluralign.online import (
    EXPLORATIONS,
    BestWorst,
    Enhancer,
    OnlineGSHF,
    PairUncertainty,
    RoundState,
    make_exploration,
)
from pluralign.policies import gibbs_probs
from pluralign.rewards import Linear

POLICY_LEVEL = ["enhancer", "symmetric", "uniform"]


def fitted_state(
    m: int = 300, seed: int = 0, n_data: int = 300, eta: float = 0.2, repeat_context: bool = False
) -> RoundState:
    """A round of the loop on ``KLBandit(d=5, K=6)``: the MLE on ``n_data`` comparisons; with
    ``repeat_context`` all ``m`` contexts are one context repeated (for conditional laws)."""
    env = KLBandit(d=5, n_actions=6, eta=eta, seed=seed)
    states = env.sample_targets(1 if repeat_context else m, seed=seed + 1)
    if repeat_context:
        states = TargetStates(None, np.repeat(states.phi, m, axis=0))
    data = env.sample_offline(n_data, seed=seed + 2)
    model = Linear(l2=1.0 / n_data).fit(data)
    cs = ConfidenceSet.fit(model, data, beta=beta_rate(5, n_data))
    main = gibbs_probs(states.phi @ model.theta_, env.reference_probs(states), eta)
    return RoundState(states=states, main_probs=main, theta=model.theta_, confidence=cs, eta=eta)


def binomial_bound(p: float, n: int, z: float = 4.5) -> float:
    """``z`` binomial standard errors of a share of ``n`` Bernoulli draws with mean ``p`` (an
    upper bound for independent Bernoullis of mean ``p`` on average, by concavity)."""
    return z * np.sqrt(max(p * (1 - p), 1e-12) / n)


# ---------------------------------------------------------------------- identical pairs
@pytest.mark.parametrize("design", sorted(EXPLORATIONS))
def test_distinct_pairs_are_never_identical(design):
    state = fitted_state(m=400, seed=1, n_data=2000, eta=0.05)  # a concentrated main agent
    assert np.mean(state.main_probs.max(axis=1)) > 0.5
    explorer = make_exploration(design)
    if design == "enhancer":
        explorer = Enhancer(exact=False)  # the drawing step is shared; keep the test fast
    for seed in range(3):
        pairs = explorer.draw_pairs(state, np.random.default_rng(seed), distinct=True)
        assert np.all(pairs.a1 != pairs.a2)
        assert pairs.a1.shape == pairs.a2.shape == (400,)
        if design in POLICY_LEVEL:
            assert pairs.info["identical_pairs_expected"] == 0.0


@pytest.mark.parametrize("design", POLICY_LEVEL)
def test_independent_identical_pair_rate_matches_its_closed_form(design):
    """Share of ``a¹ = a²`` over ``R·m`` independent draws against ``E_x Σ_a π¹(a|x)π²(a|x)``
    (the second policy computed once, the rate by hand), within 4.5 binomial standard errors."""
    state = fitted_state(m=500, seed=2, n_data=1000, eta=0.1)
    explorer = Enhancer(exact=False) if design == "enhancer" else make_exploration(design)
    second, _ = explorer.second_policy(state)
    expected = float(np.mean(np.sum(state.main_probs * second, axis=1)))
    hits, draws = 0, 0
    for seed in range(12):
        pairs = explorer.draw_pairs(state, np.random.default_rng([9, seed]), distinct=False)
        assert pairs.info["identical_pairs_expected"] == pytest.approx(expected, rel=1e-12)
        hits += int(np.sum(pairs.a1 == pairs.a2))
        draws += pairs.a1.size
    assert abs(hits / draws - expected) <= binomial_bound(expected, draws)
    assert expected > 0.05  # the rate is not trivially zero here


def test_distinct_second_response_follows_the_renormalized_policy():
    """One context repeated: ``P(a² = b | a¹ = a) = π²(b)/(1 − π²(a))`` for the most frequent
    ``a¹`` (uniform: ``1/(K−1)``), within binomial errors."""
    state = fitted_state(m=30000, seed=3, n_data=300, eta=0.2, repeat_context=True)
    for design in ("symmetric", "uniform"):
        explorer = make_exploration(design)
        second, _ = explorer.second_policy(state)
        pairs = explorer.draw_pairs(state, np.random.default_rng(4), distinct=True)
        a = int(np.bincount(pairs.a1).argmax())
        chosen = pairs.a2[pairs.a1 == a]
        law = second[0].copy()
        law[a] = 0.0
        law /= law.sum()
        freq = np.bincount(chosen, minlength=law.size) / chosen.size
        for b in range(law.size):
            assert abs(freq[b] - law[b]) <= binomial_bound(law[b], chosen.size)


def test_loop_records_the_identical_pair_rate_per_round():
    env = KLBandit(d=4, n_actions=5, eta=0.1, seed=5)
    default = OnlineGSHF("symmetric", batch_size=300, n_rounds=3, seed=1).fit(env)
    assert default.distinct_pairs is True  # distinct pairs are the default
    assert all(h["identical_pairs"] == 0.0 for h in default.history_[1:])
    assert (np.abs(default.data_.delta_phi).sum(axis=1) > 0).all()
    loop = OnlineGSHF("symmetric", batch_size=300, n_rounds=6, distinct_pairs=False, seed=1).fit(
        env
    )
    history = loop.history_[1:]
    observed = sum(h["identical_pairs"] for h in history) * 300
    expected = float(np.mean([h["identical_pairs_expected"] for h in history]))
    assert expected > 0.1
    assert abs(observed / 1800 - expected) <= binomial_bound(expected, 1800)
    with pytest.raises(PluralignError):
        OnlineGSHF("symmetric", distinct_pairs=1, n_rounds=1).fit(env)


# ---------------------------------------------------------------------- per-pair designs
@pytest.mark.parametrize("distinct", [True, False])
def test_pair_uncertainty_takes_the_widest_candidate(distinct):
    state = fitted_state(m=200, seed=6)
    pairs = PairUncertainty(n_candidates=5).draw_pairs(
        state, np.random.default_rng(0), distinct=distinct
    )
    m_inv = np.linalg.inv(state.confidence.M)
    phi = state.states.phi
    assert pairs.candidates.shape == (200, 5)
    for j in range(200):
        widths = []
        for c in pairs.candidates[j]:
            diff = phi[j, pairs.a1[j]] - phi[j, c]
            widths.append(np.sqrt(diff @ m_inv @ diff))
        diff = phi[j, pairs.a1[j]] - phi[j, pairs.a2[j]]
        assert pairs.a2[j] in pairs.candidates[j]
        assert np.sqrt(diff @ m_inv @ diff) == pytest.approx(max(widths), rel=1e-10, abs=1e-12)
        if distinct:
            assert pairs.a1[j] not in pairs.candidates[j]


def test_pair_uncertainty_candidates_follow_the_main_agent():
    """With distinct pairs the candidates are draws of ``π¹`` conditioned on ``≠ a¹``."""
    state = fitted_state(m=20000, seed=7, n_data=300, repeat_context=True)
    pairs = PairUncertainty(n_candidates=2).draw_pairs(state, np.random.default_rng(1))
    a = int(np.bincount(pairs.a1).argmax())
    cand = pairs.candidates[pairs.a1 == a].ravel()
    law = state.main_probs[0].copy()
    law[a] = 0.0
    law /= law.sum()
    freq = np.bincount(cand, minlength=law.size) / cand.size
    for b in range(law.size):
        assert abs(freq[b] - law[b]) <= binomial_bound(law[b], cand.size)
    freq1 = np.bincount(pairs.a1, minlength=law.size) / pairs.a1.size
    for b in range(law.size):
        assert abs(freq1[b] - state.main_probs[0, b]) <= binomial_bound(
            state.main_probs[0, b], pairs.a1.size
        )


@pytest.mark.parametrize("distinct", [True, False])
def test_best_worst_takes_the_extremes_of_the_estimated_reward(distinct):
    state = fitted_state(m=300, seed=8, n_data=200, eta=0.1)
    pairs = BestWorst(n_candidates=4).draw_pairs(state, np.random.default_rng(2), distinct=distinct)
    phi, theta = state.states.phi, state.theta
    fallback = 0
    for j in range(300):
        cand = pairs.candidates[j]
        reward = [float(phi[j, c] @ theta) for c in cand]
        assert pairs.a1[j] in cand
        assert float(phi[j, pairs.a1[j]] @ theta) == max(reward)
        others = [r for c, r in zip(cand, reward, strict=True) if not distinct or c != pairs.a1[j]]
        if others:
            assert pairs.a2[j] in cand
            assert float(phi[j, pairs.a2[j]] @ theta) == min(others)
        else:  # all n draws were a¹: a² drawn from π¹ without a¹
            fallback += 1
            assert pairs.a2[j] != pairs.a1[j]
    if distinct:
        assert np.all(pairs.a1 != pairs.a2)
    else:
        # identical exactly when all n draws coincide
        same = np.all(pairs.candidates == pairs.candidates[:, :1], axis=1)
        np.testing.assert_array_equal(pairs.a1 == pairs.a2, same)
    with pytest.raises(PluralignError):
        BestWorst(n_candidates=1)
    with pytest.raises(PluralignError):
        PairUncertainty(n_candidates=0)


def test_every_design_runs_in_the_loop():
    env = KLBandit(d=4, n_actions=5, eta=0.3, seed=5)
    states = env.sample_targets(100, seed=6)
    for design in EXPLORATIONS:
        loop = OnlineGSHF(design, batch_size=40, n_rounds=2, seed=3).fit(env, eval_states=states)
        assert [h["round"] for h in loop.history_] == [0, 1, 2]
        assert all(
            h["identical_pairs"] == 0.0 and h["pair_uncertainty"] > 0 for h in loop.history_[1:]
        )
        assert loop.history_[-1]["gap"] < loop.history_[0]["gap"]
