"""User contexts: checking them, and encoding them as the columns of ``x``.

A user context is a list of numbers (``[0.1, 2.0]``, the same length for every user) or a
mapping of attributes (``{"age": "25-34", "score": 3.5}``, nested mappings flattened as dotted
names ``location.reside_region``). :func:`parse_context` checks one; :class:`UserContexts`
collects the contexts of a read, one per user (the one most of the user's rows have; every row
that differs is reported), and encodes them: a vector as its numbers, attributes as one column
per numeric attribute and one one-hot column ``name=value`` per other value;
:class:`ContextSchema` records that encoding, so a context given later (a new user's) is
encoded into the same columns.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pluralign._parse import MAX_DEPTH
from pluralign.data.sources import Problems, RowError, dumps_short
from pluralign.errors import DataValidationError

__all__ = ["ContextSchema", "UserContexts", "flatten", "parse_context"]


def _number(value: Any, name: str) -> float:
    """A finite real number (not a boolean) as a float; huge integers that overflow a float
    are refused, not turned into ``inf`` or an ``OverflowError``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(name, f"must hold finite numbers, got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        raise RowError(name, "holds a number too large for a 64-bit float") from None
    if not math.isfinite(out):
        raise RowError(name, f"must hold finite numbers, got {value!r}")
    return out


def parse_context(value: Any, name: str = "user_context") -> tuple[str, Any]:
    """One context as ``("vector", [floats])`` or ``("attributes", {dotted name: value})``;
    a bad one raises :class:`~pluralign.data.sources.RowError` naming ``name`` (or
    ``name.attribute``)."""
    if isinstance(value, list):
        out = [_number(v, name) for v in value]
        if not out:
            raise RowError(name, "is an empty list")
        return "vector", out
    if isinstance(value, Mapping):
        flat = flatten(value)
        for key, v in flat.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                _number(v, f"{name}.{key}")
            if not (v is None or isinstance(v, str | int | float | bool)):
                raise RowError(
                    f"{name}.{key}",
                    f"must be a number, string, boolean or null, got {type(v).__name__}",
                )
        return "attributes", flat
    raise RowError(
        name, f"must be a list of numbers or a mapping of attributes, got {type(value).__name__}"
    )


def _hashable(parsed: Any) -> Any:
    """A parsed context (a list of floats or a flat mapping of scalars) as a hashable key;
    equal numbers are equal (``2`` and ``2.0``: both encode as 2.0), booleans and strings are
    not numbers."""

    def scalar(v: Any) -> tuple[str, Any]:
        if isinstance(v, bool):
            return "bool", v
        if isinstance(v, int | float):
            return "number", float(v)
        return type(v).__name__, v

    if isinstance(parsed, Mapping):
        return tuple(sorted((k, *scalar(v)) for k, v in parsed.items()))
    return tuple(parsed)


def flatten(mapping: Mapping, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Nested attributes as dotted names (``{"a": {"b": 1}}`` → ``{"a.b": 1}``). Two entries
    that flatten to the same name (``{"a.b": 1, "a": {"b": 2}}``) are refused, not merged."""
    if depth > MAX_DEPTH:
        raise RowError(prefix.rstrip(".") or None, f"nested more than {MAX_DEPTH} levels deep")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise RowError(
                prefix.rstrip(".") or None, f"attribute names must be strings, got {key!r}"
            )
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not value:
            raise RowError(name, "is an empty mapping (give the attribute a value, or null)")
        items = (
            flatten(value, name + ".", depth + 1).items()
            if isinstance(value, Mapping)
            else [(name, value)]
        )
        for flat_name, flat_value in items:
            if flat_name in out:
                raise RowError(
                    flat_name,
                    "two attributes flatten to this name (a dotted key "
                    "and a nested mapping); rename one",
                )
            out[flat_name] = flat_value
    return out


class UserContexts:
    """Per-user contexts: one kind and one length for all rows, the same for every row of a
    user (checked at the end by :meth:`check`, against the context most of the user's rows
    have); attribute mappings encoded as numbers (numeric attributes) and one-hot columns (the
    others)."""

    def __init__(self, name: str = "user_context") -> None:
        self.name = name
        self.kind: str | None = None
        self.by_user: dict[Any, list[tuple[Any, str, int]]] = {}
        self.rows: list[Any] = []
        self.where: list[tuple[str, int]] = []

    def add(self, user: Any, value: Any, path: str, line: int) -> None:
        kind, parsed = parse_context(value, self.name)
        if self.kind is None:
            self.kind = kind
        elif kind != self.kind:
            raise RowError(self.name, f"is a {kind} but earlier rows have a {self.kind}")
        if kind == "vector" and self.rows and len(parsed) != len(self.rows[0]):
            raise RowError(
                self.name, f"has length {len(parsed)}, earlier rows have {len(self.rows[0])}"
            )
        self.by_user.setdefault(user, []).append((parsed, path, line))
        self.rows.append(parsed)
        self.where.append((path, line))

    def check(self, errors: Problems) -> None:
        """Each user's context is the one most of its rows have (a tie: the first row's);
        every row with another context is reported, naming both."""
        for user, entries in self.by_user.items():
            keys = [_hashable(parsed) for parsed, _, _ in entries]
            counts = Counter(keys)
            if len(counts) == 1:
                continue
            first_at: dict[Any, int] = {}
            for i, key in enumerate(keys):
                first_at.setdefault(key, i)
            top = max(counts.values())
            leaders = [k for k in counts if counts[k] == top]
            majority = min(leaders, key=first_at.__getitem__)  # ties: the earliest
            value, first_path, first_line = entries[first_at[majority]]
            if len(leaders) == 1:
                theirs = (
                    f"{top} of the user's {len(entries)} rows (the first on line "
                    f"{first_line} of {first_path}) have {dumps_short(value)}"
                )
            else:
                theirs = (
                    f"no context is on most of the user's {len(entries)} rows, so the "
                    f"first row's is taken: {dumps_short(value)}, on line {first_line} "
                    f"of {first_path}"
                )
            for key, (parsed, path, line) in zip(keys, entries, strict=True):
                if key != majority:
                    errors.add(
                        f"differs from user {user!r}'s context: {theirs}; this row has "
                        f"{dumps_short(parsed)}",
                        path=path,
                        line=line,
                        field=self.name,
                    )

    def matrix(self) -> tuple[np.ndarray | None, list[str]]:
        """``(contexts (n, d_x), column names)``; :attr:`schema` is set to their encoding."""
        self.schema: ContextSchema | None = None
        if self.kind is None:
            return None, []
        if self.kind == "vector":
            arr = np.array(self.rows, dtype=np.float64)
            self.schema = ContextSchema.vector(arr.shape[1])
            return arr, list(self.schema.names)
        numeric = sorted(
            {
                k
                for row in self.rows
                for k, v in row.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        categorical = sorted(
            {f"{k}={v}" for row in self.rows for k, v in row.items() if k not in numeric}
        )
        mixed = [
            k
            for k in numeric
            if any(
                k in row and (isinstance(row[k], bool) or not isinstance(row[k], int | float))
                for row in self.rows
            )
        ]
        if mixed:
            raise DataValidationError(
                f"attribute {mixed[0]!r} mixes numbers and other values",
                field=f"{self.name}.{mixed[0]}",
            )
        for i, row in enumerate(self.rows):  # a missing number would silently become 0
            absent = [k for k in numeric if k not in row]
            if absent:
                first = next(j for j, r in enumerate(self.rows) if absent[0] in r)
                raise DataValidationError(
                    f"numeric attribute {absent[0]!r} (given on line {self.where[first][1]} of "
                    f"{self.where[first][0]}) is missing here; give it on every row",
                    field=f"{self.name}.{absent[0]}",
                    path=self.where[i][0],
                    line=self.where[i][1],
                )
        pairs = {(k, str(v)) for row in self.rows for k, v in row.items() if k not in numeric}
        if len({f"{k}={v}" for k, v in pairs}) != len(pairs) or set(categorical) & set(numeric):
            clash = sorted(f"{k}={v}" for k, v in pairs)
            dup = next(n for n in clash if clash.count(n) > 1 or n in numeric)
            raise DataValidationError(
                f"two attributes give the same one-hot column {dup!r}; rename one", field=self.name
            )
        names = numeric + categorical
        self.schema = ContextSchema("attributes", tuple(names), tuple(numeric))
        col = {n: i for i, n in enumerate(names)}
        arr = np.zeros((len(self.rows), len(names)))
        for i, row in enumerate(self.rows):
            for key, value in row.items():
                if key in numeric:
                    arr[i, col[key]] = float(value)
                else:
                    arr[i, col[f"{key}={value}"]] = 1.0
        return arr, names


@dataclass(frozen=True)
class ContextSchema:
    """How user contexts became the columns of ``x``, so that a context given later (a new
    user's, ``pluralign rank --context``) is encoded into the same columns.

    ``kind`` is ``"vector"`` (a list of numbers; ``names`` are ``x0, x1, …``) or
    ``"attributes"`` (a mapping, nested keys dotted): each numeric attribute is a column of its
    value (``numeric`` lists them), every other attribute a one-hot column ``name=value`` per
    value seen in training (a missing non-numeric attribute is all zeros there, and here)."""

    kind: str
    names: tuple[str, ...]
    numeric: tuple[str, ...] = ()

    @classmethod
    def vector(cls, d: int) -> ContextSchema:
        names = tuple(f"x{i}" for i in range(d))
        return cls("vector", names, names)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names), "numeric": list(self.numeric)}

    @classmethod
    def from_dict(cls, value: Any, field: str = "context") -> ContextSchema:
        """The inverse of :meth:`to_dict`, validated (a model folder may come from anyone)."""
        ok = (
            isinstance(value, Mapping)
            and set(value) == {"kind", "names", "numeric"}
            and value["kind"] in ("vector", "attributes")
            and all(
                isinstance(v, list) and all(isinstance(n, str) and n for n in v)
                for v in (value["names"], value["numeric"])
            )
        )
        if ok:
            names, numeric = value["names"], value["numeric"]
            ok = (
                bool(names)
                and len(set(names)) == len(names)
                and set(numeric) <= set(names)
                and (value["kind"] == "attributes" or numeric == names)
            )
        if not ok:
            raise DataValidationError(
                "must be {kind: vector|attributes, names: [column names], numeric: [the "
                "numeric ones]} with distinct, non-empty names",
                field=field,
            )
        return cls(value["kind"], tuple(value["names"]), tuple(value["numeric"]))

    def encode(self, value: Any, name: str = "context") -> np.ndarray:
        """One context (a list of numbers, or a mapping of attributes) as a ``(d_x,)`` row;
        anything the training contexts did not have is refused, naming it (``name`` is how
        the message calls the value)."""
        try:
            kind, parsed = parse_context(value, name)
        except RowError as err:
            raise DataValidationError(err.message, field=err.field) from None
        if kind != self.kind:
            want = (
                f"a list of {len(self.names)} numbers"
                if self.kind == "vector"
                else "a mapping of attributes (" + ", ".join(self._attributes()) + ")"
            )
            raise DataValidationError(
                f"must be {want}, like the model's training contexts", field=name
            )
        if kind == "vector":
            if len(parsed) != len(self.names):
                raise DataValidationError(
                    f"has {len(parsed)} numbers; the model's contexts have {len(self.names)}",
                    field=name,
                )
            return np.asarray(parsed, dtype=np.float64)
        out = np.zeros(len(self.names))
        col = {n: i for i, n in enumerate(self.names)}
        for key, v in parsed.items():
            if key in self.numeric:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise DataValidationError(
                        f"must be a number (a numeric attribute in training), got {v!r}",
                        field=f"{name}.{key}",
                    )
                out[col[key]] = float(v)
            elif f"{key}={v}" in col:
                out[col[f"{key}={v}"]] = 1.0
            else:
                known = [
                    n.split("=", 1)[1]
                    for n in self.names
                    if n.startswith(f"{key}=") and n not in self.numeric
                ]
                raise DataValidationError(
                    f"value {v!r} was not seen in training; known values: "
                    + ", ".join(map(repr, known))
                    if known
                    else "not an attribute of the model's contexts; they have: "
                    + ", ".join(self._attributes()),
                    field=f"{name}.{key}",
                )
        missing = [n for n in self.numeric if n not in parsed]
        if missing:
            raise DataValidationError(
                "missing (a numeric attribute of every training context)",
                field=f"{name}.{missing[0]}",
            )
        return out

    def _attributes(self) -> list[str]:
        return list(
            dict.fromkeys(n if n in self.numeric else n.split("=", 1)[0] for n in self.names)
        )
