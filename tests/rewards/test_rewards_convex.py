"""Convex Bradley–Terry estimators against scikit-learn and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bt_data, sigmoid
from sklearn.linear_model import LogisticRegression

from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError, NotFittedError
from pluralign.rewards import Bilinear, Linear

TIGHT = {"tol": 1e-10, "max_iter": 10000}
# TIGHT asks for a gradient tolerance below the float64 floor of these problems (~1e-9): the fit
# runs until the objective stops decreasing, the most accurate estimate the arithmetic gives, and
# says so with the precision-floor ConvergenceWarning, expected here (and in float32 at 1e-6).
# Only that variant is ignored; an iteration-cap or line-search warning would still show.
AT_FLOOR = pytest.mark.filterwarnings(
    "ignore:.*stopped decreasing at float(32|64) precision:pluralign.errors.ConvergenceWarning"
)


def kron_features(x: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Row-major ``vec(x φᵀ)`` per row, built with explicit loops (the oracle)."""
    n, d_x = x.shape
    d_phi = phi.shape[1]
    z = np.empty((n, d_x * d_phi))
    for i in range(d_x):
        for j in range(d_phi):
            z[:, i * d_phi + j] = x[:, i] * phi[:, j]
    return z


def sklearn_fit(z: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    model = LogisticRegression(
        fit_intercept=False, C=1.0 / (len(y) * l2), tol=1e-10, max_iter=10000
    )
    return model.fit(z, y).coef_.ravel()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
@AT_FLOOR
def test_linear_matches_sklearn_on_difference_features(l2):
    data, _ = bt_data(n=300, d_x=None, d_phi=5, seed=1)
    model = Linear(l2=l2, **TIGHT).fit(data)
    expected = sklearn_fit(data.phi1 - data.phi0, data.y, l2)
    assert rel_err(model.theta_, expected) < 1e-4
    np.testing.assert_array_equal(model.params_, model.theta_)
    assert model.n_params == 5


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
@AT_FLOOR
def test_bilinear_matches_sklearn_on_kronecker_features(l2):
    data, _ = bt_data(n=300, d_x=3, d_phi=4, seed=2)
    model = Bilinear(l2=l2, **TIGHT).fit(data)
    expected = sklearn_fit(kron_features(data.x, data.phi1 - data.phi0), data.y, l2)
    assert rel_err(model.params_, expected) < 1e-4
    assert model.theta_.shape == (3, 4)
    np.testing.assert_array_equal(model.params_, model.theta_.ravel())
    assert model.n_params == 12


@AT_FLOOR
def test_stronger_ridge_shrinks_the_estimate():
    data, _ = bt_data(n=200, d_x=2, d_phi=3, seed=3)
    norms = [np.linalg.norm(Bilinear(l2=l2, **TIGHT).fit(data).theta_) for l2 in (1e-4, 1e-2, 1.0)]
    assert norms[0] > norms[1] > norms[2]


@AT_FLOOR
def test_linear_ignores_contexts():
    data, _ = bt_data(n=200, d_x=3, d_phi=4, seed=4)
    no_x = PreferenceData(None, data.phi0, data.phi1, data.y)
    a = Linear(l2=1e-2, **TIGHT).fit(data)
    b = Linear(l2=1e-2, **TIGHT).fit(no_x)
    np.testing.assert_allclose(a.theta_, b.theta_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.reward(data.x, data.phi0), b.reward(None, data.phi0))


@pytest.mark.parametrize("model_cls", [Linear, Bilinear])
def test_predict_proba_and_log_likelihood_closed_forms(model_cls):
    data, _ = bt_data(n=150, d_x=3, d_phi=4, seed=5)
    model = model_cls(l2=1e-2).fit(data)
    theta = model.theta_
    if model_cls is Linear:
        margin = (data.phi1 - data.phi0) @ theta
    else:
        margin = np.array(
            [data.x[i] @ theta @ (data.phi1[i] - data.phi0[i]) for i in range(data.n)]
        )
    p = sigmoid(margin)
    np.testing.assert_allclose(model.predict_proba(data), p, rtol=1e-10, atol=1e-14)
    expected_ll = np.mean(np.log(np.where(data.y == 1, p, 1.0 - p)))
    assert model.log_likelihood(data) == pytest.approx(expected_ll, rel=1e-10)
    assert model.log_likelihood(data) < 0


def test_log_likelihood_is_stable_for_huge_margins():
    data, _ = bt_data(n=20, d_x=None, d_phi=2, seed=6)
    model = Linear(l2=1.0).fit(data)
    model.theta_ = model.params_ = np.array([1e4, -1e4])  # margins of order 1e4
    ll = model.log_likelihood(data)
    margin = (data.phi1 - data.phi0) @ model.theta_
    # −log σ(t) ≈ max(−t, 0) for |t| large
    expected = -np.mean(np.maximum(-(2 * data.y - 1) * margin, 0.0))
    assert np.isfinite(ll)
    assert ll == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("model_cls", [Linear, Bilinear])
def test_reward_broadcasts_over_candidates(model_cls):
    data, _ = bt_data(n=100, d_x=3, d_phi=4, seed=7)
    model = model_cls(l2=1e-2).fit(data)
    rng = np.random.default_rng(0)
    m, k = 6, 5
    x = rng.standard_normal((m, 3))
    phi = rng.standard_normal((m, k, 4))
    rewards = model.reward(x, phi)
    assert rewards.shape == (m, k)
    for j in range(m):
        for a in range(k):
            per_row = model.reward(x[j : j + 1], phi[j, a][None, :])[0]
            assert rewards[j, a] == pytest.approx(per_row, rel=1e-12, abs=1e-12)
            if model_cls is Bilinear:
                explicit = sum(
                    x[j, i] * model.theta_[i, d] * phi[j, a, d] for i in range(3) for d in range(4)
                )
            else:
                explicit = sum(model.theta_[d] * phi[j, a, d] for d in range(4))
            assert rewards[j, a] == pytest.approx(explicit, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("model_cls", [Linear, Bilinear])
def test_features_reproduce_reward(model_cls):
    data, _ = bt_data(n=100, d_x=3, d_phi=4, seed=8)
    model = model_cls(l2=1e-2).fit(data)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3))
    phi = rng.standard_normal((6, 5, 4))
    z = model.features(x, phi)
    assert z.shape == (6, 5, model.n_params)
    np.testing.assert_allclose(z @ model.params_, model.reward(x, phi), rtol=1e-12, atol=1e-12)
    z2 = model.features(x, phi[:, 0])
    np.testing.assert_allclose(z2, z[:, 0])
    if model_cls is Bilinear:
        np.testing.assert_allclose(z2, kron_features(x, phi[:, 0]))


@pytest.mark.parametrize("model_cls", [Linear, Bilinear])
def test_fit_returns_self_and_reward_before_fit_raises(model_cls):
    data, _ = bt_data(n=50, d_x=2, d_phi=3, seed=9)
    model = model_cls(l2=1e-2)
    with pytest.raises(NotFittedError):
        model.reward(data.x, data.phi0)
    with pytest.raises(NotFittedError):
        model.predict_proba(data)
    assert model.fit(data) is model
    assert model.is_fitted_


def test_bilinear_needs_contexts():
    data, _ = bt_data(n=50, d_x=None, d_phi=3, seed=10)
    with pytest.raises(DataValidationError) as info:
        Bilinear().fit(data)
    assert info.value.field == "x"
    fitted = Bilinear().fit(bt_data(n=50, d_x=2, d_phi=3, seed=10)[0])
    with pytest.raises(DataValidationError) as info:
        fitted.reward(None, data.phi0)
    assert info.value.field == "x"


def test_reward_checks_dimensions():
    data, _ = bt_data(n=50, d_x=2, d_phi=3, seed=11)
    model = Bilinear().fit(data)
    with pytest.raises(DataValidationError) as info:
        model.reward(data.x, data.phi0[:, :2])
    assert info.value.field == "phi"
    with pytest.raises(DataValidationError) as info:
        model.reward(data.x[:, :1], data.phi0)
    assert info.value.field == "x"


def test_fit_refuses_non_data():
    with pytest.raises(DataValidationError):
        Linear().fit(np.zeros((3, 2)))


@pytest.mark.parametrize("model_cls", [Linear, Bilinear])
@AT_FLOOR
def test_float32_is_close_to_float64(model_cls):
    data, _ = bt_data(n=300, d_x=None if model_cls is Linear else 3, d_phi=4, seed=12)
    ref = model_cls(l2=1e-2, **TIGHT).fit(data)
    f32 = model_cls(l2=1e-2, tol=1e-6, max_iter=10000, dtype="float32").fit(data)
    assert rel_err(f32.params_, ref.params_) < 2e-3
    assert f32.log_likelihood(data) == pytest.approx(ref.log_likelihood(data), rel=1e-4)


def test_unknown_dtype_is_refused():
    data, _ = bt_data(n=30, d_x=None, d_phi=2, seed=13)
    for dtype in ("float16", "nonsense"):
        with pytest.raises(DataValidationError) as info:
            Linear(dtype=dtype).fit(data)
        assert info.value.field == "dtype"


def test_estimate_approaches_truth_with_many_samples():
    data, truth = bt_data(n=20000, d_x=2, d_phi=3, seed=14)
    model = Bilinear(l2=1e-6).fit(data)
    assert rel_err(model.theta_, truth) < 0.1
