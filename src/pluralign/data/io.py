"""Reading and writing :class:`~pluralign.data.PreferenceData` (``.npz`` and numeric JSONL).

JSONL schema, one comparison per line::

    {"x": [..d_x..], "phi0": [..d_phi..], "phi1": [..d_phi..], "y": 0 or 1, "user": "u7"}

``x`` and ``user`` are optional but must be present on every line or on none. A bad line
raises :class:`~pluralign.errors.DataValidationError` naming the file, the line and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pluralign._atomic import atomic_open
from pluralign._parse import iter_json_lines, read_npz
from pluralign.data.preference import PreferenceData
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


def load_preferences(path: str | Path) -> PreferenceData:
    """Read ``.npz`` or ``.jsonl`` preference data, validating every row."""
    path = Path(path)
    if not path.exists():
        raise DataValidationError("file not found", path=str(path))
    if path.suffix == ".npz":
        found = read_npz(path)
        unknown = sorted(set(found) - set(_FIELDS))
        if unknown:
            raise DataValidationError(f"unknown array; expected {', '.join(_FIELDS)}",
                                      field=unknown[0], path=str(path))
        missing = [k for k in ("phi0", "phi1", "y") if k not in found]
        if missing:
            raise DataValidationError("missing array", field=missing[0], path=str(path))
        arrays = {k: found.get(k) for k in _FIELDS}
        try:
            return PreferenceData(**arrays)
        except DataValidationError as err:
            raise DataValidationError(
                err.bare, field=err.field, row=err.row, path=str(path)
            ) from None
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    raise DataValidationError(f"unknown suffix {path.suffix!r}; use .npz or .jsonl", path=str(path))


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
        where = {"path": str(path), "line": lineno}
        if not isinstance(row, dict):
            raise DataValidationError("each line must be a JSON object", **where)
        yield row, where


def check_user_id(user: Any, field: str, where: dict[str, Any],
                  first: tuple[Any, int] | None) -> None:
    """A user id is a non-empty string or an integer (not a boolean), and every row of a file
    uses the same kind: ``7`` and ``"7"`` would silently become one user (NumPy turns both into
    the string ``"7"``), so mixing them is refused, naming the line of the first id."""
    if isinstance(user, bool) or not isinstance(user, str | int):
        raise DataValidationError(f"must be a non-empty string or an integer, got {user!r}",
                                  field=field, **where)
    if isinstance(user, str) and not user.strip():
        raise DataValidationError(f"must be a non-empty string or an integer, got {user!r}",
                                  field=field, **where)
    if first is not None and type(first[0]) is not type(user):
        raise DataValidationError(
            f"is {user!r} ({type(user).__name__}) but line {first[1]} has {first[0]!r} "
            f"({type(first[0]).__name__}); user ids must all be strings or all integers",
            field=field, **where)


def _load_jsonl(path: Path) -> PreferenceData:
    cols: dict[str, list] = {"x": [], "phi0": [], "phi1": [], "y": [], "users": []}
    dims: dict[str, int | None] = {"x": None, "phi0": None, "phi1": None}
    has: dict[str, bool | None] = {"x": None, "user": None}
    first_user: tuple[Any, int] | None = None
    for row, where in iter_jsonl_objects(path):
        unknown = set(row) - {"x", "phi0", "phi1", "y", "user"}
        if unknown:
            raise DataValidationError(
                "unknown field; expected x, phi0, phi1, y, user",
                field=sorted(unknown)[0],
                **where,
            )
        for key in ("x", "user"):
            present = key in row
            if has[key] is None:
                has[key] = present
            elif has[key] != present:
                raise DataValidationError(
                    "present on some lines but not others", field=key, **where
                )
        for key in ("phi0", "phi1"):
            if key not in row:
                raise DataValidationError("missing", field=key, **where)
        if "y" not in row:
            raise DataValidationError("missing", field="y", **where)
        if row["y"] not in (0, 1) or isinstance(row["y"], bool):
            raise DataValidationError(f"must be 0 or 1, got {row['y']!r}", field="y", **where)
        for key in ("x", "phi0", "phi1") if has["x"] else ("phi0", "phi1"):
            vec = _vector(row[key], key, dims[key], where)
            dims[key] = len(vec)
            cols[key].append(vec)
        if dims["phi0"] != dims["phi1"]:
            raise DataValidationError(
                f"has length {dims['phi1']} but phi0 has {dims['phi0']}", field="phi1", **where
            )
        cols["y"].append(row["y"])
        if has["user"]:
            user = row["user"]
            check_user_id(user, "user", where, first_user)
            first_user = first_user or (user, where["line"])
            cols["users"].append(user)
    if not cols["y"]:
        raise DataValidationError("file holds no comparisons", path=str(path))
    return PreferenceData(
        x=np.array(cols["x"]) if has["x"] else None,
        phi0=np.array(cols["phi0"]),
        phi1=np.array(cols["phi1"]),
        y=np.array(cols["y"]),
        users=np.array(cols["users"]) if has["user"] else None,
    )
