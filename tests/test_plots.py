"""Plot conventions (pluralign.plots and the multi_user plots), checked on the
matplotlib Figure objects: axis scales, per-method styles, one legend clear of the data, and
per-user bars with their Wilson intervals and counts. No pixels are compared."""

from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from scipy.optimize import brentq
from scipy.stats import norm

from pluralign.experiments.multi_user import plot_multi_user
from pluralign.experiments.multi_user import plots as multi_user_plots
from pluralign.experiments.multi_user.methods import describe_setting
from pluralign.plots import (
    metric_figure,
    per_user_accuracy_figure,
    per_user_accuracy_plot,
    plot_metric,
    wilson_interval,
)

matplotlib.use("Agg")

METHODS = ["shared_basis", "per_user", "pooled", "lowrank_onehot"]
NS = [10, 25, 50, 100]


# ------------------------------------------------------------------------------ oracle
def wilson_oracle(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson interval by its definition, ``{p : |p̂ − p| ≤ z·sqrt(p(1 − p)/n)}``, the
    ends found by root finding (scipy's normal quantile, not the code's stdlib one)."""
    z = norm.ppf(0.5 + confidence / 2.0)
    p_hat = successes / n

    def g(p: float) -> float:
        return abs(p_hat - p) - z * math.sqrt(p * (1.0 - p) / n)

    # g(0) = p̂ and g(1) = 1 − p̂: an end of [0, 1] is itself a bound where g is 0 there.
    # The other root is bracketed from just beside p̂ (g < 0 there; at p̂ = 0 or 1 g(p̂) = 0,
    # so the bracket starts 1e-12 inside, far from any root for n ≤ 200).
    eps = 1e-12
    lower = 0.0 if successes == 0 else brentq(g, 0.0, min(p_hat, 1.0 - eps), xtol=1e-15, rtol=1e-15)
    upper = 1.0 if successes == n else brentq(g, max(p_hat, eps), 1.0, xtol=1e-15, rtol=1e-15)
    return lower, upper


GRID = [
    (k, n)
    for n in (1, 2, 3, 5, 10, 17, 50, 200)
    for k in range(n + 1)
    if n <= 17 or k in (0, 1, 2, n // 3, n // 2, n - 1, n)
]


@pytest.mark.parametrize(("k", "n"), GRID)
def test_wilson_interval_matches_root_finding_oracle(k, n):
    lower, upper = wilson_interval(k, n)
    ref_lower, ref_upper = wilson_oracle(k, n)
    assert lower == pytest.approx(ref_lower, abs=1e-10)
    assert upper == pytest.approx(ref_upper, abs=1e-10)
    assert 0.0 <= lower <= k / n <= upper <= 1.0
    if k == 0:
        assert lower == 0.0 and upper > 0.0
    if k == n:
        assert upper == 1.0 and lower < 1.0


@pytest.mark.parametrize(
    ("k", "n", "confidence"),
    [(2.5, 5, 0.95), (7.5, 12, 0.95), (3, 9, 0.9), (3, 9, 0.99), (0, 4, 0.8), (40, 40, 0.99)],
)
def test_wilson_interval_fractional_counts_and_other_levels(k, n, confidence):
    assert wilson_interval(k, n, confidence) == pytest.approx(
        wilson_oracle(k, n, confidence), abs=1e-10
    )


def test_wilson_interval_textbook_value_and_bad_input():
    # 5 of 10 at 95%: (0.2366, 0.7634), the value quoted by e.g. Agresti & Coull (1998)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-5)
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(1, 5, confidence=1.0)


# ------------------------------------------------------------------------------ helpers
def legends_of(fig) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def legend_labels(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def data_points(ax) -> np.ndarray:
    """Display coordinates of every plotted point: line vertices (markers, error-bar caps),
    error-bar segment ends, bar corners and text anchors."""
    pts = []
    for line in ax.get_lines():
        xy = np.asarray(line.get_xydata(), dtype=float)
        pts.append(line.get_transform().transform(xy))
    for coll in ax.collections:
        for seg in getattr(coll, "get_segments", list)():
            if len(seg):
                pts.append(coll.get_transform().transform(np.asarray(seg, dtype=float)))
    for patch in ax.patches:
        ext = patch.get_window_extent()
        pts.append(
            np.array([[ext.x0, ext.y0], [ext.x1, ext.y1], [ext.x0, ext.y1], [ext.x1, ext.y0]])
        )
    for text in ax.texts:
        pts.append(text.get_transform().transform(np.atleast_2d(text.get_position())))
    pts = np.concatenate(pts) if pts else np.empty((0, 2))
    return pts[np.isfinite(pts).all(axis=1)]


def assert_one_legend_clear_of_data(fig) -> object:
    """Exactly one legend in ``fig``, whose box holds no plotted point nor any axes' area."""
    fig.canvas.draw()
    legends = legends_of(fig)
    assert len(legends) == 1, f"{len(legends)} legends"
    box = legends[0].get_window_extent()
    for ax in fig.axes:
        pts = data_points(ax)
        assert len(pts), "no data to check"
        inside = (
            (pts[:, 0] >= box.x0)
            & (pts[:, 0] <= box.x1)
            & (pts[:, 1] >= box.y0)
            & (pts[:, 1] <= box.y1)
        )
        assert not inside.any(), f"legend covers {pts[inside][:3]}"
        assert not box.overlaps(ax.get_window_extent()), "legend inside an axes"
    return legends[0]


def method_lines(ax) -> dict[str, object]:
    """``{label: data Line2D}`` of the labelled lines and error-bar series of ``ax``."""
    out = {}
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer) and not container.get_label().startswith("_"):
            out[container.get_label()] = container.lines[0]
    for line in ax.get_lines():
        if not line.get_label().startswith("_"):
            out.setdefault(line.get_label(), line)
    return out


def style(line) -> tuple[str, str]:
    return str(line.get_marker()), str(line.get_linestyle())


# ------------------------------------------------------------------------------ plot_metric
def metric_summary(metric: str, values, settings=("U=4 d=3", "U=8 d=3")) -> list[dict]:
    """Summary rows with ``values(setting_index, method_index, n)`` as means, shared_basis and
    lowrank_onehot equal (they fit the same model)."""
    rows = []
    for s, setting in enumerate(settings):
        for m, method in enumerate(METHODS):
            for n in NS:
                same = METHODS.index("shared_basis") if method == "lowrank_onehot" else m
                rows.append(
                    {
                        "setting": setting,
                        "method": method,
                        "n": n,
                        f"{metric}_mean": values(s, same, n),
                        f"{metric}_se": 0.01,
                    }
                )
    return rows


@pytest.fixture
def accuracy_summary():
    rng = np.random.default_rng(0)
    table = {
        (s, m, n): float(rng.uniform(0.6, 0.9)) for s in range(2) for m in range(4) for n in NS
    }
    return metric_summary("accuracy", lambda s, m, n: table[(s, m, n)])


def test_accuracy_plot_is_linear_with_a_distinct_style_per_method(accuracy_summary):
    settings = ["U=4 d=3", "U=8 d=3"]
    fig = metric_figure(accuracy_summary, "accuracy", settings=settings, methods=METHODS)
    assert len(fig.axes) == 2
    fig.canvas.draw()
    styles_by_panel = []
    for ax in fig.axes:
        assert ax.get_yscale() == "linear"
        assert ax.get_xscale() == "log"
        lines = method_lines(ax)
        assert sorted(lines) == sorted(METHODS)
        styles = {m: style(line) for m, line in lines.items()}
        assert len(set(styles.values())) == len(METHODS)  # distinct (marker, linestyle)
        assert len({marker for marker, _ in styles.values()}) == len(METHODS)
        assert all(line.get_markerfacecolor() == "none" for line in lines.values())
        styles_by_panel.append(styles)
        # equal values stay visible: the two series are not drawn on the same spot
        shared, onehot = lines["shared_basis"], lines["lowrank_onehot"]
        np.testing.assert_array_equal(shared.get_ydata(), onehot.get_ydata())
        a = ax.transData.transform(shared.get_xydata())
        b = ax.transData.transform(onehot.get_xydata())
        assert np.all(np.abs(a[:, 0] - b[:, 0]) >= 1.0)  # at least a pixel apart
        # the dodge is small: each point stays within 5% of a decade of its n
        assert np.allclose(np.log10(np.asarray(shared.get_xdata(), float)), np.log10(NS), atol=0.05)
    assert styles_by_panel[0] == styles_by_panel[1]  # a method looks the same in each
    legend = assert_one_legend_clear_of_data(fig)
    assert legend_labels(legend) == METHODS  # each method once


def test_metric_plot_keeps_log_axes_only_where_values_span_decades():
    decades = metric_summary("suboptimality", lambda s, m, n: (m + 1) / n)  # 0.01 … 0.4
    fig = metric_figure(decades, "suboptimality", settings=["U=4 d=3", "U=8 d=3"], methods=METHODS)
    assert {ax.get_yscale() for ax in fig.axes} == {"log"}
    assert_one_legend_clear_of_data(fig)
    narrow = metric_summary("suboptimality", lambda s, m, n: 0.5 + 0.01 * m + 1 / n)
    fig = metric_figure(narrow, "suboptimality", settings=["U=4 d=3", "U=8 d=3"], methods=METHODS)
    assert {ax.get_yscale() for ax in fig.axes} == {"linear"}
    negative = metric_summary("heldout_loglik", lambda s, m, n: -0.7 + 0.1 * m - 1 / n)
    fig = metric_figure(
        negative, "heldout_loglik", settings=["U=4 d=3", "U=8 d=3"], methods=METHODS
    )
    assert {ax.get_yscale() for ax in fig.axes} == {"linear"}
    # an explicit choice is kept; logx=False (the gshf rounds) gives a linear x axis
    fig = metric_figure(
        decades, "suboptimality", settings=["U=4 d=3"], methods=METHODS, logy=False, logx=False
    )
    assert (fig.axes[0].get_yscale(), fig.axes[0].get_xscale()) == ("linear", "linear")
    # accuracies stay linear even when their values would span a decade
    wide = metric_summary("accuracy", lambda s, m, n: 0.05 + 0.9 * m / 3 * (n / 100))
    fig = metric_figure(wide, "accuracy", settings=["U=4 d=3"], methods=METHODS)
    assert fig.axes[0].get_yscale() == "linear"


def test_single_panel_legend_and_written_png(tmp_path, accuracy_summary):
    path = plot_metric(
        accuracy_summary,
        "accuracy",
        tmp_path / "accuracy.png",
        settings=["U=4 d=3"],
        methods=METHODS,
    )
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    fig = metric_figure(accuracy_summary, "accuracy", settings=["U=4 d=3"], methods=METHODS)
    assert_one_legend_clear_of_data(fig)


# ------------------------------------------------------------------------------ per-user bars
def user_report(seed: int = 0, users: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    report = []
    for i in range(users):
        n_train = int(rng.integers(1, 41))
        n_test = int(rng.integers(0, 11))
        k_train = {0: 0, 1: n_train}.get(i, int(rng.integers(0, n_train + 1)))
        k_test = {2: 0, 3: n_test}.get(i, int(rng.integers(0, n_test + 1)))
        if i == 4:  # a tie counts one half: fractional successes
            n_train, k_train = 5, 2.5
        report.append(
            {
                "user": f"user{i:02d}",
                "n_train": n_train,
                "train_accuracy": k_train / n_train,
                "n_test": n_test,
                "test_accuracy": k_test / n_test if n_test else None,
            }
        )
    report[5]["train_accuracy"] = None  # an LLM run may miss a user's train metrics
    return report


def bars_by_user(ax, label: str) -> dict[str, tuple[float, float, np.ndarray]]:
    """``{user: (centre, height, error-bar segment)}`` of the bar series ``label``."""
    users = [t.get_text() for t in ax.get_xticklabels()]
    (container,) = [
        c for c in ax.containers if isinstance(c, BarContainer) and c.get_label() == label
    ]
    segments = container.errorbar.lines[2][0].get_segments()
    assert len(segments) == len(container.patches)
    out = {}
    for patch, seg in zip(container.patches, segments, strict=True):
        centre = patch.get_x() + patch.get_width() / 2.0
        out[users[round(centre)]] = (centre, patch.get_height(), np.asarray(seg))
    return out


def test_per_user_bars_carry_wilson_intervals_and_counts():
    report = user_report()
    by_user = {r["user"]: r for r in report}
    fig = per_user_accuracy_figure(report, "per-user accuracy")
    (ax,) = fig.axes
    assert ax.get_yscale() == "linear"
    counts = {}
    for text in ax.texts:
        if (text.get_gid() or "").startswith("count:"):
            counts[(text.get_gid(), round(text.get_position()[0], 6))] = text.get_text()
    checked = 0
    for label, prefix in (("train", "train"), ("held-out", "test")):
        bars = bars_by_user(ax, label)
        assert sorted(bars) == sorted(by_user)
        for user, (centre, height, seg) in bars.items():
            row = by_user[user]
            acc, n = row[f"{prefix}_accuracy"], row[f"n_{prefix}"]
            assert counts[(f"count:{prefix}", round(centre, 6))] == str(n)
            if acc is None:
                assert math.isnan(height) and len(seg) == 0  # no bar, no interval
                continue
            assert height == pytest.approx(acc)
            lower, upper = wilson_oracle(acc * n, n)
            assert seg[:, 0] == pytest.approx([centre, centre])
            assert sorted(seg[:, 1]) == pytest.approx([lower, upper], abs=1e-9)
            checked += 1
    assert checked == sum(r["train_accuracy"] is not None for r in report) + sum(
        r["test_accuracy"] is not None for r in report
    )
    assert len(counts) == 2 * len(report)  # one count per bar, none repeated
    legend = assert_one_legend_clear_of_data(fig)
    assert legend_labels(legend) == ["train", "held-out"]


def test_per_user_bars_without_held_out_and_many_users(tmp_path):
    report = [{**r, "n_test": 0, "test_accuracy": None} for r in user_report(1, 6)]
    fig = per_user_accuracy_figure(report, "train only")
    (ax,) = fig.axes
    assert [c.get_label() for c in ax.containers if isinstance(c, BarContainer)] == ["train"]
    assert len([t for t in ax.texts if t.get_gid() == "count:train"]) == 6
    assert legend_labels(assert_one_legend_clear_of_data(fig)) == ["train"]
    many = user_report(2, 90)  # above 80 users: a histogram, no per-user bars
    fig = per_user_accuracy_figure(many, "many")
    assert not [c for c in fig.axes[0].containers if c.get_label() in ("train", "held-out")]
    assert (
        per_user_accuracy_plot(report, tmp_path / "a.png", "t").read_bytes().startswith(b"\x89PNG")
    )


# ------------------------------------------------------------------------------ multi_user
@pytest.fixture
def multi_user_figures(monkeypatch, tmp_path):
    envs = [
        {"n_users": 8, "d_phi": 6, "rank": 2, "diversity": d, "imbalance": 0.0}
        for d in (0.0, 0.5, 1.0, 2.0)
    ]
    envs += [
        {"n_users": u, "d_phi": 6, "rank": 2, "diversity": 1.0, "imbalance": 0.0}
        for u in (4, 16, 64)
    ]
    config = {"env": envs, "n_samples": [10, 50], "methods": METHODS}
    rng = np.random.default_rng(3)
    summary = []
    for env in envs:
        setting = describe_setting(env)
        for m, method in enumerate(METHODS):
            for n in config["n_samples"]:
                row = {
                    "setting": setting,
                    "method": method,
                    "n": n,
                    "accuracy_mean": float(rng.uniform(0.6, 0.9)),
                    "accuracy_se": 0.01,
                    "oracle_accuracy_mean": 0.95,
                }
                if method in ("shared_basis", "per_user"):
                    row["subspace_distance_mean"] = (m + 1) / env["n_users"] * 2
                    row["subspace_distance_se"] = 0.001
                for a in (10, 20, 50):
                    row[f"newuser_accuracy_{a}_mean"] = 0.6 + a / 200 + 0.01 * m
                    row[f"newuser_truebasis_accuracy_{a}_mean"] = 0.62 + a / 200
                row["newuser_oracle_accuracy_mean"] = 0.9
                summary.append(row)
    shared = {(r["setting"], r["n"]): r for r in summary if r["method"] == "shared_basis"}
    for r in summary:  # lowrank_onehot fits the same model as shared_basis
        if r["method"] == "lowrank_onehot":
            r["accuracy_mean"] = shared[(r["setting"], r["n"])]["accuracy_mean"]
    figures = {}

    def capture(fig, path, **_):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(multi_user_plots, "save_figure", capture)
    written = plot_multi_user(summary, config, tmp_path)
    assert [p.name for p in written] == [
        "accuracy_vs_diversity.png",
        "subspace_vs_users.png",
        "new_user_adaptation.png",
    ]
    yield figures
    for fig in figures.values():
        plt.close(fig)


def test_accuracy_vs_diversity_styles_and_one_legend(multi_user_figures):
    fig = multi_user_figures["accuracy_vs_diversity.png"]
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_yscale() == "linear"
        lines = method_lines(ax)
        assert sorted(lines) == sorted([*METHODS, "true θ_u"])
        assert len({style(line) for line in lines.values()}) == len(lines)
        np.testing.assert_array_equal(
            lines["shared_basis"].get_ydata(), lines["lowrank_onehot"].get_ydata()
        )
        assert not np.array_equal(
            lines["shared_basis"].get_xdata(), lines["lowrank_onehot"].get_xdata()
        )
    legend = assert_one_legend_clear_of_data(fig)
    assert legend_labels(legend) == [*METHODS, "true θ_u"]


def test_subspace_and_new_user_plots(multi_user_figures):
    fig = multi_user_figures["subspace_vs_users.png"]
    (ax,) = fig.axes
    # the error falls from 0.5 to 0.03 over U = 4 … 64: both span a decade, log-log
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    lines = method_lines(ax)
    assert len(lines) == 4 and len({style(line) for line in lines.values()}) == 4
    # n=10 and n=50 have equal errors here: dodged, so no line lies on another
    xy = [np.asarray(line.get_xydata(), float) for line in lines.values()]
    assert all(not np.array_equal(a, b) for i, a in enumerate(xy) for b in xy[i + 1 :])
    assert len(legend_labels(assert_one_legend_clear_of_data(fig))) == 4

    fig = multi_user_figures["new_user_adaptation.png"]
    (ax,) = fig.axes
    assert ax.get_yscale() == "linear" and ax.get_xscale() == "linear"
    lines = method_lines(ax)
    assert sorted(lines) == sorted(
        ["shared_basis, learned basis", "shared_basis, true basis", "per_user", "pooled", "true θ"]
    )
    assert len({style(line) for line in lines.values()}) == len(lines)
    assert len(legend_labels(assert_one_legend_clear_of_data(fig))) == len(lines)
