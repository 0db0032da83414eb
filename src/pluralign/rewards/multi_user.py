"""The shared base of the personalized reward models for many users (:class:`MultiUserModel`).

User ``u``'s reward is linear in the response features, ``r_u(φ) = θ_uᵀφ``; the models differ
in how the ``θ_u`` are tied together (Liu et al. 2025, "A Shared Low-Rank Adaptation Approach
to Personalized RLHF", P-ShareLoRA, arXiv 2503.19201, linear case):

* :class:`~pluralign.rewards.PerUser`: independent ``θ_u`` (:mod:`pluralign.rewards.per_user`);
* :class:`~pluralign.rewards.Pooled`: one ``θ`` for everybody, the one-reward baseline (same
  module);
* :class:`~pluralign.rewards.SharedBasis`: ``θ_u = θ0 + B w_u`` with a shared basis ``B``
  (:mod:`pluralign.rewards.shared_basis`);
* :class:`~pluralign.rewards.Contextual`: ``θ(x) = θ0 + R Lᵀ z(x)`` from user contexts
  (:mod:`pluralign.rewards.contextual`).

This module holds what they share: prediction from user ids, the per-user views, adaptation
bookkeeping, the warnings of fits that separate per user, and the arrays saved by
:mod:`pluralign.rewards.persistence`. User ids and their lookup are
:mod:`pluralign.rewards.users`.

**Unknown users** at prediction time raise a ``DataValidationError`` naming them, unless
``unknown_user="shared"``: then they get the shared reward ``theta0_`` (``θ0`` for
``SharedBasis``, the average ``θ̂_u`` for ``PerUser``; ``Pooled`` gives everybody its one ``θ``).

**Per-user views** (``user_model(u)``): user ``u``'s reward as a model linear in a parameter
vector ``v``, ``θ_u = A v`` (:class:`~pluralign.rewards.UserReward`), usable with
:class:`~pluralign.confidence.ConfidenceSet` and the pessimistic policies. ``A = I`` for
``PerUser`` and ``Pooled``; for ``SharedBasis`` ``A`` is an orthonormal basis of
``span{θ̂0, B̂}`` (dimension ``r+1``, ``r = rank``), so a user's confidence set lives in the
reduced space that the shared structure leaves uncertain — P-ShareLoRA's per-user pessimism, the
analogue of LoCo-RLHF's pessimism in a reduced subspace (Lee, Sun & Liu 2024, arXiv 2412.19436).

**Warnings** (see :class:`~pluralign.rewards.BradleyTerryModel`): each model warns under its own
name, never through its inner estimator. ``ConvergenceWarning`` when the inner solver stopped
unconverged. With ``l2 = 0`` (or ``adapt_l2 = 0`` in ``adapt_user``), ``SeparableDataWarning``
names the users whose MLE does not exist: ``PerUser`` and ``adapt_user`` separate per user, so the
exact test runs on each user's own comparisons (a user with separable data warns even if nobody
else's are); ``Pooled`` tests the pooled data; ``SharedBasis`` applies ``LowRank``'s test (the
conditional problems with ``B̂`` or ``Ŵ`` fixed; the first is per user). ``PerUser`` and
``Pooled`` also issue ``DisconnectedComparisonsWarning`` for directions in which a user's
comparisons leave their reward differences between the training responses uninformed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pluralign._linalg import contract
from pluralign.data import PreferenceData
from pluralign.errors import (
    ConvergenceWarning,
    DataValidationError,
    DisconnectedComparisonsWarning,
    SeparableDataWarning,
)
from pluralign.rewards.base import BradleyTerryModel, RewardModel, log_sigmoid
from pluralign.rewards.diagnostics import (
    convergence_message,
    find_separation,
    rank,
    separable_message,
    signed,
    unidentified_message,
    warn,
)
from pluralign.rewards.user_reward import UserReward
from pluralign.rewards.users import UserIndex, user_key
from pluralign.rewards.validation import check_int, check_number, check_phi

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["MultiUserModel"]


class MultiUserModel(RewardModel):
    """Shared prediction code: users, unknown-user policy, per-user views and accuracy.

    Learned attributes common to all: ``users_`` (U,), ``thetas_`` (U, d_phi), ``theta0_``
    (d_phi,), ``user_counts_`` (U,; training comparisons per user, ``0`` for adapted users until
    they are adapted), ``n_train_``, ``d_phi_``, ``estimator_`` (the fitted inner model).

    ``reward(x, phi)``: here ``x`` holds **user ids** — one id for all rows, or one per row of
    ``phi`` — since a user is the context of these models. ``predict_proba``,
    ``log_likelihood`` and ``accuracy`` read ``data.users``.
    """

    l2: float
    unknown_user: str
    tol: float
    max_iter: int
    adapt_l2: float | None

    # learned by ``fit`` (``basis_``, ``weights_`` only by models with a shared basis)
    users_: np.ndarray
    thetas_: np.ndarray
    theta0_: np.ndarray
    user_counts_: np.ndarray
    n_train_: int
    d_phi_: int
    basis_: np.ndarray
    weights_: np.ndarray

    # ---- users ------------------------------------------------------------------------
    def _set_users(self, users: np.ndarray) -> None:
        self.users_ = users
        self._lookup = UserIndex(users)

    def user_index(self, users: Any, *, allow_unknown: bool | None = None) -> np.ndarray:
        """Row indices into ``thetas_`` of ``users`` (scalar or array); ``-1`` for an unknown
        user when unknown users fall back to ``theta0_`` (``allow_unknown``, by default
        ``unknown_user == "shared"``), else a ``DataValidationError``."""
        self._check_fitted()
        if allow_unknown is None:
            allow_unknown = self.unknown_user == "shared"
        return self._lookup.rows(users, allow_unknown=allow_unknown)

    def user_theta(self, users: Any) -> np.ndarray:
        """``θ_u`` per id, shape ``(n, d_phi)`` (``theta0_`` for unknown users under "shared")."""
        index = self.user_index(users)
        table = np.concatenate([self.thetas_, self.theta0_[None, :]])
        return table[index]  # index −1 picks the appended θ0 row

    # ---- prediction -------------------------------------------------------------------
    def reward(self, x: Any, phi: np.ndarray) -> np.ndarray:
        """``θ_uᵀφ``; ``x`` is a user id (all rows) or one id per row of ``phi``."""
        self._check_fitted()
        phi = check_phi(type(self).__name__, phi, self.d_phi_)
        if x is None:
            raise DataValidationError(
                f"{type(self).__name__}.reward needs user ids as x (one, or one per row)",
                field="x",
            )
        thetas = self.user_theta(x)
        if thetas.shape[0] == 1:
            return phi @ thetas[0]
        if thetas.shape[0] != phi.shape[0]:
            raise DataValidationError(
                f"got {thetas.shape[0]} user ids for {phi.shape[0]} rows of phi", field="x"
            )
        return contract(thetas, phi)

    def margins(self, data: PreferenceData) -> np.ndarray:
        """``r_u(φ1) − r_u(φ0)`` per comparison (users from ``data.users``)."""
        if data.users is None:
            raise DataValidationError("comparisons need user ids (data.users)", field="users")
        return contract(self.user_theta(data.users), data.delta_phi)

    def predict_proba(self, data: PreferenceData) -> np.ndarray:
        return np.exp(log_sigmoid(self.margins(data)))

    def log_likelihood(self, data: PreferenceData) -> float:
        return float(np.mean(log_sigmoid((2.0 * data.y - 1.0) * self.margins(data))))

    def accuracy(self, data: PreferenceData) -> float:
        """Fraction of comparisons whose preferred response has the higher reward (ties ½)."""
        return float(np.mean(_correct(self.margins(data), data.y)))

    def per_user_accuracy(self, data: PreferenceData) -> dict[Any, tuple[float, int]]:
        """``{user: (accuracy, n_comparisons)}`` over the users present in ``data``."""
        correct = _correct(self.margins(data), data.y)
        users, inverse, counts = np.unique(data.users, return_inverse=True, return_counts=True)  # type: ignore[call-overload]  # users: checked by the caller
        sums = np.bincount(inverse, weights=correct, minlength=len(users))
        return {
            user_key(u): (float(s / c), int(c))
            for u, s, c in zip(users.tolist(), sums, counts, strict=True)
        }

    # ---- per-user views ---------------------------------------------------------------
    def user_basis(self) -> np.ndarray:
        """``A`` of the per-user views (identity unless the model restricts ``θ_u``)."""
        return np.eye(self.d_phi_)

    def user_l2(self, user: Any) -> float:
        """The ridge of user ``u``'s own problem, ``λ N / N_u`` (the same prior)."""
        count = int(self.user_counts_[self.user_index(user, allow_unknown=False)[0]])
        return float(self.l2 * self.n_train_ / max(count, 1))

    def user_model(self, user: Any) -> UserReward:
        """User ``u``'s reward as a :class:`UserReward` (``θ_u = A v``, see the module doc)."""
        basis = self.user_basis()
        theta = self.user_theta(user)[0]
        return UserReward.fitted(basis, basis.T @ theta, l2=self.user_l2(user), user=user)

    def confidence_rows(self, user: Any, data: PreferenceData) -> PreferenceData:
        """The comparisons that inform user ``u``'s parameters: the user's own."""
        if data.users is None:
            raise DataValidationError("need user ids to select a user's rows", field="users")
        mask = data.users == np.asarray(user, dtype=data.users.dtype)
        if not mask.any():
            raise DataValidationError(f"no comparisons of user {user!r}", field="users")
        return data.subset(mask)

    def _finish(
        self, users: np.ndarray, counts: np.ndarray, data: PreferenceData, inner: Any
    ) -> None:
        self._set_users(users)
        self.user_counts_ = counts.astype(np.int64)
        self.n_train_ = data.n
        self.d_phi_ = data.d_phi
        self.estimator_ = inner
        info = getattr(inner, "solver_info_", None)
        self.solver_info_ = info
        self.n_iter_ = getattr(inner, "n_iter_", 0)
        self.converged_ = getattr(inner, "converged_", True)
        self.is_fitted_ = True

    # ---- validation and warnings -----------------------------------------------------------
    def _check_params(self) -> None:
        """Refuse invalid hyper-parameters (checked at ``fit``, scikit-learn style)."""
        owner = type(self).__name__
        check_number(self.l2, "l2", owner=owner)
        check_number(self.tol, "tol", owner=owner, strict=True)
        check_int(self.max_iter, "max_iter", owner=owner)
        if getattr(self, "adapt_l2", None) is not None:
            check_number(self.adapt_l2, "adapt_l2", owner=owner)

    def _per_user_warnings(
        self,
        owner: str,
        inner: BradleyTerryModel,
        l2: float,
        dz: np.ndarray,
        data: PreferenceData,
        index: np.ndarray,
        users: np.ndarray,
        params: np.ndarray,
        *,
        margins: np.ndarray | None,
        span: np.ndarray | None,
        record: bool = True,
    ) -> None:
        """Warnings of a fit that separates per user (``PerUser``, ``adapt_user``).

        ``dz`` are the features of each row in its user's own problem (``Δφ``, or ``BᵀΔφ`` with a
        frozen basis), ``params`` the users' fitted parameters (one row per user),
        ``margins`` the signed fitted margins (``None``: skip the margin
        certificate, unsound with a frozen offset ``θ0``), ``span`` rows spanning the relevant
        span ``S`` of a user's parameters (``None``: no identifiability check). With ``record``
        (``fit``, not ``adapt_user``) sets ``separable_`` and ``unidentified_`` (totals over users).
        """
        if not inner.solver_info_.converged:
            warn(
                convergence_message(owner, inner.solver_info_, self.tol, inner.dtype),
                ConvergenceWarning,
            )
        if record:
            self.separable_, self.unidentified_ = None, None
        if l2 != 0:
            return
        sign = 2.0 * data.y - 1.0
        ties = ~np.any(dz != 0, axis=1)
        span_rank = None if span is None else rank(span)
        separable, decided, separated = [], True, 0
        missing: dict[Any, int] = {}
        order = np.argsort(index, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(index, minlength=len(users)))])
        for u, user in enumerate(users.tolist()):
            rows = order[bounds[u] : bounds[u + 1]]
            found, mask = find_separation(
                [signed(dz[rows], sign[rows])],
                None if margins is None else margins[rows],
                ties[rows],
            )
            if found:
                separable.append(u)
                separated += int(mask.sum())
            decided = decided and found is not None
            if span_rank is not None:
                gap = max(span_rank - rank(dz[rows]), 0)
                if gap:
                    missing[user_key(user)] = gap
        total = int(sum(missing.values()))
        if record:
            self.separable_ = True if separable else (False if decided else None)
            self.unidentified_ = None if span_rank is None else total
        if separable:
            norm = float(np.linalg.norm(params[separable], axis=1).max())
            names = [user_key(users[u]) for u in separable]
            warn(
                separable_message(owner, separated, data.n, norm, names, " user by user"),
                SeparableDataWarning,
            )
        if missing:
            warn(
                unidentified_message(owner, total, inner._start_note, list(missing)),
                DisconnectedComparisonsWarning,
            )

    def _copy_diagnostics(self, inner: BradleyTerryModel) -> None:
        self.separable_ = getattr(inner, "separable_", None)
        self.unidentified_ = getattr(inner, "unidentified_", None)

    # ---- adaptation -------------------------------------------------------------------
    def _new_user_rows(
        self, data: PreferenceData, user: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(new users, index into them, counts)`` of adaptation data; refuses known users."""
        self._check_fitted()
        if user is not None:
            ids = np.full(data.n, user)
        elif data.users is None:
            raise DataValidationError("adapt_user needs data.users or user=...", field="users")
        else:
            ids = data.users
        new, index, counts = np.unique(ids, return_inverse=True, return_counts=True)
        self._lookup.check_new(new, note="; adapt_user fits new users only")
        return new, index, counts

    def _append_users(self, new: np.ndarray, counts: np.ndarray, thetas: np.ndarray) -> None:
        self._set_users(np.concatenate([self.users_, new]))
        self.thetas_ = np.concatenate([self.thetas_, thetas])
        self.user_counts_ = np.concatenate([self.user_counts_, counts.astype(np.int64)])

    def _adapt_l2(self, n: int) -> float:
        l2 = getattr(self, "adapt_l2", None)
        return float(self.l2 * self.n_train_ / n) if l2 is None else float(l2)

    # ---- serialization ----------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The learned arrays (what :func:`pluralign.rewards.persistence.load_model` needs)."""
        self._check_fitted()
        out = {"theta0": self.theta0_, "thetas": self.thetas_, "user_counts": self.user_counts_}
        if hasattr(self, "basis_"):
            out["basis"] = self.basis_
            out["weights"] = self.weights_
        return out

    @classmethod
    def from_arrays(
        cls,
        arrays: dict[str, np.ndarray],
        users: Sequence[Any] | np.ndarray,
        *,
        n_train: int,
        **params: Any,
    ) -> Self:
        """Rebuild a fitted model from :meth:`to_arrays` output, user ids and hyper-parameters."""
        model = cls(**params)
        thetas = np.asarray(arrays["thetas"], dtype=np.float64)
        users_arr = np.asarray(list(users))
        if thetas.ndim != 2 or thetas.shape[0] != len(users_arr):
            raise DataValidationError(
                f"thetas has shape {thetas.shape} for {len(users_arr)} users", field="thetas"
            )
        model._set_users(users_arr)
        model.thetas_ = thetas
        model.theta0_ = np.asarray(arrays["theta0"], dtype=np.float64)
        model.user_counts_ = np.asarray(arrays["user_counts"], dtype=np.int64)
        if "basis" in arrays:
            model.basis_ = np.asarray(arrays["basis"], dtype=np.float64)
            model.weights_ = np.asarray(arrays["weights"], dtype=np.float64)
        model.n_train_ = int(n_train)
        model.d_phi_ = thetas.shape[1]
        model.estimator_ = None
        model.is_fitted_ = True
        return model


def _correct(margins: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.where(margins == 0.0, 0.5, (margins > 0) == (y == 1)).astype(np.float64)
