"""``pluralign report``: print the summary of an existing output folder (of ``run``, ``fit``,
``train-rm``, ``train-policy`` or ``iterate``) as the command that wrote it printed it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pluralign.cli.app import JsonFlag, fail
from pluralign.cli.experiments import print_run_report
from pluralign.cli.output import fit_view, iterate_view, render, train_policy_view, train_rm_view
from pluralign.errors import PluralignError

__all__ = ["FOLDER_KINDS", "folder_kind", "report"]

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
        render(fit_view(out, document, str(data) if data is not None else str(out)), as_json)
    elif kind == "train-rm":
        document = _report_document(out / "per_user_accuracy.json", ("summary", "users"), kind)
        render(train_rm_view(out, document, (out / "merged").is_dir()), as_json)
    elif kind == "train-policy":
        document = _report_document(out / "per_user.json", ("summary", "users"), kind)
        render(train_policy_view(out, document), as_json)
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
        render(iterate_view(out, history, timings, None), as_json)


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
        raise fail("--markdown and --json are alternatives; give one")
    if not out.is_dir():
        raise fail(f"{out} is not a folder")
    kind = folder_kind(out)
    if kind is None:
        looked_for = "; ".join(f"{' + '.join(files)} ({name})" for name, files in FOLDER_KINDS)
        raise fail(
            f"{out} is not a pluralign output folder: it has none of the sets of files "
            f"report looks for: {looked_for}"
        )
    if kind != "run":
        if markdown is not None:
            raise fail(f"--markdown is for run folders; {out} is a {kind} folder")
        try:
            _report_other(out, kind, as_json)
        except PluralignError as err:
            raise fail(str(err)) from None
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
        raise fail(str(err)) from None
    summary = summarize(rows, experiment.metrics)
    if markdown is not None:
        from pluralign.experiments.summary import markdown_table

        if markdown not in (*experiment.metrics, "fit_seconds"):
            raise fail(
                f"unknown metric {markdown!r}; valid: "
                f"{', '.join((*experiment.metrics, 'fit_seconds'))}"
            )
        print(markdown_table(summary, markdown, resolved["methods"]), end="")
        return
    try:
        print_run_report(
            out, resolved, summary, f"{experiment.name} ({out})", rows=rows, as_json=as_json
        )
    except PluralignError as err:
        raise fail(str(err)) from None
