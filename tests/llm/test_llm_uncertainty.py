"""Last-layer uncertainty of a personalized reward model (pluralign.llm.uncertainty), checked
against numpy: ``M = (1/N) Σ Δφ Δφᵀ + λI`` from the reward model's own features,
``‖d‖_{M⁻¹} = sqrt(dᵀ M⁻¹ d)`` by ``numpy.linalg.solve``, and the pessimism margins and
reference centers recomputed from features and seeded reference samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pluralign.confidence import ConfidenceSet
from pluralign.data.loaders import TextPreferences
from pluralign.errors import PluralignError
from pluralign.llm.policy import PersonalizedPolicy
from pluralign.llm.reward_model import PersonalizedRewardModel
from pluralign.llm.toy import char_tokenizer, tiny_llama
from pluralign.llm.uncertainty import (
    LastLayerUncertainty,
    pessimism_margins,
    reference_centers,
)

USERS = ["vowels", "digits", "spaces"]
PROMPTS = ["Hello there", "Tell me more", "Why?"]
LLAMA = {
    "hidden_size": 16,
    "layers": 1,
    "heads": 2,
    "kv_heads": 1,
    "intermediate_size": 32,
    "seed": 0,
}


def _randomize(module, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.trainable_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def reward_model() -> PersonalizedRewardModel:
    from transformers import BertConfig, BertModel

    tok = char_tokenizer()
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=128,
        )
    )
    model = PersonalizedRewardModel(bert, tok, USERS, r=2, max_length=64)
    _randomize(model, 1, 0.5)  # users' features differ, head is non-trivial
    return model


@pytest.fixture(scope="module")
def prefs() -> TextPreferences:
    rng = np.random.default_rng(0)
    chars = list("abcdefgh ijk0123 XYZ!?")
    texts = ["".join(rng.choice(chars, size=rng.integers(2, 14))) for _ in range(30)]
    return TextPreferences(
        prompts=[PROMPTS[i % 3] for i in range(15)],
        chosen=texts[:15],
        rejected=texts[15:],
        users=np.array([USERS[(i // 3) % 3] for i in range(15)]),
    )


def _delta(model, prefs) -> np.ndarray:
    users = [str(u) for u in prefs.users]
    return model.features(prefs.prompts, prefs.chosen, users, batch_size=4) - model.features(
        prefs.prompts, prefs.rejected, users, batch_size=4
    )


def _numpy_m(model, prefs, lam: float) -> np.ndarray:
    delta = _delta(model, prefs)
    return delta.T @ delta / len(delta) + lam * np.eye(delta.shape[1])


def _mnorm(d: np.ndarray, m: np.ndarray) -> np.ndarray:
    d = np.atleast_2d(d)
    return np.sqrt(np.einsum("ij,ji->i", d, np.linalg.solve(m, d.T)))


def _given(model, m: np.ndarray, beta: float, lam: float) -> LastLayerUncertainty:
    """An uncertainty object holding the numpy ``M`` (through ConfidenceSet's constructor),
    so the margin tests do not depend on ``fit``."""
    head = model.head.weight.detach().double().numpy().ravel()
    unc = LastLayerUncertainty(beta=beta, lam=lam)
    unc.confidence_ = ConfidenceSet(
        head, m, beta, lam=lam, n=1, kind="design", bound_feature=1.0, bound_theta=1.0
    )
    return unc


# ---------------------------------------------------------------------- the linear head
def test_features_times_head_is_the_score(reward_model, prefs):
    """The premise of the method: the reward is linear in the pooled feature."""
    users = [str(u) for u in prefs.users]
    texts = prefs.chosen + prefs.rejected
    head = reward_model.head.weight.detach().double().numpy().ravel()
    for batch_size in (1, 7, 32):
        phi = reward_model.features(prefs.prompts * 2, texts, users * 2, batch_size=batch_size)
        score = reward_model.score(prefs.prompts * 2, texts, users * 2, batch_size=batch_size)
        assert phi.shape == (30, 8) and phi.dtype == np.float64
        np.testing.assert_allclose(phi @ head, score, atol=1e-6)
    # the users' features really differ (otherwise "per user" would be vacuous)
    one = reward_model.features(["Hi"] * 3, ["abc"] * 3, USERS)
    assert np.abs(one[0] - one[1]).max() > 1e-3


# ---------------------------------------------------------------------- fit
@pytest.mark.parametrize("lam,beta", [(1.0, 1.0), (0.05, 2.5)])
def test_fit_matrix_norm_and_bonus_match_numpy(reward_model, prefs, lam, beta):
    unc = LastLayerUncertainty(beta=beta, lam=lam).fit(reward_model, prefs, batch_size=4)
    m = _numpy_m(reward_model, prefs, lam)
    np.testing.assert_allclose(unc.confidence_.M, m, atol=1e-10)
    np.testing.assert_allclose(
        unc.head_, reward_model.head.weight.detach().double().numpy().ravel(), atol=0
    )
    assert unc.n_ == prefs.n
    rng = np.random.default_rng(1)
    phi, centre = rng.normal(size=(6, 8)), rng.normal(size=8)
    np.testing.assert_allclose(unc.norm(phi, centre), _mnorm(phi - centre, m), rtol=1e-10)
    rows = rng.normal(size=(6, 8))
    np.testing.assert_allclose(unc.norm(phi, rows), _mnorm(phi - rows, m), rtol=1e-10)
    np.testing.assert_allclose(unc.bonus(phi, centre), beta * _mnorm(phi - centre, m), rtol=1e-10)


def test_fit_refuses_no_rows(reward_model, prefs):
    with pytest.raises(PluralignError, match="no preference rows"):
        LastLayerUncertainty().fit(reward_model, prefs.subset([]))


def test_unfitted_norm_and_bonus_raise():
    unc = LastLayerUncertainty()
    with pytest.raises(PluralignError, match="not fitted"):
        unc.norm(np.zeros((1, 3)), np.zeros(3))
    with pytest.raises(PluralignError, match="not fitted"):
        unc.bonus(np.zeros((1, 3)), np.zeros(3))


def test_norm_and_bonus_on_a_given_matrix(reward_model, prefs):
    m = _numpy_m(reward_model, prefs, 0.2)
    unc = _given(reward_model, m, 1.7, 0.2)
    rng = np.random.default_rng(2)
    phi, centre = rng.normal(size=(5, 8)), rng.normal(size=8)
    np.testing.assert_allclose(unc.norm(phi, centre), _mnorm(phi - centre, m), rtol=1e-10)
    np.testing.assert_allclose(unc.bonus(phi, centre), 1.7 * _mnorm(phi - centre, m), rtol=1e-10)
    assert unc.norm(centre[None], centre) == pytest.approx([0.0])


# ---------------------------------------------------------------------- pessimism margins
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_pessimism_margins_match_numpy(reward_model, prefs, scale):
    lam, beta = 0.5, 2.0
    m = _numpy_m(reward_model, prefs, lam)
    unc = _given(reward_model, m, beta, lam)
    rng = np.random.default_rng(3)
    users = [str(u) for u in prefs.users]
    centers = {(p, u): rng.normal(size=8) for p, u in zip(prefs.prompts, users, strict=True)}
    got = pessimism_margins(reward_model, unc, prefs, centers, scale=scale, batch_size=4)
    chosen = reward_model.features(prefs.prompts, prefs.chosen, users, batch_size=1)
    rejected = reward_model.features(prefs.prompts, prefs.rejected, users, batch_size=1)
    nu = np.stack([centers[(p, u)] for p, u in zip(prefs.prompts, users, strict=True)])
    expected = scale * beta * (_mnorm(chosen - nu, m) - _mnorm(rejected - nu, m))
    assert got.shape == (prefs.n,)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.abs(expected).max() > 0.1


def test_pessimism_margins_missing_center_raises(reward_model, prefs):
    unc = _given(reward_model, np.eye(8), 1.0, 1.0)
    users = [str(u) for u in prefs.users]
    centers = {(p, u): np.zeros(8) for p, u in zip(prefs.prompts, users, strict=True)}
    missing = (prefs.prompts[4], users[4])
    del centers[missing]
    with pytest.raises(PluralignError, match="no reference center") as err:
        pessimism_margins(reward_model, unc, prefs, centers)
    assert repr(missing) in str(err.value)


# ---------------------------------------------------------------------- reference centers
def _policy(randomize: int | None = None) -> PersonalizedPolicy:
    policy = PersonalizedPolicy(
        tiny_llama(**LLAMA),
        char_tokenizer(),
        USERS,
        target_modules="all-linear",
        r=2,
        max_length=64,
    )
    if randomize is not None:
        _randomize(policy, randomize, 0.5)
    return policy


def test_reference_centers_are_mean_features_of_reference_samples(reward_model):
    policy = _policy(randomize=4)  # the policy differs from its reference
    prompts = ["Hello there", "Why?", "Hello there", "Why?", "Hello there"]
    users = ["vowels", "digits", "vowels", "vowels", "spaces"]
    n, seed = 5, 7
    centers = reference_centers(
        policy, reward_model, prompts, users, n=n, max_new_tokens=8, seed=seed, batch_size=4
    )
    pairs = [
        ("Hello there", "vowels"),
        ("Why?", "digits"),
        ("Why?", "vowels"),
        ("Hello there", "spaces"),
    ]
    assert list(centers) == pairs
    # the reference π0 is the base model: a fresh policy (LoRA B = 0) samples the same
    base = _policy().generate(
        [p for p, _ in pairs], [u for _, u in pairs], n=n, max_new_tokens=8, seed=seed, batch_size=4
    )
    own = policy.generate(
        [p for p, _ in pairs], [u for _, u in pairs], n=n, max_new_tokens=8, seed=seed, batch_size=4
    )
    assert base.texts != own.texts
    gaps = []
    for (p, u), texts, own_texts in zip(pairs, base.texts, own.texts, strict=True):
        texts = [t if t else " " for t in texts]  # empty samples are read as " "
        phi = np.stack([reward_model.features([p], [t], [u])[0] for t in texts])
        np.testing.assert_allclose(centers[(p, u)], phi.mean(0), atol=1e-6)
        assert centers[(p, u)].shape == (8,)
        own_phi = reward_model.features([p] * n, [t if t else " " for t in own_texts], [u] * n)
        gaps.append(np.abs(own_phi.mean(0) - centers[(p, u)]).max())
    assert max(gaps) > 1e-3  # the policy's own samples would give others


def test_reference_centers_feed_pessimism_margins(reward_model, prefs):
    """The pieces together: centers from reference samples, margins from a given M."""
    policy = _policy()
    users = [str(u) for u in prefs.users]
    centers = reference_centers(
        policy, reward_model, prefs.prompts, users, n=3, max_new_tokens=6, seed=1
    )
    assert set(centers) == set(zip(prefs.prompts, users, strict=True))
    m = _numpy_m(reward_model, prefs, 1.0)
    got = pessimism_margins(reward_model, _given(reward_model, m, 1.0, 1.0), prefs, centers)
    chosen = reward_model.features(prefs.prompts, prefs.chosen, users)
    rejected = reward_model.features(prefs.prompts, prefs.rejected, users)
    nu = np.stack([centers[k] for k in zip(prefs.prompts, users, strict=True)])
    np.testing.assert_allclose(
        got, _mnorm(chosen - nu, m) - _mnorm(rejected - nu, m), rtol=1e-6, atol=1e-7
    )
    assert math.isfinite(float(got.sum()))
