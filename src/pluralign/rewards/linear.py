"""Convex Bradley–Terry estimators: ``Linear`` (θᵀφ) and ``Bilinear`` (xᵀΘφ, full rank).

Both are linear in their parameters after a known feature map ``z(x, φ)``:
``Linear`` uses ``z = φ``; ``Bilinear`` uses ``z = vec(x φᵀ)`` (row-major, so that
``⟨vec Θ, vec(xφᵀ)⟩ = xᵀΘφ``). The Kronecker features are never formed for fitting: the margin
is ``Σ_j (XΘ)_ij Δφ_ij``, one matrix product per pass, ``O(N·d_x·d_phi)``.

The MLE with ridge λ (Zhu, Jordan & Jiao 2023, eq. 3) is

    θ̂ = argmin_θ (1/N) Σ_i −log σ(s_i θᵀΔz_i) + (λ/2)‖θ‖²,

the same optimum as scikit-learn's ``LogisticRegression(fit_intercept=False, C=1/(N·λ))`` on
the features ``Δz_i`` with labels ``y_i``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from pluralign._linalg import contract
from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError
from pluralign.rewards.base import BradleyTerryModel
from pluralign.rewards.diagnostics import (
    ID_BUDGET,
    LP_BUDGET,
    kron_nnz,
    response_basis,
    row_basis,
    row_kron,
    signed,
    svd_cost,
)
from pluralign.rewards.validation import check_phi, check_x

__all__ = ["Bilinear", "Linear", "LinearInParameters"]


class LinearInParameters(ABC):
    """Mixin for models whose reward is ``θᵀ z(x, φ)`` for a known feature map ``z``, with ``z``
    linear in ``φ`` for fixed ``x``.

    Confidence sets and pessimistic policies work with any such model through three
    primitives; only ``features`` materializes ``z`` (confidence sets call it in chunks):

    * ``features(x, φ)`` — ``z``, trailing dimension ``n_params``;
    * ``reward_at(params, x, φ)`` — ``paramsᵀ z(x, φ)`` for any parameter vector, computed
      without forming ``z``;
    * ``mean_features(x, φ)`` — ``(1/n) Σ_i z(x_i, φ_i)``, without forming ``z``.
    """

    params_: np.ndarray
    _uses_context = True  # whether z depends on x (the identifiability check pairs x with φ)

    @abstractmethod
    def features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """``z(x, φ)`` with trailing dimension ``n_params``; leading dims follow ``phi``."""

    @abstractmethod
    def reward_at(self, params: np.ndarray, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """``paramsᵀ z(x, φ)``; shapes as in :meth:`RewardModel.reward`."""

    @abstractmethod
    def mean_features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """``(1/n) Σ_i z(x_i, φ_i)`` for ``phi`` of shape ``(n, d_phi)``."""

    def reward(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        self._check_fitted()  # type: ignore[attr-defined]  # a mixin of a RewardModel
        return self.reward_at(self.params_, x, phi)

    @property
    def n_params(self) -> int:
        """Dimension ``p`` of ``z``."""
        return int(self.params_.size)

    # ---- fit diagnostics (see pluralign.rewards.diagnostics) ------------------------------
    def _separation_problems(self, data: PreferenceData) -> list[np.ndarray] | None:
        """The model's own signed design ``s_i Δz_i`` (``None`` above ``LP_BUDGET`` entries)."""
        if data.n * self.n_params > LP_BUDGET:
            return None
        return [signed(self.features(data.x, data.delta_phi), 2.0 * data.y - 1.0)]

    def _identification_problem(self, data: PreferenceData) -> tuple[np.ndarray, np.ndarray] | None:
        """``(Δz, rows spanning S)``: ``S = span{z(x, φ) − z(x, φ′)}`` over the training
        contexts' span and the training responses' differences. ``z`` is bilinear in
        ``(x, φ)``, so ``S`` is spanned by ``z(b, c)`` over bases ``b`` of ``span{x_i}`` and ``c``
        of ``span{φ − φ′}``. ``None`` when an SVD would exceed ``ID_BUDGET``."""
        n_params = self.n_params
        if svd_cost((data.n, n_params)) > ID_BUDGET:
            return None
        responses = response_basis(data.phi0, data.phi1)
        if self._uses_context and data.x is not None:
            contexts = row_basis(data.x)
            p, q = contexts.shape[0], responses.shape[0]
            if svd_cost((p * q, n_params)) > ID_BUDGET:
                return None
            span = self.features(np.repeat(contexts, q, axis=0), np.tile(responses, (p, 1)))
        else:
            span = self.features(None, responses)
        return self.features(data.x, data.delta_phi), span


class Linear(LinearInParameters, BradleyTerryModel):
    """Context-free reward ``r(φ) = θᵀφ``: one reward model for everybody.

    Learned attributes: ``theta_`` (d_phi,), ``params_`` (same, flat), ``solver_info_``.
    Any user contexts in the data are ignored. Fitting ``Linear`` on everybody's data is the
    ``pooled`` baseline.
    """

    _uses_context = False

    def _initial_params(self, data: PreferenceData) -> np.ndarray:
        return np.zeros(data.d_phi)

    def _margins(self, params: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["dphi"] @ params

    def _store(self, params: np.ndarray, data: PreferenceData) -> None:
        self.theta_ = params.copy()
        self.params_ = self.theta_
        self.d_phi_ = data.d_phi

    def reward_at(self, params: np.ndarray, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        return check_phi("Linear", phi, self.d_phi_) @ params

    def features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return check_phi("Linear", phi, self.d_phi_)

    def mean_features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        return check_phi("Linear", phi, self.d_phi_).mean(axis=0)


class Bilinear(LinearInParameters, BradleyTerryModel):
    """Full-rank contextual reward ``r(x, φ) = xᵀΘφ``.

    Learned attributes: ``theta_`` (d_x, d_phi), ``params_`` = ``vec(theta_)`` (row-major),
    ``solver_info_``.
    """

    def _validate(self, data: PreferenceData) -> None:
        if data.x is None:
            raise DataValidationError(
                "Bilinear needs user contexts; the data has x=None", field="x"
            )

    def _initial_params(self, data: PreferenceData) -> np.ndarray:
        return np.zeros(data.d_x * data.d_phi)

    def _separation_problems(self, data: PreferenceData) -> list[np.ndarray] | None:
        """``s_i vec(x_i Δφ_iᵀ)``, sparse for mostly-zero contexts (one-hot users)."""
        if kron_nnz(data.x, data.d_phi) > LP_BUDGET:  # type: ignore[arg-type]  # x: Bilinear requires contexts
            return None
        return [signed(row_kron(data.x, data.delta_phi), 2.0 * data.y - 1.0)]  # type: ignore[arg-type]  # x: Bilinear requires contexts

    def _margins(self, params: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x, dphi = batch["x"], batch["dphi"]
        theta = params.reshape(x.shape[1], dphi.shape[1])
        return ((x @ theta) * dphi).sum(dim=1)

    def _store(self, params: np.ndarray, data: PreferenceData) -> None:
        self.theta_ = params.reshape(data.d_x, data.d_phi).copy()
        self.params_ = self.theta_.ravel()
        self.d_x_, self.d_phi_ = data.d_x, data.d_phi

    def reward_at(self, params: np.ndarray, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        phi = check_phi("Bilinear", phi, self.d_phi_)
        xt = check_x("Bilinear", x, phi, self.d_x_) @ params.reshape(self.d_x_, self.d_phi_)
        return contract(xt, phi)

    def mean_features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        phi = check_phi("Bilinear", phi, self.d_phi_)
        x = check_x("Bilinear", x, phi, self.d_x_)
        return (x.T @ phi).ravel() / phi.shape[0]

    def features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """``vec(x φᵀ)``: materialized, ``p = d_x·d_phi`` columns; only for small dimensions."""
        self._check_fitted()
        phi = check_phi("Bilinear", phi, self.d_phi_)
        x = check_x("Bilinear", x, phi, self.d_x_)
        if phi.ndim == 3:
            z = x[:, None, :, None] * phi[:, :, None, :]
            return z.reshape(*phi.shape[:2], -1)
        return (x[:, :, None] * phi[:, None, :]).reshape(phi.shape[0], -1)
