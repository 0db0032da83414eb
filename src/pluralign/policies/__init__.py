"""Policies over finite candidate sets (DESIGN §4)."""

from pluralign.policies.base import Policy, as_probs, one_hot_argmax
from pluralign.policies.greedy import Greedy
from pluralign.policies.pessimistic import Pessimistic, reference_probs

__all__ = ["Greedy", "Pessimistic", "Policy", "as_probs", "one_hot_argmax", "reference_probs"]
