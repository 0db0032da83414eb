"""User ids of the multi-user reward models: the id ↔ row lookup, the unknown-user policy, and
the one-hot contexts that encode users.

A fitted multi-user model keeps its users in row order (``users_``, the rows of ``thetas_``) and
a :class:`UserIndex` over them. Ids are compared by :func:`user_key` (a NumPy scalar and the
equal Python value are one user). At prediction time an unknown user raises a
``DataValidationError`` naming it, unless the model's ``unknown_user`` is ``"shared"``
(:data:`UNKNOWN_USER`): then it gets row ``-1``, the shared reward ``θ0``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from pluralign.data import PreferenceData
from pluralign.errors import DataValidationError

__all__ = [
    "UNKNOWN_USER",
    "UserIndex",
    "augmented_one_hot",
    "check_unknown_user",
    "one_hot",
    "training_users",
    "user_key",
]

UNKNOWN_USER = ("error", "shared")
"""The values of ``unknown_user``: refuse an unknown user, or give it the shared reward ``θ0``."""


def user_key(value: Any) -> Hashable:
    """A user id as a plain Python value (NumPy scalars unwrapped): the lookup's key, and what
    saved models and per-user results list."""
    return value.item() if isinstance(value, np.generic) else value


def check_unknown_user(value: str) -> str:
    """``value`` if it is one of :data:`UNKNOWN_USER`; else a ``DataValidationError``."""
    if value not in UNKNOWN_USER:
        raise DataValidationError(
            f"must be 'error' or 'shared', got {value!r}", field="unknown_user"
        )
    return value


def one_hot(index: np.ndarray, n_users: int) -> np.ndarray:
    """``e_u`` rows, shape ``(n, n_users)``."""
    out = np.zeros((len(index), n_users))
    out[np.arange(len(index)), index] = 1.0
    return out


def augmented_one_hot(index: np.ndarray, n_users: int) -> np.ndarray:
    """``[1, e_u]`` rows, shape ``(n, n_users + 1)``: the contexts of ``SharedBasis``."""
    out = np.zeros((len(index), n_users + 1))
    out[:, 0] = 1.0
    out[np.arange(len(index)), np.asarray(index) + 1] = 1.0
    return out


def training_users(data: PreferenceData, owner: str) -> tuple[np.ndarray, np.ndarray]:
    """``(users, index)`` of ``data.users``: the sorted unique users and each row's position
    among them; a ``DataValidationError`` naming ``owner`` when the data has no user ids."""
    if data.users is None:
        raise DataValidationError(f"{owner} needs user ids; the data has users=None", field="users")
    return np.unique(data.users, return_inverse=True)


class UserIndex:
    """The known users of a fitted model, in row order, and the lookup id → row.

    ``user in index`` tests an id; :meth:`rows` maps ids to rows; :meth:`check_new` refuses ids
    that cannot be added as new users.
    """

    def __init__(self, users: np.ndarray) -> None:
        self.users = users
        self._rows = {user_key(u): i for i, u in enumerate(users.tolist())}

    def __contains__(self, user: Any) -> bool:
        return user_key(user) in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, users: Any, *, allow_unknown: bool) -> np.ndarray:
        """Row of each id in ``users`` (scalar or 1-D array); ``-1`` for an unknown user when
        ``allow_unknown``, else a ``DataValidationError`` naming it (and the first row holding
        it) and the known users."""
        arr = np.atleast_1d(np.asarray(users))
        if arr.ndim != 1:
            raise DataValidationError(f"user ids must be 1-D, got shape {arr.shape}", field="users")
        uniq, inverse = np.unique(arr, return_inverse=True)
        found = np.array([self._rows.get(user_key(u), -1) for u in uniq.tolist()], dtype=np.int64)
        if not allow_unknown and (found < 0).any():
            missing = [u for u, f in zip(uniq.tolist(), found, strict=True) if f < 0]
            row = int(np.argmax(found[inverse] < 0))
            known = ", ".join(map(repr, self.users.tolist()[:10]))
            more = "" if len(self.users) <= 10 else f", … ({len(self.users)} users)"
            raise DataValidationError(
                f"unknown user {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f"; known users: {known}{more}. Adapt it with adapt_user(data), or pass "
                "unknown_user='shared' to fall back to the shared reward θ0",
                field="users",
                row=row,
            )
        return found[inverse]

    def check_new(self, ids: np.ndarray, *, note: str = "") -> None:
        """Refuse new user ``ids`` of another type than the known ones, or already known (the
        first such id in ``ids``' order is named; ``note`` is appended to that message)."""
        if len(self.users) and ids.dtype.kind != self.users.dtype.kind:
            raise DataValidationError(
                f"user ids of type {ids.dtype} do not match the model's ({self.users.dtype})",
                field="users",
            )
        known = [u for u in ids.tolist() if u in self]
        if known:
            raise DataValidationError(f"user {known[0]!r} is already known{note}", field="users")
