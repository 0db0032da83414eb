"""The GSHF claims (C8–C10 of ``docs/gshf.md``; Xiong et al. 2024, ICML 2024, arXiv
2312.11456), checked on a ``gshf`` run's results, and :func:`report`, the text of those
comparisons for a finished run folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pluralign.errors import ConfigError
from pluralign.experiments.config import resolve_config
from pluralign.experiments.gshf.methods import describe_setting
from pluralign.experiments.runner import read_config_file, run_rows

__all__ = ["check_gshf_claims", "report", "rounds_to_target"]


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


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
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
