"""The P-ShareLoRA claims (C5–C7; Liu et al. 2025, arXiv 2503.19201), checked on a
``multi_user`` run's results (see :func:`check_multi_user_claims`)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from pluralign.experiments.multi_user.methods import ADAPT_SIZES, METRICS, sweep_groups
from pluralign.experiments.summary import summarize

__all__ = ["check_multi_user_claims"]


def _means(summary: list[dict[str, Any]], metric: str) -> dict[tuple[str, str, int], float]:
    return {
        (r["setting"], r["method"], r["n"]): r[f"{metric}_mean"]
        for r in summary
        if f"{metric}_mean" in r
    }


def check_multi_user_claims(
    rows: list[dict[str, Any]], config: dict[str, Any]
) -> list[dict[str, Any]]:
    """C5–C7 on a ``multi_user`` run: ``claim``, ``held`` (True/False/None), ``detail``."""
    summary = summarize(rows, METRICS)
    acc = _means(summary, "accuracy")
    envs, div_sweep, user_sweep = sweep_groups(config)
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
            falls = all(a > b for a, b in itertools.pairwise(values))  # type: ignore[operator]  # no None here
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
