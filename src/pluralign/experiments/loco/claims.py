"""The LoCo-RLHF claims (C1–C4; Lee, Sun & Liu 2024, arXiv 2412.19436), checked on a ``loco``
run's results.

* C1 — PRS sub-optimality is below full-rank pessimistic at every N, in every setting.
* C2 — with skewed behaviour and context shift, PRS is below low-rank greedy at small N
  (the two smallest N of the sweep).
* C3 — PRS sub-optimality stays under the theory's ``O(N^{-1/2})`` upper bound: with the
  constant fitted at the smallest N of the sweep, ``c = subopt(N_min)·sqrt(N_min)``, it holds
  iff ``subopt(N) ≤ c/sqrt(N)`` at every larger N, in every setting. The theory bounds the
  sub-optimality from above, so a slope steeper than −1/2 does not contradict it (a flatter one
  eventually does). The detail reports the fitted log-log slope (ordinary least squares on
  ``log N``, ``log subopt``) and the margin: the largest ratio ``subopt(N)/(c/sqrt(N))`` over
  the larger N (held iff ≤ 1).
* C4 — at fixed N, the low-rank estimation error grows with (d_x + d_phi)·r across settings.

Each check compares means over repeats and reports the numbers it used, so a reader can judge
the margins against the standard errors in ``summary.csv``.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from pluralign.experiments.registry import EXPERIMENTS
from pluralign.experiments.summary import summarize

__all__ = ["check_loco_claims"]


def _table(summary: list[dict[str, Any]], method: str, metric: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for rec in summary:
        if rec["method"] == method and f"{metric}_mean" in rec:
            out.setdefault(rec["setting"], {})[rec["n"]] = rec[f"{metric}_mean"]
    return out


def check_loco_claims(rows: list[dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per claim: ``claim``, ``held`` (True/False/None if not measurable), ``detail``."""
    summary = summarize(rows, ["suboptimality", "estimation_error"])
    sub = {
        m: _table(summary, m, "suboptimality")
        for m in ("prs", "fullrank_pessimistic", "lowrank_greedy")
    }
    err = _table(summary, "lowrank_greedy", "estimation_error") or _table(
        summary, "prs", "estimation_error"
    )
    claims = []

    def record(name: str, held: bool | None, detail: str) -> None:
        claims.append({"claim": name, "held": held, "detail": detail})

    def below(name: str, method: str, other: str, smallest: int | None = None) -> None:
        """``name`` holds if ``method`` is below ``other`` at every N (or the ``smallest`` Ns)."""
        if not (sub[method] and sub[other]):
            record(name, None, "methods not in the run")
            return
        parts, ok = [], True
        for setting, by_n in sub[method].items():
            theirs = sub[other].get(setting, {})
            for n in sorted(by_n)[:smallest]:
                if n in theirs:
                    ok &= by_n[n] < theirs[n]
                    parts.append(f"{setting} N={n}: {by_n[n]:.4g} vs {theirs[n]:.4g}")
        record(name, ok, "; ".join(parts))

    below("C1 PRS < full-rank pessimistic at every N", "prs", "fullrank_pessimistic")
    below("C2 PRS < low-rank greedy at small N", "prs", "lowrank_greedy", smallest=2)

    if sub["prs"]:
        parts, ok = [], True
        for setting, by_n in sub["prs"].items():
            ns = np.array(sorted(by_n), dtype=float)
            vals = np.array([by_n[int(n)] for n in ns])
            if len(ns) < 2 or (vals <= 0).any():
                ok = False
                parts.append(f"{setting}: not measurable")
                continue
            slope = float(np.polyfit(np.log(ns), np.log(vals), 1)[0])
            c = vals[0] * np.sqrt(ns[0])
            ratios = vals[1:] / (c / np.sqrt(ns[1:]))
            worst = int(np.argmax(ratios))
            ok &= bool(np.all(ratios <= 1.0))
            parts.append(
                f"{setting}: slope {slope:.3f}, c = {c:.4g} (N={int(ns[0])}), "
                f"max subopt/(c/√N) = {ratios[worst]:.3f} at N={int(ns[1:][worst])}"
            )
        record(
            "C3 PRS sub-optimality under c/√N (c fitted at the smallest N)", ok, "; ".join(parts)
        )

    envs = {_describe(config, e): (e["d_x"] + e["d_phi"]) * e["rank"] for e in config["env"]}
    if err and len(envs) > 1:
        order = sorted(err, key=lambda s: envs.get(s, 0))
        common = set.intersection(*(set(err[s]) for s in order))
        parts, ok = [], True
        for n in sorted(common):
            values = [err[s][n] for s in order]
            ok &= all(a < b for a, b in itertools.pairwise(values))
            parts.append(
                f"N={n}: "
                + " < ".join(
                    f"{v:.3g} [(d_x+d_phi)r={envs[s]}]" for v, s in zip(values, order, strict=True)
                )
            )
        record("C4 low-rank error grows with (d_x+d_phi)·r", ok, "; ".join(parts))
    else:
        record("C4 low-rank error grows with (d_x+d_phi)·r", None, "needs ≥ 2 settings")
    return claims


def _describe(config: dict[str, Any], env: dict[str, Any]) -> str:
    return EXPERIMENTS[config["experiment"]].describe_setting(env)
