"""Pessimistic policies over a confidence set: the max–min policy and its pointwise variant.

For a model ``r = θᵀz(x, φ)`` with confidence set ``C = {θ : ‖θ − θ̂‖_M ≤ β}``, on target states
``j = 1..m`` with candidates ``a = 1..K`` and a reference policy ``π_ref``
(Zhu, Jordan & Jiao 2023; LoCo-RLHF's PRS when the model is RTV-reduced):

    π̂ = argmax_π min_{θ∈C} θᵀ w(π),   w(π) = (1/m) Σ_j (Σ_a π(a|j) z(j,a) − Σ_a π_ref(a|j) z(j,a))
      = argmax_π f(π),                f(π) = θ̂ᵀ w(π) − β ‖w(π)‖_{M⁻¹}.

``f`` is concave on the product of simplices but not separable across states. It is solved by
**Frank–Wolfe with an active set and pairwise corrections** (the pairwise / fully-corrective
variants of Lacoste-Julien & Jaggi 2015, "On the global linear convergence of Frank–Wolfe
optimization variants"). The iterate is a convex combination ``π = Σ_i λ_i e(a_i)`` of vertices of
the product of simplices (deterministic policies ``a_i``, one action per state), held in ``k``-space
as ``v_i = w(e(a_i))``, ``M⁻¹v_i``, ``θ̂ᵀv_i`` and the Gram matrix ``G_ij = v_iᵀM⁻¹v_j``. Each
iteration

1. takes the worst-case parameter ``θ_t = θ̂ − β M⁻¹w / ‖w‖_{M⁻¹}`` (the supergradient of ``f``),
2. calls the linear oracle: a per-state argmax of ``θ_tᵀz(j, a)`` (``reward_at``, no ``z``), whose
   value is the dual bound below, and adds that vertex to the active set (its ``v`` from the
   heaviest active vertex's through the states where they differ: ``mean_features`` on those
   states, one solve with ``M``),
3. re-optimizes the weights ``λ`` over the active set by pairwise steps (mass moves from the worst
   active vertex under the gradient to the best one, exact line search on the one-dimensional
   concave function), which needs only ``G`` and ``θ̂ᵀv_i``.

Plain Frank–Wolfe only ever moves towards a vertex, so it zig-zags at ``O(1/t)`` towards optima
that mix actions (and stalls near them); the pairwise steps remove weight from the wrong vertices
directly. At the cone point ``w = 0`` (where ``‖w‖`` is not differentiable: the reference policy's
neighbourhood), ``θ_t`` is instead the dual solution of the active-set problem
(``argmin_{θ∈C} max_i θᵀv_i``, a small problem in the span of the ``M⁻¹v_i``), zero-weight vertices
are kept as its cutting planes, and the weights are also re-solved directly (a pairwise step may
find no ascent there while a combination does). The certificate is unchanged:

    h(θ) = max_π θᵀw(π) = (1/m) Σ_j max_a θᵀ(z(j,a) − z_ref(j)) ≥ f(π*)   for every θ ∈ C,

and the solver keeps the best such bound over the visited ``θ_t``, stops when
``min_t h(θ_t) − f(π) ≤ tol`` and reports it as ``duality_gap_``, a certified bound on
``f(π*) − f(π̂)``. When ``‖θ̂‖_M ≤ β`` the set contains ``θ = 0``, whose ``h(0) = 0`` shows that the
reference policy (value 0) is optimal: it is returned at once. Rewards ``θ_tᵀz`` and ``w(π)`` use
the model's ``reward_at`` / ``mean_features``, so ``z`` is never formed for the max–min policy.

``pointwise=True`` gives the per-state lower-confidence-bound policy
``argmax_a θ̂ᵀz(j,a) − β‖z(j,a) − z_ref(j)‖_{M⁻¹}`` (``z_ref(j) = Σ_a π_ref(a|j) z(j,a)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize

from pluralign.confidence import ConfidenceSet
from pluralign.data import TargetStates
from pluralign.errors import ConvergenceWarning, PluralignError
from pluralign.policies.base import Policy, one_hot_argmax
from pluralign.rewards._checks import check_int, check_number, gap_message, warn
from pluralign.rewards.linear import LinearInParameters

__all__ = ["Pessimistic", "Reference", "reference_probs"]

_CHUNK_ENTRIES = 1 << 22
_CORRECTIVE_STEPS = 2000  # pairwise steps on the active set per Frank–Wolfe vertex
_MAX_ATOMS = 64  # vertices kept with zero weight until the set is this large


Reference = str | np.ndarray | Callable[[TargetStates], np.ndarray]


def reference_probs(reference: Reference, targets: TargetStates) -> np.ndarray:
    """``π_ref`` as a validated ``(m, K)`` matrix.

    ``"uniform"`` (the default: the mean candidate, i.e. a uniformly random reference action),
    an ``(m,)`` array of reference actions, an ``(m, K)`` reference policy, or a callable
    ``targets -> (m, K)`` policy (e.g. an environment's ``reference_probs``).
    """
    if callable(reference):
        reference = np.asarray(reference(targets), dtype=np.float64)
    m, n_actions = targets.m, targets.n_actions
    if isinstance(reference, str):
        if reference != "uniform":
            raise PluralignError(f"unknown reference {reference!r}; use 'uniform' or an array")
        return np.full((m, n_actions), 1.0 / n_actions)
    ref = np.asarray(reference)
    if ref.shape == (m,):
        if ref.dtype.kind not in "iu" or ref.min() < 0 or ref.max() >= n_actions:
            raise PluralignError(f"reference actions must be integers in [0, {n_actions})")
        return one_hot_argmax(np.eye(n_actions)[ref])
    if ref.shape == (m, n_actions):
        if (ref < 0).any() or not np.allclose(ref.sum(axis=1), 1.0):
            raise PluralignError("a reference policy's rows must be probability vectors")
        return ref.astype(float)
    raise PluralignError(f"reference must have shape ({m},) or ({m}, {n_actions}), got {ref.shape}")


def _line_search(b: float, c: float, e: float, g: float, beta: float) -> float:
    """argmax over γ ∈ [0, 1] of ``γ·b − β sqrt(c + 2γe + γ²g)`` (concave), by bisection on its
    decreasing derivative."""

    def slope(gamma: float) -> float:
        q = max(c + 2 * gamma * e + gamma * gamma * g, 0.0)
        if q == 0.0:
            return b - beta * math.sqrt(max(g, 0.0))
        return b - beta * (e + gamma * g) / math.sqrt(q)

    if slope(1.0) >= 0.0:
        return 1.0
    if slope(0.0) <= 0.0:
        return 0.0
    # The root in closed form: b·sqrt(q(γ)) = β(e + γg) gives γ = (b·sqrt(Δ/(β²g − b²)) − e)/g
    # with Δ = cg − e² ≥ 0 (Cauchy–Schwarz); bisection where that is ill-conditioned.
    spread = c * g - e * e
    room = beta * beta * g - b * b
    if g > 0.0 and room > 0.0 and spread > 1e-8 * c * g:
        gamma = (b * math.sqrt(spread / room) - e) / g
        if 0.0 < gamma < 1.0:
            return gamma
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _corrective(
    c: np.ndarray, gram: np.ndarray, lam: np.ndarray, beta: float, tol: float, max_steps: int
) -> np.ndarray:
    """Pairwise Frank–Wolfe on the weights of the active vertices.

    Maximizes ``g(λ) = cᵀλ − β sqrt(λᵀGλ)`` over the simplex (``c_i = θ̂ᵀv_i``,
    ``G_ij = v_iᵀM⁻¹v_j`` for the active vertices' ``w``-vectors ``v_i``): each step moves mass
    from the away vertex (the worst active one under the gradient) to the best one, with the exact
    line search; it stops when that pairwise gap, an upper bound on ``max g − g(λ)``, is ``≤ tol``.
    """
    lam = lam.copy()
    g_lam = gram @ lam
    for step in range(max_steps):
        if step % 64 == 63:
            g_lam = gram @ lam  # no drift from the rank-one updates
        q = max(float(lam @ g_lam), 0.0)
        grad = c - beta * g_lam / math.sqrt(q) if q > 0.0 else c
        active = np.flatnonzero(lam > 0.0)
        i = int(np.argmax(grad))
        j = int(active[np.argmin(grad[active])])
        if i == j or grad[i] - grad[j] <= tol:
            break
        mass = float(lam[j])
        e = float(g_lam[i] - g_lam[j])
        curv = float(gram[i, i] - 2.0 * gram[i, j] + gram[j, j])
        gamma = _line_search(mass * float(c[i] - c[j]), q, mass * e, mass * mass * curv, beta)
        if gamma <= 0.0:
            break
        moved = gamma * mass
        lam[i] += moved
        lam[j] = 0.0 if gamma >= 1.0 else lam[j] - moved
        g_lam += moved * (gram[:, i] - gram[:, j])
    return lam


def _restricted_dual(lin: np.ndarray, gram: np.ndarray, beta: float) -> np.ndarray:
    """Weights ``α`` of the minimizer ``θ = θ̂ + β Σ_i α_i M⁻¹v_i`` of ``max_i θᵀv_i`` over ``C``.

    The dual of the active-set problem ``max_λ g(λ)``, as a small problem in the span of
    ``M⁻¹v_i`` (``θᵀv_i = c_i + β(Gα)_i``, ``‖θ − θ̂‖_M² = β² αᵀGα``), by SLSQP. Used where ``w``
    is (nearly) 0, the cone point of ``f`` at which ``θ̂ − βM⁻¹w/‖w‖`` is not defined; any ``θ ∈ C``
    is a valid dual point, so an inexact solve only weakens the bound.
    """
    n = lin.size

    def objective(v: np.ndarray) -> float:
        return float(v[-1])

    def jac(v: np.ndarray) -> np.ndarray:
        out = np.zeros(n + 1)
        out[-1] = 1.0
        return out

    constraints = [
        {
            "type": "ineq",
            "fun": lambda v: v[-1] - lin - beta * (gram @ v[:-1]),
            "jac": lambda v: np.hstack([-beta * gram, np.ones((n, 1))]),
        },
        {
            "type": "ineq",
            "fun": lambda v: np.array([1.0 - v[:-1] @ gram @ v[:-1]]),
            "jac": lambda v: np.append(-2.0 * (gram @ v[:-1]), 0.0)[None, :],
        },
    ]
    start = np.append(np.zeros(n), float(lin.max()))
    result = minimize(
        objective,
        start,
        jac=jac,
        method="SLSQP",
        constraints=constraints,
        options={"ftol": 1e-15, "maxiter": 500},
    )
    alpha = np.asarray(result.x[:-1], float)
    q = float(alpha @ gram @ alpha)
    return alpha / math.sqrt(q) if q > 1.0 else alpha


def _escape_cone(lin: np.ndarray, gram: np.ndarray, lam: np.ndarray, beta: float) -> np.ndarray:
    """``max_λ g(λ)`` over the simplex by SLSQP from a few starts, kept only if better than
    ``lam``: at ``w = 0`` every pairwise direction may descend while a combination ascends
    (``f`` is concave and positively homogeneous there, so superadditive)."""
    n = lin.size

    def value(v: np.ndarray) -> float:
        return float(lin @ v) - beta * math.sqrt(max(float(v @ gram @ v), 0.0))

    best, best_value = lam, value(lam)
    starts = [np.full(n, 1.0 / n)] + [np.eye(n)[i] for i in np.argsort(-lin)[:7]]
    for start in starts:
        result = minimize(
            lambda v: -value(v),
            start,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * n,
            constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1.0}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        cand = np.clip(result.x, 0.0, None)
        cand /= cand.sum()
        cand_value = value(cand)
        if cand_value > best_value:
            best, best_value = cand, cand_value
    return best


class Pessimistic(Policy):
    """The pessimistic (max–min) policy of a linear-in-parameters model and its confidence set.

    Parameters
    ----------
    model:
        A fitted model with ``params_``, ``reward_at`` and ``mean_features`` (``Linear``,
        ``Bilinear``, ``RTVReduced``; with ``RTVReduced`` this is LoCo-RLHF's PRS policy).
    confidence:
        Its :class:`~pluralign.confidence.ConfidenceSet`.
    reference:
        The reference policy ``π_ref`` (see :func:`reference_probs`).
    pointwise:
        Per-state lower-confidence-bound argmax instead of the policy-level max–min.
    tol:
        The solver stops when its certified duality gap is ``≤ tol`` (in reward units; finite,
        ``> 0``).
    max_iter:
        Cap on Frank–Wolfe iterations, i.e. linear-oracle calls (an integer ``≥ 1``;
        ``converged_`` is False if reached first, and a ``ConvergenceWarning`` states the gap
        reached and ``tol``).

    After ``probs(targets)``: ``duality_gap_``, ``n_iter_`` (linear-oracle calls),
    ``converged_``, ``n_active_`` (vertices in the active set, zero-weight ones included), and
    ``pessimistic_value_`` (``f(π̂)``, the certified lower bound of the improvement over
    ``π_ref`` for every ``θ ∈ C``).
    """

    def __init__(
        self,
        model: LinearInParameters,
        confidence: ConfidenceSet,
        *,
        reference: str | np.ndarray = "uniform",
        pointwise: bool = False,
        tol: float = 1e-6,
        max_iter: int = 1000,
    ) -> None:
        confidence.check_model(model)
        self.model = model
        self.confidence = confidence
        self.reference = reference
        self.pointwise = pointwise
        self.tol = tol
        self.max_iter = max_iter

    # ------------------------------------------------------------------ values
    def _w(self, probs: np.ndarray, targets: TargetStates, w_ref: np.ndarray) -> np.ndarray:
        mean_phi = np.einsum("ja,jad->jd", probs, targets.phi)
        return self.model.mean_features(targets.x, mean_phi) - w_ref

    def objective(self, probs: np.ndarray, targets: TargetStates) -> float:
        """``f(π) = min_{θ∈C} θᵀw(π)`` for an explicit ``(m, K)`` policy."""
        ref = reference_probs(self.reference, targets)
        w_ref = self.model.mean_features(targets.x, np.einsum("ja,jad->jd", ref, targets.phi))
        return float(self.confidence.worst_case(self._w(probs, targets, w_ref)))

    def probs(self, targets: TargetStates) -> np.ndarray:
        check_number(self.tol, "tol", owner=type(self).__name__, strict=True)
        check_int(self.max_iter, "max_iter", owner=type(self).__name__)
        if self.pointwise:
            return self._pointwise(targets)
        return self._frank_wolfe(targets)

    def _owner(self) -> str:
        user = getattr(self.model, "user", None)
        return type(self).__name__ + ("" if user is None else f"(user={user!r})")

    # ------------------------------------------------------------------ solvers
    def _frank_wolfe(self, targets: TargetStates) -> np.ndarray:
        cs, model = self.confidence, self.model
        ref = reference_probs(self.reference, targets)
        w_ref = model.mean_features(targets.x, np.einsum("ja,jad->jd", ref, targets.phi))
        if cs.contains(np.zeros(cs.k)):
            # ‖θ̂‖_M ≤ β: θ = 0 is in C, so h(0) = 0 bounds every policy's pessimistic value and
            # the reference policy (w = 0, value 0) is optimal: not enough evidence to deviate.
            self.duality_gap_, self.n_iter_, self.converged_ = 0.0, 0, True
            self.pessimistic_value_ = 0.0
            return ref.copy()
        rows = np.arange(targets.m)
        # Active set: vertices of the product of simplices (deterministic policies, one action
        # per state) with weights λ; the iterate is π = Σ_i λ_i e_{acts_i}, w(π) = Σ_i λ_i v_i.
        acts = [np.argmax(model.reward_at(cs.center, targets.x, targets.phi), axis=1)]
        vecs = [model.mean_features(targets.x, targets.phi[rows, acts[0]]) - w_ref]
        solved = [cs.solve(vecs[0])]  # M⁻¹v_i
        gram = np.array([[float(vecs[0] @ solved[0])]])  # G_ij = v_iᵀM⁻¹v_j
        lin = np.array([float(cs.center @ vecs[0])])  # θ̂ᵀv_i
        lam = np.ones(1)
        dual_bound = np.inf  # min over visited θ_t ∈ C of h(θ_t) = max_π θ_tᵀw(π) ≥ f(π*)
        value = -np.inf
        stalled = False
        it = 0
        for it in range(1, self.max_iter + 1):
            w = lam @ np.asarray(vecs)
            m_inv_w = lam @ np.asarray(solved)
            size = math.sqrt(max(float(w @ m_inv_w), 0.0))
            value = float(cs.center @ w) - cs.beta * size
            if stalled or size <= 1e-6 * math.sqrt(float(np.max(np.diag(gram)))):
                # at (or next to) the cone point w = 0, or when the Frank–Wolfe vertex is already
                # active: the dual of the active-set problem gives the next linear step
                alpha = _restricted_dual(lin, gram, cs.beta)
                theta_t = cs.center + cs.beta * (alpha @ np.asarray(solved))
            else:
                theta_t = cs.center - cs.beta * m_inv_w / size
            scores = model.reward_at(theta_t, targets.x, targets.phi)
            best = np.argmax(scores, axis=1)
            dual_bound = min(dual_bound, float(np.mean(scores[rows, best]) - theta_t @ w_ref))
            if dual_bound - value <= self.tol or it == self.max_iter:
                break
            # The Frank–Wolfe vertex joins the active set (its w-vector from the nearest active
            # vertex's, through the states where the two differ).
            differ = [int(np.count_nonzero(best != other)) for other in acts]
            stalled = min(differ) == 0
            if not stalled:
                base = int(np.argmin(differ))
                changed = np.flatnonzero(best != acts[base])
                step = (
                    targets.phi[changed, best[changed]] - targets.phi[changed, acts[base][changed]]
                )
                x = None if targets.x is None else targets.x[changed]
                vec = vecs[base] + model.mean_features(x, step) * (changed.size / targets.m)
                vec_solved = cs.solve(vec)
                column = np.asarray(vecs) @ vec_solved
                gram = np.block(
                    [
                        [gram, column[:, None]],
                        [column[None, :], np.array([[float(vec @ vec_solved)]])],
                    ]
                )
                acts.append(best)
                vecs.append(vec)
                solved.append(vec_solved)
                lin = np.append(lin, float(cs.center @ vec))
                lam = np.append(lam, 0.0)
            # Corrective pairwise steps over the active set (at the cone point w = 0, where a
            # pairwise step may find no ascent, also a direct solve of the small problem).
            lam = _corrective(lin, gram, lam, cs.beta, 0.1 * self.tol, _CORRECTIVE_STEPS)
            if float(lam @ gram @ lam) <= 1e-12 * float(np.max(np.diag(gram))):
                lam = _escape_cone(lin, gram, lam, cs.beta)
            # Unused vertices stay (they are the cutting planes of the dual at w = 0) until the
            # set grows past _MAX_ATOMS.
            keep = np.flatnonzero(lam > 0.0)
            if lam.size > _MAX_ATOMS and keep.size < lam.size:
                acts = [acts[i] for i in keep]
                vecs = [vecs[i] for i in keep]
                solved = [solved[i] for i in keep]
                gram, lin, lam = gram[np.ix_(keep, keep)], lin[keep], lam[keep]
        probs = np.zeros((targets.m, targets.n_actions))
        for weight, chosen in zip(lam, acts, strict=True):
            probs[rows, chosen] += weight
        self.duality_gap_ = dual_bound - value
        self.n_iter_ = it
        self.converged_ = self.duality_gap_ <= self.tol
        self.pessimistic_value_ = value
        self.n_active_ = len(acts)
        if not self.converged_:
            warn(
                gap_message(
                    f"{self._owner()} (pairwise Frank–Wolfe)",
                    self.duality_gap_,
                    self.tol,
                    it,
                    "iteration cap",
                ),
                ConvergenceWarning,
            )
        return probs

    def _pointwise(self, targets: TargetStates) -> np.ndarray:
        cs, model = self.confidence, self.model
        ref = reference_probs(self.reference, targets)
        phi_ref = np.einsum("ja,jad->jd", ref, targets.phi)
        # z(j,a) − z_ref(j) = z(x_j, φ_ja − φ_ref_j): z is linear in φ for fixed x.
        diff = targets.phi - phi_ref[:, None, :]
        lcb = np.empty((targets.m, targets.n_actions))
        chunk = max(1, _CHUNK_ENTRIES // (targets.n_actions * cs.k))
        for start in range(0, targets.m, chunk):
            part = slice(start, min(targets.m, start + chunk))
            x = None if targets.x is None else targets.x[part]
            dz = model.features(x, diff[part])
            lcb[part] = dz @ cs.center - cs.beta * cs.norm(dz)
        self.duality_gap_ = 0.0
        self.n_iter_ = 0
        self.converged_ = True
        probs = one_hot_argmax(lcb)
        self.pessimistic_value_ = float(
            cs.worst_case(self._w(probs, targets, model.mean_features(targets.x, phi_ref)))
        )
        return probs
