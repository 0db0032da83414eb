"""The ``loco`` experiment: LoCo-RLHF (Lee, Sun & Liu 2024, arXiv 2412.19436) on the
``LowRankContextual`` simulator.

Per unit (setting, N, repeat): one truth ``Θ*``, one offline sample of size N from source
contexts under the behaviour policy, one held-out sample from the same distribution, and one
target sample of shifted contexts. Every method sees the same draws.

Metrics (per row):

* ``suboptimality`` — ``J(π*) − J(π̂)`` on the target sample, exact (true rewards);
* ``estimation_error`` — ``‖Θ̂ − Θ*‖_F / ‖Θ*‖_F`` (contextual models only);
* ``heldout_loglik`` — mean Bradley–Terry log-likelihood on the held-out sample;
* ``fit_seconds`` — wall time of the method, including shared fits it used;
* ``duality_gap`` — the pessimistic solver's certified gap (pessimistic methods only);
* ``coverage_opt_prs`` / ``coverage_greedy_prs`` (rows of ``prs`` and ``prs_pointwise``) and
  ``coverage_opt_full`` / ``coverage_greedy_full`` (rows of ``fullrank_pessimistic``) — how
  well the offline data cover a policy, in the confidence set's own geometry:
  ``‖w(π)‖_{M⁻¹}`` with ``w(π) = (1/m) Σ_j (z(j, π(j)) − z_ref(j))``, ``z_ref(j)`` the
  pessimistic policies' reference (the mean candidate feature; under ``coverage: subspace`` the
  mean of the ordinary candidates, the simulator's ``reference_probs``), ``M`` the confidence set's
  matrix, for ``π = π*`` (the true per-state argmax) and for greedy's choice. ``_prs`` measures
  in the RTV-reduced space (``z`` of the refit ``RTVReduced``, its ``M``) with greedy the
  ``lowrank_greedy`` policy; ``_full`` in the ``d_x·d_phi`` Kronecker space with greedy the
  ``fullrank_greedy`` policy. ``opt ≲ greedy`` (similar): the full-coverage regime, pessimism can
  only shrink towards the reference; ``opt ≪ greedy``: single-policy coverage, greedy's choice
  is poorly covered while π*'s is well covered. The worst-case value of π is
  ``θ̂ᵀw(π) − β·coverage``, so ``β·(coverage_greedy − coverage_opt)`` is the pessimistic
  handicap of greedy's choice against π*'s;
* ``uncovered_share`` — ``coverage: subspace`` only: the policy's mean probability on the
  out-of-support candidates (``π*`` picks one where a shrunk candidate is still the best: about
  6% of the states in ``configs/loco_coverage.yaml``'s first setting).

Methods:

* ``prs`` — LoCo-RLHF: ``LowRank`` (true rank) → RTV reduction and refit → max–min pessimistic
  policy in the reduced space (Pessimism in Reduced Subspace);
* ``prs_pointwise`` — the same confidence set, per-state lower confidence bound;
* ``lowrank_greedy`` — argmax of the low-rank estimate;
* ``fullrank_pessimistic`` — ``Bilinear`` with its ``d_x·d_phi``-dimensional confidence set,
  max–min policy (Zhu et al. 2023 on Kronecker features);
* ``fullrank_greedy`` — argmax of the full-rank estimate;
* ``linear_pessimistic`` / ``linear_greedy`` — the context-free ``θᵀφ`` model (one reward for
  everybody), pessimistic or greedy.

Env parameters as in :class:`~pluralign.envs.LowRankContextual`, plus ``n_targets`` and
``n_heldout``; ``coverage: subspace`` and its ``support_extra``, ``n_uncovered``,
``uncovered_scale``, ``offline_leak`` give the single-policy-coverage regime (ignored, and
without effect on any draw, under ``coverage: full``, the default).

Options: ``ridge_grid`` (each model family — linear, full-rank, low-rank — picks its ridge from
this grid by held-out log-likelihood on a 20% split of the offline data only, then refits on
all of it with ``l2 = ridge / N``; the chosen value is reported as ``ridge``), ``beta`` (the
confidence radius is ``β = beta · sqrt((p + log(1/δ))/N)``,
the theory's rate with its constant exposed, so that models of different dimension ``p`` are
treated alike), ``delta``, ``fw_tol`` and ``fw_max_iter`` (the Frank–Wolfe duality-gap tolerance and
iteration cap; the gap reached is reported either way).
"""

from __future__ import annotations

from pluralign.experiments.base import Experiment
from pluralign.experiments.loco.claims import check_loco_claims
from pluralign.experiments.loco.methods import (
    ENV_DEFAULTS,
    ENV_SPEC,
    METRICS,
    OPTION_DEFAULTS,
    OPTION_SPEC,
    check_config,
    describe_setting,
    fullrank_greedy,
    fullrank_pessimistic,
    linear_greedy,
    linear_pessimistic,
    lowrank_greedy,
    prs,
    prs_pointwise,
)
from pluralign.experiments.registry import register

__all__ = ["LOCO", "check_loco_claims"]

LOCO = register(
    Experiment(
        name="loco",
        env_defaults=ENV_DEFAULTS,
        option_defaults=OPTION_DEFAULTS,
        methods={
            "prs": prs,
            "prs_pointwise": prs_pointwise,
            "lowrank_greedy": lowrank_greedy,
            "fullrank_pessimistic": fullrank_pessimistic,
            "fullrank_greedy": fullrank_greedy,
            "linear_pessimistic": linear_pessimistic,
            "linear_greedy": linear_greedy,
        },
        default_n_samples=(500, 1000, 2000, 5000),
        metrics=METRICS,
        # the terminal table keeps the headline metrics; coverage is in summary.csv and
        # `pluralign report --markdown coverage_opt_prs` (a wider table would be cut at 80 columns)
        table_metrics=("suboptimality", "estimation_error", "heldout_loglik", "duality_gap"),
        plot_metric="suboptimality",
        describe_setting=describe_setting,
        env_spec=ENV_SPEC,
        option_spec=OPTION_SPEC,
        check_config=check_config,
        claims=check_loco_claims,
    )
)
