"""pluralign: learning personalized, robust policies from heterogeneous human feedback."""

from pluralign.data import PreferenceData
from pluralign.errors import ConfigError, DataValidationError, PluralignError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataValidationError", "PluralignError", "PreferenceData", "__version__"]
