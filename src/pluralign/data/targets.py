"""Target states: where a policy is deployed and evaluated.

A target state ``j`` is a user context ``x_j`` and ``K`` candidate responses with features
``φ(s_j, a)``, ``a = 1..K``. Policies map target states to distributions over the ``K`` candidates;
policy values are averages over a sample of target states (the deployment distribution, which
may differ from the states behind the training data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pluralign.errors import DataValidationError

__all__ = ["TargetStates"]


@dataclass(frozen=True, eq=False)
class TargetStates:
    """``m`` states with ``K`` candidate actions each.

    Parameters
    ----------
    x:
        Contexts ``(m, d_x)``, or ``None`` for context-free problems.
    phi:
        Candidate features ``(m, K, d_phi)``.
    """

    x: np.ndarray | None
    phi: np.ndarray

    def __post_init__(self) -> None:
        phi = np.asarray(self.phi, dtype=np.float64)
        if phi.ndim != 3 or phi.shape[0] == 0 or phi.shape[1] == 0:
            raise DataValidationError(
                f"must have shape (m, K, d_phi), got {phi.shape}", field="phi"
            )
        bad = ~np.isfinite(phi).all(axis=(1, 2))
        if bad.any():
            raise DataValidationError("contains NaN or inf", field="phi", row=int(np.argmax(bad)))
        object.__setattr__(self, "phi", phi)
        if self.x is not None:
            x = np.asarray(self.x, dtype=np.float64)
            if x.ndim != 2 or x.shape[0] != phi.shape[0]:
                raise DataValidationError(
                    f"must have shape ({phi.shape[0]}, d_x), got {x.shape}", field="x"
                )
            bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                raise DataValidationError("contains NaN or inf", field="x", row=int(np.argmax(bad)))
            object.__setattr__(self, "x", x)

    @property
    def m(self) -> int:
        """Number of states."""
        return int(self.phi.shape[0])

    @property
    def n_actions(self) -> int:
        """Candidates per state ``K``."""
        return int(self.phi.shape[1])

    def __len__(self) -> int:
        return self.m

    def subset(self, index: np.ndarray | slice) -> TargetStates:
        """The states at ``index``."""
        return TargetStates(None if self.x is None else self.x[index], self.phi[index])
