"""The LoCo-RLHF simulator: a contextual low-rank Bradley–Terry reward with known truth.

Truth (Lee, Sun & Liu 2024, LoCo-RLHF, arXiv 2412.19436): ``r*(x, φ) = xᵀΘ*φ`` with
``Θ* = c · U diag(s) Vᵀ``, where ``U ∈ R^{d_x×r}`` and ``V ∈ R^{d_phi×r}`` are Haar-random
orthonormal frames, ``s`` is drawn uniformly in ``singular_values`` and
``c = sqrt(d_x·d_phi / r)``. With the distributions below, ``E[r*(x, φ)²] = mean(s²)`` on source
contexts, so the reward scale does not change with the dimensions.

* Source contexts (behind the offline data): ``x = g / sqrt(d_x)``, ``g ~ N(0, I)``.
* Target contexts (deployment): ``x = g / sqrt(d_x) + shift · u``, with ``u`` a fixed
  Haar-random unit vector. ``shift`` moves the target distribution; it never changes ``Θ*``.
* Each state has ``n_actions`` candidates with features uniform on the unit sphere.
* Offline comparisons: two distinct candidates drawn without replacement from the behaviour
  policy, labelled by a Bradley–Terry draw from ``Θ*``. ``behavior="uniform"`` draws uniformly;
  ``behavior="skewed"`` draws with probability ``∝ exp(−skew · r*(x, a))``, so the optimal
  actions of each state are rarely compared (poor coverage).

Coverage regimes (``coverage``):

* ``"full"`` (the default, the original regime): offline and deployment candidates are uniform
  on the whole unit sphere of ``R^{d_phi}``. The only poorly covered direction is the context
  shift, which multiplies every action's feature alike (``z = x ⊗ φ``), so the optimal policy and
  greedy's choice are about equally covered and pessimism can only shrink towards the reference.
* ``"subspace"`` (single-policy coverage, the regime of the pessimism theory): a fixed
  *support* ``S ⊂ R^{d_phi}`` of dimension ``rank + support_extra`` with
  ``S ⊇ span(V*)`` (the reward-relevant right singular directions plus ``support_extra``
  Haar-random directions orthogonal to them, drawn with the truth), and a fixed unit
  *novel direction* ``e ∈ S⊥`` (Haar-random in ``S⊥``, drawn next). With ``B`` an orthonormal
  basis of ``S`` and ``C`` one of ``S⊥``:

  - offline candidates (and the ``n_actions`` ordinary candidates of each deployment state,
    which follow the same law) are ``φ = sqrt(1 − ε²)·B u + ε·C w`` with ``ε = offline_leak``,
    ``u``, ``w`` uniform on the unit spheres of ``R^{dim S}`` and ``R^{dim S⊥}``: unit vectors
    whose ``S⊥`` component has norm exactly ``ε`` and a random direction;
  - each deployment state then *appends* ``n_uncovered`` out-of-support candidates
    ``φ = sqrt(1 − c²)·B u + c·e`` with ``c = uncovered_scale``: unit vectors with a component
    ``c`` along the novel direction (a new kind of response the offline data barely showed).

  Because ``S ⊇ span(V*)``, ``Θ*·C = 0``: the true reward of every candidate follows the same
  model ``r* = xᵀΘ*φ = sqrt(1 − ε²)·xᵀΘ* B u`` (``ε = c`` for the out-of-support ones), so an
  out-of-support candidate is worth a shrunk in-support one (the ``S⊥`` part is worth nothing)
  and the optimal actions are mostly ordinary candidates (an out-of-support one is optimal
  where its shrunk reward still beats the ordinary ones), whose directions the data cover. The
  data see ``e`` only through the random leak (``ε²/dim S⊥`` of the second moment of ``φ`` per
  ``S⊥`` direction), so an estimate's value of ``e``, ``xᵀΘ̂e``, is noise that the
  likelihood barely constrains. The direction is *fixed*, so that error has the same sign in
  every state (more so under a context shift, which gives the contexts a common mean): an
  unpessimistic estimate may over-value every out-of-support candidate at once, and a policy
  that picks them has ``w(π)`` with a component ``≈ share · c · E[x] ⊗ e`` that the data barely
  saw (large ``‖w(π)‖_{M⁻¹}``, pessimism's penalty), while ``π*``'s ``w`` stays in covered
  directions (in practice the rank constraint of a low-rank fit keeps its ``V̂`` in the strongly
  identified ``span(V*)``, so it is the full-rank model that is exposed; see README). With random
  per-candidate ``S⊥`` directions instead, those components would
  average out over states in ``w(π)`` and coverage would not separate ``π*`` from greedy (this
  was the first version of this design and measured so). Nothing depends on the method; the
  truth, the labels and the rewards are those of the ``"full"`` regime. With
  ``offline_leak = 0`` the offline data lie exactly in ``S``; the ridge estimate of a convex
  model is then exactly 0 on ``S⊥`` and nothing is over-valued, which is why the default leak is
  small but positive ("barely seen" rather than "never seen").

  Reward scale: ``E[φφᵀ] = (1 − ε²)·BBᵀ/dim S + ε²·CCᵀ/dim S⊥`` and ``Θ*BBᵀ = Θ*``, so on
  source contexts ``E[r*²] = (1 − ε²)·mean(s²)·d_phi/dim S`` — larger than the ``"full"``
  regime's ``mean(s²)`` by ``d_phi/dim S`` (features concentrated on ``S ⊇ span(V*)``), which
  sub-optimalities of the two regimes should be read against.

  The natural reference policy here is the data's own: :meth:`LowRankContextual.reference_probs`
  is uniform over the ``n_actions`` ordinary candidates (uniform over all under ``"full"``).

The ``"full"`` regime's draws do not depend on the coverage parameters: they consume the same
random streams in the same order as before the coverage option existed.
"""

from __future__ import annotations

import numpy as np

from pluralign.data import PreferenceData, TargetStates
from pluralign.errors import ConfigError
from pluralign.policies.base import Policy, as_probs

__all__ = ["COVERAGES", "LowRankContextual", "haar_frame", "unit_sphere"]

BEHAVIORS = ("uniform", "skewed")
COVERAGES = ("full", "subspace")


def haar_frame(rng: np.random.Generator, d: int, r: int) -> np.ndarray:
    """A Haar-random ``d×r`` matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    q, upper = np.linalg.qr(rng.standard_normal((d, r)))
    return q * np.sign(np.diag(upper))


def unit_sphere(rng: np.random.Generator, shape: tuple[int, ...], d: int) -> np.ndarray:
    """Points uniform on the unit sphere of ``R^d``, shape ``(*shape, d)``."""
    g = rng.standard_normal((*shape, d))
    return g / np.linalg.norm(g, axis=-1, keepdims=True)


def gumbel_top2(rng: np.random.Generator, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two draws without replacement from ``softmax(logits)`` per row (Gumbel top-k trick)."""
    keys = logits + rng.gumbel(size=logits.shape)
    order = np.argsort(-keys, axis=1)
    return order[:, 0], order[:, 1]


class LowRankContextual:
    """Contextual low-rank preference simulator (docs/design.md §5, ``lowrank_contextual``).

    Parameters
    ----------
    d_x, d_phi, rank:
        Context dimension, feature dimension and the rank of ``Θ*``.
    n_actions:
        Candidates per state ``K`` (≥ 2).
    shift:
        Size of the mean shift of target contexts (0: no distribution shift).
    behavior:
        ``"uniform"`` or ``"skewed"`` (see the module docstring).
    skew:
        Strength of the skewed behaviour policy.
    singular_values:
        Range ``(lo, hi)`` of the (normalized) singular values of ``Θ*``.
    coverage:
        ``"full"`` or ``"subspace"`` (see the module docstring).
    support_extra:
        ``"subspace"``: directions of the support ``S`` beyond ``span(V*)``; ``dim S =
        rank + support_extra`` must be ``< d_phi`` so that ``S⊥`` is not empty.
    n_uncovered:
        ``"subspace"``: out-of-support candidates appended to each deployment state (≥ 0); the
        target states then have ``n_actions + n_uncovered`` candidates.
    uncovered_scale:
        ``"subspace"``: norm of their ``S⊥`` component, in ``(0, 1]``.
    offline_leak:
        ``"subspace"``: norm of the ``S⊥`` component of the offline (and ordinary deployment)
        candidates, in ``[0, 1)``.
    seed:
        Seed (an int or a list of ints) of the truth: ``Θ*``, the shift direction and (for
        ``"subspace"``, drawn after them) the extra support directions. Samples take their own
        seeds.

    Attributes (``"subspace"`` only): ``support_basis`` ``B`` (``d_phi × dim S``, orthonormal,
    its first ``rank`` columns are ``V*``), ``complement_basis`` ``C`` (``d_phi × dim S⊥``) and
    ``novel_direction`` ``e`` (a unit vector in ``S⊥``).
    """

    def __init__(
        self,
        d_x: int = 10,
        d_phi: int = 10,
        rank: int = 2,
        n_actions: int = 8,
        shift: float = 0.0,
        behavior: str = "uniform",
        skew: float = 2.0,
        singular_values: tuple[float, float] = (1.0, 2.0),
        seed: int | list[int] = 0,
        *,
        coverage: str = "full",
        support_extra: int = 2,
        n_uncovered: int = 2,
        uncovered_scale: float = 0.7,
        offline_leak: float = 0.1,
    ) -> None:
        if coverage not in COVERAGES:
            raise ConfigError(f"unknown coverage {coverage!r}; valid: {', '.join(COVERAGES)}")
        if coverage == "subspace":
            if support_extra < 0 or rank + support_extra >= d_phi:
                raise ConfigError(
                    f"coverage 'subspace' needs 0 ≤ support_extra and rank + support_extra < "
                    f"d_phi (S⊥ not empty), got rank={rank}, support_extra={support_extra}, "
                    f"d_phi={d_phi}"
                )
            if n_uncovered < 0:
                raise ConfigError(f"n_uncovered must be ≥ 0, got {n_uncovered}")
            if not 0 < uncovered_scale <= 1:
                raise ConfigError(f"uncovered_scale must be in (0, 1], got {uncovered_scale}")
            if not 0 <= offline_leak < 1:
                raise ConfigError(f"offline_leak must be in [0, 1), got {offline_leak}")
        if behavior not in BEHAVIORS:
            raise ConfigError(f"unknown behavior {behavior!r}; valid: {', '.join(BEHAVIORS)}")
        if not 1 <= rank <= min(d_x, d_phi):
            raise ConfigError(f"rank must be in [1, min(d_x, d_phi)] = [1, {min(d_x, d_phi)}]")
        if n_actions < 2:
            raise ConfigError(f"n_actions must be ≥ 2, got {n_actions}")
        if len(singular_values) != 2:
            raise ConfigError(f"singular_values must be (lo, hi), got {singular_values}")
        lo, hi = singular_values
        if not 0 < lo <= hi:
            raise ConfigError(f"singular_values must satisfy 0 < lo ≤ hi, got {singular_values}")
        self.d_x, self.d_phi, self.rank = d_x, d_phi, rank
        self.n_actions, self.shift, self.behavior, self.skew = n_actions, shift, behavior, skew
        self.singular_values, self.seed = (lo, hi), seed

        truth_rng = np.random.default_rng(seed)
        self.U_star = haar_frame(truth_rng, d_x, rank)
        self.V_star = haar_frame(truth_rng, d_phi, rank)
        self.s_star = np.sort(truth_rng.uniform(lo, hi, size=rank))[::-1]
        scale = np.sqrt(d_x * d_phi / rank)
        self.theta_star = scale * (self.U_star * self.s_star) @ self.V_star.T
        self.shift_direction = unit_sphere(truth_rng, (), d_x)
        self.coverage = coverage
        self.support_extra, self.n_uncovered = support_extra, n_uncovered
        self.uncovered_scale, self.offline_leak = uncovered_scale, offline_leak
        self.support_basis = self.complement_basis = self.novel_direction = None
        if coverage == "subspace":
            # Drawn after the "full" regime's truth, so Θ* and the shift are the same in both.
            full_q = np.linalg.qr(self.V_star, mode="complete")[0]
            v_perp = full_q[:, rank:]  # an orthonormal basis of span(V*)⊥
            extra = v_perp @ haar_frame(truth_rng, d_phi - rank, support_extra)
            self.support_basis = np.concatenate([self.V_star, extra], axis=1)
            self.complement_basis = np.linalg.qr(self.support_basis, mode="complete")[0][
                :, rank + support_extra :
            ]
            self.novel_direction = self.complement_basis @ unit_sphere(
                truth_rng, (), d_phi - rank - support_extra
            )

    # ------------------------------------------------------------------ sampling
    def _contexts(self, rng: np.random.Generator, m: int, target: bool) -> np.ndarray:
        x = rng.standard_normal((m, self.d_x)) / np.sqrt(self.d_x)
        return x + self.shift * self.shift_direction if target else x

    def _candidates(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """``"subspace"`` ordinary candidates ``sqrt(1 − ε²)·B u + ε·C w``, ``ε = offline_leak``."""
        leak = self.offline_leak
        u = unit_sphere(rng, shape, self.support_basis.shape[1]) @ self.support_basis.T  # type: ignore[union-attr]  # set in __init__ for shift="subspace"
        w = unit_sphere(rng, shape, self.complement_basis.shape[1]) @ self.complement_basis.T  # type: ignore[union-attr]  # set in __init__ for shift="subspace"
        return np.sqrt(1.0 - leak**2) * u + leak * w

    def _uncovered(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Out-of-support candidates ``sqrt(1 − c²)·B u + c·e``, ``c = uncovered_scale``."""
        c = self.uncovered_scale
        u = unit_sphere(rng, shape, self.support_basis.shape[1]) @ self.support_basis.T  # type: ignore[union-attr]  # set in __init__ for shift="subspace"
        return np.sqrt(1.0 - c**2) * u + c * self.novel_direction  # type: ignore[operator]  # set in __init__ for shift="subspace"

    def sample_offline(
        self, n: int, *, seed: int | list[int] | np.random.Generator
    ) -> PreferenceData:
        """``n`` comparisons on source contexts, actions from the behaviour policy."""
        rng = np.random.default_rng(seed)
        x = self._contexts(rng, n, target=False)
        if self.coverage == "full":
            phi = unit_sphere(rng, (n, self.n_actions), self.d_phi)
        else:
            phi = self._candidates(rng, (n, self.n_actions))
        rewards = self.true_reward(x, phi)
        logits = np.zeros_like(rewards) if self.behavior == "uniform" else -self.skew * rewards
        a0, a1 = gumbel_top2(rng, logits)
        rows = np.arange(n)
        margin = rewards[rows, a1] - rewards[rows, a0]
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-margin))).astype(np.int8)
        return PreferenceData(x=x, phi0=phi[rows, a0], phi1=phi[rows, a1], y=y)

    def sample_targets(
        self, m: int, *, seed: int | list[int] | np.random.Generator
    ) -> TargetStates:
        """``m`` deployment states: shifted contexts, ``K`` fresh candidates each.

        ``"subspace"``: ``K`` candidates from the offline law, then ``n_uncovered``
        out-of-support ones (the last ``n_uncovered`` indices of every state).
        """
        rng = np.random.default_rng(seed)
        x = self._contexts(rng, m, target=True)
        if self.coverage == "full":
            return TargetStates(x=x, phi=unit_sphere(rng, (m, self.n_actions), self.d_phi))
        ordinary = self._candidates(rng, (m, self.n_actions))
        uncovered = self._uncovered(rng, (m, self.n_uncovered))
        return TargetStates(x=x, phi=np.concatenate([ordinary, uncovered], axis=1))

    def reference_probs(self, targets: TargetStates) -> np.ndarray:
        """The data's own reference policy: uniform over the ordinary candidates.

        ``"full"``: uniform over all ``K``; ``"subspace"``: uniform over the first ``n_actions``
        (the candidates of the offline law), 0 on the out-of-support ones.
        """
        probs = np.zeros((targets.m, targets.n_actions))
        probs[:, : self.n_actions] = 1.0 / self.n_actions
        return probs

    # ------------------------------------------------------------------ truth
    def true_reward(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """``xᵀΘ*φ``: ``phi`` ``(n, d_phi)`` → ``(n,)``, or ``(m, K, d_phi)`` → ``(m, K)``."""
        xt = np.asarray(x) @ self.theta_star
        phi = np.asarray(phi)
        return np.einsum("md,mkd->mk", xt, phi) if phi.ndim == 3 else np.sum(xt * phi, axis=1)

    def policy_value(self, policy: Policy | np.ndarray, targets: TargetStates) -> float:
        """Exact ``J(π) = (1/m) Σ_j Σ_a π(a|j) r*(j, a)`` on the target sample."""
        probs = as_probs(policy, targets)
        return float(np.mean(np.sum(probs * self.true_reward(targets.x, targets.phi), axis=1)))  # type: ignore[arg-type]  # set in __init__ for shift="subspace"

    def optimal_value(self, targets: TargetStates) -> float:
        """``J(π*)``, the value of the per-state argmax of ``r*``."""
        return float(np.mean(np.max(self.true_reward(targets.x, targets.phi), axis=1)))  # type: ignore[arg-type]  # set in __init__ for shift="subspace"

    def suboptimality(self, policy: Policy | np.ndarray, targets: TargetStates) -> float:
        """``J(π*) − J(π)`` (≥ 0)."""
        return self.optimal_value(targets) - self.policy_value(policy, targets)

    def estimation_error(self, theta_hat: np.ndarray) -> float:
        """``‖Θ̂ − Θ*‖_F / ‖Θ*‖_F``."""
        return float(np.linalg.norm(theta_hat - self.theta_star) / np.linalg.norm(self.theta_star))
