"""LowRankContextual: exact policy values against brute force, and the sampling law."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import sigmoid

from pluralign.data import TargetStates
from pluralign.envs import LowRankContextual
from pluralign.envs.lowrank_contextual import gumbel_top2
from pluralign.errors import ConfigError
from pluralign.policies import Policy


def loop_value(theta: np.ndarray, targets: TargetStates, probs: np.ndarray) -> float:
    """``(1/m) Σ_j Σ_a π(a|j) x_jᵀ Θ φ_ja`` with explicit loops."""
    total = 0.0
    m, k, d_phi = targets.phi.shape
    d_x = targets.x.shape[1]
    for j in range(m):
        for a in range(k):
            r = 0.0
            for i in range(d_x):
                for d in range(d_phi):
                    r += targets.x[j, i] * theta[i, d] * targets.phi[j, a, d]
            total += probs[j, a] * r
    return total / m


@pytest.fixture
def small():
    env = LowRankContextual(d_x=3, d_phi=4, rank=2, n_actions=3, shift=0.5, seed=11)
    return env, env.sample_targets(3, seed=4)


def test_policy_value_matches_brute_force_enumeration(small):
    env, targets = small
    values = []
    for actions in itertools.product(range(3), repeat=3):
        probs = np.zeros((3, 3))
        probs[np.arange(3), actions] = 1.0
        expected = loop_value(env.theta_star, targets, probs)
        assert env.policy_value(probs, targets) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        values.append(expected)
    assert len(values) == 27
    best = max(values)
    assert env.optimal_value(targets) == pytest.approx(best, rel=1e-12, abs=1e-12)
    # every policy is at most optimal; only the best deterministic policy is exactly optimal
    for actions in itertools.product(range(3), repeat=3):
        probs = np.zeros((3, 3))
        probs[np.arange(3), actions] = 1.0
        assert env.suboptimality(probs, targets) >= -1e-12
    assert sum(abs(v - best) < 1e-12 for v in values) == 1


def test_stochastic_policy_value_matches_loops(small):
    env, targets = small
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=3)
    expected = loop_value(env.theta_star, targets, probs)
    assert env.policy_value(probs, targets) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert env.suboptimality(probs, targets) > 0


def test_optimal_policy_has_zero_suboptimality_and_others_nonnegative():
    env = LowRankContextual(d_x=5, d_phi=6, rank=2, n_actions=7, shift=1.0, seed=2)
    targets = env.sample_targets(200, seed=3)
    rewards = np.array(
        [[targets.x[j] @ env.theta_star @ targets.phi[j, a] for a in range(7)] for j in range(200)]
    )
    best = np.zeros((200, 7))
    best[np.arange(200), rewards.argmax(axis=1)] = 1.0
    assert env.suboptimality(best, targets) == pytest.approx(0.0, abs=1e-12)

    class Fixed(Policy):
        def __init__(self, probs):
            self._probs = probs

        def probs(self, targets):
            return self._probs

    assert env.suboptimality(Fixed(best), targets) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(1)
    for _ in range(20):
        probs = rng.dirichlet(np.full(7, 0.3), size=200)
        assert env.suboptimality(probs, targets) >= 0
        assert env.suboptimality(Fixed(probs), targets) == env.suboptimality(probs, targets)
    worst = np.zeros((200, 7))
    worst[np.arange(200), rewards.argmin(axis=1)] = 1.0
    assert env.policy_value(worst, targets) == pytest.approx(rewards.min(axis=1).mean())


def test_policy_of_wrong_shape_is_refused(small):
    env, targets = small
    with pytest.raises(ValueError):
        env.policy_value(np.full((3, 4), 0.25), targets)


def test_true_reward_matches_bilinear_form_in_both_layouts():
    env = LowRankContextual(d_x=3, d_phi=4, rank=1, n_actions=5, seed=0)
    data = env.sample_offline(10, seed=0)
    targets = env.sample_targets(4, seed=0)
    expected = [data.x[i] @ env.theta_star @ data.phi0[i] for i in range(10)]
    np.testing.assert_allclose(env.true_reward(data.x, data.phi0), expected, rtol=1e-12)
    grid = env.true_reward(targets.x, targets.phi)
    for j in range(4):
        np.testing.assert_allclose(
            grid[j],
            env.true_reward(np.repeat(targets.x[j : j + 1], 5, axis=0), targets.phi[j]),
            rtol=1e-12,
        )


def test_theta_star_structure():
    d_x, d_phi, rank = 6, 5, 3
    env = LowRankContextual(d_x=d_x, d_phi=d_phi, rank=rank, singular_values=(1.0, 2.0), seed=7)
    assert env.theta_star.shape == (d_x, d_phi)
    assert np.linalg.matrix_rank(env.theta_star) == rank
    np.testing.assert_allclose(env.U_star.T @ env.U_star, np.eye(rank), atol=1e-12)
    np.testing.assert_allclose(env.V_star.T @ env.V_star, np.eye(rank), atol=1e-12)
    scale = np.sqrt(d_x * d_phi / rank)
    np.testing.assert_allclose(
        env.theta_star, scale * env.U_star @ np.diag(env.s_star) @ env.V_star.T, atol=1e-12
    )
    normalized = np.linalg.svd(env.theta_star, compute_uv=False)[:rank] / scale
    np.testing.assert_allclose(normalized, env.s_star, rtol=1e-10)
    assert np.all((normalized >= 1.0 - 1e-12) & (normalized <= 2.0 + 1e-12))
    # E[r*²] on source contexts = ‖Θ*‖²_F / (d_x d_phi) = mean(s²)
    assert np.sum(env.theta_star**2) / (d_x * d_phi) == pytest.approx(np.mean(env.s_star**2))
    assert env.estimation_error(env.theta_star) == 0.0
    assert env.estimation_error(np.zeros((d_x, d_phi))) == pytest.approx(1.0)


def test_reward_scale_on_source_contexts_is_mean_squared_singular_value():
    env = LowRankContextual(d_x=6, d_phi=5, rank=2, n_actions=4, seed=8)
    data = env.sample_offline(40000, seed=0)
    r = env.true_reward(data.x, data.phi0)
    # uniform behaviour: phi0 is a uniformly chosen candidate, independent of x
    assert np.mean(r**2) == pytest.approx(np.mean(env.s_star**2), rel=0.05)


def test_shift_moves_target_contexts_but_not_the_truth():
    kwargs = {"d_x": 5, "d_phi": 4, "rank": 2, "n_actions": 3, "seed": 21}
    env0 = LowRankContextual(shift=0.0, **kwargs)
    env2 = LowRankContextual(shift=2.0, **kwargs)
    np.testing.assert_array_equal(env0.theta_star, env2.theta_star)
    np.testing.assert_array_equal(env0.shift_direction, env2.shift_direction)
    assert np.linalg.norm(env2.shift_direction) == pytest.approx(1.0)

    m = 20000  # per-coordinate standard error of the mean: 1/sqrt(5 m) ≈ 0.003
    mean0 = env0.sample_targets(m, seed=1).x.mean(axis=0)
    mean2 = env2.sample_targets(m, seed=2).x.mean(axis=0)
    np.testing.assert_allclose(mean0, 0.0, atol=0.03)
    np.testing.assert_allclose(mean2 - mean0, 2.0 * env2.shift_direction, atol=0.05)
    # the offline (source) contexts are not shifted
    np.testing.assert_allclose(env2.sample_offline(m, seed=3).x.mean(axis=0), 0.0, atol=0.03)
    # contexts have covariance I / d_x
    cov = np.cov(env2.sample_targets(m, seed=4).x, rowvar=False)
    np.testing.assert_allclose(cov, np.eye(5) / 5, atol=0.02)


def test_seeds_make_samples_reproducible():
    env = LowRankContextual(d_x=3, d_phi=3, rank=1, n_actions=4, behavior="skewed", seed=3)
    same = LowRankContextual(d_x=3, d_phi=3, rank=1, n_actions=4, behavior="skewed", seed=3)
    other = LowRankContextual(d_x=3, d_phi=3, rank=1, n_actions=4, behavior="skewed", seed=4)
    np.testing.assert_array_equal(env.theta_star, same.theta_star)
    assert not np.allclose(env.theta_star, other.theta_star)

    a, b, c = (
        env.sample_offline(50, seed=9),
        same.sample_offline(50, seed=9),
        env.sample_offline(50, seed=10),
    )
    for name in ("x", "phi0", "phi1", "y"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.allclose(a.x, c.x)
    assert not np.allclose(a.phi0, c.phi0)

    t1, t2, t3 = (
        env.sample_targets(20, seed=1),
        same.sample_targets(20, seed=1),
        env.sample_targets(20, seed=2),
    )
    np.testing.assert_array_equal(t1.x, t2.x)
    np.testing.assert_array_equal(t1.phi, t2.phi)
    assert not np.allclose(t1.phi, t3.phi)
    # a Generator seed works too and is consumed like the int it came from
    g = env.sample_offline(50, seed=np.random.default_rng(9))
    np.testing.assert_array_equal(g.phi1, a.phi1)


def test_samples_have_unit_features_and_distinct_compared_actions():
    env = LowRankContextual(d_x=3, d_phi=4, rank=2, n_actions=2, seed=0)
    data = env.sample_offline(500, seed=0)
    targets = env.sample_targets(50, seed=0)
    np.testing.assert_allclose(np.linalg.norm(data.phi0, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(targets.phi, axis=2), 1.0)
    assert targets.phi.shape == (50, 2, 4)
    assert np.all(np.any(data.phi0 != data.phi1, axis=1))


def test_skewed_behaviour_compares_high_reward_actions_less_often():
    kwargs = {"d_x": 4, "d_phi": 4, "rank": 2, "n_actions": 6, "seed": 5}
    means = {}
    for behavior in ("uniform", "skewed"):
        env = LowRankContextual(behavior=behavior, skew=2.0, **kwargs)
        data = env.sample_offline(4000, seed=1)
        r = np.concatenate([env.true_reward(data.x, data.phi0), env.true_reward(data.x, data.phi1)])
        means[behavior] = r.mean()
    # standard errors are ≈ 0.02; the gap is ≈ 1.1
    assert abs(means["uniform"]) < 0.1
    assert means["skewed"] < means["uniform"] - 0.5


def test_gumbel_top2_draws_without_replacement_from_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    n = 60000
    first, second = gumbel_top2(np.random.default_rng(0), np.tile(logits, (n, 1)))
    assert np.all(first != second)
    p = np.exp(logits)
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            expected = p[i] * p[j] / (1.0 - p[i])
            freq = np.mean((first == i) & (second == j))
            se = np.sqrt(expected * (1 - expected) / n)
            assert abs(freq - expected) < 5 * se


def test_labels_follow_bradley_terry():
    env = LowRankContextual(d_x=4, d_phi=4, rank=2, n_actions=5, seed=6)
    data = env.sample_offline(30000, seed=2)
    margin = env.true_reward(data.x, data.phi1) - env.true_reward(data.x, data.phi0)
    p = sigmoid(margin)
    edges = np.quantile(margin, np.linspace(0, 1, 7))
    for lo, hi in itertools.pairwise(edges):
        sel = (margin >= lo) & (margin <= hi)
        expected = p[sel].mean()
        se = np.sqrt(np.sum(p[sel] * (1 - p[sel]))) / sel.sum()
        assert abs(data.y[sel].mean() - expected) < 5 * se + 0.01
    # the label is oriented: y = 1 when phi1 is better
    assert np.mean(data.y[margin > 1.0]) > 0.7
    assert np.mean(data.y[margin < -1.0]) < 0.3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"behavior": "greedy"},
        {"rank": 0},
        {"rank": 4, "d_x": 3},
        {"n_actions": 1},
        {"singular_values": (2.0, 1.0)},
        {"singular_values": (0.0, 1.0)},
    ],
)
def test_invalid_parameters_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        LowRankContextual(**kwargs)


def test_unknown_behavior_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        LowRankContextual(behavior="greedy")
    assert "uniform" in str(info.value) and "skewed" in str(info.value)


# ----------------------------------------------------------------- coverage regimes
def _digest(*arrays: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    ("behavior", "offline_digest", "labels"),
    [
        ("uniform", "3b15269310b223c1", [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
        ("skewed", "a17349c426c0f7bf", [0, 0, 1, 1, 0, 1, 1, 1, 0, 0]),
    ],
)
def test_full_coverage_draws_are_those_of_the_code_before_the_coverage_option(
    behavior, offline_digest, labels
):
    """Reference values computed with the simulator as it was before ``coverage`` existed
    (same seeds, same parameters): the default regime's draws must not move."""
    env = LowRankContextual(
        d_x=4, d_phi=5, rank=2, n_actions=6, shift=1.0, behavior=behavior, seed=[7, 1]
    )
    data = env.sample_offline(30, seed=[7, 2])
    targets = env.sample_targets(5, seed=[7, 3])
    assert _digest(env.theta_star, env.shift_direction) == "0b9a66149a841179"
    assert _digest(data.x, data.phi0, data.phi1, data.y) == offline_digest
    assert _digest(targets.x, targets.phi) == "0d1491dceaaceef0"
    np.testing.assert_allclose(
        data.phi0[0], [-0.08192931, -0.03648354, 0.05656256, -0.78687792, 0.60793121], atol=1e-8
    )
    np.testing.assert_array_equal(data.y[:10], labels)
    np.testing.assert_allclose(
        targets.phi[0, 0], [0.60884439, 0.04641862, 0.30747464, 0.3803899, -0.62282959], atol=1e-8
    )
    np.testing.assert_allclose(
        env.theta_star[0, :3], [1.14443036, -0.98831477, -0.98484986], atol=1e-8
    )
    assert env.support_basis is None and env.coverage == "full"


SUB = {
    "d_x": 4,
    "d_phi": 7,
    "rank": 2,
    "n_actions": 5,
    "shift": 1.0,
    "seed": 13,
    "coverage": "subspace",
    "support_extra": 2,
    "n_uncovered": 3,
    "uncovered_scale": 0.6,
}


def test_subspace_support_contains_the_reward_directions_and_keeps_the_truth():
    env = LowRankContextual(**SUB)
    full = LowRankContextual(
        **{
            k: v
            for k, v in SUB.items()
            if k in ("d_x", "d_phi", "rank", "n_actions", "shift", "seed")
        }
    )
    np.testing.assert_array_equal(env.theta_star, full.theta_star)
    np.testing.assert_array_equal(env.shift_direction, full.shift_direction)
    b, c, e = env.support_basis, env.complement_basis, env.novel_direction
    assert b.shape == (7, 4) and c.shape == (7, 3)
    np.testing.assert_allclose(
        np.concatenate([b, c], axis=1).T @ np.concatenate([b, c], axis=1), np.eye(7), atol=1e-12
    )
    np.testing.assert_array_equal(b[:, :2], env.V_star)
    # S ⊇ span(V*): Θ* annihilates S⊥, so an S⊥ component is worth nothing
    np.testing.assert_allclose(env.theta_star @ c, 0.0, atol=1e-12)
    assert np.linalg.norm(e) == pytest.approx(1.0) and np.linalg.norm(b.T @ e) < 1e-12


def test_subspace_offline_data_lie_in_the_support_without_leak():
    env = LowRankContextual(**SUB, offline_leak=0.0)
    data = env.sample_offline(400, seed=1)
    proj = env.complement_basis @ env.complement_basis.T  # projection onto S⊥
    for phi in (data.phi0, data.phi1):
        assert np.abs(phi @ proj).max() < 1e-12
        np.testing.assert_allclose(np.linalg.norm(phi, axis=1), 1.0, rtol=1e-12)
    targets = env.sample_targets(50, seed=2)
    assert np.abs(targets.phi[:, :5] @ proj).max() < 1e-12


def test_subspace_leak_and_out_of_support_candidates_have_their_stated_components():
    env = LowRankContextual(**SUB, offline_leak=0.1)
    data = env.sample_offline(300, seed=3)
    c = env.complement_basis
    np.testing.assert_allclose(np.linalg.norm(data.phi0 @ c, axis=1), 0.1, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(data.phi0, axis=1), 1.0, rtol=1e-12)
    targets = env.sample_targets(40, seed=4)
    assert targets.phi.shape == (40, 5 + 3, 7)
    np.testing.assert_allclose(np.linalg.norm(targets.phi, axis=2), 1.0, rtol=1e-12)
    perp = np.linalg.norm(targets.phi @ c, axis=2)
    np.testing.assert_allclose(perp[:, :5], 0.1, rtol=1e-12)
    # exactly n_uncovered out-of-support candidates per state, each with S⊥ part c·e
    assert np.all(np.sum(perp > 0.1 + 1e-9, axis=1) == 3)
    out = targets.phi[:, 5:]
    np.testing.assert_allclose(
        out @ c @ c.T, np.broadcast_to(0.6 * env.novel_direction, out.shape), atol=1e-12
    )
    # their true reward is the model's, and equals that of their support part (Θ*C = 0)
    support = out @ env.support_basis @ env.support_basis.T
    x = targets.x
    np.testing.assert_allclose(env.true_reward(x, out), env.true_reward(x, support), atol=1e-12)
    loops = [[x[j] @ env.theta_star @ out[j, a] for a in range(3)] for j in range(40)]
    np.testing.assert_allclose(env.true_reward(x, out), loops, rtol=1e-12, atol=1e-12)


def test_subspace_reference_is_uniform_over_the_ordinary_candidates():
    env = LowRankContextual(**SUB)
    targets = env.sample_targets(6, seed=0)
    ref = env.reference_probs(targets)
    np.testing.assert_allclose(ref[:, :5], 0.2)
    np.testing.assert_array_equal(ref[:, 5:], 0.0)
    full = LowRankContextual(d_x=3, d_phi=3, rank=1, n_actions=4, seed=0)
    np.testing.assert_allclose(full.reference_probs(full.sample_targets(3, seed=0)), 0.25)


def test_subspace_samples_are_reproducible_and_labels_use_the_same_model():
    env = LowRankContextual(**SUB)
    a, b = env.sample_offline(100, seed=5), env.sample_offline(100, seed=5)
    for name in ("x", "phi0", "phi1", "y"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert np.all(np.any(a.phi0 != a.phi1, axis=1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"coverage": "partial"},
        {**SUB, "support_extra": 5},  # rank + extra = 7 = d_phi: S⊥ empty
        {**SUB, "n_uncovered": -1},
        {**SUB, "uncovered_scale": 0.0},
        {**SUB, "uncovered_scale": 1.5},
        {**SUB, "offline_leak": 1.0},
    ],
)
def test_invalid_coverage_parameters_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        LowRankContextual(**kwargs)


def test_subspace_reward_scale_matches_its_closed_form():
    env = LowRankContextual(**{**SUB, "n_actions": 4}, offline_leak=0.3)
    data = env.sample_offline(40000, seed=6)
    r = env.true_reward(data.x, data.phi0)  # uniform behaviour: phi0 independent of x
    expected = (1 - 0.3**2) * np.mean(env.s_star**2) * 7 / 4  # d_phi / dim S = 7 / 4
    assert np.mean(r**2) == pytest.approx(expected, rel=0.05)
