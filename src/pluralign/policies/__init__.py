"""Policies over finite candidate sets (DESIGN §4)."""

from pluralign.policies.base import Policy, as_probs, one_hot_argmax
from pluralign.policies.greedy import Greedy

__all__ = ["Greedy", "Policy", "as_probs", "one_hot_argmax"]
