"""Confidence sets around fitted reward models (docs/design.md §3)."""

from pluralign.confidence.ellipsoid import ConfidenceSet, beta_rate, theory_beta

__all__ = ["ConfidenceSet", "beta_rate", "theory_beta"]
