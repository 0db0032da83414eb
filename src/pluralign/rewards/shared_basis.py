"""P-ShareLoRA's linear personalized reward ``SharedBasis``: ``θ_u = θ0 + B w_u`` with a shared
basis, and its adaptation to new users.

``SharedBasis(rank)``: ``θ_u = θ0 + B w_u`` with a shared offset ``θ0``, a shared basis
``B ∈ R^{d_phi×r}`` (``r = rank``) and per-user weights ``w_u ∈ R^r`` (``d_phi(r+1) + U·r``
parameters; Liu et
al. 2025, "A Shared Low-Rank Adaptation Approach to Personalized RLHF", P-ShareLoRA, arXiv
2503.19201, linear case). With augmented one-hot contexts ``x = [1, e_u]ᵀ ∈ R^{U+1}`` this is
``xᵀΘφ`` with

    Θ = [θ0ᵀ ; W Bᵀ],   W = [w_1 … w_U]ᵀ,

i.e. the low-rank model of LoCo-RLHF (Lee, Sun & Liu 2024, arXiv 2412.19436) with one
unconstrained (full-rank) first row:
:class:`~pluralign.rewards.LowRank` with the same ``rank`` and ``free_rows = 1``. ``SharedBasis``
*is* that estimator (Burer–Monteiro factors ``L = W``, ``R = B``, ridge on all of ``Θ``):

    min  (1/N) Σ_i −log σ(s_i (θ0 + B w_{u_i})ᵀΔφ_i)
         + (λ/2)(‖θ0‖² + ‖W Bᵀ‖²_F) + (μ/4)‖WᵀW − BᵀB‖²_F.

After the fit, ``basis_`` is the orthonormal right singular frame of ``WBᵀ`` and
``weights_`` the matching coordinates, so ``θ_u = theta0_ + basis_ @ weights_[u]``.

**New users** (``adapt_user``): ``θ0`` and ``B`` are frozen and only ``w_new`` (``r`` numbers) is
fitted from the new user's comparisons,

    ŵ = argmin_w (1/n) Σ_i −log σ(s_i (θ0 + B w)ᵀΔφ_i) + (λ_a/2)‖w‖²,

a convex problem; ``λ_a = λ·N_train/n`` by default (the Gaussian prior on ``w`` that the training
ridge put on every user's weights), so a user with few comparisons is shrunk towards ``θ0``.

What the multi-user models share (unknown users, per-user views, warnings) is described in
:mod:`pluralign.rewards.multi_user`; :func:`subspace_distance` measures how well ``B̂`` recovers
a true basis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pluralign._linalg import contract, orthonormal_columns
from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError
from pluralign.rewards.base import BradleyTerryModel
from pluralign.rewards.diagnostics import LP_BUDGET, kron_nnz, response_basis, row_kron, signed
from pluralign.rewards.lowrank import LowRank
from pluralign.rewards.multi_user import MultiUserModel
from pluralign.rewards.users import (
    augmented_one_hot,
    check_unknown_user,
    one_hot,
    training_users,
)

__all__ = ["FreeRowLowRank", "SharedBasis", "subspace_distance"]


def subspace_distance(basis_hat: np.ndarray, basis_star: np.ndarray) -> float:
    """``‖sin Θ(B̂, B*)‖₂``: the sine of the largest principal angle between the column spaces.

    Computed as ``‖(I − Q* Q*ᵀ) Q̂‖₂`` with orthonormal bases ``Q̂, Q*`` of the two spaces (both
    are orthonormalized here). It is 0 for equal spaces and 1 when some direction of ``B̂`` is
    orthogonal to ``B*``; for spaces of unequal dimension it measures ``B̂`` against ``B*``.
    """
    q_hat, _ = np.linalg.qr(np.asarray(basis_hat, dtype=np.float64))
    q_star, _ = np.linalg.qr(np.asarray(basis_star, dtype=np.float64))
    residual = q_hat - q_star @ (q_star.T @ q_hat)
    return float(min(1.0, np.linalg.norm(residual, 2)))  # type: ignore[arg-type]  # a float


class FreeRowLowRank:
    """What a model fitted as ``LowRank(rank, free_rows=1)`` on augmented contexts ``[1, x]``
    shares (``SharedBasis`` on ``x = e_u``, ``Contextual`` on ``x = z(context)``): the
    hyper-parameters it passes on, and the inner estimator built from them."""

    rank: int
    l2: float
    balance: float
    init: str
    seed: int
    dense_svd_limit: int
    tol: float
    max_iter: int
    dtype: str
    device: str

    def lowrank(self) -> LowRank:
        """The ``LowRank(rank, free_rows=1)`` estimator this model fits on ``[1, x]``."""
        return LowRank(
            self.rank,
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


class SharedBasis(FreeRowLowRank, MultiUserModel):
    """P-ShareLoRA (linear): ``θ_u = θ0 + B w_u``, fitted as ``LowRank(rank, free_rows=1)`` on
    augmented one-hot contexts ``[1, e_u]`` (see the module docstring).

    Parameters
    ----------
    rank:
        Rank ``r`` of the shared basis ``B`` (``1 ≤ r ≤ min(U, d_phi)``).
    l2:
        Ridge ``λ`` on ``Θ = [θ0ᵀ; WBᵀ]`` (mean loss).
    unknown_user:
        ``"error"`` (default) or ``"shared"`` (unknown users get ``θ0``).
    adapt_l2:
        Ridge on ``w`` in :meth:`adapt_user` (default ``λ N_train / n``).
    balance, init, seed, dense_svd_limit, tol, max_iter, dtype, device:
        Passed to :class:`~pluralign.rewards.LowRank`.

    Learned: ``theta0_`` (d_phi,), ``basis_`` (d_phi, r; orthonormal), ``weights_`` (U, r),
    ``thetas_ = theta0_ + weights_ @ basis_ᵀ``, ``users_``, ``user_counts_``, ``estimator_``
    (the fitted ``LowRank``), ``n_iter_``, ``converged_``.
    """

    def __init__(
        self,
        rank: int = 2,
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
        self.rank = rank
        self.l2 = l2
        self.unknown_user = unknown_user
        self.adapt_l2 = adapt_l2
        self.balance, self.init, self.seed = balance, init, seed
        self.dense_svd_limit = dense_svd_limit
        self.tol, self.max_iter, self.dtype, self.device = tol, max_iter, dtype, device

    def fit(self, data: PreferenceData, y: None = None) -> SharedBasis:
        """Fit ``θ0, B, W`` jointly; returns ``self`` (warns as :class:`LowRank` does, naming
        the users of separated comparisons; ``y``: ``None`` or ``data.y``)."""
        self._check_y(data, y)
        self._check_params()
        check_unknown_user(self.unknown_user)
        users, index = training_users(data, type(self).__name__)
        top = min(len(users), data.d_phi)
        if (
            isinstance(self.rank, bool)
            or not isinstance(self.rank, int)
            or not 1 <= self.rank <= top
        ):
            raise DataValidationError(
                f"must be an integer in [1, min(n_users, d_phi)] = [1, {top}], got {self.rank!r}",
                field="rank",
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
        cls, inner: LowRank, users: Sequence[Any] | np.ndarray, data: PreferenceData, **params: Any
    ) -> SharedBasis:
        """Wrap a ``LowRank(rank, free_rows=1)`` fitted on augmented one-hot contexts of ``users``
        (in order: column ``1 + i`` of ``x`` is ``users[i]``)."""
        if inner.free_rows != 1 or inner.d_x_ != len(users) + 1:
            raise DataValidationError(
                "need a LowRank with free_rows=1 fitted on [1, e_u] contexts of these users",
                field="inner",
            )
        model = cls(inner.rank, inner.l2, **params)
        model._store_lowrank(inner)
        users = np.asarray(list(users))
        counts = data.x[:, 1:].sum(axis=0).astype(np.int64)  # type: ignore[index]  # x: one-hot user contexts, set by fit
        model._finish(users, counts, data, inner)
        return model

    def user_basis(self) -> np.ndarray:
        """Orthonormal basis of ``span{θ̂0, B̂}`` (dimension ``r+1``, or ``r`` if ``θ̂0 ∈ span B̂``)."""
        return orthonormal_columns(np.concatenate([self.theta0_[:, None], self.basis_], axis=1))

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
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        super().__init__(l2, tol=tol, max_iter=max_iter, dtype=dtype, device=device)
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
        if kron_nnz(data.x, self.basis.shape[1]) > LP_BUDGET:  # type: ignore[arg-type]  # x: one-hot user contexts, set by fit
            return None
        return [signed(row_kron(data.x, data.delta_phi @ self.basis), 2.0 * data.y - 1.0)]  # type: ignore[arg-type]  # x: one-hot user contexts, set by fit

    def _estimate_norm(self) -> float:
        return float(np.linalg.norm(self.weights_))

    def reward(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """``(θ0 + B w_u)ᵀφ`` for one-hot user contexts ``x`` over the new users."""
        self._check_fitted()
        thetas = self.theta0 + np.asarray(x, float) @ self.weights_ @ self.basis.T
        return contract(thetas, np.asarray(phi, float))
