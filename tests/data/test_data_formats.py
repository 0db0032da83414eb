"""The table of formats (:data:`pluralign.data.formats.FORMATS`): every dispatch site reads it,
so it must be self-consistent, and detection, the column keywords each reader accepts and the
readers themselves must be what the table says."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from pluralign.data import PreferenceData
from pluralign.data.formats import (
    COLUMN_KEYWORDS,
    FORMATS,
    TEXT_FORMATS,
    Columns,
    detect_by_keys,
)
from pluralign.data.loaders import (
    TextPreferences,
    detect_format,
    read_text_preferences,
    validate_file,
)
from pluralign.errors import DataValidationError

FIXTURES = Path(__file__).parents[1] / "fixtures"
TRL = {"prompt": "p", "chosen": "a", "rejected": "b", "user_id": "u"}
NUMERIC = {"phi0": [0.0, 1.0], "phi1": [1.0, 0.0], "y": 1, "user": "u"}


def test_the_table_is_consistent():
    assert list(FORMATS) == ["numeric", "trl", "summarize", "prism"]
    assert TEXT_FORMATS == ("trl", "summarize", "prism")
    assert [f.name for f in FORMATS.values() if not f.keys] == ["trl"]  # one fallback
    for name, spec in FORMATS.items():
        assert spec.name == name and spec.kind in ("text", "numeric")
        assert set(spec.columns) <= set(COLUMN_KEYWORDS)
        assert not set(spec.columns.values()) & set(spec.fixed)
        reader = spec.reader.split(":")
        module = __import__(reader[0], fromlist=[reader[1]])
        assert callable(getattr(module, reader[1]))


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"phi0", "phi1", "y"}, "numeric"),
        ({"phi0", "model_response", "summaries", "info"}, "numeric"),  # numeric comes first
        ({"summaries", "info", "worker"}, "summarize"),
        ({"summaries", "model_response"}, "prism"),  # summarize needs both of its keys
        ({"summaries", "info", "model_response"}, "summarize"),
        ({"model_response", "user_id"}, "prism"),
        ({"prompt", "chosen"}, "trl"),
        (set(), "trl"),
    ],
)
def test_detection_by_keys_in_table_order(keys, expected):
    assert detect_by_keys(keys).name == expected
    assert detect_format([dict.fromkeys(keys, 0)]) == expected


def test_detection_by_suffix_before_rows(tmp_path):
    path = tmp_path / "rows.npz"
    path.write_bytes(b"")  # not read: the suffix decides
    assert detect_format(path) == "numeric" == detect_format(str(path).upper())
    with pytest.raises(DataValidationError, match="cannot tell the format"):
        detect_format(["not a mapping"])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_reader_accepts_exactly_the_column_keywords_of_its_format(fmt):
    spec = FORMATS[fmt]
    defaults = Columns.of(fmt)
    assert defaults.names == dict(spec.columns) and defaults.mapped() == {}
    params = inspect.signature(
        getattr(__import__(spec.reader.split(":")[0], fromlist=["x"]), spec.reader.split(":")[1])
    ).parameters
    for key, keyword in COLUMN_KEYWORDS.items():
        if key in spec.columns:
            assert Columns.of(fmt, **{keyword: "elsewhere"})[key] == "elsewhere"
        else:
            with pytest.raises(DataValidationError, match=f"does not apply to {fmt} rows"):
                Columns.of(fmt, **{keyword: "elsewhere"})
        # a reader either names the keyword or passes it on to Columns.of (**columns)
        assert keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def test_json_columns_follow_the_column_mapping():
    assert Columns.of("trl").json_columns() == ("user_context",)
    assert Columns.of("trl", context_column="ctx").json_columns() == ("ctx",)
    assert Columns.of("numeric", context_column="c").json_columns() == ("c", "phi0", "phi1", "y")
    assert Columns.of("prism").json_columns() == ("turn", "if_chosen", "score")


def test_the_table_kind_is_what_the_reader_returns(tmp_path):
    survey = FIXTURES / "prism_survey.jsonl"
    sources = {
        "numeric": [NUMERIC, {**NUMERIC, "y": 0}],
        "trl": [TRL],
        "summarize": FIXTURES / "summarize_from_feedback.jsonl",
        "prism": FIXTURES / "prism_utterances.jsonl",
    }
    for name, spec in FORMATS.items():
        args = (survey, sources[name]) if spec.survey else (sources[name],)
        out = spec.read(*args)
        assert isinstance(out, TextPreferences if spec.kind == "text" else PreferenceData)
        if spec.kind == "text":
            again = read_text_preferences(sources[name], format=name, survey=survey)
            assert again.prompts == out.prompts and np.array_equal(again.users, out.users)
        else:
            with pytest.raises(DataValidationError, match="not a text preference format"):
                read_text_preferences(sources[name], format=name)
        n, errors = validate_file(sources[name], format=name, survey=survey)
        assert (n, errors) == (len(out.y) if spec.kind == "numeric" else out.n, [])


def test_unknown_formats_are_refused_naming_the_table():
    with pytest.raises(DataValidationError) as info:
        validate_file([TRL], format="csv")
    assert str(info.value) == "field 'format': unknown format 'csv'; valid: " + ", ".join(FORMATS)
    with pytest.raises(DataValidationError) as info:
        read_text_preferences([TRL], format=["trl"])  # not even a string
    assert str(info.value) == (
        "<list>: not a text preference format: ['trl'] (valid: trl, summarize, prism)"
    )


def test_prism_without_a_survey_checks_the_utterances_alone():
    rows = [json.loads(line) for line in (FIXTURES / "prism_utterances.jsonl").open()]
    n, errors = validate_file(rows, format="prism")
    assert errors == [] and n > 0
    with pytest.raises(DataValidationError, match="need the survey file"):
        read_text_preferences(rows, format="prism")
