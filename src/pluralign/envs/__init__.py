"""Simulators with known truth (DESIGN §5)."""

from pluralign.envs.lowrank_contextual import LowRankContextual

__all__ = ["LowRankContextual"]
