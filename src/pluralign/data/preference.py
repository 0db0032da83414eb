"""Pairwise comparisons as arrays: the data model every estimator consumes.

A comparison is ``(x, s, a0, a1, y)``: a user context ``x``, two responses whose features are
``phi0 = φ(s, a0)`` and ``phi1 = φ(s, a1)``, and the label ``y = 1`` iff ``a1 ≻ a0``. Under
Bradley–Terry, ``P(y = 1) = σ(r(x, s, a1) − r(x, s, a0))``.

Files are :mod:`pluralign.data.io` (:func:`~pluralign.data.save_preferences`,
:func:`~pluralign.data.load_preferences`), which builds on this module, never the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pluralign.errors import DataValidationError

__all__ = ["PreferenceData"]


def _as_float_matrix(name: str, value: object, n_rows: int | None = None) -> np.ndarray:
    """``value`` as a finite ``(n, d)`` float64 matrix with ``d ≥ 1``; anything that is not real
    numbers (strings, complex, datetimes, objects) is refused rather than cast."""
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise DataValidationError(f"cannot be read as numbers ({exc})", field=name) from None
    if raw.dtype.kind not in "biuf":
        raise DataValidationError(f"must hold real numbers, got dtype {raw.dtype}", field=name)
    arr = raw.astype(np.float64)
    if arr.ndim != 2:
        raise DataValidationError(f"must be a 2-D array (n, d), got shape {arr.shape}", field=name)
    if arr.shape[1] == 0:
        raise DataValidationError("has no columns (d = 0)", field=name)
    if n_rows is not None and arr.shape[0] != n_rows:
        raise DataValidationError(
            f"has {arr.shape[0]} rows but 'y' has {n_rows} (lengths must match)", field=name
        )
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise DataValidationError("contains NaN or inf", field=name, row=int(np.argmax(bad)))
    return arr


def _as_user_ids(value: object, n: int) -> np.ndarray:
    """User ids as one ``int64`` or one string array. Python/NumPy integers and strings are
    accepted, but not both in one data set: NumPy would turn ``7`` and ``"7"`` into the same
    string ``"7"`` and merge two users silently."""
    if isinstance(value, np.ndarray) and value.dtype.kind != "O":
        users = value
    else:
        users = (
            np.empty(len(value), dtype=object)
            if isinstance(value, list | tuple)
            else np.asarray(value, dtype=object)
        )
        if isinstance(value, list | tuple):
            users[:] = list(value)
    if users.shape != (n,):
        raise DataValidationError(
            f"must have shape ({n},) like 'y', got {users.shape}", field="users"
        )
    if users.dtype.kind == "O":
        items = users.tolist()
        ints = [
            isinstance(u, int | np.integer) and not isinstance(u, bool | np.bool_) for u in items
        ]
        strs = [isinstance(u, str) for u in items]
        bad = [i for i, (a, b) in enumerate(zip(ints, strs, strict=True)) if not (a or b)]
        if bad:
            raise DataValidationError(
                f"user ids must be integers or strings, got {items[bad[0]]!r}",
                field="users",
                row=bad[0],
            )
        if any(ints) and any(strs):
            row = strs.index(True) if ints[0] else ints.index(True)
            raise DataValidationError(
                "user ids mix integers and strings (7 and '7' would merge); use one type",
                field="users",
                row=row,
            )
        users = np.array(items, dtype=np.int64) if all(ints) else np.array(items, dtype=str)
    if users.dtype.kind not in "iuU":
        raise DataValidationError(
            f"user ids must be integers or strings, got dtype {users.dtype}", field="users"
        )
    if users.dtype.kind == "U":
        empty = np.char.str_len(np.char.strip(users)) == 0
        if empty.any():
            raise DataValidationError(
                "user ids must be non-empty", field="users", row=int(np.argmax(empty))
            )
    return users


@dataclass(frozen=True, eq=False)
class PreferenceData:
    """``n`` pairwise comparisons.

    Parameters
    ----------
    x:
        User contexts, shape ``(n, d_x)``, or ``None`` for context-free data.
    phi0, phi1:
        Features of the two responses, shape ``(n, d_phi)`` each.
    y:
        Labels in ``{0, 1}``, shape ``(n,)``; ``1`` means ``phi1`` was preferred.
    users:
        Optional user ids, shape ``(n,)`` (any hashable scalars: ints or strings).

    Every field is validated on construction; a :class:`~pluralign.errors.DataValidationError`
    names the field and the first bad row.

    For scikit-learn (``GridSearchCV``, ``cross_validate``, splitters) a ``PreferenceData`` is
    the ``X`` of ``n`` samples, one per comparison: ``len(data)`` and ``data.shape == (n,)``
    count them and ``data[index]`` is :meth:`subset` (an array of row indices, a boolean mask or
    a slice; also ``data[index, ...]``, the form scikit-learn's ``_safe_indexing`` uses). It is
    not iterable and a single integer is refused (a comparison is ``data[[i]]``).
    """

    __iter__ = None  # indexing by rows does not make it a sequence of comparisons

    x: np.ndarray | None
    phi0: np.ndarray
    phi1: np.ndarray
    y: np.ndarray
    users: np.ndarray | None = None

    def __post_init__(self) -> None:
        y = np.asarray(self.y)
        if y.ndim != 1:
            raise DataValidationError(f"must be 1-D (n,), got shape {y.shape}", field="y")
        n = y.shape[0]
        if n == 0:
            raise DataValidationError("data is empty (0 comparisons)", field="y")
        if y.dtype.kind not in "biuf":
            raise DataValidationError(f"must be numeric 0/1, got dtype {y.dtype}", field="y")
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            row = int(np.argmax(bad))
            raise DataValidationError(f"labels must be 0 or 1, got {y[row]!r}", field="y", row=row)
        object.__setattr__(self, "y", y.astype(np.int8))
        phi0 = _as_float_matrix("phi0", self.phi0, n)
        phi1 = _as_float_matrix("phi1", self.phi1, n)
        if phi0.shape[1] != phi1.shape[1]:
            raise DataValidationError(
                f"has {phi1.shape[1]} columns but 'phi0' has {phi0.shape[1]}", field="phi1"
            )
        object.__setattr__(self, "phi0", phi0)
        object.__setattr__(self, "phi1", phi1)
        if self.x is not None:
            object.__setattr__(self, "x", _as_float_matrix("x", self.x, n))
        with np.errstate(over="ignore", invalid="ignore"):
            overflow = ~np.isfinite(phi1 - phi0).all(axis=1)
        if overflow.any():
            raise DataValidationError(
                "phi1 - phi0 overflows (features too large)",
                field="phi1",
                row=int(np.argmax(overflow)),
            )
        if self.users is not None:
            object.__setattr__(self, "users", _as_user_ids(self.users, n))

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def n(self) -> int:
        """Number of comparisons."""
        return len(self)

    @property
    def shape(self) -> tuple[int]:
        """``(n,)``: the number of comparisons, the samples of scikit-learn's splitters."""
        return (len(self),)

    @property
    def d_x(self) -> int:
        """Context dimension (0 for context-free data)."""
        return 0 if self.x is None else int(self.x.shape[1])

    @property
    def d_phi(self) -> int:
        """Feature dimension."""
        return int(self.phi0.shape[1])

    @property
    def delta_phi(self) -> np.ndarray:
        """``phi1 − phi0``, shape ``(n, d_phi)``."""
        return self.phi1 - self.phi0

    def __repr__(self) -> str:
        users = "" if self.users is None else f", users={len(np.unique(self.users))}"
        return f"PreferenceData(n={self.n}, d_x={self.d_x}, d_phi={self.d_phi}{users})"

    # --------------------------------------------------------------- slicing
    def subset(self, index: Sequence[int] | np.ndarray | slice) -> PreferenceData:
        """The comparisons at ``index`` (integer indices, a boolean mask or a slice)."""
        if not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype == bool and index.shape != (self.n,):
                raise DataValidationError(
                    f"boolean mask must have shape ({self.n},), got {index.shape}", field="index"
                )
        return PreferenceData(
            x=None if self.x is None else self.x[index],
            phi0=self.phi0[index],
            phi1=self.phi1[index],
            y=self.y[index],
            users=None if self.users is None else self.users[index],
        )

    def __getitem__(self, index: Sequence[int] | np.ndarray | slice | tuple) -> PreferenceData:
        """``subset(index)``; ``data[index, ...]`` is the same (scikit-learn indexes so)."""
        if isinstance(index, tuple):
            if (len(index) == 2 and index[1] is Ellipsis) or len(index) == 1:
                index = index[0]  # type: ignore[assignment]  # numpy typing of a row index / object dtype
            else:
                raise TypeError(
                    "PreferenceData is indexed by rows only: data[index] or "
                    f"data[index, ...], got a tuple of {len(index)}"
                )
        if np.ndim(index) == 0 and not isinstance(index, slice):  # type: ignore[arg-type]  # numpy typing of a row index / object dtype
            raise TypeError(
                "PreferenceData is indexed by an array of row indices, a boolean mask or a "
                f"slice, got {index!r}; comparison i alone is data[[i]]"
            )
        return self.subset(index)

    def __array__(self, dtype: object = None, copy: bool | None = None) -> np.ndarray:
        """To NumPy a ``PreferenceData`` stays one object, as it was before it had
        ``__getitem__``: ``np.asarray(data)`` is a 0-d object array holding it."""
        out = np.empty(1, dtype=object)
        out[0] = self  # stored as the element, not unpacked
        out = out.reshape(())  # type: ignore[assignment]  # numpy typing of a row index / object dtype
        return out if dtype is None else out.astype(dtype)  # type: ignore[call-overload]  # numpy typing of a row index / object dtype

    def split(
        self, test_size: float = 0.2, seed: int | np.random.Generator = 0
    ) -> tuple[PreferenceData, PreferenceData]:
        """A random ``(train, test)`` split; ``test_size`` is a fraction in (0, 1)."""
        if not 0.0 < test_size < 1.0:
            raise DataValidationError(f"must be in (0, 1), got {test_size}", field="test_size")
        n_test = round(test_size * self.n)
        if n_test == 0 or n_test == self.n:
            raise DataValidationError(
                f"a {test_size} split of {self.n} comparisons leaves one side empty",
                field="test_size",
            )
        rng = np.random.default_rng(seed)
        perm = rng.permutation(self.n)
        return self.subset(np.sort(perm[n_test:])), self.subset(np.sort(perm[:n_test]))

    @classmethod
    def concatenate(cls, parts: Sequence[PreferenceData]) -> PreferenceData:
        """Stack several data sets with the same dimensions."""
        if not parts:
            raise DataValidationError("nothing to concatenate", field="parts")
        has_x = {p.x is not None for p in parts}
        has_users = {p.users is not None for p in parts}
        if len(has_x) > 1 or len(has_users) > 1:
            raise DataValidationError("parts disagree on having x / users", field="parts")
        for name, dims in (("phi0", {p.d_phi for p in parts}), ("x", {p.d_x for p in parts})):
            if len(dims) > 1:
                raise DataValidationError(
                    f"parts have different dimensions {sorted(dims)}", field=name
                )
        return cls(
            x=np.concatenate([p.x for p in parts]) if parts[0].x is not None else None,
            phi0=np.concatenate([p.phi0 for p in parts]),
            phi1=np.concatenate([p.phi1 for p in parts]),
            y=np.concatenate([p.y for p in parts]),
            users=np.concatenate([p.users for p in parts]) if parts[0].users is not None else None,
        )
