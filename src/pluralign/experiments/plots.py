"""Plots of experiment summaries (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

from pluralign._atomic import atomic_open

__all__ = ["per_user_accuracy_plot", "plot_metric", "save_figure"]


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it as a PNG atomically (a reader never sees half a file) and
    close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def plot_metric(
    summary: list[dict[str, Any]],
    metric: str,
    path: str | Path,
    *,
    settings: list[str],
    methods: list[str],
    xlabel: str = "N (offline comparisons)",
    logy: bool = True,
    logx: bool = True,
) -> Path:
    """``metric`` against ``n`` per method (mean ± standard error), one panel per setting."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.0), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for method in methods:
            pts = sorted(
                (r["n"], r[f"{metric}_mean"], r.get(f"{metric}_se", 0.0))
                for r in summary
                if r["setting"] == setting and r["method"] == method and f"{metric}_mean" in r
            )
            if not pts:
                continue
            ns, means, ses = zip(*pts, strict=True)
            ses = [0.0 if se != se else se for se in ses]  # NaN (one repeat) -> no bar
            ax.errorbar(ns, means, yerr=ses, marker="o", ms=4, capsize=2, label=method)
        if logx:
            ax.set_xscale("log")
        ticks = sorted({r["n"] for r in summary if r["setting"] == setting})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if logy:
            ax.set_yscale("log")
        ax.set_title(textwrap.fill(setting, 48), fontsize=9)   # long settings wrap, not overlap
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


def per_user_accuracy_plot(report: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Bars of each user's train and held-out pairwise accuracy (a histogram above 80 users);
    ``report`` rows have ``user``, ``train_accuracy`` and ``test_accuracy`` (or ``None``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "test_accuracy" if any(r["test_accuracy"] is not None for r in report) \
        else "train_accuracy"
    rows = sorted(report, key=lambda r: -1.0 if r[key] is None else r[key])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(rows) + 2.0), 3.8))
    if len(rows) <= 80:
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["train_accuracy"] for r in rows], 0.4, label="train")
        if key == "test_accuracy":
            ax.bar([x + 0.2 for x in xs], [r["test_accuracy"] or 0.0 for r in rows], 0.4,
                   label="held-out")
        ax.set_xticks(list(xs), [str(r["user"])[:12] for r in rows], rotation=90, fontsize=7)
        ax.set_xlabel("user")
    else:
        ax.hist([r[key] for r in rows if r[key] is not None], bins=20)
        ax.set_xlabel(key.replace("_", " "))
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_ylabel("pairwise accuracy")
    ax.set_title(title, fontsize=9)
    if len(rows) <= 80:
        ax.legend(fontsize=8)
    save_figure(fig, path)
