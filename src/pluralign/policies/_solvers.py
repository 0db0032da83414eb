"""Certified solvers for the max–min problems behind the pessimistic and aggregated policies.

This module's one job: the numerical engines, written as plain functions of arrays (and of a
model's ``reward_at`` / ``mean_features`` for :func:`pairwise_frank_wolfe`), each returning its
solution together with a certificate. The policy classes (:mod:`.pessimistic`, :mod:`.aggregate`)
state the problems, choose the confidence sets and keep the diagnostics; nothing here stores
state between calls.

Every problem here is a max–min over the **product of simplices** ``Π = {π : Σ_a π(a|j) = 1,
π ≥ 0}`` of target states ``j = 1..m`` with ``K`` candidates each, against a reference policy
``π_ref``:

    max_{π∈Π} min_{θ∈S} θᵀw(π),   w(π) = (1/m) Σ_j Σ_a (π(a|j) − π_ref(a|j)) φ(j, a),

with ``S`` a convex set of reward vectors (an ellipsoid, a Minkowski sum or a convex hull of
ellipsoids). Its linear maximiser is a per-state argmax (:func:`best_response`), whose value
``h(θ) = max_{π∈Π} θᵀw(π)`` bounds the optimum from above for every ``θ ∈ S`` (weak duality);
the true objective of any policy bounds it from below. Each solver reports the difference of
the best such bounds as a certified **duality gap**.

* :func:`pairwise_frank_wolfe` — one ellipsoid (Zhu, Jordan & Jiao 2023; the PRS policy of
  LoCo-RLHF, Lee, Sun & Liu 2024, arXiv 2412.19436):
  Frank–Wolfe with an active set and pairwise corrections (Lacoste-Julien & Jaggi 2015), with
  its pieces :func:`line_search`, :func:`pairwise_corrective`, :func:`restricted_dual` and
  :func:`escape_cone`.
* :func:`double_oracle` with :func:`matrix_game` — any ``S`` given by its minimisation oracle
  (McMahan, Gordon & Blum 2003).
* :func:`kelley_cutting_planes` with :func:`cutting_plane_lp` — several concave objectives at
  once, ``max min_u Δ̲_u(π)`` subject to floors on other users (Kelley 1960), the step of
  lexicographic max–min.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from scipy.optimize import linprog, minimize
from scipy.sparse import csr_matrix, hstack

from pluralign.errors import PluralignError

if TYPE_CHECKING:
    from pluralign.confidence import ConfidenceSet
    from pluralign.data import TargetStates
    from pluralign.rewards.linear import LinearInParameters

__all__ = [
    "CutLP",
    "CuttingPlaneSolution",
    "FrankWolfeSolution",
    "MaxMinSolution",
    "SimplexGeometry",
    "best_response",
    "cutting_plane_lp",
    "double_oracle",
    "escape_cone",
    "kelley_cutting_planes",
    "line_search",
    "matrix_game",
    "mix_vertices",
    "pairwise_corrective",
    "pairwise_frank_wolfe",
    "restricted_dual",
]

CORRECTIVE_STEPS = 2000  # pairwise steps on the active set per Frank–Wolfe vertex
MAX_ATOMS = 64  # vertices kept with zero weight until the set is this large


# ---------------------------------------------------------------------------------------------
# The product of simplices
# ---------------------------------------------------------------------------------------------
class SimplexGeometry:
    """A target sample's features ``φ`` (m, K, d) and a reference policy ``π_ref`` (m, K).

    Built afresh for each call of a policy's ``probs`` and passed to the solvers (nothing is
    cached on the policy; the LP constraint rows are cached on the geometry). Provides
    ``φ_ref(j) = Σ_a π_ref(a|j) φ(j, a)``, the improvement ``w̄(π)`` and the coefficients of
    ``π`` in the linear functional ``cᵀw̄(π)``.
    """

    def __init__(self, phi: np.ndarray, ref: np.ndarray) -> None:
        self.phi = phi
        self.ref = ref
        self.phi_ref = np.einsum("ja,jad->jd", ref, phi)

    @property
    def m(self) -> int:
        return int(self.phi.shape[0])

    @property
    def n_actions(self) -> int:
        return int(self.phi.shape[1])

    @property
    def gains(self) -> np.ndarray:
        """``φ(j, a) − φ_ref(j)``, (m, K, d): ``w̄(π) = (1/m) Σ_j Σ_a π(a|j)·gains[j, a]``."""
        return self.phi - self.phi_ref[:, None, :]

    def gain(self, c: np.ndarray) -> np.ndarray:
        """Coefficients of ``π`` in ``cᵀw̄(π)``: ``(cᵀφ(j,a) − cᵀφ_ref(j))/m``, flat (m·K,)."""
        scores = self.phi @ c - (self.phi_ref @ c)[:, None]
        return scores.ravel() / self.phi.shape[0]

    def wbar(self, probs: np.ndarray) -> np.ndarray:
        """``w̄(π) = (1/m) Σ_j Σ_a (π(a|j) − π_ref(a|j)) φ(j, a)``, (d,)."""
        return np.einsum("ja,jad->d", probs - self.ref, self.phi) / self.phi.shape[0]

    @cached_property
    def simplex_rows(self) -> csr_matrix:
        """The equality constraints ``Σ_a π(a|j) = 1`` over ``vec π`` (row-major), (m, m·K);
        built once per geometry (i.e. per ``probs`` call) and shared by its LPs."""
        m, n_actions = self.m, self.n_actions
        rows = np.repeat(np.arange(m), n_actions)
        return csr_matrix(
            (np.ones(m * n_actions), (rows, np.arange(m * n_actions))), shape=(m, m * n_actions)
        )


def best_response(scores: np.ndarray) -> tuple[np.ndarray, float]:
    """The linear oracle of the product of simplices: ``max_{π∈Π} Σ_j Σ_a π(a|j) s(j,a) / m``.

    A deterministic policy (the first per-state argmax of ``scores`` (m, K)) and its value
    ``(1/m) Σ_j max_a s(j, a)``. With ``s(j, a) = θᵀ(φ(j,a) − φ_ref(j))`` the value is the upper
    bound ``h(θ) = max_π θᵀw(π)`` of every max–min solver here.
    """
    best = np.argmax(scores, axis=1)
    return best, float(np.mean(scores[np.arange(scores.shape[0]), best]))


def mix_vertices(
    weights: Sequence[float] | np.ndarray, vertices: Sequence[np.ndarray], n_actions: int
) -> np.ndarray:
    """The mixed policy ``Σ_i λ_i e(a_i)`` of deterministic policies ``a_i`` (each (m,) actions),
    as an (m, K) matrix (the mixture is per state: ``π(a|j) = Σ_{i: a_i(j) = a} λ_i``)."""
    m = int(np.asarray(vertices[0]).shape[0])
    rows = np.arange(m)
    probs = np.zeros((m, n_actions))
    for weight, chosen in zip(weights, vertices, strict=True):
        probs[rows, chosen] += weight
    return probs


def _highs(c: np.ndarray, **problem: Any) -> Any:
    """``scipy.optimize.linprog`` with HiGHS; a failed solve raises ``PluralignError``."""
    res = linprog(c, method="highs", **problem)
    if res.status != 0:
        raise PluralignError(f"aggregated-policy LP failed: {res.message}")
    return res


# ---------------------------------------------------------------------------------------------
# Matrix games and the double oracle
# ---------------------------------------------------------------------------------------------
def matrix_game(game: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal mixed strategies ``(μ, ν)`` of the zero-sum game ``max_μ min_ν μᵀGν``.

    ``G`` (n_rows, n_cols) pays the maximising row player. The value ``v = max_μ min_c (μᵀG)_c``
    is the linear program ``max t s.t. t ≤ (μᵀG)_c ∀c, Σ μ = 1, μ ≥ 0`` (HiGHS); by LP duality
    (von Neumann's minimax theorem) the multipliers of the ``n_cols`` inequalities, normalized,
    are an optimal ``ν`` for the column player, with ``min_ν max_r (Gν)_r = v``.
    """
    n_rows, n_cols = game.shape
    c = np.zeros(n_rows + 1)
    c[-1] = -1.0  # maximise t
    a_ub = np.hstack([-game.T, np.ones((n_cols, 1))])  # t − (μᵀG)_c ≤ 0
    a_eq = np.concatenate([np.ones(n_rows), [0.0]])[None, :]
    res = _highs(
        c,
        A_ub=a_ub,
        b_ub=np.zeros(n_cols),
        A_eq=a_eq,
        b_eq=[1.0],
        bounds=[(0.0, None)] * n_rows + [(None, None)],
    )
    mu = np.clip(res.x[:n_rows], 0.0, None)
    nu = np.abs(np.asarray(res.ineqlin.marginals))
    return mu / mu.sum(), nu / nu.sum()


class MaxMinSolution(NamedTuple):
    """A mixed policy with certified bounds ``lower ≤ max_π min_{θ∈S} θᵀw̄(π) ≤ upper``.

    ``lower`` is the true objective of ``probs``; ``duality_gap = upper − lower`` (clipped at 0)
    bounds its distance to the optimum.
    """

    probs: np.ndarray
    lower: float
    upper: float
    n_iter: int

    @property
    def duality_gap(self) -> float:
        return max(self.upper - self.lower, 0.0)


def double_oracle(
    geometry: SimplexGeometry,
    start: Sequence[np.ndarray],
    oracle: Callable[[np.ndarray], tuple[float, np.ndarray]],
    *,
    tol: float,
    max_iter: int,
) -> MaxMinSolution:
    """``max_{w∈P} min_{θ∈S} θᵀw`` over the polytope ``P = {w̄(π) : π ∈ Π}`` and a convex ``S``.

    The double oracle of McMahan, Gordon & Blum 2003 ("Planning in the presence of cost
    functions controlled by an adversary", ICML). ``S`` is given by its minimisation oracle
    ``oracle(w) = (min_{θ∈S} θᵀw, argmin)``; ``start`` are points of ``S``. The solver keeps the
    deterministic policies ``π_v`` and the points ``θ_c ∈ S`` found so far, and per iteration

    1. solves their small matrix game ``max_μ min_ν Σ μ_v ν_c θ_cᵀw̄(π_v)`` (:func:`matrix_game`),
    2. calls ``oracle`` at the mixture's ``w̄ = Σ μ_v w̄(π_v)``: its value is the true objective
       of ``Σ μ_v π_v`` (a **lower bound**), its argmin a new point of ``S``,
    3. best-responds to ``θ̄ = Σ ν_c θ_c`` (:func:`best_response`, a per-state argmax): the new
       policy, and ``h(θ̄) = max_π θ̄ᵀw̄(π) ≥`` the optimum since ``θ̄ ∈ S`` (an **upper bound**,
       weak duality).

    It stops when the best bounds are within ``tol`` or after ``max_iter`` iterations and returns
    the mixture of the best lower bound (:class:`MaxMinSolution`). Each matrix game has as many
    rows as policies found, not ``m·K`` variables.
    """
    rows = np.arange(geometry.m)
    gains = geometry.gains  # φ(j, a) − φ_ref(j)
    vertices = [best_response(gains @ t)[0] for t in start]  # deterministic policies
    points = [gains[rows, v].mean(axis=0) for v in vertices]  # their w̄
    cuts = list(start)
    best_lower, best_upper = -np.inf, np.inf
    best_mix, best_vertices = np.ones(1), vertices[:1]
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        mu, nu = matrix_game(np.array(points) @ np.array(cuts).T)  # G[v, c] = w_vᵀθ_c
        lower, worst = oracle(mu @ np.array(points))
        if lower > best_lower:
            best_lower, best_mix, best_vertices = lower, mu, list(vertices)
        vertex, upper = best_response(gains @ (nu @ np.array(cuts)))
        best_upper = min(best_upper, upper)
        if best_upper - best_lower <= tol:
            break
        if not any(np.array_equal(vertex, v) for v in vertices):
            vertices.append(vertex)
            points.append(gains[rows, vertex].mean(axis=0))
        cuts.append(worst)
    probs = mix_vertices(best_mix, best_vertices, geometry.n_actions)
    return MaxMinSolution(probs, best_lower, best_upper, it)


# ---------------------------------------------------------------------------------------------
# Kelley's cutting planes (the levels of lexicographic max–min)
# ---------------------------------------------------------------------------------------------
class CutLP(NamedTuple):
    """The master LP's solution: the policy, its value ``t`` and the cuts' dual values."""

    probs: np.ndarray
    bound: float
    duals: np.ndarray


def cutting_plane_lp(
    geometry: SimplexGeometry,
    cuts: Sequence[tuple[int, np.ndarray]],
    fixed: Mapping[int, float],
) -> CutLP:
    """The master LP of :func:`kelley_cutting_planes`, over ``[vec π (m·K), t]`` (HiGHS):

        max t   s.t.  t ≤ gᵀπ         for each cut (u, g) of a free user u,
                      level_u ≤ gᵀπ   for each cut (u, g) of a fixed user (``fixed[u] = level_u``),
                      Σ_a π(a|j) = 1,  π ≥ 0.

    A cut ``g`` is the coefficient vector of ``π`` in ``θᵀw̄(π)`` (:meth:`SimplexGeometry.gain`)
    for one ``θ`` of user ``u``'s set: since ``Δ̲_u(π) = min_θ θᵀw̄(π) ≤ gᵀπ``, the LP relaxes
    the problem and its ``t`` bounds it from above. Returns the policy (clipped and renormalized
    per state), ``t`` and the multipliers of the cut rows (``≤ 0``; nonzero ones mark the cuts
    that bind in the optimum).
    """
    a_simplex = geometry.simplex_rows
    size = a_simplex.shape[1]
    gains = np.stack([g for _, g in cuts])
    t_col = np.array([0.0 if u in fixed else 1.0 for u, _ in cuts])[:, None]
    b_ub = np.array([-fixed[u] if u in fixed else 0.0 for u, _ in cuts])
    a_ub = hstack([csr_matrix(-gains), csr_matrix(t_col)]).tocsr()
    a_eq = hstack([a_simplex, csr_matrix((a_simplex.shape[0], 1))]).tocsr()
    c = np.zeros(size + 1)
    c[-1] = -1.0
    bounds = [(0.0, None)] * size + [(None, None)]
    res = _highs(
        c,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=a_eq,
        b_eq=np.ones(a_eq.shape[0]),
        bounds=bounds,
    )
    probs = np.clip(res.x[:size], 0.0, None).reshape(geometry.phi.shape[:2])
    probs /= probs.sum(axis=1, keepdims=True)
    return CutLP(probs, float(res.x[-1]), np.asarray(res.ineqlin.marginals))


class CuttingPlaneSolution(NamedTuple):
    """Kelley's result: the best feasible visited policy, its level ``value`` (a lower bound),
    the last LP's ``bound`` (an upper bound), the last LP's cut duals, and the iterations."""

    probs: np.ndarray
    value: float
    bound: float
    duals: np.ndarray
    n_iter: int

    @property
    def duality_gap(self) -> float:
        return max(self.bound - self.value, 0.0)


def kelley_cutting_planes(
    geometry: SimplexGeometry,
    oracle: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    free: Sequence[int],
    fixed: Mapping[int, float],
    cuts: list[tuple[int, np.ndarray]],
    *,
    tol: float,
    max_iter: int,
) -> CuttingPlaneSolution:
    """``max_{π∈Π} min_{u free} Δ̲_u(π)`` subject to ``Δ̲_u(π) ≥ level_u`` for the fixed users.

    Kelley's cutting-plane method (Kelley 1960, "The cutting-plane method for solving convex
    programs", J. SIAM 8(4)) for concave ``Δ̲_u(π) = min_{θ∈S_u} θᵀw̄(π)``, given by
    ``oracle(w̄) = (Δ̲_u (U,), the minimising θ_u (U, d))`` for every user. Each iteration solves
    the master LP over the cuts so far (:func:`cutting_plane_lp`; its ``t`` is an upper bound),
    evaluates the true ``Δ̲_u`` of its policy (a lower bound when the fixed floors hold, up to
    ``tol``), and adds the worst-case ``θ`` of the most violated free user and of the most
    violated fixed user as new cuts. It stops when the bounds are within ``tol``, when no cut is
    violated, or after ``max_iter`` LPs. ``cuts`` (pairs ``(u, g)``) is extended in place, so a
    caller can reuse them at the next level.
    """
    best_probs, best_value = None, -np.inf
    bound, duals, it = np.inf, np.zeros(0), 0
    probs = values = None
    for it in range(1, max_iter + 1):  # noqa: B007
        probs, bound, duals = cutting_plane_lp(geometry, cuts, fixed)
        values, worst = oracle(geometry.wbar(probs))
        n_users = len(values)
        true = float(values[free].min())
        feasible = all(values[u] >= level - tol for u, level in fixed.items())
        if feasible and true > best_value:
            best_value, best_probs = true, probs
        if bound - best_value <= tol:
            break
        levels = np.array([fixed.get(u, bound) for u in range(n_users)])
        shortfall = levels - values
        if shortfall.max() <= 1e-12:
            break
        # The most violated cut of each kind: a free user (the worst) and a fixed one.
        picks = {int(np.argmax(np.where(np.isin(np.arange(n_users), free), shortfall, -np.inf)))}
        if fixed:
            fixed_ids = np.array(list(fixed))
            picks.add(int(fixed_ids[np.argmax(shortfall[fixed_ids])]))
        cuts.extend((u, geometry.gain(worst[u])) for u in sorted(picks) if shortfall[u] > 1e-12)
    if best_probs is None:  # pragma: no cover - fixed levels not reached within max_iter
        best_probs, best_value = probs, float(values[free].min())  # type: ignore[index]  # set on the first iteration
    return CuttingPlaneSolution(best_probs, best_value, bound, duals, it)  # type: ignore[arg-type]  # set on the first iteration


# ---------------------------------------------------------------------------------------------
# Pairwise Frank–Wolfe on one ellipsoid (the Pessimistic / PRS policy)
# ---------------------------------------------------------------------------------------------
def line_search(b: float, c: float, e: float, g: float, beta: float) -> float:
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


def pairwise_corrective(
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
        gamma = line_search(mass * float(c[i] - c[j]), q, mass * e, mass * mass * curv, beta)
        if gamma <= 0.0:
            break
        moved = gamma * mass
        lam[i] += moved
        lam[j] = 0.0 if gamma >= 1.0 else lam[j] - moved
        g_lam += moved * (gram[:, i] - gram[:, j])
    return lam


def restricted_dual(lin: np.ndarray, gram: np.ndarray, beta: float) -> np.ndarray:
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


def escape_cone(lin: np.ndarray, gram: np.ndarray, lam: np.ndarray, beta: float) -> np.ndarray:
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


class FrankWolfeSolution(NamedTuple):
    """The returned mixed policy ``π̂``, ``value = f(π̂)``, the certified
    ``duality_gap = min_t h(θ_t) − f(π̂) ≥ f(π*) − f(π̂)``, the iterations (linear-oracle calls)
    and the size of the active set (zero-weight vertices included)."""

    probs: np.ndarray
    value: float
    duality_gap: float
    n_iter: int
    n_active: int


def pairwise_frank_wolfe(
    model: LinearInParameters,
    confidence: ConfidenceSet,
    targets: TargetStates,
    w_ref: np.ndarray,
    *,
    tol: float,
    max_iter: int,
) -> FrankWolfeSolution:
    """``max_{π∈Π} f(π)``, ``f(π) = min_{θ∈C} θᵀw(π) = θ̂ᵀw(π) − β‖w(π)‖_{M⁻¹}``, for the
    ellipsoid ``C = {θ : ‖θ − θ̂‖_M ≤ β}`` and ``w(π) = (1/m) Σ_j z(j, π_j) − w_ref``.

    The max–min policy of Zhu, Jordan & Jiao 2023 (LoCo-RLHF's PRS with an RTV-reduced model),
    by Frank–Wolfe with an active set and pairwise corrections (Lacoste-Julien & Jaggi 2015, "On
    the global linear convergence of Frank–Wolfe optimization variants"; see
    :mod:`pluralign.policies.pessimistic` for the steps). The iterate is a convex combination of
    deterministic policies held in ``p``-space (``v_i = w(e(a_i))``, ``M⁻¹v_i``, ``θ̂ᵀv_i``, the Gram
    matrix ``G_ij = v_iᵀM⁻¹v_j``); each iteration takes the worst-case ``θ_t ∈ C`` (the
    supergradient ``θ̂ − βM⁻¹w/‖w‖_{M⁻¹}``, or :func:`restricted_dual` at the cone point ``w = 0``),
    calls the linear oracle (:func:`best_response` on ``θ_tᵀz(j, a)`` via ``model.reward_at``),
    adds its vertex, and re-optimizes the weights (:func:`pairwise_corrective`,
    :func:`escape_cone`). Certificate: ``h(θ) = max_π θᵀw(π) ≥ f(π*)`` for every ``θ ∈ C``; it
    stops when ``min_t h(θ_t) − f(π) ≤ tol`` or at ``max_iter``. ``z`` is never formed
    (``reward_at`` / ``mean_features`` only).

    ``w_ref = mean_features(x, Σ_a π_ref(a|j) φ(j, a))``. The caller handles ``0 ∈ C`` (where the
    reference policy is optimal, certified by ``h(0) = 0``).
    """
    cs = confidence
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
    for it in range(1, max_iter + 1):
        w = lam @ np.asarray(vecs)
        m_inv_w = lam @ np.asarray(solved)
        size = math.sqrt(max(float(w @ m_inv_w), 0.0))
        value = float(cs.center @ w) - cs.beta * size
        if stalled or size <= 1e-6 * math.sqrt(float(np.max(np.diag(gram)))):
            # at (or next to) the cone point w = 0, or when the Frank–Wolfe vertex is already
            # active: the dual of the active-set problem gives the next linear step
            alpha = restricted_dual(lin, gram, cs.beta)
            theta_t = cs.center + cs.beta * (alpha @ np.asarray(solved))
        else:
            theta_t = cs.center - cs.beta * m_inv_w / size
        best, h_theta = best_response(model.reward_at(theta_t, targets.x, targets.phi))
        dual_bound = min(dual_bound, float(h_theta - theta_t @ w_ref))
        if dual_bound - value <= tol or it == max_iter:
            break
        # The Frank–Wolfe vertex joins the active set (its w-vector from the nearest active
        # vertex's, through the states where the two differ).
        differ = [int(np.count_nonzero(best != other)) for other in acts]
        stalled = min(differ) == 0
        if not stalled:
            base = int(np.argmin(differ))
            changed = np.flatnonzero(best != acts[base])
            step = targets.phi[changed, best[changed]] - targets.phi[changed, acts[base][changed]]
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
        lam = pairwise_corrective(lin, gram, lam, cs.beta, 0.1 * tol, CORRECTIVE_STEPS)
        if float(lam @ gram @ lam) <= 1e-12 * float(np.max(np.diag(gram))):
            lam = escape_cone(lin, gram, lam, cs.beta)
        # Unused vertices stay (they are the cutting planes of the dual at w = 0) until the
        # set grows past MAX_ATOMS.
        keep = np.flatnonzero(lam > 0.0)
        if lam.size > MAX_ATOMS and keep.size < lam.size:
            acts = [acts[i] for i in keep]
            vecs = [vecs[i] for i in keep]
            solved = [solved[i] for i in keep]
            gram, lin, lam = gram[np.ix_(keep, keep)], lin[keep], lam[keep]
    probs = mix_vertices(lam, acts, targets.n_actions)
    return FrankWolfeSolution(probs, value, dual_bound - value, it, len(acts))
