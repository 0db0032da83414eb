"""Online and hybrid iterative preference learning under a KL constraint (docs/design.md §4).

GSHF: Xiong et al. 2024 (ICML 2024, arXiv 2312.11456), in the bandit layer.
"""

from pluralign.online.exploration import (
    EXPLORATIONS,
    BestWorst,
    Enhancer,
    Exploration,
    Pairs,
    PairUncertainty,
    RoundState,
    Symmetric,
    Uniform,
    exclude_actions,
    make_exploration,
    sample_actions,
)
from pluralign.online.loop import OnlineGSHF, PreferenceEnv

__all__ = [
    "EXPLORATIONS",
    "BestWorst",
    "Enhancer",
    "Exploration",
    "OnlineGSHF",
    "PairUncertainty",
    "Pairs",
    "PreferenceEnv",
    "RoundState",
    "Symmetric",
    "Uniform",
    "exclude_actions",
    "make_exploration",
    "sample_actions",
]
