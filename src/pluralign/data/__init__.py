"""Data layer: pairwise comparisons and target states as validated arrays, and file formats."""

from pluralign.data.io import load_preferences, save_preferences
from pluralign.data.preference import PreferenceData
from pluralign.data.targets import TargetStates

__all__ = ["PreferenceData", "TargetStates", "load_preferences", "save_preferences"]
