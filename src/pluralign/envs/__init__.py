"""Simulators with known truth (DESIGN §5)."""

from pluralign.envs.kl_bandit import KLBandit
from pluralign.envs.lowrank_contextual import LowRankContextual
from pluralign.envs.multi_user import MultiUser

__all__ = ["KLBandit", "LowRankContextual", "MultiUser"]
