"""Experiments, their configs and the sweep runner (DESIGN §7)."""

from pluralign.experiments.base import Experiment, Unit, UnitContext
from pluralign.experiments.gshf import GSHF
from pluralign.experiments.loco import LOCO
from pluralign.experiments.multi_user import MULTI_USER

EXPERIMENTS: dict[str, Experiment] = {LOCO.name: LOCO, GSHF.name: GSHF, MULTI_USER.name: MULTI_USER}

from pluralign.experiments.config import load_config, resolve_config  # noqa: E402
from pluralign.experiments.runner import read_results, run_experiment  # noqa: E402

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "Unit",
    "UnitContext",
    "load_config",
    "read_results",
    "resolve_config",
    "run_experiment",
]
