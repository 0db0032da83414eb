"""Exploration strategies of online iterative GSHF: how the second response of a pair is drawn.

Each round the main agent ``π¹_t = gibbs(θ̂_t)`` draws ``a¹``; an :class:`Exploration` chooses the
policy ``π²_t`` that draws ``a²`` (Xiong et al. 2024, GSHF, Algorithm 2):

* :class:`Enhancer` — GSHF's enhancer: maximise the uncertainty of the feature difference,
  subject to staying KL-close to the main agent (see its docstring);
* :class:`Symmetric` — ``π²_t = π¹_t``: both responses from the main agent (vanilla iterative
  RLHF / iterative DPO with two samples of the current model);
* :class:`Uniform` — ``a²`` uniform over the ``K`` candidates.

The uncertainty is measured with the round's confidence set
``C_t = {θ : ‖θ − θ̂_t‖_{M_t} ≤ β_t}`` (:class:`~pluralign.confidence.ConfidenceSet`):
``U(π′) = β_t ‖w(π′)‖_{M_t⁻¹}``, ``w(π′) = E_x[φ(x, π¹_t) − φ(x, π′)]``,
``φ(x, π) = Σ_a π(a|x)φ(x,a)``,
``E_x`` the average over the round's ``m`` contexts. With the library's normalization
``M_t = (Σ_i Δφ_iΔφ_iᵀ + λI)/N`` and ``β_t = c·sqrt((d + log(1/δ))/N)`` this is
``c·sqrt(d + log(1/δ))·‖w‖_{Σ_t⁻¹}``, ``Σ_t = λI + Σ_i Δφ_iΔφ_iᵀ``: GSHF's ``β‖·‖_{Σ_t⁻¹}``, which
shrinks as data accumulate (it is also the width ``max_{θ∈C_t} θᵀw − θ̂ᵀw``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh

from pluralign.confidence import ConfidenceSet
from pluralign.data import TargetStates
from pluralign.errors import PluralignError

__all__ = ["EXPLORATIONS", "Enhancer", "Exploration", "RoundState", "Symmetric", "Uniform",
           "make_exploration"]


@dataclass(frozen=True)
class RoundState:
    """What an exploration strategy sees in a round.

    ``states`` are the round's ``m`` contexts; ``main_probs`` is ``π¹_t`` on them (``(m, K)``);
    ``theta`` is ``θ̂_t``; ``confidence`` holds ``M_t`` and ``β_t``; ``eta`` is ``η``.
    """

    states: TargetStates
    main_probs: np.ndarray
    theta: np.ndarray
    confidence: ConfidenceSet
    eta: float


class Exploration(ABC):
    """Chooses the policy ``π²_t`` of the second response."""

    name: str = "exploration"

    @abstractmethod
    def second_policy(self, state: RoundState) -> tuple[np.ndarray, dict[str, float]]:
        """``(π²_t as an (m, K) matrix, diagnostics)``."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


def uncertainty(state: RoundState, probs: np.ndarray) -> float:
    """``U(π′) = β_t ‖E_x[φ(x, π¹_t) − φ(x, π′)]‖_{M_t⁻¹}``."""
    w = np.einsum("ja,jad->d", state.main_probs - probs, state.states.phi) / state.states.m
    return float(state.confidence.beta * state.confidence.norm(w))


def policy_kl(probs: np.ndarray, base: np.ndarray) -> float:
    """``E_x KL(π′(·|x) ‖ π(·|x))``."""
    from pluralign.policies.gibbs import kl_divergence

    return float(np.mean(kl_divergence(probs, base)))


class Symmetric(Exploration):
    """Both responses from the main agent: ``π²_t = π¹_t``."""

    name = "symmetric"

    def second_policy(self, state: RoundState) -> tuple[np.ndarray, dict[str, float]]:
        return state.main_probs.copy(), {"uncertainty": 0.0, "explore_kl": 0.0}


class Uniform(Exploration):
    """``a²`` uniform over the candidates."""

    name = "uniform"

    def second_policy(self, state: RoundState) -> tuple[np.ndarray, dict[str, float]]:
        m, n_actions = state.main_probs.shape
        probs = np.full((m, n_actions), 1.0 / n_actions)
        return probs, {"uncertainty": uncertainty(state, probs),
                       "explore_kl": policy_kl(probs, state.main_probs)}


class Enhancer(Exploration):
    """GSHF's enhancer: ``π²_t = argmax U(π′)`` subject to ``η E_x KL(π′ ‖ π¹_t) ≤ U(π′)``.

    The search runs over Gibbs policies of perturbed parameters,
    ``π′_{c,v} ∝ π0 exp((θ̂_t + c v)ᵀφ/η) ∝ π¹_t exp(c vᵀφ/η)``, ``c ≥ 0``, along ``2·n_directions``
    directions ``±v_j``: the top generalized eigenvectors of ``Σ_π v = λ M_t v``, where
    ``Σ_π = E_x Cov_{a~π¹_t(·|x)}[φ(x,a)]``, normalized to ``‖v‖_{M_t} = 1`` (so ``v = M_t⁻¹u``).

    Why these directions: to first order in ``c``, ``w(π′) ≈ −(c/η) Σ_π v`` and
    ``KL ≈ c² vᵀΣ_π v / (2η²)``; for a generalized eigenvector both are fixed by ``λ``: the
    constraint binds at ``c = 2β_t`` for every ``v`` and the uncertainty there is ``2β_t²λ/η``, so
    the best direction to first order is the top eigenvector — the direction the main agent's
    policy can move in (``Σ_π``) that the data have covered least (``M_t``).

    The search is exact beyond first order: for each direction, ``c`` starts at ``2β_t``, is doubled
    (at most ``max_doublings`` times) while the constraint holds, then bisected
    (``bisection_steps`` times) between the last feasible and the first infeasible value, all
    directions at once (vectorized). The returned policy is the feasible candidate of largest
    uncertainty (``π¹_t`` itself, with ``U = 0``, if none moved), so the KL constraint holds
    exactly as evaluated. Cost per evaluation: ``O(m K d · n_directions)``; plus one ``O(m K d²)``
    covariance and a ``d×d`` generalized eigenproblem per round.
    """

    name = "enhancer"

    def __init__(self, n_directions: int = 4, *, max_doublings: int = 30,
                 bisection_steps: int = 30) -> None:
        if n_directions < 1:
            raise PluralignError(f"n_directions must be ≥ 1, got {n_directions}")
        self.n_directions = n_directions
        self.max_doublings = max_doublings
        self.bisection_steps = bisection_steps

    def directions(self, state: RoundState) -> tuple[np.ndarray, np.ndarray]:
        """``(V, λ)``: the top generalized eigenvectors (columns of ``V``, ``‖v‖_M = 1``) of
        ``(Σ_π, M_t)`` and their eigenvalues, largest first."""
        phi, probs = state.states.phi, state.main_probs
        m, n_actions, d = phi.shape
        mean = np.einsum("ja,jad->jd", probs, phi)
        centred = (phi - mean[:, None, :]) * np.sqrt(probs)[:, :, None]
        flat = centred.reshape(m * n_actions, d)
        cov = flat.T @ flat / m
        k = min(self.n_directions, d)
        lam, vecs = eigh(cov, state.confidence.M, subset_by_index=[d - k, d - 1])
        return vecs[:, ::-1], lam[::-1]

    def second_policy(self, state: RoundState) -> tuple[np.ndarray, dict[str, float]]:
        cs, eta, phi = state.confidence, state.eta, state.states.phi
        m = phi.shape[0]
        vecs, lam = self.directions(state)
        dirs = np.concatenate([vecs, -vecs], axis=1)  # (d, J)
        n_dirs = dirs.shape[1]
        flat_phi = phi.reshape(-1, phi.shape[2])  # (m·K, d)
        # (J, m, K), contiguous along K so that every softmax reduces over the last axis.
        scores = np.ascontiguousarray((flat_phi @ dirs).T.reshape(n_dirs, m, -1)) / eta
        with np.errstate(divide="ignore"):  # log 0 = −inf: such actions keep probability 0
            log_main = np.log(state.main_probs)[None, :, :]
        main_mean = np.einsum("ja,jad->d", state.main_probs, phi) / m

        def evaluate(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """Uncertainty, η·KL and probabilities of ``π′_{c_j, v_j}`` for every direction j.

            Everything is taken relative to each row's most likely action ``b`` and formed
            from score differences, ``rel_a = log π¹_a − log π¹_b + c (s_a − s_b)``, so it stays
            exact however large ``c`` is (the search may go far: a deterministic limit can be
            feasible). Then ``log(π′_a/π¹_a) = c (s_a − s_b) − log π¹_b − log Σ exp(rel)``.
            """
            cc = c[:, None, None]
            top = np.argmax(log_main + scores * cc, axis=2)[:, :, None]
            s_top = np.take_along_axis(scores, top, axis=2)
            main_top = np.take_along_axis(np.broadcast_to(log_main, scores.shape), top, axis=2)
            shift = cc * (scores - s_top)
            probs = np.exp(log_main - main_top + shift)
            total = probs.sum(axis=2, keepdims=True)
            probs /= total
            log_ratio = shift - main_top - np.log(total)
            kl = np.mean(np.einsum("jmk,jmk->jm", probs, np.where(probs > 0, log_ratio, 0.0)),
                         axis=1)
            means = probs.reshape(n_dirs, -1) @ flat_phi / m  # (J, d)
            unc = cs.beta * cs.norm(main_mean[None, :] - means)
            return unc, eta * np.maximum(kl, 0.0), probs

        # A relative margin keeps the returned policy feasible under any recomputation of KL
        # and U that rounds differently.
        margin = 1.0 - 1e-9
        lo = np.zeros(n_dirs)  # feasible
        hi = np.full(n_dirs, np.inf)  # infeasible (once found)
        c = np.full(n_dirs, 2.0 * cs.beta)
        for _ in range(self.max_doublings + 1):
            unc, cost, _ = evaluate(c)
            ok = cost <= margin * unc
            lo = np.where(ok, c, lo)
            hi = np.where(ok, hi, np.minimum(hi, c))
            open_ = ~np.isfinite(hi)
            if not open_.any():
                break
            c = np.where(open_, 2.0 * c, c)
        bounded = np.isfinite(hi)
        for _ in range(self.bisection_steps):
            if not bounded.any():
                break
            mid = np.where(bounded, 0.5 * (lo + hi), lo)
            unc, cost, _ = evaluate(mid)
            ok = cost <= margin * unc
            lo = np.where(bounded & ok, mid, lo)
            hi = np.where(bounded & ~ok, mid, hi)
        unc, cost, probs = evaluate(lo)
        feasible = cost <= margin * unc
        if not feasible.any() or not np.any(lo[feasible] > 0):
            return state.main_probs.copy(), {"uncertainty": 0.0, "explore_kl": 0.0,
                                             "explore_scale": 0.0}
        best = int(np.argmax(np.where(feasible, unc, -np.inf)))
        chosen = probs[best] / probs[best].sum(axis=1, keepdims=True)
        return chosen, {
            "uncertainty": float(unc[best]),
            "explore_kl": float(cost[best] / eta),
            "explore_scale": float(lo[best]),
            "explore_eigenvalue": float(lam[best % len(lam)]),
        }


EXPLORATIONS: dict[str, type[Exploration]] = {
    "enhancer": Enhancer,
    "symmetric": Symmetric,
    "uniform": Uniform,
}


def make_exploration(exploration: str | Exploration) -> Exploration:
    """An :class:`Exploration` from its name (``enhancer``, ``symmetric``, ``uniform``)."""
    if isinstance(exploration, Exploration):
        return exploration
    if exploration not in EXPLORATIONS:
        raise PluralignError(
            f"unknown exploration {exploration!r}; valid: {', '.join(EXPLORATIONS)}"
        )
    return EXPLORATIONS[exploration]()
