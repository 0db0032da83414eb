"""LoCo-RLHF's low-rank contextual reward, fitted by Burer–Monteiro factorization.

Reward (Lee, Sun & Liu 2024, LoCo-RLHF, arXiv 2412.19436): ``r(x, φ) = xᵀΘφ`` with
``rank Θ ≤ r``, parametrized as ``Θ = L Rᵀ`` with ``L ∈ R^{d_x×r}``, ``R ∈ R^{d_phi×r}``. The
estimator minimises

    ℓ(L Rᵀ) + (λ/2)‖L Rᵀ‖²_F + (μ/4)‖LᵀL − RᵀR‖²_F

where ``ℓ`` is the mean negative Bradley–Terry log-likelihood, ``λ = l2`` the same ridge on
``Θ`` as :class:`~pluralign.rewards.Bilinear` (so at full rank both reach the same optimum) and
``μ = balance`` the Burer–Monteiro balancing term (it removes the ``L → LG, R → RG⁻ᵀ``
ambiguity without changing ``Θ``). ``‖LRᵀ‖²_F = tr(LᵀL · RᵀR)`` costs ``O((d_x+d_phi) r²)``.

Kronecker features ``vec(xφᵀ)`` are never formed: a margin is ``⟨Lᵀx, RᵀΔφ⟩``, so one pass
over the data costs ``O(N (d_x + d_phi) r)``. On the CPU in float64 (``solver="auto"``) the
objective and its gradient are closed-form NumPy (see :meth:`LowRank.objective_and_gradient`);
otherwise torch autograd evaluates them. Both feed the same L-BFGS-B run.

Initialization (``init="spectral"``): the top-r singular pairs ``(U₀, V₀)`` of the moment
matrix ``S = (1/N) Σ_i (y_i − ½) x_i Δφ_iᵀ = (1/N) Xᵀ diag(y − ½) ΔΦ``, which is proportional to
``E[x xᵀ] Θ E[Δφ Δφᵀ]`` to first order; then the scale is set by fitting the ``r×r`` core ``C``
of ``Θ = U₀ C V₀ᵀ`` by Bradley–Terry MLE (a convex ``r²``-parameter problem), and
``L = U√D, R = V√D`` from the SVD of ``U₀ C V₀ᵀ``. When ``d_x·d_phi`` exceeds
``dense_svd_limit``, ``S`` is not formed: a randomized SVD (Halko, Martinsson & Tropp 2011)
uses the products ``S v = Xᵀ((y − ½) ⊙ ΔΦ v)/N`` and ``Sᵀ u``.

**Full-rank offset rows** (``free_rows = f > 0``): the first ``f`` coordinates of ``x`` get
unconstrained rows of ``Θ``, the others a rank-``r`` block,

    Θ = [Θ_f ; L Rᵀ],   r(x, φ) = x_{1:f}ᵀ Θ_f φ + x_{f+1:}ᵀ L Rᵀ φ,

with the same ridge on all of ``Θ``: ``(λ/2)(‖Θ_f‖²_F + ‖LRᵀ‖²_F)``. With augmented one-hot
contexts ``x = [1, e_u]`` and ``f = 1`` this is P-ShareLoRA's linear personalized reward
``θ_u = θ0 + B w_u`` (Liu et al. 2025, arXiv 2503.19201): ``Θ_f = θ0ᵀ``, ``L = W``, ``R = B``;
:class:`~pluralign.rewards.SharedBasis` is exactly this model. The spectral start first fits
``Θ_f`` alone (a convex fit), takes the top-``r`` SVD of the moment matrix of the residual,
``S = (1/N) X_{f+1:}ᵀ diag(y − σ(m_f)) ΔΦ`` (``m_f`` the margins of the offset; at ``f = 0`` this
is the ``S`` above, since ``σ(0) = ½``), then fits ``Θ_f`` and the ``r×r`` core jointly.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TypeVar

import numpy as np
import torch
from scipy import sparse
from scipy.special import expit

from pluralign._linalg import contract
from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError
from pluralign.rewards._solver import SolverInfo, blas_threads, minimize_lbfgs_numpy
from pluralign.rewards.base import BradleyTerryModel
from pluralign.rewards.diagnostics import LP_BUDGET, kron_nnz, row_kron, signed
from pluralign.rewards.linear import Bilinear, Linear
from pluralign.rewards.validation import check_int, check_number, check_phi, check_x

__all__ = ["LowRank", "moment_matrix_svd"]

# Up to this rank the closed-form evaluation works on contiguous transposed copies ``Xᵀ, ΔΦᵀ``
# (made once per fit; they double the data's memory for its duration) and multiplies by the
# factors' columns one at a time, matrix-vector products that read them row by row: on the 2-core
# development machine, 1 thread, N = 20k, the four products of an evaluation took 0.35 ms at
# d = 32 and 2.2 ms at d = 128 for r = 2 this way, against 0.72 and 5.7 ms by GEMM on ``X, ΔΦ``
# (OpenBLAS is slow for 2–3 columns); from r = 4 on GEMM was as fast or faster.
_BT = TypeVar("_BT", bound=BradleyTerryModel)  # the type of a model _quiet passes through
_GEMV_RANK = 3


def moment_matrix_svd(
    data: PreferenceData,
    rank: int,
    *,
    dense_limit: int = 4_000_000,
    oversample: int = 10,
    power_iters: int = 4,
    seed: int | np.random.Generator = 0,
    offset: np.ndarray | None = None,
    delta_phi: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD ``(U, s, V)`` of ``S = (1/N) Xᵀ diag(y − ½) ΔΦ``.

    Dense when ``d_x·d_phi ≤ dense_limit``; otherwise a randomized range finder with
    ``power_iters`` power iterations that only multiplies by ``S`` and ``Sᵀ``. With ``offset``
    (margins ``m_i`` of a fitted part of the model), ``y − ½`` becomes the residual ``y − σ(m)``,
    i.e. ``S`` is minus the gradient of the mean log-loss at that point. ``delta_phi``, when
    given, is ``data.delta_phi`` already computed.
    """
    x, dphi = data.x, data.delta_phi if delta_phi is None else delta_phi
    if offset is None:
        w = (data.y - 0.5) / data.n
    else:
        w = (data.y - expit(np.asarray(offset, dtype=np.float64))) / data.n
    if data.d_x * data.d_phi <= dense_limit:
        u, s, vt = np.linalg.svd(x.T @ (w[:, None] * dphi), full_matrices=False)  # type: ignore[union-attr]  # x: fit/_validate require contexts
        return u[:, :rank], s[:rank], vt[:rank].T

    def s_mul(v: np.ndarray) -> np.ndarray:
        return x.T @ (w[:, None] * (dphi @ v))  # type: ignore[union-attr]  # x: fit/_validate require contexts

    def st_mul(u: np.ndarray) -> np.ndarray:
        return dphi.T @ (w[:, None] * (x @ u))

    rng = np.random.default_rng(seed)
    width = min(rank + oversample, data.d_x, data.d_phi)  # sketch width: rank + oversampling
    q, _ = np.linalg.qr(s_mul(rng.standard_normal((data.d_phi, width))))
    for _ in range(power_iters):
        q, _ = np.linalg.qr(st_mul(q))
        q, _ = np.linalg.qr(s_mul(q))
    b = st_mul(q).T  # width × d_phi, = qᵀ S
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
    free_rows:
        Number ``f`` of leading context coordinates whose rows of ``Θ`` are unconstrained
        (full rank, same ridge); the rank constraint applies to the other ``d_x − f`` rows. ``0``
        (the default) is the plain LoCo-RLHF model. See the module docstring.
    solver:
        How the objective and its gradient are evaluated for L-BFGS: ``"numpy"`` (closed-form
        float64 gradients, see :meth:`objective_and_gradient`; no torch graph per evaluation),
        ``"torch"`` (torch autograd on ``device`` in ``dtype``) or ``"auto"`` (the default:
        ``"numpy"`` for ``device="cpu"`` with ``dtype="float64"``, otherwise ``"torch"``). Both
        minimise the same objective with the same L-BFGS-B run and stopping rule.
    tol, max_iter, dtype, device:
        As for every :class:`~pluralign.rewards.BradleyTerryModel`.

    Learned attributes: ``L_`` (d_x, r), ``R_`` (d_phi, r), ``theta_ = L_ R_ᵀ``, its SVD
    ``U_`` (d_x, r), ``s_`` (r,), ``V_`` (d_phi, r), and ``solver_info_``. Works unchanged with
    one-hot user contexts (``x`` = indicator of the user), the "grouping structure" of LoCo-RLHF.
    With ``free_rows = f > 0``: ``theta_free_`` (f, d_phi), ``L_`` is ``(d_x − f, r)``, ``theta_``
    stacks ``[theta_free_; L_ R_ᵀ]``, and ``U_, s_, V_`` are the SVD of the low-rank block
    embedded in rows ``f..d_x`` (the first ``f`` rows of ``U_`` are zero). ``RTVReduced`` reduces
    the plain model only (``free_rows = 0``).

    **Separability** (``l2 = 0``; see :class:`~pluralign.rewards.BradleyTerryModel`): the model
    is not convex, so the exact linear-program test is applied to its two convex conditional
    problems through the estimate: with ``R = R̂`` fixed the problem in ``(Θ_f, L)`` is a
    Bradley–Terry MLE with features ``[x_{1:f} ⊗ Δφ, x_{f+1:} ⊗ R̂ᵀΔφ]``, and with ``L = L̂`` fixed
    the one in ``(Θ_f, R)`` has ``[x_{1:f} ⊗ Δφ, L̂ᵀx_{f+1:} ⊗ Δφ]``. If either has a recession
    direction, the fit cannot be at a finite stationary point (at one, the zero gradient is a
    positive combination of the ``a_i``, which rules a recession direction out) and its scale is
    wherever L-BFGS stopped; if ``Θ̂`` classifies every comparison correctly the MLE provably
    does not exist (``t·Θ̂`` stays rank ``r`` and drives the loss to 0). The identifiability
    check (``DisconnectedComparisonsWarning``) is for models linear in their parameters and
    does not run here.
    """

    _separation_how = " with one Burer–Monteiro factor fixed at its estimate"

    def __init__(
        self,
        rank: int = 2,
        l2: float = 1e-3,
        *,
        balance: float = 1e-4,
        init: str = "spectral",
        seed: int = 0,
        dense_svd_limit: int = 4_000_000,
        free_rows: int = 0,
        solver: str = "auto",
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
        self.free_rows = free_rows
        self.solver = solver

    # ------------------------------------------------------------------ fitting
    def _check_params(self) -> None:
        super()._check_params()
        check_number(self.balance, "balance", owner=type(self).__name__)
        check_int(self.dense_svd_limit, "dense_svd_limit", owner=type(self).__name__)

    def _validate(self, data: PreferenceData) -> None:
        if data.x is None:
            raise DataValidationError("LowRank needs user contexts; the data has x=None", field="x")
        f = self.free_rows
        if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < data.d_x:
            raise DataValidationError(
                f"must be an integer in [0, d_x) = [0, {data.d_x}), got {f!r}", field="free_rows"
            )
        top = min(data.d_x - f, data.d_phi)
        if (
            isinstance(self.rank, bool)
            or not isinstance(self.rank, int)
            or not 1 <= self.rank <= top
        ):
            what = "min(d_x, d_phi)" if f == 0 else "min(d_x − free_rows, d_phi)"
            raise DataValidationError(
                f"must be an integer in [1, {what}] = [1, {top}], got {self.rank!r}",
                field="rank",
            )
        if self.init not in ("spectral", "random"):
            raise DataValidationError(
                f"must be 'spectral' or 'random', got {self.init!r}", field="init"
            )
        if self.solver not in ("auto", "numpy", "torch"):
            raise DataValidationError(
                f"must be 'auto', 'numpy' or 'torch', got {self.solver!r}", field="solver"
            )
        if self.solver == "numpy" and (self.dtype != "float64" or str(self.device) != "cpu"):
            raise DataValidationError(
                f"solver='numpy' evaluates in float64 on the CPU; got dtype={self.dtype!r}, "
                f"device={self.device!r} (use solver='torch' or 'auto')",
                field="solver",
            )

    def fit(self, data: PreferenceData, y: None = None) -> LowRank:
        """Penalized Bradley–Terry MLE on ``data`` (see the class docstring); returns ``self``
        (``y``: ``None`` or ``data.y``, for scikit-learn's ``fit(X, y)``).

        With ``solver="numpy"`` and a pass over the data below ``SMALL_BLAS`` flops, BLAS runs
        on one thread for the fit (:func:`~pluralign.rewards._solver.blas_threads`)."""
        work = 0
        if isinstance(data, PreferenceData) and data.x is not None and self._uses_numpy():
            rank = self.rank if isinstance(self.rank, int) and self.rank > 0 else 1
            work = data.n * (data.d_x + data.d_phi) * rank
        self._fit_dphi = None
        try:
            with blas_threads(work) if work else nullcontext():
                return super().fit(data, y)
        finally:
            del self._fit_dphi

    def _delta_phi(self, data: PreferenceData) -> np.ndarray:
        """``data.delta_phi``, computed once per fit (it is a subtraction on every access)."""
        cached = getattr(self, "_fit_dphi", None)
        if cached is not None and cached[0] is data:
            return cached[1]
        dphi = data.delta_phi
        if hasattr(self, "_fit_dphi"):
            self._fit_dphi = (data, dphi)  # type: ignore[assignment]  # a cache, None until set
        return dphi

    def _uses_numpy(self) -> bool:
        if self.solver == "auto":
            return self.dtype == "float64" and str(self.device) == "cpu"
        return self.solver == "numpy"

    def objective_and_gradient(
        self, params: np.ndarray, data: PreferenceData
    ) -> tuple[float, np.ndarray]:
        """The fitted objective and its closed-form gradient at flat ``params``
        ``[vec Θ_f, vec L, vec R]`` (what ``solver="numpy"`` hands to L-BFGS).

        With margins ``m = ⟨Lᵀx, RᵀΔφ⟩ (+ ⟨Θ_fᵀx_{1:f}, Δφ⟩)``, ``g = ∂softplus(−s m)/∂m / N``
        (``= (σ(m) − y)/N`` for 0/1 labels), ``G = LᵀL − RᵀR``:
        ``∇_L = X_{f+1:}ᵀ diag(g) ΔΦ R + λ L RᵀR + μ L G``,
        ``∇_R = ΔΦᵀ diag(g) X_{f+1:} L + λ R LᵀL − μ R G`` and
        ``∇_{Θ_f} = X_{1:f}ᵀ diag(g) ΔΦ + λ Θ_f``. One evaluation costs ``O(N (d_x + d_phi) r)``.
        """
        return self._numpy_objective(data.x, data.delta_phi, 2.0 * data.y - 1.0)(  # type: ignore[arg-type]  # x: fit/_validate require contexts
            np.asarray(params, dtype=np.float64)
        )

    def _numpy_objective(self, x: np.ndarray, dphi: np.ndarray, sign: np.ndarray):
        r, f, lam, mu = self.rank, self.free_rows, float(self.l2), float(self.balance)
        n, d_phi = dphi.shape
        x, dphi = np.asarray(x, dtype=np.float64), np.asarray(dphi, dtype=np.float64)
        x_free, x_rest = (x[:, :f], np.ascontiguousarray(x[:, f:])) if f else (None, x)
        d_rest = x_rest.shape[1]
        sign = np.asarray(sign, dtype=np.float64)
        gemv = r <= _GEMV_RANK
        if gemv:
            x_t, dphi_t = np.ascontiguousarray(x_rest.T), np.ascontiguousarray(dphi.T)

        def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
            free = flat[: f * d_phi].reshape(f, d_phi)
            rest = flat[f * d_phi :]
            left = rest[: d_rest * r].reshape(d_rest, r)
            right = rest[d_rest * r :].reshape(d_phi, r)
            if gemv:  # column by column (see _GEMV_RANK)
                xl = [left[:, k] @ x_t for k in range(r)]
                pr = [right[:, k] @ dphi_t for k in range(r)]
                margin = xl[0] * pr[0]
                for k in range(1, r):
                    margin += xl[k] * pr[k]
            else:
                xl, pr = x_rest @ left, dphi @ right
                margin = np.einsum("nk,nk->n", xl, pr)
            if f:
                margin += np.einsum("nk,nk->n", x_free @ free, dphi)
            q = expit(sign * margin)  # σ(s m); softplus(−s m) = −log q
            if q.min() > 0.0:
                loss = -float(np.mean(np.log(q)))
            else:  # some s m below −745: log q underflows
                loss = float(np.mean(np.logaddexp(0.0, -sign * margin)))
            g = (sign / n) * (q - 1.0)  # d softplus(−s m)/dm = −s σ(−s m), averaged
            gram_l, gram_r = left.T @ left, right.T @ right
            gap = gram_l - gram_r
            value = (
                loss
                + 0.5 * lam * float(np.sum(gram_l * gram_r))
                + 0.25 * mu * float(np.sum(gap * gap))
            )
            if gemv:
                grad_l = np.stack([x_t @ (g * pr[k]) for k in range(r)], axis=1)
                grad_r = np.stack([dphi_t @ (g * xl[k]) for k in range(r)], axis=1)
            else:
                grad_l = x_rest.T @ (g[:, None] * pr)
                grad_r = dphi.T @ (g[:, None] * xl)
            grad_l += left @ (lam * gram_r + mu * gap)
            grad_r += right @ (lam * gram_l - mu * gap)
            parts = [grad_l.ravel(), grad_r.ravel()]
            if f:
                value += 0.5 * lam * float(np.sum(free * free))
                parts.insert(0, (x_free.T @ (g[:, None] * dphi) + lam * free).ravel())  # type: ignore[union-attr]  # x: fit/_validate require contexts
            return value, np.concatenate(parts)

        return fun

    def _solve(self, data: PreferenceData, x0: np.ndarray) -> tuple[np.ndarray, SolverInfo]:
        if not self._uses_numpy():
            return super()._solve(data, x0)
        fun = self._numpy_objective(data.x, self._delta_phi(data), 2.0 * data.y - 1.0)  # type: ignore[arg-type]  # x: fit/_validate require contexts
        return minimize_lbfgs_numpy(fun, x0, tol=self.tol, max_iter=self.max_iter)

    def _initial_params(self, data: PreferenceData) -> np.ndarray:
        if self.free_rows:
            return self._initial_params_offset(data)
        r = self.rank
        if self.init == "random":
            rng = np.random.default_rng(self.seed)
            scale = 1e-2
            left = scale * rng.standard_normal((data.d_x, r))
            right = scale * rng.standard_normal((data.d_phi, r))
            return np.concatenate([left.ravel(), right.ravel()])
        dphi = self._delta_phi(data)
        u0, _, v0 = moment_matrix_svd(
            data, r, dense_limit=self.dense_svd_limit, seed=self.seed, delta_phi=dphi
        )
        if self._uses_numpy():
            # The r²-parameter core fit by Newton's method (explicit r²×r² Hessian).
            z = (_skinny(data.x, u0)[:, :, None] * _skinny(dphi, v0)[:, None, :]).reshape(  # type: ignore[arg-type]  # x: fit/_validate require contexts
                data.n, -1
            )
            core = _newton_logistic(
                z, 2.0 * data.y - 1.0, float(self.l2), self.tol, min(self.max_iter, 100)
            ).reshape(r, r)
        else:
            core_data = PreferenceData(
                x=data.x @ u0, phi0=np.zeros((data.n, r)), phi1=data.delta_phi @ v0, y=data.y
            )
            core = (
                _quiet(Bilinear(l2=self.l2, tol=self.tol, max_iter=self.max_iter))
                .fit(core_data)
                .theta_
            )
        uc, sc, vct = np.linalg.svd(core)
        root = np.sqrt(sc)
        left, right = (u0 @ uc) * root, (v0 @ vct.T) * root
        return np.concatenate([left.ravel(), right.ravel()])

    def _initial_params_offset(self, data: PreferenceData) -> np.ndarray:
        """Spectral (or random) start with ``f`` free rows; see the module docstring."""
        r, f = self.rank, self.free_rows
        d_rest = data.d_x - f
        if self.init == "random":
            rng = np.random.default_rng(self.seed)
            left = 1e-2 * rng.standard_normal((d_rest, r))
            right = 1e-2 * rng.standard_normal((data.d_phi, r))
            return np.concatenate([np.zeros(f * data.d_phi), left.ravel(), right.ravel()])
        x_free, x_rest = data.x[:, :f], data.x[:, f:]  # type: ignore[index]  # x: fit/_validate require contexts
        dphi = data.delta_phi
        free_data = PreferenceData(x=x_free, phi0=np.zeros_like(dphi), phi1=dphi, y=data.y)
        free = (
            _quiet(Bilinear(l2=self.l2, tol=self.tol, max_iter=self.max_iter)).fit(free_data).theta_
        )
        offset = np.einsum("nd,nd->n", x_free @ free, dphi)
        rest_data = PreferenceData(x=x_rest, phi0=free_data.phi0, phi1=dphi, y=data.y)
        u0, _, v0 = moment_matrix_svd(
            rest_data, r, dense_limit=self.dense_svd_limit, seed=self.seed, offset=offset
        )
        # Joint convex fit of Θ_f and the r×r core C of U₀ C V₀ᵀ on their (small) features.
        z_free = (x_free[:, :, None] * dphi[:, None, :]).reshape(data.n, -1)
        z_core = ((x_rest @ u0)[:, :, None] * (dphi @ v0)[:, None, :]).reshape(data.n, -1)
        z = np.concatenate([z_free, z_core], axis=1)
        joint = (
            _quiet(Linear(l2=self.l2, tol=self.tol, max_iter=self.max_iter))
            .fit(PreferenceData(x=None, phi0=np.zeros_like(z), phi1=z, y=data.y))
            .theta_
        )
        free, core = joint[: f * data.d_phi], joint[f * data.d_phi :].reshape(r, r)
        uc, sc, vct = np.linalg.svd(core)
        root = np.sqrt(sc)
        left, right = (u0 @ uc) * root, (v0 @ vct.T) * root
        return np.concatenate([free, left.ravel(), right.ravel()])

    def _parts(
        self, params: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Θ_f, L, R)`` from the flat parameters ``[vec Θ_f, vec L, vec R]`` (``Θ_f`` is empty
        when ``free_rows = 0``)."""
        r, f = self.rank, self.free_rows
        d_rest, d_phi = batch["x"].shape[1] - f, batch["dphi"].shape[1]
        free = params[: f * d_phi].reshape(f, d_phi)
        rest = params[f * d_phi :]
        return free, rest[: d_rest * r].reshape(d_rest, r), rest[d_rest * r :].reshape(-1, r)

    def _margins(self, params: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        f, x, dphi = self.free_rows, batch["x"], batch["dphi"]
        free, left, right = self._parts(params, batch)
        if not f:
            return ((x @ left) * (dphi @ right)).sum(dim=1)
        return ((x[:, f:] @ left) * (dphi @ right)).sum(dim=1) + ((x[:, :f] @ free) * dphi).sum(
            dim=1
        )

    def _penalty(self, params: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(λ/2)‖LRᵀ‖²_F + (μ/4)‖LᵀL − RᵀR‖²_F`` (plus ``(λ/2)‖Θ_f‖²_F`` with free rows)."""
        free, left, right = self._parts(params, batch)
        gram_left, gram_right = left.T @ left, right.T @ right
        gap = gram_left - gram_right
        ridge = 0.5 * self.l2 * torch.sum(gram_left * gram_right)
        if self.free_rows:
            ridge = ridge + 0.5 * self.l2 * torch.sum(free * free)
        return ridge + 0.25 * self.balance * torch.sum(gap * gap)

    def _store(self, params: np.ndarray, data: PreferenceData) -> None:
        r, f = self.rank, self.free_rows
        d_rest = data.d_x - f
        self.theta_free_ = params[: f * data.d_phi].reshape(f, data.d_phi).copy()
        params = params[f * data.d_phi :]
        self.L_ = params[: d_rest * r].reshape(d_rest, r).copy()
        self.R_ = params[d_rest * r :].reshape(data.d_phi, r).copy()
        self.d_x_, self.d_phi_ = data.d_x, data.d_phi
        # SVD of L Rᵀ through thin QRs: L = Q_L T_L, R = Q_R T_R, L Rᵀ = Q_L (T_L T_Rᵀ) Q_Rᵀ.
        q_left, t_left = np.linalg.qr(self.L_)
        q_right, t_right = np.linalg.qr(self.R_)
        uc, s, vct = np.linalg.svd(t_left @ t_right.T)
        self.U_, self.s_, self.V_ = q_left @ uc, s, q_right @ vct.T
        self.theta_ = self.L_ @ self.R_.T
        if f:
            self.U_ = np.concatenate([np.zeros((f, r)), self.U_])
            self.theta_ = np.concatenate([self.theta_free_, self.theta_])

    def _separation_problems(self, data: PreferenceData) -> list[object] | None:
        """The two conditional problems of the class docstring (``None`` above ``LP_BUDGET``)."""
        f, r, dphi = self.free_rows, self.rank, data.delta_phi
        x_free, x_rest = data.x[:, :f], data.x[:, f:]  # type: ignore[index]  # x: fit/_validate require contexts
        shared = kron_nnz(x_free, data.d_phi)
        if shared + max(kron_nnz(x_rest, r), data.n * r * data.d_phi) > LP_BUDGET:
            return None
        sign = 2.0 * data.y - 1.0
        free = row_kron(x_free, dphi)
        problems = []
        for part in (row_kron(x_rest, dphi @ self.R_), row_kron(x_rest @ self.L_, dphi)):
            if f and sparse.issparse(part):
                part = sparse.hstack([sparse.csr_matrix(free), part]).tocsr()
            elif f:
                part = np.hstack(
                    [np.asarray(free.todense()) if sparse.issparse(free) else free, part]  # type: ignore[union-attr]  # scipy is untyped
                )
            problems.append(signed(part, sign))
        return problems

    # --------------------------------------------------------------- prediction
    def reward(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        self._check_fitted()
        phi = check_phi("LowRank", phi, self.d_phi_)
        x = check_x("LowRank", x, phi, self.d_x_)
        # xᵀ L Rᵀ φ = ⟨Lᵀx, Rᵀφ⟩ without forming Θ.
        f = self.free_rows
        if f:
            return contract(x[:, :f] @ self.theta_free_ + (x[:, f:] @ self.L_) @ self.R_.T, phi)
        return contract((x @ self.L_) @ self.R_.T, phi)


def _skinny(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for a tall ``a`` and a ``b`` of few columns (column by column up to
    ``_GEMV_RANK`` columns; see its comment)."""
    if b.shape[1] > _GEMV_RANK:
        return a @ b
    return np.stack([a @ b[:, k] for k in range(b.shape[1])], axis=1)


def _newton_logistic(
    z: np.ndarray, sign: np.ndarray, l2: float, tol: float, max_iter: int
) -> np.ndarray:
    """``argmin_θ mean softplus(−s zθ) + (l2/2)‖θ‖²`` by damped Newton (Armijo backtracking),
    from ``θ = 0``, until the largest gradient entry is ``≤ tol`` or ``max_iter`` steps (for the
    small convex fits of the spectral start; the last iterate is returned either way)."""
    n, n_params = z.shape
    theta = np.zeros(n_params)

    def value(th: np.ndarray) -> tuple[float, np.ndarray]:
        sm = sign * (z @ th)
        q = expit(sm)  # σ(s m); softplus(−s m) = −log q
        loss = (
            -float(np.mean(np.log(q))) if q.min() > 0.0 else float(np.mean(np.logaddexp(0.0, -sm)))
        )
        return loss + 0.5 * l2 * float(th @ th), q

    f, q = value(theta)
    for _ in range(max_iter):
        grad = z.T @ (sign * (q - 1.0)) / n + l2 * theta
        if np.max(np.abs(grad)) <= tol:
            break
        hess = (z.T * (q * (1.0 - q) / n)) @ z + l2 * np.eye(n_params)
        try:
            step = -np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = -np.linalg.lstsq(hess, grad, rcond=None)[0]
        slope, alpha = float(grad @ step), 1.0
        while alpha > 1e-10:
            f_new, q_new = value(theta + alpha * step)
            if f_new <= f + 1e-4 * alpha * slope:
                break
            alpha *= 0.5
        else:
            break
        theta, f, q = theta + alpha * step, f_new, q_new
    return theta


def _quiet(model: _BT) -> _BT:
    """Mark an internal fit (a spectral start) as one that issues no warnings of its own."""
    model._quiet = True
    return model
