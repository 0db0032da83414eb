"""Data layer: pairwise comparisons and target states as validated arrays, and file formats."""

from pluralign.data.io import load_preferences, save_preferences
from pluralign.data.loaders import (
    TextPreferences,
    read_prism,
    read_summarize_from_feedback,
    read_trl,
    validate_file,
)
from pluralign.data.preference import PreferenceData
from pluralign.data.targets import TargetStates

__all__ = [
    "PreferenceData",
    "TargetStates",
    "TextPreferences",
    "load_preferences",
    "read_prism",
    "read_summarize_from_feedback",
    "read_trl",
    "save_preferences",
    "validate_file",
]
