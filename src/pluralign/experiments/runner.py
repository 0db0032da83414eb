"""Run an experiment's sweep: parallel over cores (or a Ray cluster), resumable, written
atomically.

Backends (:class:`LocalBackend`, the default: spawned worker processes; :class:`RayBackend`:
one Ray task per unit) only run units; this process writes every row, so the output folder,
resuming and the rows themselves do not depend on the backend.

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
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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
    "Backend",
    "LocalBackend",
    "RayBackend",
    "UnitFailure",
    "UnitsFailedError",
    "complete_rows",
    "describe_unit",
    "read_config_file",
    "read_results",
    "require_ray",
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
        where: dict[str, Any] = {"path": str(path), "line": line}
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


# ---------------------------------------------------------------- backends
# A backend runs units and yields each finished one as ``(unit, rows)``, or as
# ``(unit, UnitFailure)`` when it keeps going past a failed unit (the Ray backend does; the local
# pool stops at the first unit that raises, and the exception propagates as it is).
@dataclass(frozen=True)
class UnitFailure:
    """A unit that did not finish: which one, and why (``error``: one line; ``detail``: the
    backend's full report, e.g. the worker's traceback)."""

    unit: Unit
    error: str
    detail: str = ""


BackendResult = tuple[Unit, list[dict[str, Any]] | UnitFailure]


def describe_unit(config: dict[str, Any], unit: Unit) -> str:
    """A unit's identity for messages: its setting's name and index, ``n`` and repeat."""
    setting = _experiment(config).describe_setting(config["env"][unit.setting])
    return f"unit (setting {setting!r} [#{unit.setting}], n={unit.n}, repeat={unit.repeat})"


class UnitsFailedError(RuntimeError):
    """Units of a sweep failed (each named, with its error); every other unit finished and its
    rows are in ``results.jsonl``, so running the same sweep again computes only the missing
    units. ``failures``: the :class:`UnitFailure` of each."""

    def __init__(self, config: dict[str, Any], failures: list[UnitFailure], finished: int):
        self.failures = failures
        lines = [f"{describe_unit(config, f.unit)}: {f.error}" for f in failures]
        super().__init__(
            f"{len(failures)} unit(s) failed ({finished} other unit(s) of this run finished "
            "and were written); run the same command again to compute only the missing "
            "units:\n  " + "\n  ".join(lines)
        )


class Backend(Protocol):
    """Where units run: ``execute(config, units)`` submits them and yields each finished unit
    (see :data:`BackendResult`), in the order they finish."""

    def execute(self, config: dict[str, Any], units: list[Unit]) -> Iterator[BackendResult]: ...


@dataclass(frozen=True)
class LocalBackend:
    """``jobs`` spawned worker processes on this machine (default: all cores; one process runs
    units in-process), one BLAS / torch thread each; the first unit that raises stops the run."""

    jobs: int | None = None

    def execute(self, config: dict[str, Any], units: list[Unit]) -> Iterator[BackendResult]:
        jobs = max(1, min(self.jobs or os.cpu_count() or 1, len(units) or 1))
        yield from _execute(config, units, jobs)


RAY_INSTALL_HINT = (
    "the Ray backend needs the `ray` package: pip install 'pluralign[ray]' "
    "(or pip install 'ray>=2.9'), on the driver and on every node of the cluster"
)


def require_ray() -> Any:
    """The ``ray`` module; a ConfigError saying how to install it if it is missing."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def _closed_after(results: Iterator[BackendResult]) -> Iterator[Iterator[BackendResult]]:
    """``results``, closed on leaving (a generator's ``finally`` runs: a pool is shut down,
    units in flight cancelled), also when the run stops early."""
    try:
        yield results
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def _ray_unit(config: dict[str, Any], unit: Unit, threads: int) -> list[dict[str, Any]]:
    """The Ray task of one unit: its rows, computed with ``threads`` BLAS / torch threads.

    Ray sets a worker's ``OMP_NUM_THREADS`` to its task's CPUs when the node's environment does
    not set it; the limits are also applied here (torch, and BLAS through ``threadpoolctl``
    where it is installed), since a worker process serves many tasks.
    """
    import torch

    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        limits: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        limits = threadpool_limits(threads, user_api="blas")
    with limits:
        return _experiment(config).run_unit(config, unit)


def _ray_failure(ray: Any, unit: Unit, exc: BaseException) -> UnitFailure:
    """What went wrong with a unit's Ray task, in one line (and the full report)."""
    if isinstance(exc, ray.exceptions.RayTaskError):  # the unit raised
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        error = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
        return UnitFailure(unit, error, str(exc))
    # the worker died (WorkerCrashedError: killed, os._exit, out of memory), its node was lost…
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return UnitFailure(unit, f"{type(exc).__name__}: {first}".rstrip(": "), str(exc))


@dataclass(frozen=True)
class RayBackend:
    """Each unit is a Ray task (``cpus_per_unit`` CPUs, that many BLAS / torch threads).

    Ray is reached at ``address`` (``ray.init(address=...)``: ``"auto"``, ``"HOST:6379"``,
    ``"ray://HOST:10001"``); without one, a Ray already initialized in this process is used,
    else ``ray.init()`` joins the cluster of ``RAY_ADDRESS`` or starts a local one (shut down
    when the run ends). The config goes to the object store once; rows come back to this
    process (the driver), which alone writes the output folder. A unit that raises, or whose
    worker dies, is reported with its identity (:class:`UnitFailure`) and the other units
    finish. Tasks are not retried (``max_retries=0``): a rerun computes the missing units.
    """

    address: str | None = None
    cpus_per_unit: int = 1

    def execute(self, config: dict[str, Any], units: list[Unit]) -> Iterator[BackendResult]:
        if not units:
            return
        ray = require_ray()
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(
                    address=self.address, include_dashboard=False, logging_level=logging.WARNING
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or os.environ.get("RAY_ADDRESS") or "a local Ray"
                raise ConfigError(f"cannot start or reach Ray ({where}): {exc}") from None
        try:
            yield from self._run(ray, config, units)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray: Any, config: dict[str, Any], units: list[Unit]) -> Iterator[BackendResult]:
        task = ray.remote(
            num_cpus=self.cpus_per_unit,
            max_retries=0,
        )(_ray_unit)  # looked up now, so that tests can substitute it
        shared = ray.put(config)
        pending = {task.remote(shared, unit, self.cpus_per_unit): unit for unit in units}
        try:
            while pending:
                ready, rest = ray.wait(list(pending), num_returns=1)
                if rest:  # everything else that is done by now, in one call
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                for ref in ready:
                    unit = pending.pop(ref)
                    try:
                        rows = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        yield unit, _ray_failure(ray, unit, exc)
                    else:
                        yield unit, rows
        finally:
            for ref in pending:  # the run was stopped: its units in flight are dropped
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)


def run_experiment(
    config: dict[str, Any],
    out: str | Path,
    *,
    quick: bool = False,
    jobs: int | None = None,
    progress: bool = True,
    on_unit: Callable[[Unit], None] | None = None,
    force: bool = False,
    backend: Backend | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep of ``config`` into ``out``; return the resolved config.

    ``jobs`` worker processes run units in parallel (default: all cores). Units whose rows are
    already in ``out/results.jsonl`` are skipped (see :func:`resume_rows`). A ``results.jsonl``
    without a ``config.yaml`` beside it is refused unless ``force`` (its rows are then resumed
    as rows of this config). ``on_unit`` is called after each finished unit.

    ``backend`` runs the units (default: ``LocalBackend(jobs)``; ``RayBackend(...)`` runs each
    as a Ray task, and then ``jobs`` must be ``None``). Either way this process writes the rows
    as units finish, and the same config gives the same rows. Units a backend reports as failed
    (:class:`UnitFailure`) are left out; once every other unit has finished,
    :class:`UnitsFailedError` names them.
    """
    if backend is not None and jobs is not None:
        raise ConfigError("jobs is the local backend's; leave it out with another backend")
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
    backend = backend or LocalBackend(jobs)
    failures: list[UnitFailure] = []
    bar = _progress(progress, len(units_of(resolved)), len(units_of(resolved)) - len(todo))
    finished = _closed_after(iter(backend.execute(resolved, todo)))
    with bar as (advance), results_path.open("a", encoding="utf-8") as sink, finished as done:
        for unit, unit_rows in done:
            if isinstance(unit_rows, UnitFailure):
                failures.append(unit_rows)
                continue
            sink.write("".join(json.dumps(r) + "\n" for r in unit_rows))
            sink.flush()
            os.fsync(sink.fileno())
            kept.extend(unit_rows)
            advance()
            if on_unit is not None:
                on_unit(unit)
    if failures:
        raise UnitsFailedError(resolved, failures, len(todo) - len(failures))

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
