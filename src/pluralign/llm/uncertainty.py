"""Reward uncertainty of a transformer reward model, analytic at the last layer.

A :class:`~pluralign.llm.PersonalizedRewardModel` scores ``r_u(x, y) = wᵀ φ_u(x, y)``: its head
is linear in the pooled last-layer feature ``φ_u``. Given the frozen features, the head is a
linear Bradley–Terry model, so the bandit layer's ellipsoidal confidence set
(:class:`~pluralign.confidence.ConfidenceSet`, Zhu, Jordan & Jiao 2023) applies to it exactly,
with no ensemble: from the training pairs' feature differences
``Δφ_i = φ_{u_i}(x_i, y_c) − φ_{u_i}(x_i, y_r)``,

    M = (1/N) Σ_i Δφ_i Δφ_iᵀ + λI,     C = {w : ‖w − ŵ‖_M ≤ β}.

The head is shared by all users (only the features are personal), so every user's pairs inform
``M``. The offline pessimism of GSHF (Xiong et al. 2024, ICML 2024, arXiv 2312.11456)
penalizes a response by its uncertainty relative to a reference point of the prompt,

    Γ_u(x, y) = β · ‖φ_u(x, y) − ν(x)‖_{M⁻¹},

the worst case over ``C`` of the reward difference to ``ν(x)``; with ``ν(x)`` the mean feature of
the candidates (best-of-n) or of reference samples (pessimistic DPO), a candidate that moves
away from what the data saw is discounted. Conservative but cheap: one ``hidden × hidden`` matrix.

The features of a row are those of the tokens the reward model was trained on: a
conversational row (TRL messages) goes through the tokenizer's chat template when it has one,
by the reward model's own rendering (:func:`pluralign.llm.data.encode_texts`, shared with
:func:`~pluralign.llm.data.encode_pairs`); a response sampled for a conversational prompt is
one assistant message after it (:func:`~pluralign.llm.data.chat_response`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pluralign.data.loaders import TextPreferences
from pluralign.errors import PluralignError
from pluralign.llm.protocols import BatchedFeatures, ReferenceSampler

if TYPE_CHECKING:
    from pluralign.llm.reward_model import PersonalizedRewardModel

__all__ = [
    "LastLayerUncertainty",
    "pair_features",
    "pessimism_margins",
    "prompt_key",
    "reference_centers",
]


def pair_features(
    reward_model: BatchedFeatures, prefs: TextPreferences, *, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """``(φ of the chosen sides, φ of the rejected sides)`` of ``prefs``' rows under each row's
    user, tokenized as the reward model's training tokenized them (module docstring)."""
    from pluralign.llm.data import conversations

    users = [str(u) for u in prefs.users]
    return tuple(  # type: ignore[return-value]  # two sides
        reward_model.features(
            prefs.prompts,
            getattr(prefs, side),
            users,
            batch_size=batch_size,
            conversations=conversations(prefs, side),
        )
        for side in ("chosen", "rejected")
    )


def prompt_key(prompt: str | list[dict]) -> str | tuple[str, str]:
    """The key of a prompt in the centers of :func:`reference_centers`: the prompt text, or
    for the prompt messages of a conversational row ``("messages", their JSON)``."""
    if isinstance(prompt, str):
        return prompt
    return ("messages", json.dumps(list(prompt), sort_keys=True, ensure_ascii=False))


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

    def __init__(self, *, beta: float | str = 1.0, lam: float = 1.0, delta: float = 0.05) -> None:
        self.beta = beta
        self.lam = lam
        self.delta = delta

    def fit(
        self, reward_model: PersonalizedRewardModel, prefs: TextPreferences, *, batch_size: int = 32
    ) -> LastLayerUncertainty:
        """Build ``M`` from the feature differences of ``prefs`` (the reward model's training
        pairs) under each row's user."""
        from pluralign.confidence import ConfidenceSet
        from pluralign.data import PreferenceData
        from pluralign.rewards.linear import Linear

        if prefs.n == 0:
            raise PluralignError("no preference rows to build the confidence set from")
        chosen, rejected = pair_features(reward_model, prefs, batch_size=batch_size)
        head = Linear(l2=self.lam)
        head.theta_ = reward_model.head.weight.detach().double().cpu().numpy().ravel()
        head.params_ = head.theta_
        head.d_phi_ = chosen.shape[1]
        head.is_fitted_ = True
        data = PreferenceData(x=None, phi0=rejected, phi1=chosen, y=np.ones(prefs.n))
        self.confidence_ = ConfidenceSet.fit(
            head, data, beta=self.beta, lam=self.lam, delta=self.delta
        )
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
        return (
            self.confidence_.beta * self.norm(features, center)
            if hasattr(self, "confidence_")
            else self.norm(features, center)
        )


def pessimism_margins(
    reward_model: BatchedFeatures,
    uncertainty: LastLayerUncertainty,
    prefs: TextPreferences,
    centers: dict[tuple[Any, str], np.ndarray],
    *,
    scale: float = 1.0,
    batch_size: int = 32,
) -> np.ndarray:
    """``scale · (Γ_u(x, y_w) − Γ_u(x, y_l))`` per row of ``prefs``: the margins of
    pessimistic DPO (:mod:`pluralign.llm.dpo`). ``centers[(prompt_key(x), user)]`` is ``ν(x)``
    (e.g. :func:`reference_centers`; ``x`` the row's prompt, its messages for a
    conversational row: :func:`pluralign.llm.data.row_prompts`)."""
    from pluralign.llm.data import row_prompts

    users = [str(u) for u in prefs.users]
    chosen, rejected = pair_features(reward_model, prefs, batch_size=batch_size)
    keys = [(prompt_key(p), u) for p, u in zip(row_prompts(prefs), users, strict=True)]
    try:
        nu = np.stack([centers[k] for k in keys])
    except KeyError as err:
        raise PluralignError(f"no reference center for (prompt, user) {err.args[0]!r}") from None
    return scale * (uncertainty.bonus(chosen, nu) - uncertainty.bonus(rejected, nu))


def reference_centers(
    policy: ReferenceSampler,
    reward_model: BatchedFeatures,
    prompts: Sequence[str | list[dict]],
    users: Sequence[str],
    *,
    n: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[tuple[Any, str], np.ndarray]:
    """``ν(x) = mean φ_u(x, y)`` over ``n`` responses sampled from the reference π0 for each
    distinct ``(prompt, user)``, keyed ``(prompt_key(prompt), user)``. A prompt is a text or
    the prompt messages of a conversational row (:func:`pluralign.llm.data.row_prompts`):
    π0 answers it through its chat template, and a sample's feature is that of the
    conversation with the sample as one assistant message
    (:func:`~pluralign.llm.data.chat_response`), as a conversational training row is scored."""
    from pluralign.llm.data import chat_response

    unique: dict[tuple[Any, str], str | list[dict]] = {}
    for p, u in zip(prompts, (str(u) for u in users), strict=True):
        unique.setdefault((prompt_key(p), u), p)
    keys = list(unique)
    samples = policy.generate(
        [unique[k] for k in keys],  # type: ignore[misc]  # conversational prompts too (prompt_ids)
        [u for _, u in keys],
        n=n,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        reference=True,
    )
    out = {}
    for key, texts in zip(keys, samples.texts, strict=True):
        rows = [chat_response(unique[key], t if t else " ") for t in texts]
        conversations = [c for _, _, c in rows]
        out[key] = reward_model.features(
            [p for p, _, _ in rows],
            [r for _, r, _ in rows],
            [key[1]] * len(rows),
            conversations=None if all(c is None for c in conversations) else conversations,
        ).mean(0)
    return out
