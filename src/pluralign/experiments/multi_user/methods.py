"""The ``multi_user`` experiment's schema (env parameters, options, their constraints, the
metrics), its draws, models and methods: what one unit computes.
:mod:`pluralign.experiments.multi_user` describes every method and metric and assembles the
:class:`~pluralign.experiments.base.Experiment`.
"""

from __future__ import annotations

import copy
from typing import Any, cast

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
    Range,
    UnitContext,
)
from pluralign.policies import Greedy, Leximin, PerUserPolicies, Utilitarian
from pluralign.policies.aggregate import rate_beta
from pluralign.rewards import LowRank, PerUser, Pooled, SharedBasis, subspace_distance
from pluralign.rewards.multi_user import MultiUserModel
from pluralign.rewards.users import augmented_one_hot

__all__ = [
    "ADAPT_SIZES",
    "ENV_DEFAULTS",
    "ENV_SPEC",
    "METRICS",
    "OPTION_DEFAULTS",
    "OPTION_SPEC",
    "RENAMED",
    "check_config",
    "describe_setting",
    "lowrank_onehot",
    "per_user",
    "pooled",
    "shared_basis",
    "sweep_groups",
    "user_counts",
]

ADAPT_SIZES = (10, 20, 50)

ENV_DEFAULTS: dict[str, Any] = {
    "n_users": 20,
    "d_phi": 16,
    "rank": 3,
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

# Older names of env parameters / options ({section: {old: new}}, as pluralign.llm.config's
# RENAMED): a config that uses one is refused with the new name.
RENAMED: dict[str, dict[str, str]] = {"env": {"k": "rank"}}

# What each value may be (checked by resolve_config; tabulated in docs/experiments.md).
ENV_SPEC: dict[str, Constraint] = {
    "n_users": Range(1, MAX_DIM),
    "d_phi": Range(1, MAX_DIM),
    "rank": Range(1, MAX_DIM, at_most=("d_phi",)),
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
    "rank": Range(0, MAX_DIM),  # 0: the true rank; otherwise ≤ every setting's d_phi
    "beta": Range(0, None),
    "delta": Range(0, 1, lo_open=True, hi_open=True),
    "policies": Choice((False, True)),
    "policy_tol": Range(0, None, lo_open=True),
}

# The metrics a row may carry (the module docstring of pluralign.experiments.multi_user).
METRICS: tuple[str, ...] = (
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
)


def check_config(config: dict[str, Any]) -> None:
    """A fitted rank (option ``rank``) of at most every setting's ``d_phi``, and at most 10^8
    comparisons drawn per unit."""
    rank, n_max = config["options"]["rank"], max(config["n_samples"])
    for index, env in enumerate(config["env"]):
        if rank > env["d_phi"]:
            raise ConfigError(
                f"'options.rank' must be ≤ 'env.d_phi' = {env['d_phi']} of every "
                f"setting (0: the true rank), got {rank}"
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
            p["rank"],
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
    ids = cast(np.ndarray, data.users)  # multi-user data: every row has a user id
    users, start = np.unique(ids, return_index=True)
    rank = np.arange(data.n) - np.repeat(start, np.diff(np.append(start, data.n)))
    index = np.searchsorted(users, ids)
    return data.subset(rank < counts[index])


def _draws(ctx: UnitContext) -> dict[str, Any]:
    if "draws" in ctx.objects:
        return ctx.objects["draws"]
    env, p = _env(ctx), ctx.env_params
    n_max = max(ctx.config["n_samples"])
    count_seed = ctx.seed(7)
    full = env.sample_offline(
        user_counts(n_max, env.n_users, p["imbalance"], count_seed), seed=ctx.seed(1)
    )
    train = _nested(full, user_counts(ctx.unit.n, env.n_users, p["imbalance"], count_seed))
    heldout = env.sample_offline(p["n_heldout"], seed=ctx.seed(2))
    targets = env.sample_targets(p["n_targets"], seed=ctx.seed(3))
    w_new, thetas_new = env.new_users(p["n_new_users"], seed=ctx.seed(4))
    new_ids = env.n_users + np.arange(p["n_new_users"])
    new_adapt = env.sample_comparisons(
        thetas_new, [max(ADAPT_SIZES)] * len(new_ids), seed=ctx.seed(5), users=new_ids
    )
    new_heldout = env.sample_comparisons(
        thetas_new, [p["n_heldout"]] * len(new_ids), seed=ctx.seed(6), users=new_ids
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
    return ctx.options["rank"] or ctx.env_params["rank"]


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
    """The LoCo path: augmented one-hot contexts by hand, ``LowRank(rank, free_rows=1)``."""
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


def _estimated_basis(model: MultiUserModel, rank: int) -> np.ndarray | None:
    if isinstance(model, Pooled):
        return None
    if hasattr(model, "basis_"):
        return model.basis_
    centred = model.thetas_ - model.thetas_.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:rank].T


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
        # Only models that adapt a new user (SharedBasis, PerUser) get here; Pooled returned above.
        adapted = copy.deepcopy(model).adapt_user(few)  # type: ignore[attr-defined]
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
                arrays, env.users, n_train=model.n_train_, rank=env.rank, l2=model.l2
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
    """``shared_basis`` through ``LowRank(rank, free_rows=1)`` on hand-built ``[1, e_u]``
    contexts."""
    model = _lowrank_onehot(ctx)
    metrics = _evaluate(ctx, model, new_users=False)
    metrics["shared_basis_loglik_gap"] = metrics["train_loglik"] - _shared_basis(
        ctx
    ).log_likelihood(_draws(ctx)["train"])
    return metrics


def describe_setting(env: dict[str, Any]) -> str:
    extra = f" imb={env['imbalance']}" if env["imbalance"] > 0 else ""
    return f"U={env['n_users']} d={env['d_phi']} r={env['rank']} div={env['diversity']}{extra}"


def sweep_groups(config: dict[str, Any]) -> tuple[dict[str, dict], list[str], list[str]]:
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
