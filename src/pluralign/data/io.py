"""Reading and writing :class:`~pluralign.data.PreferenceData` (``.npz`` and numeric rows).

Row schema, one comparison per row::

    {"x": [..d_x..], "phi0": [..d_phi..], "phi1": [..d_phi..], "y": 0 or 1, "user": "u7"}

``x`` and ``user`` are optional but must be present on every row or on none. The rows come
from any source of :mod:`pluralign.data.sources`: JSONL (``save_preferences`` writes it), a JSON
array, CSV (``x``, ``phi0`` and ``phi1`` as JSON text cells), Parquet, each text format also
``.gz``-compressed, a ``datasets.Dataset`` (``split=`` for a ``DatasetDict``), a DataFrame or a
list of mappings. ``user_column`` and ``context_column`` name the columns holding ``user`` and
``x`` under other names. Every row is checked; bad rows raise one
:class:`~pluralign.errors.DataValidationError` naming the file, the line and the field
(summarized when many rows share the problem), or with ``errors="collect"`` are all returned.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pluralign._atomic import atomic_open
from pluralign._parse import iter_json_lines, read_npz
from pluralign.data.formats import Columns
from pluralign.data.preference import PreferenceData
from pluralign.data.sources import Problems, iter_rows
from pluralign.errors import DataValidationError

__all__ = ["check_user_id", "iter_jsonl_objects", "load_preferences", "save_preferences"]

_FIELDS = ("x", "phi0", "phi1", "y", "users")


def save_preferences(data: PreferenceData, path: str | Path) -> Path:
    """Write ``data`` to ``path`` (``.npz`` or ``.jsonl``) atomically."""
    path = Path(path)
    if path.suffix == ".npz":
        arrays = {k: getattr(data, k) for k in _FIELDS if getattr(data, k) is not None}
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **arrays)
    elif path.suffix == ".jsonl":
        with atomic_open(path, "w") as handle:
            for i in range(data.n):
                row: dict[str, object] = {}
                if data.x is not None:
                    row["x"] = data.x[i].tolist()
                row["phi0"] = data.phi0[i].tolist()
                row["phi1"] = data.phi1[i].tolist()
                row["y"] = int(data.y[i])
                if data.users is not None:
                    row["user"] = data.users[i].item()
                handle.write(json.dumps(row) + "\n")
    else:
        raise DataValidationError(
            f"unknown suffix {path.suffix!r}; use .npz or .jsonl", path=str(path)
        )
    return path


def load_preferences(
    path: Any,
    *,
    errors: str = "raise",
    split: str | None = None,
    user_column: str | None = None,
    context_column: str | None = None,
    **columns: str | None,
) -> Any:
    """Read numeric preference data, validating every row: an ``.npz`` file, or rows from a
    file or in-memory source (module docstring). With ``errors="collect"`` returns ``(data or
    None, [every bad row])``."""
    if not isinstance(path, str | Path) or Path(path).suffix.lower() != ".npz":
        return _load_rows(
            path,
            errors=errors,
            split=split,
            user_column=user_column,
            context_column=context_column,
            **columns,
        )
    Problems(errors)  # the mode is checked for .npz files too
    path = Path(path)
    if not path.exists():
        raise DataValidationError("file not found", path=str(path))
    if user_column is not None or context_column is not None or columns or split is not None:
        raise DataValidationError(
            "an .npz file has fixed arrays (x, phi0, phi1, y, users): "
            "column names and split= do not apply",
            path=str(path),
        )
    found = read_npz(path)
    unknown = sorted(set(found) - set(_FIELDS))
    if unknown:
        raise DataValidationError(
            f"unknown array; expected {', '.join(_FIELDS)}", field=unknown[0], path=str(path)
        )
    missing = [k for k in ("phi0", "phi1", "y") if k not in found]
    if missing:
        raise DataValidationError("missing array", field=missing[0], path=str(path))
    arrays: dict[str, Any] = {k: found.get(k) for k in _FIELDS}
    try:
        data = PreferenceData(**arrays)
    except DataValidationError as err:
        raise DataValidationError(err.bare, field=err.field, row=err.row, path=str(path)) from None
    return data if errors == "raise" else (data, [])


def _vector(value: object, field: str, dim: int | None, where: dict) -> list[float]:
    if not isinstance(value, list) or not value:
        raise DataValidationError("must be a non-empty list of numbers", field=field, **where)
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise DataValidationError(f"must hold finite numbers, got {v!r}", field=field, **where)
        out.append(float(v))
    if dim is not None and len(out) != dim:
        raise DataValidationError(
            f"has length {len(out)}, earlier lines have {dim}", field=field, **where
        )
    return out


def iter_jsonl_objects(path: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(row, where)`` for each non-blank line of a JSONL file; ``where`` is
    ``{"path", "line"}`` for error messages. A line that is not UTF-8, not JSON (by the strict
    rules of :mod:`pluralign._parse`) or not an object raises :class:`DataValidationError`
    naming the file and line."""
    for lineno, row in iter_json_lines(path):
        where: dict[str, Any] = {"path": str(path), "line": lineno}
        if not isinstance(row, dict):
            raise DataValidationError("each line must be a JSON object", **where)
        yield row, where


def check_user_id(
    user: Any, field: str, where: dict[str, Any], first: tuple[Any, int] | None
) -> None:
    """A user id is a non-empty string or an integer (not a boolean), and every row of a file
    uses the same kind: ``7`` and ``"7"`` would silently become one user (NumPy turns both into
    the string ``"7"``), so mixing them is refused, naming the line of the first id."""
    if isinstance(user, bool) or not isinstance(user, str | int):
        raise DataValidationError(
            f"must be a non-empty string or an integer, got {user!r}", field=field, **where
        )
    if isinstance(user, str) and not user.strip():
        raise DataValidationError(
            f"must be a non-empty string or an integer, got {user!r}", field=field, **where
        )
    if first is not None and type(first[0]) is not type(user):
        raise DataValidationError(
            f"is {user!r} ({type(user).__name__}) but line {first[1]} has {first[0]!r} "
            f"({type(first[0]).__name__}); user ids must all be strings or all integers",
            field=field,
            **where,
        )


def _load_rows(source: Any, *, errors: str, split: str | None, **columns: str | None) -> Any:
    problems = Problems(errors)
    cols = Columns.of("numeric", **columns)
    x_key, user_key = cols["context"], cols["user"]
    expected = (x_key, "phi0", "phi1", "y", user_key)
    data: dict[str, list] = {"x": [], "phi0": [], "phi1": [], "y": [], "users": []}
    dims: dict[str, int | None] = {"x": None, "phi0": None, "phi1": None}
    has: dict[str, bool | None] = {"x": None, "user": None}
    first_user: tuple[Any, int] | None = None
    label = str(source) if isinstance(source, str | Path) else f"<{type(source).__name__}>"
    for path, line, row in iter_rows(
        source, problems, split=split, typed=(x_key, "phi0", "phi1", "y")
    ):
        where: dict[str, Any] = {"path": path, "line": line}
        try:
            if not isinstance(row, dict | Mapping):
                raise DataValidationError("each line must be a JSON object", **where)
            parsed = _numeric_row(row, where, cols, expected, dims, has, first_user)
        except DataValidationError as err:
            missing = err.bare.startswith("missing") and isinstance(row, Mapping)
            problems.append(err, columns=row if missing else None)
            continue
        if has["user"] and first_user is None:
            first_user = (parsed["users"], line)
        for key, value in parsed.items():
            data[key].append(value)
    if problems.found:
        problems.check()
        return None, problems.ordered()
    if not data["y"]:
        raise DataValidationError(
            "file holds no comparisons" if isinstance(source, str | Path) else "no comparisons",
            path=label,
        )
    out = PreferenceData(
        x=np.array(data["x"]) if has["x"] else None,
        phi0=np.array(data["phi0"]),
        phi1=np.array(data["phi1"]),
        y=np.array(data["y"]),
        users=np.array(data["users"]) if has["user"] else None,
    )
    return out if errors == "raise" else (out, [])


def _numeric_row(
    row: Mapping[str, Any],
    where: dict[str, Any],
    cols: Columns,
    expected: tuple[str, ...],
    dims: dict[str, int | None],
    has: dict[str, bool | None],
    first_user: tuple[Any, int] | None,
) -> dict[str, Any]:
    """One numeric row, checked; ``dims`` (vector lengths) and ``has`` (whether ``x`` and
    ``user`` are given) follow the first row that sets them."""
    x_key, user_key = cols["context"], cols["user"]
    unknown = set(row) - set(expected)
    if unknown:
        raise DataValidationError(
            f"unknown field; expected {', '.join(expected)}",
            field=str(sorted(map(str, unknown))[0]),
            **where,
        )
    for key, column in (("x", x_key), ("user", user_key)):
        present = row.get(column) is not None  # a columnar source fills an absent one with null
        if has[key] is None:
            has[key] = present
        elif has[key] != present:
            raise DataValidationError("present on some lines but not others", field=column, **where)
    for key in ("phi0", "phi1", "y"):
        if key not in row:
            raise DataValidationError("missing", field=key, **where)
    label = row["y"]  # a number 0 or 1 (not a boolean, nor an array of one: no truth value)
    if (
        isinstance(label, bool | np.bool_)
        or not isinstance(label, int | float | np.integer | np.floating)
        or label not in (0, 1)
    ):
        raise DataValidationError(f"must be 0 or 1, got {row['y']!r}", field="y", **where)
    out: dict[str, Any] = {}
    lengths = dict(dims)
    for key in ("x", "phi0", "phi1") if has["x"] else ("phi0", "phi1"):
        column = x_key if key == "x" else key
        vec = _vector(row[column], column, lengths[key], where)
        lengths[key] = len(vec)
        out[key] = vec
    if lengths["phi0"] != lengths["phi1"]:
        raise DataValidationError(
            f"has length {lengths['phi1']} but phi0 has {lengths['phi0']}", field="phi1", **where
        )
    dims.update(lengths)
    out["y"] = row["y"]
    if has["user"]:
        user = row[user_key]
        check_user_id(user, user_key, where, first_user)
        out["users"] = user
    return out
