"""The per-user view of a multi-user reward model: one user's reward as a model linear in its
parameters, ``θ_u = A v``, usable with :class:`~pluralign.confidence.ConfidenceSet` and the
pessimistic policies (see :mod:`pluralign.rewards.multi_user`, "Per-user views").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError
from pluralign.rewards.base import RewardModel
from pluralign.rewards.linear import Linear, LinearInParameters
from pluralign.rewards.validation import check_number, check_phi

__all__ = ["UserReward"]


class UserReward(LinearInParameters, RewardModel):
    """One user's reward ``r(φ) = (A v)ᵀφ``: linear in ``v`` with features ``z = Aᵀφ``.

    Parameters
    ----------
    basis:
        ``A`` (d_phi, p), fixed.
    l2:
        The ridge ``λ`` of the user's own problem (confidence sets use it as their ``λ``).
    user:
        The user id (informational).

    Context ``x`` is ignored: the user is fixed. ``fit`` estimates ``v`` (``params_``);
    :meth:`fitted` builds a view whose ``v`` is known (what
    :meth:`~pluralign.rewards.MultiUserModel.user_model` returns). ``clone`` gives an unfitted
    view either way: ``v`` is fitted state, not a hyper-parameter.
    """

    def __init__(self, basis: np.ndarray, *, l2: float = 1e-3, user: Any = None) -> None:
        self.basis = basis
        self.l2 = l2
        self.user = user

    @classmethod
    def fitted(
        cls, basis: np.ndarray, params: np.ndarray, *, l2: float = 1e-3, user: Any = None
    ) -> UserReward:
        """A fitted view with parameters ``v = params`` (``(p,)``, copied), without a fit."""
        view = cls(basis, l2=l2, user=user)
        view.d_phi_ = view._basis().shape[0]
        view.params_ = np.asarray(params, dtype=np.float64).copy()
        view.is_fitted_ = True
        return view

    def _basis(self) -> np.ndarray:
        """``A`` as a float64 matrix (``basis`` as given otherwise); refuses a non-matrix."""
        basis = np.asarray(self.basis, dtype=np.float64)
        if basis.ndim != 2:
            raise DataValidationError(f"must be (d_phi, p), got {basis.shape}", field="basis")
        return basis

    def fit(self, data: PreferenceData, y: None = None) -> UserReward:
        """Ridge Bradley–Terry MLE of ``v`` on ``data`` (features ``Aᵀφ``); returns ``self``.

        Warns like :class:`~pluralign.rewards.Linear` on the features ``Aᵀφ``. ``y``: ``None``
        or ``data.y`` (scikit-learn's ``fit(X, y)``)."""
        self._check_y(data, y)
        check_number(self.l2, "l2", owner="UserReward")
        basis = self._basis()
        z0, z1 = data.phi0 @ basis, data.phi1 @ basis
        inner = Linear(l2=self.l2)
        inner._quiet = True
        reduced = PreferenceData(None, z0, z1, data.y)
        inner.fit(reduced)
        self.d_phi_ = basis.shape[0]
        self.params_ = inner.theta_.copy()
        self.solver_info_ = inner.solver_info_
        self.converged_ = inner.converged_
        self.is_fitted_ = True
        inner._diagnose(reduced, owner=f"UserReward(user={self.user!r})")
        self.separable_, self.unidentified_ = inner.separable_, inner.unidentified_
        return self

    @property
    def theta_(self) -> np.ndarray:
        """``θ = A v`` (d_phi,)."""
        self._check_fitted()
        return self._basis() @ self.params_

    def features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        basis = self._basis()
        return check_phi("UserReward", phi, basis.shape[0]) @ basis

    def reward_at(self, params: np.ndarray, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        basis = self._basis()
        return check_phi("UserReward", phi, basis.shape[0]) @ (basis @ params)

    def mean_features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        basis = self._basis()
        return check_phi("UserReward", phi, basis.shape[0]).mean(axis=0) @ basis
