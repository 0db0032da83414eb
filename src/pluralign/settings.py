"""Typed settings: the one way a config section's values are declared, checked and documented.

A config section is a frozen dataclass (:class:`Section`) whose fields are declared with
:func:`setting`: each field carries its default, its help text and its check, so the reader of
config files (:meth:`Section.from_dict`, :func:`resolve_sections`), the Python API (building a
section runs the same checks, ``TrainingConfig(learning_rate=0)`` raises naming
``train.learning_rate``; a constructor that takes the same setting as a keyword checks it with
:meth:`Section.check_value`) and the documentation (:func:`describe`, :func:`settings_table`)
cannot drift apart. It sits below the LLM jobs (:mod:`pluralign.llm.config` builds their
sections on it) and the experiments, and imports neither.

**Checks of one value.** A check is ``check(name, value, *, text=True) -> value``: the value to
use, or a :class:`~pluralign.errors.ConfigError` naming ``name``. The checks below (and the
builders :func:`integer`, :func:`real`, :func:`string`, :func:`choice`, :func:`flag`) refuse:

* ``bool`` where a number is expected (``True`` is an ``int`` in Python, so ``epochs: yes``
  would otherwise train one epoch);
* integers outside 64 bits (``10**400`` overflows ``float`` and torch's seeds later);
* non-finite floats (``.inf``, ``.nan``): a learning rate of ``inf`` makes every step
  ``NaN`` and a NaN passes every ``x > 0`` test by comparing false both ways, so ranges are
  written as ``low <= x`` / ``x < high`` after an explicit :func:`math.isfinite` check;
* mappings, lists and ``None`` where a scalar is expected (unless the setting is optional).

``text=True`` (config files and sections) also reads numbers written as strings (PyYAML reads
``1e-3``, without a dot, as the string ``"1e-3"``); ``text=False`` (a Python keyword checked by
:meth:`Section.check_value`) is strict.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pluralign.errors import ConfigError

__all__ = [
    "INT_MAX",
    "Check",
    "Section",
    "Setting",
    "check_choice",
    "check_float",
    "check_int",
    "check_plain_file_name",
    "check_string",
    "choice",
    "default_of",
    "describe",
    "flag",
    "integer",
    "real",
    "resolve_sections",
    "setting",
    "settings_table",
    "show",
    "string",
    "to_plain",
]

# check(name, value, *, text=True) -> the value to use (module docstring)
Check = Callable[..., Any]
INT_MAX = 2**63 - 1
_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60


# ------------------------------------------------------------------ checks of one value
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


# ------------------------------------------------------------------ checks of a field
def integer(minimum: int = 1, optional: bool = False) -> Check:
    """The check of an integer setting in ``[minimum, INT_MAX]`` (:func:`check_int`)."""
    return functools.partial(check_int, minimum=minimum, optional=optional, text=True)


def real(optional: bool = False, **bounds: Any) -> Check:
    """The check of a finite real setting; ``bounds`` as :func:`check_float`'s."""
    return functools.partial(check_float, optional=optional, text=True, **bounds)


def string(optional: bool = False) -> Check:
    """The check of a non-empty string setting (:func:`check_string`)."""
    return functools.partial(_check_string, optional=optional)


def _check_string(name: str, value: Any, *, optional: bool, text: bool = True) -> str | None:
    return check_string(name, value, optional=optional)


def choice(*options: str) -> Check:
    """The check of a setting that is one of ``options`` (:func:`check_choice`)."""
    return functools.partial(_check_choice, options=options)


def _check_choice(name: str, value: Any, *, options: tuple[str, ...], text: bool = True) -> str:
    return check_choice(name, value, options)


def flag(name: str, value: Any, *, text: bool = True) -> bool:
    """The check of a ``true``/``false`` setting."""
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be true or false, got {show(value)}")


def setting(
    default: Any,
    help: str,
    check: Check,
    *,
    renamed_from: tuple[str, ...] = (),
    required: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """A dataclass field of a config section. ``check(name, value, *, text=True)`` returns
    the value to use or raises a :class:`ConfigError` naming ``name``; ``renamed_from``: the
    names an older config used; ``required``: a field without a default (``None`` until set),
    with the reason given when it is missing; ``metadata``: further per-field declarations of
    a subclass (e.g. an experiment parameter's constraint). A list or mapping default is
    copied for every section built (a dataclass refuses a mutable default)."""
    meta = {
        **(metadata or {}),
        "help": help,
        "check": check,
        "renamed_from": renamed_from,
        "required": required,
    }
    if isinstance(default, list | dict):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field) -> Any:
    """The default of a section's field (a fresh copy where it is a list or a mapping)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# ------------------------------------------------------------------ sections
S = TypeVar("S", bound="Section")


@dataclass(frozen=True)
class Section:
    """A config section: every field is checked when the section is built (from a config
    file by :meth:`from_dict` / :func:`resolve_sections` or in Python), with the name
    ``SECTION.key``.

    A new section is a frozen dataclass subclass that sets ``SECTION``, declares its fields
    with :func:`setting` and overrides ``_cross_check`` for checks across fields. Sections are
    frozen: ``dataclasses.replace(section, key=value)`` gives a checked copy."""

    SECTION: ClassVar[str] = ""
    # ``section: TEXT`` is read as ``{SHORTHAND: TEXT}`` (``model: PATH``)
    SHORTHAND: ClassVar[str | None] = None
    # True: an explicit ``null`` is handed to the field's check (which refuses it in its own
    # words, or takes it) instead of being refused here for a setting whose default is not null
    CHECK_NULLS: ClassVar[bool] = False

    def __post_init__(self) -> None:
        values = _check_values(
            type(self),
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            self.SECTION,
        )
        for key, value in values.items():
            object.__setattr__(self, key, value)

    @classmethod
    def _cross_check(cls, values: dict[str, Any], section: str) -> None:
        """Checks across fields (the fields themselves are already checked). It may replace
        in ``values`` what depends on other fields (the value then used)."""

    @classmethod
    def _unknown_keys(cls, bad: list[Any], name: str) -> ConfigError:
        """The error for the keys ``bad`` (in the order given) that are no setting of the
        section ``name``: a renamed key with its new name, the others with the valid keys."""
        keys = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(bad, key=str)
        renames = cls.renames()
        hints = [
            f"unknown key {k!r} in {name!r}: renamed to {renames[k]!r}"
            for k in bad
            if isinstance(k, str) and k in renames
        ]
        rest = [k for k in bad if not (isinstance(k, str) and k in renames)]
        if rest:
            hints.append(f"unknown key(s) {rest} in {name!r}; valid: {', '.join(keys)}")
        return ConfigError("; ".join(hints))

    @classmethod
    def from_dict(cls: type[S], given: Any, *, name: str | None = None) -> S:
        """The section of the mapping ``given`` (a config file's section ``name``, by default
        ``SECTION``), its missing keys at their defaults. ``None`` means all defaults; a string
        is ``{SHORTHAND: TEXT}`` where the section has a shorthand. Refused with a
        :class:`ConfigError`: a value that is not a mapping, unknown keys (a renamed one with
        its new name), bad values (named ``name.key``) and an explicit ``null`` for a setting
        whose default is not null."""
        name = cls.SECTION if name is None else name
        if given is None:
            given = {}
        if isinstance(given, str) and cls.SHORTHAND:
            given = {cls.SHORTHAND: given}
        if not isinstance(given, Mapping):
            raise ConfigError(f"{name!r} must be a mapping, got {show(given)}")
        keys = {f.name for f in dataclasses.fields(cls)}
        bad = [k for k in given if k not in keys]
        if bad:
            raise cls._unknown_keys(bad, name)
        values = _check_values(cls, {**cls.defaults(), **given}, name)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain mapping (YAML / JSON), in field order."""
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The default of every setting, in field order (the one source of the defaults of
        the constructors that take these settings as keywords)."""
        return {f.name: default_of(f) for f in dataclasses.fields(cls)}

    @classmethod
    def renames(cls) -> dict[str, str]:
        """Older names of the settings (a field's ``renamed_from``) → their names."""
        return {old: f.name for f in dataclasses.fields(cls) for old in f.metadata["renamed_from"]}

    @classmethod
    def check_value(
        cls, key: str, value: Any, *, name: str | None = None, text: bool = False
    ) -> Any:
        """``value`` checked by the check of setting ``key`` and named ``name`` (default:
        ``key``), strictly unless ``text``: how a constructor checks a keyword that is also
        this setting (``LoRATrainer(lr=...)``, ``MultiUserLoRA(share=...)``), so the Python
        API and the configs accept the same values."""
        check = _field(cls, key).metadata["check"]
        return check(key if name is None else name, value, text=text)


@functools.cache
def _fields_of(cls: type[Section]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _field(cls: type[Section], key: str) -> dataclasses.Field:
    return _fields_of(cls)[key]  # type: ignore[arg-type]  # a class is hashable


def _check_values(cls: type[Section], values: Mapping[str, Any], section: str) -> dict[str, Any]:
    """``values`` (every field of ``cls``) checked, named ``section.key``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = f"{section}.{f.name}" if section else f.name
        value = values[f.name]
        if value is None:
            if f.metadata["required"]:
                raise ConfigError(f"{name} is required ({f.metadata['required']})")
            if default_of(f) is not None and not cls.CHECK_NULLS:
                raise ConfigError(
                    f"{name} may not be null (leave it out to use its default, "
                    f"{show(default_of(f))})"
                )
        out[f.name] = f.metadata["check"](name, value)
    cls._cross_check(out, section)
    return out


# ------------------------------------------------------------------ top-level settings
@dataclass(frozen=True)
class Setting:
    """A top-level setting of a job config (``out``): a default, a help text, a check."""

    default: Any
    help: str = ""
    check: Callable[[str, Any], Any] = field(default=check_string)


def _top(value: Any) -> Setting:
    return value if isinstance(value, Setting) else Setting(value)


# ------------------------------------------------------------------ the resolver
def resolve_sections(
    config: Any,
    sections: Mapping[str, type[Section]],
    *,
    top_level: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check a job config and fill in the defaults.

    ``sections`` maps a section name to its dataclass; ``top_level`` maps every other key to
    its default (checked as a non-empty string) or a :class:`Setting`. Returns the sections'
    instances and the top-level values, in that order. Refused with a :class:`ConfigError`: a
    config that is not a mapping, unknown keys (a renamed one with its new name), bad values
    (named ``section.key``) and an explicit ``null`` for a setting whose default is not null.
    A section written as ``null`` means all its defaults; ``model: PATH`` means
    ``model: {name_or_path: PATH}`` (the section class's ``SHORTHAND``); each section is read
    by :meth:`Section.from_dict`. A ``package:PATH`` string is the path of a file shipped with
    pluralign (:func:`pluralign._packaged.resolve_package_paths`).
    """
    from pluralign._packaged import resolve_package_paths

    top = {key: _top(value) for key, value in (top_level or {}).items()}
    if not isinstance(config, Mapping):
        raise ConfigError(f"a job config must be a mapping, got {show(config)}")
    config = resolve_package_paths(dict(config))
    valid = [*sections, *top]
    unknown = sorted(set(config) - set(valid), key=str)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; valid: {', '.join(valid)}")
    out: dict[str, Any] = {}
    for name, cls in sections.items():
        out[name] = cls.from_dict(config.get(name), name=name)
    for key, spec in top.items():
        out[key] = spec.check(key, config[key]) if key in config else spec.default
    return out


def to_plain(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved config as plain mappings (YAML / JSON), sections in their field order."""
    return {
        key: value.to_dict()
        if isinstance(value, Section)
        else dataclasses.asdict(value)  # type: ignore[arg-type]  # an instance
        if dataclasses.is_dataclass(value)
        else value
        for key, value in resolved.items()
    }


def describe(
    sections: Mapping[str, type[Section]], top_level: Mapping[str, Any] | None = None
) -> list[tuple[str, Any, str]]:
    """``(section.key, default, help)`` of every setting, in config order (for docs and
    listings); a required setting's help starts with ``required:``."""
    rows = []
    for name, cls in sections.items():
        for f in dataclasses.fields(cls):
            text = f.metadata["help"]
            if f.metadata["required"]:
                text = f"required: {text}"
            rows.append((f"{name}.{f.name}", default_of(f), text))
    for key, value in (top_level or {}).items():
        spec = _top(value)
        rows.append((key, spec.default, spec.help))
    return rows


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def settings_table(
    sections: Mapping[str, type[Section]], top_level: Mapping[str, Any] | None = None
) -> str:
    """:func:`describe` as a Markdown table ``key | default | meaning``."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, text in describe(sections, top_level):
        cell = text.replace("|", "\\|")
        lines.append(f"| `{key}` | `{_yaml_value(default)}` | {cell} |")
    return "\n".join(lines) + "\n"
