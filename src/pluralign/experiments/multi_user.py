"""The ``multi_user`` experiment: P-ShareLoRA (seed 001, linear) on the ``MultiUser`` simulator.

Per unit (setting, n, repeat) — ``n`` is the number of comparisons **per user** — one truth
``θ_u = θ0 + B* w_u``, one training sample (user ``u`` gets ``n`` comparisons, or ``n·ω_u`` with
imbalanced users; samples for different ``n`` are nested), ``n_heldout`` held-out comparisons
per user, ``n_targets`` target states shared by all users, and ``n_new_users`` fresh users from
the same population, each with 50 adaptation comparisons (their first 10, 20 and 50 are used)
and ``n_heldout`` held-out ones. Every method sees the same draws.

Methods (models; ``k`` = option ``rank`` or the true ``k``; ridge ``λ = ridge / N_total``):

* ``shared_basis`` — :class:`~pluralign.rewards.SharedBasis` (``θ0 + B w_u``);
* ``per_user`` — :class:`~pluralign.rewards.PerUser` (independent ``θ_u``);
* ``pooled`` — :class:`~pluralign.rewards.Pooled` (one ``θ``);
* ``lowrank_onehot`` — the same model as ``shared_basis`` through the LoCo path: contexts
  ``x = [1, e_u]`` built by hand and ``LowRank(k, free_rows=1)`` fitted from a *random* start
  (``shared_basis`` starts spectrally), so agreement of the two is a check of the non-convex fit.

Metrics (per row; "per user" metrics are averaged over the training users):

* ``accuracy`` / ``worst_user_accuracy`` — held-out pairwise accuracy per user (mean / minimum);
  ``oracle_accuracy`` — the same for the true ``θ_u`` (the ceiling: labels are BT draws);
* ``heldout_loglik``, ``train_loglik`` — mean BT log-likelihood per comparison;
* ``param_error`` — ``(Σ_u‖θ̂_u − θ_u‖² / Σ_u‖θ_u‖²)^{1/2}``;
* ``subspace_distance`` — ``‖sin Θ(B̂, B*)‖₂``; for ``per_user``, ``B̂`` is the top-``k`` principal
  subspace of the centred ``θ̂_u`` (a two-stage estimate); not defined for ``pooled``;
* ``value_gap`` — mean over users of ``J_u(π*_u) − J_u(π̂_u)`` for each user's greedy policy;
  ``value_gap_pessimistic`` — the same for per-user pessimistic policies
  (:class:`~pluralign.policies.PerUserPolicies`, ``β = beta·sqrt((p + log(1/δ))/N_u)``);
* ``utilitarian_gap`` — ``max_π mean_u J_u(π) − mean_u J_u(π̂)`` for the pessimistic utilitarian
  policy; ``leximin_gap`` — ``max_π min_u Δ_u(π) − min_u Δ_u(π̂)`` for the pessimistic worst-user
  policy (``Δ_u`` = improvement over the uniform policy), both on the true rewards;
* ``newuser_accuracy_{10,20,50}`` — held-out accuracy of new users adapted from their first 10, 20,
  50 comparisons (``shared_basis``: ``w`` with ``θ̂0, B̂`` frozen; ``per_user``: a whole ``θ``;
  ``pooled``: no adaptation); ``newuser_truebasis_accuracy_{10,20,50}`` (``shared_basis`` rows) —
  the same adaptation with the true ``θ0, B*``; ``newuser_oracle_accuracy`` — true ``θ``;
* ``shared_basis_loglik_gap`` (``lowrank_onehot`` rows) — its training log-likelihood minus
  ``shared_basis``'s (≈ 0 when the two agree).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from pluralign.data import PreferenceData
from pluralign.envs import MultiUser
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
from pluralign.policies import Greedy, Leximin, PerUserPolicies, Utilitarian
from pluralign.policies.aggregate import rate_beta
from pluralign.rewards import LowRank, PerUser, Pooled, SharedBasis, subspace_distance
from pluralign.rewards.multi_user import MultiUserModel, augmented_one_hot

__all__ = ["ADAPT_SIZES", "MULTI_USER", "check_multi_user_claims"]

ADAPT_SIZES = (10, 20, 50)

ENV_DEFAULTS: dict[str, Any] = {
    "n_users": 20,
    "d_phi": 16,
    "k": 3,
    "diversity": 1.0,
    "n_actions": 8,
    "imbalance": 0.0,
    "shared_scale": 1.0,
    "n_targets": 200,
    "n_heldout": 50,
    "n_new_users": 20,
}

OPTION_DEFAULTS: dict[str, Any] = {
    "ridge": 1.0,
    "rank": 0,
    "beta": 1.0,
    "delta": 0.05,
    "policies": True,
    "policy_tol": 1e-4,
}

# What each value may be (checked by resolve_config; tabulated in docs/experiments.md).
ENV_SPEC: dict[str, Constraint] = {
    "n_users": Range(1, MAX_DIM),
    "d_phi": Range(1, MAX_DIM),
    "k": Range(1, MAX_DIM, at_most=("d_phi",)),
    "diversity": Range(0, MAX_SCALE),
    "n_actions": Range(2, MAX_DIM),
    "imbalance": Range(0, 100),
    "shared_scale": Range(0, MAX_SCALE),
    "n_targets": Range(1, MAX_SAMPLES),
    "n_heldout": Range(1, MAX_SAMPLES),
    "n_new_users": Range(1, MAX_DIM),
}

OPTION_SPEC: dict[str, Constraint] = {
    "ridge": Range(0, None, lo_open=True),
    "rank": Range(0, MAX_DIM),  # 0: the true k; otherwise ≤ every setting's d_phi
    "beta": Range(0, None),
    "delta": Range(0, 1, lo_open=True, hi_open=True),
    "policies": Choice((False, True)),
    "policy_tol": Range(0, None, lo_open=True),
}


def _check_config(config: dict[str, Any]) -> None:
    """A fitted rank (option ``rank``) of at most every setting's ``d_phi``, and at most 10^8
    comparisons drawn per unit."""
    rank, n_max = config["options"]["rank"], max(config["n_samples"])
    for index, env in enumerate(config["env"]):
        if rank > env["d_phi"]:
            raise ConfigError(
                f"'options.rank' must be ≤ 'env.d_phi' = {env['d_phi']} of every "
                f"setting (0: the true k), got {rank}"
            )
        drawn = env["n_users"] * (n_max + env["n_heldout"]) + env["n_new_users"] * (
            max(ADAPT_SIZES) + env["n_heldout"]
        )
        if drawn > MAX_SAMPLES:
            raise ConfigError(
                f"setting {index} draws {drawn:_} comparisons per unit (n_users · "
                f"(n + n_heldout) + n_new_users · ({max(ADAPT_SIZES)} + n_heldout)"
                f"); at most {MAX_SAMPLES:_} are allowed"
            )


# ---------------------------------------------------------------------------- draws
def _env(ctx: UnitContext) -> MultiUser:
    if "env" not in ctx.objects:
        p = ctx.env_params
        ctx.objects["env"] = MultiUser(
            p["n_users"],
            p["d_phi"],
            p["k"],
            p["diversity"],
            1,
            p["n_actions"],
            seed=ctx.seed(0),
            shared_scale=p["shared_scale"],
        )
    return ctx.objects["env"]


def user_counts(n: int, n_users: int, imbalance: float, seed: list[int]) -> np.ndarray:
    """Comparisons per user: ``n`` each, or ``max(2, round(n·ω_u))`` with log-normal weights
    ``ω_u ∝ exp(imbalance·g_u)`` normalized to mean 1 (monotone in ``n``: samples stay nested)."""
    if imbalance <= 0:
        return np.full(n_users, n, dtype=np.int64)
    g = np.random.default_rng(seed).standard_normal(n_users)
    weights = np.exp(imbalance * g)
    weights /= weights.mean()
    return np.maximum(2, np.round(n * weights)).astype(np.int64)


def _nested(data: PreferenceData, counts: np.ndarray) -> PreferenceData:
    """Each user's first ``counts[u]`` comparisons (rows are grouped by user, in order)."""
    users, start = np.unique(data.users, return_index=True)
    rank = np.arange(data.n) - np.repeat(start, np.diff(np.append(start, data.n)))
    index = np.searchsorted(users, data.users)
    return data.subset(rank < counts[index])


def _draws(ctx: UnitContext) -> dict[str, Any]:
    if "draws" in ctx.objects:
        return ctx.objects["draws"]
    env, p = _env(ctx), ctx.env_params
    n_max = max(ctx.config["n_samples"])
    count_seed = ctx.seed(7)
    full = env.sample_offline(
        ctx.seed(1), user_counts(n_max, env.n_users, p["imbalance"], count_seed)
    )
    train = _nested(full, user_counts(ctx.unit.n, env.n_users, p["imbalance"], count_seed))
    heldout = env.sample_offline(ctx.seed(2), p["n_heldout"])
    targets = env.sample_targets(p["n_targets"], ctx.seed(3))
    w_new, thetas_new = env.new_users(p["n_new_users"], ctx.seed(4))
    new_ids = env.n_users + np.arange(p["n_new_users"])
    new_adapt = env.sample_comparisons(
        thetas_new, [max(ADAPT_SIZES)] * len(new_ids), ctx.seed(5), new_ids
    )
    new_heldout = env.sample_comparisons(
        thetas_new, [p["n_heldout"]] * len(new_ids), ctx.seed(6), new_ids
    )
    ctx.objects["draws"] = {
        "train": train,
        "heldout": heldout,
        "targets": targets,
        "w_new": w_new,
        "thetas_new": thetas_new,
        "new_adapt": new_adapt,
        "new_heldout": new_heldout,
    }
    return ctx.objects["draws"]


def _rank(ctx: UnitContext) -> int:
    return ctx.options["rank"] or ctx.env_params["k"]


def _l2(ctx: UnitContext) -> float:
    return ctx.options["ridge"] / _draws(ctx)["train"].n


# ---------------------------------------------------------------------------- models
def _shared_basis(ctx: UnitContext) -> SharedBasis:
    train = _draws(ctx)["train"]
    return ctx.cached(
        "shared_basis", lambda: SharedBasis(_rank(ctx), _l2(ctx), seed=ctx.unit.repeat).fit(train)
    )


def _per_user(ctx: UnitContext) -> PerUser:
    train = _draws(ctx)["train"]
    return ctx.cached("per_user", lambda: PerUser(_l2(ctx)).fit(train))


def _pooled(ctx: UnitContext) -> Pooled:
    train = _draws(ctx)["train"]
    return ctx.cached("pooled", lambda: Pooled(_l2(ctx)).fit(train))


def _lowrank_onehot(ctx: UnitContext) -> SharedBasis:
    """The LoCo path: augmented one-hot contexts by hand, ``LowRank(k, free_rows=1)``."""
    train = _draws(ctx)["train"]

    def build() -> SharedBasis:
        users, index = np.unique(train.users, return_inverse=True)
        data = PreferenceData(augmented_one_hot(index, len(users)), train.phi0, train.phi1, train.y)
        inner = LowRank(_rank(ctx), _l2(ctx), free_rows=1, init="random", seed=ctx.unit.repeat).fit(
            data
        )
        return SharedBasis.from_lowrank(inner, users, data)

    return ctx.cached("lowrank_onehot", build)


def _truth(ctx: UnitContext) -> PerUser:
    env = _env(ctx)
    arrays = {
        "theta0": env.theta0_star,
        "thetas": env.thetas_star,
        "user_counts": np.ones(env.n_users, dtype=np.int64),
    }
    return ctx.cached("truth", lambda: PerUser.from_arrays(arrays, env.users, n_train=1))


# ---------------------------------------------------------------------------- metrics
def _accuracies(model: MultiUserModel, data: PreferenceData) -> np.ndarray:
    return np.array([acc for acc, _ in model.per_user_accuracy(data).values()])


def _estimated_basis(model: MultiUserModel, k: int) -> np.ndarray | None:
    if isinstance(model, Pooled):
        return None
    if hasattr(model, "basis_"):
        return model.basis_
    centred = model.thetas_ - model.thetas_.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:k].T


def _oracle_accuracy(ctx: UnitContext) -> float:
    return float(np.mean(_accuracies(_truth(ctx), _draws(ctx)["heldout"])))


def _policy_metrics(ctx: UnitContext, model: MultiUserModel) -> dict[str, float]:
    env, draws, opts = _env(ctx), _draws(ctx), ctx.options
    targets, train = draws["targets"], draws["train"]
    users = env.users
    greedy = np.stack([Greedy(model.user_model(u)).probs(targets) for u in users.tolist()])
    out = {"value_gap": float(env.value_gaps(greedy, targets).mean())}
    if not opts["policies"]:
        return out
    beta = rate_beta(opts["beta"], opts["delta"])
    per_user = PerUserPolicies(model, train, beta=beta, delta=opts["delta"], tol=opts["policy_tol"])
    out["value_gap_pessimistic"] = float(
        env.value_gaps(per_user.all_probs(targets, users), targets).mean()
    )
    truth = _truth(ctx)
    uniform = np.full((targets.m, targets.n_actions), 1.0 / targets.n_actions)
    base = env.user_values(uniform, targets)

    def best_util() -> float:
        return float(env.user_values(Utilitarian(truth).probs(targets), targets).mean())

    def best_lex() -> float:
        lex = Leximin(truth, levels=1, tol=opts["policy_tol"])
        return float((env.user_values(lex.probs(targets), targets) - base).min())

    util = Utilitarian(model, train, beta=beta, delta=opts["delta"], tol=opts["policy_tol"])
    out["utilitarian_gap"] = ctx.cached("best_utilitarian", best_util) - float(
        env.user_values(util.probs(targets), targets).mean()
    )
    lex = Leximin(model, train, levels=1, beta=beta, delta=opts["delta"], tol=opts["policy_tol"])
    lex_values = env.user_values(lex.probs(targets), targets) - base
    out["leximin_gap"] = ctx.cached("best_leximin", best_lex) - float(lex_values.min())
    return out


def _new_user_metrics(
    ctx: UnitContext, model: MultiUserModel, true_basis: bool
) -> dict[str, float]:
    draws = _draws(ctx)
    adapt, heldout = draws["new_adapt"], draws["new_heldout"]
    out: dict[str, float] = {}
    for size in ADAPT_SIZES:
        few = _nested(adapt, np.full(len(np.unique(adapt.users)), size))
        if isinstance(model, Pooled):
            out[f"newuser_accuracy_{size}"] = float(np.mean(_accuracies(model, heldout)))
            continue
        adapted = copy.deepcopy(model).adapt_user(few)
        out[f"newuser_accuracy_{size}"] = float(np.mean(_accuracies(adapted, heldout)))
        if true_basis:
            env = _env(ctx)
            arrays = {
                "theta0": env.theta0_star,
                "thetas": env.thetas_star,
                "user_counts": model.user_counts_,
                "basis": env.B_star,
                "weights": env.W_star,
            }
            oracle = SharedBasis.from_arrays(
                arrays, env.users, n_train=model.n_train_, k=env.k, l2=model.l2
            ).adapt_user(few)
            out[f"newuser_truebasis_accuracy_{size}"] = float(np.mean(_accuracies(oracle, heldout)))
    if true_basis:
        thetas = draws["thetas_new"]
        correct = (heldout.delta_phi * thetas[heldout.users - _env(ctx).n_users]).sum(1) > 0
        out["newuser_oracle_accuracy"] = float(np.mean(correct == (heldout.y == 1)))
    return out


def _evaluate(
    ctx: UnitContext, model: MultiUserModel, *, new_users: bool = True, true_basis: bool = False
) -> dict[str, float]:
    env, draws = _env(ctx), _draws(ctx)
    heldout, train = draws["heldout"], draws["train"]
    acc = _accuracies(model, heldout)
    thetas = model.user_theta(env.users)
    metrics = {
        "accuracy": float(acc.mean()),
        "worst_user_accuracy": float(acc.min()),
        "oracle_accuracy": _oracle_accuracy(ctx),
        "heldout_loglik": model.log_likelihood(heldout),
        "train_loglik": model.log_likelihood(train),
        "param_error": float(
            np.linalg.norm(thetas - env.thetas_star) / np.linalg.norm(env.thetas_star)
        ),
    }
    basis = _estimated_basis(model, _rank(ctx))
    if basis is not None:
        metrics["subspace_distance"] = subspace_distance(basis, env.B_star)
    metrics.update(_policy_metrics(ctx, model))
    if new_users:
        metrics.update(_new_user_metrics(ctx, model, true_basis))
    return metrics


def shared_basis(ctx: UnitContext) -> dict[str, float]:
    """P-ShareLoRA (linear): shared offset and basis, per-user weights."""
    return _evaluate(ctx, _shared_basis(ctx), true_basis=True)


def per_user(ctx: UnitContext) -> dict[str, float]:
    """Independent per-user Bradley–Terry MLEs."""
    return _evaluate(ctx, _per_user(ctx))


def pooled(ctx: UnitContext) -> dict[str, float]:
    """One Bradley–Terry model for everybody."""
    return _evaluate(ctx, _pooled(ctx))


def lowrank_onehot(ctx: UnitContext) -> dict[str, float]:
    """``shared_basis`` through ``LowRank(k, free_rows=1)`` on hand-built ``[1, e_u]`` contexts."""
    model = _lowrank_onehot(ctx)
    metrics = _evaluate(ctx, model, new_users=False)
    metrics["shared_basis_loglik_gap"] = metrics["train_loglik"] - _shared_basis(
        ctx
    ).log_likelihood(_draws(ctx)["train"])
    return metrics


def describe_setting(env: dict[str, Any]) -> str:
    extra = f" imb={env['imbalance']}" if env["imbalance"] > 0 else ""
    return f"U={env['n_users']} d={env['d_phi']} k={env['k']} div={env['diversity']}{extra}"


# ---------------------------------------------------------------------------- claims, plots
def _means(summary: list[dict[str, Any]], metric: str) -> dict[tuple[str, str, int], float]:
    return {
        (r["setting"], r["method"], r["n"]): r[f"{metric}_mean"]
        for r in summary
        if f"{metric}_mean" in r
    }


def _groups(config: dict[str, Any]) -> tuple[dict[str, dict], list[str], list[str]]:
    """Settings by name, and the names of the diversity sweep and of the n_users sweep."""
    envs = {describe_setting(e): e for e in config["env"]}

    def sweep(vary: str) -> list[str]:
        best: list[str] = []
        for env in envs.values():
            fixed = {k: v for k, v in env.items() if k != vary}
            group = [
                n for n, e in envs.items() if {k: v for k, v in e.items() if k != vary} == fixed
            ]
            if len(group) > len(best):
                best = sorted(group, key=lambda n: envs[n][vary])
        return best if len(best) > 1 else []

    return envs, sweep("diversity"), sweep("n_users")


def check_multi_user_claims(
    rows: list[dict[str, Any]], config: dict[str, Any]
) -> list[dict[str, Any]]:
    """C5–C7 on a ``multi_user`` run: ``claim``, ``held`` (True/False/None), ``detail``."""
    from pluralign.experiments.summary import summarize

    summary = summarize(rows, MULTI_USER.metrics)
    acc = _means(summary, "accuracy")
    envs, div_sweep, user_sweep = _groups(config)
    ns = sorted(config["n_samples"])
    claims = []

    def record(name: str, held: bool | None, detail: str) -> None:
        claims.append({"claim": name, "held": held, "detail": detail})

    name = (
        "C5 shared_basis beats per_user and pooled at small n with diverse users; pooled "
        "best at zero diversity"
    )
    if div_sweep and all(
        (s, m, ns[0]) in acc for s in div_sweep for m in ("shared_basis", "per_user", "pooled")
    ):
        n0, parts = ns[0], []
        diverse = [s for s in div_sweep if envs[s]["diversity"] >= 1.0]
        zero = [s for s in div_sweep if envs[s]["diversity"] == 0]
        ok = bool(diverse) and all(
            acc[(s, "shared_basis", n0)] > max(acc[(s, "per_user", n0)], acc[(s, "pooled", n0)])
            for s in diverse
        )
        if zero:
            s = zero[0]
            ok &= all(
                acc[(s, "pooled", n)] >= max(acc[(s, "shared_basis", n)], acc[(s, "per_user", n)])
                for n in ns
                if (s, "pooled", n) in acc
            )
        for n in ns:
            cross = next(
                (
                    envs[s]["diversity"]
                    for s in div_sweep
                    if (s, "shared_basis", n) in acc
                    and acc[(s, "shared_basis", n)] > acc[(s, "pooled", n)]
                ),
                None,
            )
            cells = ", ".join(
                f"div={envs[s]['diversity']}: "
                + "/".join(f"{acc[(s, m, n)]:.3f}" for m in ("shared_basis", "per_user", "pooled"))
                for s in div_sweep
                if (s, "pooled", n) in acc
            )
            parts.append(
                f"n={n} [shared/per_user/pooled] {cells}; shared_basis > pooled from "
                f"diversity {cross}"
            )
        record(name, ok, "; ".join(parts))
    else:
        record(name, None, "needs a diversity sweep with shared_basis, per_user and pooled")

    sub = _means(summary, "subspace_distance")
    name = "C6 subspace error of B̂ falls as the number of users grows (fixed n per user)"
    if user_sweep and any((s, "shared_basis", n) in sub for s in user_sweep for n in ns):
        ok, parts = True, []
        for n in ns:
            values = [sub.get((s, "shared_basis", n)) for s in user_sweep]
            if None in values:
                continue
            falls = all(a > b for a, b in itertools.pairwise(values))
            ok &= falls
            parts.append(
                f"n={n} ({'falls' if falls else 'not monotone'}): "
                + " > ".join(
                    f"{v:.3f} (U={envs[s]['n_users']})"
                    for v, s in zip(values, user_sweep, strict=True)
                )
            )
        record(name, ok, "; ".join(parts) + " (held = strictly decreasing at every n)")
    else:
        record(name, None, "needs an n_users sweep with shared_basis")

    name = "C7 new users adapted from 10/20/50 comparisons approach the true-basis accuracy"
    new = {size: _means(summary, f"newuser_accuracy_{size}") for size in ADAPT_SIZES}
    true = {size: _means(summary, f"newuser_truebasis_accuracy_{size}") for size in ADAPT_SIZES}
    keys = [key for key in new[ADAPT_SIZES[0]] if key[1] == "shared_basis"]
    if keys:
        mean_gap = {
            size: np.mean([true[size][key] - new[size][key] for key in keys])
            for size in ADAPT_SIZES
        }
        sweep = user_sweep or sorted({key[0] for key in keys})
        largest = (sweep[-1], "shared_basis", ns[-1])
        ok = largest in true[ADAPT_SIZES[0]] and all(
            true[size][largest] - new[size][largest] < 0.01 for size in ADAPT_SIZES
        )
        detail = "true-basis minus learned-basis accuracy, mean over all settings: " + ", ".join(
            f"{s} comparisons {mean_gap[s]:+.4f}" for s in ADAPT_SIZES
        )
        for size in ADAPT_SIZES:
            detail += f"; {size} comparisons, n={ns[-1]}, by U: " + ", ".join(
                f"U={envs[s]['n_users']} {true[size][(s, 'shared_basis', ns[-1])]:.3f} vs "
                f"{new[size][(s, 'shared_basis', ns[-1])]:.3f}"
                for s in sweep
                if (s, "shared_basis", ns[-1]) in true[size]
            )
        record(
            name,
            ok,
            detail + f" (held = gap < 0.01 for 10, 20 and 50 comparisons at "
            f"{largest[0]}, n={ns[-1]})",
        )
    else:
        record(name, None, "needs shared_basis rows with new users")
    return claims


def plot_multi_user(summary: list[dict[str, Any]], config: dict[str, Any], out: Path) -> list[Path]:
    """``accuracy_vs_diversity.png``, ``subspace_vs_users.png``, ``new_user_adaptation.png``
    (the conventions of :mod:`pluralign.experiments.plots`: accuracies on linear axes, a
    distinct marker and line style per method, one legend per figure outside the axes)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pluralign.experiments.plots import (
        dodge,
        figure_legend,
        log_axis_suits,
        method_style,
        save_figure,
    )

    envs, div_sweep, user_sweep = _groups(config)
    ns = sorted(config["n_samples"])
    methods = config["methods"]
    written = []

    def save(fig: Any, name: str) -> None:
        written.append(save_figure(fig, out / name))

    def series(metric: str, settings: list[str], key: str, method: str, n: int):
        means = {
            (r["setting"], r["method"], r["n"]): (
                r.get(f"{metric}_mean"),
                r.get(f"{metric}_se", 0.0),
            )
            for r in summary
        }
        xs, ys, es = [], [], []
        for s in settings:
            value = means.get((s, method, n))
            if value and value[0] is not None:
                xs.append(envs[s][key])
                ys.append(value[0])
                es.append(0.0 if value[1] != value[1] else value[1])
        return xs, ys, es

    if div_sweep:
        # Accuracy on a linear axis; methods dodged along x (lowrank_onehot and shared_basis
        # fit the same model and would otherwise hide each other).
        fig, axes = plt.subplots(
            1, len(ns), figsize=(4.2 * len(ns), 4.0), squeeze=False, layout="constrained"
        )
        for ax, n in zip(axes[0], ns, strict=True):
            for index, method in enumerate(methods):
                xs, ys, es = series("accuracy", div_sweep, "diversity", method, n)
                if xs:
                    ax.errorbar(
                        dodge(xs, index, len(methods), log=False),
                        ys,
                        yerr=es,
                        capsize=2,
                        label=method,
                        **method_style(index),
                    )
            xs, ys, _ = series("oracle_accuracy", div_sweep, "diversity", "pooled", n)
            if xs:
                ax.plot(xs, ys, "k--", lw=1, label="true θ_u")
            ax.set_title(f"n = {n} comparisons per user", fontsize=10)
            ax.set_xlabel("diversity")
            ax.set_ylabel("held-out accuracy (mean over users)")
            ax.grid(True, alpha=0.3)
        figure_legend(fig, order=methods)
        save(fig, "accuracy_vs_diversity.png")
    if user_sweep:
        import matplotlib.ticker

        fig, ax = plt.subplots(figsize=(6.6, 4.0), layout="constrained")
        users = sorted(envs[s]["n_users"] for s in user_sweep)
        # The error falls like a power of U: log-log shows that rate, when U and the error
        # span a decade; narrower sweeps read better on linear axes.
        logx = log_axis_suits(users)
        pairs = [(n, m) for n in ns for m in ("shared_basis", "per_user") if m in methods]
        drawn = []
        for j, (n, method) in enumerate(pairs):
            xs, ys, es = series("subspace_distance", user_sweep, "n_users", method, n)
            if xs:
                # colour and marker per n, line style (and filled/hollow) per method: each
                # (method, n) line has its own (marker, line style) pair
                style = method_style(ns.index(n))
                style.update(linestyle="-" if method == "shared_basis" else ":")
                if method == "shared_basis":
                    style.update(markerfacecolor=style["color"])
                ax.errorbar(
                    dodge(xs, j, len(pairs), log=logx),
                    ys,
                    yerr=es,
                    capsize=2,
                    label=f"{method}, n={n}",
                    **style,
                )
                drawn.extend(ys)
        if logx:
            ax.set_xscale("log")
        if log_axis_suits(drawn):
            ax.set_yscale("log")
        ax.set_xticks(users, [str(u) for u in users])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("number of users U")
        ax.set_ylabel("‖sin Θ(B̂, B*)‖ (per_user: PCA of θ̂_u)")
        ax.grid(True, which="both", alpha=0.3)
        figure_legend(fig, loc="outside right upper", fontsize=7)
        save(fig, "subspace_vs_users.png")
    sweep = user_sweep or div_sweep or list(envs)
    if "shared_basis" in methods:
        # Accuracy on a linear axis.
        fig, ax = plt.subplots(figsize=(6.8, 3.8), layout="constrained")
        key_n = ns[-1]
        shared = methods.index("shared_basis")
        lines = len(methods) + 1
        for s in sweep[-1:]:
            for label, metric, slot in (
                ("learned basis", "newuser_accuracy_{}", shared),
                ("true basis", "newuser_truebasis_accuracy_{}", len(methods)),
            ):
                ys = [
                    next(
                        (
                            r.get(f"{metric.format(a)}_mean")
                            for r in summary
                            if r["setting"] == s
                            and r["method"] == "shared_basis"
                            and r["n"] == key_n
                        ),
                        None,
                    )
                    for a in ADAPT_SIZES
                ]
                if None not in ys:
                    style = method_style(shared)
                    if slot != shared:  # shared_basis's colour, its own marker and style
                        style.update(marker="*", linestyle="--", markersize=7)
                    ax.plot(
                        dodge(ADAPT_SIZES, slot, lines, log=False),
                        ys,
                        label=f"shared_basis, {label}",
                        **style,
                    )
            for method in ("per_user", "pooled"):
                if method not in methods:
                    continue
                ys = [
                    next(
                        (
                            r.get(f"newuser_accuracy_{a}_mean")
                            for r in summary
                            if r["setting"] == s and r["method"] == method and r["n"] == key_n
                        ),
                        None,
                    )
                    for a in ADAPT_SIZES
                ]
                if None not in ys:
                    index = methods.index(method)
                    ax.plot(
                        dodge(ADAPT_SIZES, index, lines, log=False),
                        ys,
                        label=method,
                        **method_style(index),
                    )
            ys = [
                next(
                    (
                        r.get("newuser_oracle_accuracy_mean")
                        for r in summary
                        if r["setting"] == s and r["method"] == "shared_basis" and r["n"] == key_n
                    ),
                    None,
                )
            ] * len(ADAPT_SIZES)
            if None not in ys:
                ax.plot(ADAPT_SIZES, ys, "k--", lw=1, label="true θ")
            ax.set_title(f"new users, trained on {s}, n={key_n}", fontsize=9)
        ax.set_xticks(list(ADAPT_SIZES))
        ax.set_xlabel("adaptation comparisons")
        ax.set_ylabel("held-out accuracy")
        ax.grid(True, alpha=0.3)
        figure_legend(fig, loc="outside right upper", fontsize=7)
        save(fig, "new_user_adaptation.png")
    return written


MULTI_USER = Experiment(
    name="multi_user",
    env_defaults=ENV_DEFAULTS,
    option_defaults=OPTION_DEFAULTS,
    methods={
        "shared_basis": shared_basis,
        "per_user": per_user,
        "pooled": pooled,
        "lowrank_onehot": lowrank_onehot,
    },
    default_n_samples=(10, 25, 50, 100),
    metrics=(
        "accuracy",
        "worst_user_accuracy",
        "oracle_accuracy",
        "param_error",
        "subspace_distance",
        "value_gap",
        "value_gap_pessimistic",
        "utilitarian_gap",
        "leximin_gap",
        "heldout_loglik",
        "train_loglik",
        *(f"newuser_accuracy_{a}" for a in ADAPT_SIZES),
        *(f"newuser_truebasis_accuracy_{a}" for a in ADAPT_SIZES),
        "newuser_oracle_accuracy",
        "shared_basis_loglik_gap",
    ),
    plot_metric="accuracy",
    describe_setting=describe_setting,
    x_label="n (comparisons per user)",
    extra_plots=plot_multi_user,
    claims=check_multi_user_claims,
    table_metrics=(
        "accuracy",
        "worst_user_accuracy",
        "param_error",
        "subspace_distance",
        "value_gap",
        "value_gap_pessimistic",
        "newuser_accuracy_20",
    ),
    env_spec=ENV_SPEC,
    option_spec=OPTION_SPEC,
    check_config=_check_config,
)
