"""Fuzz targets of the data boundary: the numeric (JSONL, ``.npz``) and text (TRL, Parquet,
summarize_from_feedback, PRISM) loaders, ``pluralign data validate``, the saved multi-user
model that ``pluralign rank`` reads, rank's candidate files, and YAML config files; and every
other kind of source the readers take (JSON arrays, gzip, CSV, Parquet tables of any Arrow
type, DataFrames, rows holding NumPy/pandas values, ``datasets`` objects), the ``*_column``
keywords and TRL's implicit prompt (the second half of this file)."""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzzing.core import (
    Target,
    _dump_json,
    mutated_bytes,
    mutated_json,
    mutated_jsonl,
    mutated_value,
    mutated_yaml,
    nasty_values,
    register,
)
from pluralign.errors import PluralignError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _fixture_rows(name: str, limit: int = 4) -> list[dict[str, Any]]:
    lines = (FIXTURES / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][:limit]


NUMERIC_ROWS = [
    {"x": [0.5, -1.0], "phi0": [1.0, 0.0, 2.0], "phi1": [0.0, 1.0, -1.0], "y": 1, "user": "a"},
    {"x": [0.5, -1.0], "phi0": [0.5, 0.5, 0.0], "phi1": [1.0, 1.0, 1.0], "y": 0, "user": "a"},
    {"x": [1.0, 2.0], "phi0": [0.0, 0.0, 1.0], "phi1": [2.0, -1.0, 0.0], "y": 1, "user": "b"},
]
TRL_ROWS = [
    {
        "prompt": "Hi?",
        "chosen": "Hello there.",
        "rejected": "Go away.",
        "user_id": "u1",
        "user_context": {"age": 30, "region": {"name": "north"}},
    },
    {
        "prompt": [{"role": "user", "content": "Tea?"}],
        "chosen": "Yes please.",
        "rejected": "No.",
        "user_id": "u2",
        "user_context": {"age": 41, "region": {"name": "s"}},
    },
    {
        "prompt": "Why?",
        "chosen": "Because.",
        "rejected": "Why not.",
        "user_id": "u1",
        "user_context": {"age": 30, "region": {"name": "north"}},
    },
]


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------- numeric data
def _load_numeric(value: bytes, tmp: Path) -> None:
    from pluralign.data import load_preferences

    load_preferences(_write(tmp, "prefs.jsonl", value))


register(Target("data.numeric_jsonl", mutated_jsonl(NUMERIC_ROWS), _load_numeric))


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


_GOOD_ARRAYS = {
    "x": np.ones((3, 2)),
    "phi0": np.eye(3),
    "phi1": np.zeros((3, 3)),
    "y": np.array([1, 0, 1]),
    "users": np.array(["a", "b", "a"]),
}
_WEIRD_ARRAYS = [
    np.zeros((3, 0)),
    np.zeros(3),
    np.zeros((2, 3)),
    np.array([1 + 2j] * 3),
    np.array(["2020-01-01"] * 3, dtype="datetime64[D]"),
    np.array([b"a"] * 3),
    np.array([np.nan, 1.0, 2.0]),
    np.full((3, 3), 1e308),
    np.full((3, 3), -1e308),
    np.array([True, False, True]),
    np.array([7, 7, 8]),
    np.array(["", "a", "b"]),
    np.zeros((3, 3), dtype=np.float16),
    np.array([0.5, 1.0, 0.0]),
    np.zeros((3, 3, 1)),
    np.array([[1, 2, 3]] * 3, dtype=np.uint8),
    np.zeros(3, dtype=[("a", "f8")]),
]


@st.composite
def _npz_files(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(mutated_bytes(_npz_bytes(_GOOD_ARRAYS)))
    arrays = dict(_GOOD_ARRAYS)
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from([*_GOOD_ARRAYS, "extra"]))
        if draw(st.integers(0, 4)) == 0:
            arrays.pop(key, None)
        else:
            arrays[key] = draw(st.sampled_from(_WEIRD_ARRAYS))
    return _npz_bytes(arrays)


def _load_npz(value: bytes, tmp: Path) -> None:
    from pluralign.data import load_preferences

    load_preferences(_write(tmp, "prefs.npz", value))


register(Target("data.npz", _npz_files(), _load_npz))


# -------------------------------------------------------------------------- text data
def _read_trl_file(value: bytes, tmp: Path) -> None:
    from pluralign.data import read_trl

    path = _write(tmp, "prefs.jsonl", value)
    read_trl(path)
    read_trl(path, errors="collect")


register(Target("data.trl_jsonl", mutated_jsonl(TRL_ROWS), _read_trl_file))


def _read_trl_rows(value: Any, tmp: Path) -> None:
    from pluralign.data import read_trl

    rows = value if isinstance(value, list) else [value]
    read_trl(rows, errors="collect")


register(Target("data.trl_rows", mutated_value(TRL_ROWS, max_edits=4), _read_trl_rows))


@functools.cache
def _parquet_seed() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    rows = [{k: v for k, v in r.items() if k != "user_context"} for r in TRL_ROWS]
    rows[1]["prompt"] = "Tea?"
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


@st.composite
def _parquet_files(draw: st.DrawFn) -> bytes:
    return draw(mutated_bytes(_parquet_seed()))


def _read_parquet(value: bytes, tmp: Path) -> None:
    from pluralign.data import read_trl

    read_trl(_write(tmp, "prefs.parquet", value))


register(Target("data.trl_parquet", _parquet_files(), _read_parquet))


def _read_summarize(value: bytes, tmp: Path) -> None:
    from pluralign.data import read_summarize_from_feedback

    path = _write(tmp, "cmp.jsonl", value)
    read_summarize_from_feedback(path, errors="collect")
    read_summarize_from_feedback(path, include_articles=True)


register(
    Target(
        "data.summarize",
        mutated_jsonl(_fixture_rows("summarize_from_feedback.jsonl")),
        _read_summarize,
    )
)


@st.composite
def _prism_files(draw: st.DrawFn) -> tuple[bytes, bytes]:
    survey = _fixture_rows("prism_survey.jsonl")
    pairs = _fixture_rows("prism_utterances.jsonl", limit=8)
    if draw(st.booleans()):
        return draw(mutated_jsonl(survey)), "\n".join(map(json.dumps, pairs)).encode()
    return "\n".join(map(json.dumps, survey)).encode(), draw(mutated_jsonl(pairs))


def _read_prism(value: tuple[bytes, bytes], tmp: Path) -> None:
    from pluralign.data import read_prism

    survey, pairs = _write(tmp, "survey.jsonl", value[0]), _write(tmp, "pairs.jsonl", value[1])
    read_prism(survey, pairs, errors="collect")
    read_prism(survey, pairs)


register(Target("data.prism", _prism_files(), _read_prism))


# ---------------------------------------------------------------------- data validate
def _cli(args: list[str]) -> int:
    from typer.testing import CliRunner

    from pluralign.cli import app

    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if "Traceback" in result.output:
        raise AssertionError(f"traceback in the output:\n{result.output}")
    return result.exit_code


@st.composite
def _any_data_file(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["numeric", "trl", "summarize", "npz", "dir"]))
    if kind == "numeric":
        return "prefs.jsonl", draw(mutated_jsonl(NUMERIC_ROWS))
    if kind == "trl":
        return "prefs.jsonl", draw(mutated_jsonl(TRL_ROWS))
    if kind == "summarize":
        return "prefs.jsonl", draw(mutated_jsonl(_fixture_rows("summarize_from_feedback.jsonl")))
    if kind == "npz":
        return "prefs.npz", draw(_npz_files())
    return "dir.jsonl", b""


def _validate_cli(value: tuple[str, bytes], tmp: Path) -> None:
    name, data = value
    path = tmp / name
    if name == "dir.jsonl":
        path.mkdir()
    else:
        path.write_bytes(data)
    code = _cli(["data", "validate", str(path)])
    if code not in (0, 1, 2):
        raise AssertionError(f"exit code {code}")
    if code:
        raise PluralignError(f"exit {code}")  # a clean refusal


register(Target("cli.data_validate", _any_data_file(), _validate_cli))


# ------------------------------------------------------------- saved models and rank
@functools.cache
def _model_folder() -> Path:
    """A small fitted SharedBasis with design matrices, saved once per process."""
    import tempfile

    from pluralign.data import PreferenceData
    from pluralign.personalize import design_matrices
    from pluralign.rewards import SharedBasis
    from pluralign.rewards.persistence import save_model

    rng = np.random.default_rng(0)
    n, d = 60, 3
    phi0, phi1 = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    users = np.array(["a", "b", "c"] * (n // 3))
    y = (rng.random(n) < 0.5).astype(int)
    data = PreferenceData(None, phi0, phi1, y, users)
    model = SharedBasis(1, 1e-2).fit(data)
    folder = Path(tempfile.mkdtemp(prefix="pluralign-fuzz-model-"))
    save_model(
        model,
        folder,
        designs=design_matrices(model, data),
        metadata={
            "features": {"kind": "numeric", "format": "numeric"},
            "ridge": 1.0,
            "seed": 0,
            "test_size": 0.2,
            "data": "x.jsonl",
        },
    )
    return folder


@st.composite
def _model_files(draw: st.DrawFn) -> tuple[str, bytes]:
    folder = _model_folder()
    if draw(st.integers(0, 2)):
        meta = json.loads((folder / "model.json").read_text())
        return "model.json", draw(mutated_json(meta))
    with np.load(folder / "model.npz") as f:
        arrays = {k: f[k] for k in f.files}
    if draw(st.booleans()):
        return "model.npz", draw(mutated_bytes((folder / "model.npz").read_bytes()))
    key = draw(st.sampled_from([*arrays, "extra"]))
    arrays[key] = draw(
        st.sampled_from(
            [
                *_WEIRD_ARRAYS,
                np.full(np.shape(arrays.get(key, 1.0)), np.nan),
                -np.ones(3, dtype=int),
                np.array([5, 0, 0]),
            ]
        )
    )
    return "model.npz", _npz_bytes(arrays)


def _copy_model(value: tuple[str, bytes], tmp: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(_model_folder(), folder)
    (folder / value[0]).write_bytes(value[1])
    return folder


def _load_model(value: tuple[str, bytes], tmp: Path) -> None:
    from pluralign.rewards.persistence import load_model

    model, _, _ = load_model(_copy_model(value, tmp))
    theta = model.user_theta(model.users_[0])
    if not np.isfinite(theta).all():
        raise AssertionError("a loaded model has non-finite parameters")


register(Target("model.load", _model_files(), _load_model))


def _rank_cli(value: tuple[str, bytes], tmp: Path) -> None:
    candidates = tmp / "candidates.jsonl"
    if value[0] == "candidates.jsonl":
        folder = _model_folder()
        candidates.write_bytes(value[1])
    else:
        folder = _copy_model(value, tmp)
        candidates.write_text(json.dumps({"phi": [[1, 0, 0], [0, 1, 0]]}) + "\n")
    code = _cli(["rank", str(folder), str(candidates), "--user", "a", "--pessimism", "1.0"])
    if code:
        raise PluralignError(f"exit {code}")


@st.composite
def _rank_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    if draw(st.booleans()):
        rows = [{"phi": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]]}, {"phi": [[0, 0, 1], [1, 1, 1]]}]
        return "candidates.jsonl", draw(mutated_jsonl(rows))
    return draw(_model_files())


register(Target("cli.rank", _rank_inputs(), _rank_cli))


# ------------------------------------------------------------------------ YAML configs
def _load_config(value: bytes, tmp: Path) -> None:
    from pluralign.configfile import load_config

    load_config(_write(tmp, "config.yaml", value))


_CONFIG_SEED = {
    "experiment": "loco",
    "seed": 0,
    "repeats": 2,
    "env": {"d_x": 4, "d_phi": 4, "rank": 2},
    "n_samples": [100, 200],
    "methods": ["greedy", "prs"],
    "options": {"l2": 1e-4},
    "quick": {"repeats": 1},
}
register(Target("config.yaml_file", mutated_yaml(_CONFIG_SEED), _load_config))


# ====================================================================== every kind of source
# The sources of pluralign.data.sources beyond plain JSONL: JSON arrays, gzip, CSV, Parquet
# tables of every Arrow type, pandas DataFrames, in-memory rows holding NumPy/pandas values,
# datasets objects; the ``*_column`` keywords and TRL's implicit prompt. Each case reads its
# input in collect and raise mode (which must agree), then with validate_file and format
# detection (see _read).
TRL_FLAT_ROWS = [  # one type per column, as an Arrow table or a datasets.Dataset needs
    {
        "prompt": "Hi?",
        "chosen": "Hello there.",
        "rejected": "Go away.",
        "user_id": "u1",
        "user_context": {"age": 30, "region": {"name": "north"}},
    },
    {
        "prompt": "Tea?",
        "chosen": "Yes please.",
        "rejected": "No.",
        "user_id": "u2",
        "user_context": {"age": 41, "region": {"name": "s"}},
    },
    {
        "prompt": "Why?",
        "chosen": "Because.",
        "rejected": "Why not.",
        "user_id": "u1",
        "user_context": {"age": 30, "region": {"name": "north"}},
    },
]
CHAT_ROWS = [  # TRL's conversational form
    {
        "prompt": [{"role": "user", "content": "Tea?"}],
        "chosen": [{"role": "assistant", "content": "Yes please."}],
        "rejected": [{"role": "assistant", "content": "No."}],
        "user_id": "u1",
    },
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
        "user_id": "u2",
    },
]
IMPLICIT_ROWS = [  # TRL's implicit prompt: no prompt, chosen and rejected share a beginning
    {
        "chosen": "The capital of France is Paris.",
        "rejected": "The capital of France is Lyon.",
        "user_id": "u1",
    },
    {
        "chosen": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "No."}],
        "user_id": "u2",
    },
    {"chosen": "Q: why? A: because.", "rejected": "Q: why? A: why not.", "user_id": "u1"},
]
PRISM_PAIRS = [  # TRL-style PRISM pairs of the users of fixtures/prism_survey.jsonl
    {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "user_id": "user1"},
    {"prompt": "Tea?", "chosen": "Yes please.", "rejected": "No.", "user_id": "user2"},
]
_SEEDS: dict[str, list[dict[str, Any]]] = {"trl": TRL_ROWS, "numeric": NUMERIC_ROWS}


def _has(module: str) -> bool:
    """Whether ``module`` can be imported (pandas and datasets come with the dev extra's trl;
    their targets are left out where they are missing)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _agree(read: Callable[..., Any], source: Any, **kw: Any) -> Any:
    """``read(source, errors="collect")`` then ``read(source)``: raise mode must refuse exactly
    when collect mode refuses the source or reports a bad row, and otherwise read as many
    comparisons. Returns raise mode's result."""
    try:
        got, found = read(source, errors="collect", **kw)
    except PluralignError:
        read(source, **kw)  # must refuse too
        raise AssertionError(
            "errors='collect' refused the source but errors='raise' read it"
        ) from None
    try:
        data = read(source, **kw)
    except PluralignError:
        if not found:
            raise AssertionError(
                "errors='collect' found no bad row but errors='raise' refused the source"
            ) from None
        raise
    if found:
        raise AssertionError(
            f"errors='collect' found {len(found)} bad row(s) "
            f"({found[0]}) but errors='raise' read the source"
        )
    if got is None or len(got) != len(data):
        raise AssertionError("errors='collect' and errors='raise' read different rows")
    return data


def _read(fmt: str, source: Any, **kw: Any) -> Any:
    """Read ``source`` as ``fmt`` (``trl``, ``numeric`` or ``summarize``) in both modes
    (:func:`_agree`), then with ``validate_file`` (format detected) and, for text,
    ``read_text_preferences``. Every call runs; the first clean refusal is raised at the end.
    Returns the raise-mode result (``None`` if refused)."""
    from pluralign.data import load_preferences, read_summarize_from_feedback, read_trl
    from pluralign.data.loaders import read_text_preferences, validate_file

    refused: list[PluralignError] = []

    def attempt(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except PluralignError as err:
            refused.append(err)
            return None

    reader = {
        "numeric": load_preferences,
        "trl": read_trl,
        "summarize": read_summarize_from_feedback,
    }[fmt]
    result = attempt(lambda: _agree(reader, source, **kw))
    if fmt == "summarize":  # the split filter compares each row's split
        attempt(lambda: _agree(functools.partial(reader, splits=["train", "valid1"]), source, **kw))
    attempt(lambda: validate_file(source, **kw))
    if fmt != "numeric":
        attempt(lambda: read_text_preferences(source, **kw))
    if refused:
        raise refused[0]
    return result


def _jsonl(rows: list[Any]) -> bytes:
    return b"".join(_dump_json(r).encode() + b"\n" for r in rows)


# ------------------------------------------------------------------------- JSON arrays
_ARRAY_DAMAGE = [
    "trailing_comma",
    "no_close",
    "after",
    "missing_comma",
    "nested",
    "empty",
    "non_objects",
    "bom",
    "leading_space",
    "lines",
    "object",
    "pretty_object",
    "comment",
    "close_only",
    "double_close",
]


@st.composite
def _json_array_files(draw: st.DrawFn, rows: list[dict[str, Any]]) -> bytes:
    """A ``.json`` file holding one array of ``rows``: elements mutated (as
    :func:`mutated_json`, so also non-objects and broken elements), the array's syntax broken
    (trailing comma, no ``]``, text after it, a missing comma, nesting), other layouts (one
    line, one element a line, pretty-printed), JSON lines or an object instead of an array, or
    byte damage."""
    items = [json.dumps(r).encode() for r in rows]
    kind = draw(
        st.sampled_from(["valid", "elements", "elements", "array", "array", "value", "bytes"])
    )
    if kind == "elements":
        for _ in range(draw(st.integers(1, 2))):
            i = draw(st.integers(0, len(items) - 1))
            items[i] = draw(mutated_json(rows[i]))
    elif kind == "value":
        value = draw(mutated_value(rows))
        items = [_dump_json(v).encode() for v in (value if isinstance(value, list) else [value])]
    layout = draw(
        st.sampled_from(
            [
                (b"[", b", ", b"]"),
                (b"[\n", b",\n", b"\n]\n"),
                (b"[\n  ", b",\n  ", b"\n]"),
                (b"[", b",", b"]"),
            ]
        )
    )
    text = layout[0] + layout[1].join(items) + layout[2]
    if kind == "array":
        damage = draw(st.sampled_from(_ARRAY_DAMAGE))
        body = layout[1].join(items)
        text = {
            "trailing_comma": layout[0] + body + b"," + layout[2],
            "no_close": layout[0] + body,
            "after": text + draw(st.sampled_from([b' {"a": 1}', b"]", b"x", b"\n[]", b"\x00"])),
            "missing_comma": layout[0] + body.replace(layout[1], b"\n", 1) + layout[2],
            "nested": b"[" + text + b"]",
            "empty": draw(st.sampled_from([b"[]", b"[ ]", b"[\n]\n", b"  [\t]  "])),
            "non_objects": b"["
            + b", ".join(
                _dump_json(draw(nasty_values())).encode() for _ in range(draw(st.integers(1, 3)))
            )
            + b"]",
            "bom": b"\xef\xbb\xbf" + text,
            "leading_space": draw(st.sampled_from([b"\n\n", b" \t", b"\x0c", b"\r\n"])) + text,
            "lines": b"\n".join(items) + b"\n",
            "object": items[0],
            "pretty_object": json.dumps(rows[0], indent=2).encode(),
            "comment": b"// rows\n" + text,
            "close_only": b"]",
            "double_close": text + b"]",
        }[damage]
    if kind == "bytes":
        text = draw(mutated_bytes(text))
    return text


@st.composite
def _json_array_cases(draw: st.DrawFn) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(["trl", "trl", "numeric"]))
    return fmt, draw(_json_array_files(_SEEDS[fmt]))


def _read_json_array(value: tuple[str, bytes], tmp: Path) -> None:
    fmt, data = value
    _read(fmt, _write(tmp, "prefs.json", data))


register(Target("data.json_array", _json_array_cases(), _read_json_array))


# --------------------------------------------------------------------------------- CSV
# cells that break readers: JSON look-alikes of the typed columns, missing-value spellings,
# quotes, line breaks, NUL, huge and deep values
_CSV_CELLS = [
    "",
    " ",
    "null",
    "NA",
    "None",
    "nan",
    "NaN",
    "[]",
    "{}",
    "[1e999]",
    "[NaN]",
    '{"a": 1, "a": 2}',
    "[" * 100 + "]" * 100,
    "[" * 70,
    "7",
    "-1",
    "1.0",
    "true",
    '"',
    '""',
    "\x00",
    "a\nb",
    "a\r\nb",
    "é",
    "\ufeff",
    '"\\ud800"',
    "9" * 400,
    "[1, 2",
    '{"age": 30}',
    "[0.1, 2.0]",
    "[0.5, -1.0]",
    "[1, 0, 2]",
    "a" * 5000,
    '{"age": 30, "region": {"name": "north"}}',
    "u1",
    "0",
    "1",
    "[[1.0]]",
]


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else _dump_json(value)


def _csv_records(rows: list[Any]) -> list[list[str]]:
    """``rows`` as CSV records, the header first (the union of the rows' keys); structured
    values are JSON text cells, a row that is not an object one cell."""
    header = list(dict.fromkeys(str(k) for r in rows if isinstance(r, dict) for k in r))
    out = [header or ["value"]]
    for r in rows:
        out.append([_csv_cell(r.get(k)) for k in header] if isinstance(r, dict) else [_csv_cell(r)])
    return out


def _csv_join(records: list[list[str]], delimiter: str = ",", end: str = "\r\n") -> str:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator=end).writerows(records)
    return buffer.getvalue()


@st.composite
def _csv_files(draw: st.DrawFn, rows: list[dict[str, Any]]) -> bytes:
    """A CSV file of ``rows``: cells replaced (:data:`_CSV_CELLS`), rows mutated as values,
    ragged records (too few or too many cells), stray or unterminated quotes, a bad header
    (a repeated, blank or padded name; none; only the header), other layouts (BOM, LF or CR
    line ends, blank records, another delimiter, no final newline), or byte damage."""
    kind = draw(
        st.sampled_from(
            ["cells", "cells", "values", "ragged", "quotes", "header", "layout", "bytes"]
        )
    )
    records = _csv_records(rows)
    if kind == "values":
        value = draw(mutated_value(rows))
        records = _csv_records(value if isinstance(value, list) else [value])
    elif kind == "cells":
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(1, len(records) - 1))
            j = draw(st.integers(0, len(records[i]) - 1))
            records[i][j] = draw(st.sampled_from(_CSV_CELLS))
    elif kind == "ragged":
        i = draw(st.integers(1, len(records) - 1))
        if draw(st.booleans()):
            records[i] = records[i][: draw(st.integers(0, len(records[i]) - 1))]
        else:
            records[i] = records[i] + draw(
                st.lists(st.sampled_from(_CSV_CELLS), min_size=1, max_size=3)
            )
    elif kind == "header":
        header = records[0]
        j = draw(st.integers(0, len(header) - 1))
        action = draw(st.sampled_from(["dup", "blank", "drop", "only", "pad", "upper"]))
        if action == "dup" and len(header) > 1:
            header[(j + 1) % len(header)] = header[j]
        elif action == "blank":
            header[j] = draw(st.sampled_from(["", " "]))
        elif action == "drop":
            records = records[1:] or [[]]
        elif action == "only":
            records = records[:1]
        elif action == "pad":
            header[j] = f" {header[j]}\t"
        else:
            header[j] = header[j].upper()
    end = "\r\n"
    delimiter = ","
    layout = (
        draw(
            st.sampled_from(
                [
                    "bom",
                    "lf",
                    "cr",
                    "blank",
                    "blank_cells",
                    "semicolon",
                    "tab",
                    "no_newline",
                    "multiline",
                ]
            )
        )
        if kind == "layout"
        else None
    )
    if layout in ("lf", "cr"):
        end = "\n" if layout == "lf" else "\r"
    elif layout in ("semicolon", "tab"):
        delimiter = ";" if layout == "semicolon" else "\t"
    elif layout == "blank":
        records.insert(draw(st.integers(1, len(records))), [])
    elif layout == "blank_cells":
        records.insert(draw(st.integers(1, len(records))), [" "] * len(records[0]))
    elif layout == "multiline" and len(records) > 1:
        records[1][0] = records[1][0] + "\nsecond line\n"
    text = _csv_join(records, delimiter, end)
    if layout == "bom":
        text = "\ufeff" + text
    elif layout == "no_newline":
        text = text.rstrip("\r\n")
    if kind == "quotes":
        pos = draw(st.integers(0, len(text)))
        text = (
            text[:pos]
            + draw(st.sampled_from(['"', '"unterminated', 'a"b', '""', '"\n', '",", "']))
            + text[pos:]
        )
    data = text.encode()
    if kind == "bytes":
        data = draw(mutated_bytes(data))
    return data


@st.composite
def _csv_cases(draw: st.DrawFn) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(["trl", "trl", "numeric"]))
    return fmt, draw(_csv_files(_SEEDS[fmt]))


def _read_csv(value: tuple[str, bytes], tmp: Path) -> None:
    fmt, data = value
    _read(fmt, _write(tmp, "prefs.csv", data))


register(Target("data.csv", _csv_cases(), _read_csv))


# -------------------------------------------------------------------------------- gzip
_GZIP_DAMAGE = [
    "none",
    "none",
    "truncate",
    "truncate",
    "flip",
    "garbage",
    "zeros",
    "concat",
    "empty",
    "plain",
    "double",
    "header_only",
]


@st.composite
def _gzip_cases(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """``(format, file name, bytes)``: JSONL, a JSON array or CSV (valid or mutated), gzipped,
    then the gzip stream damaged: truncated (also inside the header and the trailer), a
    flipped byte (a CRC or deflate error), trailing garbage or zero padding, a second member,
    empty, not compressed at all, compressed twice."""
    fmt = draw(st.sampled_from(["trl", "trl", "numeric"]))
    rows = _SEEDS[fmt]
    inner = draw(st.sampled_from(["jsonl", "jsonl", "ndjson", "json", "csv"]))
    mutate = draw(st.booleans())
    if inner == "json":
        text = draw(_json_array_files(rows)) if mutate else json.dumps(rows).encode()
    elif inner == "csv":
        text = draw(_csv_files(rows)) if mutate else _csv_join(_csv_records(rows)).encode()
    else:
        text = draw(mutated_jsonl(rows)) if mutate else _jsonl(rows)
    data = gzip.compress(text, compresslevel=draw(st.sampled_from([1, 6, 9])), mtime=0)
    damage = draw(st.sampled_from(_GZIP_DAMAGE))
    if damage == "truncate":
        cut = draw(
            st.one_of(
                st.sampled_from(
                    [1, 2, 9, 10, len(data) // 2, len(data) - 8, len(data) - 4, len(data) - 1]
                ),
                st.integers(0, len(data) - 1),
            )
        )
        data = data[:cut]
    elif damage == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    elif damage == "garbage":
        data += draw(st.binary(min_size=1, max_size=16))
    elif damage == "zeros":
        data += b"\x00" * draw(st.integers(1, 600))
    elif damage == "concat":
        data += gzip.compress(draw(mutated_jsonl(rows)) if draw(st.booleans()) else text)
    elif damage == "empty":
        data = b""
    elif damage == "plain":
        data = text
    elif damage == "double":
        data = gzip.compress(data)
    elif damage == "header_only":
        data = data[:10]
    suffix = draw(st.sampled_from([".gz", ".gz", ".GZ"]))
    return fmt, f"prefs.{inner}{suffix}", data


def _read_gzip(value: tuple[str, str, bytes], tmp: Path) -> None:
    fmt, name, data = value
    _read(fmt, _write(tmp, name, data))


register(Target("data.gzip", _gzip_cases(), _read_gzip))


# --------------------------------------------------------------------- Parquet tables
_ARROW_KINDS = [
    "null",
    "int",
    "uint64",
    "float",
    "float16",
    "bool",
    "string",
    "large_string",
    "binary",
    "dictionary",
    "timestamp",
    "date",
    "duration",
    "decimal",
    "list_float",
    "list_int",
    "list_string",
    "list_list",
    "fixed_list",
    "large_list",
    "struct",
    "struct_deep",
    "map",
    "messages",
    "struct_empty",
]


def _arrow_column(draw: st.DrawFn, n: int) -> Any:
    """An Arrow array of ``n`` values of a type drawn from :data:`_ARROW_KINDS` (what a
    Parquet file made by another tool may hold)."""
    import decimal

    import pyarrow as pa

    kind = draw(st.sampled_from(_ARROW_KINDS))

    def pick(options: list[Any]) -> list[Any]:
        return [draw(st.sampled_from(options)) for _ in range(n)]

    nan, inf = float("nan"), float("inf")
    if kind == "null":
        return pa.nulls(n)
    if kind == "int":
        return pa.array(pick([0, 1, -1, 7, 2**62, None]), pa.int64())
    if kind == "uint64":
        return pa.array(pick([0, 1, 2**64 - 1]), pa.uint64())
    if kind == "float":
        return pa.array(pick([0.0, 1.0, nan, inf, -inf, None, 1e308]), pa.float64())
    if kind == "float16":
        return pa.array(np.array(pick([0.0, 1.0, nan]), dtype=np.float16))
    if kind == "bool":
        return pa.array(pick([True, False, None]), pa.bool_())
    if kind == "string":
        return pa.array(pick(["", " ", "u1", "\x00", "é", "a" * 300, None]), pa.string())
    if kind == "large_string":
        return pa.array(pick(["u1", "Hello.", None]), pa.large_string())
    if kind == "binary":
        return pa.array(pick([b"", b"u1", b"\xff"]), pa.binary())
    if kind == "dictionary":
        return pa.array(pick(["u1", "u2", "Hello.", None]), pa.string()).dictionary_encode()
    if kind == "timestamp":
        return pa.array(pick([0, 1, None]), pa.timestamp("ms"))
    if kind == "date":
        return pa.array(pick([0, 1, None]), pa.date32())
    if kind == "duration":
        return pa.array(pick([0, 1, None]), pa.duration("s"))
    if kind == "decimal":
        return pa.array(
            pick([decimal.Decimal("1"), decimal.Decimal("0"), decimal.Decimal("0.5"), None]),
            pa.decimal128(5, 2),
        )
    if kind == "list_float":
        return pa.array(
            pick(
                [
                    [],
                    [1.0],
                    [0.5, -1.0],
                    [1.0, 0.0, 2.0],
                    [nan, 1.0, 2.0],
                    None,
                    [None, 1.0, 2.0],
                    [1e308, -1e308, 0.0],
                ]
            ),
            pa.list_(pa.float64()),
        )
    if kind == "list_int":
        return pa.array(pick([[0, 1, 2], [1], [], None, [2**62, 0, 1]]), pa.list_(pa.int64()))
    if kind == "list_string":
        return pa.array(pick([["a"], [], None, ["a", "b"], [None]]), pa.list_(pa.string()))
    if kind == "list_list":
        return pa.array(pick([[[1.0]], [[1.0, 2.0]], [], None]), pa.list_(pa.list_(pa.float64())))
    if kind == "fixed_list":
        return pa.array(pick([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], None]), pa.list_(pa.float64(), 3))
    if kind == "large_list":
        return pa.array(pick([[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]]), pa.large_list(pa.float64()))
    if kind == "struct":
        return pa.array(
            pick(
                [
                    {"age": 30, "region": "n"},
                    {"age": None, "region": None},
                    None,
                    {"age": 41, "region": "s"},
                ]
            ),
            pa.struct([("age", pa.int64()), ("region", pa.string())]),
        )
    if kind == "struct_deep":
        return pa.array(pick([{"a": {"b": {"c": 1.0}}}, {"a": None}, {"a": {"b": None}}]))
    if kind == "map":
        return pa.array(
            pick([[("age", 1.0)], [], None, [("a", 1.0), ("a", 2.0)]]),
            pa.map_(pa.string(), pa.float64()),
        )
    if kind == "messages":
        return pa.array(
            pick(
                [
                    [{"role": "user", "content": "Tea?"}],
                    [],
                    None,
                    [{"role": "", "content": "x"}],
                    [{"role": "user", "content": None}],
                    [{"role": "assistant", "content": "Yes please."}],
                ]
            ),
            pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
        )
    return pa.array([{}] * n, pa.struct([]))  # struct_empty: Parquet cannot write it


def _parquet_bytes(table: Any, **options: Any) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    return buffer.getvalue()


@st.composite
def _parquet_tables(draw: st.DrawFn) -> tuple[str, bytes]:
    """``(format, Parquet bytes)``: the seed rows as an Arrow table with columns replaced by
    arrays of other types (:func:`_arrow_column`), columns dropped, added (also under a name
    the table already has), renamed, cells nulled, rows dropped or repeated; written with
    various writer options; or damaged bytes of such a file."""
    import pyarrow as pa

    fmt = draw(st.sampled_from(["trl", "trl", "chat", "numeric"]))
    seed = {"trl": TRL_FLAT_ROWS, "chat": CHAT_ROWS, "numeric": NUMERIC_ROWS}[fmt]
    table = pa.Table.from_pylist(seed)
    for _ in range(draw(st.integers(1, 3))):
        names = table.column_names
        j = draw(st.integers(0, len(names) - 1)) if names else 0
        action = draw(
            st.sampled_from(
                ["column", "column", "column", "drop", "add", "rename", "null_cell", "rows"]
            )
        )
        if action == "column" and names:
            table = table.set_column(j, names[j], _arrow_column(draw, table.num_rows))
        elif action == "drop" and names:
            table = table.remove_column(j)
        elif action == "add":
            name = draw(st.sampled_from(["extra", "", " ", *names]))
            table = table.append_column(name, _arrow_column(draw, table.num_rows))
        elif action == "rename" and names:
            new = list(names)
            new[j] = draw(st.sampled_from(["", " ", "Prompt", "user id", *names]))
            table = table.rename_columns(new)
        elif action == "null_cell" and names and table.num_rows:
            column = table.column(j).to_pylist()
            column[draw(st.integers(0, len(column) - 1))] = None
            try:
                array = pa.array(column, table.schema.field(j).type)
            except (pa.ArrowException, TypeError, ValueError):
                continue
            table = table.set_column(j, table.schema.field(j).name, array)
        elif action == "rows":
            keep = draw(st.lists(st.integers(0, max(table.num_rows - 1, 0)), max_size=5))
            if table.num_rows:
                table = table.take(pa.array(keep, pa.int64()))
    options = {
        "row_group_size": draw(st.sampled_from([None, 1])),
        "compression": draw(st.sampled_from(["snappy", "none", "gzip", "zstd"])),
        "use_dictionary": draw(st.booleans()),
        "version": draw(st.sampled_from(["1.0", "2.4", "2.6"])),
        "data_page_version": draw(st.sampled_from(["1.0", "2.0"])),
    }
    try:
        data = _parquet_bytes(table, **options)
    except (pa.ArrowException, TypeError, ValueError):  # a table Parquet cannot hold
        data = _parquet_bytes(pa.Table.from_pylist(seed))
    damage = draw(st.sampled_from(["none"] * 6 + ["bytes", "footer", "magic"]))
    if damage == "bytes":
        data = draw(mutated_bytes(data))
    elif damage == "footer":  # a footer length past the file, or zero
        size = draw(st.sampled_from([0, 1, len(data), 2**31 - 1, 2**32 - 1]))
        data = data[:-8] + size.to_bytes(4, "little") + b"PAR1"
    elif damage == "magic":
        data = draw(
            st.sampled_from(
                [b"", b"PAR1", b"PAR1PAR1", b"PAR1" + b"\x00" * 8 + b"PAR1", data[:4] + data[-8:]]
            )
        )
    return ("numeric" if fmt == "numeric" else "trl"), data


def _read_parquet_table(value: tuple[str, bytes], tmp: Path) -> None:
    fmt, data = value
    _read(fmt, _write(tmp, "prefs.parquet", data))


if _has("pyarrow"):
    register(Target("data.parquet_tables", _parquet_tables(), _read_parquet_table))


# -------------------------------------------------------------------------- DataFrames
@functools.cache
def _odd_cells() -> list[Any]:
    """Python, NumPy and pandas values a DataFrame's object column (or an in-memory row) may
    hold: missing-value markers, NumPy scalars and arrays, Series, tuples, sets, bytes,
    Decimals, complex and huge numbers, mappings and message lists holding such values."""
    import datetime
    import decimal

    import pandas as pd

    nan = float("nan")
    return [
        None,
        nan,
        np.nan,
        pd.NA,
        pd.NaT,
        np.float64("nan"),
        np.float64(1.0),
        np.float32(0.5),
        np.int64(7),
        np.int64(1),
        np.int8(0),
        np.bool_(True),
        np.str_("u1"),
        np.str_(""),
        np.datetime64("NaT"),
        np.datetime64("2020-01-01"),
        np.array([1, 0]),
        np.array([0.5, -1.0]),
        np.array(1),
        np.array([]),
        np.array([[1.0]]),
        np.array(["a"]),
        np.array([np.nan, 1.0, 2.0]),
        np.array([1.0, 0.0, 2.0], dtype=np.float16),
        pd.Series([1, 0]),
        pd.Series([], dtype=float),
        pd.Timestamp(0),
        pd.Timedelta(0),
        (1.0, 2.0),
        {1.0},
        frozenset(),
        b"u1",
        bytearray(b"x"),
        decimal.Decimal("1"),
        1 + 0j,
        2**70,
        -(2**70),
        True,
        0,
        1,
        "",
        " ",
        "Hello.",
        "u1",
        [1.0, 0.0, 2.0],
        [],
        [None],
        [nan],
        [np.nan, 1.0, 2.0],
        [np.float64(1), np.int64(0), np.float32(2)],
        {"age": np.int64(30)},
        {"age": nan},
        {"age": pd.NA},
        {1: "a"},
        {np.str_("a"): 1},
        {"a": {"b": np.array([1])}},
        {},
        {"a": {}},
        {"age": 30, "region": {"name": "north"}},
        {"age": 30, "region": {"name": pd.NaT}},
        [{"role": "user", "content": "Tea?"}],
        [{"role": "user", "content": np.str_("Tea?")}],
        [{"role": "user", "content": "Tea?", "x": np.array([1, 2])}],
        [{"role": "user", "content": None}],
        [{"role": np.nan, "content": "x"}],
        np.array([{"role": "user", "content": "hi"}], dtype=object),
        [{"role": "assistant", "content": "Yes please.", "name": pd.NA}],
        datetime.date(2020, 1, 1),
        object(),
    ]


_FRAME_DTYPES = [
    "float64",
    "Int64",
    "string",
    "category",
    "bool",
    "datetime64[ns]",
    "int64",
    "object",
    "boolean",
]
_FRAME_NAMES = [0, 1, None, ("user_id", ""), "", " ", "user_id ", "Prompt", "extra", 1.5, True]


def _object_column(values: list[Any]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        column[i] = v
    return column


def _frame(
    columns: list[tuple[Any, list[Any]]],
    dtypes: dict[int, str],
    rows: list[int] | None,
    multiindex: bool,
) -> Any:
    import pandas as pd

    frame = pd.DataFrame({i: _object_column(vals) for i, (_, vals) in enumerate(columns)})
    if not columns:
        frame = pd.DataFrame(index=range(len(rows) if rows is not None else 0))
    for j, dtype in dtypes.items():
        if j < frame.shape[1]:
            with contextlib.suppress(Exception):  # a cast pandas refuses: keep the column
                frame.isetitem(j, frame.iloc[:, j].astype(dtype))
    names = [name for name, _ in columns]
    frame.columns = (
        pd.MultiIndex.from_tuples([(str(n), "") for n in names]) if multiindex and names else names
    )
    if rows is not None and len(frame):
        frame = frame.iloc[[r % len(frame) for r in rows]]
    return frame


@st.composite
def _frame_cases(draw: st.DrawFn) -> tuple[str, str, Any]:
    """``(format, container, data)``: the seed rows as a DataFrame with object cells replaced
    by :func:`_odd_cells`, columns cast to other dtypes (float with NaN, nullable Int64,
    string, category, datetime…), renamed (to integers, tuples, None, a name already used),
    dropped, MultiIndex columns, rows dropped or repeated; passed as the DataFrame, or as
    its raw records or columns (a list or mapping holding the same NumPy/pandas values)."""
    fmt = draw(st.sampled_from(["trl", "trl", "chat", "implicit", "numeric"]))
    seed = {"trl": TRL_ROWS, "chat": CHAT_ROWS, "implicit": IMPLICIT_ROWS, "numeric": NUMERIC_ROWS}[
        fmt
    ]
    keys = list(dict.fromkeys(k for r in seed for k in r))
    columns: list[tuple[Any, list[Any]]] = [(k, [r.get(k) for r in seed]) for k in keys]
    dtypes: dict[int, str] = {}
    rows: list[int] | None = None
    multiindex = False
    cells = _odd_cells()
    for _ in range(draw(st.integers(1, 2))):
        j = draw(st.integers(0, len(columns) - 1)) if columns else 0
        action = draw(
            st.sampled_from(
                ["cell"] * 5
                + ["column"] * 2
                + ["dtype"] * 2
                + ["rename", "drop", "rows", "multiindex"]
            )
        )
        if action == "cell" and columns:
            values = columns[j][1]
            values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(cells))
        elif action == "column" and columns:
            columns[j] = (columns[j][0], [draw(st.sampled_from(cells)) for _ in columns[j][1]])
        elif action == "dtype":
            dtypes[j] = draw(st.sampled_from(_FRAME_DTYPES))
        elif action == "rename" and columns:
            columns[j] = (draw(st.sampled_from([*_FRAME_NAMES, *keys])), columns[j][1])
        elif action == "drop" and columns:
            del columns[j]
        elif action == "rows":
            rows = draw(
                st.lists(st.integers(0, 5), min_size=draw(st.sampled_from([0, 1, 1])), max_size=4)
            )
        elif action == "multiindex":
            multiindex = True
    frame = _frame(columns, dtypes, rows, multiindex)
    container = draw(st.sampled_from(["frame", "frame", "frame", "records", "columns"]))
    reader_fmt = "numeric" if fmt == "numeric" else "trl"
    if container == "records":
        return (
            reader_fmt,
            container,
            [
                dict(zip(frame.columns, values, strict=True))
                for values in frame.itertuples(index=False, name=None)
            ],
        )
    if container == "columns":
        return (
            reader_fmt,
            container,
            {name: list(frame.iloc[:, j]) for j, name in enumerate(frame.columns)},
        )
    return reader_fmt, container, frame


def _read_frame(value: tuple[str, str, Any], tmp: Path) -> None:
    fmt, _, data = value
    _read(fmt, data)


if _has("pandas"):
    register(Target("data.dataframe", _frame_cases(), _read_frame))


# ------------------------------------------------------------------ NumPy / pandas rows
def _numpy_forms(value: Any) -> list[Any]:
    """What ``value`` may be instead in rows that come from NumPy or pandas
    (``df.to_dict("records")``, ``pd.read_parquet``'s list cells, hand-built rows): NumPy
    scalars, 0-d/1-d/2-d and object arrays, Series, tuples, bytes, message lists whose
    messages hold such values, mappings of NumPy values, NaN/NA for a missing value."""
    import pandas as pd

    if value is None:
        return [np.nan, pd.NA, pd.NaT, np.float64("nan"), np.datetime64("NaT")]
    if isinstance(value, bool):
        return [np.bool_(value), np.array(value), np.array([value]), pd.Series([value])]
    if isinstance(value, int | float):
        return [
            np.int64(value),
            np.int8(value),
            np.float64(value),
            np.float32(value),
            np.array(value),
            np.array([value]),
            np.array([value, value]),
            [value],
            pd.Series([value]),
            np.uint8(abs(value) % 256),
            np.array(value, dtype=object),
        ]
    if isinstance(value, str):
        return [
            np.str_(value),
            np.array(value),
            np.array([value]),
            np.array([value, value]),
            pd.Series([value]),
            value.encode(),
            np.bytes_(value.encode()),
            (value,),
        ]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [
            np.array(value, dtype=object),
            tuple(value),
            pd.Series(value),
            [{k: np.str_(v) if isinstance(v, str) else v for k, v in m.items()} for m in value],
            [{**m, "tags": np.array(["a", "b"])} for m in value],
            [{**m, "weight": np.float64("nan")} for m in value],
            [{**m, "name": pd.NA} for m in value],
            [pd.Series(m) for m in value],
            [{**m, "content": np.array([m.get("content")])} for m in value],
        ]
    if isinstance(value, list):
        forms = [
            np.array(value),
            np.array([value]),
            np.array(value, dtype=object),
            tuple(value),
            pd.Series(value, dtype=object),
            np.array(value).reshape(-1, 1),
        ]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            forms += [
                np.array(value, dtype=np.float32),
                np.array(value, dtype=np.float16),
                [np.float64(v) for v in value],
                np.array(value, dtype=np.int8),
            ]
        return forms
    if isinstance(value, dict):
        return [
            {k: np.int64(v) if isinstance(v, int) else v for k, v in value.items()},
            {k: np.array([v]) for k, v in value.items()},
            {k: np.float64("nan") for k in value},
            {k: pd.NA for k in value},
            {np.str_(k): v for k, v in value.items()},
            pd.Series(value, dtype=object),
        ]
    return [np.array([value], dtype=object)]


@st.composite
def _numpy_row_cases(draw: st.DrawFn) -> tuple[str, list[Any]]:
    """``(format, rows)``: in-memory rows of each format with values in NumPy/pandas forms
    (:func:`_numpy_forms`): one cell, one field on every row (the same form), or every field
    of a row (drawn one by one, or all alike); read as given (a list of mappings)."""
    fmt = draw(
        st.sampled_from(["numeric", "numeric", "implicit", "implicit", "trl", "chat", "summarize"])
    )
    seed = {
        "numeric": NUMERIC_ROWS,
        "implicit": IMPLICIT_ROWS,
        "trl": TRL_ROWS,
        "chat": CHAT_ROWS,
        "summarize": _fixture_rows("summarize_from_feedback.jsonl", limit=3),
    }[fmt]
    rows = [dict(r) for r in seed]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for _ in range(draw(st.integers(1, 2))):
        how = draw(st.sampled_from(["cell", "cell", "column", "column", "row", "row_alike"]))
        i = draw(st.integers(0, len(rows) - 1))
        key = draw(st.sampled_from(keys))
        if how == "cell" and key in rows[i]:
            rows[i][key] = draw(st.sampled_from(_numpy_forms(rows[i][key])))
        elif how == "column":
            k = draw(st.integers(0, 20))
            for r in rows:
                if key in r:
                    forms = _numpy_forms(r[key])
                    r[key] = forms[k % len(forms)]
        elif how == "row":
            for name in list(rows[i]):
                if draw(st.booleans()):
                    rows[i][name] = draw(st.sampled_from(_numpy_forms(rows[i][name])))
        elif how == "row_alike":  # every field of the row in the same kind of form
            k = draw(st.integers(0, 20))
            for name in list(rows[i]):
                forms = _numpy_forms(rows[i][name])
                rows[i][name] = forms[k % len(forms)]
    return ("trl" if fmt in ("implicit", "chat") else fmt), rows


def _read_numpy_rows(value: tuple[str, list[Any]], tmp: Path) -> None:
    fmt, rows = value
    _read(fmt, rows)


if _has("pandas"):
    register(Target("data.numpy_rows", _numpy_row_cases(), _read_numpy_rows))


# ---------------------------------------------------------------------- datasets objects
# whole columns of one Arrow type each (so that a Dataset can be built from them)
_DATASET_COLUMNS: list[list[Any]] = [
    [None, None, None],
    [0, 1, 1],
    [1.0, float("nan"), 0.0],
    ["", " ", "x"],
    [True, False, True],
    [[1.0, 0.0], [0.5], []],
    [[0.5, -1.0], [0.5, -1.0], [1.0, 2.0]],
    [{"age": 30}, {"region": "n"}, {}],
    [{"age": 30, "g": "f"}, {"age": None, "g": "m"}, None],
    [[{"role": "user", "content": "x"}], [], None],
    [["a"], ["b"], ["c"]],
    ["u1", "u1", "u1"],
    [7, 7, 8],
    [2**62, 0, 1],
    [[[1.0]], [[2.0]], [[3.0]]],
    [{"a": {"b": None}}] * 3,
    [{"age": float("inf")}, {"age": 1.0}, {"age": 2.0}],
    ["Hello.", "Hello.", "Hello."],
    [[{"role": "assistant", "content": ""}]] * 3,
    [[1.0, 0.0, 2.0]] * 3,
]
_DATASET_CONTAINERS = [
    "dataset",
    "dataset",
    "dict",
    "dict",
    "plain_dict",
    "iterable",
    "iterable_dict",
    "to_dict",
    "formatted",
]


@st.composite
def _dataset_cases(draw: st.DrawFn) -> tuple[str, str, Any, list[Any]]:
    """``(format, container, split, rows)``: seed rows with cells nulled, whole columns of
    another type, columns dropped or added, rows mutated as values (a set no Dataset can hold
    is stored as JSON text), or no rows; read as a Dataset, a DatasetDict or a dict of
    Datasets (with the split, without one, with one it lacks), an IterableDataset(Dict), a
    formatted Dataset or ``to_dict()`` columns."""
    fmt = draw(st.sampled_from(["trl", "trl", "chat", "numeric"]))
    rows = [
        dict(r) for r in {"trl": TRL_FLAT_ROWS, "chat": CHAT_ROWS, "numeric": NUMERIC_ROWS}[fmt]
    ]
    for _ in range(draw(st.integers(1, 2))):
        dicts = [r for r in rows if isinstance(r, dict)]
        keys = list(dict.fromkeys(k for r in dicts for k in r))
        action = draw(
            st.sampled_from(["cell", "column", "column", "drop", "add", "values", "empty", "none"])
        )
        if not keys and action not in ("values", "none"):
            continue
        key = draw(st.sampled_from(keys)) if keys else None
        fill = draw(st.sampled_from(_DATASET_COLUMNS))
        if action == "cell":
            dicts[draw(st.integers(0, len(dicts) - 1))][key] = None
        elif action == "column":
            for i, r in enumerate(dicts):
                r[key] = fill[i % len(fill)]
        elif action == "drop":
            for r in dicts:
                r.pop(key, None)
        elif action == "add":
            name = draw(st.sampled_from(["extra", "user", "x", "prompt"]))
            for i, r in enumerate(dicts):
                r.setdefault(name, fill[i % len(fill)])
        elif action == "values":
            value = draw(mutated_value(rows, max_edits=2))
            rows = value if isinstance(value, list) else [value]
        elif action == "empty":
            rows = []
    container = draw(st.sampled_from(_DATASET_CONTAINERS))
    split = draw(
        st.sampled_from(
            ["train", "train", "train", None, "test", "validation", ""]
            if "dict" in container
            else [None] * 5 + ["train"]
        )
    )
    return ("numeric" if fmt == "numeric" else "trl"), container, split, rows


def _dataset(rows: list[Any]) -> Any:
    """``rows`` as a Dataset; rows no Arrow table can hold (mixed types in one column) with
    every non-string value as JSON text."""
    import datasets

    try:
        return datasets.Dataset.from_list(rows)
    except Exception:  # datasets/pyarrow refusing the rows: not pluralign's boundary
        text = [
            {str(k): v if v is None or isinstance(v, str) else _dump_json(v) for k, v in r.items()}
            if isinstance(r, dict)
            else {"value": _dump_json(r)}
            for r in rows
        ]
        return datasets.Dataset.from_list(text)


def _read_dataset(value: tuple[str, str, Any, list[Any]], tmp: Path) -> None:
    import datasets

    fmt, container, split, rows = value
    ds = _dataset(rows)
    if container in ("dict", "plain_dict"):
        other = _dataset(TRL_FLAT_ROWS[:1] if fmt == "trl" else NUMERIC_ROWS[:1])
        source: Any = {"train": ds, "test": other}
        if container == "dict":
            source = datasets.DatasetDict(source)
    elif container in ("iterable", "iterable_dict") and len(ds):  # (none of 0 rows)
        source = ds.to_iterable_dataset()
        if container == "iterable_dict":
            source = datasets.IterableDatasetDict(train=source)
    elif container == "to_dict":
        source = ds.to_dict()
    elif container == "formatted":
        source = ds.with_format("numpy")
    else:
        source = ds
    _read(fmt, source, split=split)


if _has("datasets"):
    register(Target("data.datasets", _dataset_cases(), _read_dataset))


# ---------------------------------------------------------------------- column mapping
# keyword -> the column it replaces, per format
_MAPPABLE = {
    "trl": {
        "prompt_column": "prompt",
        "chosen_column": "chosen",
        "rejected_column": "rejected",
        "user_column": "user_id",
        "context_column": "user_context",
    },
    "numeric": {"user_column": "user", "context_column": "x"},
    "summarize": {"user_column": "worker"},
    "prism": {
        "prompt_column": "prompt",
        "chosen_column": "chosen",
        "rejected_column": "rejected",
        "user_column": "user_id",
    },
}
_KEYWORDS = ("prompt_column", "chosen_column", "rejected_column", "user_column", "context_column")
_RENAMES = {
    "prompt": ["question", "Prompt", "prompt text"],
    "chosen": ["good", "response_a"],
    "rejected": ["bad", "response_b"],
    "user_id": ["annotator", "annotator id", "é"],
    "user": ["annotator", "labeler"],
    "worker": ["annotator", "labeler"],
    "user_context": ["profile", "x0"],
    "x": ["profile", "context"],
}
_BAD_NAMES = [
    "",
    " ",
    7,
    ["user_id"],
    True,
    "\x00",
    "nope",
    "info",
    "phi0",
    "y",
    "conversation_id",
    "user_id",
    "user_context",
    "x",
]


@st.composite
def _mapping_cases(draw: st.DrawFn) -> tuple[str, str, list[Any], dict[str, Any]]:
    """``(format, source kind, rows, keywords)``: rows of a format with some columns renamed,
    and ``*_column`` keywords that name them right, not at all (so a renamed column is
    missing), by their default name, by another column of the row, by a name no row has,
    by a bad name (empty, not a string, a format's fixed column), the same column for two
    fields, a keyword the format has no field for, or an unknown keyword; a row sometimes
    mutated; read from rows, a JSONL/CSV/gzip file, a DataFrame or ``pluralign data
    validate`` with the column flags."""
    fmt = draw(st.sampled_from(["trl", "trl", "trl", "numeric", "summarize", "prism"]))
    seed = {
        "trl": TRL_ROWS,
        "numeric": NUMERIC_ROWS,
        "prism": PRISM_PAIRS,
        "summarize": _fixture_rows("summarize_from_feedback.jsonl", limit=3),
    }[fmt]
    mappable = _MAPPABLE[fmt]
    renames: dict[str, str] = {}
    for column in mappable.values():
        if draw(st.booleans()):
            new = draw(st.sampled_from(_RENAMES[column]))
            if new not in renames.values() and new not in seed[0]:
                renames[column] = new
    rows: list[Any] = [{renames.get(k, k): v for k, v in r.items()} for r in seed]
    present = list(dict.fromkeys(k for r in rows for k in r))
    kwargs: dict[str, Any] = {}
    for keyword, default in mappable.items():  # right: each renamed column, maybe others
        if default in renames or draw(st.integers(0, 3)) == 0:
            kwargs[keyword] = renames.get(default, default)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2]))):  # then some faults
        how = draw(
            st.sampled_from(["omit", "default", "other", "missing", "bad", "twin", "inapplicable"])
        )
        if how == "inapplicable":
            others = [k for k in _KEYWORDS if k not in mappable]
            if others:
                kwargs[draw(st.sampled_from(others))] = draw(st.sampled_from(present))
            continue
        keyword = draw(st.sampled_from(sorted(mappable)))
        if how == "omit":
            kwargs.pop(keyword, None)
        elif how == "default":
            kwargs[keyword] = mappable[keyword]
        elif how == "other":
            kwargs[keyword] = draw(st.sampled_from(present))
        elif how == "missing":
            kwargs[keyword] = draw(st.sampled_from(["nope", "user_id2", "Prompt "]))
        elif how == "bad":
            kwargs[keyword] = draw(st.sampled_from(_BAD_NAMES))
        elif how == "twin" and kwargs:
            kwargs[keyword] = draw(st.sampled_from(list(kwargs.values())))
    if draw(st.integers(0, 19)) == 0:
        kwargs[draw(st.sampled_from(["score_column", "user", "column", "users_column"]))] = "x"
    if draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, len(rows) - 1))
        rows[i] = draw(mutated_value(rows[i], max_edits=1))
    kinds = ["rows", "rows", "jsonl", "csv", "gz", "cli"] + (["frame"] if _has("pandas") else [])
    return fmt, draw(st.sampled_from(kinds)), rows, kwargs


def _mapping_source(kind: str, rows: list[Any], tmp: Path) -> Any:
    if kind == "rows":
        return rows
    if kind == "frame":
        import pandas as pd

        return pd.DataFrame([r if isinstance(r, dict) else {"value": r} for r in rows])
    if kind == "csv":
        return _write(tmp, "prefs.csv", _csv_join(_csv_records(rows)).encode())
    if kind == "gz":
        return _write(tmp, "prefs.jsonl.gz", gzip.compress(_jsonl(rows), mtime=0))
    return _write(tmp, "prefs.jsonl", _jsonl(rows))


def _survey(tmp: Path, user: str) -> Path:
    rows = _fixture_rows("prism_survey.jsonl")
    return _write(
        tmp,
        "survey.jsonl",
        _jsonl([{user if k == "user_id" else k: v for k, v in r.items()} for r in rows]),
    )


def _read_mapping(value: tuple[str, str, list[Any], dict[str, Any]], tmp: Path) -> None:
    from pluralign.data import (
        load_preferences,
        read_prism,
        read_summarize_from_feedback,
        read_trl,
    )
    from pluralign.data.loaders import read_text_preferences, validate_file

    fmt, kind, rows, kwargs = value
    user = kwargs.get("user_column")
    survey = _survey(tmp, user if isinstance(user, str) and user.strip() else "user_id")
    source = _mapping_source(kind, rows, tmp)
    if kind == "cli":
        args = ["data", "validate", str(source)]
        for keyword, column in kwargs.items():
            if keyword in _KEYWORDS and isinstance(column, str) and "\x00" not in column:
                args += [f"--{keyword.replace('_', '-')}", column]
        if fmt == "prism":
            args += ["--survey", str(survey)]
        code = _cli(args)
        if code not in (0, 1, 2):
            raise AssertionError(f"exit code {code}")
        if code:
            raise PluralignError(f"exit {code}")
        return
    refused: list[PluralignError] = []

    def attempt(call: Callable[[], Any]) -> None:
        try:
            call()
        except PluralignError as err:
            refused.append(err)

    known = set(kwargs) <= set(_KEYWORDS)
    if fmt == "trl" and known:
        attempt(lambda: _agree(read_trl, source, **kwargs))
    elif fmt == "numeric":
        attempt(lambda: _agree(load_preferences, source, **kwargs))
    elif fmt == "summarize":
        attempt(lambda: _agree(read_summarize_from_feedback, source, **kwargs))
    elif fmt == "prism":
        attempt(lambda: _agree(functools.partial(read_prism, survey), source, **kwargs))
    extra = {"survey": survey} if fmt == "prism" else {}
    attempt(lambda: validate_file(source, **extra, **kwargs))
    if fmt != "numeric":
        attempt(lambda: read_text_preferences(source, **extra, **kwargs))
    if refused:
        raise refused[0]


register(Target("data.column_mapping", _mapping_cases(), _read_mapping))


# ---------------------------------------------------------------------- implicit prompts
_PREFIXES = [
    "",
    " ",
    "\n",
    "Q: why? A:",
    "Q: why? A: ",
    "The capital of France is ",
    "é",
    "a",
    "Human: hi\n\nAssistant:",
    "  ",
    "\x00",
]
_SUFFIXES = ["", " ", "Paris.", " Paris.", "Lyon.", "because.", "P", "\x00", "a" * 50, "é", "\n"]
_MESSAGES = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system"]),
        "content": st.sampled_from(["Tea?", "Yes.", "No.", "hi", "Tea? ", "é"]),
    },
    optional={"name": st.sampled_from([None, "bob"])},
)
_BAD_MESSAGES = st.sampled_from(
    [
        {"role": "", "content": "x"},
        {"role": "user", "content": " "},
        {"role": "user"},
        {"content": "x"},
        {"role": 1, "content": "x"},
        {"role": "user", "content": ["x"]},
        "user: hi",
        None,
        {"role": "user", "content": "hi", "name": [1]},
    ]
)


@st.composite
def _message_lists(draw: st.DrawFn, max_size: int) -> list[Any]:
    messages = draw(st.lists(_MESSAGES, max_size=max_size))
    if messages and draw(st.integers(0, 9)) == 0:
        messages[draw(st.integers(0, len(messages) - 1))] = draw(_BAD_MESSAGES)
    return messages


@st.composite
def _implicit_row(draw: st.DrawFn, user: Any) -> dict[str, Any]:
    style = draw(st.sampled_from(["strings", "strings", "messages", "mixed"]))
    if style == "strings":
        prefix = draw(st.one_of(st.sampled_from(_PREFIXES), st.text(max_size=6)))
        chosen = prefix + draw(
            st.one_of(st.sampled_from(_SUFFIXES), st.text(min_size=1, max_size=4))
        )
        rejected = prefix + draw(
            st.one_of(st.sampled_from(_SUFFIXES), st.text(min_size=1, max_size=4))
        )
    elif style == "messages":
        shared = draw(_message_lists(3))
        chosen = shared + draw(_message_lists(2))
        rejected = shared + draw(_message_lists(2))
    else:
        chosen, rejected = draw(
            st.sampled_from(
                [
                    ("Tea?", [{"role": "user", "content": "Tea?"}]),
                    ([{"role": "user", "content": "Tea?"}], "Tea? No."),
                    ([], "x"),
                    ("x", []),
                    ([{"role": "user", "content": "Tea?"}], [{"role": "user", "content": "Tea?"}]),
                    ("same", "same"),
                ]
            )
        )
    row: dict[str, Any] = {"chosen": chosen, "rejected": rejected, "user_id": user}
    prompt = draw(st.sampled_from(["absent"] * 5 + ["null", "empty", "present"]))
    if prompt == "null":
        row["prompt"] = None
    elif prompt == "empty":
        row["prompt"] = draw(st.sampled_from(["", " ", []]))
    elif prompt == "present":
        row["prompt"] = "Hi?"
    if draw(st.integers(0, 9)) == 0:
        row["user_context"] = draw(st.sampled_from([[1.0, 2.0], {"age": 3}, None]))
    return row


@st.composite
def _implicit_cases(draw: st.DrawFn) -> tuple[list[Any], str | None, str]:
    """``(rows, prompt_column, source kind)``: rows without a prompt (or a null, empty or
    present one) whose chosen and rejected share a beginning or not — strings with drawn
    prefixes and suffixes (empty, spaces, one a prefix of the other, identical), message
    lists with shared leading messages (none, all, bad roles/contents), a string against a
    list — or the seed rows mutated; ``prompt_column`` naming the prompt or a missing
    column; read from rows, JSONL, a JSON array or a DataFrame."""
    if draw(st.integers(0, 4)) == 0:
        value = draw(mutated_value(IMPLICIT_ROWS, max_edits=3))
        rows = value if isinstance(value, list) else [value]
    else:
        user = draw(st.sampled_from(["u1", 7]))
        rows = draw(st.lists(_implicit_row(user), min_size=1, max_size=3))
    prompt_column = draw(st.sampled_from([None] * 6 + ["prompt", "question"]))
    kinds = ["rows", "rows", "rows", "jsonl", "json"] + (["frame"] if _has("pandas") else [])
    return rows, prompt_column, draw(st.sampled_from(kinds))


def _without_nulls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _check_implicit(rows: list[Any], prefs: Any, prompt_column: str | None) -> None:
    """Each implicit-prompt row read splits its responses where TRL does: the prompt and each
    response put back together are the original response (text, or messages)."""
    key = prompt_column or "prompt"
    for i, (_, line) in enumerate(prefs.where):
        row = rows[line - 1]
        if row.get(key) is not None:
            continue
        for response, text in (("chosen", prefs.chosen[i]), ("rejected", prefs.rejected[i])):
            original = row[response]
            if isinstance(original, str):
                if prefs.prompts[i] + text != original:
                    raise AssertionError(
                        f"row {line}: prompt {prefs.prompts[i]!r} + {response} "
                        f"{text!r} is not the original {original!r}"
                    )
            else:
                prompt, chosen, rejected = prefs.messages[i]
                got = prompt + (chosen if response == "chosen" else rejected)
                if got != _without_nulls(original):
                    raise AssertionError(
                        f"row {line}: prompt + {response} messages {got!r} "
                        f"are not the original {original!r}"
                    )
    if prefs.template is None and all(
        isinstance(r.get("chosen"), str) and r.get(key) is None for r in rows
    ):
        raise AssertionError(
            "every row is an implicit string prompt, but the template is not '{prompt}{response}'"
        )


def _read_implicit(value: tuple[list[Any], str | None, str], tmp: Path) -> None:
    rows, prompt_column, kind = value
    if kind == "rows":
        source: Any = rows
    elif kind == "frame":
        import pandas as pd

        source = pd.DataFrame([r if isinstance(r, dict) else {"value": r} for r in rows])
    elif kind == "json":
        source = _write(tmp, "prefs.json", _dump_json(rows).encode())
    else:
        source = _write(tmp, "prefs.jsonl", _jsonl(rows))
    prefs = _read("trl", source, prompt_column=prompt_column)
    if kind == "rows" and prefs is not None and all(isinstance(r, dict) for r in rows):
        _check_implicit(rows, prefs, prompt_column)


register(Target("data.trl_implicit", _implicit_cases(), _read_implicit))
