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
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Mapping
from typing import Any

from pluralign.errors import ConfigError
from pluralign.experiments.base import (
    MAX_REPEATS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SETTINGS,
    Constraint,
    show,
)
from pluralign.experiments.registry import get_experiment

__all__ = ["TOP_LEVEL_KEYS", "resolve_config", "spec_table"]

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


def _unknown(kind: str, given: object, valid: object) -> ConfigError:
    return ConfigError(f"unknown {kind} {show(given)}; valid: {', '.join(map(str, valid))}")


def _positive_int(key: str, value: object, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ConfigError(f"{key!r} must be a positive integer ≤ {limit:_}, got {show(value)}")
    return value


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


def _coerce(key: str, value: Any, default: Any) -> Any:
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
        return [_coerce(key, v, default[0]) for v in value]
    if isinstance(default, str) and not isinstance(value, str):
        raise refuse()
    return value


def _resolve_mapping(
    section: str,
    given: Mapping[Any, Any],
    defaults: Mapping[str, Any],
    spec: Mapping[str, Constraint],
) -> dict[str, Any]:
    """``given`` with defaults filled in, each value converted and checked against ``spec``."""
    out = {}
    for key, default in defaults.items():
        value = given.get(key, default)
        constraint = spec.get(key)
        nullable = getattr(constraint, "nullable", False)
        if value is None and (nullable or (default is None and constraint is None)):
            out[key] = None
        else:
            out[key] = _coerce(f"{section}.{key}", value, 0.0 if default is None else default)
    for key, constraint in spec.items():
        if key in out:
            constraint.check(f"{section}.{key}", out[key], out)
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def spec_table(experiment: Any) -> str:
    """The Markdown table of an experiment's keys, defaults and allowed values (generated from
    its ``env_spec`` / ``option_spec``; docs/experiments.md holds a copy, checked by a test)."""
    lines = [f"| `{experiment.name}` key | default | allowed |", "| --- | --- | --- |"]
    for section, defaults, spec in (
        ("env", experiment.env_defaults, experiment.env_spec),
        ("options", experiment.option_defaults, experiment.option_spec),
    ):
        for key, default in defaults.items():
            text = json.dumps(default)
            allowed = spec[key].describe() if key in spec else "anything"
            lines.append(f"| `{section}.{key}` | `{text}` | {allowed} |")
    return "\n".join(lines) + "\n"


def _expand_sweep(envs: list[dict[str, Any]], sweep: Any, valid: Any) -> list[dict[str, Any]]:
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
                    raise _unknown("sweep parameter", key, valid)
                if not isinstance(values, list) or not values:
                    raise ConfigError(f"sweep.{key} must be a non-empty list of values")
            keys = list(grid)
            for combo in itertools.product(*(grid[k] for k in keys)):
                out.append({**env, **dict(zip(keys, combo, strict=True))})
    return out


def resolve_config(config: dict[str, Any], *, quick: bool = False) -> dict[str, Any]:
    """Validate ``config`` and fill in defaults; return the fully resolved config.

    The resolved config is what ``config.yaml`` in the output folder records: re-running it
    gives the same results.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {show(config)}")
    try:
        config = copy.deepcopy(config)
    except RecursionError:
        raise ConfigError("the config is nested too deeply") from None
    for key in config:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown("config key", key, TOP_LEVEL_KEYS)
    name = config.get("experiment", "loco")
    experiment = get_experiment(name)
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

    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"'seed' must be an integer in [0, 2^63 − 1], got {show(seed)}")
    repeats = _positive_int("repeats", config.get("repeats", 1), MAX_REPEATS)

    envs = config.get("env", {})
    envs = [envs] if isinstance(envs, dict) else envs
    if not isinstance(envs, list) or not envs or not all(isinstance(e, dict) for e in envs):
        raise ConfigError("'env' must be a mapping, or a non-empty list of mappings")
    if len(envs) > MAX_SETTINGS:
        raise ConfigError(
            f"'env' lists {len(envs):_} settings; at most {MAX_SETTINGS:_} are allowed"
        )
    if config.get("sweep") is not None:
        envs = _expand_sweep(envs, config["sweep"], experiment.env_defaults)
    resolved_envs = []
    seen: set[str] = set()
    for env in envs:
        for key in env:
            if key not in experiment.env_defaults:
                raise _unknown("env parameter", key, experiment.env_defaults)
        resolved = _resolve_mapping("env", env, experiment.env_defaults, experiment.env_spec)
        if config.get("sweep") is not None:  # grids of a sweep may share settings: keep each once
            canonical = _canonical(resolved)
            if canonical in seen:
                continue
            seen.add(canonical)
        resolved_envs.append(resolved)
    first: dict[str, int] = {}
    for index, env in enumerate(resolved_envs):
        setting = experiment.describe_setting(env)
        if setting in first:
            raise ConfigError(
                f"env settings {first[setting]} and {index} are the same (or "
                f"differ only in parameters the setting name omits): {setting!r}"
            )
        first[setting] = index

    n_samples = config.get("n_samples", list(experiment.default_n_samples))
    if isinstance(n_samples, int):
        n_samples = [n_samples]
    if not isinstance(n_samples, list) or not n_samples:
        raise ConfigError("'n_samples' must be a non-empty list of positive integers")
    n_samples = sorted({_positive_int("n_samples", n, MAX_SAMPLES) for n in n_samples})

    methods = config.get("methods", list(experiment.methods))
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods:
        raise ConfigError("'methods' must be a non-empty list")
    for method in methods:
        if not isinstance(method, str) or method not in experiment.methods:
            raise _unknown("method", method, experiment.methods)

    options = config.get("options", {}) or {}
    if not isinstance(options, dict):
        raise ConfigError("'options' must be a mapping")
    for key in options:
        if key not in experiment.option_defaults:
            raise _unknown("option", key, experiment.option_defaults)
    options = _resolve_mapping(
        "options", options, experiment.option_defaults, experiment.option_spec
    )

    resolved_config = {
        "experiment": name,
        "seed": seed,
        "repeats": repeats,
        "env": resolved_envs,
        "n_samples": n_samples,
        "methods": list(dict.fromkeys(methods)),
        "options": options,
    }
    if experiment.check_config is not None:
        experiment.check_config(resolved_config)
    return resolved_config
