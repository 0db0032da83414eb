"""Policies for many users: one pessimistic policy per user, and one policy for all of them.

Notation (P-ShareLoRA, Liu et al. 2025, arXiv 2503.19201, §"per-user and averaged value gaps"):
users ``u = 1..U`` with rewards ``θ_uᵀφ``; target states ``j = 1..m`` with ``K`` candidates; a
reference policy ``π_ref`` (uniform by default); a policy's improvement for user ``u``

    Δ_u(π) = J_u(π) − J_u(π_ref) = θ_uᵀ w̄(π),   w̄(π) = (1/m) Σ_j Σ_a (π(a|j) − π_ref(a|j)) φ(j, a).

Improvements over ``π_ref`` (rather than raw values) make the aggregate invariant to adding a
constant to a user's reward on a state — the part Bradley–Terry data cannot identify.

**Per-user policies** (:class:`PerUserPolicies`): user ``u``'s own
:class:`~pluralign.policies.Pessimistic` policy (Zhu et al. 2023) in the space of their per-user
view ``θ_u = A v`` (:meth:`~pluralign.rewards.MultiUserModel.user_model`): ``A = I`` for
``per_user``/``pooled``, ``A`` = a basis of ``span{θ̂0, B̂}`` for ``shared_basis``. The confidence
set ``C_u = {v : ‖v − v̂_u‖_{M_u} ≤ β_u}`` uses the comparisons that inform ``θ_u``.

**Aggregated policies** deploy one ``π`` to every user:

* :class:`Utilitarian` maximises the weighted mean improvement ``Σ_u ω_u Δ_u(π)``;
* :class:`Leximin` maximises the worst user's improvement ``min_u Δ_u(π)`` and then, among those
  policies, the second worst, and so on (lexicographic max–min; ``levels=1`` stops at the worst
  user).

Their **pessimistic** versions replace ``Δ_u(π)`` by its worst case over the user's confidence
set, ``Δ̲_u(π) = min_{v∈C_u} vᵀA_uᵀw̄(π) = v̂_uᵀA_uᵀw̄ − β_u‖A_uᵀw̄‖_{M_u⁻¹}`` (concave in ``π``).

**Solver** (exact, certified): both objectives are concave in ``π`` (a product of simplices) and
each ``Δ̲_u`` is the minimum of the linear functions ``π ↦ (A_u v)ᵀw̄(π)``, ``v ∈ C_u``. Kelley's
cutting-plane method solves the linear program

    max Σ_u ω_u t_u  (utilitarian)  or  max t  (leximin level),
    s.t.  t_u ≤ (A_u v)ᵀ w̄(π)  for the cuts v collected so far,  Σ_a π(a|j) = 1,  π ≥ 0

with HiGHS (``scipy.optimize.linprog``), evaluates the true ``Δ̲_u`` at its solution, and adds the
worst-case ``v = v̂ − β M⁻¹g/‖g‖_{M⁻¹}`` (``g = A_uᵀw̄``) of every user whose cut was violated.
The LP value is an upper bound on the optimum (it has fewer constraints) and the best visited
policy's true objective a lower bound; the solver stops when their difference, reported as
``duality_gap_``, is ``≤ tol`` — a certified bound on the distance to the optimum. Without
pessimism (``beta = 0``) the first LP is exact: the utilitarian policy is then the greedy policy
of the mean reward ``Σ_u ω_u θ̂_u``, the max–min policy a linear program. Leximin levels fix the
users whose cuts carry positive dual values (complementary slackness: they are at the optimal
level in every optimal policy) at the level reached, then maximise the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import csr_matrix, hstack

from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.data import PreferenceData, TargetStates
from pluralign.errors import PluralignError
from pluralign.policies.base import Policy, one_hot_argmax
from pluralign.policies.pessimistic import Pessimistic, reference_probs

__all__ = ["Leximin", "PerUserPolicies", "Utilitarian", "user_confidence"]

Beta = float | str | Callable[[int, int], float]


def _beta_value(beta: Beta, k: int, n: int) -> float | str:
    if callable(beta):
        return float(beta(k, n))
    return beta


def rate_beta(scale: float, delta: float = 0.05) -> Callable[[int, int], float]:
    """``β = scale · sqrt((k + log(1/δ)) / n)`` (the theory's rate, constant exposed)."""
    return lambda k, n: scale * beta_rate(k, n, delta)


def user_confidence(model: Any, user: Any, data: PreferenceData, *, beta: Beta = 1.0,
                    kind: str = "design", delta: float = 0.05) -> tuple[Any, ConfidenceSet]:
    """User ``u``'s view ``θ_u = A v`` and its confidence set from the comparisons that
    inform it. ``beta`` is a number, ``"theory"``, or ``f(k, n) -> β`` (e.g. :func:`rate_beta`)."""
    view = model.user_model(user)
    rows = model.confidence_rows(user, data)
    value = _beta_value(beta, view.n_params, rows.n)
    return view, ConfidenceSet.fit(view, rows, beta=value, kind=kind, delta=delta)


class PerUserPolicies:
    """One pessimistic policy per user (Zhu et al. 2023 in each user's view).

    Parameters
    ----------
    model:
        A fitted :class:`~pluralign.rewards.MultiUserModel`.
    data:
        The training comparisons (for the confidence sets).
    beta:
        Confidence radius: a number, ``"theory"``, or ``f(k, n) -> β``. ``0`` gives the greedy
        policy of each user's estimate.
    kind, delta:
        Passed to :meth:`~pluralign.confidence.ConfidenceSet.fit`.
    reference, pointwise, tol, max_iter:
        Passed to :class:`~pluralign.policies.Pessimistic`.

    ``policy(u)`` builds (once) and returns user ``u``'s policy; ``probs(targets, u)`` its
    probabilities; ``all_probs(targets, users)`` stacks them as ``(U, m, K)``.
    """

    def __init__(self, model: Any, data: PreferenceData, *, beta: Beta = 1.0,
                 kind: str = "design", delta: float = 0.05, reference: str | np.ndarray = "uniform",
                 pointwise: bool = False, tol: float = 1e-6, max_iter: int = 5000) -> None:
        self.model, self.data = model, data
        self.beta, self.kind, self.delta = beta, kind, delta
        self.reference, self.pointwise = reference, pointwise
        self.tol, self.max_iter = tol, max_iter
        self._policies: dict[Any, Pessimistic] = {}

    def policy(self, user: Any) -> Pessimistic:
        key = user.item() if isinstance(user, np.generic) else user
        if key not in self._policies:
            view, cs = user_confidence(self.model, key, self.data, beta=self.beta,
                                       kind=self.kind, delta=self.delta)
            self._policies[key] = Pessimistic(view, cs, reference=self.reference,
                                              pointwise=self.pointwise, tol=self.tol,
                                              max_iter=self.max_iter)
        return self._policies[key]

    def probs(self, targets: TargetStates, user: Any) -> np.ndarray:
        """User ``u``'s policy on ``targets``, ``(m, K)``."""
        return self.policy(user).probs(targets)

    def all_probs(self, targets: TargetStates, users: Sequence[Any] | None = None) -> np.ndarray:
        """Every user's policy on the same targets, ``(U, m, K)``."""
        users = self.model.users_ if users is None else users
        return np.stack([self.probs(targets, u) for u in np.asarray(users).tolist()])


class _Aggregate(Policy):
    """Shared machinery of :class:`Utilitarian` and :class:`Leximin` (see the module doc)."""

    def __init__(self, model: Any, data: PreferenceData | None = None, *,
                 users: Sequence[Any] | None = None, beta: Beta = 0.0, kind: str = "design",
                 delta: float = 0.05, reference: str | np.ndarray = "uniform",
                 tol: float = 1e-6, max_iter: int = 500) -> None:
        self.model, self.data, self.users = model, data, users
        self.beta, self.kind, self.delta = beta, kind, delta
        self.reference, self.tol, self.max_iter = reference, tol, max_iter

    # ---- per-user pieces: basis A_u, centre v̂_u, confidence set (None: plug-in) -------------
    def _users(self) -> list[Any]:
        users = self.model.users_ if self.users is None else self.users
        users = np.asarray(users).tolist()
        if not users:
            raise PluralignError("an aggregated policy needs at least one user")
        return users

    def _pieces(self) -> list[tuple[np.ndarray, np.ndarray, ConfidenceSet | None]]:
        plug_in = self.data is None or (not callable(self.beta) and self.beta == 0)
        out = []
        for user in self._users():
            if plug_in:
                theta = self.model.user_theta(user)[0]
                out.append((np.eye(theta.size), theta, None))
            else:
                view, cs = user_confidence(self.model, user, self.data, beta=self.beta,
                                           kind=self.kind, delta=self.delta)
                out.append((view.basis, cs.center, cs))
        return out

    # ---- the cutting-plane LP ----------------------------------------------------------------
    def _setup(self, targets: TargetStates) -> None:
        m, n_actions = targets.m, targets.n_actions
        ref = reference_probs(self.reference, targets)
        self._phi = targets.phi
        self._phi_ref = np.einsum("ja,jad->jd", ref, targets.phi)
        self._ref = ref
        rows = np.repeat(np.arange(m), n_actions)
        self._a_eq = csr_matrix((np.ones(m * n_actions), (rows, np.arange(m * n_actions))),
                                shape=(m, m * n_actions))

    def _gain(self, c: np.ndarray) -> np.ndarray:
        """Coefficients of ``π`` in ``cᵀw̄(π)``: ``(cᵀφ(j,a) − cᵀφ_ref(j))/m``, flat (m·K,)."""
        scores = self._phi @ c - (self._phi_ref @ c)[:, None]
        return scores.ravel() / self._phi.shape[0]

    def _wbar(self, probs: np.ndarray) -> np.ndarray:
        return np.einsum("ja,jad->d", probs - self._ref, self._phi) / self._phi.shape[0]

    @staticmethod
    def _value(piece: tuple, w: np.ndarray) -> tuple[float, np.ndarray]:
        """``(Δ̲_u, worst-case θ = A v)`` at ``w̄``."""
        basis, center, cs = piece
        g = basis.T @ w
        if cs is None:
            return float(center @ g), basis @ center
        return float(cs.worst_case(g)), basis @ cs.worst_theta(g)

    def _solve_lp(self, cut_rows: list[tuple[int, np.ndarray]], n_t: int, objective: np.ndarray,
                  fixed: dict[int, float]) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """LP over ``[π (m·K), t (n_t)]``; cut ``(u, gain)``: ``t_slot(u) − gain·π ≤ 0`` for free
        users, ``−gain·π ≤ −level_u`` for fixed ones. Returns ``(π, t, value, cut duals)``."""
        size = self._a_eq.shape[1]
        gains = np.stack([g for _, g in cut_rows])
        t_part = np.zeros((len(cut_rows), n_t))
        b_ub = np.zeros(len(cut_rows))
        for i, (u, _) in enumerate(cut_rows):
            if u in fixed:
                b_ub[i] = -fixed[u]
            else:
                t_part[i, self._slot(u)] = 1.0
        a_ub = hstack([csr_matrix(-gains), csr_matrix(t_part)]).tocsr()
        a_eq = hstack([self._a_eq, csr_matrix((self._a_eq.shape[0], n_t))]).tocsr()
        c = np.concatenate([np.zeros(size), -objective])
        bounds = [(0.0, None)] * size + [(None, None)] * n_t
        res = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=np.ones(a_eq.shape[0]),
                      bounds=bounds, method="highs")
        if res.status != 0:
            raise PluralignError(f"aggregated-policy LP failed: {res.message}")
        probs = np.clip(res.x[:size], 0.0, None).reshape(self._phi.shape[:2])
        probs /= probs.sum(axis=1, keepdims=True)
        return probs, res.x[size:], float(-res.fun), np.asarray(res.ineqlin.marginals)

    def _kelley(self, pieces: list, objective_of: Callable[[np.ndarray], float], n_t: int,
                weights: np.ndarray, fixed: dict[int, float], cuts: list[tuple[int, np.ndarray]]
                ) -> tuple[np.ndarray, float, float, np.ndarray, int]:
        """Cutting planes until ``LP bound − best true objective ≤ tol``."""
        best_probs, best_value = None, -np.inf
        bound, duals, it = np.inf, np.zeros(0), 0
        for it in range(1, self.max_iter + 1):  # noqa: B007
            probs, t, bound, duals = self._solve_lp(cuts, n_t, weights, fixed)
            w = self._wbar(probs)
            values_cuts = [self._value(piece, w) for piece in pieces]
            values = np.array([v for v, _ in values_cuts])
            true = objective_of(values)
            feasible = all(values[u] >= level - self.tol for u, level in fixed.items())
            if feasible and true > best_value:
                best_value, best_probs = true, probs
            if bound - best_value <= self.tol:
                break
            added = False
            for u, (value, theta) in enumerate(values_cuts):
                level = fixed[u] if u in fixed else t[self._slot(u)]
                if value < level - 1e-12:
                    cuts.append((u, self._gain(theta)))
                    added = True
            if not added:
                break
        if best_probs is None:  # pragma: no cover - the fixed levels were reached before
            best_probs, best_value = probs, objective_of(values)
        return best_probs, best_value, max(bound - best_value, 0.0), duals, it


class Utilitarian(_Aggregate):
    """One policy maximising the weighted mean (pessimistic) improvement ``Σ_u ω_u Δ̲_u(π)``.

    Parameters
    ----------
    model:
        A fitted :class:`~pluralign.rewards.MultiUserModel`.
    data:
        Training comparisons (for confidence sets); ``None`` or ``beta = 0`` gives the plug-in
        (non-pessimistic) policy.
    users:
        Users to serve (default: all of the model's users).
    weights:
        ``ω_u`` (default uniform); normalized to sum to 1.
    beta, kind, delta:
        Confidence sets as in :func:`user_confidence`.
    reference:
        ``π_ref`` (see :func:`~pluralign.policies.reference_probs`).
    tol, max_iter:
        Certified-gap tolerance and cutting-plane iteration cap.

    After ``probs``: ``duality_gap_``, ``n_iter_``, ``converged_``, ``objective_`` (the
    aggregate pessimistic improvement of the returned policy) and ``user_values_`` (each
    user's ``Δ̲_u``).
    """

    def __init__(self, model: Any, data: PreferenceData | None = None, *,
                 users: Sequence[Any] | None = None, weights: Sequence[float] | None = None,
                 beta: Beta = 0.0, kind: str = "design", delta: float = 0.05,
                 reference: str | np.ndarray = "uniform", tol: float = 1e-6,
                 max_iter: int = 500) -> None:
        super().__init__(model, data, users=users, beta=beta, kind=kind, delta=delta,
                         reference=reference, tol=tol, max_iter=max_iter)
        self.weights = weights

    def _slot(self, u: int) -> int:
        return u

    def probs(self, targets: TargetStates) -> np.ndarray:
        pieces = self._pieces()
        n_users = len(pieces)
        weights = (np.full(n_users, 1.0 / n_users) if self.weights is None
                   else np.asarray(self.weights, dtype=np.float64))
        if weights.shape != (n_users,) or (weights < 0).any() or weights.sum() <= 0:
            raise PluralignError(f"weights must be {n_users} non-negative numbers, not all 0")
        weights = weights / weights.sum()
        self._setup(targets)
        if all(cs is None for _, _, cs in pieces):
            # Plug-in: Σ ω_u θ̂_uᵀw̄(π) is linear in π — the greedy policy of the mean reward.
            mean_theta = sum(wu * (b @ c) for wu, (b, c, _) in zip(weights, pieces, strict=True))
            probs = one_hot_argmax(targets.phi @ mean_theta)
            values = np.array([self._value(p, self._wbar(probs))[0] for p in pieces])
            self.duality_gap_, self.n_iter_, self.converged_ = 0.0, 0, True
        else:
            cuts = [(u, self._gain(b @ c)) for u, (b, c, _) in enumerate(pieces)]
            probs, _, gap, _, it = self._kelley(pieces, lambda v: float(weights @ v), n_users,
                                                weights, {}, cuts)
            values = np.array([self._value(p, self._wbar(probs))[0] for p in pieces])
            self.duality_gap_, self.n_iter_ = gap, it
            self.converged_ = gap <= self.tol
        self.user_values_ = values
        self.objective_ = float(weights @ values)
        return probs


class Leximin(_Aggregate):
    """One policy maximising the worst user's (pessimistic) improvement, then the next worst.

    Parameters are those of :class:`Utilitarian` (without ``weights``), plus ``levels``: how
    many lexicographic levels to optimise (``None``: all, i.e. leximin; ``1``: max–min only).

    After ``probs``: ``duality_gap_`` (of the first level, the worst user), ``n_iter_``,
    ``converged_``, ``objective_`` (``min_u Δ̲_u`` of the returned policy), ``user_values_`` and
    ``levels_`` (the level reached at each lexicographic step).
    """

    def __init__(self, model: Any, data: PreferenceData | None = None, *,
                 users: Sequence[Any] | None = None, levels: int | None = None,
                 beta: Beta = 0.0, kind: str = "design", delta: float = 0.05,
                 reference: str | np.ndarray = "uniform", tol: float = 1e-6,
                 max_iter: int = 500) -> None:
        super().__init__(model, data, users=users, beta=beta, kind=kind, delta=delta,
                         reference=reference, tol=tol, max_iter=max_iter)
        self.levels = levels

    def _slot(self, u: int) -> int:
        return 0

    def probs(self, targets: TargetStates) -> np.ndarray:
        pieces = self._pieces()
        n_users = len(pieces)
        self._setup(targets)
        cuts = [(u, self._gain(b @ c)) for u, (b, c, _) in enumerate(pieces)]
        fixed: dict[int, float] = {}
        levels: list[float] = []
        first_gap, total_it = None, 0
        max_levels = n_users if self.levels is None else max(1, int(self.levels))
        probs = None
        while len(fixed) < n_users and len(levels) < max_levels:
            free = [u for u in range(n_users) if u not in fixed]

            def worst(values: np.ndarray, free: list[int] = free) -> float:
                return float(values[free].min())

            probs, level, gap, duals, it = self._kelley(pieces, worst, 1, np.ones(1), fixed,
                                                        cuts)
            total_it += it
            first_gap = gap if first_gap is None else first_gap
            levels.append(level)
            # Users whose cuts carry dual weight are at this level in every optimal policy.
            weight = np.zeros(n_users)
            for (u, _), d in zip(cuts, duals, strict=False):  # duals of the last LP's cuts
                if u not in fixed:
                    weight[u] += abs(d)
            newly = [u for u in free if weight[u] > 1e-9]
            if not newly:  # degenerate duals: fix the users at the level
                values = np.array([self._value(p, self._wbar(probs))[0] for p in pieces])
                newly = [u for u in free if values[u] <= level + self.tol]
            for u in newly:
                fixed[u] = level - self.tol
        values = np.array([self._value(p, self._wbar(probs))[0] for p in pieces])
        self.duality_gap_ = float(first_gap)
        self.converged_ = self.duality_gap_ <= self.tol
        self.n_iter_ = total_it
        self.levels_ = levels
        self.user_values_ = values
        self.objective_ = float(values.min())
        return probs
