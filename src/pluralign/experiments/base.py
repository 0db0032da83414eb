"""What an experiment is: a schema (env parameters, options, methods) and a unit of work.

A *unit* is one ``(setting, n, repeat)``: it builds the simulator for that setting and repeat,
draws the data, and evaluates every requested method on it, returning one row per method.
Methods of a unit share fitted models through :class:`UnitContext` (e.g. PRS, pointwise PRS and
low-rank greedy share one low-rank fit).

A method may instead return a *curve*: a list of metric dicts, each with its own ``"n"`` (the
x value, e.g. the round of an online loop). Each point becomes a row whose ``n`` is that x value,
with ``unit_n`` (the unit's ``n``, which keys resuming) and ``unit_rows`` (the unit's row count,
so that a unit cut short mid-write is recomputed). A point may carry its own ``fit_seconds``.

Every env parameter and option is declared with a default *and* a constraint (:class:`Range`
or :class:`Choice`, in ``env_spec`` / ``option_spec``). From these declarations each
:class:`Experiment` generates its two typed config sections (:func:`schema_section`: an
:class:`ExperimentSection` on :mod:`pluralign.settings`, one field per key), which
:func:`pluralign.experiments.config.resolve_config` builds for every env setting and the
options: building one converts each value to its default's type (:func:`coerce`) and then
checks its constraint, so a config is refused when it is resolved, with the key named, never
midway through a run.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pluralign.errors import ConfigError
from pluralign.settings import Section, setting

__all__ = [
    "MAX_DIM",
    "MAX_ITER",
    "MAX_REPEATS",
    "MAX_SAMPLES",
    "MAX_SCALE",
    "MAX_SEED",
    "MAX_SETTINGS",
    "Choice",
    "Constraint",
    "Experiment",
    "ExperimentSection",
    "Range",
    "Unit",
    "UnitContext",
    "coerce",
    "schema_section",
    "show",
]

# Upper bounds of the sane sizes a config may ask for (documented in docs/experiments.md).
MAX_REPEATS = 10_000
MAX_SAMPLES = 10**8  # sample sizes, rounds, held-out and target sizes
MAX_DIM = 10_000  # feature dimensions, ranks, candidates per state, users
MAX_ITER = 10**7  # iteration caps
MAX_SETTINGS = 100_000  # env settings after a sweep's expansion
MAX_SEED = 2**63 - 1  # the largest integer pluralign's YAML reader takes
MAX_SCALE = 1e6  # magnitudes of simulator parameters (shifts, scales, temperatures)


def show(value: Any, limit: int = 80) -> str:
    """A short ``repr`` for error messages (a 5,000-digit int has no ``repr``: Python refuses
    to print an int past 4,300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    if isinstance(value, list | tuple | dict):
        text = f"<a {type(value).__name__} of {len(value)} item(s)>"
        try:
            full = repr(value)
        except (ValueError, RecursionError):
            return text
        return full if len(full) <= limit else text
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bound(value: float) -> str:
    if value == MAX_SAMPLES:
        return "10^8"
    if value == MAX_ITER:
        return "10^7"
    if value == MAX_SEED:
        return "2^63 − 1"
    if abs(value) == MAX_SCALE:
        return ("-" if value < 0 else "") + "10^6"
    return f"{value:,}".replace(",", "_") if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class Range:
    """A finite number in ``[lo, hi]`` (``lo_open`` / ``hi_open``: that end excluded; ``None``:
    unbounded). The number type is the default's: an ``int`` default takes whole numbers only.

    ``at_most`` names keys of the same mapping (the same env setting, or the options) the value
    may not exceed, e.g. a rank and the dimensions. For a list-valued key the constraint applies
    to every item, ``length = (min, max)`` bounds the list's length and ``nondecreasing`` asks
    for sorted items. ``nullable``: ``null`` is allowed (a number is then read as a float).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    at_most: tuple[str, ...] = ()
    length: tuple[int, int] | None = None
    nondecreasing: bool = False
    nullable: bool = False

    def describe(self) -> str:
        """The allowed values, e.g. ``(0, 1)``, ``[1, 10^8], ≤ d_x, d_phi``."""
        if self.lo is not None and self.hi is not None:
            text = (
                f"in {'(' if self.lo_open else '['}{_bound(self.lo)}, {_bound(self.hi)}"
                f"{')' if self.hi_open else ']'}"
            )
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '≥'} {_bound(self.lo)}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '≤'} {_bound(self.hi)}"
        else:
            text = "finite"
        if self.at_most:
            text += ", ≤ " + ", ".join(f"`{k}`" for k in self.at_most)
        if self.length is not None:
            lo, hi = self.length
            size = f"{lo}" if lo == hi else f"{lo}–{hi}"
            text = f"list of {size} values, each {text}"
            if self.nondecreasing:
                text += ", non-decreasing"
        if self.nullable:
            text += ", or null"
        return text

    def check(self, key: str, value: Any, mapping: Mapping[str, Any]) -> None:
        """Refuse ``value`` (already converted to the default's type) with the key named."""
        if value is None and self.nullable:
            return
        if self.length is not None:
            if not isinstance(value, list) or not self.length[0] <= len(value) <= self.length[1]:
                raise ConfigError(
                    f"{key!r} must be a {self.describe().replace('`', '')}, got {show(value)}"
                )
            for i, item in enumerate(value):
                self._check_number(f"{key}[{i}]", item, mapping)
            if self.nondecreasing and any(a > b for a, b in itertools.pairwise(value)):
                raise ConfigError(f"{key!r} must be non-decreasing, got {show(value)}")
            return
        self._check_number(key, value, mapping)

    def _check_number(self, key: str, value: Any, mapping: Mapping[str, Any]) -> None:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value)
        )
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            bounds = Range(self.lo, self.hi, self.lo_open, self.hi_open).describe()
            bounds = "a finite number" if bounds == "finite" else bounds
            raise ConfigError(f"{key!r} must be {bounds}, got {show(value)}")
        prefix = key.rpartition(".")[0]
        for other in self.at_most:
            limit = mapping.get(other)
            if isinstance(limit, int | float) and not isinstance(limit, bool) and value > limit:
                name = f"{prefix}.{other}" if prefix else other
                raise ConfigError(f"{key!r} must be ≤ {name!r} = {limit}, got {show(value)}")


@dataclass(frozen=True)
class Choice:
    """One of ``choices``."""

    choices: tuple[Any, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(
            f"`{str(c).lower() if isinstance(c, bool) else c}`" for c in self.choices
        )

    def check(self, key: str, value: Any, mapping: Mapping[str, Any]) -> None:
        if not any(type(value) is type(c) and value == c for c in self.choices):
            raise ConfigError(
                f"{key!r} must be {self.describe().replace('`', '')}, got {show(value)}"
            )


Constraint = Range | Choice


# ------------------------------------------------------------------ values and sections
def _number(value: Any) -> int | float | None:
    """``value`` as a finite int or float (a string is parsed), or ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:  # not an integer, or past Python's 4,300-digit limit
            pass
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None  # "1e999999" reads as inf
    return None


def coerce(key: str, value: Any, default: Any) -> Any:
    """Give ``value`` the type of ``default`` (YAML reads ``1e-4`` as a string), or refuse.

    Numbers must be finite (the string ``1e999999`` reads as inf and is refused); an int default
    takes whole numbers only (``2``, ``2.0``, ``"2"``, ``"1e3"``); a bool default takes a bool
    only; a list default takes a non-empty list of values like its first item. A mapping, list
    or ``null`` where a scalar is expected is refused. A ``None`` default takes anything.
    """

    def refuse() -> ConfigError:
        kind = (
            "true or false"
            if isinstance(default, bool)
            else "a whole number"
            if isinstance(default, int)
            else "a finite number"
            if isinstance(default, float)
            else "a non-empty list"
            if isinstance(default, list)
            else "a string"
        )
        return ConfigError(
            f"{key!r} must be {kind} like the default {show(default)}, got {show(value)}"
        )

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise refuse()
        return value
    if isinstance(default, int | float):
        number = _number(value)
        if number is None:
            raise refuse()
        if isinstance(default, int):
            if isinstance(number, float):
                if not number.is_integer():
                    raise refuse()
                number = int(number)
            return number
        try:
            return float(number)
        except OverflowError:  # an int past the float range
            raise refuse() from None
    if isinstance(default, list):
        if not isinstance(value, list | tuple) or not value:
            raise refuse()
        return [coerce(key, v, default[0]) for v in value]
    if isinstance(default, str) and not isinstance(value, str):
        raise refuse()
    return value


def _check_parameter(
    name: str, value: Any, *, default: Any, constraint: Constraint | None, text: bool = True
) -> Any:
    """The check of one experiment parameter (a :func:`~pluralign.settings.setting` check):
    ``null`` where the constraint is ``nullable`` (or where neither a default nor a constraint
    says what the value is), otherwise :func:`coerce` to the default's type (a ``None`` default:
    a float). The constraint itself is checked across the section
    (:meth:`ExperimentSection._cross_check`), since it may name other keys."""
    nullable = getattr(constraint, "nullable", False)
    if value is None and (nullable or (default is None and constraint is None)):
        return None
    return coerce(name, value, 0.0 if default is None else default)


_S = TypeVar("_S", bound="ExperimentSection")


@dataclass(frozen=True)
class ExperimentSection(Section):
    """A typed section of an experiment's config: the parameters of one env setting
    (``SECTION = "env"``) or the options (``"options"``). Each field is a parameter whose
    metadata holds its constraint (``None``: anything); building a section converts every value
    (:func:`coerce`; an explicit ``null`` is the check's to refuse) and then checks every
    constraint in field order, with the whole section at hand (``at_most`` names other keys).

    A section is generated from an experiment's declarations by :func:`schema_section`;
    :meth:`from_dict` refuses an unknown key naming ``KIND`` (``unknown env parameter 'dx';
    valid: ...``)."""

    CHECK_NULLS: ClassVar[bool] = True
    KIND: ClassVar[str] = "parameter"

    @classmethod
    def from_dict(cls: type[_S], given: Any, *, name: str | None = None) -> _S:
        """The section of the mapping ``given``, its missing keys at their defaults; the first
        unknown key (in the order given) is refused listing the valid ones."""
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"{name or cls.SECTION!r} must be a mapping, got {show(given)}")
        keys = cls.defaults()
        bad = [key for key in given if key not in keys]
        if bad:
            raise cls._unknown_keys(bad, name or cls.SECTION)
        return cls(**{**keys, **given})

    @classmethod
    def _unknown_keys(cls, bad: list[Any], name: str) -> ConfigError:
        valid = [f.name for f in dataclasses.fields(cls)]
        renames = cls.renames()
        if isinstance(bad[0], str) and bad[0] in renames:
            return ConfigError(f"unknown {cls.KIND} {show(bad[0])}: renamed to {renames[bad[0]]!r}")
        return ConfigError(f"unknown {cls.KIND} {show(bad[0])}; valid: {', '.join(valid)}")

    @classmethod
    def constraints(cls) -> dict[str, Constraint]:
        """The declared constraint of every parameter that has one, in field order."""
        return {
            f.name: f.metadata["constraint"]
            for f in dataclasses.fields(cls)
            if f.metadata["constraint"] is not None
        }

    @classmethod
    def _cross_check(cls, values: dict[str, Any], section: str) -> None:
        prefix = f"{section}." if section else ""
        for key, constraint in cls.constraints().items():
            constraint.check(f"{prefix}{key}", values[key], values)


@functools.cache
def _reserved() -> frozenset[str]:
    return frozenset(dir(ExperimentSection))


def schema_section(
    title: str,
    section: str,
    kind: str,
    defaults: Mapping[str, Any],
    spec: Mapping[str, Constraint],
    *,
    renamed: Mapping[str, str] | None = None,
) -> type[ExperimentSection]:
    """The :class:`ExperimentSection` of one section (``"env"`` or ``"options"``) of an
    experiment, generated from its declarations: a field per key of ``defaults`` (its default,
    the constraint in ``spec`` if any, the constraint's description as its help), so the
    declarations stay the one source of the defaults, the checks and the tables of the docs.
    ``title`` names the class (``loco.env``), ``kind`` the key in errors (``env parameter``)."""
    extra = [key for key in spec if key not in defaults]
    if extra:
        raise TypeError(f"{title}: constraints of undeclared keys {extra}")
    reserved = [key for key in defaults if key in _reserved() or not key.isidentifier()]
    if reserved:
        raise TypeError(f"{title}: keys {reserved} cannot be section fields")
    fields = []
    for key, default in defaults.items():
        constraint = spec.get(key)
        check = functools.partial(_check_parameter, default=default, constraint=constraint)
        help_text = constraint.describe() if constraint is not None else "anything"
        fields.append(
            (
                key,
                Any if default is None else type(default),
                setting(
                    default,
                    help_text,
                    check,
                    renamed_from=tuple(old for old, new in (renamed or {}).items() if new == key),
                    metadata={"constraint": constraint},
                ),
            )
        )
    cls = dataclasses.make_dataclass(
        "".join(part.title() for part in title.replace(".", "_").split("_")),
        fields,
        bases=(ExperimentSection,),
        frozen=True,
        namespace={"SECTION": section, "KIND": kind},
    )
    cls.__qualname__ = cls.__name__
    cls.__doc__ = f"The typed ``{section}`` section of the ``{title.split('.')[0]}`` experiment."
    return cls


@dataclass(frozen=True)
class Unit:
    """One cell of the sweep: setting index, sample size and repeat."""

    setting: int
    n: int
    repeat: int

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.setting, self.n, self.repeat)


@dataclass
class UnitContext:
    """Per-unit cache of fitted objects, with the seconds each took to build."""

    config: dict[str, Any]
    env_params: dict[str, Any]
    unit: Unit
    objects: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    @property
    def options(self) -> dict[str, Any]:
        return self.config["options"]

    def cached(self, name: str, build: Callable[[], Any]) -> Any:
        """Build ``name`` once per unit; its build time is charged to every method using it."""
        if name not in self.objects:
            start = time.perf_counter()
            self.objects[name] = build()
            self.seconds[name] = time.perf_counter() - start
        self.used.add(name)
        return self.objects[name]

    def seed(self, *stream: int) -> list[int]:
        """A seed for a random stream of this unit: ``[config seed, setting, repeat, *stream]``.

        It does not depend on ``n``, so data sets of different sizes are nested prefixes of one
        sample, and every method sees the same data.
        """
        return [self.config["seed"], self.unit.setting, self.unit.repeat, *stream]


@dataclass(frozen=True)
class Experiment:
    """An experiment's schema and its unit runner.

    ``methods`` maps each method name to a function ``(ctx) -> dict`` of metrics (or a list of
    them, one per x value; see the module docstring); it may read shared objects through
    ``ctx.cached``. ``run_unit`` wraps it, timing each method. ``x_label`` and ``logx`` describe
    the plot's x axis (the rows' ``n``). Optional hooks: ``extra_plots(summary, resolved_config,
    out_dir) -> [paths]`` writes experiment-specific plots after a run; ``claims(rows,
    resolved_config) -> [{"claim", "held", "detail"}]`` checks the experiment's claims (printed
    by ``pluralign run`` / ``report``); ``table_metrics``, the metrics of the printed table
    (default: all).

    ``env_spec`` / ``option_spec`` give every env parameter / option a :class:`Range` or
    :class:`Choice`, checked when a config is resolved; ``check_config(resolved)`` (optional)
    checks what relates sections (e.g. an option bounded by an env parameter) and raises
    :class:`~pluralign.errors.ConfigError`. ``env_section`` / ``option_section`` are the typed
    sections generated from these declarations (:func:`schema_section`).
    """

    name: str
    env_defaults: Mapping[str, Any]
    option_defaults: Mapping[str, Any]
    methods: Mapping[str, Callable[[UnitContext], dict[str, float] | list[dict[str, float]]]]
    default_n_samples: tuple[int, ...]
    metrics: tuple[str, ...]
    plot_metric: str
    describe_setting: Callable[[dict[str, Any]], str]
    x_label: str = "N (offline comparisons)"
    logx: bool = True
    extra_plots: Callable[..., list[Any]] | None = None
    claims: Callable[..., list[dict[str, Any]]] | None = None
    table_metrics: tuple[str, ...] | None = None
    env_spec: Mapping[str, Constraint] = field(default_factory=dict)
    option_spec: Mapping[str, Constraint] = field(default_factory=dict)
    check_config: Callable[[dict[str, Any]], None] | None = None
    renamed: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    env_section: type[ExperimentSection] = field(init=False, repr=False, compare=False)
    option_section: type[ExperimentSection] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for attribute, section, kind, defaults, spec in (
            ("env_section", "env", "env parameter", self.env_defaults, self.env_spec),
            ("option_section", "options", "option", self.option_defaults, self.option_spec),
        ):
            built = schema_section(
                f"{self.name}.{section}",
                section,
                kind,
                defaults,
                spec,
                renamed=self.renamed.get(section, {}),
            )
            object.__setattr__(self, attribute, built)

    def run_unit(self, config: dict[str, Any], unit: Unit) -> list[dict[str, Any]]:
        env_params = config["env"][unit.setting]
        ctx = UnitContext(config=config, env_params=env_params, unit=unit)
        rows: list[dict[str, Any]] = []
        curves = False
        for method in config["methods"]:
            ctx.used = set()
            built_before = set(ctx.seconds)
            start = time.perf_counter()
            result = self.methods[method](ctx)
            elapsed = time.perf_counter() - start
            # Charge each method the full cost of the shared objects it used, built now or
            # earlier in the unit, so fit_seconds does not depend on the order of methods.
            reused = sum(ctx.seconds[name] for name in ctx.used & built_before)
            if not isinstance(result, list):
                rows.append(
                    {
                        "setting": self.describe_setting(env_params),
                        "method": method,
                        "n": unit.n,
                        "repeat": unit.repeat,
                        **{k: float(v) for k, v in result.items()},
                        "fit_seconds": elapsed + reused,
                    }
                )
                continue
            curves = True
            for point in result:
                metrics = dict(point)
                x = metrics.pop("n")
                seconds = metrics.pop("fit_seconds", elapsed) + reused
                rows.append(
                    {
                        "setting": self.describe_setting(env_params),
                        "method": method,
                        "n": int(x),
                        "repeat": unit.repeat,
                        "unit_n": unit.n,
                        **{k: float(v) for k, v in metrics.items()},
                        "fit_seconds": float(seconds),
                    }
                )
        if curves:
            for row in rows:
                row["unit_rows"] = len(rows)
        return rows
