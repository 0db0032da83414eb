"""Plots of summaries (matplotlib, Agg backend, written atomically): an experiment's metric
against N, per-user accuracy bars. It imports nothing of pluralign's but ``_atomic``, so the
experiments, the LLM jobs and the CLI all draw with it.

Conventions shared by every plot here (and by the experiment-specific plots that use these
helpers, e.g. :func:`pluralign.experiments.multi_user.plots.plot_multi_user`):

* Accuracy-like quantities (bounded in ``[0, 1]``, where a difference of a few points
  matters) are drawn on a **linear** axis. A log axis is kept only where the quantity spans
  decades (sub-optimality or errors against N, which fall like a power of N): see
  :func:`log_axis_suits`.
* Each method has its own colour, hollow marker shape *and* line style
  (:func:`method_style`), and its points are dodged slightly along x (:func:`dodge`), so a
  method whose values equal another's (``lowrank_onehot`` and ``shared_basis`` fit the same
  model) stays visible instead of hiding under it.
* A figure has exactly one legend, outside the axes (:func:`figure_legend`), so it never
  covers data and is not repeated once per panel.
* Per-user accuracy bars carry the number of comparisons behind each bar and a 95% Wilson
  score interval (:func:`wilson_interval`).
"""

from __future__ import annotations

import io
import math
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pluralign._atomic import atomic_open

__all__ = [
    "dodge",
    "figure_legend",
    "is_accuracy_like",
    "log_axis_suits",
    "method_style",
    "metric_figure",
    "per_user_accuracy_figure",
    "per_user_accuracy_plot",
    "plot_metric",
    "save_figure",
    "wilson_interval",
]

# Hollow markers of distinct shapes, cycled with distinct line styles: the (marker, line
# style) pair of method ``i`` is unique for the first 20 methods (lcm of 10 and 4).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINESTYLES = ("-", "--", "-.", ":")


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    r"""Wilson score interval for a binomial proportion (``successes`` out of ``n`` trials).

    With ``p̂ = successes / n`` and ``z`` the ``(1 + confidence) / 2`` quantile of the standard
    normal (1.95996… for 95%), the interval is the set of ``p`` with
    ``|p̂ − p| ≤ z·sqrt(p(1 − p)/n)``, i.e.

    .. math::

        \frac{p̂ + z^2/(2n)}{1 + z^2/n} \;\pm\;
        \frac{z}{1 + z^2/n}\sqrt{\frac{p̂(1 − p̂)}{n} + \frac{z^2}{4n^2}}

    Unlike the normal (Wald) interval ``p̂ ± z·sqrt(p̂(1 − p̂)/n)`` it stays inside ``[0, 1]``
    and does not collapse to a point at ``p̂ = 0`` or ``1`` (a user whose few comparisons were
    all right still gets a wide interval). ``successes`` may be fractional (accuracies that
    count a tie as one half). Returns ``(lower, upper)``; ``n ≥ 1`` and
    ``0 ≤ successes ≤ n`` are required.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0.0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    # The bounds are exactly 0 at p̂ = 0 and 1 at p̂ = 1 (and inside [0, 1] otherwise): set
    # them so rather than keep the rounding error of the difference.
    lower = 0.0 if successes == 0 else max(0.0, centre - half)
    upper = 1.0 if successes == n else min(1.0, centre + half)
    return lower, upper


def is_accuracy_like(metric: str) -> bool:
    """Whether ``metric`` is a share in ``[0, 1]`` (accuracies, coverage shares): plotted on a
    linear axis, whatever its values."""
    return "accuracy" in metric or metric.endswith("_share") or metric == "reached_target"


def log_axis_suits(values: Sequence[float]) -> bool:
    """Whether a log axis suits ``values``: all finite values positive and spanning at least a
    decade (max/min ≥ 10). Narrower ranges read better on a linear axis, and a log axis
    cannot show zero or negative values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return bool(finite) and min(finite) > 0.0 and max(finite) / min(finite) >= 10.0


def method_style(index: int) -> dict[str, Any]:
    """Keyword arguments of ``plot``/``errorbar`` for the method at ``index`` of the methods
    list: a colour, a hollow marker and a line style, the (marker, line style) pair distinct
    per method (so overlapping lines stay tellable apart also without colour)."""
    color = f"C{index % 10}"
    return {
        "color": color,
        "marker": MARKERS[index % len(MARKERS)],
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
        "markersize": 5,
        "markerfacecolor": "none",
        "markeredgecolor": color,
        "markeredgewidth": 1.2,
    }


def dodge(
    xs: Sequence[float], index: int, count: int, *, log: bool, width: float = 0.03
) -> list[float]:
    """``xs`` shifted for the ``index``-th of ``count`` series, the series spread over
    ``width`` (a share of a decade on a log axis, else of the range of ``xs``) around the true
    positions, so equal values of different methods do not draw on top of each other."""
    if count <= 1 or not xs:
        return [float(x) for x in xs]
    share = width * (index - (count - 1) / 2.0) / (count - 1)
    if log:
        return [float(x) * 10.0**share for x in xs]
    span = (max(xs) - min(xs)) or 1.0
    return [float(x) + share * span for x in xs]


def figure_legend(
    fig: Any,
    *,
    loc: str = "outside lower center",
    ncols: int | None = None,
    fontsize: float = 8,
    title: str | None = None,
    order: Sequence[str] = (),
) -> Any:
    """The figure's one legend, placed outside the axes (``fig`` needs the constrained
    layout for the ``"outside …"`` locations), its entries collected from all axes with
    repeated labels kept once, those named in ``order`` first (matplotlib lists plain lines
    before error-bar series). Returns the legend, or ``None`` when nothing is labelled."""
    found: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(label, handle)
    if not found:
        return None
    entries = {label: found[label] for label in order if label in found}
    entries.update(found)
    if ncols is None:
        # below or above the axes: as many columns as fit the figure's width (~2 inches an
        # entry at fontsize 8, long method names included), so no entry is cut off
        across = max(1, int(fig.get_figwidth() // 2.0))
        ncols = min(len(entries), across) if "lower" in loc or "upper center" in loc else 1
    return fig.legend(
        list(entries.values()),
        list(entries),
        loc=loc,
        ncols=ncols,
        fontsize=fontsize,
        title=title,
        title_fontsize=fontsize,
        frameon=False,
    )


def _new_figure(figsize: tuple[float, float]) -> Any:
    """A constrained-layout Figure on the Agg canvas, outside pyplot (nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Lay out ``fig`` (tight layout unless it already has a layout engine, e.g. the
    constrained layout its outside legend needs), write it as a PNG atomically (a reader
    never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def metric_figure(
    summary: list[dict[str, Any]],
    metric: str,
    *,
    settings: list[str],
    methods: list[str],
    xlabel: str = "N (offline comparisons)",
    logy: bool | None = None,
    logx: bool = True,
) -> Any:
    """The Figure of :func:`plot_metric` (not saved)."""
    import matplotlib.ticker

    fig = _new_figure((5.2 * len(settings), 4.4))
    axes = fig.subplots(1, len(settings), squeeze=False)
    if logy is None:
        # Accuracies: linear (bounded, a few points matter). Sub-optimality, gaps and errors
        # against N fall like a power of N and span decades: log, when their values do.
        logy = not is_accuracy_like(metric) and log_axis_suits(
            [r[f"{metric}_mean"] for r in summary if f"{metric}_mean" in r]
        )
    for ax, setting in zip(axes[0], settings, strict=True):
        for index, method in enumerate(methods):
            pts = sorted(
                (r["n"], r[f"{metric}_mean"], r.get(f"{metric}_se", 0.0))
                for r in summary
                if r["setting"] == setting and r["method"] == method and f"{metric}_mean" in r
            )
            if not pts:
                continue
            ns, means, ses = zip(*pts, strict=True)
            ses = tuple(0.0 if se != se else se for se in ses)  # NaN (one repeat) -> no bar
            ax.errorbar(
                dodge(ns, index, len(methods), log=logx),
                means,
                yerr=ses,
                capsize=2,
                label=method,
                **method_style(index),
            )
        # N is a geometric grid (e.g. 500 … 5000): a log x axis spaces it evenly.
        if logx:
            ax.set_xscale("log")
        ticks = sorted({r["n"] for r in summary if r["setting"] == setting})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if logy:
            ax.set_yscale("log")
        ax.set_title(textwrap.fill(setting, 48), fontsize=9)  # long settings wrap, not overlap
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
    figure_legend(fig, order=methods)
    return fig


def plot_metric(
    summary: list[dict[str, Any]],
    metric: str,
    path: str | Path,
    *,
    settings: list[str],
    methods: list[str],
    xlabel: str = "N (offline comparisons)",
    logy: bool | None = None,
    logx: bool = True,
) -> Path:
    """``metric`` against ``n`` per method (mean ± standard error), one panel per setting, one
    legend below the panels. ``logy=None`` (default) picks the y scale: linear for
    accuracy-like metrics, log where the means span a decade (:func:`log_axis_suits`)."""
    fig = metric_figure(
        summary, metric, settings=settings, methods=methods, xlabel=xlabel, logy=logy, logx=logx
    )
    return save_figure(fig, path, dpi=120)


def _bar_series(
    rows: list[dict[str, Any]], prefix: str
) -> tuple[list[float], list[int | None], list[tuple[float, float] | None]]:
    """Heights (NaN: no accuracy), counts (``None``: not in the row) and Wilson intervals
    (``None``: no count or no accuracy) of ``prefix`` (``train`` or ``test``) per row."""
    heights, counts, intervals = [], [], []
    for row in rows:
        acc, n = row.get(f"{prefix}_accuracy"), row.get(f"n_{prefix}")
        heights.append(float("nan") if acc is None else float(acc))
        counts.append(None if n is None else int(n))
        intervals.append(
            wilson_interval(min(max(acc * n, 0.0), n), n) if acc is not None and n else None
        )
    return heights, counts, intervals


def per_user_accuracy_figure(report: list[dict[str, Any]], title: str) -> Any:
    """The Figure of :func:`per_user_accuracy_plot` (not saved)."""
    key = (
        "test_accuracy"
        if any(r.get("test_accuracy") is not None for r in report)
        else "train_accuracy"
    )
    rows = sorted(report, key=lambda r: -1.0 if r.get(key) is None else r[key])
    fig = _new_figure((max(5.0, 0.25 * len(rows) + 3.5), 4.0))
    ax = fig.subplots()
    if len(rows) <= 80:
        xs = list(range(len(rows)))
        series = [("train", "train")] + ([("test", "held-out")] if key == "test_accuracy" else [])
        width = 0.8 / len(series)
        for i, (prefix, label) in enumerate(series):
            heights, counts, intervals = _bar_series(rows, prefix)
            centres = [x + (i - (len(series) - 1) / 2.0) * width for x in xs]
            nan = float("nan")
            yerr = [
                [
                    nan if iv is None else h - iv[0]
                    for h, iv in zip(heights, intervals, strict=True)
                ],
                [
                    nan if iv is None else iv[1] - h
                    for h, iv in zip(heights, intervals, strict=True)
                ],
            ]
            ax.bar(
                centres,
                heights,
                width,
                yerr=yerr,
                label=label,
                color=f"C{i}",
                error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "0.25"},
            )
            for x, n, iv in zip(centres, counts, intervals, strict=True):
                if n is not None:  # the comparisons behind the bar, above its interval
                    ax.text(
                        x,
                        (iv[1] if iv else 0.0) + 0.015,
                        str(n),
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=6,
                        gid=f"count:{prefix}",
                    )
        ax.set_xticks(xs, [str(r["user"])[:12] for r in rows], rotation=90, fontsize=7)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylim(0.0, 1.2)  # room for the counts above an interval reaching 1
        ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_xlabel("user")
        ax.set_ylabel("pairwise accuracy")
        figure_legend(
            fig,
            loc="outside right upper",
            title="whiskers: 95% Wilson\ninterval; numbers:\ncomparisons per bar",
        )
    else:
        ax.hist([r[key] for r in rows if r.get(key) is not None], bins=20)
        ax.set_xlabel(f"{key.replace('_', ' ')} ({len(rows)} users)")
        ax.set_ylabel("users")
    if len(rows) <= 80:
        ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_title(title, fontsize=9)
    return fig


def per_user_accuracy_plot(report: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Bars of each user's train and held-out pairwise accuracy (a histogram above 80 users),
    each with the user's number of comparisons and a 95% Wilson score interval
    (:func:`wilson_interval`); ``report`` rows have ``user``, ``train_accuracy`` and
    ``test_accuracy`` (either may be ``None``: no bar) and, for the counts and intervals,
    ``n_train`` and ``n_test``."""
    return save_figure(per_user_accuracy_figure(report, title), path)
