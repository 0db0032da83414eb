"""Value checks shared by ``train-rm``'s config resolver and :class:`RewardTrainer`.

Every check names the setting and refuses, with a :class:`~pluralign.errors.ConfigError`:

* ``bool`` where a number is expected (``True`` is an ``int`` in Python, so ``epochs: yes``
  would otherwise train one epoch);
* integers outside 64 bits (``10**400`` overflows ``float`` and torch's seeds later);
* non-finite floats (``.inf``, ``.nan``): a learning rate of ``inf`` makes every step
  ``NaN`` and a NaN passes every ``x > 0`` test by comparing false both ways, so ranges are
  written as ``low <= x`` / ``x < high`` after an explicit :func:`math.isfinite` check;
* mappings, lists and ``None`` where a scalar is expected (unless the setting is optional).

``text=True`` (config files) also reads numbers written as strings (PyYAML reads ``1e-3``,
without a dot, as the string ``"1e-3"``); the Python API is strict.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Sequence
from typing import Any

from pluralign.errors import ConfigError

__all__ = [
    "INT_MAX",
    "check_choice",
    "check_float",
    "check_int",
    "check_plain_file_name",
    "check_string",
    "show",
]

INT_MAX = 2**63 - 1
_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60


def show(value: Any) -> str:
    """A short ``repr`` of ``value`` for an error message (huge integers and containers are
    abbreviated; ``repr`` of an integer past 4,300 digits would itself raise)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"


def check_int(
    name: str, value: Any, *, minimum: int = 1, optional: bool = False, text: bool = False
) -> int | None:
    """``value`` as an ``int`` in ``[minimum, INT_MAX]``; ``None`` only when ``optional``."""
    if value is None and optional:
        return None
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if optional:
        what += " or null"
    number: Any = value
    if text and isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = value
    if (
        isinstance(number, float)
        and math.isfinite(number)
        and number.is_integer()
        and abs(number) <= INT_MAX
        and text
    ):
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, numbers.Integral):
        raise ConfigError(f"{name} must be {what}, got {show(value)}")
    number = int(number)
    if not minimum <= number <= INT_MAX:
        raise ConfigError(f"{name} must be {what} (at most 2**63 - 1), got {show(value)}")
    return number


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = True,
    optional: bool = False,
    text: bool = False,
) -> float | None:
    """``value`` as a finite ``float`` in the range given by ``low``/``high`` (``*_open``:
    the bound itself is excluded); ``None`` only when ``optional``."""
    if value is None and optional:
        return None
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    what = "a finite number" + (" " + " and ".join(parts) if parts else "")
    if optional:
        what += " or null"
    number: Any = value
    if text and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = value
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise ConfigError(f"{name} must be {what}, got {show(value)}")
    try:
        number = float(number)
    except OverflowError:  # an int past float's range (10**400)
        raise ConfigError(f"{name} must be {what}, got {show(value)}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be {what}, got {show(value)}")
    if low is not None and not (number > low if low_open else number >= low):
        raise ConfigError(f"{name} must be {what}, got {show(value)}")
    if high is not None and not (number < high if high_open else number <= high):
        raise ConfigError(f"{name} must be {what}, got {show(value)}")
    return number


def check_string(name: str, value: Any, *, optional: bool = False) -> str | None:
    """A non-empty string without NUL characters (``os`` functions refuse those); ``None``
    only when ``optional``. A :class:`pathlib.Path` is read as its text."""
    if value is None and optional:
        return None
    if hasattr(value, "__fspath__"):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ConfigError(
            f"{name} must be a non-empty string{' or null' if optional else ''}"
            f" (without NUL characters), got {show(value)}"
        )
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices`` (compared as strings; unhashable values are refused too)."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"{name} must be one of {', '.join(map(str, choices))}, got {show(value)}"
        )
    return value


def check_plain_file_name(name: str, value: Any, *, optional: bool = True) -> str | None:
    """A file name inside a folder: no path separators, not ``.``/``..`` (so a saved setting
    cannot point outside the folder it is read from)."""
    text = check_string(name, value, optional=optional)
    if text is None:
        return None
    if "/" in text or "\\" in text or text in (".", "..") or text != text.strip():
        raise ConfigError(
            f"{name} must be a plain file name in the model folder (no '/', "
            f"'\\\\', '..' or surrounding spaces), got {show(value)}"
        )
    return text
