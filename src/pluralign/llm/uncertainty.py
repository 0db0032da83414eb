"""Reward uncertainty of a transformer reward model, analytic at the last layer.

A :class:`~pluralign.llm.PersonalizedRewardModel` scores ``r_u(x, y) = wᵀ φ_u(x, y)``: its head
is linear in the pooled last-layer feature ``φ_u``. Given the frozen features, the head is a
linear Bradley–Terry model, so the bandit layer's ellipsoidal confidence set
(:class:`~pluralign.confidence.ConfidenceSet`, Zhu, Jordan & Jiao 2023) applies to it exactly,
with no ensemble: from the training pairs' feature differences
``Δφ_i = φ_{u_i}(x_i, y_c) − φ_{u_i}(x_i, y_r)``,

    M = (1/N) Σ_i Δφ_i Δφ_iᵀ + λI,     C = {w : ‖w − ŵ‖_M ≤ β}.

The head is shared by all users (only the features are personal), so every user's pairs inform
``M``. GSHF's offline pessimism (seed 002) penalizes a response by its uncertainty relative to a
reference point of the prompt,

    Γ_u(x, y) = β · ‖φ_u(x, y) − ν(x)‖_{M⁻¹},

the worst case over ``C`` of the reward difference to ``ν(x)``; with ``ν(x)`` the mean feature of
the candidates (best-of-n) or of reference samples (pessimistic DPO), a candidate that moves
away from what the data saw is discounted. Conservative but cheap: one ``hidden × hidden`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pluralign.data.loaders import TextPreferences
from pluralign.errors import PluralignError

__all__ = ["LastLayerUncertainty", "pessimism_margins", "reference_centers"]


class LastLayerUncertainty:
    """The last-layer confidence set of a personalized reward model (module docstring).

    Parameters
    ----------
    beta:
        The radius β (a number, or ``"theory"`` for Zhu et al.'s constant; see
        :class:`~pluralign.confidence.ConfidenceSet`).
    lam:
        The ridge ``λ`` of ``M`` (> 0; ``M`` is ``hidden × hidden`` and ``N`` may be smaller).
    delta:
        Failure probability of the ``"theory"`` radius.

    After :meth:`fit`: ``confidence_`` (the :class:`~pluralign.confidence.ConfidenceSet` of the
    head), ``n_`` (pairs), ``head_`` (``ŵ``).
    """

    def __init__(self, *, beta: float | str = 1.0, lam: float = 1.0, delta: float = 0.05
                 ) -> None:
        self.beta = beta
        self.lam = lam
        self.delta = delta

    def fit(self, reward_model: Any, prefs: TextPreferences, *, batch_size: int = 32
            ) -> LastLayerUncertainty:
        """Build ``M`` from the feature differences of ``prefs`` (the reward model's training
        pairs) under each row's user."""
        from pluralign.confidence import ConfidenceSet
        from pluralign.data import PreferenceData
        from pluralign.rewards.linear import Linear

        if prefs.n == 0:
            raise PluralignError("no preference rows to build the confidence set from")
        users = list(prefs.users)
        chosen = reward_model.features(prefs.prompts, prefs.chosen, users, batch_size=batch_size)
        rejected = reward_model.features(prefs.prompts, prefs.rejected, users,
                                         batch_size=batch_size)
        head = Linear(l2=self.lam)
        head.theta_ = reward_model.head.weight.detach().double().cpu().numpy().ravel()
        head.params_ = head.theta_
        head.d_phi_ = chosen.shape[1]
        head.is_fitted_ = True
        data = PreferenceData(x=None, phi0=rejected, phi1=chosen, y=np.ones(prefs.n))
        self.confidence_ = ConfidenceSet.fit(head, data, beta=self.beta, lam=self.lam,
                                             delta=self.delta)
        self.head_ = head.theta_
        self.n_ = prefs.n
        return self

    def norm(self, features: np.ndarray, center: np.ndarray) -> np.ndarray:
        """``‖φ − ν‖_{M⁻¹}`` per row of ``features`` (``(n, hidden)``) against ``center``
        (``(hidden,)`` or one row per feature)."""
        if not hasattr(self, "confidence_"):
            raise PluralignError("LastLayerUncertainty is not fitted; call fit first")
        diff = np.asarray(features, float) - np.asarray(center, float)
        return self.confidence_.norm(diff)

    def bonus(self, features: np.ndarray, center: np.ndarray) -> np.ndarray:
        """``Γ = β‖φ − ν‖_{M⁻¹}`` (:meth:`norm` times the radius)."""
        return self.confidence_.beta * self.norm(features, center) if hasattr(
            self, "confidence_") else self.norm(features, center)


def pessimism_margins(reward_model: Any, uncertainty: LastLayerUncertainty,
                      prefs: TextPreferences, centers: dict[tuple[str, str], np.ndarray], *,
                      scale: float = 1.0, batch_size: int = 32) -> np.ndarray:
    """``scale · (Γ_u(x, y_w) − Γ_u(x, y_l))`` per row of ``prefs``: the margins of
    pessimistic DPO (:mod:`pluralign.llm.dpo`). ``centers[(prompt, user)]`` is ``ν(x)`` (e.g.
    :func:`reference_centers`)."""
    users = [str(u) for u in prefs.users]
    chosen = reward_model.features(prefs.prompts, prefs.chosen, users, batch_size=batch_size)
    rejected = reward_model.features(prefs.prompts, prefs.rejected, users,
                                     batch_size=batch_size)
    try:
        nu = np.stack([centers[(p, u)] for p, u in zip(prefs.prompts, users, strict=True)])
    except KeyError as err:
        raise PluralignError(f"no reference center for (prompt, user) {err.args[0]!r}") from None
    return scale * (uncertainty.bonus(chosen, nu) - uncertainty.bonus(rejected, nu))


def reference_centers(policy: Any, reward_model: Any, prompts: Sequence[str],
                      users: Sequence[str], *, n: int = 4, max_new_tokens: int = 64,
                      seed: int = 0, batch_size: int = 8) -> dict[tuple[str, str], np.ndarray]:
    """``ν(x) = mean φ_u(x, y)`` over ``n`` responses sampled from the reference π0 for each
    distinct ``(prompt, user)``."""
    pairs = list(dict.fromkeys(zip(prompts, (str(u) for u in users), strict=True)))
    samples = policy.generate([p for p, _ in pairs], [u for _, u in pairs], n=n,
                              max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                              reference=True)
    out = {}
    for (p, u), texts in zip(pairs, samples.texts, strict=True):
        texts = [t if t else " " for t in texts]
        out[(p, u)] = reward_model.features([p] * len(texts), texts, [u] * len(texts)).mean(0)
    return out
