"""``pluralign run``: run (or resume) an experiment sweep (:mod:`pluralign.experiments`), and
the printing of a run's results, shared with ``pluralign report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from pluralign.cli.app import (
    JsonFlag,
    default_config_path,
    fail,
    load_command_config,
    stdout_to_stderr,
)
from pluralign.cli.output import render, run_view
from pluralign.errors import PluralignError

__all__ = ["print_run_report", "run"]


def run(
    config: Annotated[
        Path | None,
        typer.Argument(
            help="Experiment config: a YAML file, or a packaged config's name "
            "(loco, loco_coverage, multi_user, gshf, quick). Default: the "
            "built-in quick LoCo run."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default: runs/<config>).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Apply the config's quick overrides.")] = (
        False
    ),
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", min=1, help="Worker processes (default: cores).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Resume a results.jsonl that has no config.yaml "
            "beside it, as results of this config.",
        ),
    ] = False,
    as_json: JsonFlag = False,
    backend: Annotated[
        Literal["local", "ray"],
        typer.Option(
            "--backend",
            help="Where units run: local worker processes, or one Ray task each "
            "(needs the ray extra; see docs/experiments.md, running sweeps on a cluster).",
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="With --backend ray: the cluster to join (auto, HOST:6379, "
            "ray://HOST:10001). Default: RAY_ADDRESS, else a local Ray on this machine.",
        ),
    ] = None,
    cpus_per_unit: Annotated[
        int | None,
        typer.Option(
            "--cpus-per-unit",
            min=1,
            help="With --backend ray: CPUs (and BLAS / torch threads) per unit (default: 1).",
        ),
    ] = None,
) -> None:
    """Run (or resume) an experiment sweep; print its summary and write results and plots."""
    from pluralign.experiments import EXPERIMENTS, run_experiment
    from pluralign.experiments.runner import RayBackend, UnitsFailedError, require_ray, run_rows
    from pluralign.experiments.summary import summarize

    if backend == "local" and (address is not None or cpus_per_unit is not None):
        raise fail("--address and --cpus-per-unit are options of --backend ray")
    if backend == "ray" and jobs is not None:
        raise fail(
            "--jobs is the local backend's; with --backend ray, Ray runs as many units at once "
            "as the cluster has CPUs (--cpus-per-unit each)"
        )
    runner = None if backend == "local" else RayBackend(address, cpus_per_unit or 1)
    try:
        if runner is not None:
            require_ray()  # before anything is written
        path, raw = load_command_config(
            config or default_config_path(), announce=config is not None
        )
        out = out or Path("runs") / (path.stem + ("-quick" if quick else ""))
        with stdout_to_stderr(as_json):
            resolved = run_experiment(
                raw,
                out,
                quick=quick,
                jobs=jobs,
                progress=progress,
                force=force,
                backend=runner,
            )
        rows = run_rows(out / "results.jsonl", resolved)
    except (PluralignError, UnitsFailedError) as err:
        raise fail(str(err)) from None
    experiment = EXPERIMENTS[resolved["experiment"]]
    summary = summarize(rows, experiment.metrics)
    try:
        print_run_report(
            out, resolved, summary, f"{experiment.name} ({path})", rows=rows, as_json=as_json
        )
    except PluralignError as err:
        raise fail(str(err)) from None


def print_run_report(
    out: Path,
    resolved: dict[str, Any],
    summary: list[dict[str, Any]],
    title: str,
    rows: list[dict[str, Any]] | None = None,
    as_json: bool = False,
) -> None:
    """Tables and claims of a run (or, ``as_json``, one JSON document of them); ``rows`` are
    its results (default: read from ``out``). The claims are the experiment's own (its
    ``claims`` hook), checked on the finished units only."""
    from pluralign.experiments import EXPERIMENTS
    from pluralign.experiments.runner import complete_rows, run_rows

    experiment = EXPERIMENTS[resolved["experiment"]]
    if rows is None:
        rows = run_rows(out / "results.jsonl", resolved)
    finished = complete_rows(rows, resolved)  # claims compare whole units only
    claims = [] if experiment.claims is None else list(experiment.claims(finished, resolved))
    render(run_view(out, experiment, resolved, summary, claims, title), as_json)
