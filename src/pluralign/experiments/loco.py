"""The ``loco`` experiment: LoCo-RLHF (seed 000) on the ``LowRankContextual`` simulator.

Per unit (setting, N, repeat): one truth ``Θ*``, one offline sample of size N from source
contexts under the behaviour policy, one held-out sample from the same distribution, and one
target sample of shifted contexts. Every method sees the same draws.

Metrics (per row):

* ``suboptimality`` — ``J(π*) − J(π̂)`` on the target sample, exact (true rewards);
* ``estimation_error`` — ``‖Θ̂ − Θ*‖_F / ‖Θ*‖_F`` (contextual models only);
* ``heldout_loglik`` — mean Bradley–Terry log-likelihood on the held-out sample;
* ``fit_seconds`` — wall time of the method, including shared fits it used.
"""

from __future__ import annotations

from typing import Any

from pluralign.envs import LowRankContextual
from pluralign.experiments.base import Experiment, UnitContext
from pluralign.policies import Greedy, Policy
from pluralign.rewards import Bilinear, Linear, RewardModel

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
    "l2": 1e-4,
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
    }
    theta = getattr(model, "theta_", None)
    if theta is not None and getattr(theta, "shape", None) == env.theta_star.shape:
        metrics["estimation_error"] = env.estimation_error(theta)
    return metrics


def _fullrank(ctx: UnitContext) -> Bilinear:
    offline, _, _ = _draws(ctx)
    return ctx.cached("bilinear", lambda: Bilinear(l2=ctx.options["l2"]).fit(offline))


def _linear(ctx: UnitContext) -> Linear:
    offline, _, _ = _draws(ctx)
    return ctx.cached("linear", lambda: Linear(l2=ctx.options["l2"]).fit(offline))


def fullrank_greedy(ctx: UnitContext) -> dict[str, float]:
    """Greedy policy of the full-rank bilinear MLE."""
    model = _fullrank(ctx)
    return _evaluate(ctx, model, Greedy(model))


def linear_greedy(ctx: UnitContext) -> dict[str, float]:
    """Greedy policy of the context-free linear MLE (one reward for everybody)."""
    model = _linear(ctx)
    return _evaluate(ctx, model, Greedy(model))


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
        "fullrank_greedy": fullrank_greedy,
        "linear_greedy": linear_greedy,
    },
    default_n_samples=(500, 1000, 2000, 5000),
    metrics=("suboptimality", "estimation_error", "heldout_loglik"),
    plot_metric="suboptimality",
    describe_setting=describe_setting,
)
