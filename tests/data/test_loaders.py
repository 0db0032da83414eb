"""Text preference loaders: TRL-style, summarize_from_feedback, PRISM; `pluralign data validate`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.data import read_prism, read_summarize_from_feedback, read_trl, validate_file
from pluralign.errors import DataValidationError

FIXTURES = Path(__file__).parents[1] / "fixtures"


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "user_id": "u1"}


class HashEncoder:
    """A deterministic stand-in for TextEncoder: features from a hash of the text."""

    template = "{prompt}\n\n{response}"

    def features(self, prompts, responses, *, template=None):
        template = template or self.template
        out = []
        for p, r in zip(prompts, responses, strict=True):
            digest = hashlib.sha256(template.format(prompt=p, response=r).encode()).digest()
            out.append(np.frombuffer(digest[:16], dtype=np.uint8) / 255.0)
        return np.array(out)


def test_trl_rows_with_attribute_contexts_and_conversations(tmp_path):
    rows = [
        {**GOOD, "user_context": {"age": "18-24", "score": 2.0}},
        {
            "prompt": [{"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Bye."}],
            "user_id": "u2",
            "user_context": {"age": "35-44", "score": 1.0},
        },
        {**GOOD, "chosen": "Hey.", "user_context": {"age": "18-24", "score": 2.0}},
    ]
    prefs = read_trl(write_jsonl(tmp_path / "p.jsonl", rows))
    assert prefs.n == 3 and prefs.users.tolist() == ["u1", "u2", "u1"]
    assert prefs.prompts[1] == "user: Hi?" and prefs.chosen[1] == "assistant: Hello!"
    assert prefs.context_names == ["score", "age=18-24", "age=35-44"]
    np.testing.assert_array_equal(prefs.contexts, [[2, 1, 0], [1, 0, 1], [2, 1, 0]])
    assert prefs.where[2] == (str(tmp_path / "p.jsonl"), 3)
    # in-memory rows (e.g. a datasets.Dataset) read the same
    same = read_trl(rows)
    assert same.chosen == prefs.chosen and same.where[0] == ("<list>", 1)


def test_to_preference_data_orients_pairs_by_a_seeded_coin():
    prefs = read_trl([{**GOOD, "chosen": f"Hello {i}!"} for i in range(40)])
    enc = HashEncoder()
    data = prefs.to_preference_data(enc, seed=3)
    chosen = enc.features(prefs.prompts, prefs.chosen)
    np.testing.assert_allclose(np.where(data.y[:, None] == 1, data.phi1, data.phi0), chosen)
    assert 5 < data.y.sum() < 35  # both orientations occur
    fixed = prefs.to_preference_data(enc, orient="chosen_second")
    assert fixed.y.tolist() == [1] * 40
    np.testing.assert_allclose(fixed.phi1, chosen)


BAD_ROWS = [
    (GOOD, None),
    ({k: v for k, v in GOOD.items() if k != "chosen"}, "chosen"),
    ({**GOOD, "prompt": "   "}, "prompt"),
    ({**GOOD, "user_id": True}, "user_id"),
    ({**GOOD, "rejected": "Hello!"}, "rejected"),
    ("{not json", None),
    ({**GOOD, "chosen": [{"role": "assistant"}]}, "chosen"),
    ([1, 2], None),
]


def test_trl_reader_refuses_malformed_rows_naming_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_ROWS])
    with pytest.raises(DataValidationError) as info:
        read_trl(path)
    assert info.value.path == str(path) and info.value.line == 2
    assert info.value.field == "chosen"
    assert f"{path}, line 2, field 'chosen': missing" in str(info.value)

    prefs, errors = read_trl(path, errors="collect")
    assert prefs is None
    assert [(e.line, e.field) for e in errors] == [
        (i + 1, f) for i, (_, f) in enumerate(BAD_ROWS) if i > 0
    ]
    assert "invalid JSON" in str(errors[4]) and "line 6" in str(errors[4])


def test_user_contexts_must_be_consistent(tmp_path):
    rows = [
        {**GOOD, "user_context": [1.0, 2.0]},
        {**GOOD, "user_context": [1.0, 3.0]},  # same user, another context
        {**GOOD, "user_id": "u2", "user_context": [1.0]},  # wrong length
        {**GOOD, "user_id": "u3", "user_context": [float("nan"), 1.0]},
        {**GOOD, "user_id": "u4"},  # missing after present
    ]
    path = tmp_path / "ctx.jsonl"
    path.write_text("\n".join(json.dumps(r, allow_nan=True) for r in rows) + "\n")
    _, errors = read_trl(path, errors="collect")
    assert [(e.line, e.field) for e in errors] == [
        (2, "user_context"),
        (3, "user_context"),
        (4, "user_context"),
        (5, "user_context"),
    ]
    assert "differs from user 'u1'" in str(errors[0]) and "line 1" in str(errors[0])


def test_parquet_rows_are_read_and_bad_rows_named(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [GOOD, {**GOOD, "user_id": "u2", "chosen": ""}]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataValidationError, match=r"p.parquet, line 2, field 'chosen'"):
        read_trl(path)
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "user_id": "u2"}]), path)
    assert read_trl(path).users.tolist() == ["u1", "u2"]


def test_summarize_from_feedback_fixture():
    prefs = read_summarize_from_feedback(FIXTURES / "summarize_from_feedback.jsonl")
    assert prefs.n == 4 and prefs.skipped == 1  # the CNN/DM row has no post
    assert prefs.users.tolist() == ["w_alpha", "w_beta", "w_alpha", "w_gamma"]
    assert prefs.prompts[0].startswith("SUBREDDIT: r/Guitar\nTITLE: Struggling with barre")
    assert prefs.prompts[0].endswith("\nTL;DR:")
    assert prefs.chosen[1].startswith("Roommate keeps eating")  # choice = 1
    assert prefs.rejected[1] == "Roommate eats my food."
    assert prefs.template == "{prompt} {response}"
    with_articles = read_summarize_from_feedback(
        FIXTURES / "summarize_from_feedback.jsonl", include_articles=True, splits=["valid2"]
    )
    assert with_articles.n == 1 and with_articles.prompts[0].startswith("ARTICLE: The city")


def test_summarize_from_feedback_refuses_bad_rows(tmp_path):
    good = json.loads((FIXTURES / "summarize_from_feedback.jsonl").read_text().splitlines()[0])
    rows = [
        good,
        {**good, "choice": 2},
        {**good, "summaries": good["summaries"][:1]},
        {k: v for k, v in good.items() if k != "worker"},
        {**good, "info": {**good["info"], "title": None}},
    ]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    _, errors = read_summarize_from_feedback(path, errors="collect")
    assert [(e.line, e.field) for e in errors] == [
        (2, "choice"),
        (3, "summaries"),
        (4, "worker"),
        (5, "info.title"),
    ]


def test_prism_survey_and_utterances():
    prefs = read_prism(
        FIXTURES / "prism_survey.jsonl",
        FIXTURES / "prism_utterances.jsonl",
        attributes=["age", "gender", "location.reside_region", "education"],
    )
    # c1 turn 0: chosen vs 2 others; c1 turn 1: 1; c2: 1; c3: 3 → 7 pairs
    assert prefs.n == 7
    assert prefs.users.tolist().count("user3") == 3
    assert prefs.chosen[0] == "Try a quick vegetable stir-fry with rice."
    assert set(prefs.rejected[:2]) == {
        "I cannot help with that.",
        "Pasta with tomato sauce is always good.",
    }
    names = prefs.context_names
    assert "location.reside_region=Oceania" in names and "education=(missing)" in names
    row = prefs.users.tolist().index("user2")
    assert prefs.contexts[row, names.index("gender=Male")] == 1.0


def test_prism_errors_name_the_rows(tmp_path):
    utterances = (FIXTURES / "prism_utterances.jsonl").read_text().splitlines()
    bad = [json.loads(u) for u in utterances]
    bad[1]["if_chosen"] = True  # two chosen in c1 turn 0
    bad[5]["user_id"] = "stranger"
    bad[5]["conversation_id"] = "c9"
    bad[6]["conversation_id"] = "c9"
    bad[6]["user_id"] = "stranger"
    path = write_jsonl(tmp_path / "u.jsonl", bad)
    _, errors = read_prism(
        FIXTURES / "prism_survey.jsonl", path, attributes=["age"], errors="collect"
    )
    messages = [(e.line, e.field) for e in errors]
    assert (1, "if_chosen") in messages  # reported at the first chosen row of that turn
    assert (7, "user_id") in messages
    with pytest.raises(DataValidationError, match="missing survey attribute"):
        read_prism(
            FIXTURES / "prism_survey.jsonl",
            FIXTURES / "prism_utterances.jsonl",
            attributes=["shoe_size"],
        )


def test_validate_reports_every_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_ROWS])
    n, errors = validate_file(path)
    assert n == 0 and len(errors) == len(BAD_ROWS) - 1
    result = CliRunner().invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if "line" in line]
    assert len(lines) == len(BAD_ROWS) - 1
    assert any(f"{path}, line 4, field 'user_id'" in line for line in lines)
    ok = CliRunner().invoke(
        app, ["data", "validate", str(FIXTURES / "summarize_from_feedback.jsonl")]
    )
    assert ok.exit_code == 0 and "OK, 4 comparisons (summarize format)" in ok.output
    prism = CliRunner().invoke(
        app,
        [
            "data",
            "validate",
            str(FIXTURES / "prism_utterances.jsonl"),
            "--survey",
            str(FIXTURES / "prism_survey.jsonl"),
        ],
    )
    assert prism.exit_code == 0 and "OK, 7 comparisons" in prism.output
