"""The loco experiment's coverage metrics, its ``coverage: subspace`` config and the C3 check."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pluralign.confidence import ConfidenceSet
from pluralign.envs import LowRankContextual
from pluralign.errors import ConfigError
from pluralign.experiments import EXPERIMENTS
from pluralign.experiments.base import Unit
from pluralign.experiments.config import resolve_config
from pluralign.experiments.loco import check_loco_claims
from pluralign.experiments.loco.methods import coverage
from pluralign.rewards import Bilinear, LowRank, RTVReduced

TINY = {
    "d_x": 2,
    "d_phi": 3,
    "rank": 1,
    "n_actions": 3,
    "shift": 1.0,
    "seed": 3,
    "coverage": "subspace",
    "support_extra": 1,
    "n_uncovered": 2,
    "uncovered_scale": 0.8,
}


def _direct(z_of, m_inv: np.ndarray, targets, probs: np.ndarray, ref: np.ndarray) -> float:
    """``sqrt(wᵀ M⁻¹ w)`` with ``w = (1/m) Σ_j Σ_a (π − π_ref)(a|j) z(x_j, φ_ja)``, by loops."""
    m, k_actions, _ = targets.phi.shape
    w = 0.0
    for j in range(m):
        for a in range(k_actions):
            w = w + (probs[j, a] - ref[j, a]) * z_of(targets.x[j], targets.phi[j, a])
    w = w / m
    return float(np.sqrt(w @ m_inv @ w))


@pytest.fixture
def tiny():
    env = LowRankContextual(**TINY)
    data = env.sample_offline(300, seed=1)
    targets = env.sample_targets(6, seed=2)
    return env, data, targets


def test_full_rank_coverage_equals_explicit_kronecker_features_and_inverse(tiny):
    env, data, targets = tiny
    model = Bilinear(l2=1e-2).fit(data)
    cs = ConfidenceSet.fit(model, data, beta=1.0)

    def z(x, phi):  # vec(x φᵀ), row-major like Bilinear's params_ = vec(theta_)
        return np.array([x[i] * phi[d] for i in range(len(x)) for d in range(len(phi))])

    # the explicit z is the model's: θ̂ᵀz is its reward
    x0, p0 = targets.x[0], targets.phi[0, 0]
    assert model.reward(x0[None], p0[None])[0] == pytest.approx(model.params_ @ z(x0, p0))
    m_inv = np.linalg.inv(cs.M)
    rng = np.random.default_rng(0)
    refs = {"uniform": np.full((6, 5), 0.2), env.reference_probs: env.reference_probs(targets)}
    for reference, ref in refs.items():
        for probs in (np.eye(5)[rng.integers(0, 5, 6)], rng.dirichlet(np.ones(5), 6)):
            expected = _direct(z, m_inv, targets, probs, ref)
            assert coverage(model, cs, targets, probs, reference) == pytest.approx(
                expected, rel=1e-9
            )


def test_reduced_coverage_equals_explicit_sum_and_inverse(tiny):
    env, data, targets = tiny
    base = LowRank(1, l2=1e-2, seed=0).fit(data)
    model = RTVReduced(base, l2=1e-2).fit(data)
    cs = ConfidenceSet.fit(model, data, beta=1.0)

    def z(x, phi):
        return model.features(x[None], phi[None])[0]

    m_inv = np.linalg.inv(cs.M)
    probs = np.eye(5)[np.argmax(env.true_reward(targets.x, targets.phi), axis=1)]
    ref = env.reference_probs(targets)
    assert coverage(model, cs, targets, probs, env.reference_probs) == pytest.approx(
        _direct(z, m_inv, targets, probs, ref), rel=1e-9
    )
    # the reference policy itself has w = 0
    assert coverage(model, cs, targets, ref, env.reference_probs) == pytest.approx(0, abs=1e-12)


def _config(**env):
    return {
        "experiment": "loco",
        "seed": 1,
        "repeats": 1,
        "n_samples": [300],
        "env": [
            {
                "d_x": 3,
                "d_phi": 4,
                "rank": 1,
                "n_actions": 3,
                "shift": 1.0,
                "behavior": "skewed",
                "n_targets": 20,
                "n_heldout": 50,
                **env,
            }
        ],
        "methods": [
            "prs",
            "prs_pointwise",
            "lowrank_greedy",
            "fullrank_pessimistic",
            "fullrank_greedy",
        ],
        "options": {"ridge_grid": [0.1], "fw_max_iter": 50, "fw_tol": 1e-3},
    }


@pytest.mark.parametrize("regime", ["full", "subspace"])
def test_rows_report_coverage_of_their_confidence_set(regime):
    config = resolve_config(_config(coverage=regime, support_extra=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = {r["method"]: r for r in EXPERIMENTS["loco"].run_unit(config, Unit(0, 300, 0))}
    for method in ("prs", "prs_pointwise"):
        assert rows[method]["coverage_opt_prs"] > 0 and rows[method]["coverage_greedy_prs"] > 0
    assert rows["prs"]["coverage_opt_prs"] == rows["prs_pointwise"]["coverage_opt_prs"]
    assert rows["fullrank_pessimistic"]["coverage_opt_full"] > 0
    assert rows["fullrank_pessimistic"]["coverage_greedy_full"] > 0
    assert "coverage_opt_prs" not in rows["lowrank_greedy"]
    for row in rows.values():
        assert ("uncovered_share" in row) is (regime == "subspace")
        if regime == "subspace":
            assert 0.0 <= row["uncovered_share"] <= 1.0
    if regime == "subspace":
        assert "subspace(dimS=2 +2x0.7 leak=0.1)" in rows["prs"]["setting"]
    else:
        assert rows["prs"]["setting"] == "d_x=3 d_phi=4 r=1 K=3 skewed(2.0) shift=1.0"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"coverage": "subspace", "support_extra": 3}, "support_extra"),
        ({"coverage": "partial"}, "coverage"),
        ({"uncovered_scale": 0.0}, "uncovered_scale"),
        ({"offline_leak": 1.0}, "offline_leak"),
        ({"n_uncovered": -1}, "n_uncovered"),
    ],
)
def test_invalid_coverage_config_is_refused_when_resolved(env, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(_config(**env))


def test_coverage_config_resolves():
    from importlib.resources import files

    import yaml

    text = files("pluralign.configs").joinpath("loco_coverage.yaml").read_text()
    config = resolve_config(yaml.safe_load(text))
    assert all(env["coverage"] == "subspace" for env in config["env"])


# ----------------------------------------------------------------- C3: an upper bound
def _c3(values: dict[int, float]) -> dict:
    rows = [
        {"setting": "s", "method": "prs", "n": n, "repeat": 0, "suboptimality": v}
        for n, v in values.items()
    ]
    config = {
        "experiment": "loco",
        "env": [
            {
                "d_x": 2,
                "d_phi": 2,
                "rank": 1,
                "n_actions": 3,
                "behavior": "uniform",
                "skew": 2.0,
                "shift": 0.0,
            }
        ],
    }
    return {c["claim"][:2]: c for c in check_loco_claims(rows, config)}["C3"]


def test_c3_holds_for_a_steeper_slope_and_fails_when_the_bound_is_crossed():
    # subopt = 10/N: slope −1, far under c/√N (c = 10/√100 = 1; at N=10^4: 0.001 vs 0.01)
    held = _c3({100: 0.1, 1000: 0.01, 10000: 0.001})
    assert held["held"] is True
    assert "slope -1.000" in held["detail"]
    assert "max subopt/(c/√N) = 0.316 at N=1000" in held["detail"]
    # slope overall steep, but N=1000 is above c/√N = 1/√1000 = 0.0316: not held
    crossed = _c3({100: 0.1, 1000: 0.04, 10000: 0.001})
    assert crossed["held"] is False
    assert f"max subopt/(c/√N) = {0.04 * np.sqrt(1000) / 1.0:.3f} at N=1000" in crossed["detail"]
    # flat: never under the bound
    assert _c3({100: 0.1, 1000: 0.1})["held"] is False
