"""The two convex multi-user baselines: ``PerUser`` (independent ``θ_u``) and ``Pooled`` (one
``θ`` for everybody).

* ``PerUser``: independent ``θ_u``, ``U·d_phi`` parameters. It is the full-rank ``Bilinear`` MLE
  on one-hot user contexts ``x = e_u`` (``xᵀΘφ = θ_uᵀφ``); with ridge ``λ`` on the mean loss the
  fit separates into one ridge-regularized MLE per user with ``λ_u = λ N / N_u``.
  ``PerUser.adapt_user`` fits a whole ``θ_new`` for a new user from their comparisons alone,
  with ridge ``λ_a = λ·N_train/n`` by default (as ``SharedBasis.adapt_user`` does for ``w``).
* ``Pooled``: one ``θ`` for everybody (``Linear`` on all the data) — the one-reward baseline.

What the multi-user models share (unknown users, per-user views, warnings) is described in
:mod:`pluralign.rewards.multi_user`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pluralign._linalg import contract
from pluralign.data import PreferenceData
from pluralign.rewards.diagnostics import response_basis
from pluralign.rewards.linear import Bilinear, Linear
from pluralign.rewards.multi_user import MultiUserModel
from pluralign.rewards.users import check_unknown_user, one_hot, training_users

__all__ = ["PerUser", "Pooled"]


class PerUser(MultiUserModel):
    """Independent ``θ_u`` per user: ``Bilinear`` on one-hot user contexts (see module doc).

    Parameters
    ----------
    l2:
        Ridge ``λ`` on the mean loss (user ``u``'s own problem has ``λ N / N_u``).
    unknown_user:
        ``"error"`` (default) or ``"shared"`` (unknown users get the average ``θ̂_u``).
    adapt_l2:
        Ridge of :meth:`adapt_user` (default ``λ N_train / n``).
    tol, max_iter, dtype, device:
        As for every :class:`~pluralign.rewards.BradleyTerryModel`.

    Learned: ``thetas_`` (U, d_phi), ``theta0_`` (their mean), ``users_``, ``user_counts_``,
    ``separable_``, ``unidentified_`` (see the module docstring's warnings).
    """

    def __init__(
        self,
        l2: float = 1e-3,
        *,
        unknown_user: str = "error",
        adapt_l2: float | None = None,
        tol: float = 1e-6,
        max_iter: int = 1000,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        self.l2 = l2
        self.unknown_user = unknown_user
        self.adapt_l2 = adapt_l2
        self.tol, self.max_iter, self.dtype, self.device = tol, max_iter, dtype, device

    def fit(self, data: PreferenceData, y: None = None) -> PerUser:
        """Per-user ridge MLEs, fitted jointly (one vectorized solve); returns ``self``.

        With ``l2 = 0`` each user's own comparisons are tested for separability and for
        directions of ``span{φ − φ′}`` (over all training responses) they leave uninformed.
        ``y``: ``None`` or ``data.y`` (scikit-learn's ``fit(X, y)``)."""
        self._check_y(data, y)
        self._check_params()
        check_unknown_user(self.unknown_user)
        users, index = training_users(data, type(self).__name__)
        x = one_hot(index, len(users))
        inner = Bilinear(
            l2=self.l2, tol=self.tol, max_iter=self.max_iter, dtype=self.dtype, device=self.device
        )
        inner._quiet = True
        inner.fit(PreferenceData(x, data.phi0, data.phi1, data.y))
        self.thetas_ = inner.theta_.copy()
        self.theta0_ = self.thetas_.mean(axis=0)
        self._finish(users, np.bincount(index, minlength=len(users)), data, inner)
        dphi = data.delta_phi
        margins = (2.0 * data.y - 1.0) * contract(self.thetas_[index], dphi)
        self._per_user_warnings(
            "PerUser",
            inner,
            self.l2,
            dphi,
            data,
            index,
            users,
            self.thetas_,
            margins=margins,
            span=response_basis(data.phi0, data.phi1),
        )
        return self

    def adapt_user(self, data: PreferenceData, user: Any = None) -> PerUser:
        """Fit new users' ``θ`` from their comparisons alone (ridge ``adapt_l2``); warns as
        :meth:`fit` does (with ``adapt_l2 = 0``, per new user)."""
        self._check_params()
        new, index, counts = self._new_user_rows(data, user)
        l2 = self._adapt_l2(data.n)
        inner = Bilinear(l2=l2, tol=self.tol, max_iter=self.max_iter)
        inner._quiet = True
        inner.fit(PreferenceData(one_hot(index, len(new)), data.phi0, data.phi1, data.y))
        self._append_users(new, counts, inner.theta_)
        dphi = data.delta_phi
        margins = (2.0 * data.y - 1.0) * contract(inner.theta_[index], dphi)
        self._per_user_warnings(
            "PerUser.adapt_user",
            inner,
            l2,
            dphi,
            data,
            index,
            new,
            inner.theta_,
            margins=margins,
            span=response_basis(data.phi0, data.phi1),
            record=False,
        )
        return self


class Pooled(MultiUserModel):
    """One reward ``θ`` for every user: ``Linear`` fitted on everybody's comparisons.

    Any user id (known or not) gets ``θ``. Its per-user view uses all comparisons for the
    confidence set, since every comparison informs the one ``θ``.
    """

    unknown_user = "shared"  # not a hyper-parameter: every id gets the one θ

    def __init__(
        self,
        l2: float = 1e-3,
        *,
        tol: float = 1e-6,
        max_iter: int = 1000,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        self.l2 = l2
        self.tol, self.max_iter, self.dtype, self.device = tol, max_iter, dtype, device

    def fit(self, data: PreferenceData, y: None = None) -> Pooled:
        """The pooled ridge MLE; returns ``self`` (warns as :class:`Linear` does; ``y``: ``None``
        or ``data.y``)."""
        self._check_y(data, y)
        self._check_params()
        users, index = (
            training_users(data, type(self).__name__)
            if data.users is not None
            else (np.array([], dtype=np.int64), np.zeros(data.n, dtype=np.int64))
        )
        inner = Linear(
            l2=self.l2, tol=self.tol, max_iter=self.max_iter, dtype=self.dtype, device=self.device
        )
        inner._quiet = True
        inner.fit(data)
        self.theta0_ = inner.theta_.copy()
        self.thetas_ = np.tile(self.theta0_, (len(users), 1))
        self._finish(users, np.bincount(index, minlength=len(users)), data, inner)
        inner._diagnose(data, owner="Pooled")
        self._copy_diagnostics(inner)
        return self

    def margins(self, data: PreferenceData) -> np.ndarray:
        self._check_fitted()
        return data.delta_phi @ self.theta0_

    def user_theta(self, users: Any) -> np.ndarray:
        self._check_fitted()
        n = np.atleast_1d(np.asarray(users)).shape[0]
        return np.tile(self.theta0_, (n, 1))

    def user_l2(self, user: Any) -> float:
        return float(self.l2)

    def confidence_rows(self, user: Any, data: PreferenceData) -> PreferenceData:
        return data

    def per_user_accuracy(self, data: PreferenceData) -> dict[Any, tuple[float, int]]:
        if data.users is None:
            return {None: (self.accuracy(data), data.n)}
        return super().per_user_accuracy(data)
