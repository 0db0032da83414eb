"""The ``loco`` experiment's schema (env parameters, options, their constraints, the metrics),
its draws and its methods: what one unit computes. :mod:`pluralign.experiments.loco` describes
every method and metric and assembles the :class:`~pluralign.experiments.base.Experiment`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.envs import LowRankContextual
from pluralign.envs.lowrank_contextual import BEHAVIORS, COVERAGES
from pluralign.errors import ConfigError
from pluralign.experiments.base import (
    MAX_DIM,
    MAX_ITER,
    MAX_SAMPLES,
    MAX_SCALE,
    Choice,
    Constraint,
    Range,
    UnitContext,
)
from pluralign.policies import Greedy, Pessimistic, Policy
from pluralign.policies.pessimistic import reference_probs
from pluralign.rewards import (
    Bilinear,
    BradleyTerryModel,
    Linear,
    LinearInParameters,
    LowRank,
    RewardModel,
    RTVReduced,
)

__all__ = [
    "ENV_DEFAULTS",
    "ENV_SPEC",
    "METRICS",
    "OPTION_DEFAULTS",
    "OPTION_SPEC",
    "check_config",
    "coverage",
    "describe_setting",
    "fullrank_greedy",
    "fullrank_pessimistic",
    "linear_greedy",
    "linear_pessimistic",
    "lowrank_greedy",
    "one_hot",
    "prs",
    "prs_pointwise",
]

ENV_DEFAULTS: dict[str, Any] = {
    "d_x": 10,
    "d_phi": 10,
    "rank": 2,
    "n_actions": 8,
    "shift": 0.0,
    "behavior": "uniform",
    "skew": 2.0,
    "singular_values": [1.0, 2.0],
    "coverage": "full",
    "support_extra": 2,
    "n_uncovered": 2,
    "uncovered_scale": 0.7,
    "offline_leak": 0.1,
    "n_targets": 1000,
    "n_heldout": 2000,
}

OPTION_DEFAULTS: dict[str, Any] = {
    "ridge_grid": [0.01, 0.1, 1.0, 10.0],
    "beta": 1.0,
    "delta": 0.05,
    "fw_tol": 1e-4,
    "fw_max_iter": 300,
}

# What each value may be (checked by resolve_config; tabulated in docs/experiments.md).
ENV_SPEC: dict[str, Constraint] = {
    "d_x": Range(1, MAX_DIM),
    "d_phi": Range(1, MAX_DIM),
    "rank": Range(1, MAX_DIM, at_most=("d_x", "d_phi")),
    "n_actions": Range(2, MAX_DIM),
    "shift": Range(-MAX_SCALE, MAX_SCALE),
    "behavior": Choice(BEHAVIORS),
    "skew": Range(-MAX_SCALE, MAX_SCALE),
    "singular_values": Range(0, MAX_SCALE, lo_open=True, length=(2, 2), nondecreasing=True),
    "coverage": Choice(COVERAGES),
    "support_extra": Range(0, MAX_DIM),
    "n_uncovered": Range(0, MAX_DIM),
    "uncovered_scale": Range(0, 1, lo_open=True),
    "offline_leak": Range(0, 1, hi_open=True),
    "n_targets": Range(1, MAX_SAMPLES),
    "n_heldout": Range(1, MAX_SAMPLES),
}

OPTION_SPEC: dict[str, Constraint] = {
    "ridge_grid": Range(0, None, lo_open=True, length=(1, 100)),
    "beta": Range(0, None),
    "delta": Range(0, 1, lo_open=True, hi_open=True),
    "fw_tol": Range(0, None, lo_open=True),
    "fw_max_iter": Range(1, MAX_ITER),
}

# The metrics a row may carry (the module docstring of pluralign.experiments.loco).
METRICS: tuple[str, ...] = (
    "suboptimality",
    "estimation_error",
    "heldout_loglik",
    "duality_gap",
    "coverage_opt_prs",
    "coverage_greedy_prs",
    "coverage_opt_full",
    "coverage_greedy_full",
    "uncovered_share",
)


def check_config(config: dict[str, Any]) -> None:
    """``coverage: subspace`` needs a non-empty ``S⊥``: ``rank + support_extra < d_phi``."""
    for index, env in enumerate(config["env"]):
        if env["coverage"] == "subspace" and env["rank"] + env["support_extra"] >= env["d_phi"]:
            raise ConfigError(
                f"setting {index}: coverage 'subspace' needs 'rank' + 'support_extra' < 'd_phi' "
                f"(S⊥ not empty), got {env['rank']} + {env['support_extra']} ≥ {env['d_phi']}"
            )


def _env(ctx: UnitContext) -> LowRankContextual:
    """The unit's simulator; its truth depends on (seed, setting, repeat), not on N."""
    if "env" not in ctx.objects:
        p = {k: v for k, v in ctx.env_params.items() if k not in ("n_targets", "n_heldout")}
        p["singular_values"] = tuple(p["singular_values"])
        ctx.objects["env"] = LowRankContextual(**p, seed=ctx.seed(0))
    return ctx.objects["env"]


def _draws(ctx: UnitContext):
    env = _env(ctx)
    if "draws" not in ctx.objects:
        n_max = max(ctx.config["n_samples"])
        offline = env.sample_offline(n_max, seed=ctx.seed(1)).subset(slice(0, ctx.unit.n))
        heldout = env.sample_offline(ctx.env_params["n_heldout"], seed=ctx.seed(2))
        targets = env.sample_targets(ctx.env_params["n_targets"], seed=ctx.seed(3))
        ctx.objects["draws"] = (offline, heldout, targets)
    return ctx.objects["draws"]


def _evaluate(ctx: UnitContext, model: RewardModel, policy: Policy) -> dict[str, float]:
    env = _env(ctx)
    _, heldout, targets = _draws(ctx)
    probs = policy.probs(targets)
    metrics = {
        "suboptimality": env.suboptimality(probs, targets),
        "heldout_loglik": model.log_likelihood(heldout),
        "ridge": getattr(model, "ridge_", float("nan")),
    }
    theta = getattr(model, "theta_", None)
    if theta is not None and getattr(theta, "shape", None) == env.theta_star.shape:
        metrics["estimation_error"] = env.estimation_error(theta)
    if env.coverage == "subspace":
        metrics["uncovered_share"] = float(np.mean(np.sum(probs[:, env.n_actions :], axis=1)))
    return metrics


def _ridge(ctx: UnitContext, family: str, make: Callable[[float], BradleyTerryModel]) -> float:
    """The family's ridge: best held-out log-likelihood on a split of the offline data only."""
    grid = ctx.options["ridge_grid"]
    if len(grid) == 1:
        return float(grid[0])

    def select() -> float:
        offline, _, _ = _draws(ctx)
        train, val = offline.split(0.2, seed=ctx.seed(4))
        scores = [make(ridge / train.n).fit(train).log_likelihood(val) for ridge in grid]
        return float(grid[int(np.argmax(scores))])

    return ctx.cached(f"{family}_ridge", select)


def _fit(ctx: UnitContext, family: str, make: Callable[[float], BradleyTerryModel]):
    offline, _, _ = _draws(ctx)

    def build():
        model = make(_ridge(ctx, family, make) / offline.n).fit(offline)
        model.ridge_ = _ridge(ctx, family, make)  # type: ignore[attr-defined]  # recorded for reports
        return model

    return ctx.cached(family, build)


def _fullrank(ctx: UnitContext) -> Bilinear:
    return _fit(ctx, "bilinear", lambda l2: Bilinear(l2=l2))


def _linear(ctx: UnitContext) -> Linear:
    return _fit(ctx, "linear", lambda l2: Linear(l2=l2))


def _lowrank(ctx: UnitContext) -> LowRank:
    rank, seed = ctx.env_params["rank"], ctx.unit.repeat
    return _fit(ctx, "lowrank", lambda l2: LowRank(rank, l2=l2, seed=seed))


def _reduced(ctx: UnitContext) -> RTVReduced:
    offline, _, _ = _draws(ctx)
    base = _lowrank(ctx)

    def build() -> RTVReduced:
        model = RTVReduced(base, l2=base.l2).fit(offline)
        model.ridge_ = base.ridge_  # type: ignore[attr-defined]  # recorded for reports
        return model

    return ctx.cached("rtv", build)


def _confidence(ctx: UnitContext, name: str, model: LinearInParameters) -> ConfidenceSet:
    offline, _, _ = _draws(ctx)
    opts = ctx.options

    def build() -> ConfidenceSet:
        beta = opts["beta"] * beta_rate(model.n_params, offline.n, opts["delta"])
        return ConfidenceSet.fit(model, offline, beta=beta, delta=opts["delta"])

    return ctx.cached(f"{name}_confidence", build)


def coverage(
    model: LinearInParameters,
    confidence: ConfidenceSet,
    targets,
    probs: np.ndarray,
    reference: Any = "uniform",
) -> float:
    """``‖w(π)‖_{M⁻¹}``, ``w(π) = (1/m) Σ_j (Σ_a π(a|j) z(j,a) − Σ_a π_ref(a|j) z(j,a))``.

    ``z`` is linear in ``φ`` for fixed ``x``, so ``(1/m) Σ_j z(x_j, φ̄_j)`` with ``φ̄_j`` the
    policy's mean candidate is the mean feature (``model.mean_features``).
    """
    ref = reference_probs(reference, targets)
    w = model.mean_features(
        targets.x, np.einsum("ja,jad->jd", probs, targets.phi)
    ) - model.mean_features(targets.x, np.einsum("ja,jad->jd", ref, targets.phi))
    return float(confidence.norm(w))


def _coverage(
    ctx: UnitContext, name: str, model: LinearInParameters, greedy_model: RewardModel
) -> dict[str, float]:
    """``coverage_opt_<name>`` and ``coverage_greedy_<name>`` (see the module docstring)."""
    env = _env(ctx)
    _, _, targets = _draws(ctx)
    cs = _confidence(ctx, "rtv" if name == "prs" else "bilinear", model)
    optimal = one_hot(np.argmax(env.true_reward(targets.x, targets.phi), axis=1), targets.n_actions)
    greedy = Greedy(greedy_model).probs(targets)
    ref = _reference(ctx)
    return {
        f"coverage_opt_{name}": coverage(model, cs, targets, optimal, ref),
        f"coverage_greedy_{name}": coverage(model, cs, targets, greedy, ref),
    }


def _reference(ctx: UnitContext) -> Any:
    """The pessimistic reference: uniform (``"full"``), the ordinary candidates (``"subspace"``)."""
    env = _env(ctx)
    return "uniform" if env.coverage == "full" else env.reference_probs


def one_hot(actions: np.ndarray, n_actions: int) -> np.ndarray:
    out = np.zeros((len(actions), n_actions))
    out[np.arange(len(actions)), actions] = 1.0
    return out


def _greedy(ctx: UnitContext, model: RewardModel) -> dict[str, float]:
    return _evaluate(ctx, model, Greedy(model))


def _pessimistic(
    ctx: UnitContext,
    name: str,
    model: LinearInParameters,
    *,
    pointwise: bool = False,
    report_model: RewardModel | None = None,
) -> dict[str, float]:
    policy = Pessimistic(
        model,
        _confidence(ctx, name, model),
        pointwise=pointwise,
        reference=_reference(ctx),
        tol=ctx.options["fw_tol"],
        max_iter=ctx.options["fw_max_iter"],
    )
    # Every model passed here is a RewardModel as well as LinearInParameters.
    metrics = _evaluate(ctx, report_model or model, policy)  # type: ignore[arg-type]
    metrics["duality_gap"] = policy.duality_gap_
    return metrics


def _with_coverage(ctx: UnitContext, metrics: dict[str, float], name: str) -> dict[str, float]:
    if name == "prs":
        return {**metrics, **_coverage(ctx, "prs", _reduced(ctx), _lowrank(ctx))}
    return {**metrics, **_coverage(ctx, "full", _fullrank(ctx), _fullrank(ctx))}


def prs(ctx: UnitContext) -> dict[str, float]:
    """LoCo-RLHF's PRS: max–min pessimism in the RTV-reduced space."""
    return _with_coverage(ctx, _pessimistic(ctx, "rtv", _reduced(ctx)), "prs")


def prs_pointwise(ctx: UnitContext) -> dict[str, float]:
    """Per-state lower confidence bound in the RTV-reduced space."""
    return _with_coverage(ctx, _pessimistic(ctx, "rtv", _reduced(ctx), pointwise=True), "prs")


def lowrank_greedy(ctx: UnitContext) -> dict[str, float]:
    """Greedy policy of the low-rank Burer–Monteiro MLE."""
    return _greedy(ctx, _lowrank(ctx))


def fullrank_pessimistic(ctx: UnitContext) -> dict[str, float]:
    """Max–min pessimism with the full-rank ``d_x·d_phi`` confidence set."""
    return _with_coverage(ctx, _pessimistic(ctx, "bilinear", _fullrank(ctx)), "full")


def fullrank_greedy(ctx: UnitContext) -> dict[str, float]:
    """Greedy policy of the full-rank bilinear MLE."""
    return _greedy(ctx, _fullrank(ctx))


def linear_pessimistic(ctx: UnitContext) -> dict[str, float]:
    """Max–min pessimism for the context-free linear model."""
    return _pessimistic(ctx, "linear", _linear(ctx))


def linear_greedy(ctx: UnitContext) -> dict[str, float]:
    """Greedy policy of the context-free linear MLE (one reward for everybody)."""
    return _greedy(ctx, _linear(ctx))


def describe_setting(env: dict[str, Any]) -> str:
    behavior = env["behavior"] + (f"({env['skew']})" if env["behavior"] == "skewed" else "")
    text = (
        f"d_x={env['d_x']} d_phi={env['d_phi']} r={env['rank']} K={env['n_actions']} "
        f"{behavior} shift={env['shift']}"
    )
    if env.get("coverage", "full") == "subspace":
        text += (
            f" subspace(dimS={env['rank'] + env['support_extra']} "
            f"+{env['n_uncovered']}x{env['uncovered_scale']} leak={env['offline_leak']})"
        )
    return text
