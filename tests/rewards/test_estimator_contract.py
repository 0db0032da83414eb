"""One estimator contract for every estimator class (issue 15, item 2).

Every concrete reward estimator in :mod:`pluralign.rewards` (found by walking the subclasses of
``RewardModel``, so a new class must join this file) gets ``get_params``/``set_params``/``repr``
and the fitted check from the one ``EstimatorMixin``, and its ``__init__`` only stores its
hyper-parameters. The oracle for "stores them verbatim" is scikit-learn's ``clone``, which
refuses an estimator whose constructor changes or drops a parameter.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable

import numpy as np
import pytest
from conftest import bt_data
from sklearn.base import clone

import pluralign.rewards
from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError, NotFittedError
from pluralign.features import RTVMap
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
from pluralign.rewards.base import EstimatorMixin, RewardModel
from pluralign.rewards.shared_basis import _FrozenBasis

D_X, D_PHI = 3, 4


def _data() -> PreferenceData:
    """120 comparisons with 3-d contexts, d_phi = 4 and 5 users (seeded)."""
    return bt_data(n=120, d_x=D_X, d_phi=D_PHI, seed=0, users=True)[0]


def _fitted_lowrank() -> LowRank:
    return LowRank(rank=1, l2=1e-2).fit(_data())


# Each estimator class with non-default hyper-parameters.
MAKERS: dict[type, Callable[[], RewardModel]] = {
    Linear: lambda: Linear(l2=0.05, tol=1e-7),
    Bilinear: lambda: Bilinear(l2=0.02, max_iter=400),
    LowRank: lambda: LowRank(rank=1, l2=0.01, seed=3, init="random"),
    RTVReduced: lambda: RTVReduced(_fitted_lowrank(), l2=0.03),
    PerUser: lambda: PerUser(l2=0.02, unknown_user="shared", adapt_l2=0.5),
    Pooled: lambda: Pooled(l2=0.04, tol=1e-7),
    SharedBasis: lambda: SharedBasis(rank=1, l2=0.01, seed=2),
    Contextual: lambda: Contextual(rank=1, l2=0.02, standardize=False),
    UserReward: lambda: UserReward(np.eye(D_PHI)[:, :2], l2=0.07, user=3),
    _FrozenBasis: lambda: _FrozenBasis(np.ones(D_PHI), np.eye(D_PHI)[:, :2], 5, l2=0.1),
}
CLASSES = list(MAKERS)
IDS = [cls.__name__ for cls in CLASSES]


def _estimator_classes() -> set[type]:
    """Every concrete subclass of ``RewardModel`` defined in ``pluralign.rewards``."""
    for info in pkgutil.iter_modules(pluralign.rewards.__path__):
        importlib.import_module(f"pluralign.rewards.{info.name}")
    found, stack = set(), [RewardModel]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if not inspect.isabstract(sub) and sub.__module__.startswith("pluralign.rewards."):
                found.add(sub)
    return found


def test_every_estimator_class_is_checked_here():
    assert _estimator_classes() == set(MAKERS)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_the_contract_comes_from_the_one_mixin(cls):
    for name in ("get_params", "set_params", "__repr__", "_check_fitted", "_get_param_names"):
        owner = next(klass for klass in cls.__mro__ if name in vars(klass))
        assert owner is EstimatorMixin, (name, owner)  # defined once, copied nowhere


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_get_params_round_trips_through_the_constructor(cls):
    model = MAKERS[cls]()
    params = model.get_params()
    again = type(model)(**params)
    assert again.get_params() == params
    # stored verbatim: the very objects given, as scikit-learn's clone requires
    assert all(again.get_params()[k] is v for k, v in params.items())
    copy = clone(model)  # raises if a constructor changed or dropped a parameter
    cloned = copy.get_params()
    assert type(copy) is cls and cloned.keys() == params.keys()
    for key, value in params.items():
        if isinstance(value, np.ndarray):  # clone deep-copies arrays
            np.testing.assert_array_equal(cloned[key], value)
        else:
            assert cloned[key] is value or cloned[key] == value, key


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_init_only_stores_the_hyper_parameters(cls):
    model = type(made := MAKERS[cls]())(**made.get_params(deep=False))
    assert set(vars(model)) == set(model.get_params(deep=False))
    assert not getattr(model, "is_fitted_", False)
    text = repr(model)
    assert text.startswith(f"{cls.__name__}(") and "l2=" in text


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_an_unfitted_estimator_refuses_to_predict(cls):
    model, data = MAKERS[cls](), _data()
    x = data.users if isinstance(model, MultiUserModel) else data.x
    with pytest.raises(NotFittedError, match=f"{cls.__name__} is not fitted"):
        model.predict_proba(data)
    with pytest.raises(NotFittedError):
        model.log_likelihood(data)
    with pytest.raises(NotFittedError):
        model.reward(x, data.phi1)


def test_pooled_gives_every_user_its_one_theta_without_a_hyper_parameter():
    model = Pooled()
    assert model.unknown_user == "shared" and "unknown_user" not in model.get_params()
    fitted = model.fit(_data())
    np.testing.assert_array_equal(
        fitted.reward(["nobody"], _data().phi1), _data().phi1 @ fitted.theta0_
    )


def test_user_reward_fitted_is_the_view_with_known_parameters():
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((D_PHI, 2)))[0]
    params = np.array([0.5, -2.0])
    view = UserReward.fitted(basis, params, l2=0.3, user="u")
    assert view.is_fitted_ and view.d_phi_ == D_PHI
    phi = _data().phi1
    np.testing.assert_allclose(view.reward(None, phi), phi @ (basis @ params), atol=1e-12)
    np.testing.assert_allclose(view.theta_, basis @ params, atol=1e-12)
    params[0] = 99.0  # copied, not aliased
    assert view.params_[0] == 0.5
    assert not getattr(clone(view), "is_fitted_", False)
    with pytest.raises(DataValidationError) as info:
        UserReward.fitted(np.ones(D_PHI), np.ones(1))
    assert info.value.field == "basis"


def test_user_model_is_a_fitted_view_of_the_users_theta():
    data = _data()
    model = SharedBasis(rank=1, l2=0.01).fit(
        PreferenceData(None, data.phi0, data.phi1, data.y, data.users)
    )
    for user in model.users_.tolist():
        view = model.user_model(user)
        assert isinstance(view, UserReward) and view.is_fitted_
        np.testing.assert_allclose(view.theta_, model.user_theta(user)[0], atol=1e-10)


def test_rtv_reduced_builds_its_map_in_fit_not_in_validation():
    base = _fitted_lowrank()
    model = RTVReduced(base, l2=0.03)
    assert not hasattr(model, "rtv_")
    with pytest.raises(DataValidationError):  # refused by validation: nothing is learned
        model.fit(PreferenceData(None, _data().phi0, _data().phi1, _data().y))
    assert not hasattr(model, "rtv_")
    model.fit(_data())
    expected = RTVMap.from_frames(base.U_, base.V_)
    np.testing.assert_array_equal(model.rtv_.U, expected.U)
    np.testing.assert_array_equal(model.rtv_.V, expected.V)
    assert model.rtv_.rank == expected.rank == 1
