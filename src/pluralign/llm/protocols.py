"""The structural types of what the LLM layer uses of a reward model or a policy it is given.

One job: name, as :class:`typing.Protocol` classes, the methods that best-of-n
(:mod:`pluralign.llm.sampling`) and the last-layer uncertainty of pessimistic DPO
(:mod:`pluralign.llm.uncertainty`) call on the reward model and the policy they are passed, so
that a type checker checks those call sites without tying them to one class. They are checked
statically only (no ``runtime_checkable``), like :mod:`pluralign.rewards.protocols`.

* :class:`PairScorer` — rewards ``r_u(x, y)`` and pooled features ``φ_u(x, y)`` of
  ``(prompt, response, user)`` rows: a :class:`~pluralign.llm.PersonalizedRewardModel`, or a
  gold oracle of :mod:`pluralign.llm.pairs`;
* :class:`BatchedFeatures` — ``φ_u(x, y)`` computed in batches, of conversational rows too
  (a :class:`~pluralign.llm.PersonalizedRewardModel`);
* :class:`BatchedRewardModel` — :class:`BatchedFeatures` plus batched rewards, what a round of
  ``pluralign iterate`` (:mod:`pluralign.llm.iterate`) scores its samples with;
* :class:`ReferenceSampler` — samples of the reference policy π0 (a
  :class:`~pluralign.llm.PersonalizedPolicy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from pluralign.llm.policy import Generations

__all__ = ["BatchedFeatures", "BatchedRewardModel", "PairScorer", "ReferenceSampler"]


class PairScorer(Protocol):
    """Rewards and features of ``(prompt, response, user)`` rows, one row per index."""

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], users: Sequence[str], /
    ) -> np.ndarray:
        """``r_u(x, y)`` of each row, ``(n,)``."""
        ...

    def features(
        self, prompts: Sequence[str], responses: Sequence[str], users: Sequence[str], /
    ) -> np.ndarray:
        """``φ_u(x, y)`` of each row, ``(n, d)``; the reward is linear in it."""
        ...


class BatchedFeatures(Protocol):
    """``φ_u(x, y)`` in batches of ``batch_size`` rows; ``conversations[i]`` (optional) is row
    ``i``'s whole conversation as TRL messages (``None`` for a plain-text row)."""

    def features(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        users: Sequence[Any],
        /,
        *,
        batch_size: int = ...,
        conversations: Sequence[list | None] | None = ...,
    ) -> np.ndarray:
        """``φ_u(x, y)`` of each row, ``(n, d)``."""
        ...


class BatchedRewardModel(BatchedFeatures, Protocol):
    """:class:`BatchedFeatures` plus ``r_u(x, y)`` in batches."""

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        users: Sequence[Any],
        /,
        *,
        batch_size: int = ...,
    ) -> np.ndarray:
        """``r_u(x, y)`` of each row, ``(n,)``."""
        ...


class ReferenceSampler(Protocol):
    """A policy that samples responses per ``(prompt, user)``, from itself or from π0."""

    def generate(
        self,
        prompts: Sequence[str],
        users: Sequence[Any],
        *,
        n: int = ...,
        max_new_tokens: int = ...,
        seed: int = ...,
        batch_size: int = ...,
        reference: bool = ...,
    ) -> Generations:
        """``n`` samples per ``(prompt, user)`` (``reference=True``: of π0)."""
        ...
