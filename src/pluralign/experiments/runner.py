"""Run an experiment's sweep: parallel over cores, resumable, written atomically.

Output folder:

* ``config.yaml`` — the resolved config (a folder is bound to one config: resuming with a
  different one is refused);
* ``results.jsonl`` — one row per method × setting × n × repeat. Rows are appended as units
  finish (a run killed midway keeps every finished unit); when the sweep completes the file is
  rewritten atomically in canonical order, so two runs with the same seed give the same file
  (all fields but the wall-clock ``fit_seconds``);
* ``summary.csv`` — mean and standard error of every metric per setting × method × n;
* ``<metric>.png`` — the experiment's plot.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml

from pluralign._atomic import atomic_write_text
from pluralign.errors import ConfigError
from pluralign.experiments.base import Experiment, Unit
from pluralign.experiments.config import resolve_config

__all__ = ["read_results", "run_experiment"]

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _experiment(config: dict[str, Any]) -> Experiment:
    from pluralign.experiments import EXPERIMENTS

    return EXPERIMENTS[config["experiment"]]


def units_of(config: dict[str, Any]) -> list[Unit]:
    """Every unit of the sweep, repeat-major: a partial run covers every setting and N."""
    return [
        Unit(setting=s, n=n, repeat=r)
        for r in range(config["repeats"])
        for s in range(len(config["env"]))
        for n in config["n_samples"]
    ]


def _row_key(row: dict[str, Any], settings: list[str]) -> tuple:
    """The key of the unit a row belongs to (``unit_n`` for rows of a curve, see ``base``)."""
    return (settings.index(row["setting"]), row.get("unit_n", row["n"]), row["repeat"])


def _complete(group: list[dict[str, Any]], methods: set[str]) -> bool:
    """Whether a unit's rows are all there: every method, and every row of a curve unit."""
    if {r["method"] for r in group} != methods:
        return False
    return all(r.get("unit_rows", len(group)) == len(group) for r in group)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl``; a truncated last line (a run killed mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _worker(config: dict[str, Any], unit: Unit) -> tuple[Unit, list[dict[str, Any]]]:
    import torch

    torch.set_num_threads(1)
    return unit, _experiment(config).run_unit(config, unit)


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Child processes inherit one BLAS/OpenMP thread each: ``jobs`` processes, not jobs²."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _execute(
    config: dict[str, Any], units: list[Unit], jobs: int
) -> Iterator[tuple[Unit, list[dict[str, Any]]]]:
    if jobs == 1 or len(units) <= 1:
        experiment = _experiment(config)
        for unit in units:
            yield unit, experiment.run_unit(config, unit)
        return
    with _single_threaded_children():
        pool = ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn")
        )
    with pool:
        pending = {pool.submit(_worker, config, unit) for unit in units}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def run_experiment(
    config: dict[str, Any],
    out: str | Path,
    *,
    quick: bool = False,
    jobs: int | None = None,
    progress: bool = True,
    on_unit: Callable[[Unit], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep of ``config`` into ``out``; return the resolved config.

    ``jobs`` worker processes run units in parallel (default: all cores). Units whose rows are
    already in ``out/results.jsonl`` are skipped. ``on_unit`` is called after each finished unit.
    """
    from pluralign.experiments.plots import plot_metric
    from pluralign.experiments.summary import summarize, write_summary_csv

    resolved = resolve_config(config, quick=quick)
    experiment = _experiment(resolved)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    text = yaml.safe_dump(resolved, sort_keys=False)
    if config_path.exists() and yaml.safe_load(config_path.read_text()) != resolved:
        raise ConfigError(
            f"{out} holds results of a different config; choose another --out folder "
            "(or delete it) to run this one"
        )
    atomic_write_text(config_path, text)

    settings = [experiment.describe_setting(env) for env in resolved["env"]]
    results_path = out / "results.jsonl"
    methods = set(resolved["methods"])
    rows = [r for r in read_results(results_path) if r.get("method") in methods]
    by_unit: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        by_unit.setdefault(_row_key(row, settings), []).append(row)
    complete = {k for k, group in by_unit.items() if _complete(group, methods)}
    kept = [r for r in rows if _row_key(r, settings) in complete]
    # Drop partial units and any torn line before appending.
    atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in kept))

    todo = [u for u in units_of(resolved) if u.key not in complete]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo) or 1))
    bar = _progress(progress, len(units_of(resolved)), len(units_of(resolved)) - len(todo))
    with bar as (advance), results_path.open("a", encoding="utf-8") as sink:
        for unit, unit_rows in _execute(resolved, todo, jobs):
            sink.write("".join(json.dumps(r) + "\n" for r in unit_rows))
            sink.flush()
            os.fsync(sink.fileno())
            kept.extend(unit_rows)
            advance()
            if on_unit is not None:
                on_unit(unit)

    method_order = {m: i for i, m in enumerate(resolved["methods"])}
    kept.sort(key=lambda r: (*_row_key(r, settings), method_order[r["method"]], r["n"]))
    atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in kept))
    summary = summarize(kept, experiment.metrics)
    write_summary_csv(summary, out / "summary.csv")
    plot_metric(summary, experiment.plot_metric, out / f"{experiment.plot_metric}.png",
                settings=settings, methods=resolved["methods"], xlabel=experiment.x_label,
                logx=experiment.logx)
    if experiment.extra_plots is not None:
        experiment.extra_plots(summary, resolved, out)
    return resolved


@contextlib.contextmanager
def _progress(enabled: bool, total: int, done: int) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task("units", total=total, completed=done)
        yield lambda: bar.advance(task)
