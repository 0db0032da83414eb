"""Pair designs of online iterative GSHF: how the two responses of a comparison are drawn.

Each round the main agent is ``π¹_t = gibbs(θ̂_t)``; an :class:`Exploration` (a *pair design*)
draws the pair ``(a¹, a²)`` of every context with :meth:`Exploration.draw_pairs`. One vocabulary
(the names in :data:`EXPLORATIONS`) covers two kinds of design:

*Policy-level designs* choose a policy ``π²_t`` (:meth:`Exploration.second_policy`); then
``a¹ ~ π¹_t`` and ``a² ~ π²_t`` (Xiong et al. 2024, GSHF, ICML 2024, arXiv 2312.11456,
Algorithm 2):

* ``enhancer`` (:class:`Enhancer`) — GSHF's enhancer: maximise the uncertainty of the feature
  difference, subject to staying KL-close to the main agent (see its docstring);
* ``symmetric`` (:class:`Symmetric`) — ``π²_t = π¹_t``: both responses from the main agent
  (vanilla iterative RLHF / iterative DPO with two samples of the current model);
* ``uniform`` (:class:`Uniform`) — ``a²`` uniform over the ``K`` candidates.

*Per-pair designs* draw ``n`` candidates from the main agent and choose within them:

* ``uncertainty`` (:class:`PairUncertainty`) — ``a¹ ~ π¹_t``, ``a²`` the candidate maximising
  ``‖φ(x,a¹) − φ(x,a)‖_{M_t⁻¹}`` (the per-pair prototype of the GSHF authors' code);
* ``best_worst`` (:class:`BestWorst`) — ``a¹``/``a²`` the candidates of largest/smallest
  estimated reward ``θ̂_tᵀφ`` (best-of-n vs worst-of-n, RLHF Workflow, Dong et al. 2024,
  arXiv 2405.07863).

**Distinct pairs** (``distinct=True``, the loop's default): a pair with ``a¹ = a²`` has
``Δφ = 0``, costs a query and carries no information, and two LLM responses are almost never
identical, so every design compares two *different* candidates: ``a²`` is drawn from ``π²_t(·|x)``
conditioned on ``a² ≠ a¹``, i.e. renormalized without ``a¹`` (uniform over the other candidates
if ``π²_t`` puts all its mass on ``a¹``); per-pair designs draw their candidates for ``a²`` the
same way (``uncertainty``) or choose the worst among the candidates that differ from the best
(``best_worst``, falling back on a conditioned draw from ``π¹_t`` if all ``n`` coincide).
``distinct=False`` is the plain independent draw, whose identical-pair rate for a policy-level
design is ``E_x Σ_a π¹_t(a|x) π²_t(a|x)``.

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

import math
from abc import ABC
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh
from scipy.optimize import minimize, minimize_scalar
from scipy.special import logsumexp

from pluralign.confidence import ConfidenceSet
from pluralign.data import TargetStates
from pluralign.errors import PluralignError

__all__ = [
    "EXPLORATIONS",
    "BestWorst",
    "Enhancer",
    "Exploration",
    "PairUncertainty",
    "Pairs",
    "RoundState",
    "Symmetric",
    "Uniform",
    "exclude_actions",
    "make_exploration",
    "sample_actions",
]


def sample_actions(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action per row of an ``(m, K)`` probability matrix (inverse CDF, vectorized)."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(axis=1), probs.shape[1] - 1)


def exclude_actions(probs: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """``probs`` conditioned on not choosing ``actions``: row ``j`` renormalized without
    ``actions[j]`` (uniform over the other candidates if no mass is left)."""
    rows = np.arange(probs.shape[0])
    out = np.array(probs, float)
    out[rows, actions] = 0.0
    total = out.sum(axis=1, keepdims=True)
    empty = total[:, 0] <= 1e-12
    if empty.any():
        out[empty] = 1.0
        out[rows[empty], actions[empty]] = 0.0
        total = out.sum(axis=1, keepdims=True)
    return out / total


@dataclass(frozen=True)
class Pairs:
    """The pairs of a round: ``a1``, ``a2`` (``(m,)`` action indices), the design's diagnostics
    ``info`` and, for per-pair designs, the ``(m, n)`` ``candidates`` they chose from."""

    a1: np.ndarray
    a2: np.ndarray
    info: dict[str, float]
    candidates: np.ndarray | None = None


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


class Exploration(ABC):  # noqa: B024 - a base with defaults; per-pair designs override draw_pairs
    """A pair design: draws the pairs of a round (policy-level designs through ``π²_t``)."""

    name: str = "exploration"

    def second_policy(self, state: RoundState) -> tuple[np.ndarray, dict[str, float]]:
        """``(π²_t as an (m, K) matrix, diagnostics)`` (policy-level designs only)."""
        raise PluralignError(f"{type(self).__name__} is a per-pair design without a policy π²")

    def draw_pairs(
        self, state: RoundState, rng: np.random.Generator, *, distinct: bool = True
    ) -> Pairs:
        """``a¹ ~ π¹_t``, then ``a² ~ π²_t`` (conditioned on ``a² ≠ a¹`` if ``distinct``).

        ``info`` adds ``identical_pairs_expected``, the probability ``E_x Σ_a π¹π²`` that the
        pair is identical (0 with ``distinct``)."""
        second, info = self.second_policy(state)
        a1 = sample_actions(state.main_probs, rng)
        if distinct:
            second = exclude_actions(second, a1)
        a2 = sample_actions(second, rng)
        # with distinct pairs π² is renormalized without a¹: a² = a¹ has probability 0
        expected = 0.0 if distinct else float(np.mean(np.sum(state.main_probs * second, axis=1)))
        return Pairs(a1, a2, {**info, "identical_pairs_expected": expected})

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
        return probs, {
            "uncertainty": uncertainty(state, probs),
            "explore_kl": policy_kl(probs, state.main_probs),
        }


class Enhancer(Exploration):
    """GSHF's enhancer: ``π²_t = argmax U(π′)`` subject to ``η E_x KL(π′ ‖ π¹_t) ≤ U(π′)``.

    **The optimum is a Gibbs tilt of the main agent.** Let ``π′`` be feasible, ``w = μ¹ − μ′``
    (``μ = E_x φ(x, π)``), ``u = M⁻¹w/‖w‖_{M⁻¹}`` and ``s = U(π′) = β uᵀw``. Among all policies
    with ``β uᵀ(μ¹ − μ) = s``, the one of least ``E_x KL(·‖π¹)`` is the exponential tilt
    ``π_λ ∝ π¹ exp(−λβ uᵀφ)`` (I-projection; Csiszár 1975), and ``U(π_λ) ≥ β uᵀ(μ¹ − μ_λ) = s``,
    so ``π_λ`` is feasible with ``U(π_λ) ≥ U(π′)``. Hence the supremum over *all* policies is
    attained (or approached) in the family ``π′_z ∝ π¹ exp(zᵀφ)``, ``z ∈ R^d`` — but ``U`` is
    convex in ``μ′`` and the problem is not concave in ``z``, so a local search can stop short.

    **Search** (``exact=True``, the default). (1) The eigen-direction scan below; (2) SLSQP
    (scipy) over ``z`` from the ``n_starts`` best scan points, with the closed-form gradients
    ``∇_z μ′ = Σ′``, ``∇_z KL = Σ′z``, ``∇_z U = −β Σ′M⁻¹w/‖w‖_{M⁻¹}``
    (``Σ′ = E_x Cov_{π′_z}[φ]``); (3) the scale search of (1) along every SLSQP direction,
    which makes the returned point exactly feasible as evaluated. The best feasible point of
    (1)–(3) is returned, so it is never worse than the scan alone.

    **Certificate.** :meth:`upper_bound` bounds the optimum over all policies: for any feasible
    ``π′`` (with ``u``, ``s`` as above, ``X = −β uᵀφ``), the Donsker–Varadhan inequality gives,
    for every ``λ > 1/η``, ``λ s ≤ E_x KL(π′‖π¹) + Λ(λ) ≤ s/η + Λ(λ)``, so
    ``s ≤ Λ(λ)/(λ − 1/η)`` with ``Λ(λ) = E_x log E_{π¹} e^{λ(X − E X)}``; Bennett's lemma
    (``X − E X ≤ b_x = β R_x``, ``R_x = max_a ‖φ(x,a) − φ(x,π¹)‖_{M⁻¹}`` over the support of
    ``π¹``) gives ``Λ(λ) ≤ β² uᵀA(λ)u ≤ β² λ_max(A(λ), M)``,
    ``A(λ) = E_x Cov_{π¹}[φ]·ψ(λb_x)/b_x²``, ``ψ(y) = e^y − 1 − y``. The bound is the minimum over
    ``λ`` of ``β² λ_max(A(λ), M)/(λ − 1/η)`` and of the trivial ``β E_x R_x`` (triangle
    inequality). Contexts are pooled in ``bound_groups`` groups of similar ``b_x``, each with its
    largest ``b_x`` (valid: ``ψ(λb)/b²`` increases in ``b``). As ``β_t → 0`` the bound tends to
    ``2β_t²λ_max(Σ_π, M)/η``, the first-order value below.
    After every call, ``bound_`` holds it and ``certified_gap_ = bound_ − U(π²_t) ≥ 0`` the
    certified shortfall; both are also returned as ``explore_bound`` and
    ``explore_certified_gap``.

    **Eigen-direction scan** (``exact=False`` stops here). It runs over Gibbs policies of
    perturbed parameters,
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
    covariance and a ``d×d`` generalized eigenproblem per round. SLSQP costs ``O(d³)`` per
    iteration plus ``O(m K d)`` per gradient (covariance–vector products, no ``d×d`` matrix);
    the bound costs about 40 ``O(m K d²)`` evaluations.
    """

    name = "enhancer"

    def __init__(
        self,
        n_directions: int = 4,
        *,
        exact: bool = True,
        n_starts: int = 3,
        max_iter: int = 200,
        bound_groups: int = 32,
        max_doublings: int = 30,
        bisection_steps: int = 30,
    ) -> None:
        if n_directions < 1:
            raise PluralignError(f"n_directions must be ≥ 1, got {n_directions}")
        if n_starts < 1 or max_iter < 1 or bound_groups < 1:
            raise PluralignError(
                f"n_starts, max_iter and bound_groups must be ≥ 1, got "
                f"{n_starts}, {max_iter}, {bound_groups}"
            )
        self.n_directions = n_directions
        self.exact = exact
        self.n_starts = n_starts
        self.max_iter = max_iter
        self.bound_groups = bound_groups
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

    def _line_search(
        self, state: RoundState, dirs: np.ndarray, extra: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Largest feasible scale ``c`` along each column ``v`` of ``dirs`` (``‖v‖_M = 1``) of
        ``π¹ exp(c vᵀφ/η)``: ``(c, U, η·KL, probs, feasible)``; ``extra`` (one scale per
        direction) is also evaluated and kept where it is feasible with larger ``U``."""
        cs, eta, phi = state.confidence, state.eta, state.states.phi
        m = phi.shape[0]
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
            kl = np.mean(
                np.einsum("jmk,jmk->jm", probs, np.where(probs > 0, log_ratio, 0.0)), axis=1
            )
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
        feasible = (cost <= margin * unc) & (lo > 0)
        if extra is not None:
            unc_x, cost_x, probs_x = evaluate(extra)
            better = (cost_x <= margin * unc_x) & (extra > 0) & (~feasible | (unc_x > unc))
            lo, unc, cost = (
                np.where(better, extra, lo),
                np.where(better, unc_x, unc),
                np.where(better, cost_x, cost),
            )
            probs = np.where(better[:, None, None], probs_x, probs)
            feasible = feasible | better
        return lo, unc, cost, probs, feasible

    def _refine(self, state: RoundState, z0: np.ndarray) -> np.ndarray:
        """SLSQP on ``max_z U(π′_z)`` s.t. ``U(π′_z) − η KL(π′_z‖π¹) ≥ 0`` from ``z0``."""
        cs, eta, phi = state.confidence, state.eta, state.states.phi
        m = phi.shape[0]
        with np.errstate(divide="ignore"):
            log_main = np.log(state.main_probs)
        main_mean = np.einsum("ja,jad->d", state.main_probs, phi) / m
        cache: dict[bytes, tuple[float, float, np.ndarray, np.ndarray]] = {}

        def stats(z: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
            key = z.tobytes()
            if key not in cache:
                score = phi @ z
                logits = log_main + score
                lse = logsumexp(logits, axis=1)
                probs = np.exp(logits - lse[:, None])
                kl = float(np.mean(np.sum(probs * score, axis=1) - lse))
                w = main_mean - np.einsum("ja,jad->d", probs, phi) / m
                m_inv_w = cs.solve(w)
                norm = math.sqrt(max(float(w @ m_inv_w), 1e-300))

                def cov_times(v: np.ndarray, sv: np.ndarray | None = None) -> np.ndarray:
                    """``Σ′v = E_x Σ_a π′_a φ_a (vᵀφ_a − E_{π′} vᵀφ)``: ``O(mKd)``, no ``d×d``."""
                    sv = phi @ v if sv is None else sv
                    centred = probs * (sv - np.sum(probs * sv, axis=1, keepdims=True))
                    return np.einsum("ja,jad->d", centred, phi) / m

                grad_u = -cs.beta * cov_times(m_inv_w) / norm
                cache.clear()
                cache[key] = (cs.beta * norm, eta * max(kl, 0.0), grad_u, eta * cov_times(z, score))
            return cache[key]

        scale = max(stats(z0)[0], 1e-12)
        result = minimize(
            lambda z: -stats(z)[0] / scale,
            z0,
            jac=lambda z: -stats(z)[2] / scale,
            method="SLSQP",
            constraints=[
                {
                    "type": "ineq",
                    "fun": lambda z: (stats(z)[0] - stats(z)[1]) / scale,
                    "jac": lambda z: (stats(z)[2] - stats(z)[3]) / scale,
                }
            ],
            options={"maxiter": self.max_iter, "ftol": 1e-12},
        )
        z = np.asarray(result.x, float)
        return z if np.all(np.isfinite(z)) else z0

    def upper_bound(self, state: RoundState) -> float:
        """A certified upper bound on ``max U(π′)`` s.t. ``η KL(π′‖π¹) ≤ U(π′)`` over all
        policies (Donsker–Varadhan + Bennett, see the class docstring)."""
        cs, eta, phi, probs = state.confidence, state.eta, state.states.phi, state.main_probs
        m, _, d = phi.shape
        if cs.beta == 0.0:
            return 0.0
        mean = np.einsum("ja,jad->jd", probs, phi)
        dev = phi - mean[:, None, :]
        radius = np.max(np.where(probs > 0, cs.norm(dev), 0.0), axis=1)  # R_x
        trivial = float(cs.beta * radius.mean())
        # Contexts in groups of similar b_x, each group with its largest b_x: ψ(λb)/b² grows
        # with b and the covariances are PSD, so Σ_g w(b_g) C_g ≽ A(λ) (still a valid bound),
        # and each λ costs G·d² instead of m·K·d².
        order = np.argsort(radius)
        groups = np.array_split(order, min(self.bound_groups, m))
        centred = dev * np.sqrt(probs)[:, :, None]
        covs, b = [], []
        for group in groups:
            flat = centred[group].reshape(-1, d)
            covs.append(flat.T @ flat / m)
            b.append(cs.beta * radius[group].max())
        covs_arr, b_arr = np.stack(covs), np.asarray(b)

        def bound(t: float) -> float:
            lam = (1.0 + math.exp(t)) / eta  # λ > 1/η
            with np.errstate(over="ignore", invalid="ignore"):
                y = lam * b_arr
                weight = np.where(
                    b_arr > 1e-8, (np.expm1(y) - y) / np.maximum(b_arr, 1e-300) ** 2, 0.5 * lam**2
                )
            if not np.all(np.isfinite(weight)):
                return math.inf
            matrix = np.tensordot(weight, covs_arr, axes=1)
            top = eigh(matrix, cs.M, eigvals_only=True, subset_by_index=[d - 1, d - 1])
            return float(cs.beta**2 * max(top[0], 0.0) / (lam - 1.0 / eta))

        grid = np.linspace(-8.0, 6.0, 29)
        values = [bound(t) for t in grid]
        i = int(np.argmin(values))
        best = values[i]
        if math.isfinite(best):
            lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
            res = minimize_scalar(bound, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
            best = min(best, float(res.fun))
        return min(trivial, best)

    def second_policy(self, state: RoundState) -> tuple[np.ndarray, dict[str, float]]:
        cs, eta = state.confidence, state.eta
        vecs, lam = self.directions(state)
        dirs = np.concatenate([vecs, -vecs], axis=1)  # (d, J)
        scale, unc, cost, probs, feasible = self._line_search(state, dirs)
        eigen_unc = float(np.max(np.where(feasible, unc, 0.0)))
        source = np.arange(dirs.shape[1]) % len(lam)  # eigenvalue index of each candidate
        if self.exact and feasible.any():
            order = [j for j in np.argsort(-np.where(feasible, unc, -np.inf)) if feasible[j]]
            refined = [
                self._refine(state, scale[j] * dirs[:, j] / eta) for j in order[: self.n_starts]
            ]
            new = np.stack(refined, axis=1)  # (d, n_starts): z of π¹ exp(zᵀφ)
            length = np.sqrt(np.einsum("dj,de,ej->j", new, cs.M, new))
            keep = length > 1e-12
            if keep.any():
                new_dirs = new[:, keep] / length[keep]
                res = self._line_search(state, new_dirs, extra=eta * length[keep])
                scale = np.concatenate([scale, res[0]])
                unc = np.concatenate([unc, res[1]])
                cost = np.concatenate([cost, res[2]])
                probs = np.concatenate([probs, res[3]])
                feasible = np.concatenate([feasible, res[4]])
                source = np.concatenate([source, np.full(int(keep.sum()), -1)])
        self.bound_ = self.upper_bound(state) if self.exact else math.nan
        if not feasible.any():
            self.certified_gap_ = self.bound_
            info = {"uncertainty": 0.0, "explore_kl": 0.0, "explore_scale": 0.0}
            if self.exact:
                info.update(explore_bound=self.bound_, explore_certified_gap=self.certified_gap_)
            return state.main_probs.copy(), info
        best = int(np.argmax(np.where(feasible, unc, -np.inf)))
        chosen = probs[best] / probs[best].sum(axis=1, keepdims=True)
        self.certified_gap_ = max(self.bound_ - float(unc[best]), 0.0)
        info = {
            "uncertainty": float(unc[best]),
            "explore_kl": float(cost[best] / eta),
            "explore_scale": float(scale[best]),
            "explore_eigen_uncertainty": eigen_unc,  # the scan's best U
        }
        if source[best] >= 0:  # the choice is a scan point (not an SLSQP one)
            info["explore_eigenvalue"] = float(lam[source[best]])
        if self.exact:
            info.update(explore_bound=self.bound_, explore_certified_gap=self.certified_gap_)
        return chosen, info


def _pair_norms(state: RoundState, a1: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``β‖φ(x_j, a¹_j) − φ(x_j, c)‖_{M⁻¹}`` for every candidate ``c`` of ``candidates[j]``."""
    phi = state.states.phi
    rows = np.arange(phi.shape[0])
    diff = phi[rows, a1][:, None, :] - phi[rows[:, None], candidates]
    return state.confidence.beta * state.confidence.norm(diff)


def _draw_candidates(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` independent draws per row of ``probs``: an ``(m, n)`` array."""
    m = probs.shape[0]
    return sample_actions(np.repeat(probs, n, axis=0), rng).reshape(m, n)


class PairUncertainty(Exploration):
    """Per-pair uncertainty: ``a¹ ~ π¹_t``; ``n_candidates`` draws ``a ~ π¹_t`` (conditioned on
    ``a ≠ a¹`` with distinct pairs); ``a² = argmax_a ‖φ(x,a¹) − φ(x,a)‖_{M_t⁻¹}`` over them.

    The pair whose outcome the confidence set is least sure of (the width
    ``max_{θ∈C_t} θᵀΔφ − θ̂ᵀΔφ = β_t‖Δφ‖_{M_t⁻¹}``) among the main agent's samples — the
    per-pair form of the enhancer in the GSHF authors' code. ``info["uncertainty"]`` is the mean
    chosen width ``β_t‖Δφ‖_{M_t⁻¹}``.
    """

    name = "uncertainty"

    def __init__(self, n_candidates: int = 8) -> None:
        if isinstance(n_candidates, bool) or int(n_candidates) != n_candidates or n_candidates < 1:
            raise PluralignError(f"n_candidates must be a positive integer, got {n_candidates!r}")
        self.n_candidates = int(n_candidates)

    def draw_pairs(
        self, state: RoundState, rng: np.random.Generator, *, distinct: bool = True
    ) -> Pairs:
        main = state.main_probs
        a1 = sample_actions(main, rng)
        pool = exclude_actions(main, a1) if distinct else main
        candidates = _draw_candidates(pool, self.n_candidates, rng)
        widths = _pair_norms(state, a1, candidates)
        pick = np.argmax(widths, axis=1)
        rows = np.arange(main.shape[0])
        return Pairs(
            a1,
            candidates[rows, pick],
            {"uncertainty": float(widths[rows, pick].mean())},
            candidates,
        )


class BestWorst(Exploration):
    """Best-of-n vs worst-of-n: ``n_candidates`` draws from ``π¹_t``; ``a¹`` the first of largest
    estimated reward ``θ̂_tᵀφ``, ``a²`` the last of smallest (RLHF Workflow, Dong et al. 2024).

    With distinct pairs ``a²`` is the worst among the candidates that differ from ``a¹``, or, if
    all ``n`` draws are ``a¹``, a draw from ``π¹_t`` conditioned on ``a² ≠ a¹``. (Ties, e.g. at
    ``θ̂ = 0``, put ``a¹`` first and ``a²`` last among the tied candidates.)
    ``info["uncertainty"]`` is the mean width ``β_t‖Δφ‖_{M_t⁻¹}`` of the chosen pairs.
    """

    name = "best_worst"

    def __init__(self, n_candidates: int = 8) -> None:
        if isinstance(n_candidates, bool) or int(n_candidates) != n_candidates or n_candidates < 2:
            raise PluralignError(f"n_candidates must be an integer ≥ 2, got {n_candidates!r}")
        self.n_candidates = int(n_candidates)

    def draw_pairs(
        self, state: RoundState, rng: np.random.Generator, *, distinct: bool = True
    ) -> Pairs:
        main, phi = state.main_probs, state.states.phi
        m, n = main.shape[0], self.n_candidates
        rows = np.arange(m)
        candidates = _draw_candidates(main, n, rng)
        reward = (phi @ state.theta)[rows[:, None], candidates]  # (m, n)
        a1 = candidates[rows, np.argmax(reward, axis=1)]
        if distinct:
            reward = np.where(candidates != a1[:, None], reward, np.inf)
        last_min = n - 1 - np.argmin(reward[:, ::-1], axis=1)
        a2 = candidates[rows, last_min]
        if distinct:
            fallback = sample_actions(exclude_actions(main, a1), rng)
            alone = ~np.isfinite(reward[rows, last_min])
            a2 = np.where(alone, fallback, a2)
        width = _pair_norms(state, a1, a2[:, None])[:, 0]
        return Pairs(a1, a2, {"uncertainty": float(width.mean())}, candidates)


EXPLORATIONS: dict[str, type[Exploration]] = {
    "enhancer": Enhancer,
    "symmetric": Symmetric,
    "uniform": Uniform,
    "uncertainty": PairUncertainty,
    "best_worst": BestWorst,
}


def make_exploration(exploration: str | Exploration) -> Exploration:
    """An :class:`Exploration` from its name (a key of :data:`EXPLORATIONS`, default settings)."""
    if isinstance(exploration, Exploration):
        return exploration
    if exploration not in EXPLORATIONS:
        raise PluralignError(
            f"unknown exploration {exploration!r}; valid: {', '.join(EXPLORATIONS)}"
        )
    return EXPLORATIONS[exploration]()
