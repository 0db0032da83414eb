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

**Solvers** (exact, certified). Both problems are ``max_{w∈P} min_{θ∈S} θᵀw`` over the polytope
``P = {w̄(π)}`` (its linear maximiser is a per-state argmax) and a convex set ``S`` of reward
vectors: ``S = E = Σ_u ω_u A_u C_u`` (a Minkowski sum of ellipsoids) for the utilitarian
objective, since ``Σ_u ω_u Δ̲_u = min_{θ∈E} θᵀw̄``; ``S = Θ = conv ∪_u A_u C_u`` for the worst user,
since ``min_u Δ̲_u = min_{θ∈Θ} θᵀw̄``. Minimising over ``S`` is closed-form
(``v_u* = v̂_u − β_u M_u⁻¹g/‖g‖_{M_u⁻¹}``, ``g = A_uᵀw̄``; then the weighted sum, or the worst user).
The **double oracle** keeps the deterministic policies ``π_v`` and points ``θ_c ∈ S`` found so far,
solves their small matrix game ``max_μ min_ν Σ μ_v ν_c θ_cᵀw̄(π_v)`` (HiGHS), and adds the best
response policy to ``θ̄ = Σ ν_c θ_c`` (upper bound ``h(θ̄) = max_π θ̄ᵀw̄(π) ≥ optimum``, weak duality)
and the worst ``θ ∈ S`` at ``w̄ = Σ μ_v w̄(π_v)`` (lower bound: the true objective of the mixture
``Σ μ_v π_v``). It stops when the bounds are within ``tol`` and reports the difference as
``duality_gap_``, a certified bound on the distance to the optimum. Without pessimism
(``beta = 0``) the utilitarian policy is the greedy policy of the mean reward ``Σ_u ω_u θ̂_u``.

Leximin levels after the first are solved by Kelley's cutting planes on the linear program

    max t   s.t.  t ≤ (A_u v)ᵀ w̄(π) (free users),  level_u ≤ (A_u v)ᵀ w̄(π) (fixed users),
                  for the cuts v collected so far,  Σ_a π(a|j) = 1,  π ≥ 0

(HiGHS, over the ``m·K`` probabilities), adding the worst-case ``v`` of the most violated user;
the LP value bounds the level from above and the best feasible visited policy from below. After
each level, the users whose cuts carry positive dual values (complementary slackness: they are at
the level in every optimal policy) are fixed at the level reached, and the next is maximised.

The solvers themselves (:func:`~pluralign.policies._solvers.double_oracle`,
:func:`~pluralign.policies._solvers.kelley_cutting_planes` and their matrix game and LP) are plain
functions in :mod:`pluralign.policies._solvers`; this module states the problems (the users'
confidence sets and their closed-form worst cases) and keeps each call's diagnostics. The
targets' geometry (features, ``π_ref``) is built per call and never stored on the policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pluralign.confidence import ConfidenceSet, beta_rate
from pluralign.data import PreferenceData, TargetStates
from pluralign.errors import ConvergenceWarning, PluralignError
from pluralign.policies._solvers import SimplexGeometry, double_oracle, kelley_cutting_planes
from pluralign.policies.base import Policy, one_hot_argmax
from pluralign.policies.pessimistic import Pessimistic, reference_probs
from pluralign.rewards.diagnostics import gap_message, warn
from pluralign.rewards.protocols import UserViews
from pluralign.rewards.validation import check_int, check_number

__all__ = ["Leximin", "PerUserPolicies", "Utilitarian", "user_confidence"]

Beta = float | str | Callable[[int, int], float]


def _beta_value(beta: Beta, n_params: int, n: int) -> float | str:
    if callable(beta):
        return float(beta(n_params, n))
    return beta


def rate_beta(scale: float, delta: float = 0.05) -> Callable[[int, int], float]:
    """``β = scale · sqrt((p + log(1/δ)) / n)`` for ``p`` parameters (the theory's rate, constant
    exposed)."""
    return lambda n_params, n: scale * beta_rate(n_params, n, delta)


def user_confidence(
    model: UserViews,
    user: Any,
    data: PreferenceData,
    *,
    beta: Beta = 1.0,
    kind: str = "design",
    delta: float = 0.05,
) -> tuple[Any, ConfidenceSet]:
    """User ``u``'s view ``θ_u = A v`` and its confidence set from the comparisons that
    inform it. ``beta`` is a number, ``"theory"``, or ``f(n_params, n) -> β`` (e.g.
    :func:`rate_beta`)."""
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
        Confidence radius: a number, ``"theory"``, or ``f(n_params, n) -> β``. ``0`` gives the
        greedy policy of each user's estimate.
    kind, delta:
        Passed to :meth:`~pluralign.confidence.ConfidenceSet.fit`.
    reference, pointwise, tol, max_iter:
        Passed to :class:`~pluralign.policies.Pessimistic`.

    ``policy(u)`` builds (once) and returns user ``u``'s policy; ``probs(targets, u)`` its
    probabilities; ``all_probs(targets, users)`` stacks them as ``(U, m, K)``.
    """

    def __init__(
        self,
        model: UserViews,
        data: PreferenceData,
        *,
        beta: Beta = 1.0,
        kind: str = "design",
        delta: float = 0.05,
        reference: str | np.ndarray = "uniform",
        pointwise: bool = False,
        tol: float = 1e-6,
        max_iter: int = 5000,
    ) -> None:
        self.model, self.data = model, data
        self.beta, self.kind, self.delta = beta, kind, delta
        self.reference, self.pointwise = reference, pointwise
        self.tol, self.max_iter = tol, max_iter
        self._policies: dict[Any, Pessimistic] = {}

    def policy(self, user: Any) -> Pessimistic:
        key = user.item() if isinstance(user, np.generic) else user
        if key not in self._policies:
            view, cs = user_confidence(
                self.model, key, self.data, beta=self.beta, kind=self.kind, delta=self.delta
            )
            self._policies[key] = Pessimistic(
                view,
                cs,
                reference=self.reference,
                pointwise=self.pointwise,
                tol=self.tol,
                max_iter=self.max_iter,
            )
        return self._policies[key]

    def probs(self, targets: TargetStates, user: Any) -> np.ndarray:
        """User ``u``'s policy on ``targets``, ``(m, K)``."""
        return self.policy(user).probs(targets)

    def all_probs(
        self, targets: TargetStates, users: Sequence[Any] | np.ndarray | None = None
    ) -> np.ndarray:
        """Every user's policy on the same targets, ``(U, m, K)``."""
        users = self.model.users_ if users is None else users
        return np.stack([self.probs(targets, u) for u in np.asarray(users).tolist()])


class _Users:
    """Every user's reward in a common basis ``A`` (d, p): centres ``V`` (U, p), and for the
    pessimistic case ``M_u⁻¹`` (U, p, p) and ``β_u`` (U,). Vectorized over users."""

    def __init__(
        self,
        basis: np.ndarray,
        centers: np.ndarray,
        m_inv: np.ndarray | None,
        betas: np.ndarray | None,
    ) -> None:
        self.basis, self.centers, self.m_inv, self.betas = basis, centers, m_inv, betas
        self.thetas = centers @ basis.T  # (U, d): the estimates θ̂_u

    @property
    def pessimistic(self) -> bool:
        return self.m_inv is not None

    def __len__(self) -> int:
        return int(self.centers.shape[0])

    def values(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(Δ̲_u(w̄), worst-case θ_u)`` for every user: ``(U,)`` and ``(U, d)``."""
        g = self.basis.T @ w
        lin = self.centers @ g
        if not self.pessimistic:
            return lin, self.thetas
        m_inv_g = self.m_inv @ g  # (U, p)
        norms = np.sqrt(np.maximum(m_inv_g @ g, 0.0))
        safe = np.where(norms > 0, norms, 1.0)
        worst = self.centers - (self.betas / safe)[:, None] * m_inv_g * (norms > 0)[:, None]
        return lin - self.betas * norms, worst @ self.basis.T


class _Aggregate(Policy):
    """Shared machinery of :class:`Utilitarian` and :class:`Leximin` (see the module doc)."""

    # diagnostics of the last solve
    converged_: bool
    duality_gap_: float
    n_iter_: int

    def __init__(
        self,
        model: UserViews,
        data: PreferenceData | None = None,
        *,
        users: Sequence[Any] | None = None,
        beta: Beta = 0.0,
        kind: str = "design",
        delta: float = 0.05,
        reference: str | np.ndarray = "uniform",
        tol: float = 1e-6,
        max_iter: int = 500,
    ) -> None:
        self.model, self.data, self.users = model, data, users
        self.beta, self.kind, self.delta = beta, kind, delta
        self.reference, self.tol, self.max_iter = reference, tol, max_iter

    def _check_params(self) -> None:
        check_number(self.tol, "tol", owner=type(self).__name__, strict=True)
        check_int(self.max_iter, "max_iter", owner=type(self).__name__)

    def _warn_gap(self, what: str, reason: str = "iteration cap") -> None:
        """``ConvergenceWarning`` when the certified gap ended above ``tol``."""
        if not self.converged_:
            warn(
                gap_message(
                    f"{type(self).__name__} ({what})",
                    self.duality_gap_,
                    self.tol,
                    self.n_iter_,
                    reason,
                ),
                ConvergenceWarning,
            )

    # ---- per-user pieces ----------------------------------------------------------------------
    def _users(self) -> list[Any]:
        users = self.model.users_ if self.users is None else self.users
        users = np.asarray(users).tolist()
        if not users:
            raise PluralignError("an aggregated policy needs at least one user")
        return users

    def _stack(self) -> _Users:
        users = self._users()
        plug_in = self.data is None or (not callable(self.beta) and self.beta == 0)
        if plug_in:
            thetas = self.model.user_theta(users)
            return _Users(np.eye(thetas.shape[1]), thetas, None, None)
        centers, m_inv, betas, basis = [], [], [], None
        for user in users:
            view, cs = user_confidence(
                self.model,
                user,
                self.data,  # type: ignore[arg-type]  # not plug_in: the data are given
                beta=self.beta,
                kind=self.kind,
                delta=self.delta,
            )
            if basis is None:
                basis = view.basis
            elif view.basis.shape != basis.shape or not np.allclose(view.basis, basis):
                raise PluralignError("aggregated policies need users' views in one basis")
            centers.append(cs.center)
            m_inv.append(cs.solve(np.eye(cs.n_params)))
            betas.append(cs.beta)
        return _Users(basis, np.array(centers), np.array(m_inv), np.array(betas))  # type: ignore[arg-type]  # >= 1 user

    # ---- policy geometry ----------------------------------------------------------------------
    def _geometry(self, targets: TargetStates) -> SimplexGeometry:
        """The targets' features and ``π_ref`` for one call (built per call, never stored)."""
        return SimplexGeometry(targets.phi, reference_probs(self.reference, targets))


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
        Certified-gap tolerance and iteration cap of the double oracle.

    After ``probs``: ``duality_gap_``, ``n_iter_``, ``converged_``, ``objective_`` (the
    aggregate pessimistic improvement of the returned policy) and ``user_values_`` (each
    user's ``Δ̲_u``).
    """

    def __init__(
        self,
        model: UserViews,
        data: PreferenceData | None = None,
        *,
        users: Sequence[Any] | None = None,
        weights: Sequence[float] | None = None,
        beta: Beta = 0.0,
        kind: str = "design",
        delta: float = 0.05,
        reference: str | np.ndarray = "uniform",
        tol: float = 1e-6,
        max_iter: int = 5000,
    ) -> None:
        super().__init__(
            model,
            data,
            users=users,
            beta=beta,
            kind=kind,
            delta=delta,
            reference=reference,
            tol=tol,
            max_iter=max_iter,
        )
        self.weights = weights

    def probs(self, targets: TargetStates) -> np.ndarray:
        self._check_params()
        stack = self._stack()
        n_users = len(stack)
        weights = (
            np.full(n_users, 1.0 / n_users)
            if self.weights is None
            else np.asarray(self.weights, dtype=np.float64)
        )
        if weights.shape != (n_users,) or (weights < 0).any() or weights.sum() <= 0:
            raise PluralignError(f"weights must be {n_users} non-negative numbers, not all 0")
        weights = weights / weights.sum()
        geometry = self._geometry(targets)
        # Start (and, without pessimism, finish): the greedy policy of the mean reward, the
        # maximiser of the linear Σ ω_u θ̂_uᵀw̄(π).
        if stack.pessimistic:

            def oracle(w: np.ndarray) -> tuple[float, np.ndarray]:
                values, worst = stack.values(w)
                return float(weights @ values), weights @ worst  # θ ∈ E = Σ_u ω_u A_u C_u

            solution = double_oracle(
                geometry, [weights @ stack.thetas], oracle, tol=self.tol, max_iter=self.max_iter
            )
            probs = solution.probs
            self.duality_gap_, self.n_iter_ = solution.duality_gap, solution.n_iter
        else:
            probs = one_hot_argmax(targets.phi @ (weights @ stack.thetas))
            self.duality_gap_, self.n_iter_ = 0.0, 0
        self.converged_ = self.duality_gap_ <= self.tol
        self._warn_gap("double oracle")
        self.user_values_ = stack.values(geometry.wbar(probs))[0]
        self.objective_ = float(weights @ self.user_values_)
        return probs


class Leximin(_Aggregate):
    """One policy maximising the worst user's (pessimistic) improvement, then the next worst.

    Parameters are those of :class:`Utilitarian` (without ``weights``), plus ``levels``: how
    many lexicographic levels to optimise (``None``: all, i.e. leximin; ``1``: max–min only).

    With ``levels=1`` the max–min problem ``max_{w∈P} min_{θ∈Θ} θᵀw`` (``P`` the set of ``w̄(π)``,
    ``Θ = conv ∪_u A_u C_u``) is solved by the **double oracle**: a small matrix game between
    the deterministic policies found so far and the points of ``Θ`` found so far gives mixed
    strategies ``(μ, ν)``; the best response to ``θ̄ = Σ ν_c θ_c`` (a per-state argmax) is a new
    policy and gives the upper bound ``h(θ̄) = max_π θ̄ᵀw̄(π)``; the worst user's worst-case ``θ`` at
    ``w̄ = Σ μ_v w_v`` is a new point of ``Θ`` and ``min_u Δ̲_u(w̄)`` the lower bound. Their
    difference is the certified ``duality_gap_``; the returned policy is the mixture ``Σ μ_v π_v``.
    Each master problem has as many variables as policies found, not ``m·K``.

    After ``probs``: ``duality_gap_`` (of the first level, the worst user), ``n_iter_``,
    ``converged_``, ``objective_`` (``min_u Δ̲_u`` of the returned policy), ``user_values_`` and
    ``levels_`` (the level reached at each lexicographic step).
    """

    def __init__(
        self,
        model: UserViews,
        data: PreferenceData | None = None,
        *,
        users: Sequence[Any] | None = None,
        levels: int | None = None,
        beta: Beta = 0.0,
        kind: str = "design",
        delta: float = 0.05,
        reference: str | np.ndarray = "uniform",
        tol: float = 1e-6,
        max_iter: int = 500,
    ) -> None:
        super().__init__(
            model,
            data,
            users=users,
            beta=beta,
            kind=kind,
            delta=delta,
            reference=reference,
            tol=tol,
            max_iter=max_iter,
        )
        self.levels = levels

    def probs(self, targets: TargetStates) -> np.ndarray:
        self._check_params()
        stack = self._stack()
        n_users = len(stack)
        geometry = self._geometry(targets)
        if self.levels == 1:
            return self._max_min(stack, geometry)
        cuts = [(u, geometry.gain(stack.thetas[u])) for u in range(n_users)]
        fixed: dict[int, float] = {}
        levels: list[float] = []
        first_gap, total_it = None, 0
        max_levels = n_users if self.levels is None else max(1, int(self.levels))
        probs = None
        while len(fixed) < n_users and len(levels) < max_levels:
            free = [u for u in range(n_users) if u not in fixed]
            solution = kelley_cutting_planes(
                geometry, stack.values, free, fixed, cuts, tol=self.tol, max_iter=self.max_iter
            )
            probs, level, gap = solution.probs, solution.value, solution.duality_gap
            duals, it = solution.duals, solution.n_iter
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
                values = stack.values(geometry.wbar(probs))[0]
                newly = [u for u in free if values[u] <= level + self.tol]
            for u in newly:
                fixed[u] = level - self.tol
        self.duality_gap_ = float(first_gap)  # type: ignore[arg-type]  # set by the first level
        self.converged_ = self.duality_gap_ <= self.tol
        self.n_iter_ = total_it
        self._warn_gap("cutting planes, worst user's level", reason="")
        self.levels_ = levels
        self.user_values_ = stack.values(geometry.wbar(probs))[0]  # type: ignore[arg-type]  # set by the solve
        self.objective_ = float(self.user_values_.min())
        return probs  # type: ignore[return-value]  # set by the solve

    def _max_min(self, stack: _Users, geometry: SimplexGeometry) -> np.ndarray:
        """``max_π min_u Δ̲_u(π)`` by the double oracle (see the class docstring)."""

        def oracle(w: np.ndarray) -> tuple[float, np.ndarray]:
            values, worst = stack.values(w)
            u = int(np.argmin(values))
            return float(values[u]), worst[u]  # θ ∈ Θ = conv ∪_u A_u C_u

        solution = double_oracle(
            geometry, list(stack.thetas), oracle, tol=self.tol, max_iter=self.max_iter
        )
        probs = solution.probs
        self.duality_gap_, self.n_iter_ = solution.duality_gap, solution.n_iter
        self.converged_ = self.duality_gap_ <= self.tol
        self._warn_gap("double oracle")
        self.user_values_ = stack.values(geometry.wbar(probs))[0]
        self.objective_ = float(self.user_values_.min())
        self.levels_ = [self.objective_]
        return probs
