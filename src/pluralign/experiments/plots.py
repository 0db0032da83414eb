"""Plots of experiment summaries (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pluralign._atomic import atomic_open

__all__ = ["plot_metric"]


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
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return Path(path)
