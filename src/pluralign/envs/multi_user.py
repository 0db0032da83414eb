"""The multi-user simulator: personalized linear rewards with a shared low-rank structure.

Truth (P-ShareLoRA, linear case; Liu et al. 2025, arXiv 2503.19201): user ``u`` has the reward
``r_u(φ) = θ_uᵀφ`` with

    θ_u = θ0 + B w_u,   B ∈ R^{d_phi×r} a Haar-random orthonormal frame (r = rank),
    θ0 = shared_scale · sqrt(d_phi) · e (``e`` a random unit vector),
    w_u = diversity · sqrt(d_phi / r) · g_u,   g_u ~ N(0, I_r).

Candidates are uniform on the unit sphere of ``R^{d_phi}``, where ``Var(θᵀφ) = ‖θ‖²/d_phi``:
the shared reward has standard deviation ``shared_scale`` over candidates and each user's
personal deviation ``Bw_u`` about ``diversity``. ``diversity = 0`` makes all users identical
(one reward model is right); ``diversity = 1`` makes personal and shared parts equally strong.

* Offline comparisons of user ``u``: two distinct candidates of a fresh state (uniform
  behaviour), labelled by a Bradley–Terry draw from ``θ_u``. User ``u``'s draws come from their
  own random stream, so a user's first ``n`` comparisons do not depend on how many the user (or
  any other user) has: data sets of different sizes are nested.
* ``n_per_user`` is one number (balanced users) or one count per user (imbalanced users).
* New users (for adaptation) are fresh draws of ``w`` from the same distribution.
* Target states (deployment): ``m`` states with ``n_actions`` candidates each, shared by all
  users; values are exact (true rewards).

**Users with contexts** (``d_context = d_x``; the contextual model of LoCo-RLHF, Lee, Sun & Liu
2024, arXiv 2412.19436): each user has a context ``x_u ~ N(0, I_{d_x})`` and

    g_u = sqrt(1 − ν) · Mᵀx_u + sqrt(ν) · ε_u,   M ∈ R^{d_x×r} with N(0, 1/d_x) entries,
    ε_u ~ N(0, I_r),

in place of ``g_u`` above, so ``θ_u = θ0 + B w_u`` is ``[1, x_u]ᵀΘφ`` with a rank-``r`` context
part plus a personal residual. ``ν = context_noise``: ``0`` makes a user's reward a function of
their context (a new user's context tells everything), ``1`` makes it unrelated to it. ``g_u``
has covariance ``(1 − ν) MᵀM + ν I ≈ I_r`` either way, so ``diversity`` keeps its meaning.
Offline comparisons then carry the users' contexts as ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pluralign.data import PreferenceData, TargetStates
from pluralign.envs.lowrank_contextual import haar_frame, unit_sphere
from pluralign.errors import ConfigError

__all__ = ["MultiUser"]


def _counts(n_per_user: int | Sequence[int] | np.ndarray, n_users: int) -> np.ndarray:
    if isinstance(n_per_user, int | np.integer) and not isinstance(n_per_user, bool):
        counts = np.full(n_users, int(n_per_user))
    else:
        try:  # a boolean, a float or anything not iterable is refused below, not a TypeError
            counts = np.asarray(list(n_per_user))  # type: ignore[arg-type]
        except TypeError:
            counts = np.zeros(0)
        if counts.shape != (n_users,) or counts.dtype.kind not in "iu":
            raise ConfigError(
                f"n_per_user must be an integer or a list of {n_users} integers (one per user), "
                f"got {n_per_user!r}"
            )
    if (counts < 1).any():
        raise ConfigError(f"every user needs at least one comparison, got {counts.tolist()}")
    return counts.astype(np.int64)


class MultiUser:
    """Users with rewards ``θ_u = θ0 + B w_u`` (docs/design.md §5, ``multi_user``).

    Parameters
    ----------
    n_users:
        Number of training users ``U``.
    d_phi:
        Feature dimension.
    rank:
        Rank ``r`` of the shared basis ``B`` (``1 ≤ r ≤ d_phi``).
    diversity:
        Size of the personal deviations relative to the shared reward (see the module
        docstring); ``0`` means identical users.
    n_per_user:
        Comparisons per user: an integer, or a list of ``n_users`` integers (imbalanced users).
    n_actions:
        Candidates per target state ``K`` (≥ 2).
    seed:
        Seed (int or list of ints) of the truth ``θ0, B, w_u``. Samples take their own seeds.
    shared_scale:
        Standard deviation of the shared reward over candidates.
    d_context:
        ``None`` (default): users without contexts. An integer ``d_x ≥ 1``: users with contexts
        that drive their rewards (module docstring).
    context_noise:
        ``ν ∈ [0, 1]``, the share of the personal part not explained by the context.

    Truth attributes: ``theta0_star`` (d_phi,), ``B_star`` (d_phi, r), ``W_star`` (U, r),
    ``thetas_star`` (U, d_phi); ``users`` are the integer ids ``0..U−1``; with ``d_context``,
    ``contexts`` (U, d_x) and ``M_star`` (d_x, r).
    """

    def __init__(
        self,
        n_users: int = 20,
        d_phi: int = 16,
        rank: int = 3,
        diversity: float = 1.0,
        n_per_user: int | Sequence[int] = 50,
        n_actions: int = 8,
        seed: int | list[int] = 0,
        *,
        shared_scale: float = 1.0,
        d_context: int | None = None,
        context_noise: float = 0.0,
    ) -> None:
        if n_users < 1:
            raise ConfigError(f"n_users must be ≥ 1, got {n_users}")
        if not 1 <= rank <= d_phi:
            raise ConfigError(f"rank must be in [1, d_phi] = [1, {d_phi}], got {rank}")
        if n_actions < 2:
            raise ConfigError(f"n_actions must be ≥ 2, got {n_actions}")
        if diversity < 0 or shared_scale < 0:
            raise ConfigError("diversity and shared_scale must be ≥ 0")
        self.n_users, self.d_phi, self.rank = n_users, d_phi, rank
        self.diversity, self.n_actions, self.seed = float(diversity), n_actions, seed
        self.shared_scale = float(shared_scale)
        self.n_per_user = _counts(n_per_user, n_users)
        if d_context is not None and (
            isinstance(d_context, bool)
            or not isinstance(d_context, int | np.integer)
            or d_context < 1
        ):
            raise ConfigError(f"d_context must be None or an integer ≥ 1, got {d_context!r}")
        if not 0.0 <= context_noise <= 1.0:
            raise ConfigError(f"context_noise must be in [0, 1], got {context_noise!r}")
        self.d_context, self.context_noise = d_context, float(context_noise)

        rng = np.random.default_rng(seed)
        self.theta0_star = self.shared_scale * np.sqrt(d_phi) * unit_sphere(rng, (), d_phi)
        self.B_star = haar_frame(rng, d_phi, rank)
        if d_context is None:
            self.contexts = None
            self.W_star = self._weights(rng, n_users)
        else:
            self.M_star = rng.standard_normal((d_context, rank)) / np.sqrt(d_context)
            self.contexts, self.W_star = self._context_weights(rng, n_users)
        self.thetas_star = self.theta0_star + self.W_star @ self.B_star.T
        self.users = np.arange(n_users)

    def _weights(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return (
            self.diversity * np.sqrt(self.d_phi / self.rank) * rng.standard_normal((n, self.rank))
        )

    def _context_weights(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(contexts (n, d_x), W (n, r))`` of ``n`` users with contexts."""
        x = rng.standard_normal((n, self.d_context))  # type: ignore[arg-type]  # d_context set
        g = np.sqrt(1.0 - self.context_noise) * x @ self.M_star + np.sqrt(
            self.context_noise
        ) * rng.standard_normal((n, self.rank))
        return x, self.diversity * np.sqrt(self.d_phi / self.rank) * g

    # ------------------------------------------------------------------ sampling
    def sample_comparisons(
        self,
        thetas: np.ndarray,
        counts: np.ndarray | Sequence[int],
        *,
        seed: int | list[int],
        users: np.ndarray | None = None,
        contexts: np.ndarray | None = None,
    ) -> PreferenceData:
        """Comparisons of users with true parameters ``thetas`` (one row each), ``counts[u]``
        per user; user ``u``'s stream is seeded by ``[*seed, u]`` (nested in ``counts``).
        ``contexts`` (one row per user) become each comparison's ``x``."""
        thetas = np.atleast_2d(np.asarray(thetas, dtype=np.float64))
        counts = np.asarray(counts, dtype=np.int64)
        users = np.arange(thetas.shape[0]) if users is None else np.asarray(users)
        base = list(np.atleast_1d(seed))
        phi0, phi1, y, ids = [], [], [], []
        for u in range(thetas.shape[0]):
            rng = np.random.default_rng([*base, u])
            n = int(counts[u])
            pair = unit_sphere(rng, (n, 2), self.d_phi)
            margin = (pair[:, 1] - pair[:, 0]) @ thetas[u]
            labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-margin))).astype(np.int8)
            phi0.append(pair[:, 0])
            phi1.append(pair[:, 1])
            y.append(labels)
            ids.append(np.full(n, users[u]))
        x = (
            None
            if contexts is None
            else np.repeat(np.asarray(contexts, np.float64), counts, axis=0)
        )
        return PreferenceData(
            x=x,
            phi0=np.concatenate(phi0),
            phi1=np.concatenate(phi1),
            y=np.concatenate(y),
            users=np.concatenate(ids),
        )

    def sample_offline(
        self, n: int | Sequence[int] | np.ndarray | None = None, *, seed: int | list[int]
    ) -> PreferenceData:
        """Training comparisons of every user: ``n`` per user (an integer, or one count per
        user), by default the constructor's ``n_per_user``."""
        counts = self.n_per_user if n is None else _counts(n, self.n_users)
        return self.sample_comparisons(
            self.thetas_star, counts, seed=seed, users=self.users, contexts=self.contexts
        )

    def new_users(self, n: int, *, seed: int | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """``n`` fresh users from the same population: ``(W_new (n, r), thetas_new (n, d_phi))``
        (with ``d_context``, see :meth:`new_context_users` for their contexts)."""
        if self.d_context is not None:
            _, w = self._context_weights(np.random.default_rng(seed), n)
        else:
            w = self._weights(np.random.default_rng(seed), n)
        return w, self.theta0_star + w @ self.B_star.T

    def new_context_users(self, n: int, *, seed: int | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """``n`` fresh users with contexts: ``(contexts (n, d_x), thetas (n, d_phi))``; the same
        users as :meth:`new_users` with the same seed."""
        if self.d_context is None:
            raise ConfigError("new_context_users needs a simulator with d_context set")
        x, w = self._context_weights(np.random.default_rng(seed), n)
        return x, self.theta0_star + w @ self.B_star.T

    def sample_targets(self, m: int, *, seed: int | list[int]) -> TargetStates:
        """``m`` deployment states shared by all users, ``K`` candidates each."""
        rng = np.random.default_rng(seed)
        return TargetStates(x=None, phi=unit_sphere(rng, (m, self.n_actions), self.d_phi))

    # ------------------------------------------------------------------ truth
    def true_reward(self, users: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """``θ_uᵀφ``: users (n,) with phi (n, d_phi) → (n,); users (m,), phi (m, K, d) → (m, K)."""
        thetas = self.thetas_star[np.asarray(users)]
        phi = np.asarray(phi)
        if phi.ndim == 3:
            return np.einsum("md,mkd->mk", thetas, phi)
        return np.einsum("nd,nd->n", thetas, phi)

    def user_values(
        self, probs: np.ndarray, targets: TargetStates, thetas: np.ndarray | None = None
    ) -> np.ndarray:
        """Exact ``J_u(π) = (1/m) Σ_j Σ_a π(a|j) θ_uᵀφ(j, a)`` for every user: ``probs`` is one
        ``(m, K)`` policy for all users or ``(U, m, K)``, one per user. Returns ``(U,)``."""
        thetas = self.thetas_star if thetas is None else np.asarray(thetas)
        mean_phi = _mean_phi(probs, targets)  # (m, d) or (U, m, d)
        if mean_phi.ndim == 2:
            return thetas @ mean_phi.mean(axis=0)
        return np.einsum("ud,ud->u", thetas, mean_phi.mean(axis=1))

    def optimal_user_values(
        self, targets: TargetStates, thetas: np.ndarray | None = None
    ) -> np.ndarray:
        """``J_u(π*_u)``: each user's own per-state argmax, ``(U,)``."""
        thetas = self.thetas_star if thetas is None else np.asarray(thetas)
        scores = np.einsum("mkd,ud->umk", targets.phi, thetas)
        return scores.max(axis=2).mean(axis=1)

    def value_gaps(
        self, probs: np.ndarray, targets: TargetStates, thetas: np.ndarray | None = None
    ) -> np.ndarray:
        """Per-user value gaps ``J_u(π*_u) − J_u(π)`` (≥ 0), ``(U,)``."""
        return self.optimal_user_values(targets, thetas) - self.user_values(probs, targets, thetas)


def _mean_phi(probs: np.ndarray, targets: TargetStates) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 2:
        return np.einsum("mk,mkd->md", probs, targets.phi)
    return np.einsum("umk,mkd->umd", probs, targets.phi)
