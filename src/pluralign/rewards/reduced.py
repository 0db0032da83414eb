"""The RTV-reduced low-rank model: LoCo-RLHF's refit in the reduced space (Lee, Sun & Liu 2024,
arXiv 2412.19436).

Given a fitted :class:`~pluralign.rewards.LowRank` (``Θ̂ = Û D̂ V̂ᵀ``), the reward is restricted to
the ``p = (d_x+d_phi)r − r²``-dimensional space of :class:`~pluralign.features.RTVMap` and the
Bradley–Terry MLE is refitted there (a convex problem), warm-started from the rotated ``Θ̂``:

    θ̂_z = argmin (1/N) Σ_i −log σ(s_i θ_zᵀ Δz_i) + (λ/2)‖θ_z‖².

The margins use the factored form ``xᵀ W₁ W₂ Δφ`` (``O(N (d_x+d_phi) r)`` per pass); ``z`` is
never formed for fitting. The model is linear in ``θ_z``, so confidence sets and the
pessimistic (PRS) policy apply to it.
"""

from __future__ import annotations

import numpy as np
import torch

from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError, NotFittedError
from pluralign.features.rtv import RTVMap
from pluralign.rewards.base import BradleyTerryModel
from pluralign.rewards.linear import LinearInParameters
from pluralign.rewards.lowrank import LowRank
from pluralign.rewards.validation import check_phi, check_x

__all__ = ["RTVReduced"]


class RTVReduced(LinearInParameters, BradleyTerryModel):
    """Bradley–Terry MLE in the RTV-reduced space of a fitted low-rank model.

    Parameters
    ----------
    base:
        A fitted :class:`LowRank`; its ``U_`` and ``V_`` define the rotation.
    l2, tol, max_iter, dtype, device:
        As for every :class:`~pluralign.rewards.BradleyTerryModel` (``l2`` is a ridge on
        ``θ_z``, i.e. on the retained entries of the rotated ``Θ``).

    Learned attributes: ``rtv_`` (the :class:`RTVMap`), ``params_`` (``θ̂_z``, length ``p``),
    ``theta_`` (``Θ`` rebuilt from ``θ̂_z``, truncated block zero).

    Warnings as for every :class:`~pluralign.rewards.BradleyTerryModel`; the refit is linear in
    ``θ_z``, so with ``l2 = 0`` the separability LP and the identifiability check run on the
    reduced features ``Δz`` (materialized; skipped above their budgets).

    scikit-learn: ``base`` is a fitted input, not a hyper-parameter to tune through this model.
    ``get_params(deep=True)`` does not list ``base__*``, ``set_params(base__l2=...)`` is refused,
    and ``clone`` keeps the same fitted ``base`` (it is only read, never refitted), so a clone
    (e.g. in ``GridSearchCV`` over ``l2``) fits in the reduced space of the one base.
    """

    _fitted_inputs = ("base",)

    _start_note = (
        "the warm start's (the rotated LowRank estimate), since L-BFGS iterates only "
        "move within the span of the gradients"
    )

    def __init__(
        self,
        base: LowRank,
        l2: float = 1e-3,
        *,
        tol: float = 1e-6,
        max_iter: int = 1000,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        super().__init__(l2, tol=tol, max_iter=max_iter, dtype=dtype, device=device)
        self.base = base

    def __sklearn_clone__(self) -> RTVReduced:
        """``sklearn.base.clone``: an unfitted ``RTVReduced`` with the same hyper-parameters and
        the same fitted ``base`` object (the other hyper-parameters are immutable values)."""
        return type(self)(**self.get_params(deep=False))

    def _validate(self, data: PreferenceData) -> None:
        if not getattr(self.base, "is_fitted_", False):
            raise NotFittedError("RTVReduced needs a fitted LowRank base model")
        if getattr(self.base, "free_rows", 0):
            raise DataValidationError(
                "RTV needs a purely low-rank base; this LowRank has free_rows > 0 (its Θ̂ is "
                "not rank r), e.g. a SharedBasis model",
                field="base",
            )
        if data.x is None or data.d_x != self.base.d_x_ or data.d_phi != self.base.d_phi_:
            raise DataValidationError(
                f"data must have d_x={self.base.d_x_}, d_phi={self.base.d_phi_} like the base",
                field="x",
            )

    def _prepare(self, data: PreferenceData) -> None:
        self.rtv_ = RTVMap.from_frames(self.base.U_, self.base.V_)

    def _initial_params(self, data: PreferenceData) -> np.ndarray:
        return self.rtv_.params_from_theta(self.base.theta_)

    def _tensors(self, data: PreferenceData) -> dict[str, torch.Tensor]:
        batch = super()._tensors(data)
        dtype, device = self._torch_dtype, torch.device(self.device)
        rot_u = torch.as_tensor(self.rtv_.U, dtype=dtype, device=device)
        rot_v = torch.as_tensor(self.rtv_.V, dtype=dtype, device=device)
        r = self.rtv_.rank
        batch["x_top"] = batch["x"] @ rot_u[:, :r]  # x̃_{1:r}
        batch["x_rest"] = batch["x"] @ rot_u[:, r:]  # x̃_{r+1:}
        batch["dphi_rot"] = batch["dphi"] @ rot_v  # Δφ̃
        return batch

    def _margins(self, params: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        r, d_phi = self.rtv_.rank, self.rtv_.d_phi
        top = params[: r * d_phi].reshape(r, d_phi)
        bottom = params[r * d_phi :].reshape(-1, r)
        dphi = batch["dphi_rot"]
        first = (batch["x_top"] * (dphi @ top.T)).sum(dim=1)
        second = ((batch["x_rest"] @ bottom) * dphi[:, :r]).sum(dim=1)
        return first + second

    def _store(self, params: np.ndarray, data: PreferenceData) -> None:
        self.params_ = params.copy()
        self.theta_ = self.rtv_.theta_from_params(params)
        self.d_x_, self.d_phi_ = data.d_x, data.d_phi

    # -------------------------------------------------------- linear-in-params API
    def features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        self._check_fitted()
        phi = check_phi("RTVReduced", phi, self.d_phi_)
        return self.rtv_.transform(check_x("RTVReduced", x, phi, self.d_x_), phi)

    def reward_at(self, params: np.ndarray, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        phi = check_phi("RTVReduced", phi, self.d_phi_)
        return self.rtv_.reward_at(params, check_x("RTVReduced", x, phi, self.d_x_), phi)

    def mean_features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        phi = check_phi("RTVReduced", phi, self.d_phi_)
        return self.rtv_.mean_features(check_x("RTVReduced", x, phi, self.d_x_), phi)
