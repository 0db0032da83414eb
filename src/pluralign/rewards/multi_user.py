"""Personalized reward models for many users: ``PerUser``, ``Pooled`` and ``SharedBasis``.

User ``u``'s reward is linear in the response features, ``r_u(φ) = θ_uᵀφ``; the three models
differ in how the ``θ_u`` are tied together (Liu et al. 2025, "A Shared Low-Rank Adaptation
Approach to Personalized RLHF", P-ShareLoRA, arXiv 2503.19201, linear case):

* ``PerUser``: independent ``θ_u``, ``U·d_phi`` parameters. It is the full-rank ``Bilinear`` MLE
  on one-hot user contexts ``x = e_u`` (``xᵀΘφ = θ_uᵀφ``); with ridge ``λ`` on the mean loss the
  fit separates into one ridge-regularized MLE per user with ``λ_u = λ N / N_u``.
* ``Pooled``: one ``θ`` for everybody (``Linear`` on all the data) — the one-reward baseline.
* ``SharedBasis(k)``: ``θ_u = θ0 + B w_u`` with a shared offset ``θ0``, a shared basis
  ``B ∈ R^{d_phi×k}`` and per-user weights ``w_u ∈ R^k`` (``d_phi(k+1) + U·k`` parameters).
  With augmented one-hot contexts ``x = [1, e_u]ᵀ ∈ R^{U+1}`` this is ``xᵀΘφ`` with

      Θ = [θ0ᵀ ; W Bᵀ],   W = [w_1 … w_U]ᵀ,

  i.e. LoCo-RLHF's low-rank model with one unconstrained (full-rank) first row:
  :class:`~pluralign.rewards.LowRank` with ``rank = k`` and ``free_rows = 1``. ``SharedBasis``
  *is* that estimator (Burer–Monteiro factors ``L = W``, ``R = B``, ridge on all of ``Θ``):

      min  (1/N) Σ_i −log σ(s_i (θ0 + B w_{u_i})ᵀΔφ_i)
           + (λ/2)(‖θ0‖² + ‖W Bᵀ‖²_F) + (μ/4)‖WᵀW − BᵀB‖²_F.

  After the fit, ``basis_`` is the orthonormal right singular frame of ``WBᵀ`` and
  ``weights_`` the matching coordinates, so ``θ_u = theta0_ + basis_ @ weights_[u]``.

**New users** (``adapt_user``): ``θ0`` and ``B`` are frozen and only ``w_new`` (``k`` numbers) is
fitted from the new user's comparisons,

    ŵ = argmin_w (1/n) Σ_i −log σ(s_i (θ0 + B w)ᵀΔφ_i) + (λ_a/2)‖w‖²,

a convex problem; ``λ_a = λ·N_train/n`` by default (the Gaussian prior on ``w`` that the training
ridge put on every user's weights), so a user with few comparisons is shrunk towards ``θ0``.
``PerUser.adapt_user`` fits a whole ``θ_new`` the same way.

**Unknown users** at prediction time raise a ``DataValidationError`` naming them, unless
``unknown_user="shared"``: then they get the shared reward ``theta0_`` (``θ0`` for
``SharedBasis``, the average ``θ̂_u`` for ``PerUser``; ``Pooled`` gives everybody its one ``θ``).

**Per-user views** (``user_model(u)``): user ``u``'s reward as a model linear in a parameter
vector ``v``, ``θ_u = A v``, usable with :class:`~pluralign.confidence.ConfidenceSet` and the
pessimistic policies. ``A = I`` for ``PerUser`` and ``Pooled``; for ``SharedBasis`` ``A`` is an
orthonormal basis of ``span{θ̂0, B̂}`` (dimension ``k+1``), so a user's confidence set lives in
the reduced space that the shared structure leaves uncertain — P-ShareLoRA's per-user pessimism,
the analogue of LoCo-RLHF's pessimism in a reduced subspace.

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

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from pluralign.data import PreferenceData
from pluralign.errors import (
    ConvergenceWarning,
    DataValidationError,
    DisconnectedComparisonsWarning,
    NotFittedError,
    SeparableDataWarning,
)
from pluralign.rewards._checks import (
    LP_BUDGET,
    check_int,
    check_number,
    convergence_message,
    find_separation,
    kron_nnz,
    rank,
    response_basis,
    row_kron,
    separable_message,
    signed,
    unidentified_message,
    warn,
)
from pluralign.rewards.base import BradleyTerryModel, RewardModel, log_sigmoid
from pluralign.rewards.linear import Bilinear, Linear, LinearInParameters, _check_phi, contract
from pluralign.rewards.lowrank import LowRank

__all__ = [
    "MultiUserModel",
    "PerUser",
    "Pooled",
    "SharedBasis",
    "UserReward",
    "augmented_one_hot",
    "one_hot",
    "subspace_distance",
]

UNKNOWN_USER = ("error", "shared")


# ---------------------------------------------------------------------------- helpers
def one_hot(index: np.ndarray, n_users: int) -> np.ndarray:
    """``e_u`` rows, shape ``(n, n_users)``."""
    out = np.zeros((len(index), n_users))
    out[np.arange(len(index)), index] = 1.0
    return out


def augmented_one_hot(index: np.ndarray, n_users: int) -> np.ndarray:
    """``[1, e_u]`` rows, shape ``(n, n_users + 1)``: the contexts of ``SharedBasis``."""
    out = np.zeros((len(index), n_users + 1))
    out[:, 0] = 1.0
    out[np.arange(len(index)), np.asarray(index) + 1] = 1.0
    return out


def subspace_distance(basis_hat: np.ndarray, basis_star: np.ndarray) -> float:
    """``‖sin Θ(B̂, B*)‖₂``: the sine of the largest principal angle between the column spaces.

    Computed as ``‖(I − Q* Q*ᵀ) Q̂‖₂`` with orthonormal bases ``Q̂, Q*`` of the two spaces (both
    are orthonormalized here). It is 0 for equal spaces and 1 when some direction of ``B̂`` is
    orthogonal to ``B*``; for spaces of unequal dimension it measures ``B̂`` against ``B*``.
    """
    q_hat, _ = np.linalg.qr(np.asarray(basis_hat, dtype=np.float64))
    q_star, _ = np.linalg.qr(np.asarray(basis_star, dtype=np.float64))
    residual = q_hat - q_star @ (q_star.T @ q_hat)
    return float(min(1.0, np.linalg.norm(residual, 2)))


def _key(value: Any) -> Hashable:
    return value.item() if isinstance(value, np.generic) else value


def _orthonormal(columns: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """An orthonormal basis of the column space of ``columns`` (rank-revealing SVD)."""
    u, s, _ = np.linalg.svd(columns, full_matrices=False)
    keep = s > rtol * max(float(s[0]) if s.size else 0.0, 1e-300)
    return u[:, keep]


# ---------------------------------------------------------------------------- user view
class UserReward(LinearInParameters, RewardModel):
    """One user's reward ``r(φ) = (A v)ᵀφ``: linear in ``v`` with features ``z = Aᵀφ``.

    Parameters
    ----------
    basis:
        ``A`` (d_phi, p), fixed.
    params:
        ``v`` (p,), the fitted parameters (``fit`` re-estimates them).
    l2:
        The ridge ``λ`` of the user's own problem (confidence sets use it as their ``λ``).
    user:
        The user id (informational).

    Context ``x`` is ignored: the user is fixed.

    Hyper-parameters (``get_params``, ``clone``): ``basis``, ``l2``, ``user``; ``params`` is
    fitted state, so ``clone`` gives an unfitted view.
    """

    _state_arguments = ("params",)

    def __init__(
        self,
        basis: np.ndarray,
        params: np.ndarray | None = None,
        *,
        l2: float = 1e-3,
        user: Any = None,
    ) -> None:
        self.basis = np.asarray(basis, dtype=np.float64)
        if self.basis.ndim != 2:
            raise DataValidationError(f"must be (d_phi, p), got {self.basis.shape}", field="basis")
        self.l2 = l2
        self.user = user
        self.d_phi_ = self.basis.shape[0]
        if params is not None:
            self.params_ = np.asarray(params, dtype=np.float64).copy()
            self.is_fitted_ = True

    def fit(self, data: PreferenceData, y: None = None) -> UserReward:
        """Ridge Bradley–Terry MLE of ``v`` on ``data`` (features ``Aᵀφ``); returns ``self``.

        Warns like :class:`~pluralign.rewards.Linear` on the features ``Aᵀφ``. ``y``: ``None``
        or ``data.y`` (scikit-learn's ``fit(X, y)``)."""
        self._check_y(data, y)
        check_number(self.l2, "l2", owner="UserReward")
        z0, z1 = data.phi0 @ self.basis, data.phi1 @ self.basis
        inner = Linear(l2=self.l2)
        inner._quiet = True
        reduced = PreferenceData(None, z0, z1, data.y)
        inner.fit(reduced)
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
        return self.basis @ self.params_

    def features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        return _check_phi("UserReward", phi, self.d_phi_) @ self.basis

    def reward_at(self, params: np.ndarray, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        return _check_phi("UserReward", phi, self.d_phi_) @ (self.basis @ params)

    def mean_features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        return _check_phi("UserReward", phi, self.d_phi_).mean(axis=0) @ self.basis


# ---------------------------------------------------------------------------- base
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

    __repr__ = BradleyTerryModel.__repr__

    # ---- users ------------------------------------------------------------------------
    def _set_users(self, users: np.ndarray) -> None:
        self.users_ = users
        self._lookup = {_key(u): i for i, u in enumerate(users.tolist())}

    def _index(self, data: PreferenceData) -> tuple[np.ndarray, np.ndarray]:
        """Training-time: ``(users_, index)`` of ``data.users`` (sorted unique users)."""
        if data.users is None:
            raise DataValidationError(
                f"{type(self).__name__} needs user ids; the data has users=None", field="users"
            )
        return np.unique(data.users, return_inverse=True)

    def user_index(self, users: Any, *, allow_unknown: bool | None = None) -> np.ndarray:
        """Row indices into ``thetas_`` of ``users`` (scalar or array); ``-1`` for an unknown
        user when unknown users fall back to ``theta0_``, else a ``DataValidationError``."""
        self._check_fitted()
        arr = np.atleast_1d(np.asarray(users))
        if arr.ndim != 1:
            raise DataValidationError(f"user ids must be 1-D, got shape {arr.shape}", field="users")
        uniq, inverse = np.unique(arr, return_inverse=True)
        found = np.array([self._lookup.get(_key(u), -1) for u in uniq.tolist()], dtype=np.int64)
        if allow_unknown is None:
            allow_unknown = self.unknown_user == "shared"
        if not allow_unknown and (found < 0).any():
            missing = [u for u, f in zip(uniq.tolist(), found, strict=True) if f < 0]
            row = int(np.argmax(found[inverse] < 0))
            known = ", ".join(map(repr, self.users_.tolist()[:10]))
            more = "" if len(self.users_) <= 10 else f", … ({len(self.users_)} users)"
            raise DataValidationError(
                f"unknown user {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f"; known users: {known}{more}. Adapt it with adapt_user(data), or pass "
                "unknown_user='shared' to fall back to the shared reward θ0",
                field="users",
                row=row,
            )
        return found[inverse]

    def user_theta(self, users: Any) -> np.ndarray:
        """``θ_u`` per id, shape ``(n, d_phi)`` (``theta0_`` for unknown users under "shared")."""
        index = self.user_index(users)
        table = np.concatenate([self.thetas_, self.theta0_[None, :]])
        return table[index]  # index −1 picks the appended θ0 row

    # ---- prediction -------------------------------------------------------------------
    def reward(self, x: Any, phi: np.ndarray) -> np.ndarray:
        """``θ_uᵀφ``; ``x`` is a user id (all rows) or one id per row of ``phi``."""
        self._check_fitted()
        phi = _check_phi(type(self).__name__, phi, self.d_phi_)
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
        users, inverse, counts = np.unique(data.users, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=correct, minlength=len(users))
        return {
            _key(u): (float(s / c), int(c))
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
        return UserReward(basis, basis.T @ theta, l2=self.user_l2(user), user=user)

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
                    missing[_key(user)] = gap
        total = int(sum(missing.values()))
        if record:
            self.separable_ = True if separable else (False if decided else None)
            self.unidentified_ = None if span_rank is None else total
        if separable:
            norm = float(np.linalg.norm(params[separable], axis=1).max())
            names = [_key(users[u]) for u in separable]
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
        if len(self.users_) and new.dtype.kind != self.users_.dtype.kind:
            raise DataValidationError(
                f"user ids of type {new.dtype} do not match the model's ({self.users_.dtype})",
                field="users",
            )
        known = [u for u in new.tolist() if _key(u) in self._lookup]
        if known:
            raise DataValidationError(
                f"user {known[0]!r} is already known; adapt_user fits new users only",
                field="users",
            )
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
        cls, arrays: dict[str, np.ndarray], users: Sequence[Any], *, n_train: int, **params: Any
    ) -> MultiUserModel:
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

    def _check_fitted(self) -> None:
        if not getattr(self, "is_fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet; call fit(data) first")


def _correct(margins: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.where(margins == 0.0, 0.5, (margins > 0) == (y == 1)).astype(np.float64)


def _check_unknown(value: str) -> str:
    if value not in UNKNOWN_USER:
        raise DataValidationError(
            f"must be 'error' or 'shared', got {value!r}", field="unknown_user"
        )
    return value


# ---------------------------------------------------------------------------- models
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
        _check_unknown(self.unknown_user)
        users, index = self._index(data)
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
        self.unknown_user = "shared"

    def fit(self, data: PreferenceData, y: None = None) -> Pooled:
        """The pooled ridge MLE; returns ``self`` (warns as :class:`Linear` does; ``y``: ``None``
        or ``data.y``)."""
        self._check_y(data, y)
        self._check_params()
        users, index = (
            self._index(data)
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
        return data.delta_phi @ self.theta0_

    def user_theta(self, users: Any) -> np.ndarray:
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


class SharedBasis(MultiUserModel):
    """P-ShareLoRA (linear): ``θ_u = θ0 + B w_u``, fitted as ``LowRank(k, free_rows=1)`` on
    augmented one-hot contexts ``[1, e_u]`` (see the module docstring).

    Parameters
    ----------
    k:
        Rank of the shared basis ``B`` (``1 ≤ k ≤ min(U, d_phi)``).
    l2:
        Ridge ``λ`` on ``Θ = [θ0ᵀ; WBᵀ]`` (mean loss).
    unknown_user:
        ``"error"`` (default) or ``"shared"`` (unknown users get ``θ0``).
    adapt_l2:
        Ridge on ``w`` in :meth:`adapt_user` (default ``λ N_train / n``).
    balance, init, seed, dense_svd_limit, tol, max_iter, dtype, device:
        Passed to :class:`~pluralign.rewards.LowRank`.

    Learned: ``theta0_`` (d_phi,), ``basis_`` (d_phi, k; orthonormal), ``weights_`` (U, k),
    ``thetas_ = theta0_ + weights_ @ basis_ᵀ``, ``users_``, ``user_counts_``, ``estimator_``
    (the fitted ``LowRank``), ``n_iter_``, ``converged_``.
    """

    def __init__(
        self,
        k: int = 2,
        l2: float = 1e-3,
        *,
        unknown_user: str = "error",
        adapt_l2: float | None = None,
        balance: float = 1e-4,
        init: str = "spectral",
        seed: int = 0,
        dense_svd_limit: int = 4_000_000,
        tol: float = 1e-6,
        max_iter: int = 1000,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        self.k = k
        self.l2 = l2
        self.unknown_user = unknown_user
        self.adapt_l2 = adapt_l2
        self.balance, self.init, self.seed = balance, init, seed
        self.dense_svd_limit = dense_svd_limit
        self.tol, self.max_iter, self.dtype, self.device = tol, max_iter, dtype, device

    def lowrank(self) -> LowRank:
        """The ``LowRank(k, free_rows=1)`` estimator this model fits."""
        return LowRank(
            self.k,
            self.l2,
            balance=self.balance,
            init=self.init,
            seed=self.seed,
            dense_svd_limit=self.dense_svd_limit,
            free_rows=1,
            tol=self.tol,
            max_iter=self.max_iter,
            dtype=self.dtype,
            device=self.device,
        )

    def fit(self, data: PreferenceData, y: None = None) -> SharedBasis:
        """Fit ``θ0, B, W`` jointly; returns ``self`` (warns as :class:`LowRank` does, naming
        the users of separated comparisons; ``y``: ``None`` or ``data.y``)."""
        self._check_y(data, y)
        self._check_params()
        _check_unknown(self.unknown_user)
        users, index = self._index(data)
        top = min(len(users), data.d_phi)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= top:
            raise DataValidationError(
                f"must be an integer in [1, min(n_users, d_phi)] = [1, {top}], got {self.k!r}",
                field="k",
            )
        x = augmented_one_hot(index, len(users))
        inner = self.lowrank()
        inner._quiet = True
        aug = PreferenceData(x, data.phi0, data.phi1, data.y)
        inner.fit(aug)
        self._store_lowrank(inner)
        self._finish(users, np.bincount(index, minlength=len(users)), data, inner)
        inner._diagnose(aug, owner="SharedBasis", users=data.users)
        self._copy_diagnostics(inner)
        return self

    def _store_lowrank(self, inner: LowRank) -> None:
        self.theta0_ = inner.theta_free_[0].copy()
        self.basis_ = inner.V_.copy()
        self.weights_ = inner.U_[1:] * inner.s_
        self.thetas_ = self.theta0_ + self.weights_ @ self.basis_.T

    @classmethod
    def from_lowrank(
        cls, inner: LowRank, users: Sequence[Any], data: PreferenceData, **params: Any
    ) -> SharedBasis:
        """Wrap a ``LowRank(k, free_rows=1)`` fitted on augmented one-hot contexts of ``users``
        (in order: column ``1 + i`` of ``x`` is ``users[i]``)."""
        if inner.free_rows != 1 or inner.d_x_ != len(users) + 1:
            raise DataValidationError(
                "need a LowRank with free_rows=1 fitted on [1, e_u] contexts of these users",
                field="inner",
            )
        model = cls(inner.rank, inner.l2, **params)
        model._store_lowrank(inner)
        users = np.asarray(list(users))
        counts = data.x[:, 1:].sum(axis=0).astype(np.int64)
        model._finish(users, counts, data, inner)
        return model

    def user_basis(self) -> np.ndarray:
        """Orthonormal basis of ``span{θ̂0, B̂}`` (dimension ``k+1``, or ``k`` if ``θ̂0 ∈ span B̂``)."""
        return _orthonormal(np.concatenate([self.theta0_[:, None], self.basis_], axis=1))

    def adapt_user(self, data: PreferenceData, user: Any = None) -> SharedBasis:
        """Fit new users' ``w`` with ``θ0`` and ``B`` frozen (see the module doc); returns ``self``.

        ``data.users`` names the new users (or ``user=`` names one user for all rows). Users
        already known are refused.
        """
        self._check_params()
        new, index, counts = self._new_user_rows(data, user)
        l2 = self._adapt_l2(data.n)
        frozen = _FrozenBasis(
            self.theta0_, self.basis_, len(new), l2=l2, tol=self.tol, max_iter=self.max_iter
        )
        frozen._quiet = True
        frozen.fit(PreferenceData(one_hot(index, len(new)), data.phi0, data.phi1, data.y))
        self.weights_ = np.concatenate([self.weights_, frozen.weights_])
        self._append_users(new, counts, self.theta0_ + frozen.weights_ @ self.basis_.T)
        # Each new user's problem is convex in w with the offset θ0ᵀΔφ fixed: the LP on BᵀΔφ
        # decides separability (the margin certificate does not apply with an offset).
        dz = data.delta_phi @ self.basis_
        self._per_user_warnings(
            "SharedBasis.adapt_user",
            frozen,
            l2,
            dz,
            data,
            index,
            new,
            frozen.weights_,
            margins=None,
            span=response_basis(data.phi0, data.phi1) @ self.basis_,
            record=False,
        )
        return self


class _FrozenBasis(BradleyTerryModel):
    """Weights ``w_u`` of users with ``θ0`` and ``B`` fixed: margins ``(θ0 + B w_u)ᵀΔφ``.

    Contexts are one-hot over the new users; the objective separates per user and is convex.
    """

    def __init__(
        self,
        theta0: np.ndarray,
        basis: np.ndarray,
        n_users: int,
        l2: float = 1e-3,
        *,
        tol: float = 1e-6,
        max_iter: int = 1000,
    ) -> None:
        super().__init__(l2, tol=tol, max_iter=max_iter)
        self.theta0, self.basis, self.n_users = theta0, basis, n_users

    def _initial_params(self, data: PreferenceData) -> np.ndarray:
        return np.zeros(self.n_users * self.basis.shape[1])

    def _tensors(self, data: PreferenceData) -> dict[str, torch.Tensor]:
        batch = super()._tensors(data)
        dtype = self._torch_dtype
        batch["offset"] = torch.as_tensor(data.delta_phi @ self.theta0, dtype=dtype)
        batch["dphi_b"] = torch.as_tensor(data.delta_phi @ self.basis, dtype=dtype)
        return batch

    def _margins(self, params: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = params.reshape(self.n_users, -1)
        return batch["offset"] + ((batch["x"] @ weights) * batch["dphi_b"]).sum(dim=1)

    def _store(self, params: np.ndarray, data: PreferenceData) -> None:
        self.weights_ = params.reshape(self.n_users, -1).copy()

    _start_note = "0, the start of w (L-BFGS iterates stay in the span of the gradients)"

    def _signed_margins(self, data: PreferenceData) -> None:
        """Not a cone (the offset ``θ0ᵀΔφ`` is fixed): only the LP decides separability."""
        return None

    def _separation_problems(self, data: PreferenceData) -> list[Any] | None:
        """``s_i e_{u_i} ⊗ BᵀΔφ_i``: recession directions of ``w`` (offsets do not matter)."""
        if kron_nnz(data.x, self.basis.shape[1]) > LP_BUDGET:
            return None
        return [signed(row_kron(data.x, data.delta_phi @ self.basis), 2.0 * data.y - 1.0)]

    def _estimate_norm(self) -> float:
        return float(np.linalg.norm(self.weights_))

    def reward(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """``(θ0 + B w_u)ᵀφ`` for one-hot user contexts ``x`` over the new users."""
        self._check_fitted()
        thetas = self.theta0 + np.asarray(x, float) @ self.weights_ @ self.basis.T
        return contract(thetas, np.asarray(phi, float))
