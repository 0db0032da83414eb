"""`pluralign rank --adapt` (new users from a few pairs) and the shared fallback's marking."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.data import load_preferences, save_preferences
from pluralign.envs import MultiUser
from pluralign.rewards.persistence import load_model


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def numeric(tmp_path_factory):
    """Training pairs of users 0..3, and 10 pairs of a new user 9 (drawn as another user 4)."""
    folder = tmp_path_factory.mktemp("rank_adapt")
    env = MultiUser(n_users=5, d_phi=5, rank=2, diversity=1.0, n_per_user=40, seed=1)
    rows = [
        json.loads(line)
        for line in save_preferences(env.sample_offline(seed=[1]), folder / "all.jsonl")
        .read_text()
        .splitlines()
    ]
    train = folder / "prefs.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows if r["user"] != 4))
    new = [dict(r, user=9) for r in rows if r["user"] == 4][:10]
    adapt = folder / "adapt9.jsonl"
    adapt.write_text("".join(json.dumps(r) + "\n" for r in new))
    candidates = folder / "candidates.jsonl"
    rng = np.random.default_rng(3)
    phis = [rng.standard_normal((n, 5)) for n in (4, 7, 3)]
    candidates.write_text("".join(json.dumps({"phi": p.tolist()}) + "\n" for p in phis))
    return folder, train, adapt, new, candidates, phis


def _fit(folder, train, model, *extra):
    out = folder / "-".join([model, *extra]).replace("--", "")
    if not out.exists():
        result = invoke("fit", train, "--model", model, "--rank", "2", "--out", out, *extra)
        assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("model", ["shared_basis", "per_user"])
def test_rank_adapt_equals_adapt_user_in_python(numeric, model):
    folder, train, adapt, _, candidates, phis = numeric
    out = _fit(folder, train, model)
    result = invoke("rank", out, candidates, "--user", "9", "--adapt", adapt)
    assert result.exit_code == 0, result.output
    got = records(result)
    # the oracle: the saved model, adapted in Python, scoring the candidates directly
    oracle, _, _ = load_model(out)
    oracle.adapt_user(load_preferences(adapt))
    theta = oracle.user_theta(9)[0]
    assert not np.allclose(theta, oracle.theta0_)  # adapting is not the θ0 fallback
    assert [r["line"] for r in got] == [1, 2, 3]
    for record, phi in zip(got, phis, strict=True):
        np.testing.assert_allclose(record["reward"], phi @ theta, rtol=1e-9, atol=1e-12)
        assert record["best"] == int(np.argmax(phi @ theta))
        assert record["user"] == 9 and record["unknown_user"] is False
    assert "warning" not in result.stderr
    # rank does not write the adapted user into the model folder
    assert load_model(out)[1]["users"] == [0, 1, 2, 3]


def test_rank_adapt_refuses_rows_of_another_user_naming_the_row(numeric, tmp_path):
    folder, train, _, new, candidates, _ = numeric
    out = _fit(folder, train, "shared_basis")
    mixed = tmp_path / "mixed.jsonl"
    rows = [*new[:3], dict(new[3], user=1), *new[4:]]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("rank", out, candidates, "--user", "9", "--adapt", mixed)
    assert result.exit_code == 2 and result.stdout == ""
    text = " ".join(result.stderr.split())
    assert f"{mixed}, line 4, field 'user'" in text and "user 1, not of --user 9" in text
    # an already known user is refused too (adapt_user fits new users only)
    result = invoke("rank", out, candidates, "--user", "0", "--adapt", mixed)
    assert result.exit_code == 2 and "already known" in result.stderr


def test_unknown_user_error_points_at_the_cli_options(numeric):
    folder, train, _, _, candidates, _ = numeric
    out = _fit(folder, train, "shared_basis")
    result = invoke("rank", out, candidates, "--user", "42")
    assert result.exit_code == 2 and result.stdout == ""
    text = " ".join(result.stderr.split())
    assert "unknown user 42" in text and "known users: 0, 1, 2, 3" in text
    assert "--adapt PAIRS.jsonl" in text and "--unknown-user shared" in text
    assert "adapt_user(data)" not in text and "unknown_user='shared'" not in text


def test_shared_fallback_marks_unknown_users_and_warns(numeric):
    folder, train, _, _, candidates, phis = numeric
    out = _fit(folder, train, "shared_basis", "--unknown-user", "shared")
    model, _, _ = load_model(out)
    result = invoke("rank", out, candidates, "--user", "42")
    assert result.exit_code == 0, result.output
    got = records(result)  # stdout holds only the JSON lines
    assert len(got) == 3
    for record, phi in zip(got, phis, strict=True):
        assert record["unknown_user"] is True and record["user"] == 42
        np.testing.assert_allclose(record["reward"], phi @ model.theta0_, rtol=1e-9, atol=1e-12)
        assert record["best"] == int(np.argmax(phi @ model.theta0_))
    warning = " ".join(result.stderr.split())
    assert "warning: user 42 is not in" in warning and "--adapt PAIRS.jsonl" in warning

    result = invoke("rank", out, candidates, "--user", "3")
    assert result.exit_code == 0, result.output
    got = records(result)
    assert all(r["unknown_user"] is False for r in got)
    np.testing.assert_allclose(got[0]["reward"], phis[0] @ model.user_theta(3)[0], rtol=1e-9)
    assert "warning" not in result.stderr


def test_rank_adapt_on_text_data(tmp_path):
    assert invoke("example-data", tmp_path).exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows if r["user_id"] != "fay"))
    new = [dict(r, user_id="zoe") for r in rows if r["user_id"] == "fay"][:8]
    adapt = tmp_path / "zoe.jsonl"
    adapt.write_text("".join(json.dumps(r) + "\n" for r in new))
    out = tmp_path / "model"
    assert invoke("fit", train, "--rank", "2", "--out", out).exit_code == 0
    result = invoke("rank", out, tmp_path / "candidates.jsonl", "--user", "zoe", "--adapt", adapt)
    assert result.exit_code == 0, result.output
    got = records(result)
    # oracle: adapt in Python on the same pairs, encoded as the model's training rows were
    from pluralign.data.loaders import read_text_preferences
    from pluralign.features import TextEncoder

    model, meta, _ = load_model(out)
    enc = meta["features"]["encoder"]
    encoder = TextEncoder(
        enc["model"], mode=enc["mode"], template=enc["template"], normalize=enc["normalize"]
    )
    prefs = dataclasses.replace(read_text_preferences(adapt), template=meta["features"]["template"])
    model.adapt_user(prefs.to_preference_data(encoder, seed=5))  # orientation: same likelihood
    theta = model.user_theta("zoe")[0]
    cands = [json.loads(line) for line in (tmp_path / "candidates.jsonl").read_text().splitlines()]
    for record, cand in zip(got, cands, strict=True):
        phi = encoder.features(
            [cand["prompt"]] * len(cand["responses"]),
            cand["responses"],
            template=meta["features"]["template"],
        )
        np.testing.assert_allclose(record["reward"], phi @ theta, rtol=1e-6, atol=1e-9)
        assert record["unknown_user"] is False
        assert record["response"] == cand["responses"][int(np.argmax(phi @ theta))]

    new[5]["user_id"] = "ben"
    adapt.write_text("".join(json.dumps(r) + "\n" for r in new))
    result = invoke("rank", out, tmp_path / "candidates.jsonl", "--user", "zoe", "--adapt", adapt)
    assert result.exit_code == 2
    assert "line 6, field 'user_id'" in " ".join(result.stderr.split())
    assert "'ben', not of --user 'zoe'" in " ".join(result.stderr.split())
