"""Exceptions raised by pluralign.

Every error about user input is a :class:`PluralignError`; its subclasses say which boundary
refused the input. They subclass :class:`ValueError` so generic handlers keep working.
"""

from __future__ import annotations


class PluralignError(ValueError):
    """Base class of pluralign's input errors."""


class DataValidationError(PluralignError):
    """Preference data that is malformed.

    Attributes
    ----------
    field:
        The offending field (``"x"``, ``"phi0"``, ``"y"``, ...), or ``None``.
    row:
        The first bad row (0-based index into the arrays), or ``None``.
    path, line:
        The file and the 1-based line, when the data came from a file.
    bare:
        The message without the location prefix (to re-raise with more context).
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        row: int | None = None,
        path: str | None = None,
        line: int | None = None,
    ) -> None:
        self.bare = message
        self.field = field
        self.row = row
        self.path = path
        self.line = line
        where = []
        if path is not None:
            where.append(f"{path}" + (f", line {line}" if line is not None else ""))
        if field is not None:
            where.append(f"field {field!r}")
        if row is not None and line is None:
            where.append(f"row {row}")
        prefix = ": ".join([", ".join(where)]) + ": " if where else ""
        super().__init__(prefix + message)


class ConfigError(PluralignError):
    """An experiment configuration that is malformed or names unknown keys or methods."""


class NotFittedError(PluralignError, AttributeError):
    """A model or policy was used before ``fit``."""


class ResourceError(PluralignError):
    """A computation refused because it would not fit in memory (e.g. full-rank pessimism)."""


# ----------------------------------------------------------------------------- warnings
class PluralignWarning(UserWarning):
    """Base class of pluralign's warnings: a result was produced, but read it with care."""


class ConvergenceWarning(PluralignWarning):
    """An iterative fit or solve stopped before its tolerance was met (an iteration cap, a
    line-search failure, or a duality gap above ``tol``); like scikit-learn's
    ``ConvergenceWarning``. The returned estimate is the last iterate."""


class SeparableDataWarning(PluralignWarning):
    """The maximum-likelihood estimate does not exist: without a ridge (``l2 = 0``) the
    comparisons are (quasi-)separable, so the likelihood keeps increasing as ``‖θ‖ → ∞`` and the
    estimate is wherever the solver stopped. Add a ridge (``l2 > 0``)."""


class DisconnectedComparisonsWarning(PluralignWarning):
    """The comparisons do not identify every direction the reward can vary in (with one-hot
    items: the comparison graph is disconnected, so the rewards of different components are
    not comparable). Without a ridge the estimate in those directions is the solver's start,
    zero: the minimum-norm estimate, the limit of the ridge estimate as ``l2 → 0``. Add
    comparisons that link the components, or a ridge."""
