"""Experiment configurations: validation against the experiment's schema, and resolution
(reading a config file is :func:`pluralign.configfile.load_config`).

A config is a YAML mapping::

    experiment: loco          # which experiment (see ``pluralign.experiments.registry``)
    seed: 0                   # every random draw derives from it
    repeats: 20               # independent truths + data sets per setting
    env: {d_x: 20, ...}       # simulator parameters; a list of mappings sweeps several settings
    n_samples: [500, 2000]    # offline sample sizes N
    methods: [prs, ...]       # subset of the experiment's methods
    options: {l2: 1e-4}       # method hyper-parameters (experiment-specific, validated)
    quick: {repeats: 2}       # overrides applied by ``--quick``
    sweep: {diversity: [0, 1]}  # optional: grid(s) of env parameters, see below

``sweep`` (optional) expands ``env``: a mapping ``{param: [values]}`` replaces each env setting
by the Cartesian product of those values over it; a list of such mappings concatenates their
expansions (e.g. one grid over ``diversity`` and one over ``n_users``, both around the same base
setting). Settings that resolve to the same parameters are kept once. The resolved config lists
the expanded ``env`` settings and no ``sweep``, so resolving it again gives the same config.

Unknown keys, env parameters, options and methods raise :class:`~pluralign.errors.ConfigError`
listing the valid ones. Every value is converted to its default's type and checked against the
experiment's declared constraint (``env_spec`` / ``option_spec``, see
:class:`~pluralign.experiments.base.Range`), so a bad value is refused here, with its key
named, and never reaches a simulator or a solver.

**Typed.** A config is read into a :class:`RunConfig` (a :class:`~pluralign.settings.Section`:
its top-level settings are fields, checked when it is built, in Python too) holding one typed
env section per setting and a typed options section (the experiment's
:attr:`~pluralign.experiments.base.Experiment.env_section` / ``option_section``, generated from
its declarations). :func:`resolve_config` is ``RunConfig.from_dict(config).to_dict()``: the
plain mapping the runner reads and ``config.yaml`` records.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pluralign.errors import ConfigError
from pluralign.experiments.base import (
    MAX_REPEATS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SETTINGS,
    ExperimentSection,
    show,
)
from pluralign.experiments.registry import get_experiment
from pluralign.settings import Section, default_of, setting

__all__ = ["EXPERIMENT_DEFAULT", "TOP_LEVEL_KEYS", "RunConfig", "resolve_config", "spec_table"]

TOP_LEVEL_KEYS = (
    "experiment",
    "seed",
    "repeats",
    "env",
    "n_samples",
    "methods",
    "options",
    "quick",
    "sweep",
)


def _unknown(
    kind: str, given: object, valid: Iterable[object], renamed: Mapping[str, str] | None = None
) -> ConfigError:
    """An unknown key, refused with the valid ones (or with its new name if ``renamed``, the
    experiment's older names of a section's keys, lists it)."""
    if renamed and isinstance(given, str) and given in renamed:
        return ConfigError(f"unknown {kind} {show(given)}: renamed to {renamed[given]!r}")
    return ConfigError(f"unknown {kind} {show(given)}; valid: {', '.join(map(str, valid))}")


def _positive_int(key: str, value: object, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ConfigError(f"{key!r} must be a positive integer ≤ {limit:_}, got {show(value)}")
    return value


class _ExperimentDefault:
    """The default of ``n_samples`` and ``methods``: the experiment's own."""

    def __repr__(self) -> str:
        return "the experiment's default"

    __str__ = __repr__


EXPERIMENT_DEFAULT: Any = _ExperimentDefault()


# ------------------------------------------------------------------ checks of the fields
def _check_experiment(name: str, value: Any, *, text: bool = True) -> str:
    get_experiment(value)  # refuses an unknown name, listing the registered ones
    return value


def _check_seed(name: str, value: Any, *, text: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"'seed' must be an integer in [0, 2^63 − 1], got {show(value)}")
    return value


def _check_repeats(name: str, value: Any, *, text: bool = True) -> int:
    return _positive_int("repeats", value, MAX_REPEATS)


def _as_given(name: str, value: Any, *, text: bool = True) -> Any:
    """The check of a field that depends on the experiment: it is checked across the fields
    (:meth:`RunConfig._cross_check`)."""
    return value


# ------------------------------------------------------------------ the run config
@dataclass(frozen=True)
class RunConfig(Section):
    """The config of ``pluralign run``: which experiment, its env settings, sample sizes,
    methods and options (the module docstring). Built by :meth:`from_dict` from a config file's
    mapping, or in Python (``RunConfig(experiment="gshf", n_samples=[3])``); either way every
    field is checked, in the order of the fields, with the error messages of
    :func:`resolve_config`. ``env`` holds the experiment's typed env sections (a ``sweep``
    given is expanded into them and is then ``None``), ``options`` its typed options."""

    SECTION: ClassVar[str] = ""
    CHECK_NULLS: ClassVar[bool] = True

    experiment: str = setting(
        "loco", "which experiment (see `pluralign.experiments.registry`)", _check_experiment
    )
    seed: int = setting(0, "every random draw derives from it", _check_seed)
    repeats: int = setting(1, "independent truths + data sets per setting", _check_repeats)
    # checked across the fields, once the experiment is known (_cross_check): given as a
    # config holds them, resolved to typed sections and sorted, deduplicated lists
    env: Sequence[ExperimentSection] = setting(
        {}, "simulator parameters; a list of mappings sweeps several settings", _as_given
    )
    n_samples: Sequence[int] = setting(
        EXPERIMENT_DEFAULT, "offline sample sizes N (sorted, each once)", _as_given
    )
    methods: Sequence[str] = setting(
        EXPERIMENT_DEFAULT, "subset of the experiment's methods", _as_given
    )
    options: ExperimentSection = setting(  # noqa: RUF009 (a frozen section, copied default)
        {}, "method hyper-parameters (experiment-specific, validated)", _as_given
    )
    sweep: Mapping[str, Any] | None = setting(
        None, "grid(s) of env parameters expanding `env` (resolved: null)", _as_given
    )

    @classmethod
    def from_dict(cls, given: Any, *, name: str | None = None, quick: bool = False) -> RunConfig:
        """The run config of the mapping ``given`` (a config file), with the ``quick``
        overrides applied when ``quick`` (they are checked either way)."""
        if not isinstance(given, dict):
            raise ConfigError(f"a config must be a mapping of keys to values, got {show(given)}")
        try:
            config = copy.deepcopy(given)
        except RecursionError:
            raise ConfigError("the config is nested too deeply") from None
        for key in config:
            if key not in TOP_LEVEL_KEYS:
                raise _unknown("config key", key, TOP_LEVEL_KEYS)
        get_experiment(config.get("experiment", "loco"))
        overrides = config.pop("quick", None) or {}
        if not isinstance(overrides, dict):
            raise ConfigError("'quick' must be a mapping of overrides")
        for key in overrides:  # checked with or without --quick: a typo fails early
            if key not in TOP_LEVEL_KEYS or key in ("quick", "experiment"):
                raise _unknown(
                    "quick override",
                    key,
                    [k for k in TOP_LEVEL_KEYS if k not in ("quick", "experiment")],
                )
        if quick:
            config.update(overrides)
        return cls(**config)

    @classmethod
    def _cross_check(cls, values: dict[str, Any], section: str) -> None:
        experiment = get_experiment(values["experiment"])
        sweep = values["sweep"]
        envs = values["env"]
        envs = [envs] if isinstance(envs, dict | ExperimentSection) else envs
        if not isinstance(envs, list) or not envs or not all(_is_env(e) for e in envs):
            raise ConfigError("'env' must be a mapping, or a non-empty list of mappings")
        if len(envs) > MAX_SETTINGS:
            raise ConfigError(
                f"'env' lists {len(envs):_} settings; at most {MAX_SETTINGS:_} are allowed"
            )
        envs = [e.to_dict() if isinstance(e, ExperimentSection) else e for e in envs]
        if sweep is not None:
            envs = _expand_sweep(
                envs, sweep, experiment.env_defaults, experiment.renamed.get("env")
            )
        sections, plain = [], []
        seen: set[str] = set()
        for env in envs:
            resolved = experiment.env_section.from_dict(env)
            as_dict = resolved.to_dict()
            if sweep is not None:  # grids of a sweep may share settings: keep each once
                canonical = _canonical(as_dict)
                if canonical in seen:
                    continue
                seen.add(canonical)
            sections.append(resolved)
            plain.append(as_dict)
        first: dict[str, int] = {}
        for index, env in enumerate(plain):
            name = experiment.describe_setting(env)
            if name in first:
                raise ConfigError(
                    f"env settings {first[name]} and {index} are the same (or "
                    f"differ only in parameters the setting name omits): {name!r}"
                )
            first[name] = index

        n_samples = values["n_samples"]
        if n_samples is EXPERIMENT_DEFAULT:
            n_samples = list(experiment.default_n_samples)
        if isinstance(n_samples, int):
            n_samples = [n_samples]
        if not isinstance(n_samples, list) or not n_samples:
            raise ConfigError("'n_samples' must be a non-empty list of positive integers")
        n_samples = sorted({_positive_int("n_samples", n, MAX_SAMPLES) for n in n_samples})

        methods = values["methods"]
        if methods is EXPERIMENT_DEFAULT:
            methods = list(experiment.methods)
        if isinstance(methods, str):
            methods = [methods]
        if not isinstance(methods, list) or not methods:
            raise ConfigError("'methods' must be a non-empty list")
        for method in methods:
            if not isinstance(method, str) or method not in experiment.methods:
                raise _unknown("method", method, experiment.methods)

        options = values["options"] or {}
        if isinstance(options, ExperimentSection):
            options = options.to_dict()
        if not isinstance(options, dict):
            raise ConfigError("'options' must be a mapping")
        option_section = experiment.option_section.from_dict(options)

        values.update(
            env=sections,
            n_samples=n_samples,
            methods=list(dict.fromkeys(methods)),
            options=option_section,
            sweep=None,
        )
        if experiment.check_config is not None:
            experiment.check_config(
                {
                    "experiment": values["experiment"],
                    "seed": values["seed"],
                    "repeats": values["repeats"],
                    "env": plain,
                    "n_samples": n_samples,
                    "methods": values["methods"],
                    "options": option_section.to_dict(),
                }
            )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain mappings (what ``config.yaml`` records): every field
        but ``sweep`` (expanded into ``env``), in field order."""
        return {
            "experiment": self.experiment,
            "seed": self.seed,
            "repeats": self.repeats,
            "env": [env.to_dict() for env in self.env],
            "n_samples": list(self.n_samples),
            "methods": list(self.methods),
            "options": self.options.to_dict(),
        }


def _is_env(value: Any) -> bool:
    return isinstance(value, dict | ExperimentSection)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def spec_table(experiment: Any) -> str:
    """The Markdown table of an experiment's keys, defaults and allowed values (generated from
    its typed sections, themselves generated from its ``env_spec`` / ``option_spec``;
    docs/experiments.md holds a copy, checked by a test)."""
    lines = [f"| `{experiment.name}` key | default | allowed |", "| --- | --- | --- |"]
    for section, cls in (("env", experiment.env_section), ("options", experiment.option_section)):
        for f in dataclasses.fields(cls):
            text = json.dumps(default_of(f))
            constraint = f.metadata["constraint"]
            allowed = constraint.describe() if constraint is not None else "anything"
            lines.append(f"| `{section}.{f.name}` | `{text}` | {allowed} |")
    return "\n".join(lines) + "\n"


def _expand_sweep(
    envs: list[dict[str, Any]],
    sweep: Any,
    valid: Mapping[str, Any],
    renamed: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The env settings of a ``sweep``: per grid, the Cartesian product over each base env."""
    grids = [sweep] if isinstance(sweep, dict) else sweep
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) for g in grids):
        raise ConfigError("'sweep' must be a mapping {param: [values]} or a list of them")
    size = 0
    for grid in grids:
        size += math.prod(len(v) if isinstance(v, list) else 1 for v in grid.values())
    if len(envs) * size > MAX_SETTINGS:
        raise ConfigError(
            f"the sweep expands to {len(envs) * size:_} env settings; at most "
            f"{MAX_SETTINGS:_} are allowed"
        )
    out = []
    for env in envs:
        for grid in grids:
            for key, values in grid.items():
                if key not in valid:
                    raise _unknown("sweep parameter", key, valid, renamed)
                if not isinstance(values, list) or not values:
                    raise ConfigError(f"sweep.{key} must be a non-empty list of values")
            keys = list(grid)
            for combo in itertools.product(*(grid[k] for k in keys)):
                out.append({**env, **dict(zip(keys, combo, strict=True))})
    return out


def resolve_config(config: dict[str, Any], *, quick: bool = False) -> dict[str, Any]:
    """Validate ``config`` and fill in defaults; return the fully resolved config.

    The resolved config is what ``config.yaml`` in the output folder records: re-running it
    gives the same results. It is :meth:`RunConfig.from_dict` as plain mappings.
    """
    return RunConfig.from_dict(config, quick=quick).to_dict()
