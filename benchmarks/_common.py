"""Helpers shared by the benchmarks: timing and synthetic contextual BT data."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from pluralign.data import PreferenceData


def best_time(func: Callable[[], object], repeats: int = 3) -> tuple[float, object]:
    """Smallest wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - start)
    return best, result


def contextual_data(
    n: int, d_x: int, d_phi: int, rank: int, seed: int, scale: float = 1.5
) -> tuple[PreferenceData, np.ndarray]:
    """Bradley–Terry comparisons from a rank-``rank`` ``Θ*`` with unit-scale rewards.

    Contexts ``x ~ N(0, I/d_x)`` and features ``φ ~ N(0, I/d_phi)``; ``Θ* = c·U diag(s) Vᵀ`` with
    ``c = sqrt(d_x d_phi / rank)`` so that rewards have standard deviation ≈ ``scale``.
    """
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d_x, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((d_phi, rank)))
    theta = np.sqrt(d_x * d_phi / rank) * scale * (u @ v.T)
    x = rng.standard_normal((n, d_x)) / np.sqrt(d_x)
    phi0 = rng.standard_normal((n, d_phi)) / np.sqrt(d_phi)
    phi1 = rng.standard_normal((n, d_phi)) / np.sqrt(d_phi)
    margin = np.einsum("ni,ni->n", x @ theta, phi1 - phi0)
    y = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(np.int8)
    return PreferenceData(x, phi0, phi1, y), theta


def kronecker(data: PreferenceData) -> np.ndarray:
    """Materialized ``vec(x Δφᵀ)`` rows (what scikit-learn needs; pluralign never forms it)."""
    return (data.x[:, :, None] * data.delta_phi[:, None, :]).reshape(data.n, -1)


def log_loss(model_margin: np.ndarray, y: np.ndarray) -> float:
    sign = 2.0 * y - 1.0
    return float(np.mean(np.logaddexp(0.0, -sign * model_margin)))
