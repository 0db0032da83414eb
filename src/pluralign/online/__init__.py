"""Online and hybrid iterative preference learning under a KL constraint (GSHF, DESIGN §4)."""

from pluralign.online.exploration import (
    EXPLORATIONS,
    Enhancer,
    Exploration,
    RoundState,
    Symmetric,
    Uniform,
    make_exploration,
)
from pluralign.online.loop import OnlineGSHF, PreferenceEnv, sample_actions

__all__ = [
    "EXPLORATIONS",
    "Enhancer",
    "Exploration",
    "OnlineGSHF",
    "PreferenceEnv",
    "RoundState",
    "Symmetric",
    "Uniform",
    "make_exploration",
    "sample_actions",
]
