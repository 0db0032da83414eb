"""The policy interface: target states → distributions over their candidate actions."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from pluralign.data import TargetStates

__all__ = ["Policy", "as_probs", "one_hot_argmax"]


class Policy(ABC):
    """A (possibly stochastic) policy over finite candidate sets.

    ``probs(targets)`` returns an ``(m, K)`` row-stochastic matrix: ``π(a | j)`` for each target
    state ``j`` and candidate ``a``. Policies that optimize over the whole target sample (the
    pessimistic max–min policies) solve that problem inside ``probs``.
    """

    @abstractmethod
    def probs(self, targets: TargetStates) -> np.ndarray:
        """``π(a | j)``, shape ``(m, K)``."""

    def act(self, targets: TargetStates) -> np.ndarray:
        """The most likely action per state, shape ``(m,)``."""
        return np.argmax(self.probs(targets), axis=1)


def one_hot_argmax(scores: np.ndarray) -> np.ndarray:
    """Deterministic policy putting mass 1 on the first maximiser of each row."""
    scores = np.asarray(scores)
    out = np.zeros(scores.shape, dtype=np.float64)
    out[np.arange(scores.shape[0]), np.argmax(scores, axis=1)] = 1.0
    return out


def as_probs(policy: Policy | np.ndarray, targets: TargetStates) -> np.ndarray:
    """Resolve a policy object or an explicit ``(m, K)`` matrix into probabilities."""
    probs = policy.probs(targets) if isinstance(policy, Policy) else np.asarray(policy, float)
    if probs.shape != (targets.m, targets.n_actions):
        raise ValueError(
            f"policy gives probabilities of shape {probs.shape}, "
            f"expected ({targets.m}, {targets.n_actions})"
        )
    if not np.isfinite(probs).all() or (probs < -1e-12).any():
        raise ValueError("policy probabilities must be finite and non-negative")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-9):
        row = int(np.argmax(np.abs(probs.sum(axis=1) - 1.0)))
        raise ValueError(f"policy probabilities of state {row} do not sum to 1")
    return probs
