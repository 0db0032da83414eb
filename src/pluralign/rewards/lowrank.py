"""LoCo-RLHF's low-rank contextual reward, fitted by Burer–Monteiro factorization.

Reward (Lee, Sun & Liu 2024, LoCo-RLHF): ``r(x, φ) = xᵀΘφ`` with ``rank Θ ≤ r``, parametrized
as ``Θ = L Rᵀ`` with ``L ∈ R^{d_x×r}``, ``R ∈ R^{d_phi×r}``. The estimator minimises

    ℓ(L Rᵀ) + (λ/2)‖L Rᵀ‖²_F + (μ/4)‖LᵀL − RᵀR‖²_F

where ``ℓ`` is the mean negative Bradley–Terry log-likelihood, ``λ = l2`` the same ridge on
``Θ`` as :class:`~pluralign.rewards.Bilinear` (so at full rank both reach the same optimum) and
``μ = balance`` the Burer–Monteiro balancing term (it removes the ``L → LG, R → RG⁻ᵀ``
ambiguity without changing ``Θ``). ``‖LRᵀ‖²_F = tr(LᵀL · RᵀR)`` costs ``O((d_x+d_phi) r²)``.

Kronecker features ``vec(xφᵀ)`` are never formed: a margin is ``⟨Lᵀx, RᵀΔφ⟩``, so one pass
over the data costs ``O(N (d_x + d_phi) r)``.

Initialization (``init="spectral"``): the top-r singular pairs ``(U₀, V₀)`` of the moment
matrix ``S = (1/N) Σ_i (y_i − ½) x_i Δφ_iᵀ = (1/N) Xᵀ diag(y − ½) ΔΦ``, which is proportional to
``E[x xᵀ] Θ E[Δφ Δφᵀ]`` to first order; then the scale is set by fitting the ``r×r`` core ``C``
of ``Θ = U₀ C V₀ᵀ`` by Bradley–Terry MLE (a convex ``r²``-parameter problem), and
``L = U√D, R = V√D`` from the SVD of ``U₀ C V₀ᵀ``. When ``d_x·d_phi`` exceeds
``dense_svd_limit``, ``S`` is not formed: a randomized SVD (Halko, Martinsson & Tropp 2011)
uses the products ``S v = Xᵀ((y − ½) ⊙ ΔΦ v)/N`` and ``Sᵀ u``.
"""

from __future__ import annotations

import numpy as np
import torch

from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError
from pluralign.rewards.base import BradleyTerryModel
from pluralign.rewards.linear import Bilinear, _check_phi, _check_x, contract

__all__ = ["LowRank", "moment_matrix_svd"]


def moment_matrix_svd(
    data: PreferenceData,
    rank: int,
    *,
    dense_limit: int = 4_000_000,
    oversample: int = 10,
    power_iters: int = 4,
    seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD ``(U, s, V)`` of ``S = (1/N) Xᵀ diag(y − ½) ΔΦ``.

    Dense when ``d_x·d_phi ≤ dense_limit``; otherwise a randomized range finder with
    ``power_iters`` power iterations that only multiplies by ``S`` and ``Sᵀ``.
    """
    x, dphi = data.x, data.delta_phi
    w = (data.y - 0.5) / data.n
    if data.d_x * data.d_phi <= dense_limit:
        u, s, vt = np.linalg.svd(x.T @ (w[:, None] * dphi), full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank].T

    def s_mul(v: np.ndarray) -> np.ndarray:
        return x.T @ (w[:, None] * (dphi @ v))

    def st_mul(u: np.ndarray) -> np.ndarray:
        return dphi.T @ (w[:, None] * (x @ u))

    rng = np.random.default_rng(seed)
    k = min(rank + oversample, data.d_x, data.d_phi)
    q, _ = np.linalg.qr(s_mul(rng.standard_normal((data.d_phi, k))))
    for _ in range(power_iters):
        q, _ = np.linalg.qr(st_mul(q))
        q, _ = np.linalg.qr(s_mul(q))
    b = st_mul(q).T  # k × d_phi, = qᵀ S
    ub, s, vt = np.linalg.svd(b, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vt[:rank].T


class LowRank(BradleyTerryModel):
    """Rank-constrained contextual Bradley–Terry MLE ``xᵀ L Rᵀ φ`` (Burer–Monteiro).

    Parameters
    ----------
    rank:
        The rank ``r`` of ``Θ̂``.
    l2:
        Ridge ``λ`` on ``Θ``: adds ``(λ/2)‖LRᵀ‖²_F``.
    balance:
        Weight ``μ`` of the balancing term ``(μ/4)‖LᵀL − RᵀR‖²_F``. It only fixes the gauge
        (the spectral start is balanced, and gradient flow preserves ``LᵀL − RᵀR``), so it is
        small by default: on ``d_x = d_phi = 20, r = 2, N = 500`` data ``μ = 1`` took L-BFGS 598
        iterations and ``μ = 1e-4`` took 31, to the same optimum.
    init:
        ``"spectral"`` (see the module docstring) or ``"random"`` (small Gaussian factors).
    seed:
        Seed of the random initialization and of the randomized SVD.
    dense_svd_limit:
        Largest ``d_x·d_phi`` for which the moment matrix is formed; above it, randomized SVD.
    tol, max_iter, dtype, device:
        As for every :class:`~pluralign.rewards.BradleyTerryModel`.

    Learned attributes: ``L_`` (d_x, r), ``R_`` (d_phi, r), ``theta_ = L_ R_ᵀ``, its SVD
    ``U_`` (d_x, r), ``s_`` (r,), ``V_`` (d_phi, r), and ``solver_info_``. Works unchanged with
    one-hot user contexts (``x`` = indicator of the user), the "grouping structure" of LoCo-RLHF.
    """

    def __init__(
        self,
        rank: int = 2,
        l2: float = 1e-3,
        *,
        balance: float = 1e-4,
        init: str = "spectral",
        seed: int = 0,
        dense_svd_limit: int = 4_000_000,
        tol: float = 1e-6,
        max_iter: int = 1000,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        super().__init__(l2, tol=tol, max_iter=max_iter, dtype=dtype, device=device)
        self.rank = rank
        self.balance = balance
        self.init = init
        self.seed = seed
        self.dense_svd_limit = dense_svd_limit

    # ------------------------------------------------------------------ fitting
    def _validate(self, data: PreferenceData) -> None:
        if data.x is None:
            raise DataValidationError("LowRank needs user contexts; the data has x=None",
                                      field="x")
        if not isinstance(self.rank, int) or not 1 <= self.rank <= min(data.d_x, data.d_phi):
            raise DataValidationError(
                f"must be an integer in [1, min(d_x, d_phi)] = [1, {min(data.d_x, data.d_phi)}],"
                f" got {self.rank!r}",
                field="rank",
            )
        if self.init not in ("spectral", "random"):
            raise DataValidationError(f"must be 'spectral' or 'random', got {self.init!r}",
                                      field="init")

    def _initial_params(self, data: PreferenceData) -> np.ndarray:
        r = self.rank
        if self.init == "random":
            rng = np.random.default_rng(self.seed)
            scale = 1e-2
            left = scale * rng.standard_normal((data.d_x, r))
            right = scale * rng.standard_normal((data.d_phi, r))
            return np.concatenate([left.ravel(), right.ravel()])
        u0, _, v0 = moment_matrix_svd(data, r, dense_limit=self.dense_svd_limit, seed=self.seed)
        core_data = PreferenceData(
            x=data.x @ u0, phi0=np.zeros((data.n, r)), phi1=data.delta_phi @ v0, y=data.y
        )
        core = Bilinear(l2=self.l2, tol=self.tol, max_iter=self.max_iter).fit(core_data).theta_
        uc, sc, vct = np.linalg.svd(core)
        root = np.sqrt(sc)
        left, right = (u0 @ uc) * root, (v0 @ vct.T) * root
        return np.concatenate([left.ravel(), right.ravel()])

    def _split(self, params: torch.Tensor, d_x: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.rank
        return params[: d_x * r].reshape(d_x, r), params[d_x * r :].reshape(-1, r)

    def _margins(self, params: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        left, right = self._split(params, batch["x"].shape[1])
        return ((batch["x"] @ left) * (batch["dphi"] @ right)).sum(dim=1)

    def _penalty(self, params: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(λ/2)‖LRᵀ‖²_F + (μ/4)‖LᵀL − RᵀR‖²_F``."""
        left, right = self._split(params, batch["x"].shape[1])
        gram_left, gram_right = left.T @ left, right.T @ right
        gap = gram_left - gram_right
        ridge = 0.5 * self.l2 * torch.sum(gram_left * gram_right)
        return ridge + 0.25 * self.balance * torch.sum(gap * gap)

    def _store(self, params: np.ndarray, data: PreferenceData) -> None:
        d_x, r = data.d_x, self.rank
        self.L_ = params[: d_x * r].reshape(d_x, r).copy()
        self.R_ = params[d_x * r :].reshape(data.d_phi, r).copy()
        self.d_x_, self.d_phi_ = data.d_x, data.d_phi
        # SVD of L Rᵀ through thin QRs: L = Q_L T_L, R = Q_R T_R, L Rᵀ = Q_L (T_L T_Rᵀ) Q_Rᵀ.
        q_left, t_left = np.linalg.qr(self.L_)
        q_right, t_right = np.linalg.qr(self.R_)
        uc, s, vct = np.linalg.svd(t_left @ t_right.T)
        self.U_, self.s_, self.V_ = q_left @ uc, s, q_right @ vct.T
        self.theta_ = self.L_ @ self.R_.T

    # --------------------------------------------------------------- prediction
    def reward(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        self._check_fitted()
        phi = _check_phi("LowRank", phi, self.d_phi_)
        x = _check_x("LowRank", x, phi, self.d_x_)
        # xᵀ L Rᵀ φ = ⟨Lᵀx, Rᵀφ⟩ without forming Θ.
        return contract((x @ self.L_) @ self.R_.T, phi)
