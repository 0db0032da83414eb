"""Experiment configurations: loading, validation against the experiment's schema, resolution.

A config is a YAML mapping::

    experiment: loco          # which experiment (see ``pluralign.experiments.EXPERIMENTS``)
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
listing the valid ones.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import yaml

from pluralign.errors import ConfigError

__all__ = ["TOP_LEVEL_KEYS", "load_config", "resolve_config"]

TOP_LEVEL_KEYS = ("experiment", "seed", "repeats", "env", "n_samples", "methods", "options",
                  "quick", "sweep")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (not yet validated)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return config


def _unknown(kind: str, given: object, valid: object) -> ConfigError:
    return ConfigError(f"unknown {kind} {given!r}; valid: {', '.join(map(str, valid))}")


def _positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key!r} must be a positive integer, got {value!r}")
    return value


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Give ``value`` the type of ``default`` (YAML reads ``1e-4`` as a string), or refuse."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or int(value) != float(value):
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(default, list):
            if not isinstance(value, list | tuple) or not value:
                raise TypeError
            return [_coerce(key, v, default[0]) for v in value]
        if isinstance(default, str) and not isinstance(value, str):
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key!r} must be like the default {default!r}, got {value!r}"
        ) from None
    return value


def _expand_sweep(envs: list[dict[str, Any]], sweep: Any, valid: Any) -> list[dict[str, Any]]:
    """The env settings of a ``sweep``: per grid, the Cartesian product over each base env."""
    grids = [sweep] if isinstance(sweep, dict) else sweep
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) for g in grids):
        raise ConfigError("'sweep' must be a mapping {param: [values]} or a list of them")
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
    from pluralign.experiments import EXPERIMENTS

    config = copy.deepcopy(config)
    for key in config:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown("config key", key, TOP_LEVEL_KEYS)
    name = config.get("experiment", "loco")
    if name not in EXPERIMENTS:
        raise _unknown("experiment", name, sorted(EXPERIMENTS))
    experiment = EXPERIMENTS[name]
    overrides = config.pop("quick", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError("'quick' must be a mapping of overrides")
    if quick:
        for key in overrides:
            if key not in TOP_LEVEL_KEYS or key in ("quick", "experiment"):
                raise _unknown("quick override", key,
                               [k for k in TOP_LEVEL_KEYS if k not in ("quick", "experiment")])
        config.update(copy.deepcopy(overrides))

    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"'seed' must be a non-negative integer, got {seed!r}")
    repeats = _positive_int("repeats", config.get("repeats", 1))

    envs = config.get("env", {})
    envs = [envs] if isinstance(envs, dict) else envs
    if not isinstance(envs, list) or not envs or not all(isinstance(e, dict) for e in envs):
        raise ConfigError("'env' must be a mapping, or a non-empty list of mappings")
    if config.get("sweep") is not None:
        envs = _expand_sweep(envs, config["sweep"], experiment.env_defaults)
    resolved_envs = []
    for env in envs:
        for key in env:
            if key not in experiment.env_defaults:
                raise _unknown("env parameter", key, experiment.env_defaults)
        resolved_envs.append(
            {k: _coerce(f"env.{k}", env.get(k, d), d) for k, d in experiment.env_defaults.items()}
        )
    if config.get("sweep") is not None:  # grids of a sweep may share settings: keep each once
        resolved_envs = [e for i, e in enumerate(resolved_envs) if e not in resolved_envs[:i]]
    names = [experiment.describe_setting(env) for env in resolved_envs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two env settings are the same (or differ only in parameters the "
                          f"setting name omits): {names}")

    n_samples = config.get("n_samples", list(experiment.default_n_samples))
    if isinstance(n_samples, int):
        n_samples = [n_samples]
    if not isinstance(n_samples, list) or not n_samples:
        raise ConfigError("'n_samples' must be a non-empty list of positive integers")
    n_samples = sorted({_positive_int("n_samples", n) for n in n_samples})

    methods = config.get("methods", list(experiment.methods))
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods:
        raise ConfigError("'methods' must be a non-empty list")
    for method in methods:
        if method not in experiment.methods:
            raise _unknown("method", method, experiment.methods)

    options = config.get("options", {}) or {}
    if not isinstance(options, dict):
        raise ConfigError("'options' must be a mapping")
    for key in options:
        if key not in experiment.option_defaults:
            raise _unknown("option", key, experiment.option_defaults)
    options = {k: _coerce(f"options.{k}", options.get(k, d), d)
               for k, d in experiment.option_defaults.items()}

    return {
        "experiment": name,
        "seed": seed,
        "repeats": repeats,
        "env": resolved_envs,
        "n_samples": n_samples,
        "methods": list(dict.fromkeys(methods)),
        "options": options,
    }
