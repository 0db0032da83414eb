"""Regression tests of issue 10 at the data boundary: every malformed file gets pluralign's own
error naming file, line and field; clearly bad data is refused instead of accepted silently;
what pluralign writes is readable by others."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

from pluralign._atomic import atomic_write_text
from pluralign._parse import parse_yaml
from pluralign.cli import app
from pluralign.configfile import load_config
from pluralign.data import PreferenceData, load_preferences, read_prism, read_trl
from pluralign.data.loaders import read_summarize_from_feedback
from pluralign.errors import ConfigError, DataValidationError

ROW = {"x": [0.5, -1.0], "phi0": [1.0, 0.0, 2.0], "phi1": [0.0, 1.0, -1.0], "y": 1, "user": "a"}
TRL = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "user_id": "u1"}


def lines(path, *texts: str | bytes):
    path.write_bytes(b"\n".join(t if isinstance(t, bytes) else t.encode() for t in texts) + b"\n")
    return path


def refused(call, *args, **kwargs) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        call(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------------ numbers and bytes
@pytest.mark.parametrize(
    ("raw", "line"),
    [
        (b'{"x": [0.5, -1.0], "phi0": [1.0, 0.0, 2.0], "phi1": [0.0, 1.0, \xff], "y": 1}', 2),
        (json.dumps(ROW).encode()[:-1] + b', "note": "caf\xc3"}', 2),
    ],
)
def test_invalid_utf8_names_the_line(tmp_path, raw, line):
    path = lines(tmp_path / "p.jsonl", json.dumps(ROW), raw)
    err = refused(load_preferences, path)
    assert (err.path, err.line) == (str(path), line) and "UTF-8" in str(err)
    err = refused(read_trl, lines(tmp_path / "t.jsonl", json.dumps(TRL), raw))
    assert err.line == line and "UTF-8" in str(err)


@pytest.mark.parametrize("number", ["1e999999", "-1e999999", "9" * 400, "9" * 5000, "NaN"])
def test_numbers_that_overflow_a_float_are_refused_naming_the_field(tmp_path, number):
    text = json.dumps(ROW).replace("2.0]", f"{number}]")
    path = lines(tmp_path / "p.jsonl", json.dumps(ROW), text)
    err = refused(load_preferences, path)
    assert (err.line, err.field) == (2, "phi0")
    trl = json.dumps({**TRL, "user_context": [1.0, 2.0]}).replace("2.0]", f"{number}]")
    err = refused(read_trl, lines(tmp_path / "t.jsonl", trl))
    assert (err.line, err.field) == (1, "user_context")


def test_in_memory_huge_integers_are_refused_not_overflowing():
    rows = [{**TRL, "user_context": {"score": 10**400}}]
    err = refused(read_trl, rows)
    assert err.field == "user_context.score" and "too large" in str(err)


def test_deep_nesting_is_refused_quickly_in_json_and_yaml(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    path = lines(tmp_path / "p.jsonl", json.dumps({**ROW, "phi0": "@"}).replace('"@"', deep))
    assert "nested" in str(refused(load_preferences, path))
    config = tmp_path / "c.yaml"
    config.write_text("experiment: loco\nenv: " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(ConfigError, match="nested more than"):
        load_config(config)
    rows = [{**TRL, "user_context": {}}]
    inner: dict = rows[0]["user_context"]
    for _ in range(500):
        inner["a"] = {}
        inner = inner["a"]
    assert "nested" in str(refused(read_trl, rows))


def test_duplicate_keys_are_named_in_json_rows_and_yaml(tmp_path):
    path = lines(tmp_path / "p.jsonl", json.dumps(ROW)[:-1] + ', "y": 0}')
    err = refused(load_preferences, path)
    assert (err.line, err.field) == (1, "y") and "duplicate key" in str(err)
    with pytest.raises(ConfigError, match=r"duplicate key 'repeats' \(line 3\)"):
        parse_yaml("experiment: loco\nrepeats: 2\nrepeats: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'l2'"):
        parse_yaml("options: {l2: 1, l2: 2}\n")


def test_lone_surrogates_and_unsafe_yaml_tags_are_refused(tmp_path):
    path = lines(tmp_path / "t.jsonl", json.dumps({**TRL, "prompt": "\ud800"}))
    assert "surrogate" in str(refused(read_trl, path))
    with pytest.raises(ConfigError, match="constructor"):
        parse_yaml("experiment: !!python/object/apply:os.system [echo hi]\n")


def test_a_folder_named_like_the_file_is_refused(tmp_path):
    for name in ("p.jsonl", "p.npz", "p.parquet"):
        (tmp_path / name).mkdir()
    assert "not a regular file" in str(refused(load_preferences, tmp_path / "p.jsonl"))
    assert "not a regular file" in str(refused(load_preferences, tmp_path / "p.npz"))
    assert "not a regular file" in str(refused(read_trl, tmp_path / "p.parquet"))
    (tmp_path / "c.yaml").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path / "c.yaml")


# --------------------------------------------------------------------------------- npz
def npz(path, **arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return path


GOOD = {"phi0": np.eye(3), "phi1": np.zeros((3, 3)), "y": np.array([1, 0, 1])}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "not a readable .npz"),
        (lambda b: b"garbage" * 10, "not a readable .npz"),
        (lambda b: b"", "not a readable .npz"),
    ],
)
def test_truncated_or_garbage_npz_is_a_clean_error(tmp_path, damage, message):
    good = npz(tmp_path / "g.npz", **GOOD).read_bytes()
    path = tmp_path / "p.npz"
    path.write_bytes(damage(good))
    assert message in str(refused(load_preferences, path))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("phi0", np.zeros((3, 0)), "no columns"),
        ("phi0", np.full((3, 3), 1 + 2j), "dtype complex"),
        ("phi1", np.array([["2020-01-01"] * 3] * 3, dtype="datetime64[D]"), "dtype datetime"),
        ("users", np.array([b"a", b"b", b"c"]), "dtype |S1"),
        ("y", np.array([{"a": 1}, 2, 3], dtype=object), "dtype object"),
        ("extra", np.ones(3), "unknown array"),
        ("phi1", np.full((3, 3), -1e308), "overflows"),
    ],
)
def test_npz_values_pluralign_never_writes_are_refused(tmp_path, field, value, message):
    arrays = {**GOOD, "phi0": np.full((3, 3), 1e308) if message == "overflows" else GOOD["phi0"]}
    arrays[field] = value
    err = refused(load_preferences, npz(tmp_path / "p.npz", **arrays))
    assert err.field == field and message in str(err)


def test_npz_header_promising_a_huge_array_is_refused_before_reading(tmp_path):
    path = tmp_path / "p.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 40, 3)}
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("phi0.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:])
    err = refused(load_preferences, path)
    assert err.field == "phi0" and "larger than" in str(err)


# ------------------------------------------------------------------------------- users
def test_user_ids_mixing_integers_and_strings_are_refused_everywhere(tmp_path):
    path = lines(
        tmp_path / "p.jsonl", json.dumps({**ROW, "user": "7"}), json.dumps({**ROW, "user": 7})
    )
    err = refused(load_preferences, path)
    assert (err.line, err.field) == (2, "user") and "line 1" in str(err)
    err = refused(read_trl, [{**TRL, "user_id": 7}, {**TRL, "user_id": "7"}])
    assert (err.line, err.field) == (2, "user_id")
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((2, 3))
    err = refused(PreferenceData, None, phi, phi[::-1], [1, 0], ["7", 7])
    assert (err.field, err.row) == ("users", 1)
    # one kind is fine, including numpy integers
    assert PreferenceData(None, phi, phi[::-1], [1, 0], [np.int64(7), 8]).users.dtype == np.int64


@pytest.mark.parametrize("user", ["", "   "])
def test_empty_user_ids_are_refused_by_the_numeric_loader(tmp_path, user):
    path = lines(tmp_path / "p.jsonl", json.dumps(ROW), json.dumps({**ROW, "user": user}))
    err = refused(load_preferences, path)
    assert (err.line, err.field) == (2, "user")
    err = refused(PreferenceData, None, np.eye(2), np.zeros((2, 2)), [1, 0], ["a", user])
    assert (err.field, err.row) == ("users", 1)


def test_finite_features_whose_difference_overflows_are_refused(tmp_path):
    path = lines(
        tmp_path / "p.jsonl", json.dumps({**ROW, "phi0": [1e308, 0, 0], "phi1": [-1e308, 0, 0]})
    )
    err = refused(load_preferences, path)
    assert err.field == "phi1" and "overflows" in str(err)


# ---------------------------------------------------------------------------- text rows
def test_user_context_keys_colliding_after_flattening_are_refused():
    err = refused(read_trl, [{**TRL, "user_context": {"a.b": 1, "a": {"b": 2}}}])
    assert err.field == "a.b" and "flatten" in str(err)
    err = refused(
        read_trl,
        [
            {**TRL, "user_id": "u1", "user_context": {"a": "b=c"}},
            {**TRL, "user_id": "u2", "user_context": {"a=b": "c"}},
        ],
    )
    assert "one-hot column 'a=b=c'" in str(err)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": "hi"}, {"role": " ", "content": "x"}],
    ],
)
def test_empty_conversational_messages_are_refused(messages):
    err = refused(read_trl, [{**TRL, "chosen": messages}])
    assert err.field == "chosen" and "empty" in str(err)


def test_summarize_choice_must_be_an_integer(tmp_path):
    from pathlib import Path

    row = json.loads(
        Path(__file__)
        .parents[1]
        .joinpath("fixtures/summarize_from_feedback.jsonl")
        .read_text()
        .splitlines()[0]
    )
    assert read_summarize_from_feedback([row]).n == 1
    err = refused(read_summarize_from_feedback, [{**row, "choice": 1.0}])
    assert err.field == "choice"


def test_prism_conversation_id_must_be_a_string_or_integer(tmp_path):
    from pathlib import Path

    fixtures = Path(__file__).parents[1] / "fixtures"
    rows = [json.loads(t) for t in (fixtures / "prism_utterances.jsonl").read_text().splitlines()]
    rows[0]["conversation_id"] = ["c", 1]
    pairs = lines(tmp_path / "pairs.jsonl", *map(json.dumps, rows))
    err = refused(read_prism, fixtures / "prism_survey.jsonl", pairs)
    assert (err.line, err.field) == (1, "conversation_id")


# ------------------------------------------------------------------------- data validate
def test_data_validate_exit_1_for_bad_rows_and_2_for_an_unreadable_file(tmp_path):
    runner = CliRunner()
    bad_rows = lines(
        tmp_path / "t.jsonl", json.dumps(TRL), b"\xff", json.dumps({**TRL, "chosen": ""})
    )
    result = runner.invoke(app, ["data", "validate", str(bad_rows)])
    assert result.exit_code == 1 and "2 bad row(s)" in result.output
    assert "line 2: not valid UTF-8" in result.output and "line 3, field 'chosen'" in result.output
    numeric = lines(tmp_path / "p.jsonl", json.dumps(ROW), json.dumps({**ROW, "y": 3}))
    assert runner.invoke(app, ["data", "validate", str(numeric)]).exit_code == 1
    bad_npz = npz(tmp_path / "z.npz", **{**GOOD, "phi0": np.zeros((3, 0))})
    assert runner.invoke(app, ["data", "validate", str(bad_npz)]).exit_code == 1
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip")
    (tmp_path / "d.jsonl").mkdir()
    for path in (garbage, tmp_path / "d.jsonl", tmp_path / "missing.jsonl"):
        result = runner.invoke(app, ["data", "validate", str(path)])
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


# ------------------------------------------------------------------------- saved models
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from pluralign.personalize import design_matrices
    from pluralign.rewards import SharedBasis
    from pluralign.rewards.persistence import save_model

    rng = np.random.default_rng(1)
    phi0, phi1 = rng.standard_normal((60, 3)), rng.standard_normal((60, 3))
    data = PreferenceData(
        None, phi0, phi1, (rng.random(60) < 0.5).astype(int), np.array(["a", "b", "c"] * 20)
    )
    model = SharedBasis(1, 1e-2).fit(data)
    folder = tmp_path_factory.mktemp("model")
    save_model(
        model,
        folder,
        designs=design_matrices(model, data),
        metadata={"features": {"kind": "numeric", "format": "numeric"}},
    )
    return folder


def copy_with(src, dst, name, data):
    import shutil

    shutil.copytree(src, dst)
    (dst / name).write_bytes(data)
    return dst


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: [m], None),
        (lambda m: {**m, "extra": 1}, "extra"),
        (lambda m: {k: v for k, v in m.items() if k != "users"}, "users"),
        (lambda m: {**m, "users": ["a", "a", "c"]}, "users"),
        (lambda m: {**m, "users": ["a", 7, "c"]}, "users"),
        (lambda m: {**m, "class": ["SharedBasis"]}, "class"),
        (lambda m: {**m, "params": {**m["params"], "rank": "2"}}, "params.rank"),
        (lambda m: {**m, "params": {**m["params"], "evil": 1}}, "params.evil"),
        (
            lambda m: {**m, "params": {**m["params"], "unknown_user": "sometimes"}},
            "params.unknown_user",
        ),
        (lambda m: {**m, "d_phi": 4}, "theta0"),
        (lambda m: {**m, "has_design": False}, "design"),
        (
            lambda m: {**m, "features": {"kind": "text", "encoder": {"model": None}}},
            "features.encoder.model_key",
        ),
    ],
)
def test_a_bad_model_json_names_the_field(model_dir, tmp_path, edit, field):
    from pluralign.rewards.persistence import load_model

    meta = json.loads((model_dir / "model.json").read_text())
    folder = copy_with(model_dir, tmp_path / "m", "model.json", json.dumps(edit(meta)).encode())
    err = refused(load_model, folder)
    assert err.field == field, str(err)


@pytest.mark.parametrize(
    ("key", "value"),
    [("thetas", "nan"), ("basis", "inf"), ("user_counts", "neg"), ("design_index", "big")],
)
def test_nan_parameters_or_bad_arrays_in_a_saved_model_are_refused(model_dir, tmp_path, key, value):
    from pluralign.rewards.persistence import load_model

    with np.load(model_dir / "model.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arr = arrays[key].copy()
    if value in ("nan", "inf"):
        arr.flat[0] = np.nan if value == "nan" else np.inf
    elif value == "neg":
        arr[0] = -1
    else:
        arr[0] = 99
    arrays[key] = arr
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    folder = copy_with(model_dir, tmp_path / "m", "model.npz", buffer.getvalue())
    assert refused(load_model, folder).field == key


def test_a_saved_model_round_trips_and_rank_refuses_a_broken_one(model_dir, tmp_path):
    from pluralign.rewards.persistence import load_model

    model, meta, designs = load_model(model_dir)
    assert set(designs) == {"design", "design_index", "design_lam", "design_n"}
    candidates = tmp_path / "c.jsonl"
    candidates.write_text(json.dumps({"phi": [[1, 0, 0], [0, 1, 0]]}) + "\n")
    ok = CliRunner().invoke(app, ["rank", str(model_dir), str(candidates), "--user", "a"])
    assert ok.exit_code == 0, ok.output
    reward = json.loads(ok.output)["reward"]
    np.testing.assert_allclose(reward, model.user_theta("a")[0][:2])
    meta["params"]["rank"] = None
    broken = copy_with(model_dir, tmp_path / "m", "model.json", json.dumps(meta).encode())
    result = CliRunner().invoke(app, ["rank", str(broken), str(candidates), "--user", "a"])
    assert result.exit_code == 2 and "params.rank" in result.output


# --------------------------------------------------------------------------- permissions
def test_atomic_writes_get_normal_permissions_under_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        path = atomic_write_text(tmp_path / "b.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "template",
    [
        "{prompt.__class__}{response}",
        "{0}{response}",
        "{response:>999999999}",
        "{response!r}",
        "{x}{response}",
        "{prompt}",
        "{response",
        7,
    ],
)
def test_templates_may_only_use_plain_prompt_and_response_fields(template):
    from pluralign.features.text import check_template

    with pytest.raises(DataValidationError):
        check_template(template, require=("response",))
    assert check_template("SUBREDDIT {prompt} {{literal}} {response}", require=("response",))


def test_a_model_json_template_cannot_read_attributes(model_dir, tmp_path):
    from pluralign.rewards.persistence import load_model

    meta = json.loads((model_dir / "model.json").read_text())
    meta["features"] = {
        "kind": "text",
        "template": "{prompt.__init__.__globals__}{response}",
        "encoder": {
            "model": None,
            "model_key": "k",
            "mode": "joint",
            "template": "{prompt}\n\n{response}",
            "normalize": True,
            "dim": 3,
        },
    }
    folder = copy_with(model_dir, tmp_path / "m", "model.json", json.dumps(meta).encode())
    err = refused(load_model, folder)
    assert err.field == "features.template" and "only use the fields" in str(err)


def test_a_damaged_embedding_cache_is_a_clean_error(tmp_path):
    from pluralign.errors import PluralignError
    from pluralign.features import TextEncoder

    (tmp_path / "embeddings.sqlite").write_bytes(b"this is not an sqlite database" * 100)
    encoder = TextEncoder(cache_dir=tmp_path)
    with pytest.raises(PluralignError, match="embedding cache cannot be used"):
        encoder.encode(["hello"])


def test_a_numeric_attribute_missing_on_some_rows_is_refused_not_zero_filled():
    rows = [
        {**TRL, "user_id": "u1", "user_context": {"age": 30, "region": "n"}},
        {**TRL, "user_id": "u2", "user_context": {"region": "s"}},
    ]
    err = refused(read_trl, rows)
    assert (err.field, err.line) == ("user_context.age", 2) and "line 1" in str(err)
    err = refused(read_trl, [{**TRL, "user_context": {"age": {}, "region": "n"}}])
    assert err.field == "age" and "empty mapping" in str(err)
    # a categorical attribute may be absent: its one-hot columns are all zero
    rows[1]["user_context"] = {"age": 41}
    prefs = read_trl(rows)
    np.testing.assert_array_equal(prefs.contexts, [[30, 1], [41, 0]])
    assert prefs.context_names == ["age", "region=n"]


# ------------------------------------------- in-memory rows holding NumPy / pandas values
def test_in_memory_rows_with_array_values_are_refused_or_read_never_crash():
    """Found by the fuzzer (data.numpy_rows): values whose ``==`` has no truth value."""
    import pandas as pd

    for y in (np.array([1, 0]), np.array([0]), np.array([]), pd.Series([1, 0])):
        with pytest.raises(DataValidationError, match="must be 0 or 1") as info:
            load_preferences(
                [{"phi0": [1.0], "phi1": [0.0], "y": 1}, {"phi0": [1.0], "phi1": [0.0], "y": y}]
            )
        assert info.value.field == "y" and info.value.line == 2
    ok = load_preferences([{"phi0": [1.0], "phi1": [0.0], "y": np.int64(1)}])
    assert ok.y.tolist() == [1]
    post = {
        "info": {"post": "p", "title": "t", "subreddit": "s"},
        "summaries": [{"text": "a"}, {"text": "b"}],
        "choice": 0,
        "worker": "w",
    }
    rows = [
        dict(post, split="train"),
        dict(post, split=np.array(["train", "train"])),
        dict(post, split=pd.Series(["train"])),
    ]
    prefs = read_summarize_from_feedback(rows, splits=["train"])
    assert len(prefs) == 1 and prefs.skipped == 2  # a split that is not a name is not listed

    def message(content):
        return {"role": "user", "content": content, "tags": np.array(["a", "b"])}

    row = {
        "chosen": [message("Tea?"), {"role": "assistant", "content": "Yes."}],
        "rejected": [message("Tea?"), {"role": "assistant", "content": "No."}],
        "user_id": "u2",
    }
    with pytest.raises(DataValidationError, match="share no beginning"):
        read_trl([row])  # messages holding arrays cannot be compared: no implicit prompt
