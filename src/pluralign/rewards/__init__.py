"""Reward models fitted by Bradley–Terry maximum likelihood (docs/design.md §2)."""

from pluralign.rewards.base import BradleyTerryModel, RewardModel
from pluralign.rewards.contextual import Contextual
from pluralign.rewards.linear import Bilinear, Linear, LinearInParameters
from pluralign.rewards.lowrank import LowRank
from pluralign.rewards.multi_user import MultiUserModel
from pluralign.rewards.per_user import PerUser, Pooled
from pluralign.rewards.reduced import RTVReduced
from pluralign.rewards.shared_basis import SharedBasis, subspace_distance
from pluralign.rewards.user_reward import UserReward

__all__ = [
    "Bilinear",
    "BradleyTerryModel",
    "Contextual",
    "Linear",
    "LinearInParameters",
    "LowRank",
    "MultiUserModel",
    "PerUser",
    "Pooled",
    "RTVReduced",
    "RewardModel",
    "SharedBasis",
    "UserReward",
    "subspace_distance",
]
