"""The ``pluralign`` command line (typer + rich)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table

from pluralign import __version__
from pluralign._packaged import (
    packaged_config_names,
    packaged_configs_dir,
    resolve_package_paths,
)
from pluralign.errors import PluralignError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="pluralign: personalized, robust policies from heterogeneous human feedback.",
)

# Output. Tables, paths and messages go through ``console`` (stdout), errors through
# ``err_console`` (stderr); with --json, stdout carries only the JSON document (the job runs
# with stdout redirected to stderr, so its progress bars and log lines land there). On a
# terminal the console is rich's usual one (as wide as the terminal). When stdout is not a
# TTY (piped into a file or another program) rich would assume 80 columns, cut table cells to
# "0.…" and break long paths over lines; there the console has no width limit instead:
# tables take the width of their widest cells and every line is printed whole.
PIPED_WIDTH = 1_000_000


def _isatty(file: IO[str]) -> bool:
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


class OutputConsole(Console):
    """A rich console whose width is the terminal's on a TTY and unlimited otherwise
    (decided at each print, so a redirected ``sys.stdout`` is seen)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if _isatty(self.file):
            return size
        return ConsoleDimensions(PIPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


console = OutputConsole()
err_console = OutputConsole(stderr=True)


def print_table(table: Table) -> None:
    """Print a table on stdout. Piped, its title (which rich would wrap to the table's width)
    is printed whole on a line of its own above it."""
    if table.title is not None and not _isatty(console.file):
        console.print(table.title, soft_wrap=True, highlight=False)
        table.title = None
    console.print(table)


JsonFlag = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON document of the results to stdout instead of tables "
        "(full precision; NaN as null); progress and log lines go to stderr.",
    ),
]


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With ``--json``: whatever the job prints (progress bars, log lines) goes to stderr,
    so that stdout carries the JSON document alone."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _plain(value: Any) -> Any:
    """``value`` as strict JSON: numpy scalars as Python numbers, non-finite floats as
    ``None``, paths as strings."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _print_json(document: dict[str, Any]) -> None:
    """One JSON document on stdout (not through rich: no wrapping, no markup)."""
    sys.stdout.write(json.dumps(_plain(document), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def default_config_path() -> Path:
    """The built-in quick LoCo-RLHF config that ``pluralign run`` uses without a CONFIG."""
    return packaged_configs_dir() / "quick.yaml"


def resolve_config_path(config: Path, announce: bool = True) -> Path:
    """The config file a command's CONFIG argument means: the path itself when it exists,
    else the packaged config it names (``loco``, ``loco.yaml`` or ``configs/loco.yaml``;
    with ``announce``, said on stderr). A ConfigError names the packaged configs otherwise."""
    from pluralign.errors import ConfigError

    if config.exists() or config.is_symlink():
        return config
    names = packaged_config_names()
    parts = config.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs"):
        stem = parts[-1].removesuffix(".yaml")
        if stem in names:
            path = packaged_configs_dir() / f"{stem}.yaml"
            if announce:
                err_console.print(
                    f"using packaged config {stem} ({path})",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
            return path
    raise ConfigError(
        f"{config}: config file not found, and not the name of a packaged config; "
        f"packaged configs: {', '.join(names)} (e.g. `pluralign run loco`)"
    )


def load_command_config(
    config: Path, overrides: list[str] | None = None, announce: bool = True
) -> tuple[Path, dict[str, Any]]:
    """``(file, raw config)`` of a command's CONFIG argument: the file
    (:func:`resolve_config_path`) read, ``--set`` overrides applied, ``package:`` paths
    resolved (:func:`resolve_package_paths`)."""
    from pluralign.experiments.config import load_config

    path = resolve_config_path(config, announce=announce)
    raw = load_config(path)
    if overrides:
        from pluralign.llm.job import apply_overrides

        raw = apply_overrides(raw, overrides)
    return path, resolve_package_paths(raw)


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


_SHORT = {
    "suboptimality": "subopt",
    "estimation_error": "est. error",
    "heldout_loglik": "held-out LL",
    "fit_seconds": "fit s",
    "duality_gap": "FW gap",
}


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
                rec["method"],
                str(rec["n"]),
                str(rec["count"]),
                *(
                    _fmt(rec.get(f"{m}_mean"), rec.get(f"{m}_se"))
                    for m in [*metrics, "fit_seconds"]
                ),
            )
        tables.append(table)
    return tables


@app.command()
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
) -> None:
    """Run (or resume) an experiment sweep; print its summary and write results and plots."""
    from pluralign.experiments import EXPERIMENTS, run_experiment
    from pluralign.experiments.runner import run_rows
    from pluralign.experiments.summary import summarize

    try:
        path, raw = load_command_config(
            config or default_config_path(), announce=config is not None
        )
        out = out or Path("runs") / (path.stem + ("-quick" if quick else ""))
        with _stdout_to_stderr(as_json):
            resolved = run_experiment(
                raw, out, quick=quick, jobs=jobs, progress=progress, force=force
            )
        rows = run_rows(out / "results.jsonl", resolved)
    except PluralignError as err:
        raise _fail(str(err)) from None
    experiment = EXPERIMENTS[resolved["experiment"]]
    summary = summarize(rows, experiment.metrics)
    try:
        _print_report(
            out, resolved, summary, f"{experiment.name} ({path})", rows=rows, as_json=as_json
        )
    except PluralignError as err:
        raise _fail(str(err)) from None


def _print_report(
    out: Path,
    resolved: dict[str, Any],
    summary: list[dict[str, Any]],
    title: str,
    rows: list[dict[str, Any]] | None = None,
    as_json: bool = False,
) -> None:
    """Tables and claims of a run (or, ``as_json``, one JSON document of them); ``rows`` are
    its results (default: read from ``out``)."""
    from rich.markup import escape

    from pluralign.experiments import EXPERIMENTS
    from pluralign.experiments.runner import complete_rows, run_rows

    experiment = EXPERIMENTS[resolved["experiment"]]
    if rows is None:
        rows = run_rows(out / "results.jsonl", resolved)
    claims = []
    finished = complete_rows(rows, resolved)  # claims compare whole units only
    if resolved["experiment"] == "loco":
        from pluralign.experiments.loco_claims import check_loco_claims

        claims += check_loco_claims(finished, resolved)
    if experiment.claims is not None:
        claims += experiment.claims(finished, resolved)
    files = {
        "results": out / "results.jsonl",
        "summary": out / "summary.csv",
        "plot": out / (experiment.plot_metric + ".png"),
    }
    if as_json:
        metrics = [*experiment.metrics, "fit_seconds"]
        _print_json(
            {
                "experiment": resolved["experiment"],
                "title": title,
                "out": out,
                "files": files,
                "metrics": metrics,
                "table_metrics": [*(experiment.table_metrics or experiment.metrics), "fit_seconds"],
                "summary": summary,
                "claims": claims,
            }
        )
        return
    console.print(f"[bold]{escape(title)}[/bold]")
    for table in summary_tables(summary, list(experiment.table_metrics or experiment.metrics)):
        print_table(table)
    for claim in claims:
        mark = {
            True: "[green]held[/green]",
            False: "[red]did not hold[/red]",
            None: "[yellow]not measured[/yellow]",
        }[claim["held"]]
        console.print(f"{escape(claim['claim'])}: {mark}\n    {escape(claim['detail'])}")
    console.print(
        escape(f"results: {files['results']}   summary: {files['summary']}   plot: {files['plot']}")
    )


# The output folders `report` reads, each known by files its command writes (checked in this
# order; a run folder, whose config.yaml the LLM commands write too, last):
FOLDER_KINDS = (
    ("fit", ("report.json", "model.json")),
    ("train-rm", ("per_user_accuracy.json",)),
    ("train-policy", ("per_user.json",)),
    ("iterate", ("history.json", "rounds.md")),
    ("run", ("config.yaml",)),
)


def folder_kind(out: Path) -> str | None:
    """Which command wrote the folder ``out`` (a key of :data:`FOLDER_KINDS`), or ``None``.
    Any config.yaml entry makes a run folder (so that a bad one gets the run's own error)."""
    for kind, files in FOLDER_KINDS:
        if kind == "run":
            path = out / "config.yaml"
            return kind if path.exists() or path.is_symlink() else None
        if all((out / name).is_file() for name in files):
            return kind
    return None


def _read_json_file(path: Path) -> Any:
    from pluralign._parse import parse_json, read_text

    try:
        return parse_json(read_text(path), path=str(path), finite=False)
    except PluralignError:
        raise
    except (OSError, ValueError) as err:
        raise PluralignError(f"{path}: {err}") from None


def _report_document(path: Path, keys: tuple[str, ...], kind: str) -> dict[str, Any]:
    document = _read_json_file(path)
    if not isinstance(document, dict) or any(k not in document for k in keys):
        raise PluralignError(
            f"{path}: not a {kind} report (a JSON object with the keys {', '.join(keys)})"
        )
    return document


def _report_other(out: Path, kind: str, as_json: bool) -> None:
    """``report`` of a fit, train-rm, train-policy or iterate folder: what that command
    printed at its end."""
    if kind == "fit":
        document = _report_document(out / "report.json", ("summary", "users"), kind)
        meta = _read_json_file(out / "model.json")
        data = meta.get("data") if isinstance(meta, dict) else None
        print_fit(out, document, str(data) if data is not None else str(out), as_json)
    elif kind == "train-rm":
        document = _report_document(out / "per_user_accuracy.json", ("summary", "users"), kind)
        print_train_rm(out, document, (out / "merged").is_dir(), as_json)
    elif kind == "train-policy":
        document = _report_document(out / "per_user.json", ("summary", "users"), kind)
        print_train_policy(out, document, as_json)
    else:
        history = _read_json_file(out / "history.json")
        if not isinstance(history, list) or not all(
            isinstance(r, dict) and isinstance(r.get("users"), dict) for r in history
        ):
            raise PluralignError(
                f"{out / 'history.json'}: not an iterate history (a JSON list "
                "of rounds, each with its users)"
            )
        timings_path = out / "timings.json"
        timings = _read_json_file(timings_path) if timings_path.is_file() else []
        print_iterate(out, history, timings, None, as_json)


@app.command()
def report(
    out: Annotated[
        Path,
        typer.Argument(
            help="An output folder of `pluralign run`, `fit`, `train-rm`, `train-policy` or "
            "`iterate`."
        ),
    ],
    markdown: Annotated[
        str | None,
        typer.Option(help="Print a Markdown table of this metric instead (run folders)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Print the summary of an existing output folder as the command that wrote it printed
    it: a run's tables (and, for LoCo runs, claims C1–C4), a fit's per-user accuracy, a
    train-rm or train-policy job's per-user table, an iterate run's rounds."""
    from pluralign.experiments import EXPERIMENTS, resolve_config
    from pluralign.experiments.config import TOP_LEVEL_KEYS
    from pluralign.experiments.runner import read_config_file, run_rows
    from pluralign.experiments.summary import summarize

    if markdown is not None and as_json:
        raise _fail("--markdown and --json are alternatives; give one")
    if not out.is_dir():
        raise _fail(f"{out} is not a folder")
    kind = folder_kind(out)
    if kind is None:
        looked_for = "; ".join(f"{' + '.join(files)} ({name})" for name, files in FOLDER_KINDS)
        raise _fail(
            f"{out} is not a pluralign output folder: it has none of the sets of files "
            f"report looks for: {looked_for}"
        )
    if kind != "run":
        if markdown is not None:
            raise _fail(f"--markdown is for run folders; {out} is a {kind} folder")
        try:
            _report_other(out, kind, as_json)
        except PluralignError as err:
            raise _fail(str(err)) from None
        return
    config_path = out / "config.yaml"
    try:
        raw = read_config_file(config_path)
        written = [k for k in TOP_LEVEL_KEYS if k not in ("quick", "sweep")]
        if not isinstance(raw, dict) or any(k not in raw for k in written):
            raise PluralignError(
                f"{config_path}: not a resolved pluralign config (a mapping "
                f"with the keys {', '.join(written)}, as `pluralign run` "
                "writes it)"
            )
        try:
            resolved = resolve_config(raw)
        except PluralignError as err:
            raise PluralignError(f"{config_path}: {err}") from None
        experiment = EXPERIMENTS[resolved["experiment"]]
        rows = run_rows(out / "results.jsonl", resolved)
    except PluralignError as err:
        raise _fail(str(err)) from None
    summary = summarize(rows, experiment.metrics)
    if markdown is not None:
        from pluralign.experiments.summary import markdown_table

        if markdown not in (*experiment.metrics, "fit_seconds"):
            raise _fail(
                f"unknown metric {markdown!r}; valid: "
                f"{', '.join((*experiment.metrics, 'fit_seconds'))}"
            )
        print(markdown_table(summary, markdown, resolved["methods"]), end="")
        return
    try:
        _print_report(
            out, resolved, summary, f"{experiment.name} ({out})", rows=rows, as_json=as_json
        )
    except PluralignError as err:
        raise _fail(str(err)) from None


# ----------------------------------------------------------------------------- personalization
data_app = typer.Typer(no_args_is_help=True, help="Preference data files: check them.")
app.add_typer(data_app, name="data")

MODELS = ("shared_basis", "per_user", "pooled", "contextual")
# the Python fields of fit's estimators, as the flags that set them (errors name the flag)
FIT_FLAGS = {"k": "--k", "unknown_user": "--unknown-user"}
FORMAT_HELP = "auto (from the file), numeric, trl, summarize or prism"
DATA_FILE_HELP = (
    "JSONL, a JSON array, CSV (each also .gz), Parquet or .npz; numeric, "
    "TRL-style, summarize_from_feedback or PRISM rows"
)
# column mapping: the data's name for a field (docs/multi_user.md "Data")
UserColumn = Annotated[
    str | None,
    typer.Option(
        "--user-column",
        help="The column holding the user id (default: user_id; user for numeric "
        "rows, worker for summarize_from_feedback).",
    ),
]
PromptColumn = Annotated[
    str | None,
    typer.Option(
        "--prompt-column",
        help="The column holding the prompt (default: prompt; a row without "
        "one takes TRL's implicit prompt from chosen/rejected).",
    ),
]
ChosenColumn = Annotated[
    str | None,
    typer.Option(
        "--chosen-column", help="The column holding the preferred response (default: chosen)."
    ),
]
RejectedColumn = Annotated[
    str | None,
    typer.Option(
        "--rejected-column", help="The column holding the other response (default: rejected)."
    ),
]
ContextColumn = Annotated[
    str | None,
    typer.Option(
        "--context-column",
        help="The column holding the user context (default: user_context; x for numeric rows).",
    ),
]


def _column_options(
    user: str | None,
    prompt: str | None,
    chosen: str | None,
    rejected: str | None,
    context: str | None,
) -> dict[str, str]:
    """The column flags that were given, as the readers' keywords (``user_column=...``)."""
    given = {
        "user_column": user,
        "prompt_column": prompt,
        "chosen_column": chosen,
        "rejected_column": rejected,
        "context_column": context,
    }
    return {k: v for k, v in given.items() if v is not None}


def _fail(message: str) -> typer.Exit:
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code=2)


def _llm_job(
    command: str,
    module: str,
    function: str,
    config: Path,
    overrides: list[str] | None,
    **kwargs: Any,
) -> tuple[dict[str, Any], Any]:
    """Run an LLM job (``module.function(raw_config, **kwargs)``) from a YAML config with
    ``--set`` overrides; ``(raw config, report)``. A missing llm extra or a pluralign error
    exits cleanly (code 2)."""
    import importlib

    try:
        path = resolve_config_path(config)
    except PluralignError as err:
        raise _fail(str(err)) from None
    try:
        job = getattr(importlib.import_module(module), function)
        from pluralign.llm.job import apply_overrides  # noqa: F401  (for --set)
    except ImportError as err:
        raise _fail(
            f"{command} needs the llm extra (pip install 'pluralign[llm]'): {err}"
        ) from None
    try:
        _, raw = load_command_config(path, overrides or [], announce=False)
        return raw, job(raw, **kwargs)
    except PluralignError as err:
        raise _fail(str(err)) from None


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help=f"A preference file ({DATA_FILE_HELP}).")],
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "auto",
    survey: Annotated[
        Path | None, typer.Option("--survey", help="PRISM survey file (for PRISM pairs).")
    ] = None,
    user_column: UserColumn = None,
    prompt_column: PromptColumn = None,
    chosen_column: ChosenColumn = None,
    rejected_column: RejectedColumn = None,
    context_column: ContextColumn = None,
) -> None:
    """Check every row of FILE; print each bad row as FILE, line N, field 'F': message
    (exit 1). A problem shared by more than 5 rows prints its first 3 and a count."""
    from pluralign.data.loaders import detect_format, validate_file
    from pluralign.data.sources import summarize_errors

    columns = _column_options(
        user_column, prompt_column, chosen_column, rejected_column, context_column
    )
    try:
        fmt = detect_format(file) if format == "auto" else format
        n, errors = validate_file(file, format=fmt, survey=survey, **columns)
    except PluralignError as err:
        raise _fail(str(err)) from None
    for line in summarize_errors(errors):
        typer.echo(line)
    if errors:
        typer.echo(f"{file}: {len(errors)} bad row(s) ({fmt} format)")
        raise typer.Exit(code=1)
    typer.echo(f"{file}: OK, {n} comparisons ({fmt} format)")


# `pluralign example-data DIR`: written name -> packaged file (under pluralign/configs/data/)
EXAMPLE_FILES = {
    "prefs.jsonl": "personas.jsonl",
    "candidates.jsonl": "candidates.jsonl",
    "prompts.jsonl": "toy_prompts.jsonl",
}


@app.command("example-data")
def example_data(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Where to write the files (created if missing; . for the working directory)."
        ),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite files that exist with other contents.")
    ] = False,
) -> None:
    """Write example files for fit, rank and generate to FOLDER.

    prefs.jsonl: 240 TRL-style comparisons by six users, with user_id and user_context (the
    persona set of docs/multi_user.md); candidates.jsonl: candidate responses for
    `pluralign rank`; prompts.jsonl: prompts of the toy policy's users vowels and digits, for
    `pluralign generate --prompts`."""
    from pluralign._atomic import atomic_write_text

    if folder.exists() and not folder.is_dir():
        raise _fail(f"{folder} exists and is not a folder")
    sources = {
        name: packaged_configs_dir() / "data" / source for name, source in EXAMPLE_FILES.items()
    }
    texts = {name: path.read_text(encoding="utf-8") for name, path in sources.items()}
    clash = [
        name
        for name, text in texts.items()
        if (folder / name).exists()
        and (
            not (folder / name).is_file()
            or (folder / name).read_text(encoding="utf-8", errors="replace") != text
        )
    ]
    if clash and not force:
        raise _fail(
            f"{', '.join(str(folder / n) for n in clash)}: already there, with other "
            "contents; give --force to overwrite them, or another folder"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            atomic_write_text(folder / name, text)
    except OSError as err:
        raise _fail(f"cannot write to {folder}: {err}") from None
    lines = {name: text.count("\n") for name, text in texts.items()}
    users = len({json.loads(line)["user_id"] for line in texts["prefs.jsonl"].splitlines()})
    console.print(
        f"wrote {folder / 'prefs.jsonl'} ({lines['prefs.jsonl']} comparisons, "
        f"{users} users), "
        f"{folder / 'candidates.jsonl'} ({lines['candidates.jsonl']} candidate sets), "
        f"{folder / 'prompts.jsonl'} ({lines['prompts.jsonl']} prompts); try\n"
        f"  pluralign fit {folder / 'prefs.jsonl'} --out model/\n"
        f"  pluralign rank model/ --user ana {folder / 'candidates.jsonl'}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _load_training_data(
    data: Path,
    fmt: str,
    survey: Path | None,
    encoder_model: str | None,
    mode: str,
    cache_dir: Path | None,
    seed: int,
    columns: dict[str, str] | None = None,
):
    """``(PreferenceData, feature metadata)`` from numeric or text preference files
    (``columns``: the readers' ``*_column`` keywords)."""
    from pluralign.data import load_preferences
    from pluralign.data.loaders import detect_format, read_text_preferences

    columns = columns or {}
    fmt = detect_format(data) if fmt == "auto" else fmt
    if fmt == "numeric":
        from pluralign.data.loaders import ContextSchema

        pdata = load_preferences(data, **columns)
        meta = {"kind": "numeric", "format": fmt}
        if pdata.x is not None:
            meta["context"] = ContextSchema.vector(pdata.d_x).to_dict()
        return pdata, meta
    prefs = read_text_preferences(data, format=fmt, survey=survey, **columns)
    from pluralign.features import TextEncoder

    encoder = TextEncoder(
        encoder_model, mode=mode, cache_dir=cache_dir if cache_dir is not None else None
    )
    pdata = prefs.to_preference_data(encoder, seed=seed)
    meta = {
        "kind": "text",
        "format": fmt,
        "encoder": encoder.config(),
        "template": prefs.template or encoder.template,
        "context_names": prefs.context_names,
    }
    if prefs.context_schema is not None:
        meta["context"] = prefs.context_schema.to_dict()
    return pdata, meta


def _split_per_user(data, test_size: float, seed: int):
    """Per user, a seeded ``test_size`` share of the comparisons (users with one comparison,
    and at least one comparison of every user, stay in training)."""
    from pluralign.data.split import per_user_test_mask

    test = per_user_test_mask(data.users, test_size, seed)
    return data.subset(~test), (data.subset(test) if test.any() else None)


def _designs(model, train) -> dict:
    """Per-user design matrices ``M_u`` of the user views (for ``rank --pessimism``)."""
    import numpy as np

    from pluralign.confidence import ConfidenceSet
    from pluralign.rewards import Pooled

    users = model.users_.tolist()
    groups = users[:1] if isinstance(model, Pooled) else users
    p = model.user_basis().shape[1]
    if len(groups) * p * p > 20_000_000:
        return {}
    mats, lams, ns = [], [], []
    for user in groups:
        view = model.user_model(user)
        rows = model.confidence_rows(user, train)
        cs = ConfidenceSet.fit(view, rows, beta=0.0)
        mats.append(cs.M)
        lams.append(cs.lam)
        ns.append(cs.n)
    index = (
        np.zeros(len(users), dtype=np.int64)
        if len(groups) == 1 and len(users) > 1
        else np.arange(len(users))
    )
    return {
        "design": np.array(mats),
        "design_index": index,
        "design_lam": np.array(lams),
        "design_n": np.array(ns),
    }


@app.command()
def fit(
    data: Annotated[Path, typer.Argument(help=f"Preference data: {DATA_FILE_HELP}.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the model and report.")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help=(
                "shared_basis (θ_u = θ0 + B w_u), per_user, pooled, or contextual (LoCo-RLHF's "
                "xᵀΘφ on the users' contexts: scores a new user from their context)."
            ),
        ),
    ] = ("shared_basis"),
    k: Annotated[
        int,
        typer.Option(
            "--k",
            min=1,
            help=("Rank of the shared basis (shared_basis) or of Θ's context part (contextual)."),
        ),
    ] = 4,
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "auto",
    survey: Annotated[Path | None, typer.Option("--survey", help="PRISM survey file.")] = None,
    encoder: Annotated[
        str | None,
        typer.Option(
            "--encoder", help="sentence-transformers model (default: MiniLM-L6, offline)."
        ),
    ] = None,
    mode: Annotated[str, typer.Option("--mode", help="φ(s,a): joint or response.")] = "joint",
    ridge: Annotated[
        float, typer.Option("--ridge", min=0.0, help="l2 = ridge / N (a prior on the summed loss).")
    ] = 1.0,
    test_size: Annotated[
        float, typer.Option("--test-size", min=0.0, max=0.9, help="Held-out share per user.")
    ] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and pair order.")] = 0,
    unknown_user: Annotated[
        str, typer.Option("--unknown-user", help="error, or shared (unknown users get θ0).")
    ] = "error",
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Embedding cache folder.")
    ] = None,
    user_column: UserColumn = None,
    prompt_column: PromptColumn = None,
    chosen_column: ChosenColumn = None,
    rejected_column: RejectedColumn = None,
    context_column: ContextColumn = None,
    as_json: JsonFlag = False,
) -> None:
    """Fit a personalized reward model; save it (npz + JSON, no pickle) with a per-user
    accuracy report (report.json, per_user_accuracy.csv, accuracy.png).

    --model contextual needs a user context on every row (user_context, or --context-column):
    the reward is xᵀΘφ with x the user's context, so `rank --context` scores a user the data
    never had."""
    import csv
    import io

    from pluralign._atomic import atomic_write_text
    from pluralign.errors import DataValidationError
    from pluralign.experiments.plots import per_user_accuracy_plot
    from pluralign.rewards import Contextual, PerUser, Pooled, SharedBasis
    from pluralign.rewards.persistence import save_model

    if model not in MODELS:
        raise _fail(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    if out.exists() and not out.is_dir():
        raise _fail(f"--out {out} exists and is not a folder")
    try:
        with _stdout_to_stderr(as_json):
            pdata, features = _load_training_data(
                data,
                format,
                survey,
                encoder,
                mode,
                cache_dir,
                seed,
                _column_options(
                    user_column, prompt_column, chosen_column, rejected_column, context_column
                ),
            )
        if pdata.users is None:
            raise PluralignError(f"{data}: personalized models need user ids (user / user_id)")
        if model == "contextual" and pdata.x is None:
            raise PluralignError(
                f"{data}: --model contextual needs user contexts, and the rows have none "
                "(user_context on every row, x for numeric rows; --context-column names "
                "another column)"
            )
        train, test = _split_per_user(pdata, test_size, seed) if test_size > 0 else (pdata, None)
        l2 = ridge / train.n
        try:
            estimator = {
                "shared_basis": lambda: SharedBasis(k, l2, unknown_user=unknown_user, seed=seed),
                "per_user": lambda: PerUser(l2, unknown_user=unknown_user),
                "pooled": lambda: Pooled(l2),
                "contextual": lambda: Contextual(k, l2, unknown_user=unknown_user, seed=seed),
            }[model]().fit(train)
        except DataValidationError as err:
            if err.path is None and err.field in FIT_FLAGS:  # a flag's value, not the data
                raise PluralignError(f"{FIT_FLAGS[err.field]}: {err.bare}") from None
            raise
        train_acc = estimator.per_user_accuracy(train)
        test_acc = estimator.per_user_accuracy(test) if test is not None else {}
        report = [
            {
                "user": u,
                "n_train": train_acc[u][1],
                "train_accuracy": train_acc[u][0],
                "n_test": test_acc.get(u, (None, 0))[1],
                "test_accuracy": test_acc.get(u, (None, 0))[0],
            }
            for u in train_acc
        ]
        summary = {
            "model": model,
            "k": k if model in ("shared_basis", "contextual") else None,
            "n_train": train.n,
            "n_test": 0 if test is None else test.n,
            "users": len(report),
            "d_phi": pdata.d_phi,
            "d_x": pdata.d_x if model == "contextual" else None,
            "train_accuracy": estimator.accuracy(train),
            "test_accuracy": None if test is None else estimator.accuracy(test),
            "train_loglik": estimator.log_likelihood(train),
            "test_loglik": None if test is None else estimator.log_likelihood(test),
            "converged": bool(estimator.converged_),
        }
        save_model(
            estimator,
            out,
            designs=_designs(estimator, train),
            metadata={
                "features": features,
                "ridge": ridge,
                "seed": seed,
                "test_size": test_size,
                "data": str(data),
            },
        )
    except PluralignError as err:
        raise _fail(str(err)) from None
    atomic_write_text(
        out / "report.json", json.dumps({"summary": summary, "users": report}, indent=2) + "\n"
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(report[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(report)
    atomic_write_text(out / "per_user_accuracy.csv", buffer.getvalue())
    per_user_accuracy_plot(
        report, out / "accuracy.png", f"{model} on {data.name}: per-user pairwise accuracy"
    )
    print_fit(out, {"summary": summary, "users": report}, str(data), as_json)


def print_fit(out: Path, document: dict[str, Any], data: str, as_json: bool = False) -> None:
    """The end of ``pluralign fit`` (and ``report`` of a fit folder): the per-user accuracy
    table and totals of ``document`` (report.json's ``summary`` and ``users``), or, with
    ``as_json``, one JSON document of them; ``data`` names the fitted file in the title."""
    from rich.markup import escape

    summary, report = document["summary"], document["users"]
    if as_json:
        _print_json(
            {
                "out": out,
                "files": {
                    "report": out / "report.json",
                    "per_user_accuracy": out / "per_user_accuracy.csv",
                    "plot": out / "accuracy.png",
                },
                "summary": summary,
                "users": report,
            }
        )
        return
    d_x = f", d_x={summary['d_x']}" if summary.get("d_x") else ""
    table = Table(
        title=escape(
            f"{summary['model']} on {data} ({summary['users']} users, "
            f"d_phi={summary['d_phi']}{d_x})"
        ),
        title_justify="left",
    )
    for column in ("user", "n train", "train acc", "n test", "test acc"):
        table.add_column(column, justify="left" if column == "user" else "right")
    for r in report[:50]:
        table.add_row(
            str(r["user"]),
            str(r["n_train"]),
            f"{r['train_accuracy']:.3f}",
            str(r["n_test"]),
            "—" if r["test_accuracy"] is None else f"{r['test_accuracy']:.3f}",
        )
    print_table(table)
    test_text = "—" if summary["test_accuracy"] is None else f"{summary['test_accuracy']:.3f}"
    console.print(
        escape(
            f"train accuracy {summary['train_accuracy']:.3f}, held-out "
            f"{test_text}; model and report in {out}"
        )
    )


def _user_id(user: str, users: list[Any]) -> Any:
    """The CLI's ``--user`` as the model's id type (ints stay ints)."""
    if users and all(isinstance(u, int) for u in users):
        try:
            return int(user)
        except ValueError:
            return user
    return user


def _read_candidates(path: Path, text: bool, d_phi: int) -> list[tuple[int, dict[str, Any]]]:
    import math

    from pluralign.data.io import iter_jsonl_objects
    from pluralign.data.loaders import render_text
    from pluralign.errors import DataValidationError

    if not path.is_file():
        raise DataValidationError("file not found", path=str(path))
    rows = []
    for row, where in iter_jsonl_objects(path):
        if text:  # strings, or TRL message lists rendered as the training rows were
            if "prompt" not in row:
                raise DataValidationError("missing", field="prompt", **where)
            prompt = (
                row["prompt"]
                if isinstance(row["prompt"], str)
                else render_text(row["prompt"], "prompt", **where)
            )
            responses = row.get("responses")
            if not isinstance(responses, list) or not responses:
                raise DataValidationError(
                    "must be a non-empty list of non-empty strings or message lists",
                    field="responses",
                    **where,
                )
            texts = [render_text(r, f"responses[{i}]", **where) for i, r in enumerate(responses)]
            row = {**row, "text_prompt": prompt, "text_responses": texts}
        else:
            phi = row.get("phi")
            ok = (
                isinstance(phi, list)
                and phi
                and all(
                    isinstance(v, list)
                    and len(v) == d_phi
                    and all(
                        isinstance(c, int | float) and not isinstance(c, bool) and math.isfinite(c)
                        for c in v
                    )
                    for v in phi
                )
            )
            if not ok:
                raise DataValidationError(
                    f"must be a non-empty list of length-{d_phi} lists of finite numbers",
                    field="phi",
                    **where,
                )
        rows.append((where["line"], row))
    if not rows:
        raise DataValidationError("no candidates", path=str(path))
    return rows


def _encode_candidates(
    encoder: Any, row: dict[str, Any], template: str, model_dir: Path, d_phi: int
):
    """``φ(prompt, response)`` of a candidate row with the encoder a model folder names; a model
    that cannot be loaded (a missing folder, an unreachable hub name) is a clear error."""
    try:
        phi = encoder.features(
            [row["text_prompt"]] * len(row["text_responses"]),
            row["text_responses"],
            template=template,
        )
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        if isinstance(exc, PluralignError):
            raise
        raise PluralignError(
            f"{model_dir}/model.json: field 'features.encoder': cannot load or "
            f"run the text encoder {encoder.model_path!r} "
            f"({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    if phi.shape[1] != d_phi:
        raise PluralignError(
            f"{model_dir}: the text encoder gives {phi.shape[1]} features but "
            f"the model was fitted on d_phi = {d_phi}"
        )
    return phi


def _known_users_text(users: list[Any]) -> str:
    known = ", ".join(map(repr, users[:10]))
    return known + ("" if len(users) <= 10 else f", … ({len(users)} users)")


def _read_adapt_pairs(path: Path, uid: Any, features: dict[str, Any], encoder: Any, d_phi: int):
    """``rank --adapt``: the preference pairs of ``path`` (numeric, or text encoded with the
    model's encoder and template) as ``PreferenceData``; every row must be of user ``uid``
    (numeric rows without user ids are taken as theirs), else an error naming the row."""
    from pluralign.data import load_preferences
    from pluralign.data.loaders import detect_format, read_text_preferences
    from pluralign.errors import DataValidationError

    if not path.is_file():
        raise DataValidationError("--adapt: file not found", path=str(path))
    fmt = detect_format(path)
    text = features.get("kind") == "text"
    if (fmt != "numeric") != text:
        raise DataValidationError(
            f"--adapt: {fmt} pairs, but the model was fitted on "
            + (
                "text; give text pairs (trl, summarize or prism) of the user"
                if text
                else "numeric features; give numeric pairs (phi0, phi1, y) of the user"
            ),
            path=str(path),
        )
    if text:
        prefs = read_text_preferences(path, format=fmt)
        users = prefs.users.tolist()
        lines = [line for _, line in prefs.where] if len(prefs.where) == len(users) else None
    else:
        data = load_preferences(path)
        users = None if data.users is None else data.users.tolist()
        lines = None
        if users is not None and path.suffix.lower() != ".npz":
            from pluralign.data.sources import Problems, iter_rows

            lines = [
                line
                for _, line, _ in iter_rows(
                    path, Problems("raise"), typed=("x", "phi0", "phi1", "y")
                )
            ]
            lines = lines if len(lines) == len(users) else None
    if users is not None:
        other = [i for i, u in enumerate(users) if str(u) != str(uid)]
        if other:
            i = other[0]
            raise DataValidationError(
                f"--adapt: a pair of user {users[i]!r}, not of --user {uid!r}"
                + (f" (and {len(other) - 1} more such row(s))" if len(other) > 1 else "")
                + "; --adapt takes the pairs of the user being ranked only",
                path=str(path),
                field="user_id" if text else "user",
                **({"line": lines[i]} if lines is not None else {"row": i}),
            )
    if text:
        import dataclasses

        # joined as the model's training rows were
        prefs = dataclasses.replace(prefs, template=features["template"])
        data = prefs.to_preference_data(encoder, orient="chosen_second")
    if data.d_phi != d_phi:
        raise DataValidationError(
            f"--adapt: pairs with {data.d_phi} features, but the model "
            f"was fitted on d_phi = {d_phi}",
            path=str(path),
        )
    return data


def _rank_context(
    model: Any,
    model_dir: Path,
    uid: Any,
    known: bool,
    context: str | None,
    features: dict[str, Any],
    adapting: bool,
    pessimism: float,
) -> bool:
    """``rank --context``: for a contextual model, register an unseen ``uid`` by the context
    (``True``: the user is scored from it); a known user's context must be the one the model
    has. Anything else with ``--context`` is an error, naming why."""
    import numpy as np

    from pluralign.data.loaders import ContextSchema
    from pluralign.rewards import Contextual

    contextual = isinstance(model, Contextual)
    if adapting and contextual:
        raise PluralignError(
            f"{model_dir}: a contextual model scores a new user from their "
            "context; give --context JSON instead of --adapt"
        )
    if context is None:
        return False
    if not contextual:
        raise PluralignError(
            f"--context applies to a contextual model (`pluralign fit --model "
            f"contextual`); {model_dir} holds a {type(model).__name__}"
        )
    try:
        value = json.loads(context)
    except json.JSONDecodeError as err:
        raise PluralignError(
            f"--context: not JSON ({err.msg} at character {err.pos}); give "
            "e.g. '{\"age\": \"25-34\"}' or '[0.1, 2.0]'"
        ) from None
    schema = (
        ContextSchema.from_dict(features["context"], field="features.context")
        if "context" in features
        else ContextSchema.vector(model.d_x_)
    )
    x = schema.encode(value, name="--context")
    if known:
        stored = model.contexts_[model.user_index(uid, allow_unknown=False)[0]]
        if not np.array_equal(stored, x):
            raise PluralignError(
                f"user {uid!r} is known to {model_dir} with another context; "
                "drop --context to rank them with theirs, or give a new "
                "user id"
            )
        return False
    if pessimism > 0:
        raise PluralignError(
            "--pessimism needs the design matrix of a fitted user; a user "
            "scored from --context has none (rank without --pessimism)"
        )
    model.add_users([uid], x[None, :])
    return True


@app.command()
def rank(
    model_dir: Annotated[Path, typer.Argument(help="A folder written by `pluralign fit`.")],
    candidates: Annotated[
        Path,
        typer.Argument(
            help='JSONL: {"prompt": ..., "responses": [...]} per line (text models; strings or '
            'TRL message lists) or {"phi": [[...], ...]} (numeric models).'
        ),
    ],
    user: Annotated[str, typer.Option("--user", help="The user to rank for.")],
    pessimism: Annotated[
        float,
        typer.Option(
            "--pessimism", min=0.0, help="β of the lower confidence bound (0: plain reward)."
        ),
    ] = 0.0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write JSONL here.")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Embedding cache folder.")
    ] = None,
    adapt: Annotated[
        Path | None,
        typer.Option(
            "--adapt",
            metavar="PAIRS.jsonl",
            help="A new user: fit them first (the model's adapt_user) from a few preference pairs "
            "of theirs in this file (a format `fit` reads; every row must be --user's).",
        ),
    ] = None,
    context: Annotated[
        str | None,
        typer.Option(
            "--context",
            metavar="JSON",
            help="A contextual model (fit --model contextual): the user's context as JSON, "
            'e.g. \'{"age": "25-34", "region": "Asia"}\' or \'[0.1, 2.0]\', in the form of '
            "the training rows' user_context; a user the model never saw is scored from "
            "it.",
        ),
    ] = None,
) -> None:
    """Personalized best-of-n: per prompt, the candidate with the highest reward for USER, or,
    with --pessimism β, the highest lower confidence bound
    θ̂_uᵀφ − β‖φ − φ̄‖_{M_u⁻¹} (φ̄ = mean candidate; the pointwise pessimistic policy).

    A user the model does not know is an error, unless --adapt PAIRS.jsonl fits them from a
    few of their pairs, --context JSON gives their context (contextual models: their reward
    is θ(x) = Θᵀ[1, z(x)], and each record says "from_context": true), or the model was
    fitted with --unknown-user shared: then they are ranked with the shared reward θ0, each
    record says "unknown_user": true and a warning naming them goes to stderr. Every record
    carries "unknown_user" (false for known, adapted and context-scored users)."""
    import numpy as np

    from pluralign._atomic import atomic_write_text
    from pluralign.confidence import ConfidenceSet
    from pluralign.data import TargetStates
    from pluralign.policies import Pessimistic
    from pluralign.rewards import Contextual
    from pluralign.rewards.persistence import load_model

    if out is not None and out.is_dir():
        raise _fail(f"--out {out} is a folder; give a file name")
    try:
        model, meta, designs = load_model(model_dir)
        uid = _user_id(user, meta["users"])
        features = meta.get("features", {"kind": "numeric"})
        text = features.get("kind") == "text"
        rows = _read_candidates(candidates, text, model.d_phi_)
        encoder = None
        if text:
            from pluralign.features import TextEncoder

            enc = features["encoder"]
            encoder = TextEncoder(
                enc["model"],
                mode=enc["mode"],
                template=enc["template"],
                normalize=enc["normalize"],
                cache_dir=cache_dir,
            )
        known = bool(model.user_index(uid, allow_unknown=True)[0] >= 0)
        from_context = _rank_context(
            model, model_dir, uid, known, context, features, adapt is not None, pessimism
        )
        known = known or from_context
        if adapt is not None:
            if not hasattr(model, "adapt_user"):
                raise PluralignError(
                    f"{model_dir}: a {type(model).__name__} model has one "
                    "reward for every user; --adapt does not apply"
                )
            if known:
                raise PluralignError(
                    f"user {uid!r} is already known to {model_dir}; --adapt "
                    "fits new users only (rank without it)"
                )
            if pessimism > 0:
                raise PluralignError(
                    "--pessimism needs the design matrix of a fitted user; "
                    "an adapted user has none (rank without --pessimism, or "
                    "refit with the user's pairs)"
                )
            pairs = _read_adapt_pairs(adapt, uid, features, encoder, model.d_phi_)
            model.adapt_user(pairs, user=uid)
            known = True
        elif not known and model.unknown_user != "shared":
            how = (
                f"Give --context JSON (the context of {uid!r}) to score them from it"
                if isinstance(model, Contextual)
                else f"Give --adapt PAIRS.jsonl (a few preference pairs of {uid!r}) to fit them "
                "first"
            )
            raise PluralignError(
                f"unknown user {uid!r}; known users: {_known_users_text(meta['users'])}. "
                f"{how}, or refit with `pluralign fit --unknown-user shared` to rank unknown "
                "users with the shared reward θ0"
            )
        elif not known and pessimism > 0:
            raise PluralignError(
                f"--pessimism needs the design matrix of a fitted user; "
                f"{uid!r} is unknown (rank without --pessimism, or give "
                "--adapt PAIRS.jsonl)"
            )
        theta = model.user_theta(uid)[0]
        policy = None
        if pessimism > 0:
            if not designs:
                raise PluralignError(
                    f"{model_dir} has no design matrices; refit, or rank without --pessimism"
                )
            view = model.user_model(uid)
            row = int(designs["design_index"][model.user_index(uid, allow_unknown=False)[0]])
            p = int(np.asarray(view.params_).size)
            if designs["design"].shape[1] != p:
                raise PluralignError(
                    f"{model_dir}/model.npz: field 'design': matrices are "
                    f"{designs['design'].shape[1]}×{designs['design'].shape[1]}"
                    f" but the user model has {p} parameters"
                )
            cs = ConfidenceSet(
                view.params_,
                designs["design"][row],
                pessimism,
                lam=float(designs["design_lam"][row]),
                n=int(designs["design_n"][row]),
                kind="design",
                bound_feature=float("nan"),
                bound_theta=float("nan"),
            )
            policy = Pessimistic(view, cs, pointwise=True)
        lines = []
        for line, row in rows:
            if text:
                phi = _encode_candidates(
                    encoder, row, meta["features"]["template"], model_dir, model.d_phi_
                )
            else:
                phi = np.asarray(row["phi"], dtype=np.float64)
            reward = phi @ theta
            record: dict[str, Any] = {"line": line, "user": uid, "unknown_user": not known}
            if isinstance(model, Contextual):
                record["from_context"] = from_context
            if policy is not None:
                best = int(np.argmax(policy.probs(TargetStates(None, phi[None]))[0]))
                z = policy.model.features(None, phi - phi.mean(axis=0))
                record["lcb"] = (reward - pessimism * policy.confidence.norm(z)).tolist()
            else:
                best = int(np.argmax(reward))
            record["best"] = best
            if text:
                record["response"] = row["responses"][best]
            record["reward"] = reward.tolist()
            lines.append(json.dumps(record))
    except PluralignError as err:
        raise _fail(str(err)) from None
    output = "\n".join(lines) + "\n"
    if out is not None:
        atomic_write_text(out, output)
        console.print(f"ranked {len(lines)} prompt(s) for user {uid!r}; wrote {out}")
    else:
        typer.echo(output, nl=False)
    if from_context:  # a typo of a known user's id would be scored from the context silently
        from rich.markup import escape

        err_console.print(
            f"note: user {escape(repr(uid))} is not in {escape(str(model_dir))}; "
            "ranked with the reward of their --context",
            highlight=False,
        )
    if not known:  # after the records, so stdout stays JSON lines; a typo must not pass silently
        from rich.markup import escape

        err_console.print(
            f"[yellow]warning:[/yellow] user {escape(repr(uid))} is not in "
            f"{escape(str(model_dir))} (known users: "
            f"{escape(_known_users_text(meta['users']))}); ranked with the shared reward θ0 "
            "(the model's --unknown-user shared). Give --adapt PAIRS.jsonl to fit "
            "this user",
            highlight=False,
        )


@app.command("train-rm")
def train_rm(
    config: Annotated[
        Path,
        typer.Argument(
            help="A train-rm config: a YAML file, or a packaged "
            "config's name (rm_personas); see docs/llm.md."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default: the config's out).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint in the output folder.")
    ] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config value, e.g. --set lora.share=A "
            "--set train.num_train_epochs=5 "
            "(repeatable; values are read as YAML).",
        ),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Also write merged per-user models to OUT/merged/<user>/, loadable "
            "with AutoModelForSequenceClassification.from_pretrained alone "
            "(needs pooling cls on BERT-like models, last on decoders).",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Train a personalized (multi-user LoRA) reward model on a transformer; write per-user
    accuracy (JSON + plot), per-user PEFT adapters and checkpoints. Runs under
    `accelerate launch` on several processes or GPUs."""
    with _stdout_to_stderr(as_json):
        raw, report = _llm_job(
            "train-rm",
            "pluralign.llm.job",
            "train_reward_model",
            config,
            set_,
            out=out,
            resume=resume,
            progress=progress,
        )
    from accelerate import PartialState

    if not PartialState().is_main_process:  # initialized by the job
        return
    where = out or Path(raw.get("out", "runs/reward_model"))
    if merge:
        from pluralign.llm.export import merge_adapters

        try:
            merge_adapters(where / "adapters", where / "merged")
        except PluralignError as err:
            raise _fail(str(err)) from None
    print_train_rm(where, report, merge, as_json)


def print_train_rm(
    where: Path, report: dict[str, Any], merged: bool = False, as_json: bool = False
) -> None:
    """The end of ``pluralign train-rm`` (and ``report`` of its folder): the per-user
    accuracy table of ``report`` (per_user_accuracy.json), or one JSON document of it;
    ``merged``: the folder has merged/ models."""
    from rich.markup import escape

    if as_json:
        _print_json(
            {
                "out": where,
                "files": {
                    "report": where / "per_user_accuracy.json",
                    "plot": where / "accuracy.png",
                    "adapters": where / "adapters",
                    **({"merged": where / "merged"} if merged else {}),
                },
                **report,
            }
        )
        return
    s = report["summary"]
    table = Table(title=escape(f"per-user accuracy ({s['model']}, share={s['share']}, r={s['r']})"))
    for column in ("user", "n_train", "train acc.", "n_test", "held-out acc."):
        table.add_column(column, justify="left" if column == "user" else "right")
    for row in report["users"][:40]:
        table.add_row(
            escape(str(row["user"])),
            str(row["n_train"]),
            _pct(row["train_accuracy"]),
            str(row["n_test"]),
            _pct(row["test_accuracy"]),
        )
    if len(report["users"]) > 40:
        table.add_row(f"... {len(report['users']) - 40} more", "", "", "", "")
    table.add_row(
        "all",
        str(s["n_train"]),
        _pct(s["train_accuracy"]),
        str(s["n_test"]),
        _pct(s["test_accuracy"]),
    )
    print_table(table)
    console.print(
        escape(
            f"{s['steps']} steps on {s['processes']} process(es)"
            + (f", resumed from {s['resumed_from']}" if s["resumed_from"] else "")
            + f"; wrote {where}/per_user_accuracy.json, accuracy.png, adapters/"
            + (", merged/" if merged else "")
        )
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


@app.command("train-policy")
def train_policy_command(
    config: Annotated[
        Path,
        typer.Argument(
            help="A train-policy config: a YAML file, or a "
            "packaged config's name (policy_toy, "
            "policy_personas); see docs/llm.md."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default: the config's out).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint in the output folder.")
    ] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config value, e.g. --set dpo.beta=0.2 "
            "--set train.num_train_epochs=5 "
            "(repeatable; values are read as YAML).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Train a personalized policy (a causal LM with multi-user LoRA) by DPO against its
    adapters-off reference; write per-user implicit-reward accuracy, margin and KL (JSON +
    plot), per-user PEFT adapters and checkpoints. Runs under `accelerate launch` too."""
    with _stdout_to_stderr(as_json):
        raw, report = _llm_job(
            "train-policy",
            "pluralign.llm.policy_job",
            "train_policy",
            config,
            set_,
            out=out,
            resume=resume,
            progress=progress,
        )
    from accelerate import PartialState

    if not PartialState().is_main_process:  # initialized by the job
        return
    where = out or Path(raw.get("out", "runs/policy"))
    print_train_policy(where, report, as_json)


def print_train_policy(where: Path, report: dict[str, Any], as_json: bool = False) -> None:
    """The end of ``pluralign train-policy`` (and ``report`` of its folder): the per-user
    DPO table of ``report`` (per_user.json), or one JSON document of it."""
    from rich.markup import escape

    if as_json:
        _print_json(
            {
                "out": where,
                "files": {
                    "report": where / "per_user.json",
                    "plot": where / "per_user.png",
                    "adapters": where / "adapters",
                },
                **report,
            }
        )
        return
    s = report["summary"]
    table = Table(
        title=escape(
            f"per-user DPO ({s['model']}, share={s['share']}, r={s['r']}, "
            f"beta={s['beta']:g}, {s['loss_type']})"
        )
    )
    for column in (
        "user",
        "n_train",
        "train acc.",
        "n_test",
        "held-out acc.",
        "held-out margin",
        "KL",
    ):
        table.add_column(column, justify="left" if column == "user" else "right")
    for row in report["users"][:40]:
        kl = row["test_kl"] if row["n_test"] else row["train_kl"]
        table.add_row(
            escape(str(row["user"])),
            str(row["n_train"]),
            _pct(row["train_accuracy"]),
            str(row["n_test"]),
            _pct(row["test_accuracy"]),
            _num(row["test_margin"]),
            _num(kl),
        )
    if len(report["users"]) > 40:
        table.add_row(f"... {len(report['users']) - 40} more", "", "", "", "", "", "")
    table.add_row(
        "all",
        str(s["n_train"]),
        _pct(s["train_accuracy"]),
        str(s["n_test"]),
        _pct(s["test_accuracy"]),
        _num(s["test_margin"]),
        _num(s["kl"]),
    )
    print_table(table)
    console.print(
        escape(
            f"{s['steps']} steps on {s['processes']} process(es)"
            + (f", resumed from {s['resumed_from']}" if s["resumed_from"] else "")
            + f"; wrote {where}/per_user.json, per_user.png, adapters/"
        )
    )


@app.command("iterate")
def iterate_command(
    config: Annotated[
        Path,
        typer.Argument(
            help="An iterate config: a YAML file, or a "
            "packaged config's name (iterate_toy, "
            "iterate_smollm2); see docs/iterate.md."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default: the config's out).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue after the last finished round in the output folder.")
    ] = True,
    progress: Annotated[
        bool, typer.Option(help="Show progress (a line per round and the DPO progress bar).")
    ] = True,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config value, e.g. --set iterate.pairs=enhancer "
            "--set iterate.seed=1 (repeatable; values are read as YAML).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Online iterative DPO of a personalized policy: each round samples from the current
    policy, annotates (reward model or a simulated gold Bradley-Terry oracle), chooses one
    pair per (prompt, user) and runs DPO against the fixed adapters-off reference; writes
    history.json, rounds.md, rounds.png, round-XX.jsonl and a resumable state."""
    log_console = err_console if as_json else console
    with _stdout_to_stderr(as_json):
        _, report = _llm_job(
            "iterate",
            "pluralign.llm.iterate",
            "run_iterate",
            config,
            set_,
            out=out,
            resume=resume,
            progress=progress,
            log=lambda msg: log_console.print(msg, soft_wrap=True, markup=False, highlight=False),
        )
    print_iterate(
        Path(report["out"]), report["history"], report["timings"], report["resumed_from"], as_json
    )


def print_iterate(
    where: Path,
    history: list[dict[str, Any]],
    timings: list[dict[str, Any]],
    resumed_from: int | None = None,
    as_json: bool = False,
) -> None:
    """The end of ``pluralign iterate`` (and ``report`` of its folder): the per-round,
    per-user table of ``history`` (history.json), or one JSON document of it."""
    from pluralign.llm.iterate import rounds_table

    if as_json:
        _print_json(
            {
                "out": where,
                "files": {
                    "history": where / "history.json",
                    "rounds": where / "rounds.md",
                    "plot": where / "rounds.png",
                },
                "resumed_from": resumed_from,
                "history": history,
                "timings": timings,
            }
        )
        return
    console.print(rounds_table(history), markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"wrote {where}/history.json, rounds.md, rounds.png, round-XX.jsonl, state/"
        + (f" (resumed after round {resumed_from})" if resumed_from is not None else ""),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _read_prompt_rows(path: Path, users: list[str]) -> list[tuple[str, str]]:
    """``(prompt, user)`` pairs of a JSONL file of ``{"prompt", "user_id"}`` rows (a row
    without ``user_id`` is taken for each ``--user``)."""
    from pluralign.data.io import iter_jsonl_objects
    from pluralign.errors import DataValidationError

    if not path.is_file():
        raise DataValidationError("file not found", path=str(path))
    pairs = []
    for row, where in iter_jsonl_objects(path):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise DataValidationError("missing or not a non-empty string", field="prompt", **where)
        user = row.get("user_id")
        if user is None:
            if not users:
                raise DataValidationError("missing (or give --user)", field="user_id", **where)
            pairs += [(prompt, u) for u in users]
        elif isinstance(user, bool) or not isinstance(user, str | int) or user == "":
            raise DataValidationError(
                f"must be a non-empty string or an integer, got {user!r}", field="user_id", **where
            )
        else:
            pairs.append((prompt, str(user)))
    if not pairs:
        raise DataValidationError("no prompts", path=str(path))
    return pairs


@app.command()
def generate(
    run: Annotated[
        Path, typer.Argument(help="A train-policy output folder (its config.yaml and checkpoints).")
    ],
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", help="A prompt (repeatable); each is answered for each --user."),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help='JSONL of {"prompt": ..., "user_id": ...} rows.'),
    ] = None,
    user: Annotated[
        list[str] | None, typer.Option("--user", help="The user to answer for (repeatable).")
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Responses per prompt and user.")] = 1,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    temperature: Annotated[float, typer.Option("--temperature")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="Off unless given.")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    best_of: Annotated[
        int | None,
        typer.Option(
            "--best-of",
            min=1,
            help="Sample N candidates per response and keep the one the "
            "--reward-model scores highest.",
        ),
    ] = None,
    reward_model: Annotated[
        Path | None,
        typer.Option("--reward-model", help="A train-rm output folder (for --best-of)."),
    ] = None,
    pessimism: Annotated[
        float | None,
        typer.Option(
            "--pessimism",
            min=0.0,
            help="β: pick by reward − β‖φ − ν‖ (the reward model's "
            "last-layer uncertainty; needs --reward-model).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write JSONL here.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Sample responses of a trained personalized policy for each user (optionally
    best-of-n under a personalized reward model, with pessimism); print a table and write
    JSONL with --out."""
    from rich.text import Text

    from pluralign._atomic import atomic_write_text

    if pessimism is not None and reward_model is None:
        raise _fail("--pessimism needs --reward-model (a train-rm output folder) and --best-of N")
    if (best_of is None) != (reward_model is None):
        raise _fail(
            "--best-of N and --reward-model RM_FOLDER go together: best-of-n keeps "
            "the candidate the reward model scores highest"
        )
    if best_of is not None and top_k is not None:
        raise _fail(
            "--top-k is not available with --best-of (candidates are sampled with "
            "--temperature and --top-p)"
        )
    if (prompt is None) == (prompts is None):
        raise _fail("give --prompt TEXT (repeatable, with --user) or --prompts FILE.jsonl")
    if out is not None and out.is_dir():
        raise _fail(f"--out {out} is a folder; give a file name")
    users = list(dict.fromkeys(user or []))
    try:
        from pluralign.llm.policy_job import load_policy, load_reward_model, reward_model_rows
    except ImportError as err:
        raise _fail(f"generate needs the llm extra (pip install 'pluralign[llm]'): {err}") from None
    try:
        with _stdout_to_stderr(as_json):
            if prompts is not None:
                pairs = _read_prompt_rows(prompts, users)
            else:
                if not users:
                    raise PluralignError("--prompt needs --user (repeatable)")
                pairs = [(p, u) for p in prompt for u in users]
            texts, who = [p for p, _ in pairs], [u for _, u in pairs]
            policy = load_policy(run, users=who)
            records: list[dict[str, Any]] = []
            if best_of is not None:
                from pluralign.llm.sampling import best_of_n

                rm = load_reward_model(reward_model, users=who)
                beta = pessimism or 0.0
                uncertainty = None
                if beta > 0:
                    from pluralign.llm.uncertainty import LastLayerUncertainty

                    uncertainty = LastLayerUncertainty(beta=1.0).fit(
                        rm, reward_model_rows(reward_model)
                    )
                rows = [(i, j) for i in range(len(pairs)) for j in range(n)]
                picked = best_of_n(
                    policy,
                    rm,
                    [texts[i] for i, _ in rows],
                    [who[i] for i, _ in rows],
                    n=best_of,
                    pessimism=beta,
                    uncertainty=uncertainty,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                )
                for k, (i, j) in enumerate(rows):
                    c = int(picked.chosen[k])
                    norm = 0.0 if picked.norms is None else float(picked.norms[k, c])
                    records.append(
                        {
                            "user_id": who[i],
                            "prompt": texts[i],
                            "sample": j,
                            "response": picked.responses[k],
                            "reward": float(picked.rewards[k, c]),
                            "penalty": beta * norm,
                            "best_of": best_of,
                        }
                    )
            else:
                samples = policy.generate(
                    texts,
                    who,
                    n=n,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    seed=seed,
                )
                for i, group in enumerate(samples.texts):
                    for j, text in enumerate(group):
                        records.append(
                            {"user_id": who[i], "prompt": texts[i], "sample": j, "response": text}
                        )
    except PluralignError as err:
        raise _fail(str(err)) from None
    if as_json:
        if out is not None:
            atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
        _print_json(
            {
                "run": run,
                "checkpoint": Path(policy.checkpoint_).name,
                "out": out,
                "responses": records,
            }
        )
        return
    from rich.markup import escape

    table = Table(
        title=escape(f"responses of {run} ({Path(policy.checkpoint_).name})"), title_justify="left"
    )
    columns = ["user", "prompt", "response"] + (["reward", "penalty"] if best_of else [])
    for column in columns:
        table.add_column(column, justify="right" if column in ("reward", "penalty") else "left")
    for r in records[:200]:
        cells = [Text(str(r["user_id"])), Text(r["prompt"]), Text(r["response"])]
        if best_of:
            cells += [f"{r['reward']:.4g}", f"{r['penalty']:.4g}"]
        table.add_row(*cells)
    if len(records) > 200:
        table.add_row(f"... {len(records) - 200} more", "", "", *([""] * (2 if best_of else 0)))
    print_table(table)
    if out is not None:
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
        console.print(f"wrote {len(records)} response(s) to {out}")


if __name__ == "__main__":  # pragma: no cover
    app()
