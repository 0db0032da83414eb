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
