"""Read a YAML config file: the one reader of every config a user hands pluralign (experiment
sweeps, LLM jobs), before any validation against a schema.

It sits below the experiments, the LLM jobs and the CLI, which all read configs through it;
checking a config against its schema is each reader's own job (e.g.
:func:`pluralign.experiments.config.resolve_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pluralign._packaged import resolve_package_paths
from pluralign._parse import read_yaml_file
from pluralign.errors import ConfigError

__all__ = ["load_config"]


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (not yet validated) with :mod:`pluralign._parse`'s strict
    reader: UTF-8 only, no duplicate keys, bounded nesting and integers, safe tags only;
    ``package:PATH`` strings become the paths of the shipped files
    (:func:`pluralign._packaged.resolve_package_paths`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    config = read_yaml_file(path, error=ConfigError)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return resolve_package_paths(config)
