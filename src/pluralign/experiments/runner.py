"""Run an experiment's sweep: parallel over cores, resumable, written atomically.

Resuming (:func:`resume_rows`): a torn last line (a run killed mid-write) is dropped; any other
malformed line, or a row of a setting, method or unit the config does not have, is a
:class:`~pluralign.errors.DataValidationError` naming the file and line (nothing is thrown
away); a repeated row (same unit, method and ``n``) is kept once, first seen; units missing a
method's rows (or a curve's rows) are recomputed.

Worker processes exit when the process that started them dies, even by ``SIGKILL``.

Output folder:

* ``config.yaml`` — the resolved config (a folder is bound to one config: resuming with a
  different one is refused, and so is a ``results.jsonl`` without ``config.yaml`` unless
  ``force``);
* ``results.jsonl`` — one row per method × setting × n × repeat. Rows are appended as units
  finish (a run killed midway keeps every finished unit); when the sweep completes the file is
  rewritten atomically in canonical order, so two runs with the same seed give the same file
  (all fields but the wall-clock ``fit_seconds``);
* ``summary.csv`` — mean and standard error of every metric per setting × method × n;
* ``<metric>.png`` — the experiment's plot.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml

from pluralign._atomic import atomic_write_text
from pluralign._parse import parse_json, read_yaml_file
from pluralign.errors import ConfigError, DataValidationError
from pluralign.experiments.base import Experiment, Unit, show
from pluralign.experiments.config import resolve_config
from pluralign.experiments.registry import EXPERIMENTS
from pluralign.experiments.summary import summarize, write_summary_csv
from pluralign.plots import plot_metric

__all__ = [
    "complete_rows",
    "read_config_file",
    "read_results",
    "resume_rows",
    "run_experiment",
    "run_rows",
]

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _experiment(config: dict[str, Any]) -> Experiment:
    return EXPERIMENTS[config["experiment"]]


def units_of(config: dict[str, Any]) -> list[Unit]:
    """Every unit of the sweep, repeat-major: a partial run covers every setting and N."""
    return [
        Unit(setting=s, n=n, repeat=r)
        for r in range(config["repeats"])
        for s in range(len(config["env"]))
        for n in config["n_samples"]
    ]


def _row_key(row: dict[str, Any], settings: dict[str, int]) -> tuple:
    """The key of the unit a row belongs to (``unit_n`` for rows of a curve, see ``base``)."""
    return (settings[row["setting"]], row.get("unit_n", row["n"]), row["repeat"])


def _complete(group: list[dict[str, Any]], methods: set[str]) -> bool:
    """Whether a unit's rows are all there: every method, and every row of a curve unit."""
    if {r["method"] for r in group} != methods:
        return False
    return all(r.get("unit_rows", len(group)) == len(group) for r in group)


def _parse_line(raw: bytes, path: str, line: int) -> Any:
    """One line as JSON under :mod:`pluralign._parse`'s rules (UTF-8, no repeated key, nesting
    and integer size bounded; ``NaN``, ``Infinity`` and overflowing numbers read as nan/inf)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"not valid UTF-8 (byte {exc.start + 1} of the line)", path=path, line=line
        ) from None
    return parse_json(text, path=path, line=line, finite=False)


_COUNTS = {"n": 0, "repeat": 0, "unit_n": 0, "unit_rows": 1}  # integer fields, their minimum


def _check_row(row: Any, path: str, line: int) -> dict[str, Any]:
    """``row`` if it has the shape of a result row, else DataValidationError (with the line)."""
    if not isinstance(row, dict):
        raise DataValidationError(
            f"a row must be a JSON object, got {show(row)}", path=path, line=line
        )
    for key in ("setting", "method", "n", "repeat"):
        if key not in row:
            raise DataValidationError("missing", field=key, path=path, line=line)
    for key, value in row.items():
        if key in ("setting", "method"):
            ok = isinstance(value, str)
            want = "a string"
        elif key in _COUNTS:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= _COUNTS[key]
            want = f"an integer ≥ {_COUNTS[key]}"
        else:  # a metric: NaN and ±inf are allowed (summaries skip them)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            want = "a number"
            if ok and isinstance(value, int):
                ok = abs(value) <= sys.float_info.max
        if not ok:
            raise DataValidationError(
                f"must be {want}, got {show(value)}", field=str(key), path=path, line=line
            )
    return row


def _numbered_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line, row)`` of a results file; see :func:`read_results`."""
    if not path.exists():
        return []
    if path.is_dir():
        raise DataValidationError("is a directory, not a results file", path=str(path))
    if not path.is_file():
        raise DataValidationError("is not a regular file", path=str(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DataValidationError(
            f"cannot be read ({exc.strerror or exc})", path=str(path)
        ) from None
    lines = data.split(b"\n")
    torn = len(lines) - 1 if lines[-1] else None  # no final newline: the last line may be torn
    rows = []
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = _parse_line(raw, str(path), index + 1)
        except DataValidationError:
            if index == torn:
                continue  # a run killed mid-write: its unit is recomputed
            raise
        rows.append((index + 1, _check_row(row, str(path), index + 1)))
    return rows


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl`` (``[]`` if there is none).

    A torn last line (no final newline, and it cannot be parsed: a run killed mid-write) is
    dropped. Any other line that is not a JSON object with a string ``setting`` and
    ``method``, integer ``n`` and ``repeat`` (and ``unit_n`` / ``unit_rows``) and numbers
    (NaN and ±inf allowed) for everything else raises
    :class:`~pluralign.errors.DataValidationError` with the file and the line.
    """
    return [row for _, row in _numbered_rows(Path(path))]


def _setting_index(config: dict[str, Any]) -> dict[str, int]:
    experiment = _experiment(config)
    return {experiment.describe_setting(env): i for i, env in enumerate(config["env"])}


def run_rows(path: str | Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``path`` as rows of the resolved ``config``: each row must be of one of its
    settings, methods and units (else DataValidationError naming the line); a repeated row
    (same unit, method and ``n``) is kept once, the first time it appears."""
    path = Path(path)
    settings = _setting_index(config)
    methods = set(config["methods"])
    n_samples = set(config["n_samples"])
    seen: set[tuple] = set()
    rows = []
    for line, row in _numbered_rows(path):
        where = {"path": str(path), "line": line}
        if row["setting"] not in settings:
            raise DataValidationError(
                f"a row of setting {show(row['setting'])}, which "
                f"{path.parent / 'config.yaml'} does not have",
                field="setting",
                **where,
            )
        if row["method"] not in methods:
            raise DataValidationError(
                f"a row of method {show(row['method'])}, which the config does not run",
                field="method",
                **where,
            )
        key = _row_key(row, settings)
        if key[1] not in n_samples or key[2] >= config["repeats"]:
            raise DataValidationError(
                f"a row of n={key[1]}, repeat={key[2]}, a unit outside the config's sweep",
                field="n",
                **where,
            )
        identity = (*key, row["method"], row["n"])
        if identity in seen:
            continue
        seen.add(identity)
        rows.append(row)
    return rows


def _complete_units(
    rows: list[dict[str, Any]], config: dict[str, Any]
) -> tuple[list[dict[str, Any]], set[tuple[int, int, int]]]:
    settings = _setting_index(config)
    methods = set(config["methods"])
    by_unit: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        by_unit.setdefault(_row_key(row, settings), []).append(row)
    complete = {k for k, group in by_unit.items() if _complete(group, methods)}
    return [r for r in rows if _row_key(r, settings) in complete], complete


def complete_rows(rows: list[dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows (of :func:`run_rows`) of units that have every method's rows."""
    return _complete_units(rows, config)[0]


def resume_rows(
    path: str | Path, config: dict[str, Any]
) -> tuple[list[dict[str, Any]], set[tuple[int, int, int]]]:
    """What a resumed run keeps of ``path``: the rows (:func:`run_rows`) of the units that are
    complete, and those units' keys."""
    return _complete_units(run_rows(path, config), config)


def read_config_file(path: str | Path) -> Any:
    """The YAML of a run folder's ``config.yaml`` (:func:`pluralign._parse.read_yaml_file`: a
    missing or unreadable file, bad UTF-8, invalid or too deeply nested YAML, a repeated key or
    a huge integer is a ConfigError naming the file)."""
    return read_yaml_file(path, error=ConfigError)


# ---------------------------------------------------------------- worker processes
_PR_SET_PDEATHSIG = 1


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: the worker dies when the run's process does (even by SIGKILL).

    On Linux the kernel sends SIGKILL at the parent's death (``prctl(PR_SET_PDEATHSIG)``);
    everywhere a daemon thread also polls ``os.getppid()`` (it changes when the parent dies and
    the worker is re-parented) and exits the worker.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.25)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="pluralign-parent-watch", daemon=True).start()


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
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_exit_with_parent,
            initargs=(os.getpid(),),
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
    force: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the sweep of ``config`` into ``out``; return the resolved config.

    ``jobs`` worker processes run units in parallel (default: all cores). Units whose rows are
    already in ``out/results.jsonl`` are skipped (see :func:`resume_rows`). A ``results.jsonl``
    without a ``config.yaml`` beside it is refused unless ``force`` (its rows are then resumed
    as rows of this config). ``on_unit`` is called after each finished unit.
    """
    resolved = resolve_config(config, quick=quick)
    experiment = _experiment(resolved)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not an output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{out}: cannot create the output folder ({exc.strerror or exc})"
        ) from None
    config_path = out / "config.yaml"
    results_path = out / "results.jsonl"
    text = yaml.safe_dump(resolved, sort_keys=False)
    if config_path.exists() or config_path.is_symlink():
        if read_config_file(config_path) != resolved:
            raise ConfigError(
                f"{out} holds results of a different config; choose another --out folder "
                "(or delete it) to run this one"
            )
    elif (
        results_path.is_dir() or (results_path.exists() and results_path.stat().st_size)
    ) and not force:
        raise ConfigError(
            f"{out} holds a results.jsonl but no config.yaml, so its rows cannot be matched to "
            "this config; choose another --out folder, or pass --force (force=True) to resume "
            "them as results of this config"
        )
    settings = _setting_index(resolved)
    kept, complete = resume_rows(results_path, resolved)  # before any write: errors keep all
    atomic_write_text(config_path, text)
    # Drop partial units, repeated rows and any torn line before appending.
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
    plot_metric(
        summary,
        experiment.plot_metric,
        out / f"{experiment.plot_metric}.png",
        settings=list(settings),
        methods=resolved["methods"],
        xlabel=experiment.x_label,
        logx=experiment.logx,
    )
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
