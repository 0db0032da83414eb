"""The ``loco`` experiment: LoCo-RLHF (seed 000) on the ``LowRankContextual`` simulator.

Per unit (setting, N, repeat): one truth ``Θ*``, one offline sample of size N from source
contexts under the behaviour policy, one held-out sample from the same distribution, and one
target sample of shifted contexts. Every method sees the same draws.

Metrics (per row):

* ``suboptimality`` — ``J(π*) − J(π̂)`` on the target sample, exact (true rewards);
* ``estimation_error`` — ``‖Θ̂ − Θ*‖_F / ‖Θ*‖_F`` (contextual models only);
* ``heldout_loglik`` — mean Bradley–Terry log-likelihood on the held-out sample;
* ``fit_seconds`` — wall time of the method, including shared fits it used;
* ``duality_gap`` — the pessimistic solver's certified gap (pessimistic methods only).

Methods:

* ``prs`` — LoCo-RLHF: ``LowRank`` (true rank) → RTV reduction and refit → max–min pessimistic
  policy in the reduced space (Pessimism in Reduced Subspace);
* ``prs_pointwise`` — the same confidence set, per-state lower confidence bound;
* ``lowrank_greedy`` — argmax of the low-rank estimate;
* ``fullrank_pessimistic`` — ``Bilinear`` with its ``d_x·d_phi``-dimensional confidence set,
  max–min policy (Zhu et al. 2023 on Kronecker features);
* ``fullrank_greedy`` — argmax of the full-rank estimate;
* ``linear_pessimistic`` / ``linear_greedy`` — the context-free ``θᵀφ`` model (one reward for
  everybody), pessimistic or greedy.

Options: ``ridge_grid`` (each model family — linear, full-rank, low-rank — picks its ridge from
this grid by held-out log-likelihood on a 20% split of the offline data only, then refits on
all of it with ``l2 = ridge / N``; the chosen value is reported as ``ridge``), ``beta`` (the
confidence radius is ``β = beta · sqrt((k + log(1/δ))/N)``,
the theory's rate with its constant exposed, so that models of different dimension ``k`` are
treated alike), ``delta``, ``fw_tol`` and ``fw_max_iter`` (the Frank–Wolfe duality-gap tolerance and
iteration cap; the gap reached is reported either way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.envs import LowRankContextual
from pluralign.envs.lowrank_contextual import BEHAVIORS
from pluralign.experiments.base import (
    MAX_DIM,
    MAX_ITER,
    MAX_SAMPLES,
    MAX_SCALE,
    Choice,
    Constraint,
    Experiment,
    Range,
    UnitContext,
)
from pluralign.policies import Greedy, Pessimistic, Policy
from pluralign.rewards import (
    Bilinear,
    BradleyTerryModel,
    Linear,
    LinearInParameters,
    LowRank,
    RewardModel,
    RTVReduced,
)

__all__ = ["LOCO"]

ENV_DEFAULTS: dict[str, Any] = {
    "d_x": 10,
    "d_phi": 10,
    "rank": 2,
    "n_actions": 8,
    "shift": 0.0,
    "behavior": "uniform",
    "skew": 2.0,
    "singular_values": [1.0, 2.0],
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
        offline = env.sample_offline(n_max, ctx.seed(1)).subset(slice(0, ctx.unit.n))
        heldout = env.sample_offline(ctx.env_params["n_heldout"], ctx.seed(2))
        targets = env.sample_targets(ctx.env_params["n_targets"], ctx.seed(3))
        ctx.objects["draws"] = (offline, heldout, targets)
    return ctx.objects["draws"]


def _evaluate(ctx: UnitContext, model: RewardModel, policy: Policy) -> dict[str, float]:
    env = _env(ctx)
    _, heldout, targets = _draws(ctx)
    metrics = {
        "suboptimality": env.suboptimality(policy, targets),
        "heldout_loglik": model.log_likelihood(heldout),
        "ridge": getattr(model, "ridge_", float("nan")),
    }
    theta = getattr(model, "theta_", None)
    if theta is not None and getattr(theta, "shape", None) == env.theta_star.shape:
        metrics["estimation_error"] = env.estimation_error(theta)
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
        model.ridge_ = _ridge(ctx, family, make)
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
        model.ridge_ = base.ridge_
        return model

    return ctx.cached("rtv", build)


def _confidence(ctx: UnitContext, name: str, model: LinearInParameters) -> ConfidenceSet:
    offline, _, _ = _draws(ctx)
    opts = ctx.options

    def build() -> ConfidenceSet:
        beta = opts["beta"] * beta_rate(model.n_params, offline.n, opts["delta"])
        return ConfidenceSet.fit(model, offline, beta=beta, delta=opts["delta"])

    return ctx.cached(f"{name}_confidence", build)


def _greedy(ctx: UnitContext, model: RewardModel) -> dict[str, float]:
    return _evaluate(ctx, model, Greedy(model))


def _pessimistic(ctx: UnitContext, name: str, model: LinearInParameters, *,
                 pointwise: bool = False, report_model: RewardModel | None = None
                 ) -> dict[str, float]:
    policy = Pessimistic(model, _confidence(ctx, name, model), pointwise=pointwise,
                         tol=ctx.options["fw_tol"], max_iter=ctx.options["fw_max_iter"])
    metrics = _evaluate(ctx, report_model or model, policy)
    metrics["duality_gap"] = policy.duality_gap_
    return metrics


def prs(ctx: UnitContext) -> dict[str, float]:
    """LoCo-RLHF's PRS: max–min pessimism in the RTV-reduced space."""
    return _pessimistic(ctx, "rtv", _reduced(ctx))


def prs_pointwise(ctx: UnitContext) -> dict[str, float]:
    """Per-state lower confidence bound in the RTV-reduced space."""
    return _pessimistic(ctx, "rtv", _reduced(ctx), pointwise=True)


def lowrank_greedy(ctx: UnitContext) -> dict[str, float]:
    """Greedy policy of the low-rank Burer–Monteiro MLE."""
    return _greedy(ctx, _lowrank(ctx))


def fullrank_pessimistic(ctx: UnitContext) -> dict[str, float]:
    """Max–min pessimism with the full-rank ``d_x·d_phi`` confidence set."""
    return _pessimistic(ctx, "bilinear", _fullrank(ctx))


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
    return (
        f"d_x={env['d_x']} d_phi={env['d_phi']} r={env['rank']} K={env['n_actions']} "
        f"{behavior} shift={env['shift']}"
    )


LOCO = Experiment(
    name="loco",
    env_defaults=ENV_DEFAULTS,
    option_defaults=OPTION_DEFAULTS,
    methods={
        "prs": prs,
        "prs_pointwise": prs_pointwise,
        "lowrank_greedy": lowrank_greedy,
        "fullrank_pessimistic": fullrank_pessimistic,
        "fullrank_greedy": fullrank_greedy,
        "linear_pessimistic": linear_pessimistic,
        "linear_greedy": linear_greedy,
    },
    default_n_samples=(500, 1000, 2000, 5000),
    metrics=("suboptimality", "estimation_error", "heldout_loglik", "duality_gap"),
    plot_metric="suboptimality",
    describe_setting=describe_setting,
    env_spec=ENV_SPEC,
    option_spec=OPTION_SPEC,
)
