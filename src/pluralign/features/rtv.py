"""Rotation–truncation–vectorization (RTV), the reduction behind LoCo-RLHF's PRS policy (Lee,
Sun & Liu 2024, arXiv 2412.19436).

Given a rank-r estimate ``Θ̂ = Û D̂ V̂ᵀ`` and orthonormal complements ``Û⊥, V̂⊥``, rotate
``x̃ = [Û Û⊥]ᵀx`` and ``φ̃ = [V̂ V̂⊥]ᵀφ``. In rotated coordinates ``xᵀΘφ = x̃ᵀΘ̃φ̃`` with
``Θ̃ = [Û Û⊥]ᵀ Θ [V̂ V̂⊥]``. The ``(d_x−r)×(d_phi−r)`` block ``Θ̃[r:, r:]`` is second order in the
estimation error (for Θ near Θ̂ it is ``Û⊥ᵀ(Θ − Θ̂)V̂⊥``, whose size is the product of the two
subspace errors), so it is dropped. What remains is linear in the reduced parameter

    θ_z = [vec(Θ̃[:r, :]) ; vec(Θ̃[r:, :r])]                      (row-major)

with reduced features

    z(x, φ) = [vec(x̃_{1:r} φ̃ᵀ) ; vec(x̃_{r+1:} φ̃_{1:r}ᵀ)],   p = (d_x + d_phi) r − r².

Everything here runs in ``O((d_x + d_phi) r)`` per (x, φ) pair except :meth:`RTVMap.transform`,
which materializes ``z`` (``p`` numbers per pair, :attr:`RTVMap.n_params`) for confidence sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import null_space

from pluralign._linalg import contract
from pluralign.errors import DataValidationError

__all__ = ["RTVMap", "rtv_features"]


def _complete(frame: np.ndarray) -> np.ndarray:
    """``[F F⊥]``: an orthonormal basis of R^d whose first columns are ``frame``."""
    if frame.shape[1] == frame.shape[0]:
        return frame
    return np.concatenate([frame, null_space(frame.T)], axis=1)


@dataclass(frozen=True)
class RTVMap:
    """The RTV feature map of a rank-``r`` estimate with singular frames ``U_hat``, ``V_hat``.

    Use :meth:`from_frames`; ``U`` and ``V`` hold the completed rotations ``[Û Û⊥]`` and
    ``[V̂ V̂⊥]``.
    """

    U: np.ndarray
    V: np.ndarray
    rank: int

    @classmethod
    def from_frames(cls, U_hat: np.ndarray, V_hat: np.ndarray) -> RTVMap:
        """Build the map from ``Û`` (d_x, r) and ``V̂`` (d_phi, r) with orthonormal columns."""
        U_hat, V_hat = np.asarray(U_hat, float), np.asarray(V_hat, float)
        if U_hat.ndim != 2 or V_hat.ndim != 2 or U_hat.shape[1] != V_hat.shape[1]:
            raise DataValidationError(
                f"need U_hat (d_x, r) and V_hat (d_phi, r), got {U_hat.shape} and {V_hat.shape}",
                field="U_hat",
            )
        r = U_hat.shape[1]
        for name, frame in (("U_hat", U_hat), ("V_hat", V_hat)):
            if not np.allclose(frame.T @ frame, np.eye(r), atol=1e-8):
                raise DataValidationError("columns must be orthonormal", field=name)
        return cls(U=_complete(U_hat), V=_complete(V_hat), rank=r)

    # ------------------------------------------------------------------ sizes
    @property
    def d_x(self) -> int:
        return int(self.U.shape[0])

    @property
    def d_phi(self) -> int:
        return int(self.V.shape[0])

    @property
    def n_params(self) -> int:
        """Reduced dimension ``p = (d_x + d_phi) r − r²`` (the length of ``θ_z``)."""
        r = self.rank
        return (self.d_x + self.d_phi) * r - r * r

    # ------------------------------------------------------------- parameters
    def params_from_theta(self, theta: np.ndarray) -> np.ndarray:
        """Rotate ``Θ`` and drop the ``[r:, r:]`` block: ``θ_z`` of length ``p``."""
        rotated = self.U.T @ theta @ self.V
        r = self.rank
        return np.concatenate([rotated[:r, :].ravel(), rotated[r:, :r].ravel()])

    def _blocks(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = self.rank
        params = np.asarray(params, float)
        if params.shape != (self.n_params,):
            raise DataValidationError(
                f"must have shape ({self.n_params},), got {params.shape}", field="params"
            )
        top = params[: r * self.d_phi].reshape(r, self.d_phi)  # Θ̃[:r, :]
        bottom = params[r * self.d_phi :].reshape(self.d_x - r, r)  # Θ̃[r:, :r]
        return top, bottom

    def theta_from_params(self, params: np.ndarray) -> np.ndarray:
        """``Θ = [Û Û⊥] Θ̃ [V̂ V̂⊥]ᵀ`` with the truncated block set to zero."""
        left, right = self.factors(params)
        return left @ right

    def factors(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``Θ(θ_z) = W₁ W₂`` with ``W₁ = [Û, Û⊥B]`` (d_x, 2r), ``W₂ = [A Ṽᵀ; V̂ᵀ]`` (2r, d_phi).

        ``A = Θ̃[:r, :]`` and ``B = Θ̃[r:, :r]``; the factored form keeps rewards ``O(d r)``.
        """
        top, bottom = self._blocks(params)
        r = self.rank
        left = np.concatenate([self.U[:, :r], self.U[:, r:] @ bottom], axis=1)
        right = np.concatenate([top @ self.V.T, self.V[:, :r].T], axis=0)
        return left, right

    # --------------------------------------------------------------- features
    def transform(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """Materialized reduced features ``z(x, φ)``: ``(n, p)`` or ``(m, K, p)``."""
        x, phi = np.asarray(x, float), np.asarray(phi, float)
        r = self.rank
        xr = x @ self.U
        pr = phi @ self.V
        if phi.ndim == 3:
            xr = np.broadcast_to(xr[:, None, :], (*phi.shape[:2], self.d_x))
        z1 = (xr[..., :r, None] * pr[..., None, :]).reshape(*phi.shape[:-1], -1)
        z2 = (xr[..., r:, None] * pr[..., None, :r]).reshape(*phi.shape[:-1], -1)
        return np.concatenate([z1, z2], axis=-1)

    def reward_at(self, params: np.ndarray, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """``θ_zᵀ z(x, φ) = xᵀ W₁ W₂ φ``, in ``O((d_x + d_phi) r)`` per row plus the contraction."""
        left, right = self.factors(params)
        return contract((np.asarray(x, float) @ left) @ right, np.asarray(phi, float))

    def mean_features(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """``(1/n) Σ_i z(x_i, φ_i)`` for ``phi`` (n, d_phi), without forming ``z`` or rotating φ.

        With ``G = Xᵀ Φ / n``: the first block is ``Ûᵀ G [V̂ V̂⊥]`` (computed as
        ``((XÛ)ᵀΦ/n)[V̂ V̂⊥]``), the second ``Û⊥ᵀ (G V̂)`` (computed as ``Û⊥ᵀ(Xᵀ(ΦV̂))/n``).
        """
        x, phi = np.asarray(x, float), np.asarray(phi, float)
        r, n = self.rank, phi.shape[0]
        top = ((x @ self.U[:, :r]).T @ phi) @ self.V / n
        bottom = self.U[:, r:].T @ (x.T @ (phi @ self.V[:, :r])) / n
        return np.concatenate([top.ravel(), bottom.ravel()])


def rtv_features(
    x: np.ndarray, phi: np.ndarray, U_hat: np.ndarray, V_hat: np.ndarray
) -> np.ndarray:
    """RTV-reduced features of ``(x, φ)`` given ``Û``, ``V̂``: ``p = (d_x+d_phi)r − r²`` columns."""
    return RTVMap.from_frames(U_hat, V_hat).transform(x, phi)
