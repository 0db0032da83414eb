"""Pessimistic policies over a confidence set: the max–min policy and its pointwise variant.

For a model ``r = θᵀz(x, φ)`` with confidence set ``C = {θ : ‖θ − θ̂‖_M ≤ β}``, on target states
``j = 1..m`` with candidates ``a = 1..K`` and a reference policy ``π_ref``
(Zhu, Jordan & Jiao 2023; with an RTV-reduced model, the PRS policy of LoCo-RLHF, Lee, Sun &
Liu 2024, arXiv 2412.19436):

    π̂ = argmax_π min_{θ∈C} θᵀ w(π),   w(π) = (1/m) Σ_j (Σ_a π(a|j) z(j,a) − Σ_a π_ref(a|j) z(j,a))
      = argmax_π f(π),                f(π) = θ̂ᵀ w(π) − β ‖w(π)‖_{M⁻¹}.

``f`` is concave on the product of simplices but not separable across states. It is solved by
**Frank–Wolfe with an active set and pairwise corrections** (the pairwise / fully-corrective
variants of Lacoste-Julien & Jaggi 2015, "On the global linear convergence of Frank–Wolfe
optimization variants"). The iterate is a convex combination ``π = Σ_i λ_i e(a_i)`` of vertices of
the product of simplices (deterministic policies ``a_i``, one action per state), held in
``p``-space (``p`` = the model's ``n_params``) as ``v_i = w(e(a_i))``, ``M⁻¹v_i``, ``θ̂ᵀv_i`` and
the Gram matrix ``G_ij = v_iᵀM⁻¹v_j``. Each iteration

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

The solver is :func:`~pluralign.policies._solvers.pairwise_frank_wolfe` (with its active-set
pieces, in :mod:`pluralign.policies._solvers`); :class:`Pessimistic` handles ``0 ∈ C``, keeps the
diagnostics of its last call and warns when the gap ends above ``tol``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pluralign.confidence import ConfidenceSet
from pluralign.data import TargetStates
from pluralign.errors import ConvergenceWarning, PluralignError
from pluralign.policies._solvers import pairwise_frank_wolfe
from pluralign.policies.base import Policy, one_hot_argmax
from pluralign.rewards.diagnostics import gap_message, warn
from pluralign.rewards.linear import LinearInParameters
from pluralign.rewards.validation import check_int, check_number

__all__ = ["Pessimistic", "Reference", "reference_probs"]

_CHUNK_ENTRIES = 1 << 22


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
        if cs.contains(np.zeros(cs.n_params)):
            # ‖θ̂‖_M ≤ β: θ = 0 is in C, so h(0) = 0 bounds every policy's pessimistic value and
            # the reference policy (w = 0, value 0) is optimal: not enough evidence to deviate.
            self.duality_gap_, self.n_iter_, self.converged_ = 0.0, 0, True
            self.pessimistic_value_ = 0.0
            return ref.copy()
        solution = pairwise_frank_wolfe(
            model, cs, targets, w_ref, tol=self.tol, max_iter=self.max_iter
        )
        self.duality_gap_ = solution.duality_gap
        self.n_iter_ = solution.n_iter
        self.converged_ = self.duality_gap_ <= self.tol
        self.pessimistic_value_ = solution.value
        self.n_active_ = solution.n_active
        if not self.converged_:
            warn(
                gap_message(
                    f"{self._owner()} (pairwise Frank–Wolfe)",
                    self.duality_gap_,
                    self.tol,
                    solution.n_iter,
                    "iteration cap",
                ),
                ConvergenceWarning,
            )
        return solution.probs

    def _pointwise(self, targets: TargetStates) -> np.ndarray:
        cs, model = self.confidence, self.model
        ref = reference_probs(self.reference, targets)
        phi_ref = np.einsum("ja,jad->jd", ref, targets.phi)
        # z(j,a) − z_ref(j) = z(x_j, φ_ja − φ_ref_j): z is linear in φ for fixed x.
        diff = targets.phi - phi_ref[:, None, :]
        lcb = np.empty((targets.m, targets.n_actions))
        chunk = max(1, _CHUNK_ENTRIES // (targets.n_actions * cs.n_params))
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
