"""Hardening of the estimators, confidence sets and policies: hyper-parameter validation and
pluralign's warnings (ConvergenceWarning, SeparableDataWarning, DisconnectedComparisonsWarning).

Every warning is checked both ways: issued in its situation, and absent (recorded with
``simplefilter("always")``) in the normal case. Oracles are independent of the code under test:
closed-form gradients, a brute-force enumeration of directions in 2-D, scikit-learn's unpenalized
logistic regression, and SciPy's connected components of the item graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import bt_data, sigmoid
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.linear_model import LogisticRegression

from pluralign.confidence import ConfidenceSet, beta_rate, theory_beta
from pluralign.data import PreferenceData
from pluralign.envs import KLBandit, LowRankContextual, MultiUser
from pluralign.errors import (
    ConvergenceWarning,
    DataValidationError,
    DisconnectedComparisonsWarning,
    PluralignError,
    PluralignWarning,
    SeparableDataWarning,
)
from pluralign.policies import Leximin, Pessimistic, PessimisticGibbs, Utilitarian
from pluralign.rewards import (
    Bilinear,
    Linear,
    LowRank,
    PerUser,
    Pooled,
    RTVReduced,
    SharedBasis,
)


def record(fn: Callable[[], Any]) -> tuple[Any, list[warnings.WarningMessage]]:
    """``fn()`` and the pluralign warnings it issued (every one, no deduplication)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, PluralignWarning)]


def kinds(caught: list[warnings.WarningMessage]) -> list[type]:
    return [w.category for w in caught]


# ============================================================================= validation
def _multi_user_data() -> PreferenceData:
    data, _ = bt_data(n=120, d_x=None, d_phi=3, seed=0, users=True)
    return data


ESTIMATORS: list[tuple[Callable[..., Any], Callable[[], PreferenceData]]] = [
    (lambda **kw: Linear(**kw), lambda: bt_data(n=60, d_x=None, d_phi=3, seed=0)[0]),
    (lambda **kw: Bilinear(**kw), lambda: bt_data(n=60, d_x=2, d_phi=3, seed=0)[0]),
    (lambda **kw: LowRank(1, **kw), lambda: bt_data(n=60, d_x=2, d_phi=3, seed=0)[0]),
    (lambda **kw: PerUser(**kw), _multi_user_data),
    (lambda **kw: Pooled(**kw), _multi_user_data),
    (lambda **kw: SharedBasis(2, **kw), _multi_user_data),
]
BAD_VALUES = [
    ("l2", float("nan")),
    ("l2", float("inf")),
    ("l2", -1e-3),
    ("l2", "0.1"),
    ("l2", True),
    ("tol", 0.0),
    ("tol", -1e-6),
    ("tol", float("nan")),
    ("tol", float("inf")),
    ("max_iter", 0),
    ("max_iter", -5),
    ("max_iter", 2.5),
    ("max_iter", True),
]


@pytest.mark.parametrize("make, data", ESTIMATORS)
@pytest.mark.parametrize("name, value", BAD_VALUES)
def test_fit_refuses_bad_hyperparameters_naming_them(make, data, name, value):
    model = make(**{name: value})  # stored as given (scikit-learn style) ...
    assert model.get_params()[name] is value
    with pytest.raises(DataValidationError) as info:  # ... and refused at fit
        model.fit(data())
    assert info.value.field == name
    assert name in str(info.value) and repr(value) in str(info.value)


def test_fit_refuses_other_bad_hyperparameters():
    data, _ = bt_data(n=60, d_x=2, d_phi=3, seed=0)
    for model, name in (
        (LowRank(0), "rank"),
        (LowRank(True), "rank"),
        (LowRank(1, balance=-1.0), "balance"),
        (LowRank(1, dense_svd_limit=0), "dense_svd_limit"),
        (PerUser(adapt_l2=float("nan")), "adapt_l2"),
        (SharedBasis(0), "rank"),
    ):
        fit_data = _multi_user_data() if isinstance(model, PerUser | SharedBasis) else data
        with pytest.raises(DataValidationError) as info:
            model.fit(fit_data)
        assert info.value.field == name, model
    base = LowRank(1).fit(data)
    with pytest.raises(DataValidationError) as info:
        RTVReduced(base, l2=-1.0).fit(data)
    assert info.value.field == "l2"


def test_valid_edge_values_are_accepted():
    data, _ = bt_data(n=60, d_x=None, d_phi=3, seed=0)
    for kw in ({"l2": 0}, {"l2": np.float64(1e-3)}, {"max_iter": np.int64(50)}, {"tol": 1e-3}):
        model, _ = record(lambda kw=kw: Linear(**kw).fit(data))
        assert model.is_fitted_


def _policy_problem():
    """A pessimistic problem whose Frank–Wolfe needs 2 iterations to certify 1e-8."""
    env = LowRankContextual(
        d_x=3, d_phi=3, rank=1, n_actions=3, shift=1.0, behavior="skewed", seed=1
    )
    data = env.sample_offline(150, seed=1)
    model = Bilinear(l2=1.0 / 150).fit(data)
    cs = ConfidenceSet.fit(model, data, beta=0.3)
    return model, cs, env.sample_targets(6, seed=2)


@pytest.mark.parametrize(
    "name, value", [("tol", 0.0), ("tol", float("nan")), ("max_iter", 0), ("max_iter", 1.5)]
)
def test_policies_refuse_bad_tolerances_naming_them(name, value):
    model, cs, targets = _policy_problem()
    for policy in (
        Pessimistic(model, cs, **{name: value}),
        PessimisticGibbs(model, cs, 0.5, **{name: value}),
    ):
        with pytest.raises(DataValidationError) as info:
            policy.probs(targets)
        assert info.value.field == name
    env = MultiUser(n_users=3, d_phi=3, rank=1, n_per_user=30, seed=0)
    train = env.sample_offline(seed=[1])
    per_user = PerUser(1e-2).fit(train)
    for policy in (
        Utilitarian(per_user, train, beta=0.2, **{name: value}),
        Leximin(per_user, train, beta=0.2, levels=1, **{name: value}),
    ):
        with pytest.raises(DataValidationError) as info:
            policy.probs(env.sample_targets(4, seed=2))
        assert info.value.field == name


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"beta": float("nan")}, "beta"),
        ({"beta": float("inf")}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta": "wide"}, "beta"),
        ({"beta": True}, "beta"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 2.0}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"lam": 0.0}, "lam"),
        ({"lam": -1.0}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"bound_theta": -1.0}, "bound_theta"),
        ({"max_bytes": 0}, "max_bytes"),
    ],
)
def test_confidence_set_refuses_bad_parameters_naming_them(kwargs, field):
    data, _ = bt_data(n=60, d_x=None, d_phi=3, seed=0)
    model = Linear(l2=1e-2).fit(data)
    with pytest.raises(DataValidationError) as info:
        ConfidenceSet.fit(model, data, **kwargs)
    assert info.value.field == field and field in str(info.value)
    assert isinstance(info.value, PluralignError)


def test_confidence_helpers_and_constructor_refuse_bad_parameters():
    for fn, field in (
        (lambda: beta_rate(3, 100, delta=0.0), "delta"),
        (lambda: beta_rate(3, 100, delta=1.5), "delta"),
        (lambda: beta_rate(3, 0), "n"),
        (
            lambda: theory_beta(3, 100, delta=0.1, lam=-1.0, bound_theta=1.0, bound_feature=1.0),
            "lam",
        ),
        (
            lambda: theory_beta(3, 100, delta=0.1, lam=0.1, bound_theta=np.nan, bound_feature=1.0),
            "bound_theta",
        ),
        (
            lambda: ConfidenceSet(
                np.zeros(2),
                np.eye(2),
                np.inf,
                lam=1.0,
                n=1,
                kind="design",
                bound_feature=0.0,
                bound_theta=0.0,
            ),
            "beta",
        ),
        (
            lambda: ConfidenceSet(
                np.zeros(2),
                -np.eye(2),
                1.0,
                lam=1.0,
                n=1,
                kind="design",
                bound_feature=0.0,
                bound_theta=0.0,
            ),
            "M",
        ),
    ):
        with pytest.raises(DataValidationError) as info:
            fn()
        assert info.value.field == field
    # the valid ones still work
    assert beta_rate(3, 100, delta=0.5) > 0
    assert (
        ConfidenceSet.fit(
            Linear(l2=1e-2).fit(bt_data(n=60, d_x=None, d_phi=3)[0]),
            bt_data(n=60, d_x=None, d_phi=3)[0],
            beta=0.0,
            lam=0.5,
        ).lam
        == 0.5
    )


# ============================================================================= (a) convergence
def linear_gradient(data: PreferenceData, theta: np.ndarray, l2: float) -> np.ndarray:
    """Closed-form gradient of (1/N) Σ softplus(−s θᵀΔφ) + (l2/2)‖θ‖² (the oracle)."""
    sign = 2.0 * data.y - 1.0
    margin = data.delta_phi @ theta
    return -(data.delta_phi * (sign * sigmoid(-sign * margin))[:, None]).mean(axis=0) + l2 * theta


def test_iteration_cap_warns_and_converged_is_truthful():
    data, _ = bt_data(n=200, d_x=None, d_phi=5, seed=1)
    capped, caught = record(lambda: Linear(l2=1e-2, max_iter=1).fit(data))
    assert kinds(caught) == [ConvergenceWarning]
    message = str(caught[0].message)
    assert "Linear did not converge" in message and "max_iter" in message
    assert caught[0].filename == __file__  # the user's call site, not pluralign's internals
    grad = np.abs(linear_gradient(data, capped.theta_, 1e-2)).max()
    assert not capped.converged_ and grad > capped.tol
    assert grad == pytest.approx(capped.solver_info_.grad_max, rel=1e-6)

    normal, caught = record(lambda: Linear(l2=1e-2).fit(data))
    assert caught == []
    assert normal.converged_ and np.abs(linear_gradient(data, normal.theta_, 1e-2)).max() <= 1e-6


def test_tolerance_below_the_precision_floor_says_so():
    data, _ = bt_data(n=200, d_x=None, d_phi=5, seed=1)
    model, caught = record(lambda: Linear(l2=1e-2, tol=1e-15).fit(data))
    assert kinds(caught) == [ConvergenceWarning] and not model.converged_
    assert model.solver_info_.stop == "precision"
    assert "float64 precision" in str(caught[0].message)


@pytest.mark.parametrize(
    "make, data, owner",
    [
        (
            lambda: LowRank(2, max_iter=2),
            lambda: bt_data(n=200, d_x=4, d_phi=4, seed=2)[0],
            "LowRank",
        ),
        (lambda: PerUser(max_iter=1), _multi_user_data, "PerUser"),
        (lambda: Pooled(max_iter=1), _multi_user_data, "Pooled"),
        (lambda: SharedBasis(2, max_iter=2), _multi_user_data, "SharedBasis"),
    ],
)
def test_every_estimator_warns_once_under_its_own_name_when_capped(make, data, owner):
    fit_data = data()
    model, caught = record(lambda: make().fit(fit_data))
    assert kinds(caught) == [ConvergenceWarning]  # once: inner estimators stay quiet
    assert str(caught[0].message).startswith(f"{owner} did not converge")
    assert model.converged_ is False
    relaxed = make()
    relaxed.max_iter = 1000
    model, caught = record(lambda: relaxed.fit(fit_data))
    assert caught == [] and model.converged_


def test_rtv_refit_warns_when_capped():
    data = LowRankContextual(d_x=5, d_phi=5, rank=2, seed=0).sample_offline(400, seed=1)
    base = LowRank(2, l2=1e-3).fit(data)
    # another ridge moves the optimum, so one iteration cannot reach it
    reduced, caught = record(lambda: RTVReduced(base, l2=0.3, max_iter=1).fit(data))
    assert kinds(caught) == [ConvergenceWarning] and not reduced.converged_
    reduced, caught = record(lambda: RTVReduced(base, l2=0.3).fit(data))
    assert caught == [] and reduced.converged_


# ============================================================================= (b) separability
def brute_force_separable_2d(a: np.ndarray) -> bool:
    """Exact test in 2-D: the sign pattern of ``a_iᵀw`` on the circle only changes at the
    directions perpendicular to some ``a_i``, so those and the midpoints of the arcs between
    them are all the candidates for a w with every ``a_iᵀw ≥ 0`` and some ``> 0``."""
    a = a[np.linalg.norm(a, axis=1) > 0]
    critical = np.sort(
        np.mod(np.arctan2(a[:, 1], a[:, 0])[:, None] + [np.pi / 2, -np.pi / 2], 2 * np.pi).ravel()
    )
    mids = critical + np.diff(np.append(critical, critical[0] + 2 * np.pi)) / 2
    for angle in np.concatenate([critical, mids]):
        margins = a @ np.array([np.cos(angle), np.sin(angle)])
        margins[np.abs(margins) < 1e-12] = 0.0
        if margins.min() >= 0 and margins.max() > 0:
            return True
    return False


def test_separability_matches_a_brute_force_enumeration_in_2d():
    outcomes = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(4, 12))
        phi0, phi1 = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
        y = rng.integers(0, 2, size=n)
        data = PreferenceData(None, phi0, phi1, y)
        truth = brute_force_separable_2d((2.0 * y - 1.0)[:, None] * data.delta_phi)
        model, caught = record(lambda data=data: Linear(l2=0).fit(data))
        assert model.separable_ is truth, seed
        assert (SeparableDataWarning in kinds(caught)) is truth, seed
        outcomes.append(truth)
    assert any(outcomes) and not all(outcomes)  # both cases are exercised


def test_quasi_separable_data_warn_through_the_linear_program():
    """Separable along e1 except comparisons with Δφ ⊥ e1 (both labels, so not strictly
    separable): the MLE does not exist, yet no θ classifies every comparison correctly — the
    fitted-margin certificate cannot fire, only the LP finds w = e1."""
    rng = np.random.default_rng(0)
    first = np.column_stack([rng.uniform(0.5, 2.0, 40), rng.standard_normal(40)])
    flat = np.array([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0], [0.0, 0.5]])
    dphi = np.concatenate([first, flat])
    y = np.concatenate([np.ones(40, dtype=int), [1, 1, 0, 0]])
    data = PreferenceData(None, np.zeros_like(dphi), dphi, y)
    assert brute_force_separable_2d((2.0 * y - 1.0)[:, None] * dphi)
    model, caught = record(lambda: Linear(l2=0).fit(data))
    assert kinds(caught) == [SeparableDataWarning] and model.separable_
    assert np.any((2.0 * y - 1.0) * (dphi @ model.theta_) <= 0)  # not strictly separated
    assert "40 of 44 comparisons separated" in str(caught[0].message)


def _contextual(
    n: int, seed: int, *, noise: bool, rank_one: bool = False, context: bool = True
) -> PreferenceData:
    """Labels from ``xᵀΘΔφ`` (``θᵀΔφ`` without context): Bradley–Terry draws, or (``noise=False``)
    the sign of the margin, so that the truth separates the data by construction."""
    rng = np.random.default_rng(seed)
    x, phi0, phi1 = (
        rng.standard_normal((n, 3)),
        rng.standard_normal((n, 4)),
        rng.standard_normal((n, 4)),
    )
    theta = (
        np.outer(rng.standard_normal(3), rng.standard_normal(4))
        if rank_one
        else rng.standard_normal((3, 4))
    )
    margin = (
        np.einsum("ni,ij,nj->n", x, theta, phi1 - phi0) if context else (phi1 - phi0) @ theta[0]
    )
    y = (rng.random(n) < sigmoid(margin)) if noise else margin > 0
    return PreferenceData(x if context else None, phi0, phi1, y.astype(int))


@pytest.mark.parametrize(
    "make, context",
    [
        (lambda: Linear(l2=0), False),
        (lambda: Bilinear(l2=0), True),
        (lambda: LowRank(1, l2=0), True),
        (lambda: LowRank(2, l2=0), True),
    ],
)
def test_separable_data_warn_and_noisy_data_do_not(make, context):
    # a rank-one truth, so that every model (LowRank(1) too) contains a separating reward
    separable = _contextual(300, 0, noise=False, rank_one=True, context=context)
    model, caught = record(lambda: make().fit(separable))
    assert kinds(caught) == [SeparableDataWarning] and model.separable_ is True
    assert "does not exist" in str(caught[0].message)
    # the MLE really diverges: the loss at the estimate is ~0 and every comparison is correct
    assert model.log_likelihood(separable) > -1e-3

    noisy = _contextual(600, 1, noise=True, context=context)
    model, caught = record(lambda: make().fit(noisy))
    assert caught == [] and model.separable_ is False
    # the same data with a ridge never warn, separable or not
    ridged = make()
    ridged.l2 = 1e-3
    model, caught = record(lambda: ridged.fit(separable))
    assert caught == [] and model.separable_ is None


def test_non_separable_mle_exists_and_matches_unpenalized_sklearn():
    """No warning, and the l2 = 0 estimate is scikit-learn's finite unpenalized MLE."""
    noisy = _contextual(600, 1, noise=True, context=False)
    model, caught = record(lambda: Linear(l2=0, tol=1e-8).fit(noisy))
    assert caught == []
    ref = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-10, max_iter=10000)
    ref.fit(noisy.delta_phi, noisy.y)
    np.testing.assert_allclose(model.theta_, ref.coef_.ravel(), rtol=1e-4, atol=1e-5)


def _users_data(separable_user: str | None, seed: int = 0) -> PreferenceData:
    """Three users with their own θ_u on d_phi = 2; 120 noisy comparisons each, except that
    ``separable_user``'s labels are the sign of their margins."""
    rng = np.random.default_rng(seed)
    names = np.array(["ann", "bob", "cat"])
    thetas = 2.0 * rng.standard_normal((3, 2))
    index = np.repeat(np.arange(3), 120)
    phi0, phi1 = rng.standard_normal((360, 2)), rng.standard_normal((360, 2))
    margin = np.einsum("nd,nd->n", thetas[index], phi1 - phi0)
    y = rng.random(360) < sigmoid(margin)
    if separable_user is not None:
        mine = names[index] == separable_user
        y[mine] = margin[mine] > 0
    return PreferenceData(None, phi0, phi1, y.astype(int), users=names[index])


@pytest.mark.parametrize("make", [lambda: PerUser(l2=0), lambda: SharedBasis(2, l2=0)])
def test_a_user_with_separable_data_is_named(make):
    data = _users_data("bob")
    rows = data.users == "bob"
    assert brute_force_separable_2d((2.0 * data.y[rows] - 1.0)[:, None] * data.delta_phi[rows])
    for other in ("ann", "cat"):
        mask = data.users == other
        assert not brute_force_separable_2d(
            (2.0 * data.y[mask] - 1.0)[:, None] * data.delta_phi[mask]
        )
    model, caught = record(lambda: make().fit(data))
    assert kinds(caught) == [SeparableDataWarning] and model.separable_ is True
    message = str(caught[0].message)
    assert "'bob'" in message and "'ann'" not in message and "'cat'" not in message

    model, caught = record(lambda: make().fit(_users_data(None)))
    assert caught == [] and model.separable_ is False


def test_pooled_and_adapt_user_separability():
    data = _users_data(None)
    model, caught = record(lambda: Pooled(l2=0).fit(data))
    assert caught == [] and model.separable_ is False
    # a new user adapted without ridge from separable comparisons
    rng = np.random.default_rng(7)
    phi0, phi1 = rng.standard_normal((15, 2)), rng.standard_normal((15, 2))
    y = ((phi1 - phi0) @ np.array([1.0, -2.0]) > 0).astype(int)
    new = PreferenceData(None, phi0, phi1, y, users=np.array(["dan"] * 15))
    for model in (
        PerUser(l2=1e-2, adapt_l2=0.0).fit(data),
        SharedBasis(2, l2=1e-2, adapt_l2=0.0).fit(data),
    ):
        _, caught = record(lambda model=model: model.adapt_user(new))
        assert kinds(caught) == [SeparableDataWarning] and "'dan'" in str(caught[0].message)


# ============================================================================= (c) identifiability
def item_data(pairs: np.ndarray, n_items: int, seed: int) -> PreferenceData:
    """One-hot item comparisons; every pair appears with both outcomes (so no separation) plus
    Bradley–Terry draws."""
    rng = np.random.default_rng(seed)
    strengths = rng.standard_normal(n_items)
    both = np.concatenate([pairs, pairs])
    y = np.concatenate([np.ones(len(pairs)), np.zeros(len(pairs))])
    draws = pairs[rng.integers(0, len(pairs), size=3 * len(pairs))]
    p = sigmoid(strengths[draws[:, 1]] - strengths[draws[:, 0]])
    all_pairs = np.concatenate([both, draws])
    y = np.concatenate([y, rng.random(len(draws)) < p]).astype(int)
    eye = np.eye(n_items)
    return PreferenceData(None, eye[all_pairs[:, 0]], eye[all_pairs[:, 1]], y)


def n_components(pairs: np.ndarray, n_items: int, items: np.ndarray | None = None) -> int:
    """Connected components of the graph of ``pairs`` restricted to ``items`` (default: the
    items that appear in ``pairs``) — the oracle."""
    seen = np.unique(pairs) if items is None else items
    graph = sparse.coo_matrix(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n_items, n_items)
    )
    _, labels = connected_components(graph, directed=False)
    return len(np.unique(labels[seen]))


@pytest.mark.parametrize("seed", range(6))
def test_unidentified_directions_are_the_graph_components_minus_one(seed):
    rng = np.random.default_rng(seed)
    n_items = 10
    groups = np.array_split(rng.permutation(n_items), int(rng.integers(1, 5)))
    pairs = np.array(
        [rng.choice(g, 2, replace=False) for g in groups if len(g) > 1 for _ in range(3 * len(g))]
    )
    data = item_data(pairs, n_items, seed)
    model, caught = record(lambda: Linear(l2=0).fit(data))
    components = n_components(pairs, n_items)
    assert model.unidentified_ == components - 1
    assert SeparableDataWarning not in kinds(caught)
    assert (DisconnectedComparisonsWarning in kinds(caught)) is (components > 1)
    if components > 1:
        assert f"{components} connected components" in str(caught[-1].message)
    # the fallback: within each component the strengths sum to 0 — the minimum-norm solution,
    # so the unidentified offsets between components are 0
    _, labels = connected_components(
        sparse.coo_matrix(
            (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n_items, n_items)
        ),
        directed=False,
    )
    for label in np.unique(labels[np.unique(pairs)]):
        assert abs(model.theta_[labels == label].sum()) < 1e-9


def test_gauge_directions_and_ridge_do_not_warn():
    # a connected item graph (the common shift of all strengths is not identified, but changes
    # no reward difference) and a constant feature do not warn
    pairs = np.array([[0, 1], [1, 2], [2, 3], [3, 0]])
    _, caught = record(lambda: Linear(l2=0).fit(item_data(pairs, 4, 0)))
    assert caught == []
    data, _ = bt_data(n=300, d_x=None, d_phi=3, seed=3)
    with_constant = PreferenceData(
        None,
        np.column_stack([np.ones(300), data.phi0]),
        np.column_stack([np.ones(300), data.phi1]),
        data.y,
    )
    model, caught = record(lambda: Linear(l2=0).fit(with_constant))
    assert caught == [] and model.unidentified_ == 0
    # a disconnected graph with a ridge: the ridge identifies everything, no warning
    split = np.array([[0, 1], [2, 3]])
    model, caught = record(lambda: Linear(l2=1e-3).fit(item_data(split, 4, 0)))
    assert caught == [] and model.unidentified_ is None


def test_bilinear_with_fewer_comparisons_than_parameters_is_unidentified():
    data, _ = bt_data(n=8, d_x=3, d_phi=4, seed=4)  # p = 12 parameters > N = 8
    model, caught = record(lambda: Bilinear(l2=0).fit(data))
    assert model.unidentified_ == 12 - 8
    assert DisconnectedComparisonsWarning in kinds(caught)


def test_per_user_disconnection_names_the_user():
    """Items 0..5; 'ann' only compares items 0..2, the others link all six. Relative to the
    items in the data, ann's graph has 4 components ({0,1,2}, {3}, {4}, {5})."""
    n_items = 6
    linked = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 0]])
    partial = np.array([[0, 1], [1, 2], [2, 0]])
    parts = [
        item_data(linked, n_items, 1),
        item_data(partial, n_items, 2),
        item_data(linked, n_items, 3),
    ]
    names = np.concatenate([[u] * p.n for u, p in zip(("bob", "ann", "cat"), parts, strict=True)])
    data = PreferenceData(
        None,
        np.concatenate([p.phi0 for p in parts]),
        np.concatenate([p.phi1 for p in parts]),
        np.concatenate([p.y for p in parts]),
        users=names,
    )
    model, caught = record(lambda: PerUser(l2=0).fit(data))
    assert kinds(caught) == [DisconnectedComparisonsWarning]
    # ann's graph over the six items of the data: {0,1,2}, {3}, {4}, {5}
    assert model.unidentified_ == n_components(partial, n_items, np.arange(n_items)) - 1 == 3
    message = str(caught[0].message)
    assert "'ann'" in message and "'bob'" not in message
    # the same users with the ridge, or all linked: quiet
    _, caught = record(lambda: PerUser(l2=1e-3).fit(data))
    assert caught == []


# ============================================================================= (d) policy gaps
def test_pessimistic_frank_wolfe_gap_warning_states_gap_and_tol():
    model, cs, targets = _policy_problem()
    policy = Pessimistic(model, cs, tol=1e-12, max_iter=1)
    _, caught = record(lambda: policy.probs(targets))
    assert kinds(caught) == [ConvergenceWarning] and not policy.converged_
    message = str(caught[0].message)
    assert f"{policy.duality_gap_:.3g}" in message and "tol = 1e-12" in message
    policy = Pessimistic(model, cs, tol=1e-8)
    _, caught = record(lambda: policy.probs(targets))
    assert caught == [] and policy.converged_


def test_pessimistic_gibbs_option1_gap_warning():
    env = KLBandit(d=3, n_actions=4, eta=0.3, coverage=0.3, uncovered_dim=1, seed=21)
    data = env.sample_offline(150, seed=22)
    model = Linear(l2=1.0 / data.n).fit(data)
    cs = ConfidenceSet.fit(model, data, beta=0.5 * beta_rate(3, data.n))
    states = env.sample_targets(12, seed=23)
    policy = PessimisticGibbs(
        model, cs, env.eta, reference=env.reference_probs, tol=1e-14, max_iter=1
    )
    _, caught = record(lambda: policy.probs(states))
    assert kinds(caught) == [ConvergenceWarning] and not policy.converged_
    assert f"{policy.duality_gap_:.3g}" in str(caught[0].message)
    policy = PessimisticGibbs(model, cs, env.eta, reference=env.reference_probs, tol=1e-9)
    _, caught = record(lambda: policy.probs(states))
    assert caught == [] and policy.converged_


@pytest.mark.parametrize(
    "make",
    [
        lambda model, train, **kw: Utilitarian(model, train, beta=0.5, **kw),
        lambda model, train, **kw: Leximin(model, train, beta=0.5, levels=1, **kw),
    ],
)
def test_aggregated_policy_gap_warning(make):
    env = MultiUser(n_users=4, d_phi=4, rank=2, diversity=1.0, n_per_user=60, seed=3)
    train = env.sample_offline(seed=[1])
    model = PerUser(1e-2).fit(train)
    targets = env.sample_targets(8, seed=[2])
    policy = make(model, train, tol=1e-12, max_iter=1)
    _, caught = record(lambda: policy.probs(targets))
    assert kinds(caught) == [ConvergenceWarning] and not policy.converged_
    message = str(caught[0].message)
    assert f"{policy.duality_gap_:.3g}" in message and "tol = 1e-12" in message
    policy = make(model, train, tol=1e-6)
    _, caught = record(lambda: policy.probs(targets))
    assert caught == [] and policy.converged_
