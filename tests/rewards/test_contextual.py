"""``Contextual``: LoCo-RLHF's contextual low-rank reward for users with contexts, its context
encoding (``ContextSchema``), persistence, and the simulator's users with contexts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from pluralign.data import PreferenceData, read_trl
from pluralign.data.contexts import ContextSchema
from pluralign.envs import MultiUser
from pluralign.errors import ConfigError, DataValidationError
from pluralign.rewards import Contextual, Pooled, SharedBasis
from pluralign.rewards.persistence import load_model, save_model
from pluralign.rewards.users import one_hot


def context_users(noise: float = 0.0, seed: int = 0, n_users: int = 40, n_per_user: int = 40):
    return MultiUser(
        n_users=n_users,
        d_phi=10,
        rank=2,
        n_per_user=n_per_user,
        seed=seed,
        d_context=5,
        context_noise=noise,
    )


def accuracy(thetas: np.ndarray, data: PreferenceData, index: np.ndarray) -> float:
    margins = np.einsum("nd,nd->n", thetas[index], data.delta_phi)
    return float(np.mean((margins > 0) == (data.y == 1)))


# ------------------------------------------------------------------------ oracles
def test_one_hot_contexts_without_standardizing_are_exactly_shared_basis():
    env = MultiUser(n_users=12, d_phi=8, rank=2, n_per_user=40, seed=0)
    data = env.sample_offline(seed=1)
    _, index = np.unique(data.users, return_inverse=True)
    with_x = PreferenceData(one_hot(index, 12), data.phi0, data.phi1, data.y, data.users)
    shared = SharedBasis(2, 1e-3, seed=3).fit(data)
    contextual = Contextual(2, 1e-3, standardize=False, seed=3).fit(with_x)
    np.testing.assert_allclose(contextual.thetas_, shared.thetas_, rtol=0, atol=1e-12)
    np.testing.assert_allclose(contextual.theta0_, shared.theta0_, rtol=0, atol=1e-12)
    assert contextual.log_likelihood(with_x) == pytest.approx(
        shared.log_likelihood(data), abs=1e-12
    )
    np.testing.assert_allclose(np.abs(contextual.basis_.T @ shared.basis_), np.eye(2), atol=1e-9)


def test_full_rank_equals_logistic_regression_on_explicit_kronecker_features():
    """At ``rank = min(d_x, d_phi)`` the rank constraint is void: the fit is the ridge MLE of
    ``Θ`` on ``[1, z(x)] ⊗ Δφ`` (formed here, never in the model), i.e. scikit-learn's
    LogisticRegression with ``C = 1/(λN)`` and no intercept."""
    env = context_users(noise=0.3, n_users=30)
    data = env.sample_offline(seed=2)
    l2 = 1e-2
    model = Contextual(rank=5, l2=l2, tol=1e-8, max_iter=5000).fit(data)
    z = (data.x - data.x.mean(axis=0)) / data.x.std(axis=0)
    aug = np.concatenate([np.ones((data.n, 1)), z], axis=1)
    kron = (aug[:, :, None] * data.delta_phi[:, None, :]).reshape(data.n, -1)
    ref = LogisticRegression(
        fit_intercept=False, C=1 / (data.n * l2), tol=1e-12, max_iter=20000
    ).fit(kron, data.y)
    theta = ref.coef_[0].reshape(6, data.d_phi)
    got = np.concatenate([model.theta0_[None], model.context_weights_ @ model.basis_.T])
    assert np.abs(got - theta).max() / np.abs(theta).max() < 1e-4


def test_standardized_fit_is_invariant_to_affine_rescaling_of_context_columns():
    data = context_users(noise=0.5).sample_offline(seed=3)
    scale = np.array([3.0, 0.01, 1.0, 250.0, 0.5])
    shift = np.array([-2.0, 7.0, 0.0, 1e3, 0.25])
    moved = PreferenceData(data.x * scale + shift, data.phi0, data.phi1, data.y, data.users)
    a, b = Contextual(2, 1e-3).fit(data), Contextual(2, 1e-3).fit(moved)
    np.testing.assert_allclose(b.thetas_, a.thetas_, rtol=1e-6, atol=1e-8)
    new = np.random.default_rng(0).standard_normal((4, 5))
    np.testing.assert_allclose(
        b.context_theta(new * scale + shift), a.context_theta(new), rtol=1e-6, atol=1e-8
    )
    # without standardizing the ridge sees the raw scale, so the fits differ
    stretched = PreferenceData(
        data.x * np.array([3.0, 0.5, 1.0, 2.0, 0.5]), data.phi0, data.phi1, data.y, data.users
    )
    raw_a = Contextual(2, 1e-1, standardize=False).fit(data)
    raw_b = Contextual(2, 1e-1, standardize=False).fit(stretched)
    assert np.abs(raw_a.thetas_ - raw_b.thetas_).max() > 1e-3


# ----------------------------------------------------------------------- new users
@pytest.mark.parametrize("seed", [0, 1])
def test_a_new_user_with_a_known_context_gets_a_personalized_reward(seed):
    """Users whose rewards follow their contexts (ν = 0): the context alone scores a user the
    model never saw nearly as well as their true reward, clearly better than one pooled
    reward; the estimated θ(x) points where the truth does."""
    env = context_users(noise=0.0, seed=seed)
    train = env.sample_offline(seed=[seed, 1])
    contexts, thetas = env.new_context_users(30, seed=[seed, 2])
    ids = np.arange(100, 130)
    test = env.sample_comparisons(
        thetas, np.full(30, 200), seed=[seed, 3], users=ids, contexts=contexts
    )
    model = Contextual(2, 1.0 / train.n, seed=seed).fit(train)
    pooled = Pooled(1.0 / train.n).fit(train)
    index = test.users - 100
    got = accuracy(model.context_theta(contexts), test, index)
    oracle = accuracy(thetas, test, index)
    baseline = accuracy(np.tile(pooled.theta0_, (30, 1)), test, index)
    assert got > baseline + 0.05
    assert got > oracle - 0.03
    est, true = model.context_theta(contexts), thetas
    cosine = np.sum(est * true, axis=1) / np.linalg.norm(est, axis=1) / np.linalg.norm(true, axis=1)
    assert np.median(cosine) > 0.9
    # registered by context, the new users are scored through the multi-user interface
    model.add_users(ids, contexts)
    no_x = PreferenceData(None, test.phi0, test.phi1, test.y, test.users)
    assert model.accuracy(no_x) == pytest.approx(model.accuracy(test), abs=1e-15)
    np.testing.assert_allclose(
        model.reward(ids[3], test.phi1[:5]),
        test.phi1[:5] @ model.context_theta(contexts[3])[0],
        atol=1e-12,
    )
    assert model.user_counts_[-1] == 0


def test_add_users_refuses_known_users_mismatched_lengths_and_types():
    data = context_users().sample_offline(seed=0)
    model = Contextual(2, 1e-3).fit(data)
    with pytest.raises(DataValidationError, match="already known"):
        model.add_users([3], data.x[:1])
    with pytest.raises(DataValidationError, match="2 user ids for 1 contexts"):
        model.add_users([100, 101], data.x[:1])
    with pytest.raises(DataValidationError, match="do not match"):
        model.add_users(["new"], data.x[:1])
    with pytest.raises(DataValidationError, match="d_x = 5"):
        model.add_users([100], np.zeros((1, 4)))
    with pytest.raises(DataValidationError, match="given twice"):
        model.add_users([100, 100], data.x[:2])
    assert len(model.users_) == 40


def test_margins_follow_each_rows_context():
    data = context_users(noise=0.5).sample_offline(seed=0)
    model = Contextual(2, 1e-3).fit(data)
    expected = np.einsum("nd,nd->n", model.context_theta(data.x), data.delta_phi)
    np.testing.assert_allclose(model.margins(data), expected, atol=1e-12)
    no_x = PreferenceData(None, data.phi0, data.phi1, data.y, data.users)
    np.testing.assert_allclose(model.margins(no_x), expected, atol=1e-12)
    # contexts alone (no user ids): LoCo-RLHF's data model, one group in the report
    anonymous = PreferenceData(data.x, data.phi0, data.phi1, data.y)
    alone = Contextual(2, 1e-3).fit(anonymous)
    np.testing.assert_allclose(
        alone.context_theta(data.x[:3]), model.context_theta(data.x[:3]), atol=1e-10
    )
    assert set(alone.per_user_accuracy(anonymous)) == {None}


# ------------------------------------------------------------------------ refusals
def test_a_user_with_two_contexts_is_refused_naming_the_row():
    data = context_users().sample_offline(seed=0)
    x = data.x.copy()
    x[57, 2] += 1.0
    with pytest.raises(
        DataValidationError,
        match=r"user 1 has another context here than on "
        r"row 40",
    ) as info:
        Contextual(2).fit(PreferenceData(x, data.phi0, data.phi1, data.y, data.users))
    assert info.value.row == 57 and info.value.field == "x"


def test_bad_hyper_parameters_and_missing_contexts_are_refused():
    data = context_users().sample_offline(seed=0)
    with pytest.raises(DataValidationError, match=r"\[1, 5\] \(d_x = 5") as info:
        Contextual(rank=6).fit(data)
    assert info.value.field == "rank"
    with pytest.raises(DataValidationError, match="x=None"):
        Contextual().fit(PreferenceData(None, data.phi0, data.phi1, data.y, data.users))
    with pytest.raises(DataValidationError, match="true or false"):
        Contextual(standardize="yes").fit(data)
    with pytest.raises(DataValidationError, match="'error' or 'shared'"):
        Contextual(unknown_user="θ0").fit(data)


def test_unknown_user_without_context_errors_or_gets_theta0():
    data = context_users().sample_offline(seed=0)
    strict = Contextual(2, 1e-3).fit(data)
    with pytest.raises(DataValidationError, match="unknown user 99"):
        strict.user_theta(99)
    lenient = Contextual(2, 1e-3, unknown_user="shared").fit(data)
    np.testing.assert_array_equal(lenient.user_theta(99)[0], lenient.theta0_)
    # θ0 is the reward of the average training context (z = 0)
    np.testing.assert_allclose(
        lenient.context_theta(data.x.mean(axis=0))[0], lenient.theta0_, atol=1e-12
    )


# --------------------------------------------------------------------- persistence
def test_save_and_load_round_trip_and_tampered_arrays(tmp_path):
    data = context_users().sample_offline(seed=0)
    model = Contextual(2, 1e-3, unknown_user="shared").fit(data)
    schema = ContextSchema.vector(5)
    save_model(
        model,
        tmp_path / "m",
        metadata={"features": {"kind": "numeric", "context": schema.to_dict()}},
    )
    loaded, meta, _ = load_model(tmp_path / "m")
    assert isinstance(loaded, Contextual) and loaded.get_params() == model.get_params()
    new = np.random.default_rng(1).standard_normal((3, 5))
    np.testing.assert_array_equal(loaded.context_theta(new), model.context_theta(new))
    np.testing.assert_array_equal(loaded.thetas_, model.thetas_)
    arrays = dict(np.load(tmp_path / "m" / "model.npz"))
    arrays["context_scale"][1] = 0.0
    np.savez(tmp_path / "m" / "model.npz", **arrays)
    with pytest.raises(DataValidationError, match="must be positive") as info:
        load_model(tmp_path / "m")
    assert info.value.field == "context_scale"
    arrays["context_scale"][1] = 1.0
    arrays["contexts"] = arrays["contexts"][:, :4]
    np.savez(tmp_path / "m" / "model.npz", **arrays)
    with pytest.raises(DataValidationError, match=r"expected \(40, 5\)"):
        load_model(tmp_path / "m")
    save_model(
        model,
        tmp_path / "m2",
        metadata={"features": {"kind": "numeric", "context": ContextSchema.vector(4).to_dict()}},
    )
    with pytest.raises(DataValidationError, match="names 4 context columns") as info:
        load_model(tmp_path / "m2")
    assert info.value.field == "features.context"
    meta = json.loads((tmp_path / "m2" / "model.json").read_text())
    meta["features"]["context"] = {"kind": "vector", "names": ["x0", "x0"], "numeric": []}
    (tmp_path / "m2" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DataValidationError, match="distinct") as info:
        load_model(tmp_path / "m2")
    assert info.value.field == "features.context"


# ----------------------------------------------------------------- context schema
ROWS = [
    {
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
        "user_id": "ana",
        "user_context": {"age": 31, "region": "eu", "pro": True, "lang": {"main": "de"}},
    },
    {
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
        "user_id": "ben",
        "user_context": {"age": 45.5, "region": "us", "pro": False},
    },
    {
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
        "user_id": "cy",
        "user_context": {"age": 22, "region": "eu", "lang": {"main": "fr"}, "pro": None},
    },
]


def test_schema_encodes_every_training_context_as_the_loader_did(tmp_path):
    prefs = read_trl(ROWS)
    schema = prefs.context_schema
    assert schema.kind == "attributes" and schema.numeric == ("age",)
    assert list(schema.names) == prefs.context_names
    encoded = np.array([schema.encode(r["user_context"]) for r in ROWS])
    np.testing.assert_array_equal(encoded, prefs.contexts)
    assert ContextSchema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema
    vector = read_trl([dict(r, user_context=[i, 2.5]) for i, r in enumerate(ROWS)])
    assert vector.context_schema == ContextSchema.vector(2)
    np.testing.assert_array_equal(vector.context_schema.encode([7, 1]), [7.0, 1.0])


@pytest.mark.parametrize(
    "value, field, message",
    [
        (
            {"age": 30, "region": "asia"},
            "ctx.region",
            "value 'asia' was not seen in training; known values: 'eu', 'us'",
        ),
        (
            {"age": 30, "height": 1.8},
            "ctx.height",
            "not an attribute of the model's contexts; they have: age, lang.main, pro, region",
        ),
        ({"region": "eu"}, "ctx.age", "missing"),
        ({"age": "30"}, "ctx.age", "must be a number"),
        ({"age": True}, "ctx.age", "must be a number"),
        ([30, 1], "ctx", "must be a mapping of attributes"),
        ({"age": float("nan")}, "ctx.age", "finite"),
        ("eu", "ctx", "must be a list of numbers or a mapping"),
    ],
)
def test_schema_refuses_what_training_did_not_have(value, field, message):
    schema = read_trl(ROWS).context_schema
    with pytest.raises(DataValidationError, match=message.replace("(", r"\(")) as info:
        schema.encode(value, name="ctx")
    assert info.value.field == field


def test_schema_missing_categorical_attribute_is_zeros_as_in_training():
    schema = read_trl(ROWS).context_schema
    row = schema.encode({"age": 30})
    assert row[list(schema.names).index("age")] == 30 and row.sum() == 30
    with pytest.raises(DataValidationError, match="2 numbers; the model's contexts have 3"):
        ContextSchema.vector(3).encode([1, 2], name="c")


# ------------------------------------------------------------------------ simulator
def test_simulator_contexts_drive_rewards_and_noise_one_unties_them():
    env = context_users(noise=0.0)
    expected = (
        env.theta0_star
        + (env.diversity * np.sqrt(env.d_phi / env.rank) * env.contexts @ env.M_star) @ env.B_star.T
    )
    np.testing.assert_allclose(env.thetas_star, expected, atol=1e-12)
    data = env.sample_offline(seed=0)
    np.testing.assert_array_equal(data.x, env.contexts[data.users])
    x, thetas = env.new_context_users(5, seed=9)
    np.testing.assert_allclose(
        thetas,
        env.theta0_star
        + (env.diversity * np.sqrt(env.d_phi / env.rank) * x @ env.M_star) @ env.B_star.T,
        atol=1e-12,
    )
    _, same = env.new_users(5, seed=9)
    np.testing.assert_array_equal(thetas, same)
    noisy = context_users(noise=1.0)
    w = noisy.W_star / (noisy.diversity * np.sqrt(noisy.d_phi / noisy.rank))
    # ν = 1: W is independent of the contexts (no linear fit of W on x explains it)
    fit = np.linalg.lstsq(noisy.contexts, w, rcond=None)[0]
    assert np.linalg.norm(noisy.contexts @ fit) ** 2 / np.linalg.norm(w) ** 2 < 0.3
    assert MultiUser(seed=0).contexts is None
    np.testing.assert_array_equal(
        MultiUser(seed=0).thetas_star, MultiUser(seed=0, context_noise=0.7).thetas_star
    )
    with pytest.raises(ConfigError, match="context_noise"):
        MultiUser(d_context=2, context_noise=1.5)
    with pytest.raises(ConfigError, match="d_context"):
        MultiUser(d_context=0)
    with pytest.raises(ConfigError, match="d_context set"):
        MultiUser().new_context_users(2, seed=0)
