"""The ``multi_user`` experiment's own plots (beyond the runner's ``accuracy.png``): accuracy
against diversity, subspace error against the number of users, new-user adaptation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pluralign.experiments.multi_user.methods import ADAPT_SIZES, sweep_groups
from pluralign.plots import (
    dodge,
    figure_legend,
    log_axis_suits,
    method_style,
    save_figure,
)

__all__ = ["plot_multi_user"]


def plot_multi_user(summary: list[dict[str, Any]], config: dict[str, Any], out: Path) -> list[Path]:
    """``accuracy_vs_diversity.png``, ``subspace_vs_users.png``, ``new_user_adaptation.png``
    (the conventions of :mod:`pluralign.plots`: accuracies on linear axes, a distinct marker
    and line style per method, one legend per figure outside the axes)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs, div_sweep, user_sweep = sweep_groups(config)
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
