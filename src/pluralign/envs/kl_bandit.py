"""The GSHF simulator: a reverse-KL regularized linear contextual bandit with known truth.

Xiong et al. 2024 (GSHF, ICML 2024, arXiv 2312.11456) model RLHF as a contextual bandit with a
reference policy ``π0`` (the SFT model) and the objective

    J_η(π) = E_x [ Σ_a π(a|x) r*(x,a) − η KL(π(·|x) ‖ π0(·|x)) ],   r*(x,a) = θ*ᵀφ(x,a),

under Bradley–Terry preferences ``P(a¹ ≻ a² | x) = σ(r*(x,a¹) − r*(x,a²))``. Its maximiser is the
Gibbs policy ``π*(a|x) ∝ π0(a|x) exp(r*(x,a)/η)`` with value ``η E_x log Σ_a π0 exp(r*/η)``, and for
every policy ``J_η(π*) − J_η(π) = η E_x KL(π(·|x) ‖ π*(·|x)) ≥ 0``.

This simulator (our construction; the paper's experiments use LLMs):

* A context ``x`` is a prompt with ``K = n_actions`` candidate responses; it is represented by
  their features ``φ(x, a) ∈ R^d`` (``TargetStates`` with ``x=None``), uniform on the unit sphere
  for deployment contexts.
* ``θ* = reward_scale · sqrt(d) · u*`` with ``u*`` a Haar-random unit vector, so the reward of a
  random response has standard deviation ``reward_scale`` and ``‖Δφ‖ ≤ 2``.
* ``π0(a|x) ∝ exp(ψᵀφ(x,a))``: a softmax policy whose logits are linear in the features, with
  ``ψ = ref_scale · sqrt(d) · (ρ u* + sqrt(1 − ρ²) u⊥)`` (``u⊥ ⊥ u*`` Haar-random, ``ρ =
  ref_alignment``): ``ref_scale`` is the spread of the reference's logits, ``ρ`` how much the
  reference already prefers good responses.
* **Offline data** (the coverage knob): comparisons on *source* contexts whose features are
  deployment-like features with their component in a fixed, Haar-random
  ``uncovered_dim``-dimensional subspace ``S_u`` shrunk by ``coverage`` ``ε ∈ (0, 1]``:
  ``φ_src = φ − (1 − ε) P_u φ``. With ``ε = 1`` the offline responses vary like deployment
  ones (good coverage); with small ``ε`` they barely vary along ``S_u`` (a coverage coefficient
  of order ``1/ε²`` for policies that move along ``S_u``). Two distinct responses are drawn
  per context from the behaviour policy: ``behavior="reference"`` (``π0``, as in RLHF
  practice) or ``"uniform"``.
  ``uncovered_reward`` sets the share ``s`` of ``‖θ*‖²`` that lies in ``S_u``: ``None`` (default)
  draws ``u*`` Haar-random, independent of ``S_u`` (expected share ``uncovered_dim/d``); ``s = 0``
  puts all of the reward in the covered directions, so the data cover what the optimal policy
  needs but not the directions along which a mis-estimated reward can be exploited (the
  single-policy-coverage situation that pessimism is designed for).

Everything about a policy is exact on a given sample of states: ``policy_value`` (``J_η``),
``optimal_value``, ``kl`` and ``gap``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from pluralign.data import PreferenceData, TargetStates
from pluralign.envs.lowrank_contextual import gumbel_top2, haar_frame, unit_sphere
from pluralign.errors import ConfigError
from pluralign.policies.base import Policy, as_probs
from pluralign.policies.gibbs import gibbs_probs, kl_divergence, soft_value

__all__ = ["KLBandit"]

BEHAVIORS = ("reference", "uniform")


class KLBandit:
    """KL-regularized linear preference bandit (docs/design.md §5, ``kl_bandit``).

    Parameters
    ----------
    d:
        Feature dimension.
    n_actions:
        Candidate responses per context ``K`` (≥ 2).
    eta:
        KL coefficient ``η > 0`` of the objective ``J_η``.
    reward_scale:
        Standard deviation of ``r*`` over random responses (``‖θ*‖ = reward_scale·sqrt(d)``).
    ref_scale:
        Standard deviation of ``π0``'s logits over random responses (0: uniform ``π0``).
    ref_alignment:
        Cosine ``ρ ∈ [−1, 1]`` between ``π0``'s logit direction ``ψ`` and ``θ*``.
    coverage:
        ``ε ∈ (0, 1]``: scale of the offline contexts' features along the uncovered subspace.
    uncovered_dim:
        Dimension of that subspace (default ``d // 2``).
    behavior:
        Offline behaviour policy: ``"reference"`` (``π0``) or ``"uniform"``.
    uncovered_reward:
        Share of ``‖θ*‖²`` in the uncovered subspace, in ``[0, 1]``; ``None``: ``θ*`` is
        Haar-random.
    seed:
        Seed (int or list of ints) of the truth: ``θ*``, ``ψ`` and the uncovered subspace.
        Samples take their own seeds.
    """

    def __init__(
        self,
        d: int = 16,
        n_actions: int = 16,
        eta: float = 0.2,
        *,
        reward_scale: float = 1.0,
        ref_scale: float = 1.0,
        ref_alignment: float = 0.0,
        coverage: float = 1.0,
        uncovered_dim: int | None = None,
        behavior: str = "reference",
        uncovered_reward: float | None = None,
        seed: int | list[int] = 0,
    ) -> None:
        if d < 2:
            raise ConfigError(f"d must be ≥ 2, got {d}")
        if n_actions < 2:
            raise ConfigError(f"n_actions must be ≥ 2, got {n_actions}")
        if not eta > 0:
            raise ConfigError(f"eta must be positive, got {eta}")
        if not -1.0 <= ref_alignment <= 1.0:
            raise ConfigError(f"ref_alignment must be in [-1, 1], got {ref_alignment}")
        if not 0.0 < coverage <= 1.0:
            raise ConfigError(f"coverage must be in (0, 1], got {coverage}")
        uncovered_dim = d // 2 if uncovered_dim is None else uncovered_dim
        if not 0 <= uncovered_dim <= d:
            raise ConfigError(f"uncovered_dim must be in [0, d] = [0, {d}], got {uncovered_dim}")
        if behavior not in BEHAVIORS:
            raise ConfigError(f"unknown behavior {behavior!r}; valid: {', '.join(BEHAVIORS)}")
        if reward_scale < 0 or ref_scale < 0:
            raise ConfigError("reward_scale and ref_scale must be non-negative")
        if uncovered_reward is not None and not (
            0.0 <= uncovered_reward <= 1.0
            and (uncovered_reward == 0.0 or uncovered_dim > 0)
            and (uncovered_reward == 1.0 or uncovered_dim < d)
        ):
            raise ConfigError(
                f"uncovered_reward must be None or a share in [0, 1] that the subspace "
                f"dimensions allow (uncovered_dim={uncovered_dim} of d={d}), got {uncovered_reward}"
            )
        self.d, self.n_actions, self.eta = d, n_actions, float(eta)
        self.reward_scale, self.ref_scale = reward_scale, ref_scale
        self.ref_alignment = ref_alignment
        self.coverage, self.uncovered_dim, self.behavior = coverage, uncovered_dim, behavior
        self.uncovered_reward, self.seed = uncovered_reward, seed

        rng = np.random.default_rng(seed)
        frame = haar_frame(rng, d, d)  # [S_u basis | complement basis]
        self.uncovered_basis = frame[:, :uncovered_dim]
        if uncovered_reward is None:
            u_star = unit_sphere(rng, (), d)
        else:  # a Haar-random direction in each part, mixed with the requested shares
            g = rng.standard_normal(d)
            parts = [
                frame[:, :uncovered_dim] @ g[:uncovered_dim],
                frame[:, uncovered_dim:] @ g[uncovered_dim:],
            ]
            shares = (uncovered_reward, 1.0 - uncovered_reward)
            u_star = sum(
                np.sqrt(s) * p / np.linalg.norm(p)
                for s, p in zip(shares, parts, strict=True)
                if s > 0
            )
        other = rng.standard_normal(d)
        other -= (other @ u_star) * u_star
        other /= np.linalg.norm(other)
        self.theta_star = reward_scale * np.sqrt(d) * u_star
        self.psi = (
            ref_scale
            * np.sqrt(d)
            * (ref_alignment * u_star + np.sqrt(1.0 - ref_alignment**2) * other)
        )

    # ------------------------------------------------------------------ sampling
    def sample_targets(
        self, m: int, *, seed: int | list[int] | np.random.Generator
    ) -> TargetStates:
        """``m`` deployment contexts: ``K`` candidates each, features uniform on the sphere."""
        rng = np.random.default_rng(seed)
        return TargetStates(x=None, phi=unit_sphere(rng, (m, self.n_actions), self.d))

    def source_states(self, m: int, *, seed: int | list[int] | np.random.Generator) -> TargetStates:
        """``m`` offline (source) contexts: the uncovered component shrunk by ``coverage``."""
        rng = np.random.default_rng(seed)
        phi = unit_sphere(rng, (m, self.n_actions), self.d)
        basis = self.uncovered_basis
        phi -= (1.0 - self.coverage) * (phi @ basis) @ basis.T
        return TargetStates(x=None, phi=phi)

    def sample_offline(
        self, n: int, *, seed: int | list[int] | np.random.Generator
    ) -> PreferenceData:
        """``n`` offline comparisons: source contexts, two distinct responses from the behaviour
        policy, Bradley–Terry labels from ``θ*``."""
        rng = np.random.default_rng(seed)
        states = self.source_states(n, seed=rng)
        logits = (
            self.reference_logits(states)
            if self.behavior == "reference"
            else np.zeros((n, self.n_actions))
        )
        a0, a1 = gumbel_top2(rng, logits)
        rows = np.arange(n)
        phi0, phi1 = states.phi[rows, a0], states.phi[rows, a1]
        return PreferenceData(x=None, phi0=phi0, phi1=phi1, y=self.compare(phi0, phi1, seed=rng))

    def compare(
        self, phi0: np.ndarray, phi1: np.ndarray, *, seed: int | list[int] | np.random.Generator
    ) -> np.ndarray:
        """The Bradley–Terry oracle: ``y = 1`` (``phi1`` preferred) with probability
        ``σ(r*(φ1) − r*(φ0))``."""
        rng = np.random.default_rng(seed)
        margin = (np.asarray(phi1) - np.asarray(phi0)) @ self.theta_star
        return (rng.random(margin.shape) < 1.0 / (1.0 + np.exp(-margin))).astype(np.int8)

    # ------------------------------------------------------------------ truth
    def true_reward(self, states: TargetStates) -> np.ndarray:
        """``r*(x, a) = θ*ᵀφ(x, a)``, shape ``(m, K)``."""
        return states.phi @ self.theta_star

    def reference_logits(self, states: TargetStates) -> np.ndarray:
        """``log π0(a|x)`` up to a per-state constant: ``ψᵀφ(x, a)``."""
        return states.phi @ self.psi

    def reference_probs(self, states: TargetStates) -> np.ndarray:
        """``π0(·|x)``, shape ``(m, K)``."""
        logits = self.reference_logits(states)
        return np.exp(logits - logsumexp(logits, axis=1, keepdims=True))

    def optimal_probs(self, states: TargetStates) -> np.ndarray:
        """``π*(a|x) ∝ π0(a|x) exp(r*(x,a)/η)``."""
        return gibbs_probs(self.true_reward(states), self.reference_probs(states), self.eta)

    def optimal_value(self, states: TargetStates) -> float:
        """``J_η(π*) = η E_x log Σ_a π0(a|x) exp(r*(x,a)/η)`` (closed form)."""
        return float(
            np.mean(soft_value(self.true_reward(states), self.reference_probs(states), self.eta))
        )

    def kl(self, policy: Policy | np.ndarray, states: TargetStates) -> float:
        """``E_x KL(π(·|x) ‖ π0(·|x))``, exact."""
        return float(np.mean(kl_divergence(as_probs(policy, states), self.reference_probs(states))))

    def reward_value(self, policy: Policy | np.ndarray, states: TargetStates) -> float:
        """``E_x Σ_a π(a|x) r*(x,a)`` (the unregularized value)."""
        probs = as_probs(policy, states)
        return float(np.mean(np.sum(probs * self.true_reward(states), axis=1)))

    def policy_value(self, policy: Policy | np.ndarray, states: TargetStates) -> float:
        """``J_η(π) = E_x [Σ_a π r* − η KL(π‖π0)]``, exact on ``states``."""
        probs = as_probs(policy, states)
        return self.reward_value(probs, states) - self.eta * self.kl(probs, states)

    def gap(self, policy: Policy | np.ndarray, states: TargetStates) -> float:
        """``J_η(π*) − J_η(π)``, computed as ``η E_x KL(π ‖ π*)`` (equal, and ≥ 0 exactly)."""
        probs = as_probs(policy, states)
        return self.eta * float(np.mean(kl_divergence(probs, self.optimal_probs(states))))
