"""KL-regularized (Gibbs) policies and their offline pessimistic variants (docs/design.md §4).

Xiong et al. 2024, "Iterative Preference Learning from Human Feedback: Bridging Theory and
Practice for RLHF under KL-Constraint" (GSHF, ICML 2024, arXiv 2312.11456) study the reverse-KL
regularized contextual bandit

    J_η(π) = E_x [ Σ_a π(a|x) r(x,a) − η KL(π(·|x) ‖ π0(·|x)) ],

whose maximiser over all policies is the **Gibbs policy** ``π_r(a|x) ∝ π0(a|x) exp(r(x,a)/η)``,
with value ``η E_x log Σ_a π0(a|x) exp(r(x,a)/η)`` (the Donsker–Varadhan / Gibbs variational
principle; exact over finite action sets). :class:`Gibbs` is that policy for any fitted reward
model's estimate ``r̂``.

Offline, ``r̂`` may be wrong where the data say little, and the Gibbs policy exploits exactly those
errors. GSHF's two pessimistic options, for a model ``r = θᵀz(x, φ)`` with confidence set
``C = {θ : ‖θ − θ̂‖_M ≤ β}`` (:class:`~pluralign.confidence.ConfidenceSet`) and the reference
feature ``ν(x) = E_{a~π0(·|x)} φ(x, a)`` (``z`` is linear in ``φ``, so ``z(x, ν(x))`` is the
reference's mean feature), are :class:`PessimisticGibbs`:

* **option II** (``pointwise=True``): the Gibbs policy of the pointwise lower confidence bound
  ``r̃(x,a) = θ̂ᵀz(x,a) − β‖z(x,a) − z(x,ν(x))‖_{M⁻¹}``.
* **option I** (``pointwise=False``, the default): the policy-level max–min

      π̂ = argmax_π f(π),  f(π) = min_{θ∈C} θᵀw(π) − η E_x KL(π(·|x) ‖ π0(·|x)),
      w(π) = E_x [ z(x, φ_π(x)) − z(x, ν(x)) ],  φ_π(x) = Σ_a π(a|x) φ(x,a),

  with ``E_x`` the average over the given states. ``f`` is concave and ``C`` convex and compact,
  so (Sion) ``max_π min_θ = min_θ max_π``; the inner maximum is the Gibbs policy of ``θ`` and gives
  the convex, smooth dual

      g(θ) = η E_x log Σ_a π0(a|x) exp(θᵀz(x,a)/η) − θᵀ E_x z(x, ν(x)),
      ∇g(θ) = w(π_θ),   ∇²g(θ) = (1/η) E_x Cov_{a~π_θ(·|x)}[z(x,a)].

  We minimise ``g`` over ``C`` exactly by a projected Newton method in the coordinates
  ``θ = θ̂ + β L⁻ᵀu``, ``‖u‖ ≤ 1`` (``M = LLᵀ``): each step minimises the quadratic model of ``g``
  over the unit ball (a convex trust-region subproblem, solved in the Hessian's eigenbasis by
  bisection on its multiplier) and backtracks along the segment to it (Armijo). Every iterate
  ``θ_t ∈ C`` gives a Gibbs policy ``π_{θ_t}`` (a primal point) and an upper bound
  ``g(θ_t) ≥ f(π*)`` (weak duality), so the solver returns the best primal point and a
  **certified gap** ``min_t g(θ_t) − max_t f(π_{θ_t}) ≥ f(π*) − f(π̂)``, stopping when it is
  ``≤ tol``. The first iterate is ``θ̂`` (the MLE-Gibbs policy), and when ``0 ∈ C`` the
  reference policy (``w = 0``, value 0) is optimal, as for
  :class:`~pluralign.policies.Pessimistic`.

``reference`` is ``π0``: ``"uniform"``, an ``(m, K)`` matrix of probabilities, ``(m,)`` reference
actions, or a callable ``targets -> (m, K)`` probabilities (e.g.
:meth:`pluralign.envs.KLBandit.reference_probs`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import solve_triangular
from scipy.special import logsumexp

from pluralign.confidence import ConfidenceSet
from pluralign.data import TargetStates
from pluralign.errors import ConvergenceWarning, PluralignError
from pluralign.policies.base import Policy
from pluralign.policies.pessimistic import Reference, reference_probs
from pluralign.rewards import RewardModel
from pluralign.rewards.diagnostics import gap_message, warn
from pluralign.rewards.linear import LinearInParameters
from pluralign.rewards.validation import check_int, check_number

__all__ = [
    "Gibbs",
    "PessimisticGibbs",
    "gibbs_probs",
    "kl_divergence",
    "soft_value",
]

_CHUNK_ENTRIES = 1 << 22


def _check_eta(eta: float) -> float:
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not eta > 0:
        raise PluralignError(f"eta must be a positive number, got {eta!r}")
    return float(eta)


def _log(probs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(probs)


def gibbs_probs(rewards: np.ndarray, ref_probs: np.ndarray, eta: float) -> np.ndarray:
    """``π(a|x) ∝ π0(a|x) exp(r(x,a)/η)`` row by row, computed in log space (exact, stable)."""
    logits = _log(ref_probs) + np.asarray(rewards, dtype=np.float64) / _check_eta(eta)
    return np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))


def soft_value(rewards: np.ndarray, ref_probs: np.ndarray, eta: float) -> np.ndarray:
    """``η log Σ_a π0(a|x) exp(r(x,a)/η)`` per state: ``max_π Σπr − η KL(π‖π0)``."""
    eta = _check_eta(eta)
    return eta * logsumexp(_log(ref_probs) + np.asarray(rewards, float) / eta, axis=-1)


def kl_divergence(probs: np.ndarray, ref_probs: np.ndarray) -> np.ndarray:
    """``KL(π(·|x) ‖ π0(·|x)) = Σ_a π log(π/π0)`` per state (``0 log 0 = 0``; inf off support)."""
    probs, ref_probs = np.asarray(probs, float), np.asarray(ref_probs, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * (_log(probs) - _log(ref_probs)), 0.0)
    # Rounding can make a true 0 come out at −1e-17.
    return np.maximum(np.sum(terms, axis=-1), 0.0)


class Gibbs(Policy):
    """The Gibbs policy ``π(a|x) ∝ π0(a|x) exp(r̂(x,a)/η)`` of a fitted reward model.

    Parameters
    ----------
    model:
        Any fitted :class:`~pluralign.rewards.RewardModel` (its ``reward(x, φ)`` is used).
    eta:
        The KL coefficient ``η > 0``.
    reference:
        ``π0`` (see :func:`~pluralign.policies.reference_probs`).

    It maximises ``E_x[Σ_a π r̂ − η KL(π‖π0)]`` exactly (GSHF, Xiong et al. 2024, eq. (2)).
    """

    def __init__(self, model: RewardModel, eta: float, *, reference: Reference = "uniform") -> None:
        self.model = model
        self.eta = _check_eta(eta)
        self.reference = reference

    def probs(self, targets: TargetStates) -> np.ndarray:
        ref = reference_probs(self.reference, targets)
        return gibbs_probs(self.model.reward(targets.x, targets.phi), ref, self.eta)


class PessimisticGibbs(Policy):
    """GSHF's offline pessimistic Gibbs policies (options I and II; see the module docstring).

    Parameters
    ----------
    model:
        A fitted linear-in-parameters model (``Linear``, ``Bilinear``, ``RTVReduced``).
    confidence:
        Its :class:`~pluralign.confidence.ConfidenceSet` ``C``.
    eta:
        The KL coefficient ``η``.
    reference:
        ``π0``; also defines ``ν(x) = E_{π0} φ(x, ·)``.
    pointwise:
        ``True``: option II (Gibbs policy of the pointwise lower confidence bound).
        ``False``: option I (policy-level max–min, solved to a certified gap).
    tol:
        Option I stops when its certified gap is ``≤ tol`` (reward units; finite, ``> 0``).
    max_iter:
        Option I's cap on Newton steps (an integer ``≥ 1``; ``converged_`` is False if reached
        first). When option I ends above ``tol`` (the cap, or no descent step left at rounding
        level) a ``ConvergenceWarning`` states the gap reached and ``tol``.

    After ``probs(targets)``: ``duality_gap_`` (certified bound on ``f(π*) − f(π̂)``, 0 for option
    II), ``n_iter_`` (Newton steps taken), ``converged_``, ``pessimistic_value_`` (``f(π̂)``)
    and, for option I, ``theta_`` (the worst-case parameter whose Gibbs policy is returned).
    """

    def __init__(
        self,
        model: LinearInParameters,
        confidence: ConfidenceSet,
        eta: float,
        *,
        reference: Reference = "uniform",
        pointwise: bool = False,
        tol: float = 1e-8,
        max_iter: int = 200,
    ) -> None:
        confidence.check_model(model)
        self.model = model
        self.confidence = confidence
        self.eta = _check_eta(eta)
        self.reference = reference
        self.pointwise = pointwise
        self.tol = tol
        self.max_iter = max_iter

    # ------------------------------------------------------------------ values
    def _setup(self, targets: TargetStates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ref = reference_probs(self.reference, targets)
        nu = np.einsum("ja,jad->jd", ref, targets.phi)
        return ref, nu, self.model.mean_features(targets.x, nu)

    def _w(self, probs: np.ndarray, targets: TargetStates, w_ref: np.ndarray) -> np.ndarray:
        mean_phi = np.einsum("ja,jad->jd", probs, targets.phi)
        return self.model.mean_features(targets.x, mean_phi) - w_ref

    def objective(self, probs: np.ndarray, targets: TargetStates) -> float:
        """``f(π) = min_{θ∈C} θᵀw(π) − η E_x KL(π‖π0)`` for an explicit ``(m, K)`` policy."""
        ref, _, w_ref = self._setup(targets)
        return self._objective(np.asarray(probs, float), targets, ref, w_ref)

    def _objective(
        self, probs: np.ndarray, targets: TargetStates, ref: np.ndarray, w_ref: np.ndarray
    ) -> float:
        worst = float(self.confidence.worst_case(self._w(probs, targets, w_ref)))
        return worst - self.eta * float(np.mean(kl_divergence(probs, ref)))

    def probs(self, targets: TargetStates) -> np.ndarray:
        check_number(self.tol, "tol", owner=type(self).__name__, strict=True)
        check_int(self.max_iter, "max_iter", owner=type(self).__name__)
        if self.pointwise:
            return self._pointwise(targets)
        return self._max_min(targets)

    # ------------------------------------------------------------------ option II
    def _pointwise(self, targets: TargetStates) -> np.ndarray:
        cs, model = self.confidence, self.model
        ref, nu, w_ref = self._setup(targets)
        diff = targets.phi - nu[:, None, :]  # z(x,φ) − z(x,ν) = z(x, φ − ν): z is linear in φ
        width = np.empty((targets.m, targets.n_actions))
        chunk = max(1, _CHUNK_ENTRIES // (targets.n_actions * cs.n_params))
        for start in range(0, targets.m, chunk):
            part = slice(start, min(targets.m, start + chunk))
            x = None if targets.x is None else targets.x[part]
            width[part] = cs.norm(model.features(x, diff[part]))
        lcb = model.reward_at(cs.center, targets.x, targets.phi) - cs.beta * width
        probs = gibbs_probs(lcb, ref, self.eta)
        self.duality_gap_, self.n_iter_, self.converged_ = 0.0, 0, True
        self.pessimistic_value_ = self._objective(probs, targets, ref, w_ref)
        return probs

    # ------------------------------------------------------------------ option I
    def _max_min(self, targets: TargetStates) -> np.ndarray:
        cs, model, eta = self.confidence, self.model, self.eta
        ref, _, w_ref = self._setup(targets)
        log_ref = _log(ref)
        if cs.contains(np.zeros(cs.n_params)):
            # θ = 0 ∈ C: g(0) = 0 bounds f(π*), and π0 attains f(π0) = 0.
            self.duality_gap_, self.n_iter_, self.converged_ = 0.0, 0, True
            self.pessimistic_value_, self.theta_ = 0.0, np.zeros(cs.n_params)
            return ref.copy()
        chol = np.linalg.cholesky(cs.M)  # M = L Lᵀ

        def theta_of(u: np.ndarray) -> np.ndarray:  # θ̂ + β L⁻ᵀ u
            return cs.center + cs.beta * solve_triangular(chol, u, lower=True, trans="T")

        def evaluate(u: np.ndarray, order: int):
            theta = theta_of(u)
            scores = log_ref + model.reward_at(theta, targets.x, targets.phi) / eta
            norm = logsumexp(scores, axis=1, keepdims=True)
            probs = np.exp(scores - norm)
            dual = eta * float(np.mean(norm)) - float(theta @ w_ref)
            if order == 0:
                return dual, probs, theta
            w = self._w(probs, targets, w_ref)  # ∇g(θ)
            grad = cs.beta * solve_triangular(chol, w, lower=True)  # ∇_u = β L⁻¹ ∇g
            if order == 1:
                return dual, probs, theta, grad
            hess = cs.beta**2 * self._whitened_hessian(probs, targets, chol)
            return dual, probs, theta, grad, hess

        u = np.zeros(cs.n_params)
        dual, probs, theta, grad, hess = evaluate(u, 2)
        best_dual = dual
        best_primal = self._objective(probs, targets, ref, w_ref)
        best_probs, best_theta = probs, theta
        steps, reason = 0, "iteration cap"
        while steps < self.max_iter:
            if best_dual - best_primal <= self.tol:
                break
            step = _ball_newton_step(u, grad, hess) - u
            slope = float(grad @ step)
            if slope >= 0.0:  # stationary for the model: a KKT point (up to rounding)
                reason = "no descent step left: stationary up to rounding"
                break
            t = 1.0
            while True:
                new_dual, probs, theta = evaluate(u + t * step, 0)
                if new_dual <= dual + 1e-4 * t * slope or t < 1e-12:
                    break
                t *= 0.5
            u = u + t * step
            u /= max(1.0, float(np.linalg.norm(u)))  # stay in the ball despite rounding
            steps += 1
            dual, probs, theta, grad, hess = evaluate(u, 2)
            best_dual = min(best_dual, dual)
            primal = self._objective(probs, targets, ref, w_ref)
            if primal > best_primal:
                best_primal, best_probs, best_theta = primal, probs, theta
        self.duality_gap_ = max(best_dual - best_primal, 0.0)
        self.n_iter_ = steps
        self.converged_ = self.duality_gap_ <= self.tol
        self.pessimistic_value_ = best_primal
        self.theta_ = best_theta
        if not self.converged_:
            warn(
                gap_message(
                    "PessimisticGibbs (option I)", self.duality_gap_, self.tol, steps, reason
                ),
                ConvergenceWarning,
            )
        return best_probs

    def _whitened_hessian(
        self, probs: np.ndarray, targets: TargetStates, chol: np.ndarray
    ) -> np.ndarray:
        """``L⁻¹ ∇²g L⁻ᵀ`` with ``∇²g = (1/η) E_x Cov_{π}[z]``, accumulated in chunks of states."""
        n_params, n_actions = self.confidence.n_params, targets.n_actions
        cov = np.zeros((n_params, n_params))
        chunk = max(1, _CHUNK_ENTRIES // (n_actions * n_params))
        for start in range(0, targets.m, chunk):
            part = slice(start, min(targets.m, start + chunk))
            x = None if targets.x is None else targets.x[part]
            z = self.model.features(x, targets.phi[part])  # (c, K, p)
            p = probs[part]
            centred = z - np.einsum("ja,jak->jk", p, z)[:, None, :]
            weighted = centred * np.sqrt(p)[:, :, None]
            flat = weighted.reshape(-1, n_params)
            cov += flat.T @ flat
        cov /= targets.m * self.eta
        half = solve_triangular(chol, cov, lower=True)
        return solve_triangular(chol, half.T, lower=True)  # L⁻¹ cov L⁻ᵀ (symmetric)


def _ball_newton_step(u: np.ndarray, grad: np.ndarray, hess: np.ndarray) -> np.ndarray:
    """``argmin_{‖v‖≤1} gradᵀ(v − u) + ½(v − u)ᵀ hess (v − u)`` for a PSD ``hess``.

    With ``b = grad − hess·u`` this is ``min ½vᵀHv + bᵀv`` on the unit ball: ``v(μ) = −(H + μI)⁻¹b``
    with ``μ = 0`` if that lies in the ball, else the ``μ > 0`` with ``‖v(μ)‖ = 1`` (bisection in
    log μ on the decreasing secular function, in the eigenbasis of ``H``).
    """
    hess = 0.5 * (hess + hess.T)
    lam, vecs = np.linalg.eigh(hess)
    lam = np.maximum(lam, 0.0)
    b = vecs.T @ (grad - hess @ u)
    scale = max(float(lam[-1]), float(np.linalg.norm(b)), 1e-300)
    floor = 1e-13 * scale
    live = lam > floor
    if not np.any(np.abs(b[~live]) > 1e-12 * scale):
        inner = np.zeros_like(b)
        inner[live] = -b[live] / lam[live]
        if float(np.linalg.norm(inner)) <= 1.0:
            return vecs @ inner

    def norm_at(mu: float) -> float:
        return float(np.linalg.norm(b / (lam + mu)))

    lo, hi = floor, max(float(np.linalg.norm(b)), floor)
    while norm_at(hi) > 1.0:
        hi *= 2.0
    if norm_at(lo) <= 1.0:
        mu = lo
    else:
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if norm_at(mid) > 1.0:
                lo = mid
            else:
                hi = mid
            if hi / lo < 1.0 + 1e-14:
                break
        mu = hi
    v = vecs @ (-b / (lam + mu))
    return v / max(1.0, float(np.linalg.norm(v)))
