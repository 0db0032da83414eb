"""The registry of experiments: experiment name → :class:`~pluralign.experiments.base.Experiment`.

Each experiment's package registers its :class:`Experiment` when it is imported
(``LOCO = register(Experiment(...))`` in :mod:`pluralign.experiments.loco`), and
:mod:`pluralign.experiments` imports every experiment's package, so the registry is complete as
soon as any module of :mod:`pluralign.experiments` has been imported (Python imports a package
before its modules). The config resolver and the runner look experiments up here; nothing here
imports an experiment, so an experiment's own modules may use the registry too.
"""

from __future__ import annotations

from pluralign.errors import ConfigError
from pluralign.experiments.base import Experiment, show

__all__ = ["EXPERIMENTS", "experiment_names", "get_experiment", "register"]

EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add ``experiment`` under its ``name`` (a name is registered once) and return it."""
    if experiment.name in EXPERIMENTS and EXPERIMENTS[experiment.name] is not experiment:
        raise ValueError(f"an experiment named {experiment.name!r} is already registered")
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def experiment_names() -> list[str]:
    """The registered experiments' names, sorted (what a config's ``experiment`` may be)."""
    return sorted(EXPERIMENTS)


def get_experiment(name: object) -> Experiment:
    """The experiment registered as ``name``; a :class:`~pluralign.errors.ConfigError` listing
    the valid names if there is none."""
    if not isinstance(name, str) or name not in EXPERIMENTS:
        raise ConfigError(
            f"unknown experiment {show(name)}; valid: {', '.join(experiment_names())}"
        )
    return EXPERIMENTS[name]
