"""Users described by context features: LoCo-RLHF's contextual low-rank reward, per user.

Reward (Lee, Sun & Liu 2024, LoCo-RLHF, arXiv 2412.19436): a user with context ``x ∈ R^{d_x}``
(survey attributes, one-hot categories, any numeric description) has

    r(x, φ) = x̃ᵀ Θ φ,   x̃ = [1, z(x)],   Θ = [θ0ᵀ ; L Rᵀ],   rank(L Rᵀ) ≤ r,

so ``θ(x) = θ0 + R Lᵀ z(x)``: a shared reward ``θ0`` plus a personal part that lies in the
``r``-dimensional span of ``R`` (``r = rank``) and is a *linear function of the context*.
``z(x) = (x − μ)/σ`` standardizes each context column by its mean and standard deviation over the
training comparisons (``standardize=True``, the default; a constant column keeps ``σ = 1``), so
the ridge treats an age in years and a one-hot region alike and ``θ0`` is the reward of the
average context; with ``standardize=False``, ``z(x) = x``.

The fit is :class:`~pluralign.rewards.LowRank` with ``free_rows = 1`` on ``x̃`` (Burer–Monteiro
factors, spectral start, closed-form gradients; Kronecker features are never formed):

    min  (1/N) Σ_i −log σ(s_i x̃_iᵀ Θ Δφ_i) + (λ/2)(‖θ0‖² + ‖L Rᵀ‖²_F) + (μ/4)‖LᵀL − RᵀR‖²_F.

With one-hot user ids as contexts and ``standardize=False`` this is exactly
:class:`~pluralign.rewards.SharedBasis` (``θ_u = θ0 + B w_u`` of P-ShareLoRA, Liu et al. 2025,
arXiv 2503.19201): ``Contextual``
generalizes it from "who the user is" to "what is known about the user", which is what lets it
score a user it has never seen. After the fit, ``basis_`` is the orthonormal right singular frame
of ``L Rᵀ`` and ``context_weights_`` (``d_x × r``) the matching left factor, so
``θ(x) = theta0_ + basis_ @ (context_weights_ᵀ z(x))``.

**Users.** Comparisons may carry user ids: each user's context must then be the same on all
their rows (a row that differs is refused, naming it), and the user's reward is
``θ_u = θ(x_u)``. Margins are computed from each comparison's own context ``x_i`` (LoCo-RLHF's
data model; without user ids the model is fitted and scored from contexts alone). A user the model
has not seen is scored from their context: :meth:`context_theta` and :meth:`context_reward`
take contexts, and :meth:`add_users` registers new users by their contexts (no comparisons
needed), after which ``reward(user, φ)`` and the per-user views work for them as for the
training users. ``unknown_user="shared"`` scores a user with neither comparisons nor a context
with ``θ0``.

**Per-user views** (``user_model(u)``, for confidence sets and the pointwise pessimistic policy)
are those of ``SharedBasis``: ``θ_u = A v`` with ``A`` an orthonormal basis of
``span{θ̂0, R̂}`` and the user's own comparisons as confidence rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pluralign._linalg import contract, orthonormal_columns
from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError
from pluralign.rewards.multi_user import MultiUserModel
from pluralign.rewards.shared_basis import FreeRowLowRank
from pluralign.rewards.users import check_unknown_user, user_key
from pluralign.rewards.validation import check_phi

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Contextual"]


class Contextual(FreeRowLowRank, MultiUserModel):
    """LoCo-RLHF's contextual low-rank reward ``[1, z(x)]ᵀ Θ φ`` for users with contexts ``x``.

    Parameters
    ----------
    rank:
        Rank ``r`` of the context part ``L Rᵀ`` (``1 ≤ r ≤ min(d_x, d_phi)``).
    l2:
        Ridge ``λ`` on ``Θ = [θ0ᵀ; L Rᵀ]`` (mean loss).
    unknown_user:
        ``"error"`` (default) or ``"shared"``: a user id the model does not know (and was not
        given a context for, see :meth:`add_users`) gets ``θ0``.
    standardize:
        Centre and scale each context column over the training comparisons (default); ``False``
        uses the raw contexts (see the module docstring).
    balance, init, seed, dense_svd_limit, tol, max_iter, dtype, device:
        Passed to :class:`~pluralign.rewards.LowRank`.

    Learned: ``theta0_`` (d_phi,), ``basis_`` (d_phi, r; orthonormal), ``context_weights_``
    (d_x, r), ``context_mean_`` and ``context_scale_`` (d_x,), ``users_`` (U,; empty without
    user ids), ``contexts_`` (U, d_x), ``thetas_ = context_theta(contexts_)``, ``user_counts_``,
    ``n_train_``, ``d_x_``, ``d_phi_``, ``estimator_`` (the fitted ``LowRank``), ``n_iter_``,
    ``converged_``.
    """

    def __init__(
        self,
        rank: int = 2,
        l2: float = 1e-3,
        *,
        unknown_user: str = "error",
        standardize: bool = True,
        balance: float = 1e-4,
        init: str = "spectral",
        seed: int = 0,
        dense_svd_limit: int = 4_000_000,
        tol: float = 1e-6,
        max_iter: int = 1000,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        self.rank = rank
        self.l2 = l2
        self.unknown_user = unknown_user
        self.standardize = standardize
        self.balance, self.init, self.seed = balance, init, seed
        self.dense_svd_limit = dense_svd_limit
        self.tol, self.max_iter, self.dtype, self.device = tol, max_iter, dtype, device

    # ------------------------------------------------------------------ fitting
    def fit(self, data: PreferenceData, y: None = None) -> Contextual:
        """Fit ``θ0, L, R`` on the comparisons' contexts ``data.x``; returns ``self`` (warns as
        :class:`LowRank` does; ``y``: ``None`` or ``data.y``)."""
        self._check_y(data, y)
        self._check_params()
        check_unknown_user(self.unknown_user)
        if not isinstance(self.standardize, bool):
            raise DataValidationError(
                f"must be true or false, got {self.standardize!r}", field="standardize"
            )
        if data.x is None:
            raise DataValidationError(
                "Contextual needs user contexts (a user_context per row); the data has x=None",
                field="x",
            )
        top = min(data.d_x, data.d_phi)
        if (
            isinstance(self.rank, bool)
            or not isinstance(self.rank, int)
            or not 1 <= self.rank <= top
        ):
            raise DataValidationError(
                f"must be an integer in [1, min(d_x, d_phi)] = [1, {top}] (d_x = {data.d_x} "
                f"context columns), got {self.rank!r}",
                field="rank",
            )
        users, contexts, counts = _user_contexts(data)
        if self.standardize:
            mean, scale = data.x.mean(axis=0), data.x.std(axis=0)
            scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(mean)), scale, 1.0)
        else:
            mean, scale = np.zeros(data.d_x), np.ones(data.d_x)
        self.context_mean_, self.context_scale_ = mean, scale
        aug = PreferenceData(self._augmented(data.x), data.phi0, data.phi1, data.y)
        inner = self.lowrank()
        inner._quiet = True
        inner.fit(aug)
        self.theta0_ = inner.theta_free_[0].copy()
        self.basis_ = inner.V_.copy()
        self.context_weights_ = inner.U_[1:] * inner.s_
        self.d_x_ = data.d_x
        self.contexts_ = contexts
        self.thetas_ = self._theta(contexts)
        self._finish(users, counts, data, inner)
        inner._diagnose(aug, owner="Contextual", users=data.users)
        self._copy_diagnostics(inner)
        return self

    def _augmented(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.context_mean_) / self.context_scale_
        return np.concatenate([np.ones((len(z), 1)), z], axis=1)

    # ------------------------------------------------------------------ contexts
    def _check_contexts(self, contexts: Any) -> np.ndarray:
        self._check_fitted()
        try:
            x = np.asarray(contexts, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataValidationError("contexts must be numbers", field="x") from None
        x = x[None, :] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.d_x_:
            raise DataValidationError(
                f"contexts must be (n, d_x) with d_x = {self.d_x_}, got shape {np.shape(contexts)}",
                field="x",
            )
        if not np.isfinite(x).all():
            raise DataValidationError("contexts contain NaN or inf", field="x")
        return x

    def context_theta(self, contexts: Any) -> np.ndarray:
        """``θ(x) = θ0 + R Lᵀ z(x)`` per context: ``(n, d_x)`` (or one ``(d_x,)``) →
        ``(n, d_phi)``."""
        return self._theta(self._check_contexts(contexts))

    def _theta(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.context_mean_) / self.context_scale_
        return self.theta0_ + (z @ self.context_weights_) @ self.basis_.T

    def context_reward(self, contexts: Any, phi: np.ndarray) -> np.ndarray:
        """``θ(x)ᵀφ``: one context for all rows of ``phi``, or one per row."""
        phi = check_phi(type(self).__name__, phi, self.d_phi_)
        thetas = self.context_theta(contexts)
        if thetas.shape[0] == 1:
            return phi @ thetas[0]
        if thetas.shape[0] != phi.shape[0]:
            raise DataValidationError(
                f"got {thetas.shape[0]} contexts for {phi.shape[0]} rows of phi", field="x"
            )
        return contract(thetas, phi)

    def add_users(self, users: Sequence[Any], contexts: Any) -> Contextual:
        """Register users the model has not seen by their contexts (one row each): their reward
        is ``θ(x_u)``, from the fitted ``Θ`` (nothing is refitted); returns ``self``. Known
        users are refused."""
        x = self._check_contexts(contexts)
        ids = np.asarray(list(users))
        if ids.ndim != 1 or len(ids) != len(x):
            raise DataValidationError(
                f"got {len(ids)} user ids for {len(x)} contexts", field="users"
            )
        new = np.unique(ids)
        if len(new) != len(ids):
            raise DataValidationError("a user id is given twice", field="users")
        self._lookup.check_new(ids)
        self.contexts_ = np.concatenate([self.contexts_, x])
        self._append_users(ids, np.zeros(len(ids), dtype=np.int64), self.context_theta(x))
        return self

    # ------------------------------------------------------------------ prediction
    def margins(self, data: PreferenceData) -> np.ndarray:
        """``θ(x_i)ᵀΔφ_i`` from each comparison's context ``data.x``; without contexts, from
        the users' (``data.users``)."""
        if data.x is None:
            return super().margins(data)
        return contract(self.context_theta(data.x), data.delta_phi)

    def per_user_accuracy(self, data: PreferenceData) -> dict[Any, tuple[float, int]]:
        """As for every multi-user model; data without user ids is one group ``None``."""
        if data.users is None:
            return {None: (self.accuracy(data), data.n)}
        return super().per_user_accuracy(data)

    def user_basis(self) -> np.ndarray:
        """Orthonormal basis of ``span{θ̂0, R̂}`` (as for ``SharedBasis``)."""
        return orthonormal_columns(np.concatenate([self.theta0_[:, None], self.basis_], axis=1))

    # ------------------------------------------------------------------ serialization
    def to_arrays(self) -> dict[str, np.ndarray]:
        self._check_fitted()
        return {
            "theta0": self.theta0_,
            "thetas": self.thetas_,
            "user_counts": self.user_counts_,
            "basis": self.basis_,
            "context_weights": self.context_weights_,
            "contexts": self.contexts_,
            "context_mean": self.context_mean_,
            "context_scale": self.context_scale_,
        }

    @classmethod
    def from_arrays(
        cls,
        arrays: dict[str, np.ndarray],
        users: Sequence[Any] | np.ndarray,
        *,
        n_train: int,
        **params: Any,
    ) -> Self:
        model = cls(**params)
        f64 = {
            key: np.asarray(arrays[key], dtype=np.float64)
            for key in (
                "theta0",
                "basis",
                "context_weights",
                "contexts",
                "context_mean",
                "context_scale",
            )
        }
        model.theta0_, model.basis_ = f64["theta0"], f64["basis"]
        model.context_weights_, model.contexts_ = f64["context_weights"], f64["contexts"]
        model.context_mean_, model.context_scale_ = f64["context_mean"], f64["context_scale"]
        model.d_x_, model.d_phi_ = model.context_weights_.shape[0], model.theta0_.shape[0]
        model.is_fitted_ = True
        ids = np.asarray(list(users)) if len(users) else np.zeros(0, dtype=np.int64)
        model._set_users(ids)
        # the users' rewards follow from their contexts: recomputed, not trusted from the file
        model.thetas_ = model._theta(model.contexts_)
        model.user_counts_ = np.asarray(arrays["user_counts"], dtype=np.int64)
        model.n_train_ = int(n_train)
        model.estimator_ = None
        return model


def _user_contexts(data: PreferenceData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, their contexts (U, d_x), counts)``; one context per user, else an error naming
    the first row that differs from the user's first row."""
    if data.users is None:
        return np.zeros(0, dtype=np.int64), np.zeros((0, data.d_x)), np.zeros(0, np.int64)
    users, first, inverse, counts = np.unique(
        data.users, return_index=True, return_inverse=True, return_counts=True
    )
    contexts = data.x[first]  # type: ignore[index]  # x: Contextual requires contexts
    differs = np.any(data.x != contexts[inverse], axis=1)
    if differs.any():
        row = int(np.argmax(differs))
        user = user_key(users[inverse[row]])
        raise DataValidationError(
            f"user {user!r} has another context here than on row {int(first[inverse[row]])}; "
            "a user has one context (give each user's rows the same x, or distinct user ids)",
            field="x",
            row=row,
        )
    return users, contexts, counts.astype(np.int64)
