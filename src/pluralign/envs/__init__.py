"""Simulators with known truth (docs/design.md §5).

Every simulator shares one sampling vocabulary, and every ``seed`` is keyword-only (anything
``numpy.random.default_rng`` accepts; :class:`MultiUser` takes an int or a list of ints, since
user ``u``'s stream is seeded by ``[*seed, u]``):

* ``sample_offline(n, *, seed) -> PreferenceData``: the offline comparisons, labelled by a
  Bradley–Terry draw from the truth (:class:`MultiUser`: ``n`` per user, by default the
  constructor's ``n_per_user``);
* ``sample_targets(m, *, seed) -> TargetStates``: ``m`` deployment states with their candidates;
* the truth, exactly: ``true_reward`` and the values of a policy on a target sample
  (``policy_value`` / ``optimal_value``, or per user ``user_values`` / ``value_gaps``).

The same seed gives the same draws. Simulator-specific draws follow the same rule:
:meth:`KLBandit.source_states` and :meth:`KLBandit.compare` (the Bradley–Terry oracle of the
online loop), :meth:`MultiUser.sample_comparisons`, :meth:`MultiUser.new_users` and
:meth:`MultiUser.new_context_users`.
"""

from pluralign.envs.kl_bandit import KLBandit
from pluralign.envs.lowrank_contextual import LowRankContextual
from pluralign.envs.multi_user import MultiUser

__all__ = ["KLBandit", "LowRankContextual", "MultiUser"]
