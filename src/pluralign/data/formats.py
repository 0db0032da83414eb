"""The preference formats pluralign reads, each declared once in :data:`FORMATS`.

A :class:`Format` says what a format is called, whether its reader returns text comparisons
(:class:`~pluralign.data.loaders.TextPreferences`) or numeric ones
(:class:`~pluralign.data.PreferenceData`), how it is recognised (a file suffix, or keys of the
first row), which function reads it, and its columns: the fields a ``*_column`` keyword may map
to another column (with their default columns), the columns that cannot be remapped, and the
columns whose CSV cells hold JSON text. Every place that branches on a format reads this table
— :func:`~pluralign.data.loaders.detect_format`,
:func:`~pluralign.data.loaders.read_text_preferences`,
:func:`~pluralign.data.loaders.validate_file` and the column mapping :class:`Columns` — so a new
format is one more entry here.

=============  =======  =================================  ======================================
format         kind     recognised by                      read by (:mod:`pluralign.data`)
=============  =======  =================================  ======================================
``numeric``    numeric  ``.npz``, or a ``phi0`` key        ``io.load_preferences``
``trl``        text     any other row (the fallback)       ``loaders.read_trl``
``summarize``  text     ``summaries`` and ``info`` keys    ``loaders.read_summarize_from_feedback``
``prism``      text     a ``model_response`` key           ``loaders.read_prism`` (with a survey)
=============  =======  =================================  ======================================
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pluralign.errors import DataValidationError

__all__ = ["COLUMN_KEYWORDS", "FORMATS", "TEXT_FORMATS", "Columns", "Format", "detect_by_keys"]

# the field -> the keyword that maps it to another column (in the order messages list them)
COLUMN_KEYWORDS = {
    "prompt": "prompt_column",
    "chosen": "chosen_column",
    "rejected": "rejected_column",
    "user": "user_column",
    "context": "context_column",
}


@dataclass(frozen=True)
class Format:
    """One preference format.

    ``kind`` is ``"text"`` or ``"numeric"``. ``reader`` is ``"module:function"``, imported when
    the format is read (:meth:`read`: the readers import this module, so it cannot import
    them). ``columns`` maps each field a ``*_column`` keyword can move (``"user"``,
    ``"context"``, … of :data:`COLUMN_KEYWORDS`) to its default column; ``fixed`` are the
    columns that cannot be remapped (a mapping may not point at them); ``json_columns`` are
    the CSV columns read as JSON text (a field of ``columns`` stands for the column it is
    mapped to). ``suffixes`` are file suffixes that are this format whatever the file holds;
    ``keys`` are keys of the first row that make it this format (empty: the format of rows
    that match no other). ``survey`` says the reader takes a survey file before the pairs
    (``reader(survey, pairs, ...)``) and no ``split=``.
    """

    name: str
    kind: str
    reader: str
    columns: Mapping[str, str]
    fixed: tuple[str, ...] = ()
    json_columns: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    keys: frozenset[str] = frozenset()
    survey: bool = False

    def read(self, *args: Any, **kwargs: Any) -> Any:
        """Call the format's reader."""
        module, function = self.reader.split(":")
        return getattr(importlib.import_module(module), function)(*args, **kwargs)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "numeric",
            kind="numeric",
            reader="pluralign.data.io:load_preferences",
            columns={"user": "user", "context": "x"},
            fixed=("phi0", "phi1", "y"),
            json_columns=("context", "phi0", "phi1", "y"),
            suffixes=(".npz",),
            keys=frozenset({"phi0"}),
        ),
        Format(
            "trl",
            kind="text",
            reader="pluralign.data.loaders:read_trl",
            columns={
                "prompt": "prompt",
                "chosen": "chosen",
                "rejected": "rejected",
                "user": "user_id",
                "context": "user_context",
            },
            json_columns=("context",),
        ),
        Format(
            "summarize",
            kind="text",
            reader="pluralign.data.loaders:read_summarize_from_feedback",
            columns={"user": "worker"},
            fixed=("info", "summaries", "choice", "split"),
            json_columns=("info", "summaries", "choice"),
            keys=frozenset({"summaries", "info"}),
        ),
        Format(
            "prism",
            kind="text",
            reader="pluralign.data.loaders:read_prism",
            columns={
                "prompt": "prompt",
                "chosen": "chosen",
                "rejected": "rejected",
                "user": "user_id",
            },
            fixed=(
                "conversation_id",
                "turn",
                "user_prompt",
                "model_response",
                "score",
                "if_chosen",
            ),
            json_columns=("turn", "if_chosen", "score"),
            keys=frozenset({"model_response"}),
            survey=True,
        ),
    )
}
TEXT_FORMATS = tuple(name for name, f in FORMATS.items() if f.kind == "text")
# formats recognised by keys first (in table order), then the fallback, whose keys are empty
_BY_KEYS = sorted(FORMATS.values(), key=lambda f: not f.keys)


def detect_by_keys(keys: Iterable[str]) -> Format:
    """The format of a row with ``keys``: the first of :data:`FORMATS` whose ``keys`` it all
    has, else the fallback (``trl``)."""
    have = set(keys)
    return next(f for f in _BY_KEYS if f.keys <= have)


@dataclass(frozen=True)
class Columns:
    """The column that holds each field of a format (``Columns.of("trl", user_column=
    "annotator_id")["user"] == "annotator_id"``)."""

    format: str
    names: dict[str, str]

    @classmethod
    def of(cls, fmt: str, **given: str | None) -> Columns:
        """The columns of format ``fmt`` with the ``*_column`` keywords applied; a keyword
        the format has no field for, an empty name, or two fields in one column is refused."""
        spec = FORMATS[fmt]
        defaults = spec.columns
        by_keyword = {kw: key for key, kw in COLUMN_KEYWORDS.items()}
        names = dict(defaults)
        for kw, value in given.items():
            if kw not in by_keyword:
                raise DataValidationError(
                    f"unknown keyword {kw!r}; valid: {', '.join(COLUMN_KEYWORDS.values())}",
                    field=kw,
                )
            if value is None:
                continue
            key = by_keyword[kw]
            if key not in defaults:
                usable = ", ".join(COLUMN_KEYWORDS[k] for k in defaults)
                raise DataValidationError(
                    f"does not apply to {fmt} rows (their columns that can be mapped: {usable})",
                    field=kw,
                )
            if not isinstance(value, str) or not value.strip():
                raise DataValidationError(
                    f"must be a non-empty column name, got {value!r}", field=kw
                )
            names[key] = value
        seen: dict[str, str] = {}
        for key, column in names.items():
            if column in seen or column in spec.fixed:
                other = seen.get(column, column)
                raise DataValidationError(
                    f"maps the {key} to column {column!r}, which already holds the {other} "
                    "(two fields cannot be read from one column)",
                    field=COLUMN_KEYWORDS[key],
                )
            seen[column] = key
        return cls(fmt, names)

    def __getitem__(self, key: str) -> str:
        return self.names[key]

    def mapped(self) -> dict[str, str]:
        """``{keyword: column}`` of the fields that are not in their default column."""
        defaults = FORMATS[self.format].columns
        return {COLUMN_KEYWORDS[k]: v for k, v in self.names.items() if v != defaults[k]}

    def missing(self, key: str, row: Mapping[str, Any]) -> str:
        """The message of a row without the column of ``key``: ``missing``, plus, when the
        column was mapped and the row has the default one, both names."""
        default = FORMATS[self.format].columns[key]
        if self.names[key] != default:
            hint = f"{COLUMN_KEYWORDS[key]} is {self.names[key]!r}"
            if default in row:
                hint += f"; the row has a {default!r} column"
            return f"missing ({hint})"
        return "missing"

    def json_columns(self) -> tuple[str, ...]:
        """The columns whose CSV cells are read as JSON text (:attr:`Format.json_columns`,
        a field as the column it is mapped to)."""
        return tuple(self.names.get(c, c) for c in FORMATS[self.format].json_columns)
