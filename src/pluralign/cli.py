"""The ``pluralign`` command line (typer + rich)."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pluralign import __version__
from pluralign.errors import PluralignError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="pluralign: personalized, robust policies from heterogeneous human feedback.",
)
console = Console()


def default_config_path() -> Path:
    """The built-in quick LoCo-RLHF config that ``pluralign run`` uses without a CONFIG."""
    return Path(str(resources.files("pluralign") / "configs" / "quick.yaml"))


def _version(value: bool) -> None:
    if value:
        console.print(f"pluralign {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """pluralign command line."""


def _fmt(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "—"
    if se is None or math.isnan(se):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {se:.2g}"


_SHORT = {"suboptimality": "subopt", "estimation_error": "est. error",
          "heldout_loglik": "held-out LL", "fit_seconds": "fit s", "duality_gap": "FW gap"}


def summary_tables(summary: list[dict[str, Any]], metrics: list[str]) -> list[Table]:
    """One rich table per setting: mean ± standard error per method × n."""
    tables = []
    for setting in dict.fromkeys(r["setting"] for r in summary):
        table = Table(title=setting, title_justify="left")
        rows = [r for r in summary if r["setting"] == setting]
        width = max(len(r["method"]) for r in rows)
        table.add_column("method", no_wrap=True, min_width=width)
        for column in ("n", "reps"):
            table.add_column(column, justify="right")
        for metric in [*metrics, "fit_seconds"]:
            table.add_column(_SHORT.get(metric, metric), justify="right")
        for rec in sorted(rows, key=lambda r: (r["method"], r["n"])):
            table.add_row(
                rec["method"], str(rec["n"]), str(rec["count"]),
                *(_fmt(rec.get(f"{m}_mean"), rec.get(f"{m}_se"))
                  for m in [*metrics, "fit_seconds"]),
            )
        tables.append(table)
    return tables


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Argument(help="Experiment config (YAML). Default: the built-in quick LoCo run."),
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
) -> None:
    """Run (or resume) an experiment sweep; print its summary and write results and plots."""
    from pluralign.experiments import EXPERIMENTS, load_config, run_experiment
    from pluralign.experiments.runner import read_results
    from pluralign.experiments.summary import summarize

    path = config or default_config_path()
    out = out or Path("runs") / (path.stem + ("-quick" if quick else ""))
    try:
        raw = load_config(path)
        resolved = run_experiment(raw, out, quick=quick, jobs=jobs, progress=progress)
    except PluralignError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from None
    experiment = EXPERIMENTS[resolved["experiment"]]
    summary = summarize(read_results(out / "results.jsonl"), experiment.metrics)
    _print_report(out, resolved, summary, f"{experiment.name} ({path})")


def _print_report(out: Path, resolved: dict[str, Any], summary: list[dict[str, Any]],
                  title: str) -> None:
    from pluralign.experiments import EXPERIMENTS, read_results

    experiment = EXPERIMENTS[resolved["experiment"]]
    console.print(f"[bold]{title}[/bold]")
    for table in summary_tables(summary, list(experiment.table_metrics or experiment.metrics)):
        console.print(table)
    if resolved["experiment"] == "loco":
        from pluralign.experiments.loco_claims import check_loco_claims

        for claim in check_loco_claims(read_results(out / "results.jsonl"), resolved):
            mark = {True: "[green]held[/green]", False: "[red]did not hold[/red]",
                    None: "[yellow]not measured[/yellow]"}[claim["held"]]
            console.print(f"{claim['claim']}: {mark}\n    {claim['detail']}")
    if experiment.claims is not None:
        for claim in experiment.claims(read_results(out / "results.jsonl"), resolved):
            mark = {True: "[green]held[/green]", False: "[red]did not hold[/red]",
                    None: "[yellow]not measured[/yellow]"}[claim["held"]]
            console.print(f"{claim['claim']}: {mark}\n    {claim['detail']}")
    console.print(f"results: {out / 'results.jsonl'}   summary: {out / 'summary.csv'}   "
                  f"plot: {out / (experiment.plot_metric + '.png')}")


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="An output folder written by `pluralign run`.")],
    markdown: Annotated[
        str | None, typer.Option(help="Print a Markdown table of this metric instead.")
    ] = None,
) -> None:
    """Print the summary (and, for LoCo runs, claims C1–C4) of an existing run folder."""
    import yaml

    from pluralign.experiments import EXPERIMENTS, read_results
    from pluralign.experiments.summary import summarize

    config_path = out / "config.yaml"
    if not config_path.exists():
        console.print(f"[red]error:[/red] {out} has no config.yaml; is it a run folder?")
        raise typer.Exit(code=2)
    resolved = yaml.safe_load(config_path.read_text())
    experiment = EXPERIMENTS[resolved["experiment"]]
    summary = summarize(read_results(out / "results.jsonl"), experiment.metrics)
    if markdown is not None:
        from pluralign.experiments.summary import markdown_table

        if markdown not in (*experiment.metrics, "fit_seconds"):
            console.print(f"[red]error:[/red] unknown metric {markdown!r}; valid: "
                          f"{', '.join((*experiment.metrics, 'fit_seconds'))}")
            raise typer.Exit(code=2)
        print(markdown_table(summary, markdown, resolved["methods"]), end="")
        return
    _print_report(out, resolved, summary, f"{experiment.name} ({out})")


if __name__ == "__main__":  # pragma: no cover
    app()
