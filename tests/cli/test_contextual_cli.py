"""`pluralign fit --model contextual` and `pluralign rank --context`: a user the data never had,
scored from their context."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.data import save_preferences
from pluralign.envs import MultiUser
from pluralign.rewards import Contextual
from pluralign.rewards.persistence import load_model


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def numeric(tmp_path_factory):
    """Numeric pairs of 12 users with 3-d vector contexts, and candidate sets."""
    folder = tmp_path_factory.mktemp("contextual_cli")
    env = MultiUser(n_users=12, d_phi=5, rank=2, n_per_user=40, seed=4, d_context=3)
    path = save_preferences(env.sample_offline(seed=[1]), folder / "prefs.jsonl")
    candidates = folder / "candidates.jsonl"
    rng = np.random.default_rng(3)
    phis = [rng.standard_normal((n, 5)) for n in (4, 6)]
    candidates.write_text("".join(json.dumps({"phi": p.tolist()}) + "\n" for p in phis))
    out = folder / "model"
    result = invoke("fit", path, "--model", "contextual", "--rank", "2", "--out", out)
    assert result.exit_code == 0, result.output
    return folder, path, candidates, phis, out, env


def test_fit_contextual_saves_a_contextual_model_with_its_context_schema(numeric):
    _, _, _, _, out, env = numeric
    model, meta, designs = load_model(out)
    assert isinstance(model, Contextual) and model.rank == 2 and designs
    assert meta["features"]["context"] == {
        "kind": "vector",
        "names": ["x0", "x1", "x2"],
        "numeric": ["x0", "x1", "x2"],
    }
    np.testing.assert_array_equal(model.contexts_, env.contexts)
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["model"] == "contextual" and summary["rank"] == 2 and summary["d_x"] == 3


def test_rank_scores_a_new_user_from_their_context_as_the_model_does_in_python(numeric):
    _, _, candidates, phis, out, _ = numeric
    context = [0.3, -1.2, 2.0]
    result = invoke("rank", out, candidates, "--user", "77", "--context", json.dumps(context))
    assert result.exit_code == 0, result.output
    model, _, _ = load_model(out)
    theta = model.context_theta(np.array(context))[0]
    for record, phi in zip(records(result), phis, strict=True):
        np.testing.assert_allclose(record["reward"], phi @ theta, rtol=1e-12)
        assert record["best"] == int(np.argmax(phi @ theta))
        assert record["from_context"] is True and record["unknown_user"] is False
    assert "user 77 is not in" in flat(result.stderr) and "--context" in result.stderr


def test_a_new_id_with_a_known_users_context_ranks_exactly_as_that_user(numeric):
    _, _, candidates, _, out, env = numeric
    known = invoke("rank", out, candidates, "--user", "5")
    assert known.exit_code == 0, known.output
    twin = invoke(
        "rank", out, candidates, "--user", "505", "--context", json.dumps(env.contexts[5].tolist())
    )
    assert twin.exit_code == 0, twin.output
    for a, b in zip(records(known), records(twin), strict=True):
        np.testing.assert_allclose(b["reward"], a["reward"], rtol=1e-12)
        assert a["from_context"] is False and b["from_context"] is True
    # a known user may restate their own context, not another one
    same = invoke(
        "rank", out, candidates, "--user", "5", "--context", json.dumps(env.contexts[5].tolist())
    )
    assert same.exit_code == 0 and records(same)[0]["reward"] == records(known)[0]["reward"]
    other = invoke("rank", out, candidates, "--user", "5", "--context", "[0, 0, 0]")
    assert other.exit_code == 2
    assert "user 5 is known to" in flat(other.stderr) and "another context" in other.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--user", "77"], "Give --context JSON (the context of 77)"),
        (["--user", "77", "--context", "[1, 2"], "--context: not JSON"),
        (["--user", "77", "--context", "[1, 2]"], "has 2 numbers; the model's contexts have 3"),
        (["--user", "77", "--context", '{"a": 1}'], "must be a list of 3 numbers"),
        (
            ["--user", "77", "--context", "[1, 2, 3]", "--pessimism", "1"],
            "a user scored from --context has none",
        ),
    ],
)
def test_rank_context_errors_say_what_to_give(numeric, args, message):
    _, _, candidates, _, out, _ = numeric
    result = invoke("rank", out, candidates, *args)
    assert result.exit_code == 2
    assert message in flat(result.stderr)


def test_adapt_and_context_flags_are_refused_where_they_do_not_apply(numeric, tmp_path):
    folder, path, candidates, _, out, _ = numeric
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(path.read_text().splitlines()[0] + "\n")
    result = invoke("rank", out, candidates, "--user", "77", "--adapt", pairs)
    assert result.exit_code == 2 and "give --context JSON instead of --adapt" in flat(result.stderr)
    shared = folder / "shared"
    assert invoke("fit", path, "--rank", "2", "--out", shared).exit_code == 0
    result = invoke("rank", shared, candidates, "--user", "77", "--context", "[1, 2, 3]")
    assert result.exit_code == 2
    assert "--context applies to a contextual model" in flat(result.stderr)


def test_fit_contextual_without_contexts_and_bad_k_name_the_flag(tmp_path):
    env = MultiUser(n_users=4, d_phi=5, rank=2, n_per_user=20, seed=0)
    path = save_preferences(env.sample_offline(seed=[1]), tmp_path / "plain.jsonl")
    result = invoke("fit", path, "--model", "contextual", "--out", tmp_path / "m")
    assert result.exit_code == 2
    assert "--model contextual needs user contexts" in flat(result.stderr)
    assert not (tmp_path / "m").exists()
    result = invoke("fit", path, "--rank", "9", "--out", tmp_path / "m")
    assert result.exit_code == 2
    assert "--rank: must be an integer in [1, min(n_users, d_phi)] = [1, 4]" in flat(result.stderr)
    assert "field 'rank'" not in result.stderr


def test_contextual_on_text_rows_with_attribute_contexts(tmp_path):
    assert invoke("example-data", tmp_path).exit_code == 0
    out = tmp_path / "model"
    result = invoke(
        "fit", tmp_path / "prefs.jsonl", "--model", "contextual", "--rank", "2", "--out", out
    )
    assert result.exit_code == 0, result.output
    _, meta, _ = load_model(out)
    schema = meta["features"]["context"]
    assert schema["kind"] == "attributes" and schema["numeric"] == []
    assert "region=Asia" in schema["names"]
    cands = tmp_path / "candidates.jsonl"
    chen = invoke("rank", out, cands, "--user", "chen")
    # chen's attributes under a new id: the same reward, through the attribute encoding
    twin = invoke(
        "rank", out, cands, "--user", "zoe", "--context", '{"region": "Asia", "age": "18-24"}'
    )
    assert chen.exit_code == 0 and twin.exit_code == 0, twin.output
    for a, b in zip(records(chen), records(twin), strict=True):
        np.testing.assert_allclose(b["reward"], a["reward"], rtol=1e-9)
        assert a["response"] == b["response"]
    bad = invoke(
        "rank", out, cands, "--user", "zoe", "--context", '{"region": "Mars", "age": "18-24"}'
    )
    assert bad.exit_code == 2
    assert (
        "field '--context.region': value 'Mars' was not seen in training; known values: "
        "'Americas', 'Asia', 'Europe'"
    ) in flat(bad.stderr)


def test_rank_pessimism_for_a_training_user_uses_their_own_design(numeric):
    """The pointwise LCB θ̂_uᵀφ − β‖Aᵀ(φ − φ̄)‖_{M_u⁻¹}, with M_u = (1/n_u) Σ zzᵀ + λ_u I over
    the user's own n_u training comparisons (z = AᵀΔφ, A = span{θ̂0, R̂}), recomputed here."""
    from pluralign.data import load_preferences
    from pluralign.data.split import per_user_test_mask

    _, path, candidates, phis, out, _ = numeric
    model, meta, _ = load_model(out)
    data = load_preferences(path)
    train = data.subset(~per_user_test_mask(data.users, meta["test_size"], meta["seed"]))
    beta, user = 0.8, 7
    view = model.user_model(user)
    rows = train.subset(train.users == user)
    dz = rows.delta_phi @ view.basis
    m = dz.T @ dz / rows.n + view.l2 * np.eye(view.basis.shape[1])
    result = invoke("rank", out, candidates, "--user", str(user), "--pessimism", str(beta))
    assert result.exit_code == 0, result.output
    for record, phi in zip(records(result), phis, strict=True):
        z = (phi - phi.mean(axis=0)) @ view.basis
        lcb = phi @ view.theta_ - beta * np.sqrt(np.einsum("kp,pq,kq->k", z, np.linalg.inv(m), z))
        np.testing.assert_allclose(record["lcb"], lcb, rtol=1e-6)
        assert record["best"] == int(np.argmax(lcb))
