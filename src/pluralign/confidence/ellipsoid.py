"""Ellipsoidal confidence sets for models linear in their parameters (docs/design.md §3).

For a model ``r = θᵀz(x, φ)``, ``θ ∈ R^p`` (``p = n_params``), with comparison differences
``Δz_i = z(x_i, φ1_i) − z(x_i, φ0_i)``
(Zhu, Jordan & Jiao 2023):

* design matrix ``Σ̂ = (1/N) Σ_i Δz_i Δz_iᵀ`` (``kind="design"``), or Fisher information
  ``(1/N) Σ_i σ'(θ̂ᵀΔz_i) Δz_i Δz_iᵀ`` (``kind="fisher"``); ``M = Σ̂ + λI``;
* ``C = {θ : ‖θ − θ̂‖_M ≤ β}``;
* ``β = "theory"``: ``β = sqrt((p + log(1/δ)) / (γ² N) + λB²)`` with
  ``γ = 1 / (2 + e^{−LB} + e^{LB})``, ``L = max_i ‖Δz_i‖`` and ``B`` a bound on ``‖θ‖``
  (``‖θ̂‖`` unless given). This is the constant of Zhu et al.'s Lemma 3.1 without its universal
  multiplier; it is very conservative when ``LB`` is large, which is why experiments sweep a
  numeric ``β`` (see :func:`beta_rate`).
* the worst case of a linear functional is closed-form:
  ``min_{θ∈C} θᵀw = θ̂ᵀw − β‖w‖_{M⁻¹}``, attained at ``θ̂ − β M⁻¹w / ‖w‖_{M⁻¹}``.

``M`` is ``p×p`` and is accumulated from ``Δz`` in chunks of rows, so the ``N×p`` matrix of
features is never held at once. When ``p×p`` would not fit in ``max_bytes`` (e.g. full-rank
``p = d_x·d_phi`` at high dimension), construction refuses with a
:class:`~pluralign.errors.ResourceError` instead of running out of memory.

Parameters are validated with a :class:`~pluralign.errors.DataValidationError` whose ``field``
names the parameter: ``beta`` a finite number ``≥ 0`` (or ``"theory"``), ``delta`` in ``(0, 1)``,
``lam`` finite and ``> 0`` when given to :meth:`ConfidenceSet.fit` (``M = Σ̂ + λI`` must be
positive definite, and ``Σ̂`` is singular whenever ``N < p``), ``bound_theta`` finite ``≥ 0``.
"""

from __future__ import annotations

import math
import os

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular

from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError, PluralignError, ResourceError
from pluralign.rewards.linear import LinearInParameters
from pluralign.rewards.validation import check_int, check_number

__all__ = ["ConfidenceSet", "beta_rate", "theory_beta"]

_CHUNK_ENTRIES = 1 << 22  # rows per chunk × p: ~32 MB of float64 features at a time


def beta_rate(n_params: int, n: float, delta: float = 0.05) -> float:
    """``sqrt((p + log(1/δ)) / N)``, ``p = n_params``: the rate of ``β`` in the theory, without
    constants."""
    delta = check_number(delta, "delta", owner="beta_rate", strict=True, below=1.0)
    n = check_number(n, "n", owner="beta_rate", strict=True)
    return math.sqrt((n_params + math.log(1.0 / delta)) / n)


def theory_beta(
    n_params: int, n: float, *, delta: float, lam: float, bound_theta: float, bound_feature: float
) -> float:
    """``sqrt((p + log(1/δ)) / (γ² N) + λB²)`` with ``p = n_params`` and
    ``γ = 1/(2 + e^{−LB} + e^{LB})``."""
    delta = check_number(delta, "delta", owner="theory_beta", strict=True, below=1.0)
    n = check_number(n, "n", owner="theory_beta", strict=True)
    lam = check_number(lam, "lam", owner="theory_beta")
    bound_theta = check_number(bound_theta, "bound_theta", owner="theory_beta")
    bound_feature = check_number(bound_feature, "bound_feature", owner="theory_beta")
    half = abs(bound_feature * bound_theta) / 2.0
    # 1/γ = 2 + e^{−LB} + e^{LB} = 4 cosh²(LB/2); in logs, so it stays finite for large LB.
    log_cosh = half + math.log1p(math.exp(-2.0 * half)) - math.log(2.0)
    log_inv_gamma = math.log(4.0) + 2.0 * log_cosh
    log_first = math.log(n_params + math.log(1.0 / delta)) + 2.0 * log_inv_gamma - math.log(n)
    first = math.exp(min(log_first, 700.0))
    return math.sqrt(first + lam * bound_theta**2)


def max_matrix_bytes() -> int:
    """Default memory cap for ``M``: a quarter of the physical memory (at most 8 GiB)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return int(min(total // 4, 8 << 30))


class ConfidenceSet:
    """``{θ : ‖θ − θ̂‖_M ≤ β}`` around a fitted linear-in-parameters model.

    Build it with :meth:`fit`. Attributes: ``center`` (``θ̂``), ``beta``, ``M`` (p×p), ``lam``,
    ``n``, ``kind``, ``bound_feature`` (``L``), ``bound_theta`` (``B``).
    """

    def __init__(
        self,
        center: np.ndarray,
        M: np.ndarray,
        beta: float,
        *,
        lam: float,
        n: int,
        kind: str,
        bound_feature: float,
        bound_theta: float,
    ) -> None:
        self.center = np.asarray(center, float)
        self.M = M
        self.beta = check_number(beta, "beta", owner="ConfidenceSet")
        self.lam, self.n, self.kind = check_number(lam, "lam", owner="ConfidenceSet"), n, kind
        self.bound_feature, self.bound_theta = bound_feature, bound_theta
        try:
            self._chol = cho_factor(M, lower=True)
        except np.linalg.LinAlgError:
            raise DataValidationError(
                "ConfidenceSet.M must be symmetric positive definite (M = Σ̂ + λI with λ > 0)",
                field="M",
            ) from None
        self._lower = np.tril(self._chol[0])

    @property
    def n_params(self) -> int:
        """Dimension ``p`` of ``θ`` (the model's ``n_params``)."""
        return int(self.center.size)

    @classmethod
    def fit(
        cls,
        model: LinearInParameters,
        data: PreferenceData,
        *,
        beta: float | str = "theory",
        kind: str = "design",
        lam: float | None = None,
        delta: float = 0.05,
        bound_theta: float | None = None,
        max_bytes: int | None = None,
    ) -> ConfidenceSet:
        """Accumulate ``M`` over ``data`` and set ``β``.

        ``lam`` defaults to the model's ridge ``l2`` (or ``1/N`` when that is 0), so that ``M``
        is the Hessian of the model's own penalized objective under the design/Fisher choice.
        Invalid ``beta``, ``delta``, ``lam``, ``bound_theta`` or ``max_bytes`` raise a
        ``DataValidationError`` naming the parameter (see the module docstring).
        """
        if not isinstance(model, LinearInParameters):
            raise PluralignError(
                f"{type(model).__name__} is not linear in its parameters; confidence sets need "
                "a model with features/params_ (Linear, Bilinear, RTVReduced)"
            )
        if kind not in ("design", "fisher"):
            raise PluralignError(f"kind must be 'design' or 'fisher', got {kind!r}")
        owner = "ConfidenceSet.fit"
        if isinstance(beta, str):
            if beta != "theory":
                raise DataValidationError(
                    f"{owner}: beta must be a finite number ≥ 0 or 'theory', got {beta!r}",
                    field="beta",
                )
        else:
            check_number(beta, "beta", owner=owner)
        check_number(delta, "delta", owner=owner, strict=True, below=1.0)
        if lam is not None:
            check_number(lam, "lam", owner=owner, strict=True)
        if bound_theta is not None:
            check_number(bound_theta, "bound_theta", owner=owner)
        if max_bytes is not None:
            check_int(max_bytes, "max_bytes", owner=owner)
        n_params = model.n_params
        needed = 3 * 8 * n_params * n_params  # M, its Cholesky factor, one temporary
        limit = max_bytes if max_bytes is not None else max_matrix_bytes()
        if needed > limit:
            raise ResourceError(
                f"a confidence set in {n_params} dimensions needs a {n_params}×{n_params} matrix "
                f"(about {needed / 2**30:.1f} GiB with its factor), over the limit of "
                f"{limit / 2**30:.1f} GiB. Full-rank pessimism does not scale to this dimension; "
                "use the low-rank model and PRS (RTVReduced, p = (d_x+d_phi)r − r²)."
            )
        n = data.n
        lam = float(lam if lam is not None else (model.l2 if model.l2 > 0 else 1.0 / n))  # type: ignore[attr-defined]  # every LinearInParameters model has l2
        M = np.zeros((n_params, n_params))
        max_norm = 0.0
        chunk = max(1, _CHUNK_ENTRIES // max(n_params, 1))
        for start in range(0, n, chunk):
            part = slice(start, min(n, start + chunk))
            x = None if data.x is None else data.x[part]
            dz = model.features(x, data.delta_phi[part])  # z is linear in φ
            max_norm = max(max_norm, float(np.sqrt(np.max(np.sum(dz * dz, axis=1)))))
            if kind == "fisher":
                margin = dz @ model.params_
                p = 1.0 / (1.0 + np.exp(-margin))
                M += (dz * (p * (1.0 - p))[:, None]).T @ dz
            else:
                M += dz.T @ dz
        M /= n
        M[np.diag_indices_from(M)] += lam
        center = model.params_
        bound = float(bound_theta if bound_theta is not None else np.linalg.norm(center))
        if beta == "theory":
            beta_value = theory_beta(
                n_params, n, delta=delta, lam=lam, bound_theta=bound, bound_feature=max_norm
            )
        else:
            beta_value = check_number(beta, "beta", owner=owner)
        return cls(
            center,
            M,
            beta_value,
            lam=lam,
            n=n,
            kind=kind,
            bound_feature=max_norm,
            bound_theta=bound,
        )

    def check_model(self, model: object) -> None:
        """Refuse a model that is not linear in its parameters or has another dimension."""
        if not isinstance(model, LinearInParameters):
            raise PluralignError(f"{type(model).__name__} is not linear in its parameters")
        if model.n_params != self.n_params:
            raise PluralignError(
                f"confidence set has {self.n_params} params but the model has {model.n_params}"
            )

    # ------------------------------------------------------------------ geometry
    def solve(self, w: np.ndarray) -> np.ndarray:
        """``M⁻¹ w`` (``w`` of shape (p,) or (p, m))."""
        return cho_solve(self._chol, w, check_finite=False)

    def norm(self, w: np.ndarray) -> np.ndarray:
        """``‖w‖_{M⁻¹} = sqrt(wᵀM⁻¹w)`` along the last axis of ``w``."""
        w = np.asarray(w, float)
        flat = w.reshape(-1, self.n_params)
        half = solve_triangular(self._lower, flat.T, lower=True, check_finite=False)
        return np.sqrt(np.sum(half * half, axis=0)).reshape(w.shape[:-1])

    def worst_case(self, w: np.ndarray) -> np.ndarray:
        """``min_{θ∈C} θᵀw = θ̂ᵀw − β‖w‖_{M⁻¹}`` along the last axis of ``w``."""
        w = np.asarray(w, float)
        return w @ self.center - self.beta * self.norm(w)

    def worst_theta(self, w: np.ndarray) -> np.ndarray:
        """The minimiser ``θ̂ − β M⁻¹w / ‖w‖_{M⁻¹}`` (``θ̂`` when ``w = 0``)."""
        w = np.asarray(w, float)
        m_inv_w = self.solve(w)
        size = math.sqrt(max(float(w @ m_inv_w), 0.0))
        if size == 0.0:
            return self.center.copy()
        return self.center - self.beta * m_inv_w / size

    def contains(self, theta: np.ndarray) -> bool:
        """Whether ``‖θ − θ̂‖_M ≤ β`` (with a relative slack of 1e-9)."""
        diff = np.asarray(theta, float) - self.center
        return float(diff @ self.M @ diff) <= self.beta**2 * (1 + 1e-9) + 1e-12
