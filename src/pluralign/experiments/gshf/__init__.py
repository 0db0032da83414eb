"""The ``gshf`` experiment: KL-regularized preference learning on ``KLBandit``.

Xiong et al. 2024 (GSHF, ICML 2024, arXiv 2312.11456) in the bandit layer: offline (MLE-Gibbs
versus the two pessimistic options), online iterative learning with five pair designs, and
hybrid learning, all on one axis: **rounds** ``t = 0..T`` of ``m`` comparisons each
(``n_samples: [T]``, one value; option ``batch_size`` is ``m``). Every method returns a curve,
one row per round, with ``n`` = the round (see :mod:`pluralign.experiments.base`).

Per unit (setting, repeat): one truth, one offline sample of ``max(T·m, hybrid_offline)``
comparisons from the setting's source contexts and behaviour policy, and one evaluation sample of
``n_eval`` deployment contexts. All online methods share the loop seed (common random numbers).

Methods (``gap`` is always that of the policy the method would deploy after round ``t``):

* ``offline_mle`` — Gibbs policy of the Bradley–Terry MLE on the first ``t·m`` offline
  comparisons (also the *offline-only* baseline at equal budget);
* ``offline_option1`` — GSHF option I: policy-level max–min with KL
  (:class:`~pluralign.policies.PessimisticGibbs`), solved to a certified gap;
* ``offline_option2`` — GSHF option II: Gibbs policy of the pointwise lower confidence bound;
* ``online_enhancer`` / ``online_symmetric`` / ``online_uniform`` / ``online_uncertainty`` /
  ``online_best_worst`` — online iterative GSHF (:class:`~pluralign.online.OnlineGSHF`), ``t``
  rounds, with the pair design of that name (:mod:`pluralign.online.exploration`): the
  policy-level enhancer, both responses from the main agent, ``a²`` uniform, per-pair
  uncertainty over ``n_candidates`` draws of the main agent, best-of-n vs worst-of-n;
* ``hybrid_enhancer`` — the enhancer loop started from the first ``hybrid_offline`` offline
  comparisons (round 0 is the offline MLE-Gibbs policy on them).

Metrics: ``gap`` (``J_η(π*) − J_η(π̂)``, exact on the evaluation contexts), ``kl``
(``E KL(π̂‖π0)``), ``reward`` (``E Σ π̂ r*``), ``comparisons`` (all comparisons used, offline
included), ``reached_target`` (1 if ``gap ≤ target_gap``), ``duality_gap`` (option I's certified
gap), and for online rounds ``uncertainty`` (the design's own: the exploration policy's
``β_t‖E[φ(π¹) − φ(π²)]‖_{M_t⁻¹}`` for policy-level designs, the mean pair width
``β_t‖Δφ‖_{M_t⁻¹}`` for per-pair ones), ``pair_uncertainty`` (the mean pair width, every design),
``identical_pairs`` (the share of the round's pairs with ``a¹ = a²``),
``identical_pairs_expected`` (policy-level designs: ``E_x Σ_a π¹π²`` with independent draws, 0
with distinct pairs) and ``certified_gap`` (enhancer: certified bound on its shortfall from the
constrained optimum over all policies).

Options: ``batch_size`` (``m``), ``ridge`` (``l2 = ridge/N``), ``beta`` (``β = beta·sqrt((d +
log(1/δ))/N)``, for pessimism and for the online confidence sets), ``delta``,
``hybrid_offline`` (``N₀``), ``n_directions`` (enhancer eigen-directions), ``enhancer_search``
(``exact``: eigen-directions refined by SLSQP over all Gibbs tilts, with a certified bound;
``directions``: the eigen-direction scan alone), ``n_candidates`` (draws of the per-pair designs),
``opt_tol`` (option I's certified-gap tolerance), ``target_gap``, ``distinct_pairs`` (default
``true``: the two responses of every online pair differ; ``false``: independent draws; see
:class:`~pluralign.online.OnlineGSHF`).

``python -c "from pluralign.experiments.gshf import report; print(report('runs/gshf'))"`` prints
the C8/C9/C10 comparisons of ``docs/gshf.md`` from a finished run.
"""

from __future__ import annotations

from pluralign.experiments.base import Experiment
from pluralign.experiments.gshf.claims import check_gshf_claims, report, rounds_to_target
from pluralign.experiments.gshf.methods import (
    ENV_DEFAULTS,
    ENV_SPEC,
    METRICS,
    OPTION_DEFAULTS,
    OPTION_SPEC,
    check_config,
    describe_setting,
    hybrid_enhancer,
    offline_mle,
    offline_option1,
    offline_option2,
    online_best_worst,
    online_enhancer,
    online_symmetric,
    online_uncertainty,
    online_uniform,
)
from pluralign.experiments.registry import register

__all__ = ["GSHF", "check_gshf_claims", "report", "rounds_to_target"]

GSHF = register(
    Experiment(
        name="gshf",
        env_defaults=ENV_DEFAULTS,
        option_defaults=OPTION_DEFAULTS,
        methods={
            "offline_mle": offline_mle,
            "offline_option1": offline_option1,
            "offline_option2": offline_option2,
            "online_enhancer": online_enhancer,
            "online_symmetric": online_symmetric,
            "online_uniform": online_uniform,
            "online_uncertainty": online_uncertainty,
            "online_best_worst": online_best_worst,
            "hybrid_enhancer": hybrid_enhancer,
        },
        default_n_samples=(10,),
        metrics=METRICS,
        plot_metric="gap",
        describe_setting=describe_setting,
        x_label="round t (m comparisons per round)",
        logx=False,
        claims=check_gshf_claims,
        table_metrics=("gap", "kl", "duality_gap", "uncertainty", "identical_pairs"),
        env_spec=ENV_SPEC,
        option_spec=OPTION_SPEC,
        check_config=check_config,
    )
)
