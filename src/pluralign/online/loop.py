"""Online iterative GSHF: a main agent, an exploration policy, and a Bradley–Terry oracle.

Xiong et al. 2024 (GSHF, ICML 2024, arXiv 2312.11456), Algorithm 2, on a linear KL bandit
(:class:`~pluralign.envs.KLBandit`). Starting from data ``D_0`` (empty, or an offline data set for
the **hybrid** setting), for ``t = 1..T``:

1. fit ``θ̂`` by Bradley–Terry MLE on ``D_{t−1}`` (:class:`~pluralign.rewards.Linear`, ridge
   ``l2 = ridge/N``) and its confidence set (:class:`~pluralign.confidence.ConfidenceSet`,
   ``β = beta·sqrt((d + log(1/δ))/N)``); with no data, ``θ̂ = 0``, ``M = ridge·I`` and
   ``β = beta·sqrt(d + log(1/δ))`` (the same formula at ``N = 1``);
2. draw ``m`` contexts; the main agent is ``π¹_t(a|x) ∝ π0(a|x) exp(θ̂ᵀφ(x,a)/η)``;
3. the pair design (:mod:`pluralign.online.exploration`) draws a pair ``(a¹, a²)`` per context:
   for a policy-level design ``a¹ ~ π¹_t`` and ``a² ~ π²_t``; per-pair designs choose among
   ``n`` draws of ``π¹_t``;
4. query the oracle for ``y = 1{a² ≻ a¹}`` and add the ``m`` comparisons to ``D_t``.

With a concentrated main agent ``a¹ = a²`` is frequent over a finite candidate set, and such a
pair carries no information (``Δφ = 0``) but still costs a query; two LLM responses are almost
never identical. So by default (``distinct_pairs=True``) ``a²`` is drawn from ``π²_t(·|x)``
conditioned on ``a² ≠ a¹`` — renormalized without ``a¹``, uniform over the other candidates if
``π²_t`` puts all its mass on ``a¹`` — and every design compares two different responses;
``distinct_pairs=False`` is the independent draw of GSHF's Algorithm 2, whose expected share of
identical pairs is ``E_x Σ_a π¹_t(a|x) π²_t(a|x)`` (recorded as ``identical_pairs_expected``).

After each round the main agent is refitted on ``D_t`` and, if evaluation states are given, its
exact gap ``J_η(π*) − J_η(gibbs(θ̂))`` is recorded (evaluation time is not counted in the round's
``seconds``). Round ``t``'s record therefore describes the agent after ``t`` batches; round 0 is
the agent before any online data (``π0``, or the offline MLE-Gibbs policy in the hybrid setting).

Every random draw of round ``t`` comes from ``numpy.random.default_rng([*seed, t])``, so a run is
reproduced exactly from its seed, and runs with the same seed share their round-1 contexts
(common random numbers across exploration strategies).
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import numpy as np

from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.data import PreferenceData, TargetStates
from pluralign.errors import PluralignError
from pluralign.online.exploration import (
    Exploration,
    RoundState,
    exclude_actions,
    make_exploration,
    sample_actions,
)
from pluralign.policies.gibbs import Gibbs, gibbs_probs, kl_divergence
from pluralign.rewards import Linear
from pluralign.rewards.validation import check_number

__all__ = ["OnlineGSHF", "PreferenceEnv", "sample_actions"]


class PreferenceEnv(Protocol):
    """What the loop needs from a simulator (:class:`~pluralign.envs.KLBandit` has it all)."""

    eta: float
    d: int

    def sample_targets(self, m: int, *, seed: Any) -> TargetStates: ...

    def reference_probs(self, states: TargetStates) -> np.ndarray: ...

    def compare(self, phi0: np.ndarray, phi1: np.ndarray, *, seed: Any) -> np.ndarray: ...

    def optimal_probs(self, states: TargetStates) -> np.ndarray: ...

    def true_reward(self, states: TargetStates) -> np.ndarray: ...


_excluding = exclude_actions  # the former private name


def _seed_list(seed: int | list[int]) -> list[int]:
    return list(seed) if isinstance(seed, list | tuple) else [int(seed)]


class OnlineGSHF:
    """Online (or hybrid) iterative preference learning with a pluggable exploration policy.

    Parameters
    ----------
    exploration:
        The pair design: ``"enhancer"``, ``"symmetric"``, ``"uniform"``, ``"uncertainty"``,
        ``"best_worst"`` (:data:`~pluralign.online.exploration.EXPLORATIONS`) or an
        :class:`~pluralign.online.exploration.Exploration` instance.
    batch_size:
        Comparisons per round ``m``.
    n_rounds:
        Rounds ``T``.
    ridge:
        Ridge ``λ`` of the MLE on the summed log-likelihood (``l2 = ridge/N``) and of ``M``.
    beta:
        Constant ``c`` of the confidence radius ``β = c·sqrt((d + log(1/δ))/N)``.
    delta:
        Confidence level ``δ``.
    tol:
        Gradient tolerance of the MLE.
    distinct_pairs:
        ``True`` (default): the two responses of every pair differ (see above); ``False``: the
        independent draw.
    seed:
        Seed (int or list of ints) of every random draw of the loop.

    Learned attributes after :meth:`fit`: ``model_`` (the final :class:`~pluralign.rewards.Linear`,
    or ``None`` without data), ``theta_``, ``confidence_``, ``policy_`` (:class:`Gibbs`),
    ``data_`` (all comparisons, offline first), ``history_`` (one dict per round ``0..T`` with
    ``round``, ``comparisons`` (online so far), ``total_comparisons``, ``seconds`` (the round's
    compute time), ``identical_pairs`` (share of the round's pairs with ``a¹ = a²``),
    ``pair_uncertainty`` (mean ``β_t‖φ(a¹) − φ(a²)‖_{M_t⁻¹}`` of the round's pairs), the design's
    diagnostics (``uncertainty``; for policy-level designs ``explore_kl`` and
    ``identical_pairs_expected``; for the enhancer ``explore_bound`` and
    ``explore_certified_gap``), and, with evaluation states, ``gap``, ``kl`` and ``reward`` of
    the main agent).
    """

    def __init__(
        self,
        exploration: str | Exploration = "enhancer",
        *,
        batch_size: int = 1000,
        n_rounds: int = 10,
        ridge: float = 1.0,
        beta: float = 1.0,
        delta: float = 0.05,
        tol: float = 1e-6,
        distinct_pairs: bool = True,
        seed: int | list[int] = 0,
    ) -> None:
        self.exploration = exploration
        self.batch_size = batch_size
        self.n_rounds = n_rounds
        self.ridge = ridge
        self.beta = beta
        self.delta = delta
        self.tol = tol
        self.distinct_pairs = distinct_pairs
        self.seed = seed

    # ------------------------------------------------------------------ pieces
    def _refit(
        self, data: PreferenceData | None, d: int
    ) -> tuple[Linear | None, np.ndarray, ConfidenceSet]:
        """MLE and confidence set on ``data`` (the no-data convention when it is ``None``)."""
        if data is None:
            radius = self.beta * math.sqrt(d + math.log(1.0 / self.delta))
            cs = ConfidenceSet(
                np.zeros(d),
                self.ridge * np.eye(d),
                radius,
                lam=self.ridge,
                n=0,
                kind="design",
                bound_feature=0.0,
                bound_theta=0.0,
            )
            return None, np.zeros(d), cs
        model = Linear(l2=self.ridge / data.n, tol=self.tol).fit(data)
        cs = ConfidenceSet.fit(
            model, data, beta=self.beta * beta_rate(d, data.n, self.delta), delta=self.delta
        )
        return model, model.params_.copy(), cs

    def _evaluate(
        self, env: PreferenceEnv, theta: np.ndarray, eval_cache: dict
    ) -> dict[str, float]:
        states = eval_cache["states"]
        probs = gibbs_probs(states.phi @ theta, eval_cache["ref"], env.eta)
        kl = float(np.mean(kl_divergence(probs, eval_cache["ref"])))
        reward = float(np.mean(np.sum(probs * eval_cache["reward"], axis=1)))
        gap = env.eta * float(np.mean(kl_divergence(probs, eval_cache["opt"])))
        return {"gap": gap, "kl": kl, "reward": reward}

    def _validate(self) -> Exploration:
        for name in ("batch_size", "n_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PluralignError(f"{name} must be a positive integer, got {value!r}")
        # DataValidationError (a PluralignError) naming the field; non-finite values refused too
        check_number(self.ridge, "ridge", owner="OnlineGSHF", strict=True)
        check_number(self.beta, "beta", owner="OnlineGSHF")
        check_number(self.delta, "delta", owner="OnlineGSHF", strict=True, below=1.0)
        check_number(self.tol, "tol", owner="OnlineGSHF", strict=True)
        if not isinstance(self.distinct_pairs, bool):
            raise PluralignError(
                f"distinct_pairs must be True or False, got {self.distinct_pairs!r}"
            )
        return make_exploration(self.exploration)

    # ------------------------------------------------------------------ loop
    def fit(
        self,
        env: PreferenceEnv,
        *,
        offline: PreferenceData | None = None,
        eval_states: TargetStates | None = None,
    ) -> OnlineGSHF:
        """Run ``n_rounds`` rounds on ``env`` (after ``offline`` data, if given: hybrid)."""
        exploration = self._validate()
        if offline is not None and offline.d_phi != env.d:
            raise PluralignError(f"offline data have d_phi={offline.d_phi}, the env has d={env.d}")
        eval_cache = None
        if eval_states is not None:
            eval_cache = {
                "states": eval_states,
                "ref": env.reference_probs(eval_states),
                "opt": env.optimal_probs(eval_states),
                "reward": env.true_reward(eval_states),
            }
        seed = _seed_list(self.seed)
        n_offline = 0 if offline is None else offline.n
        start = time.perf_counter()
        data = offline
        model, theta, cs = self._refit(data, env.d)
        history: list[dict[str, float]] = []
        record: dict[str, float] = {
            "round": 0,
            "comparisons": 0,
            "total_comparisons": n_offline,
            "seconds": time.perf_counter() - start,
        }
        if eval_cache is not None:
            record.update(self._evaluate(env, theta, eval_cache))
        history.append(record)
        m = self.batch_size
        for t in range(1, self.n_rounds + 1):
            start = time.perf_counter()
            rng = np.random.default_rng([*seed, t])
            states = env.sample_targets(m, seed=rng)
            ref = env.reference_probs(states)
            main = gibbs_probs(states.phi @ theta, ref, env.eta)
            pairs = exploration.draw_pairs(
                RoundState(states=states, main_probs=main, theta=theta, confidence=cs, eta=env.eta),
                rng,
                distinct=self.distinct_pairs,
            )
            a1, a2 = pairs.a1, pairs.a2
            rows = np.arange(m)
            phi1, phi2 = states.phi[rows, a1], states.phi[rows, a2]
            width = float(np.mean(cs.beta * cs.norm(phi1 - phi2)))
            batch = PreferenceData(
                x=None, phi0=phi1, phi1=phi2, y=env.compare(phi1, phi2, seed=rng)
            )
            data = batch if data is None else PreferenceData.concatenate([data, batch])
            model, theta, cs = self._refit(data, env.d)
            record = {
                "round": t,
                "comparisons": t * m,
                "total_comparisons": n_offline + t * m,
                "seconds": time.perf_counter() - start,
                "identical_pairs": float(np.mean(a1 == a2)),
                "pair_uncertainty": width,
                **pairs.info,
            }
            if eval_cache is not None:
                record.update(self._evaluate(env, theta, eval_cache))
            history.append(record)
        self.model_ = model
        self.theta_ = theta
        self.confidence_ = cs
        self.data_ = data
        self.history_ = history
        self.policy_ = (
            None if model is None else Gibbs(model, env.eta, reference=env.reference_probs)
        )
        return self
