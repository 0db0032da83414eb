"""Row-wise linear algebra shared by the feature maps and the reward models.

It sits below both layers (data → features → rewards), so that :mod:`pluralign.features` never
imports :mod:`pluralign.rewards`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["contract", "orthonormal_columns"]


def contract(g: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """``Σ_d g[j, d] · phi[j, (a,) d]``: per-row inner products, for ``phi`` 2-D or 3-D."""
    if phi.ndim == 3:
        return np.matmul(phi, g[:, :, None])[..., 0]
    return np.einsum("nd,nd->n", g, phi)


def orthonormal_columns(columns: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """An orthonormal basis of the column space of ``columns`` (rank-revealing SVD)."""
    u, s, _ = np.linalg.svd(columns, full_matrices=False)
    keep = s > rtol * max(float(s[0]) if s.size else 0.0, 1e-300)
    return u[:, keep]
