"""Experiments, their configs and the sweep runner (docs/design.md §7).

Layout (imports point down this list, never up):

* one package per experiment — :mod:`~pluralign.experiments.loco` (LoCo-RLHF),
  :mod:`~pluralign.experiments.multi_user` (P-ShareLoRA), :mod:`~pluralign.experiments.gshf`
  (GSHF) — each with the same modules: ``methods`` (the schema: env parameters, options, their
  constraints and the metrics; the draws and the methods of one unit), ``claims`` (the paper's
  claims checked on a run's rows), ``plots`` (only where the experiment draws plots beyond the
  runner's ``<plot_metric>.png``: ``multi_user``), and ``__init__``, which assembles and
  registers the :class:`~pluralign.experiments.base.Experiment`;
* :mod:`~pluralign.experiments.runner` (run, resume, read results) and
  :mod:`~pluralign.experiments.config` (validate and resolve a config);
* :mod:`~pluralign.experiments.registry` (experiment name → Experiment),
  :mod:`~pluralign.experiments.summary` (means and standard errors) and
  :mod:`~pluralign.experiments.base` (what an experiment is).

Below them, used here and elsewhere: :mod:`pluralign.plots` and :mod:`pluralign.configfile`.
"""

from pluralign.configfile import load_config
from pluralign.experiments.base import Experiment, Unit, UnitContext
from pluralign.experiments.config import resolve_config
from pluralign.experiments.gshf import GSHF, check_gshf_claims
from pluralign.experiments.loco import LOCO, check_loco_claims
from pluralign.experiments.multi_user import MULTI_USER, check_multi_user_claims
from pluralign.experiments.registry import EXPERIMENTS, get_experiment
from pluralign.experiments.runner import read_results, run_experiment

__all__ = [
    "EXPERIMENTS",
    "GSHF",
    "LOCO",
    "MULTI_USER",
    "Experiment",
    "Unit",
    "UnitContext",
    "check_gshf_claims",
    "check_loco_claims",
    "check_multi_user_claims",
    "get_experiment",
    "load_config",
    "read_results",
    "resolve_config",
    "run_experiment",
]
