"""The greedy policy: argmax of a fitted model's estimated reward."""

from __future__ import annotations

import numpy as np

from pluralign.data import TargetStates
from pluralign.policies.base import Policy, one_hot_argmax
from pluralign.rewards import RewardModel

__all__ = ["Greedy"]


class Greedy(Policy):
    """``π̂(j) = argmax_a r̂(x_j, φ(s_j, a))`` for a fitted reward model."""

    def __init__(self, model: RewardModel) -> None:
        self.model = model

    def probs(self, targets: TargetStates) -> np.ndarray:
        return one_hot_argmax(self.model.reward(targets.x, targets.phi))
