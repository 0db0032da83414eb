"""The personalization commands: ``data validate``, ``example-data``, ``fit`` and ``rank``
(thin commands over :mod:`pluralign.personalize`: they parse flags, print and exit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pluralign._packaged import packaged_configs_dir
from pluralign.cli.app import JsonFlag, fail, stdout_to_stderr
from pluralign.cli.output import console, err_console, fit_view, render
from pluralign.errors import PluralignError

__all__ = ["EXAMPLE_FILES", "data_validate", "example_data", "fit", "rank"]

# the Python fields of fit's estimators, as the flags that set them (errors name the flag)
FIT_FLAGS = {"rank": "--rank", "unknown_user": "--unknown-user"}
DEFAULT_RANK = 4
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
        raise fail(str(err)) from None
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
        raise fail(f"{folder} exists and is not a folder")
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
        raise fail(
            f"{', '.join(str(folder / n) for n in clash)}: already there, with other "
            "contents; give --force to overwrite them, or another folder"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            atomic_write_text(folder / name, text)
    except OSError as err:
        raise fail(f"cannot write to {folder}: {err}") from None
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
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            min=1,
            show_default=str(DEFAULT_RANK),
            help=("Rank of the shared basis (shared_basis) or of Θ's context part (contextual)."),
        ),
    ] = None,
    k: Annotated[
        int | None, typer.Option("--k", min=1, hidden=True, help="Deprecated name of --rank.")
    ] = None,
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
    from pluralign.personalize import check_model, fit_personalized

    try:
        check_model(model)
    except PluralignError as err:
        raise fail(str(err)) from None
    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} exists and is not a folder")
    if k is not None:  # the flag's old name, kept working
        if rank is not None:
            raise fail("--k is the old name of --rank; give only --rank")
        err_console.print(
            "note: --k is deprecated; use --rank", markup=False, highlight=False, soft_wrap=True
        )
        rank = k
    columns = _column_options(
        user_column, prompt_column, chosen_column, rejected_column, context_column
    )
    try:
        with stdout_to_stderr(as_json):
            result = fit_personalized(
                data,
                model,
                DEFAULT_RANK if rank is None else rank,
                format=format,
                survey=survey,
                encoder=encoder,
                mode=mode,
                ridge=ridge,
                test_size=test_size,
                seed=seed,
                unknown_user=unknown_user,
                cache_dir=cache_dir,
                columns=columns,
                parameter_names=FIT_FLAGS,
            )
        result.save(out)
    except PluralignError as err:
        raise fail(str(err)) from None
    render(fit_view(out, result.report, str(data)), as_json)


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
    from rich.markup import escape

    from pluralign._atomic import atomic_write_text
    from pluralign.personalize import known_users_text, rank_candidates

    if out is not None and out.is_dir():
        raise fail(f"--out {out} is a folder; give a file name")
    try:
        ranked = rank_candidates(
            model_dir,
            candidates,
            user,
            pessimism=pessimism,
            cache_dir=cache_dir,
            adapt=adapt,
            context=context,
        )
        lines = [json.dumps(record) for record in ranked.records]
    except PluralignError as err:
        raise fail(str(err)) from None
    uid = ranked.user
    output = "\n".join(lines) + "\n"
    if out is not None:
        atomic_write_text(out, output)
        console.print(f"ranked {len(lines)} prompt(s) for user {uid!r}; wrote {out}")
    else:
        typer.echo(output, nl=False)
    if ranked.from_context:  # a typo of a known user's id would be scored from the context
        err_console.print(
            f"note: user {escape(repr(uid))} is not in {escape(str(model_dir))}; "
            "ranked with the reward of their --context",
            highlight=False,
        )
    if not ranked.known:  # after the records, so stdout stays JSON lines; a typo must not pass
        err_console.print(
            f"[yellow]warning:[/yellow] user {escape(repr(uid))} is not in "
            f"{escape(str(model_dir))} (known users: "
            f"{escape(known_users_text(ranked.known_users))}); ranked with the shared reward θ0 "
            "(the model's --unknown-user shared). Give --adapt PAIRS.jsonl to fit "
            "this user",
            highlight=False,
        )
