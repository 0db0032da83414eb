"""How the ``pluralign`` commands print: the consoles, and one renderer of every command's end.

Output. Tables, paths and messages go through ``console`` (stdout), errors through
``err_console`` (stderr); with --json, stdout carries only the JSON document (the job runs
with stdout redirected to stderr, so its progress bars and log lines land there). On a
terminal the console is rich's usual one (as wide as the terminal). When stdout is not a
TTY (piped into a file or another program) rich would assume 80 columns, cut table cells to
"0.…" and break long paths over lines; there the console has no width limit instead:
tables take the width of their widest cells and every line is printed whole.

A command's end is a :class:`View`: its blocks (tables built by :func:`make_table`, claim
verdicts and messages) and the JSON document of the same results; :func:`render` prints one
or the other. The views of ``run`` (:func:`run_view`), ``fit``, ``train-rm``, ``train-policy``
and ``iterate`` are built here, so that ``pluralign report`` of a folder prints exactly what
the command that wrote it printed.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console, ConsoleDimensions, JustifyMethod, RenderableType
from rich.markup import escape
from rich.table import Table

__all__ = [
    "PIPED_WIDTH",
    "Column",
    "Message",
    "OutputConsole",
    "View",
    "claim_message",
    "console",
    "err_console",
    "fit_view",
    "iterate_view",
    "make_table",
    "print_json",
    "print_table",
    "render",
    "run_view",
    "summary_tables",
    "train_policy_view",
    "train_rm_view",
]

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


# ----------------------------------------------------------------------------- primitives
def print_table(table: Table) -> None:
    """Print a table on stdout. Piped, its title (which rich would wrap to the table's width)
    is printed whole on a line of its own above it."""
    if table.title is not None and not _isatty(console.file):
        console.print(table.title, soft_wrap=True, highlight=False)
        table.title = None
    console.print(table)


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


def print_json(document: dict[str, Any]) -> None:
    """One JSON document on stdout (not through rich: no wrapping, no markup)."""
    sys.stdout.write(json.dumps(_plain(document), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Column:
    """A table column: its header, justification, and whether its cells may wrap."""

    header: str
    justify: JustifyMethod = "right"
    no_wrap: bool = False
    min_width: int | None = None


def make_table(
    columns: Sequence[Column],
    rows: Iterable[Sequence[RenderableType]],
    title: str | None = None,
    *,
    title_justify: JustifyMethod = "center",
) -> Table:
    """A rich table of ``rows`` under ``columns``; ``title`` and string cells are rich markup
    (escape literal text)."""
    table = Table(title=title, title_justify=title_justify)
    for column in columns:
        table.add_column(
            column.header,
            justify=column.justify,
            no_wrap=column.no_wrap,
            min_width=column.min_width,
        )
    for row in rows:
        table.add_row(*row)
    return table


def _user_columns(*headers: str) -> list[Column]:
    """A per-user table's columns: the first (the user) left, the numbers right."""
    return [Column(h, justify="left" if i == 0 else "right") for i, h in enumerate(headers)]


@dataclass(frozen=True)
class Message:
    """A line (or lines) for ``console.print``: rich markup unless ``markup`` is False;
    ``None`` leaves a setting at the console's default."""

    text: str
    markup: bool | None = None
    highlight: bool | None = None
    soft_wrap: bool | None = None


def _plain_message(text: str) -> Message:
    """``text`` printed as it is (no markup, no highlighting, every line whole)."""
    return Message(text, markup=False, highlight=False, soft_wrap=True)


@dataclass
class View:
    """A command's end: the JSON ``document`` of its results for ``--json``, and ``blocks``,
    which yields the tables and messages that show them on the terminal, in order (built as
    they are printed, and only then)."""

    document: dict[str, Any]
    blocks: Callable[[], Iterable[Table | Message]]


def render(view: View, as_json: bool = False) -> None:
    """Print ``view``: its JSON document (``as_json``), or its blocks."""
    if as_json:
        print_json(view.document)
        return
    for block in view.blocks():
        if isinstance(block, Table):
            print_table(block)
        else:
            console.print(
                block.text,
                markup=block.markup,
                highlight=block.highlight,
                soft_wrap=block.soft_wrap,
            )


def _fmt(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "—"
    if se is None or math.isnan(se):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {se:.2g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# ------------------------------------------------------------------------------------- run
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
        rows = [r for r in summary if r["setting"] == setting]
        width = max(len(r["method"]) for r in rows)
        columns = [
            Column("method", justify="left", no_wrap=True, min_width=width),
            Column("n"),
            Column("reps"),
            *(Column(_SHORT.get(m, m)) for m in [*metrics, "fit_seconds"]),
        ]
        cells = [
            [
                rec["method"],
                str(rec["n"]),
                str(rec["count"]),
                *(
                    _fmt(rec.get(f"{m}_mean"), rec.get(f"{m}_se"))
                    for m in [*metrics, "fit_seconds"]
                ),
            ]
            for rec in sorted(rows, key=lambda r: (r["method"], r["n"]))
        ]
        tables.append(make_table(columns, cells, setting, title_justify="left"))
    return tables


_VERDICTS = {
    True: "[green]held[/green]",
    False: "[red]did not hold[/red]",
    None: "[yellow]not measured[/yellow]",
}


def claim_message(claim: dict[str, Any]) -> Message:
    """A claim's verdict (``held``: True, False or None) and its detail."""
    mark = _VERDICTS[claim["held"]]
    return Message(f"{escape(claim['claim'])}: {mark}\n    {escape(claim['detail'])}")


def run_view(
    out: Path,
    experiment: Any,
    resolved: dict[str, Any],
    summary: list[dict[str, Any]],
    claims: list[dict[str, Any]],
    title: str,
) -> View:
    """The end of ``pluralign run`` (and ``report`` of a run folder): ``title``, a table per
    setting of ``summary`` (the ``experiment``'s table metrics), the ``claims``' verdicts and
    the files in ``out``."""
    files = {
        "results": out / "results.jsonl",
        "summary": out / "summary.csv",
        "plot": out / (experiment.plot_metric + ".png"),
    }
    table_metrics = list(experiment.table_metrics or experiment.metrics)

    def blocks() -> Iterator[Table | Message]:
        yield Message(f"[bold]{escape(title)}[/bold]")
        yield from summary_tables(summary, table_metrics)
        for claim in claims:
            yield claim_message(claim)
        yield Message(
            escape(
                f"results: {files['results']}   summary: {files['summary']}   plot: {files['plot']}"
            )
        )

    document = {
        "experiment": resolved["experiment"],
        "title": title,
        "out": out,
        "files": files,
        "metrics": [*experiment.metrics, "fit_seconds"],
        "table_metrics": [*table_metrics, "fit_seconds"],
        "summary": summary,
        "claims": claims,
    }
    return View(document, blocks)


# ------------------------------------------------------------------------------------- fit
def fit_view(out: Path, document: dict[str, Any], data: str) -> View:
    """The end of ``pluralign fit`` (and ``report`` of a fit folder): the per-user accuracy
    table and totals of ``document`` (report.json's ``summary`` and ``users``); ``data``
    names the fitted file in the title."""
    summary, report = document["summary"], document["users"]

    def blocks() -> Iterator[Table | Message]:
        d_x = f", d_x={summary['d_x']}" if summary.get("d_x") else ""
        yield make_table(
            _user_columns("user", "n train", "train acc", "n test", "test acc"),
            (
                [
                    str(r["user"]),
                    str(r["n_train"]),
                    f"{r['train_accuracy']:.3f}",
                    str(r["n_test"]),
                    "—" if r["test_accuracy"] is None else f"{r['test_accuracy']:.3f}",
                ]
                for r in report[:50]
            ),
            escape(
                f"{summary['model']} on {data} ({summary['users']} users, "
                f"d_phi={summary['d_phi']}{d_x})"
            ),
            title_justify="left",
        )
        test_text = "—" if summary["test_accuracy"] is None else f"{summary['test_accuracy']:.3f}"
        yield Message(
            escape(
                f"train accuracy {summary['train_accuracy']:.3f}, held-out "
                f"{test_text}; model and report in {out}"
            )
        )

    files = {
        "report": out / "report.json",
        "per_user_accuracy": out / "per_user_accuracy.csv",
        "plot": out / "accuracy.png",
    }
    return View({"out": out, "files": files, "summary": summary, "users": report}, blocks)


# --------------------------------------------------------------------------- LLM commands
def _trained_message(where: Path, s: dict[str, Any], files: str) -> Message:
    """The last line of train-rm and train-policy: steps, processes, resume, files written."""
    return Message(
        escape(
            f"{s['steps']} steps on {s['processes']} process(es)"
            + (f", resumed from {s['resumed_from']}" if s["resumed_from"] else "")
            + f"; wrote {where}/{files}"
        )
    )


def train_rm_view(where: Path, report: dict[str, Any], merged: bool = False) -> View:
    """The end of ``pluralign train-rm`` (and ``report`` of its folder): the per-user
    accuracy table of ``report`` (per_user_accuracy.json); ``merged``: the folder has
    merged/ models."""

    def blocks() -> Iterator[Table | Message]:
        s = report["summary"]
        rows = [
            [
                escape(str(row["user"])),
                str(row["n_train"]),
                _pct(row["train_accuracy"]),
                str(row["n_test"]),
                _pct(row["test_accuracy"]),
            ]
            for row in report["users"][:40]
        ]
        if len(report["users"]) > 40:
            rows.append([f"... {len(report['users']) - 40} more", "", "", "", ""])
        rows.append(
            [
                "all",
                str(s["n_train"]),
                _pct(s["train_accuracy"]),
                str(s["n_test"]),
                _pct(s["test_accuracy"]),
            ]
        )
        yield make_table(
            _user_columns("user", "n_train", "train acc.", "n_test", "held-out acc."),
            rows,
            escape(f"per-user accuracy ({s['model']}, share={s['share']}, r={s['r']})"),
        )
        written = "per_user_accuracy.json, accuracy.png, adapters/"
        yield _trained_message(where, s, written + (", merged/" if merged else ""))

    files = {
        "report": where / "per_user_accuracy.json",
        "plot": where / "accuracy.png",
        "adapters": where / "adapters",
        **({"merged": where / "merged"} if merged else {}),
    }
    return View({"out": where, "files": files, **report}, blocks)


def train_policy_view(where: Path, report: dict[str, Any]) -> View:
    """The end of ``pluralign train-policy`` (and ``report`` of its folder): the per-user
    DPO table of ``report`` (per_user.json)."""

    def blocks() -> Iterator[Table | Message]:
        s = report["summary"]
        rows = []
        for row in report["users"][:40]:
            kl = row["test_kl"] if row["n_test"] else row["train_kl"]
            rows.append(
                [
                    escape(str(row["user"])),
                    str(row["n_train"]),
                    _pct(row["train_accuracy"]),
                    str(row["n_test"]),
                    _pct(row["test_accuracy"]),
                    _num(row["test_margin"]),
                    _num(kl),
                ]
            )
        if len(report["users"]) > 40:
            rows.append([f"... {len(report['users']) - 40} more", "", "", "", "", "", ""])
        rows.append(
            [
                "all",
                str(s["n_train"]),
                _pct(s["train_accuracy"]),
                str(s["n_test"]),
                _pct(s["test_accuracy"]),
                _num(s["test_margin"]),
                _num(s["kl"]),
            ]
        )
        yield make_table(
            _user_columns(
                "user",
                "n_train",
                "train acc.",
                "n_test",
                "held-out acc.",
                "held-out margin",
                "KL",
            ),
            rows,
            escape(
                f"per-user DPO ({s['model']}, share={s['share']}, r={s['r']}, "
                f"beta={s['beta']:g}, {s['loss_type']})"
            ),
        )
        yield _trained_message(where, s, "per_user.json, per_user.png, adapters/")

    files = {
        "report": where / "per_user.json",
        "plot": where / "per_user.png",
        "adapters": where / "adapters",
    }
    return View({"out": where, "files": files, **report}, blocks)


def iterate_view(
    where: Path,
    history: list[dict[str, Any]],
    timings: list[dict[str, Any]],
    resumed_from: int | None = None,
) -> View:
    """The end of ``pluralign iterate`` (and ``report`` of its folder): the per-round,
    per-user table of ``history`` (history.json, as rounds.md has it)."""

    def blocks() -> Iterator[Table | Message]:
        from pluralign.llm.iterate import rounds_table

        yield _plain_message(rounds_table(history))
        yield _plain_message(
            f"wrote {where}/history.json, rounds.md, rounds.png, round-XX.jsonl, state/"
            + (f" (resumed after round {resumed_from})" if resumed_from is not None else "")
        )

    files = {
        "history": where / "history.json",
        "rounds": where / "rounds.md",
        "plot": where / "rounds.png",
    }
    document = {
        "out": where,
        "files": files,
        "resumed_from": resumed_from,
        "history": history,
        "timings": timings,
    }
    return View(document, blocks)
