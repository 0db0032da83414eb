"""scikit-learn's estimator protocol on the reward models (issue 14, item 8).

``clone`` / ``get_params`` / ``set_params`` / ``score`` on every estimator, ``PreferenceData`` as
scikit-learn's ``X``, and ``GridSearchCV`` with a per-user ``GroupKFold`` checked against a
hand-written loop over the same folds (the oracle).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
from conftest import bt_data
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.utils import _safe_indexing, indexable
from sklearn.utils.validation import _num_samples

from pluralign.data import PreferenceData
from pluralign.envs import MultiUser
from pluralign.errors import DataValidationError, NotFittedError
from pluralign.rewards import (
    Bilinear,
    Contextual,
    Linear,
    LowRank,
    MultiUserModel,
    PerUser,
    Pooled,
    RTVReduced,
    SharedBasis,
    UserReward,
)


# ------------------------------------------------------------------------------ data
def multi_user_data(seed: int = 1) -> PreferenceData:
    """9 users × 40 comparisons, d_phi = 5, true shared basis of rank 2 (seeded)."""
    env = MultiUser(n_users=9, d_phi=5, rank=2, diversity=1.0, n_per_user=40, seed=3)
    return env.sample_offline(seed=[seed])


def contextual_data(seed: int = 0) -> PreferenceData:
    """300 comparisons with 3-d contexts, d_phi = 4 (seeded)."""
    return bt_data(n=300, d_x=3, d_phi=4, seed=seed)[0]


def users_with_contexts_data(seed: int = 0) -> PreferenceData:
    """8 users × 30 comparisons with 3-d user contexts, d_phi = 5 (seeded)."""
    env = MultiUser(
        n_users=8, d_phi=5, rank=2, n_per_user=30, seed=seed, d_context=3, context_noise=0.2
    )
    return env.sample_offline(seed=[seed])


def _fitted_lowrank() -> LowRank:
    return LowRank(rank=1, l2=1e-2, tol=1e-8).fit(contextual_data())


# Each case: (name, a maker of the estimator with non-default hyper-parameters, its data,
# hyper-parameters to change in the set_params round trip).
CASES: list[tuple[str, Callable[[], object], Callable[[], PreferenceData], dict]] = [
    (
        "Linear",
        lambda: Linear(l2=0.05, tol=1e-7, max_iter=500),
        multi_user_data,
        {"l2": 0.2, "max_iter": 300},
    ),
    ("Bilinear", lambda: Bilinear(l2=0.02, tol=1e-7), contextual_data, {"l2": 0.3, "tol": 1e-5}),
    (
        "LowRank",
        lambda: LowRank(rank=2, l2=0.01, balance=1e-3, init="random", seed=4),
        contextual_data,
        {"rank": 1, "seed": 9},
    ),
    (
        "RTVReduced",
        lambda: RTVReduced(_fitted_lowrank(), l2=0.03, tol=1e-7),
        contextual_data,
        {"l2": 0.1, "max_iter": 200},
    ),
    (
        "PerUser",
        lambda: PerUser(l2=0.02, unknown_user="shared", adapt_l2=0.5),
        multi_user_data,
        {"l2": 0.1, "unknown_user": "error"},
    ),
    ("Pooled", lambda: Pooled(l2=0.04, tol=1e-7), multi_user_data, {"l2": 0.5}),
    (
        "SharedBasis",
        lambda: SharedBasis(rank=3, l2=0.01, unknown_user="shared", seed=2),
        multi_user_data,
        {"rank": 1, "l2": 0.1},
    ),
    (
        "Contextual",
        lambda: Contextual(rank=2, l2=0.02, unknown_user="shared", seed=3),
        users_with_contexts_data,
        {"rank": 1, "standardize": False},
    ),
    (
        "UserReward",
        lambda: UserReward.fitted(np.eye(5)[:, :3], np.ones(3), l2=0.07, user=4),
        multi_user_data,
        {"l2": 0.3, "user": 5},
    ),
]
IDS = [case[0] for case in CASES]
CASES_ONLY = [case[1:] for case in CASES]


def rewards_on(model, data: PreferenceData) -> np.ndarray:
    """The model's rewards of ``data.phi1`` (users as ``x`` for multi-user models)."""
    x = data.users if isinstance(model, MultiUserModel) else data.x
    return model.reward(x, data.phi1)


def same_params(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        left, right = a[key], b[key]
        if isinstance(left, np.ndarray) or isinstance(right, np.ndarray):
            if not np.array_equal(left, right):
                return False
        elif left is not right and left != right:
            return False
    return True


# ----------------------------------------------------------------------------- clone
@pytest.mark.parametrize("make, data, _", CASES_ONLY, ids=IDS)
def test_clone_gives_an_unfitted_estimator_with_equal_params(make, data, _):
    train = data()
    model = make().fit(train)
    copy = clone(model)
    assert type(copy) is type(model) and copy is not model
    assert same_params(copy.get_params(deep=False), model.get_params(deep=False))
    assert same_params(copy.get_params(deep=True), model.get_params(deep=True))
    assert not getattr(copy, "is_fitted_", False)
    with pytest.raises(NotFittedError):
        rewards_on(copy, train)
    # the clone carries the hyper-parameters that matter: the same fit, bit for bit
    np.testing.assert_array_equal(rewards_on(copy.fit(train), train), rewards_on(model, train))
    assert model.is_fitted_  # cloning and refitting left the original alone


def test_clone_of_rtv_reduced_keeps_its_fitted_base_and_does_not_expose_its_params():
    base = _fitted_lowrank()
    model = RTVReduced(base, l2=0.03)
    copy = clone(model)
    assert copy.base is base and base.is_fitted_
    assert set(model.get_params(deep=True)) == {"base", "l2", "tol", "max_iter", "dtype", "device"}
    with pytest.raises(DataValidationError, match="fitted input") as info:
        model.set_params(base__l2=1.0)
    assert info.value.field == "base__l2" and base.l2 == 1e-2


def test_get_params_lists_the_init_arguments_in_order_and_deep_changes_nothing_flat():
    model = SharedBasis(rank=3, l2=0.5, seed=7)
    assert list(model.get_params(deep=False)) == [
        "rank",
        "l2",
        "unknown_user",
        "adapt_l2",
        "balance",
        "init",
        "seed",
        "dense_svd_limit",
        "tol",
        "max_iter",
        "dtype",
        "device",
    ]
    assert model.get_params(deep=True) == model.get_params(deep=False) == model.get_params()
    assert model.get_params()["rank"] == 3 and model.get_params()["seed"] == 7
    # UserReward's parameters ``v`` are fitted state (``UserReward.fitted``), not hyper-parameters
    assert list(UserReward(np.eye(2)).get_params()) == ["basis", "l2", "user"]
    assert list(UserReward.fitted(np.eye(2), np.ones(2)).get_params()) == ["basis", "l2", "user"]


# ------------------------------------------------------------------------ set_params
@pytest.mark.parametrize("make, data, changes", CASES_ONLY, ids=IDS)
def test_set_params_round_trips_and_refuses_unknown_names(make, data, changes):
    model = make()
    before = model.get_params(deep=False)
    assert model.set_params(**changes) is model
    after = model.get_params(deep=False)
    for name, value in changes.items():
        assert after[name] is value
    untouched = {k: v for k, v in before.items() if k not in changes}
    assert same_params({k: after[k] for k in untouched}, untouched)
    model.set_params(**{name: before[name] for name in changes})
    assert same_params(model.get_params(deep=False), before)
    assert model.set_params() is model

    name = next(iter(changes))
    with pytest.raises(ValueError, match="invalid parameter 'not_a_param'") as info:
        model.set_params(**{name: changes[name], "not_a_param": 1})
    assert isinstance(info.value, DataValidationError) and info.value.field == "not_a_param"
    assert ", ".join(before) in str(info.value)  # the message names every valid parameter
    assert model.get_params(deep=False)[name] is before[name]  # refused as a whole
    with pytest.raises(DataValidationError, match="not an estimator"):
        model.set_params(**{f"{name}__inner": 1})


def test_set_params_values_are_checked_at_fit_like_the_constructors():
    model = SharedBasis().set_params(l2=-1.0)
    assert model.l2 == -1.0
    with pytest.raises(DataValidationError) as info:
        model.fit(multi_user_data())
    assert info.value.field == "l2"


# ----------------------------------------------------------------------------- score
@pytest.mark.parametrize("make, data, _", CASES_ONLY, ids=IDS)
def test_score_is_the_held_out_log_likelihood(make, data, _):
    train, test = data(seed=1), data(seed=2)
    model = make().fit(train)
    held_out = model.score(test)
    assert isinstance(held_out, float)
    assert held_out == model.log_likelihood(test)
    assert model.score(test, test.y) == held_out  # y may be given as data.y itself
    assert held_out != model.score(train)  # it reads the data it is given
    with pytest.raises(DataValidationError) as info:
        model.score(test, 1 - test.y)
    assert info.value.field == "y"


def test_score_is_the_mean_bradley_terry_log_likelihood():
    """Against the formula: mean log σ(s_i θ̂ᵀΔφ_i) with s_i = 2y_i − 1, for Linear."""
    train, test = multi_user_data(1), multi_user_data(2)
    model = Linear(l2=0.05).fit(train)
    margins = (2.0 * test.y - 1.0) * (test.delta_phi @ model.theta_)
    expected = float(np.mean(-np.log1p(np.exp(-margins))))
    assert model.score(test) == pytest.approx(expected, abs=1e-12)
    assert model.score(test) < 0


def test_fit_accepts_y_none_or_the_data_labels_and_refuses_other_labels():
    data = multi_user_data()
    plain = SharedBasis(rank=2, l2=0.01).fit(data)
    with_y = SharedBasis(rank=2, l2=0.01).fit(data, data.y)
    np.testing.assert_array_equal(with_y.thetas_, plain.thetas_)
    for model in (
        SharedBasis(rank=2),
        PerUser(),
        Pooled(),
        Linear(),
        LowRank(1),
        UserReward(np.eye(5)),
    ):
        fitting = data if not isinstance(model, LowRank) else contextual_data()
        with pytest.raises(DataValidationError) as info:
            model.fit(fitting, np.zeros(fitting.n))
        assert info.value.field == "y"
        assert not getattr(model, "is_fitted_", False)


# --------------------------------------------------------------- PreferenceData as X
def test_preference_data_is_indexable_as_scikit_learn_needs():
    data = multi_user_data()
    rows = np.array([5, 0, 17, 299])
    mask = data.users == 2

    def same(a: PreferenceData, b: PreferenceData) -> None:
        assert isinstance(a, PreferenceData) and a.x is None and b.x is None
        for field in ("phi0", "phi1", "y", "users"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))

    assert len(data) == data.shape[0] == _num_samples(data) == 360
    assert data.shape == (360,)
    assert indexable(data)[0] is data
    same(data[rows], data.subset(rows))
    same(data[rows, ...], data.subset(rows))
    same(data[list(rows)], data.subset(rows))
    same(data[mask], data.subset(mask))
    same(data[10:20], data.subset(slice(10, 20)))
    same(_safe_indexing(data, rows), data.subset(rows))
    same(_safe_indexing(data, mask), data.subset(mask))
    contextual = contextual_data()
    np.testing.assert_array_equal(contextual[rows].x, contextual.x[rows])
    for scalar in (0, np.int64(3)):
        with pytest.raises(TypeError, match=r"data\[\[i\]\]"):
            data[scalar]
    with pytest.raises(TypeError, match="not iterable"):
        iter(data)
    # NumPy still sees one object, as before PreferenceData had __getitem__
    assert np.asarray(data).shape == () and np.asarray(data)[()] is data
    pair = np.array([data, contextual], dtype=object)
    assert pair.shape == (2,) and pair[0] is data and pair[1] is contextual


# --------------------------------------------------------------------- GridSearchCV
def test_grid_search_with_a_per_user_group_split_matches_a_hand_written_loop():
    data = multi_user_data()
    grid = {"rank": [1, 2, 3], "l2": [1e-3, 0.3]}
    folds = list(GroupKFold(n_splits=3).split(data, groups=data.users))
    for train, test in folds:  # a per-user split: every user is on one side only
        assert not set(data.users[train]) & set(data.users[test])

    search = GridSearchCV(
        SharedBasis(unknown_user="shared"),
        param_grid=grid,
        cv=GroupKFold(n_splits=3),
        error_score="raise",
    )
    assert search.fit(data, groups=data.users) is search

    # the oracle: every candidate fitted and scored by hand on the same folds
    oracle = {}
    for rank, l2 in itertools.product(grid["rank"], grid["l2"]):
        scores = []
        for train, test in folds:
            model = SharedBasis(rank=rank, l2=l2, unknown_user="shared")
            model.fit(data.subset(train))
            scores.append(model.log_likelihood(data.subset(test)))
        oracle[(rank, l2)] = scores

    results = search.cv_results_
    assert len(results["params"]) == len(oracle)
    for i, params in enumerate(results["params"]):
        scores = oracle[(params["rank"], params["l2"])]
        assert results["mean_test_score"][i] == pytest.approx(np.mean(scores), abs=1e-10)
        for fold, score in enumerate(scores):
            assert results[f"split{fold}_test_score"][i] == pytest.approx(score, abs=1e-10)
    best = max(oracle, key=lambda key: np.mean(oracle[key]))
    assert search.best_params_ == {"rank": best[0], "l2": best[1]}
    assert search.best_score_ == pytest.approx(np.mean(oracle[best]), abs=1e-10)
    # the candidates really differ, so the argmax is a real check
    means = sorted(np.mean(s) for s in oracle.values())
    assert means[-1] - means[-2] > 1e-6
    # refit on all the data with the best hyper-parameters
    refit = SharedBasis(rank=best[0], l2=best[1], unknown_user="shared").fit(data)
    np.testing.assert_array_equal(search.best_estimator_.thetas_, refit.thetas_)
    assert search.score(data) == refit.score(data)


def test_grid_search_per_user_split_needs_a_fallback_for_held_out_users():
    """With unknown_user="error", a user held out of training cannot be scored."""
    data = multi_user_data()
    search = GridSearchCV(Pooled(), {"l2": [1e-3]}, cv=GroupKFold(n_splits=3), error_score="raise")
    search.fit(data, groups=data.users)  # Pooled gives every user its one θ
    assert np.isfinite(search.best_score_)
    search = GridSearchCV(PerUser(), {"l2": [1e-3]}, cv=GroupKFold(n_splits=3), error_score="raise")
    with pytest.raises(DataValidationError, match="unknown user"):
        search.fit(data, groups=data.users)
