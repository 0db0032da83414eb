"""The ``gshf`` experiment's schema (env parameters, options, their constraints, the metrics),
its shared objects and its methods: what one unit computes (one curve over the rounds per
method). :mod:`pluralign.experiments.gshf` describes every method and metric and assembles the
:class:`~pluralign.experiments.base.Experiment`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.data import PreferenceData
from pluralign.envs import KLBandit
from pluralign.envs.kl_bandit import BEHAVIORS
from pluralign.errors import ConfigError
from pluralign.experiments.base import (
    MAX_DIM,
    MAX_SAMPLES,
    MAX_SCALE,
    Choice,
    Constraint,
    Range,
    UnitContext,
)
from pluralign.online import (
    BestWorst,
    Enhancer,
    Exploration,
    OnlineGSHF,
    PairUncertainty,
    make_exploration,
)
from pluralign.policies import PessimisticGibbs, gibbs_probs
from pluralign.rewards import Linear

__all__ = [
    "ENV_DEFAULTS",
    "ENV_SPEC",
    "METRICS",
    "OPTION_DEFAULTS",
    "OPTION_SPEC",
    "check_config",
    "describe_setting",
    "hybrid_enhancer",
    "offline_mle",
    "offline_option1",
    "offline_option2",
    "online_best_worst",
    "online_enhancer",
    "online_symmetric",
    "online_uncertainty",
    "online_uniform",
]


ENV_DEFAULTS: dict[str, Any] = {
    "d": 16,
    "n_actions": 16,
    "eta": 0.2,
    "reward_scale": 1.0,
    "ref_scale": 1.0,
    "ref_alignment": 0.0,
    "coverage": 1.0,
    "uncovered_dim": 8,
    "uncovered_reward": None,
    "behavior": "reference",
    "n_eval": 2000,
}

OPTION_DEFAULTS: dict[str, Any] = {
    "batch_size": 200,
    "ridge": 1.0,
    "beta": 1.0,
    "delta": 0.05,
    "hybrid_offline": 1000,
    "n_directions": 4,
    "enhancer_search": "exact",
    "n_candidates": 8,
    "opt_tol": 1e-8,
    "target_gap": 0.05,
    "distinct_pairs": True,
}

# What each value may be (checked by resolve_config; tabulated in docs/experiments.md).
ENV_SPEC: dict[str, Constraint] = {
    "d": Range(2, MAX_DIM),
    "n_actions": Range(2, MAX_DIM),
    "eta": Range(0, MAX_SCALE, lo_open=True),
    "reward_scale": Range(0, MAX_SCALE),
    "ref_scale": Range(0, MAX_SCALE),
    "ref_alignment": Range(-1, 1),
    "coverage": Range(0, 1, lo_open=True),
    "uncovered_dim": Range(0, MAX_DIM, at_most=("d",)),
    "uncovered_reward": Range(0, 1, nullable=True),
    "behavior": Choice(BEHAVIORS),
    "n_eval": Range(1, MAX_SAMPLES),
}

OPTION_SPEC: dict[str, Constraint] = {
    "batch_size": Range(1, MAX_SAMPLES),
    "ridge": Range(0, None, lo_open=True),
    "beta": Range(0, None),
    "delta": Range(0, 1, lo_open=True, hi_open=True),
    "hybrid_offline": Range(1, MAX_SAMPLES),
    "n_directions": Range(1, 1000),
    "enhancer_search": Choice(("exact", "directions")),
    "n_candidates": Range(2, 1000),
    "opt_tol": Range(0, None, lo_open=True),
    "target_gap": Range(0, None),
    "distinct_pairs": Choice((False, True)),
}

# The metrics a row may carry (the module docstring of pluralign.experiments.gshf).
METRICS: tuple[str, ...] = (
    "gap",
    "kl",
    "reward",
    "comparisons",
    "reached_target",
    "duality_gap",
    "uncertainty",
    "pair_uncertainty",
    "identical_pairs",
    "identical_pairs_expected",
    "certified_gap",
)


def check_config(config: dict[str, Any]) -> None:
    """One rounds value ``T`` with ``T·m`` offline comparisons of sane size, and an
    ``uncovered_reward`` share that the subspace dimensions allow."""
    n_samples, m = config["n_samples"], config["options"]["batch_size"]
    if len(n_samples) != 1:
        raise ConfigError(
            f"gshf takes one value in n_samples (the number of rounds T; every round is "
            f"reported), got {n_samples}"
        )
    if n_samples[0] * m > MAX_SAMPLES:
        raise ConfigError(
            f"gshf draws T·batch_size = {n_samples[0]}·{m} offline comparisons; "
            f"at most {MAX_SAMPLES:.0e} are allowed"
        )
    for index, env in enumerate(config["env"]):
        share, dim = env["uncovered_reward"], env["uncovered_dim"]
        if share is not None and ((share > 0 and dim == 0) or (share < 1 and dim == env["d"])):
            raise ConfigError(
                f"'env.uncovered_reward' (setting {index}) = {share} needs uncovered_dim > 0 "
                f"for a share > 0 and uncovered_dim < d for a share < 1 (uncovered_dim={dim}, "
                f"d={env['d']})"
            )


# ---------------------------------------------------------------------- shared objects
def _rounds(ctx: UnitContext) -> int:
    n_samples = ctx.config["n_samples"]
    if len(n_samples) != 1:
        raise ConfigError(
            f"gshf takes one value in n_samples (the number of rounds T; every round is "
            f"reported), got {n_samples}"
        )
    return int(n_samples[0])


def _env(ctx: UnitContext) -> KLBandit:
    def build() -> KLBandit:
        params = {k: v for k, v in ctx.env_params.items() if k != "n_eval"}
        return KLBandit(**params, seed=ctx.seed(0))

    return ctx.cached("env", build)


def _offline(ctx: UnitContext) -> PreferenceData:
    size = max(_rounds(ctx) * ctx.options["batch_size"], ctx.options["hybrid_offline"], 1)
    return ctx.cached("offline", lambda: _env(ctx).sample_offline(size, seed=ctx.seed(1)))


def _eval(ctx: UnitContext) -> dict[str, Any]:
    def build() -> dict[str, Any]:
        env = _env(ctx)
        states = env.sample_targets(ctx.env_params["n_eval"], seed=ctx.seed(3))
        return {
            "states": states,
            "ref": env.reference_probs(states),
            "opt": env.optimal_probs(states),
            "reward": env.true_reward(states),
        }

    return ctx.cached("eval", build)


def _metrics(ctx: UnitContext, probs: np.ndarray) -> dict[str, float]:
    env, ev = _env(ctx), _eval(ctx)
    gap = env.gap(probs, ev["states"])
    return {
        "gap": gap,
        "kl": env.kl(probs, ev["states"]),
        "reward": float(np.mean(np.sum(probs * ev["reward"], axis=1))),
        "reached_target": float(gap <= ctx.options["target_gap"]),
    }


def _offline_fits(ctx: UnitContext) -> list[tuple[Linear, ConfidenceSet] | None]:
    """MLE and confidence set on the first ``t·m`` offline comparisons, for ``t = 0..T``."""
    opts = ctx.options

    def build() -> list[tuple[Linear, ConfidenceSet] | None]:
        data, m = _offline(ctx), opts["batch_size"]
        fits: list[tuple[Linear, ConfidenceSet] | None] = [None]
        for t in range(1, _rounds(ctx) + 1):
            part = data.subset(slice(0, t * m))
            model = Linear(l2=opts["ridge"] / part.n).fit(part)
            beta = opts["beta"] * beta_rate(model.n_params, part.n, opts["delta"])
            fits.append((model, ConfidenceSet.fit(model, part, beta=beta, delta=opts["delta"])))
        return fits

    return ctx.cached("offline_fits", build)


# ---------------------------------------------------------------------- methods
def _offline_curve(ctx: UnitContext, option: str | None) -> list[dict[str, float]]:
    env, ev, m = _env(ctx), _eval(ctx), ctx.options["batch_size"]
    points = []
    for t, fit in enumerate(_offline_fits(ctx)):
        extra: dict[str, float] = {}
        if fit is None:  # no data: every method deploys π0
            probs = ev["ref"]
            if option == "option1":
                extra["duality_gap"] = 0.0
        elif option is None:
            probs = gibbs_probs(fit[0].reward(None, ev["states"].phi), ev["ref"], env.eta)
        else:
            policy = PessimisticGibbs(
                fit[0],
                fit[1],
                env.eta,
                reference=ev["ref"],
                pointwise=option == "option2",
                tol=ctx.options["opt_tol"],
            )
            probs = policy.probs(ev["states"])
            if option == "option1":
                extra["duality_gap"] = policy.duality_gap_
        points.append({"n": t, **_metrics(ctx, probs), "comparisons": t * m, **extra})
    return points


def offline_mle(ctx: UnitContext) -> list[dict[str, float]]:
    """Gibbs policy of the offline MLE (the offline-only baseline)."""
    return _offline_curve(ctx, None)


def offline_option1(ctx: UnitContext) -> list[dict[str, float]]:
    """GSHF option I: policy-level max–min pessimism with KL."""
    return _offline_curve(ctx, "option1")


def offline_option2(ctx: UnitContext) -> list[dict[str, float]]:
    """GSHF option II: Gibbs policy of the pointwise lower confidence bound."""
    return _offline_curve(ctx, "option2")


def _online_curve(
    ctx: UnitContext, exploration: str, *, hybrid: bool = False
) -> list[dict[str, float]]:
    opts = ctx.options
    explorer: Exploration
    if exploration == "enhancer":
        explorer = Enhancer(opts["n_directions"], exact=opts["enhancer_search"] == "exact")
    elif exploration == "uncertainty":
        explorer = PairUncertainty(opts["n_candidates"])
    elif exploration == "best_worst":
        explorer = BestWorst(opts["n_candidates"])
    else:
        explorer = make_exploration(exploration)
    loop = OnlineGSHF(
        explorer,
        batch_size=opts["batch_size"],
        n_rounds=_rounds(ctx),
        ridge=opts["ridge"],
        beta=opts["beta"],
        delta=opts["delta"],
        distinct_pairs=opts["distinct_pairs"],
        seed=ctx.seed(2),
    )
    offline = _offline(ctx).subset(slice(0, opts["hybrid_offline"])) if hybrid else None
    env, ev = _env(ctx), _eval(ctx)
    loop.fit(env, offline=offline, eval_states=ev["states"])
    points, seconds = [], 0.0
    for record in loop.history_:
        seconds += record["seconds"]
        point = {
            "n": record["round"],
            "gap": record["gap"],
            "kl": record["kl"],
            "reward": record["reward"],
            "comparisons": record["total_comparisons"],
            "reached_target": float(record["gap"] <= opts["target_gap"]),
            "fit_seconds": seconds,
        }
        if record["round"] > 0:
            point["uncertainty"] = record.get("uncertainty", 0.0)
            point["pair_uncertainty"] = record["pair_uncertainty"]
            point["identical_pairs"] = record["identical_pairs"]
            for key, name in (
                ("identical_pairs_expected", "identical_pairs_expected"),
                ("explore_certified_gap", "certified_gap"),
            ):
                if key in record:
                    point[name] = record[key]
        points.append(point)
    return points


def online_enhancer(ctx: UnitContext) -> list[dict[str, float]]:
    """Online iterative GSHF with the enhancer."""
    return _online_curve(ctx, "enhancer")


def online_symmetric(ctx: UnitContext) -> list[dict[str, float]]:
    """Online iterative learning, both responses from the main agent."""
    return _online_curve(ctx, "symmetric")


def online_uniform(ctx: UnitContext) -> list[dict[str, float]]:
    """Online iterative learning, second response uniform over the candidates."""
    return _online_curve(ctx, "uniform")


def online_uncertainty(ctx: UnitContext) -> list[dict[str, float]]:
    """Online iterative learning, per-pair uncertainty: ``a²`` the widest of ``n`` draws."""
    return _online_curve(ctx, "uncertainty")


def online_best_worst(ctx: UnitContext) -> list[dict[str, float]]:
    """Online iterative learning, best-of-n vs worst-of-n of the main agent."""
    return _online_curve(ctx, "best_worst")


def hybrid_enhancer(ctx: UnitContext) -> list[dict[str, float]]:
    """The enhancer loop started from ``hybrid_offline`` offline comparisons."""
    return _online_curve(ctx, "enhancer", hybrid=True)


def describe_setting(env: dict[str, Any]) -> str:
    """``d, K, η, coverage``, then every other parameter that differs from its default."""
    name = f"d={env['d']} K={env['n_actions']} eta={env['eta']} coverage={env['coverage']}"
    main = ("d", "n_actions", "eta", "coverage")
    rest = [f"{k}={v}" for k, v in env.items() if k not in main and v != ENV_DEFAULTS[k]]
    return " ".join([name, *rest])
