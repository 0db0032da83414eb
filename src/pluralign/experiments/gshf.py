"""The ``gshf`` experiment: KL-regularized preference learning (seed 002) on ``KLBandit``.

Xiong et al. 2024 (GSHF, arXiv 2312.11456) in the bandit layer: offline (MLE-Gibbs versus the
two pessimistic options), online iterative learning with five pair designs, and
hybrid learning, all on one axis: **rounds** ``t = 0..T`` of ``m`` comparisons each
(``n_samples: [T]``, one value; option ``batch_size`` is ``m``). Every method returns a curve,
one row per round, with ``n`` = the round (see :mod:`pluralign.experiments.base`).

Per unit (setting, repeat): one truth, one offline sample of ``max(T·m, hybrid_offline)``
comparisons from the setting's source contexts and behaviour policy, and one evaluation sample of
``n_eval`` deployment contexts. All online methods share the loop seed (common random numbers).

Methods (``gap`` is always that of the policy the method would deploy after round ``t``):

* ``offline_mle`` — Gibbs policy of the Bradley–Terry MLE on the first ``t·m`` offline
  comparisons (also the *offline-only* baseline at equal budget);
* ``offline_option1`` — GSHF option I: policy-level max–min with KL
  (:class:`~pluralign.policies.PessimisticGibbs`), solved to a certified gap;
* ``offline_option2`` — GSHF option II: Gibbs policy of the pointwise lower confidence bound;
* ``online_enhancer`` / ``online_symmetric`` / ``online_uniform`` / ``online_uncertainty`` /
  ``online_best_worst`` — online iterative GSHF (:class:`~pluralign.online.OnlineGSHF`), ``t``
  rounds, with the pair design of that name (:mod:`pluralign.online.exploration`): the
  policy-level enhancer, both responses from the main agent, ``a²`` uniform, per-pair
  uncertainty over ``n_candidates`` draws of the main agent, best-of-n vs worst-of-n;
* ``hybrid_enhancer`` — the enhancer loop started from the first ``hybrid_offline`` offline
  comparisons (round 0 is the offline MLE-Gibbs policy on them).

Metrics: ``gap`` (``J_η(π*) − J_η(π̂)``, exact on the evaluation contexts), ``kl``
(``E KL(π̂‖π0)``), ``reward`` (``E Σ π̂ r*``), ``comparisons`` (all comparisons used, offline
included), ``reached_target`` (1 if ``gap ≤ target_gap``), ``duality_gap`` (option I's certified
gap), and for online rounds ``uncertainty`` (the design's own: the exploration policy's
``β_t‖E[φ(π¹) − φ(π²)]‖_{M_t⁻¹}`` for policy-level designs, the mean pair width
``β_t‖Δφ‖_{M_t⁻¹}`` for per-pair ones), ``pair_uncertainty`` (the mean pair width, every design),
``identical_pairs`` (the share of the round's pairs with ``a¹ = a²``),
``identical_pairs_expected`` (policy-level designs: ``E_x Σ_a π¹π²`` with independent draws, 0
with distinct pairs) and ``certified_gap`` (enhancer: certified bound on its shortfall from the
constrained optimum over all policies).

Options: ``batch_size`` (``m``), ``ridge`` (``l2 = ridge/N``), ``beta`` (``β = beta·sqrt((d +
log(1/δ))/N)``, for pessimism and for the online confidence sets), ``delta``,
``hybrid_offline`` (``N₀``), ``n_directions`` (enhancer eigen-directions), ``enhancer_search``
(``exact``: eigen-directions refined by SLSQP over all Gibbs tilts, with a certified bound;
``directions``: the eigen-direction scan alone), ``n_candidates`` (draws of the per-pair designs),
``opt_tol`` (option I's certified-gap tolerance), ``target_gap``, ``distinct_pairs`` (default
``true``: the two responses of every online pair differ; ``false``: independent draws; see
:class:`~pluralign.online.OnlineGSHF`).

``python -c "from pluralign.experiments.gshf import report; print(report('runs/gshf'))"`` prints
the C8/C9/C10 comparisons of ``docs/gshf.md`` from a finished run.
"""

from __future__ import annotations

from pathlib import Path
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
    Experiment,
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

__all__ = ["GSHF", "check_gshf_claims", "report", "rounds_to_target"]

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


def _check_config(config: dict[str, Any]) -> None:
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
    return ctx.cached("offline", lambda: _env(ctx).sample_offline(size, ctx.seed(1)))


def _eval(ctx: UnitContext) -> dict[str, Any]:
    def build() -> dict[str, Any]:
        env = _env(ctx)
        states = env.sample_states(ctx.env_params["n_eval"], ctx.seed(3))
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


GSHF = Experiment(
    name="gshf",
    env_defaults=ENV_DEFAULTS,
    option_defaults=OPTION_DEFAULTS,
    methods={
        "offline_mle": offline_mle,
        "offline_option1": offline_option1,
        "offline_option2": offline_option2,
        "online_enhancer": online_enhancer,
        "online_symmetric": online_symmetric,
        "online_uniform": online_uniform,
        "online_uncertainty": online_uncertainty,
        "online_best_worst": online_best_worst,
        "hybrid_enhancer": hybrid_enhancer,
    },
    default_n_samples=(10,),
    metrics=(
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
    ),
    plot_metric="gap",
    describe_setting=describe_setting,
    x_label="round t (m comparisons per round)",
    logx=False,
    claims=lambda rows, config: check_gshf_claims(rows, config),
    table_metrics=("gap", "kl", "duality_gap", "uncertainty", "identical_pairs"),
    env_spec=ENV_SPEC,
    option_spec=OPTION_SPEC,
    check_config=_check_config,
)


# ---------------------------------------------------------------------- report
def _curves(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, dict[int, float]]]:
    """``{(setting, method): {repeat: {round: gap}}}``."""
    out: dict[tuple[str, str], dict[int, dict[int, float]]] = {}
    for row in rows:
        gap = row.get("gap")
        if isinstance(gap, bool) or not isinstance(gap, int | float):
            continue  # a row without a gap (an edited file) gives no point of the curve
        out.setdefault((row["setting"], row["method"]), {}).setdefault(row["repeat"], {})[
            row["n"]
        ] = gap
    return out


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (NaN, NaN for no values: nothing to compare)."""
    arr = np.asarray(values, float)
    if arr.size == 0:
        return float("nan"), float("nan")
    se = float(arr.std(ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else float("nan")
    return float(arr.mean()), se


def rounds_to_target(curve: dict[int, float], target: float) -> int | None:
    """The first round whose gap is ``≤ target`` (``None`` if never)."""
    for t in sorted(curve):
        if curve[t] <= target:
            return t
    return None


def _paired(curves: dict, setting: str, a: str, b: str, t: int) -> tuple[float, float, int, int]:
    """Mean ± se of ``gap(a) − gap(b)`` at round ``t`` over repeats; how often ``a`` is lower."""
    ca, cb = curves[(setting, a)], curves[(setting, b)]
    diff = [ca[r][t] - cb[r][t] for r in ca if r in cb and t in ca[r] and t in cb[r]]
    mean, se = _mean_se(diff)
    return mean, se, sum(d < 0 for d in diff), len(diff)


def _first_rounds(curves: dict, setting: str, method: str, target: float, T: int) -> dict[int, int]:
    out = {}
    for r, curve in curves[(setting, method)].items():
        first = rounds_to_target(curve, target)
        out[r] = T + 1 if first is None else first  # never reached: T + 1
    return out


def check_gshf_claims(rows: list[dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    """C8–C10 of ``docs/gshf.md`` per setting: ``claim``, ``held`` (True/False, ``None`` when the
    methods needed were not run) and ``detail``. A comparison holds when the paired mean
    difference over repeats is below zero by more than two standard errors.

    * C8 (settings with ``coverage < 1``): option I or option II has a lower final gap than
      MLE-Gibbs;
    * C9: the online enhancer has a lower final gap than both symmetric and uniform;
    * C10: the hybrid reaches ``target_gap`` in fewer online rounds than the online enhancer.
    """
    curves = _curves(rows)
    T, target = config["n_samples"][0], config["options"]["target_gap"]
    out: list[dict[str, Any]] = []

    def record(name: str, held: bool | None, detail: str) -> None:
        out.append({"claim": name, "held": held, "detail": detail})

    for index, env in enumerate(config["env"]):
        setting = describe_setting(env)
        have = {m for (s, m) in curves if s == setting}
        where = f"(setting {index}: {setting})"  # no square brackets: rich reads them as markup
        if env["coverage"] < 1.0:
            if not {"offline_mle", "offline_option1", "offline_option2"} <= have:
                record(f"C8 {where}", None, "needs offline_mle, offline_option1, offline_option2")
            else:
                parts, held = [], False
                for option in ("offline_option1", "offline_option2"):
                    mean, se, wins, n = _paired(curves, setting, option, "offline_mle", T)
                    held |= mean + 2 * se < 0
                    parts.append(
                        f"gap({option}) − gap(offline_mle) = {mean:+.4f} ± {se:.4f} "
                        f"(lower in {wins}/{n})"
                    )
                record(
                    f"C8 pessimistic Gibbs beats MLE-Gibbs, round {T} {where}",
                    held,
                    "; ".join(parts),
                )
        if not {"online_enhancer", "online_symmetric", "online_uniform"} <= have:
            record(f"C9 {where}", None, "needs online_enhancer, online_symmetric, online_uniform")
        else:
            parts, held = [], True
            for other in ("online_symmetric", "online_uniform"):
                mean, se, wins, n = _paired(curves, setting, "online_enhancer", other, T)
                held &= mean + 2 * se < 0
                parts.append(
                    f"gap(enhancer) − gap({other}) = {mean:+.4f} ± {se:.4f} (lower in {wins}/{n})"
                )
            record(
                f"C9 enhancer beats symmetric and uniform, round {T} {where}",
                held,
                "; ".join(parts),
            )
        if not {"hybrid_enhancer", "online_enhancer"} <= have:
            record(f"C10 {where}", None, "needs hybrid_enhancer and online_enhancer")
        else:
            hybrid = _first_rounds(curves, setting, "hybrid_enhancer", target, T)
            online = _first_rounds(curves, setting, "online_enhancer", target, T)
            diff = [hybrid[r] - online[r] for r in hybrid if r in online]
            mean, se = _mean_se(diff)
            record(
                f"C10 hybrid reaches gap ≤ {target} in fewer rounds {where}",
                bool(mean + 2 * se < 0),
                f"first round: hybrid {np.mean(list(hybrid.values())):.2f}, online "
                f"{np.mean(list(online.values())):.2f}; paired difference {mean:+.2f} ± "
                f"{se:.2f} (hybrid fewer in {sum(d < 0 for d in diff)}/{len(diff)})",
            )
    return out


def report(out: str | Path) -> str:
    """The C8/C9/C10 comparisons of a finished ``gshf`` run, as text (means ± standard errors
    over repeats; paired differences use the same repeat's truth and data)."""
    from pluralign.errors import ConfigError
    from pluralign.experiments.config import resolve_config
    from pluralign.experiments.runner import read_config_file, run_rows

    out = Path(out)
    config = resolve_config(read_config_file(out / "config.yaml"))
    if config["experiment"] != "gshf":
        raise ConfigError(f"{out} holds a {config['experiment']!r} run, not a gshf run")
    rows = run_rows(out / "results.jsonl", config)
    curves = _curves(rows)
    T = config["n_samples"][0]
    target = config["options"]["target_gap"]
    lines = [
        f"gshf report for {out} (T={T} rounds, m={config['options']['batch_size']}, "
        f"repeats={config['repeats']})"
    ]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        lines.append(f"\n[{setting}]")
        have = {m for (s, m) in curves if s == setting}
        for t in sorted({1, T // 4, T // 2, T} - {0}):
            cells = []
            for method in [m for m in config["methods"] if m in have]:
                mean, se = _mean_se([c[t] for c in curves[(setting, method)].values() if t in c])
                cells.append(f"{method}={mean:.4f}±{se:.4f}")
            lines.append(f"  round {t:>3}: " + "  ".join(cells))
        pairs = [
            ("offline_option1", "offline_mle"),
            ("offline_option2", "offline_mle"),
            ("online_enhancer", "online_symmetric"),
            ("online_enhancer", "online_uniform"),
            ("online_enhancer", "offline_mle"),
        ]
        for a, b in pairs:
            if a in have and b in have:
                mean, se, wins, n = _paired(curves, setting, a, b, T)
                lines.append(
                    f"  gap({a}) − gap({b}) at round {T}: {mean:+.4f} ± {se:.4f} "
                    f"({a} lower in {wins}/{n} repeats)"
                )
        hits: dict[str, dict[int, int]] = {}
        for method in ("hybrid_enhancer", "online_enhancer"):
            if method in have:
                hits[method] = _first_rounds(curves, setting, method, target, T)
                reached = [h for h in hits[method].values() if h <= T]
                mean, se = _mean_se(list(hits[method].values()))
                lines.append(
                    f"  {method}: first round with gap ≤ {target}: mean {mean:.2f} ± "
                    f"{se:.2f} (reached in {len(reached)}/{len(hits[method])} repeats)"
                )
        if len(hits) == 2:
            hybrid, online = hits["hybrid_enhancer"], hits["online_enhancer"]
            diff = [hybrid[r] - online[r] for r in hybrid if r in online]
            mean, se = _mean_se(diff)
            lines.append(
                f"  rounds(hybrid) − rounds(online), paired: {mean:+.2f} ± {se:.2f} "
                f"(hybrid fewer in {sum(d < 0 for d in diff)}/{len(diff)}, "
                f"equal in {sum(d == 0 for d in diff)})"
            )
    return "\n".join(lines)
