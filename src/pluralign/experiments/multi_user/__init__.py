"""The ``multi_user`` experiment: P-ShareLoRA (Liu et al. 2025, arXiv 2503.19201; linear) on
the ``MultiUser`` simulator.

Per unit (setting, n, repeat) — ``n`` is the number of comparisons **per user** — one truth
``θ_u = θ0 + B* w_u``, one training sample (user ``u`` gets ``n`` comparisons, or ``n·ω_u`` with
imbalanced users; samples for different ``n`` are nested), ``n_heldout`` held-out comparisons
per user, ``n_targets`` target states shared by all users, and ``n_new_users`` fresh users from
the same population, each with 50 adaptation comparisons (their first 10, 20 and 50 are used)
and ``n_heldout`` held-out ones. Every method sees the same draws.

Methods (models; rank ``r`` = option ``rank``, or the true ``env.rank`` when it is 0; ridge
``λ = ridge / N_total``):

* ``shared_basis`` — :class:`~pluralign.rewards.SharedBasis` (``θ0 + B w_u``);
* ``per_user`` — :class:`~pluralign.rewards.PerUser` (independent ``θ_u``);
* ``pooled`` — :class:`~pluralign.rewards.Pooled` (one ``θ``);
* ``lowrank_onehot`` — the same model as ``shared_basis`` through the LoCo path: contexts
  ``x = [1, e_u]`` built by hand and ``LowRank(r, free_rows=1)`` fitted from a *random* start
  (``shared_basis`` starts spectrally), so agreement of the two is a check of the non-convex fit.

Metrics (per row; "per user" metrics are averaged over the training users):

* ``accuracy`` / ``worst_user_accuracy`` — held-out pairwise accuracy per user (mean / minimum);
  ``oracle_accuracy`` — the same for the true ``θ_u`` (the ceiling: labels are BT draws);
* ``heldout_loglik``, ``train_loglik`` — mean BT log-likelihood per comparison;
* ``param_error`` — ``(Σ_u‖θ̂_u − θ_u‖² / Σ_u‖θ_u‖²)^{1/2}``;
* ``subspace_distance`` — ``‖sin Θ(B̂, B*)‖₂``; for ``per_user``, ``B̂`` is the top-``r`` principal
  subspace of the centred ``θ̂_u`` (a two-stage estimate); not defined for ``pooled``;
* ``value_gap`` — mean over users of ``J_u(π*_u) − J_u(π̂_u)`` for each user's greedy policy;
  ``value_gap_pessimistic`` — the same for per-user pessimistic policies
  (:class:`~pluralign.policies.PerUserPolicies`, ``β = beta·sqrt((p + log(1/δ))/N_u)``);
* ``utilitarian_gap`` — ``max_π mean_u J_u(π) − mean_u J_u(π̂)`` for the pessimistic utilitarian
  policy; ``leximin_gap`` — ``max_π min_u Δ_u(π) − min_u Δ_u(π̂)`` for the pessimistic worst-user
  policy (``Δ_u`` = improvement over the uniform policy), both on the true rewards;
* ``newuser_accuracy_{10,20,50}`` — held-out accuracy of new users adapted from their first 10, 20,
  50 comparisons (``shared_basis``: ``w`` with ``θ̂0, B̂`` frozen; ``per_user``: a whole ``θ``;
  ``pooled``: no adaptation); ``newuser_truebasis_accuracy_{10,20,50}`` (``shared_basis`` rows) —
  the same adaptation with the true ``θ0, B*``; ``newuser_oracle_accuracy`` — true ``θ``;
* ``shared_basis_loglik_gap`` (``lowrank_onehot`` rows) — its training log-likelihood minus
  ``shared_basis``'s (≈ 0 when the two agree).
"""

from __future__ import annotations

from pluralign.experiments.base import Experiment
from pluralign.experiments.multi_user.claims import check_multi_user_claims
from pluralign.experiments.multi_user.methods import (
    ADAPT_SIZES,
    ENV_DEFAULTS,
    ENV_SPEC,
    METRICS,
    OPTION_DEFAULTS,
    OPTION_SPEC,
    RENAMED,
    check_config,
    describe_setting,
    lowrank_onehot,
    per_user,
    pooled,
    shared_basis,
)
from pluralign.experiments.multi_user.plots import plot_multi_user
from pluralign.experiments.registry import register

__all__ = ["ADAPT_SIZES", "MULTI_USER", "check_multi_user_claims", "plot_multi_user"]

MULTI_USER = register(
    Experiment(
        name="multi_user",
        env_defaults=ENV_DEFAULTS,
        option_defaults=OPTION_DEFAULTS,
        methods={
            "shared_basis": shared_basis,
            "per_user": per_user,
            "pooled": pooled,
            "lowrank_onehot": lowrank_onehot,
        },
        default_n_samples=(10, 25, 50, 100),
        metrics=METRICS,
        plot_metric="accuracy",
        describe_setting=describe_setting,
        x_label="n (comparisons per user)",
        extra_plots=plot_multi_user,
        claims=check_multi_user_claims,
        table_metrics=(
            "accuracy",
            "worst_user_accuracy",
            "param_error",
            "subspace_distance",
            "value_gap",
            "value_gap_pessimistic",
            "newuser_accuracy_20",
        ),
        env_spec=ENV_SPEC,
        option_spec=OPTION_SPEC,
        check_config=check_config,
        renamed=RENAMED,
    )
)
