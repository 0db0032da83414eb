"""Validation of hyper-parameters and of prediction inputs, shared by the estimators, confidence
sets and policies (the role of scikit-learn's ``utils/validation.py``).

It follows scikit-learn: ``__init__`` stores hyper-parameters as given and ``fit`` (``probs`` for
policies) validates them, raising a :class:`~pluralign.errors.DataValidationError` whose
``field`` is the parameter's name. The fit diagnostics (pluralign's warnings) are
:mod:`pluralign.rewards.diagnostics`.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from pluralign.errors import DataValidationError

__all__ = ["check_int", "check_number", "check_phi", "check_x"]


def check_number(
    value: Any,
    name: str,
    *,
    owner: str,
    minimum: float = 0.0,
    strict: bool = False,
    below: float | None = None,
) -> float:
    """``value`` as a float if it is a finite real (not a bool) ``≥ minimum`` (``> minimum`` if
    ``strict``; ``< below`` if given); else a ``DataValidationError`` naming ``owner.name``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        number = float(value)
        ok = (number > minimum if strict else number >= minimum) and (
            below is None or number < below
        )
    if not ok:
        bound = f"{'>' if strict else '≥'} {minimum:g}"
        if below is not None:
            bound = f"in ({minimum:g}, {below:g})" if strict else f"in [{minimum:g}, {below:g})"
        raise DataValidationError(
            f"{owner}.{name} must be a finite number {bound}, got {value!r}", field=name
        )
    return number


def check_int(value: Any, name: str, *, owner: str, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (not a bool) ``≥ minimum``; else a
    ``DataValidationError`` naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise DataValidationError(
            f"{owner}.{name} must be an integer ≥ {minimum}, got {value!r}", field=name
        )
    return int(value)


def check_phi(model: str, phi: Any, d_phi: int) -> np.ndarray:
    """Response features ``phi`` as float64 of shape ``(n, d_phi)`` or ``(m, K, d_phi)``; else a
    ``DataValidationError`` (``field="phi"``) naming ``model``."""
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim not in (2, 3) or phi.shape[-1] != d_phi:
        raise DataValidationError(
            f"{model} expects phi of shape (n, {d_phi}) or (m, K, {d_phi}), got {phi.shape}",
            field="phi",
        )
    return phi


def check_x(model: str, x: Any, phi: np.ndarray, d_x: int) -> np.ndarray:
    """User contexts ``x`` as float64 of shape ``(len(phi), d_x)``, one row per leading row of
    ``phi``; else a ``DataValidationError`` (``field="x"``) naming ``model``."""
    if x is None:
        raise DataValidationError(f"{model} needs user contexts x", field="x")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != d_x or x.shape[0] != phi.shape[0]:
        raise DataValidationError(
            f"{model} expects x of shape ({phi.shape[0]}, {d_x}), got {x.shape}", field="x"
        )
    return x
