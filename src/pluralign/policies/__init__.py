"""Policies over finite candidate sets (docs/design.md §4)."""

from pluralign.policies.aggregate import Leximin, PerUserPolicies, Utilitarian, user_confidence
from pluralign.policies.base import Policy, as_probs, one_hot_argmax
from pluralign.policies.gibbs import (
    Gibbs,
    PessimisticGibbs,
    gibbs_probs,
    kl_divergence,
    soft_value,
)
from pluralign.policies.greedy import Greedy
from pluralign.policies.pessimistic import Pessimistic, reference_probs

__all__ = [
    "Gibbs",
    "Greedy",
    "Leximin",
    "PerUserPolicies",
    "Pessimistic",
    "PessimisticGibbs",
    "Policy",
    "Utilitarian",
    "as_probs",
    "gibbs_probs",
    "kl_divergence",
    "one_hot_argmax",
    "reference_probs",
    "soft_value",
    "user_confidence",
]
