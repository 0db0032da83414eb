"""The configs and data files shipped inside the package (``pluralign/configs``).

A config refers to a shipped data file as ``package:PATH``, a path under the packaged configs
folder (``pluralign/configs/PATH``, e.g. ``package:data/personas.jsonl``); it is replaced by
its absolute path before a job reads the config (:func:`resolve_package_paths`, applied by
:func:`pluralign.configfile.load_config` and by every job's config resolver), so the
packaged configs run from any working directory. (``builtin:NAME`` prompt sets of iterate
configs are a different thing, built in code: :mod:`pluralign.llm.pairs`.)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "PACKAGE_PREFIX",
    "packaged_config_names",
    "packaged_configs_dir",
    "resolve_package_paths",
]

PACKAGE_PREFIX = "package:"


def packaged_configs_dir() -> Path:
    """The folder of the packaged configs (and of their data files, under ``data/``)."""
    return Path(str(resources.files("pluralign") / "configs"))


def packaged_config_names() -> list[str]:
    """The names of the packaged configs (``loco``, ``rm_personas``, ...), sorted."""
    return sorted(p.stem for p in packaged_configs_dir().glob("*.yaml"))


# deeper than any config (sections → settings → lists); also where a self-referencing YAML
# alias (``&a [*a]``) stops
MAX_DEPTH = 32


def resolve_package_paths(config: Any, key: str = "", depth: int = 0) -> Any:
    """``config`` with every string ``package:PATH`` replaced by the absolute path of the
    packaged file ``pluralign/configs/PATH`` (which must exist; no ``..``, no absolute PATH).
    A config nested deeper than :data:`MAX_DEPTH` (or referring to itself) is refused."""
    from pluralign.errors import ConfigError

    if isinstance(config, dict | list) and depth > MAX_DEPTH:
        raise ConfigError(
            f"{key or 'config'}: nested more than {MAX_DEPTH} levels deep (or refers to itself)"
        )
    if isinstance(config, dict):
        return {
            k: resolve_package_paths(v, f"{key}.{k}" if key else str(k), depth + 1)
            for k, v in config.items()
        }
    if isinstance(config, list):
        return [resolve_package_paths(v, f"{key}[{i}]", depth + 1) for i, v in enumerate(config)]
    if not isinstance(config, str) or not config.startswith(PACKAGE_PREFIX):
        return config
    relative = Path(config[len(PACKAGE_PREFIX) :])
    root = packaged_configs_dir()
    path = root / relative
    if not relative.parts or relative.is_absolute() or ".." in relative.parts or not path.is_file():
        shipped = sorted(str(p.relative_to(root)) for p in root.glob("data/*") if p.is_file())
        raise ConfigError(
            f"{key or 'config'}: {config!r} is not a packaged file; "
            f"package:PATH is a file under {root}, e.g. "
            + ", ".join(PACKAGE_PREFIX + s for s in shipped)
        )
    return str(path)
