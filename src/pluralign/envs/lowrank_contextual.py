"""The LoCo-RLHF simulator: a contextual low-rank Bradley–Terry reward with known truth.

Truth (Lee, Sun & Liu 2024, LoCo-RLHF): ``r*(x, φ) = xᵀΘ*φ`` with
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
"""

from __future__ import annotations

import numpy as np

from pluralign.data import PreferenceData, TargetStates
from pluralign.errors import ConfigError
from pluralign.policies.base import Policy, as_probs

__all__ = ["LowRankContextual", "haar_frame", "unit_sphere"]

BEHAVIORS = ("uniform", "skewed")


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
    """Contextual low-rank preference simulator (DESIGN §5, ``lowrank_contextual``).

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
    seed:
        Seed (an int or a list of ints) of the truth: ``Θ*`` and the shift direction. Samples
        take their own seeds.
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
    ) -> None:
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

    # ------------------------------------------------------------------ sampling
    def _contexts(self, rng: np.random.Generator, m: int, target: bool) -> np.ndarray:
        x = rng.standard_normal((m, self.d_x)) / np.sqrt(self.d_x)
        return x + self.shift * self.shift_direction if target else x

    def sample_offline(self, n: int, seed: int | np.random.Generator) -> PreferenceData:
        """``n`` comparisons on source contexts, actions from the behaviour policy."""
        rng = np.random.default_rng(seed)
        x = self._contexts(rng, n, target=False)
        phi = unit_sphere(rng, (n, self.n_actions), self.d_phi)
        rewards = self.true_reward(x, phi)
        logits = np.zeros_like(rewards) if self.behavior == "uniform" else -self.skew * rewards
        a0, a1 = gumbel_top2(rng, logits)
        rows = np.arange(n)
        margin = rewards[rows, a1] - rewards[rows, a0]
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-margin))).astype(np.int8)
        return PreferenceData(x=x, phi0=phi[rows, a0], phi1=phi[rows, a1], y=y)

    def sample_targets(self, m: int, seed: int | np.random.Generator) -> TargetStates:
        """``m`` deployment states: shifted contexts, ``K`` fresh candidates each."""
        rng = np.random.default_rng(seed)
        x = self._contexts(rng, m, target=True)
        return TargetStates(x=x, phi=unit_sphere(rng, (m, self.n_actions), self.d_phi))

    # ------------------------------------------------------------------ truth
    def true_reward(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """``xᵀΘ*φ``: ``phi`` ``(n, d_phi)`` → ``(n,)``, or ``(m, K, d_phi)`` → ``(m, K)``."""
        xt = np.asarray(x) @ self.theta_star
        phi = np.asarray(phi)
        return np.einsum("md,mkd->mk", xt, phi) if phi.ndim == 3 else np.sum(xt * phi, axis=1)

    def policy_value(self, policy: Policy | np.ndarray, targets: TargetStates) -> float:
        """Exact ``J(π) = (1/m) Σ_j Σ_a π(a|j) r*(j, a)`` on the target sample."""
        probs = as_probs(policy, targets)
        return float(np.mean(np.sum(probs * self.true_reward(targets.x, targets.phi), axis=1)))

    def optimal_value(self, targets: TargetStates) -> float:
        """``J(π*)``, the value of the per-state argmax of ``r*``."""
        return float(np.mean(np.max(self.true_reward(targets.x, targets.phi), axis=1)))

    def suboptimality(self, policy: Policy | np.ndarray, targets: TargetStates) -> float:
        """``J(π*) − J(π)`` (≥ 0)."""
        return self.optimal_value(targets) - self.policy_value(policy, targets)

    def estimation_error(self, theta_hat: np.ndarray) -> float:
        """``‖Θ̂ − Θ*‖_F / ‖Θ*‖_F``."""
        return float(np.linalg.norm(theta_hat - self.theta_star) / np.linalg.norm(self.theta_star))
