"""What an experiment is: a schema (env parameters, options, methods) and a unit of work.

A *unit* is one ``(setting, n, repeat)``: it builds the simulator for that setting and repeat,
draws the data, and evaluates every requested method on it, returning one row per method.
Methods of a unit share fitted models through :class:`UnitContext` (e.g. PRS, pointwise PRS and
low-rank greedy share one low-rank fit).

A method may instead return a *curve*: a list of metric dicts, each with its own ``"n"`` (the
x value, e.g. the round of an online loop). Each point becomes a row whose ``n`` is that x value,
with ``unit_n`` (the unit's ``n``, which keys resuming) and ``unit_rows`` (the unit's row count,
so that a unit cut short mid-write is recomputed). A point may carry its own ``fit_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Experiment", "Unit", "UnitContext"]


@dataclass(frozen=True)
class Unit:
    """One cell of the sweep: setting index, sample size and repeat."""

    setting: int
    n: int
    repeat: int

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.setting, self.n, self.repeat)


@dataclass
class UnitContext:
    """Per-unit cache of fitted objects, with the seconds each took to build."""

    config: dict[str, Any]
    env_params: dict[str, Any]
    unit: Unit
    objects: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    @property
    def options(self) -> dict[str, Any]:
        return self.config["options"]

    def cached(self, name: str, build: Callable[[], Any]) -> Any:
        """Build ``name`` once per unit; its build time is charged to every method using it."""
        if name not in self.objects:
            start = time.perf_counter()
            self.objects[name] = build()
            self.seconds[name] = time.perf_counter() - start
        self.used.add(name)
        return self.objects[name]

    def seed(self, *stream: int) -> list[int]:
        """A seed for a random stream of this unit: ``[config seed, setting, repeat, *stream]``.

        It does not depend on ``n``, so data sets of different sizes are nested prefixes of one
        sample, and every method sees the same data.
        """
        return [self.config["seed"], self.unit.setting, self.unit.repeat, *stream]


@dataclass(frozen=True)
class Experiment:
    """An experiment's schema and its unit runner.

    ``methods`` maps each method name to a function ``(ctx) -> dict`` of metrics (or a list of
    them, one per x value; see the module docstring); it may read shared objects through
    ``ctx.cached``. ``run_unit`` wraps it, timing each method. ``x_label`` and ``logx`` describe
    the plot's x axis (the rows' ``n``). Optional hooks: ``extra_plots(summary, resolved_config,
    out_dir) -> [paths]`` writes experiment-specific plots after a run; ``claims(rows,
    resolved_config) -> [{"claim", "held", "detail"}]`` checks the experiment's claims (printed
    by ``pluralign run`` / ``report``); ``table_metrics``, the metrics of the printed table
    (default: all).
    """

    name: str
    env_defaults: Mapping[str, Any]
    option_defaults: Mapping[str, Any]
    methods: Mapping[str, Callable[[UnitContext], dict[str, float]]]
    default_n_samples: tuple[int, ...]
    metrics: tuple[str, ...]
    plot_metric: str
    describe_setting: Callable[[dict[str, Any]], str]
    x_label: str = "N (offline comparisons)"
    logx: bool = True
    extra_plots: Callable[..., list[Any]] | None = None
    claims: Callable[..., list[dict[str, Any]]] | None = None
    table_metrics: tuple[str, ...] | None = None

    def run_unit(self, config: dict[str, Any], unit: Unit) -> list[dict[str, Any]]:
        env_params = config["env"][unit.setting]
        ctx = UnitContext(config=config, env_params=env_params, unit=unit)
        rows: list[dict[str, Any]] = []
        curves = False
        for method in config["methods"]:
            ctx.used = set()
            built_before = set(ctx.seconds)
            start = time.perf_counter()
            result = self.methods[method](ctx)
            elapsed = time.perf_counter() - start
            # Charge each method the full cost of the shared objects it used, built now or
            # earlier in the unit, so fit_seconds does not depend on the order of methods.
            reused = sum(ctx.seconds[name] for name in ctx.used & built_before)
            if not isinstance(result, list):
                rows.append(
                    {
                        "setting": self.describe_setting(env_params),
                        "method": method,
                        "n": unit.n,
                        "repeat": unit.repeat,
                        **{k: float(v) for k, v in result.items()},
                        "fit_seconds": elapsed + reused,
                    }
                )
                continue
            curves = True
            for point in result:
                metrics = dict(point)
                x = metrics.pop("n")
                seconds = metrics.pop("fit_seconds", elapsed) + reused
                rows.append(
                    {
                        "setting": self.describe_setting(env_params),
                        "method": method,
                        "n": int(x),
                        "repeat": unit.repeat,
                        "unit_n": unit.n,
                        **{k: float(v) for k, v in metrics.items()},
                        "fit_seconds": float(seconds),
                    }
                )
        if curves:
            for row in rows:
                row["unit_rows"] = len(rows)
        return rows
