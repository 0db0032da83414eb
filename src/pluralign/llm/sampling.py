"""Training-free and sampling-based policies: best-of-n with pessimism, multi-step rejection
sampling (GSHF, Xiong et al. 2024, ICML 2024, arXiv 2312.11456).

**Best-of-n.** Draw ``n`` responses per (prompt, user) from a policy, score them with the
user's reward model, return the best. With ``pessimism = β > 0`` the score is the pessimistic
``r̂_u(x, y) − β‖φ_u(x, y) − ν(x)‖_{M⁻¹}`` (:mod:`pluralign.llm.uncertainty`; ``ν(x)``: the mean
feature of the ``n`` candidates), so a candidate whose reward the data cannot vouch for is not
picked on an over-estimate. The KL of best-of-n to its sampling policy is at most
``log n − (n−1)/n`` (Beirami et al. 2024; equality when the scores have no ties).

:func:`pool_estimate` measures a selection rule's expected gold reward and KL on a pool of ``P``
samples per prompt: drawing ``n`` of them with replacement is i.i.d. sampling from the pool's
empirical distribution, so the rule's output distribution ``q`` over the pool and
``KL(q ‖ uniform) = Σ q log(q P)`` are those of best-of-n from it. Without pessimism they are
exact (the item of score rank ``k`` is chosen with probability ``(k/P)^n − ((k−1)/P)^n``); with
pessimism (``ν`` depends on the draw) they are Monte-Carlo estimates over seeded draws.

**Multi-step rejection sampling.** The Gibbs policy ``π_η ∝ π0 exp(r/η)`` is reached through a
schedule ``η_1 > … > η_S = η`` (``η_0 = ∞``): stage ``s`` samples ``n`` responses per prompt from
``π_{s−1}``, accepts response ``y`` with probability ``exp((r(y) − max r)·(1/η_s − 1/η_{s−1}))``
(the max over that prompt's candidates, as in RSO, Liu et al. 2024), and fine-tunes the LoRA on
the accepted samples (maximum likelihood, :class:`SFTTrainer`) to give ``π_s``. One stage with
``η_1 = η`` is single-step RSO. Small steps keep the acceptance rate up.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pluralign.errors import ConfigError, PluralignError
from pluralign.llm.policy import Generations, PersonalizedPolicy
from pluralign.llm.protocols import PairScorer
from pluralign.llm.trainer import LoRATrainer

if TYPE_CHECKING:
    from pluralign.llm.uncertainty import LastLayerUncertainty

__all__ = [
    "BestOfN",
    "RejectionStage",
    "SFTTrainer",
    "best_of_n",
    "best_of_n_kl_bound",
    "multistep_rejection_sampling",
    "pool_estimate",
    "select_best",
]


def best_of_n_kl_bound(n: int) -> float:
    """``log n − (n − 1)/n``: the KL of best-of-n to its base policy (an upper bound)."""
    return float(np.log(n) - (n - 1) / n)


def select_best(
    rewards: np.ndarray, norms: np.ndarray | None = None, pessimism: float = 0.0
) -> np.ndarray:
    """Index of the best candidate per row of ``rewards`` (``(m, n)``) by
    ``r − pessimism·norm`` (ties: the first)."""
    score = np.asarray(rewards, float)
    if pessimism:
        if norms is None:
            raise PluralignError("pessimism > 0 needs the candidates' uncertainty norms")
        score = score - pessimism * np.asarray(norms, float)
    return np.argmax(score, axis=1)


@dataclass(frozen=True)
class BestOfN:
    """The output of :func:`best_of_n`: ``responses[i]`` (and ``token_ids[i]``) for
    ``(prompts[i], users[i])``, ``chosen[i]`` its index among the candidates, ``rewards`` and
    ``norms`` (``‖φ − ν‖_{M⁻¹}``, or ``None`` without pessimism) of all candidates
    (``(m, n)``)."""

    prompts: list[str]
    users: list[str]
    responses: list[str]
    token_ids: list[list[int]]
    chosen: np.ndarray
    rewards: np.ndarray
    norms: np.ndarray | None
    candidates: Generations


def _norms(
    reward_model: PairScorer, uncertainty: LastLayerUncertainty, candidates: Generations
) -> np.ndarray:
    m, n = len(candidates.prompts), len(candidates.texts[0]) if candidates.texts else 0
    prompts = [p for p in candidates.prompts for _ in range(n)]
    users = [u for u in candidates.users for _ in range(n)]
    texts = [t if t else " " for group in candidates.texts for t in group]
    phi = reward_model.features(prompts, texts, users).reshape(m, n, -1)
    center = phi.mean(axis=1, keepdims=True)
    return uncertainty.norm(
        phi.reshape(m * n, -1), np.broadcast_to(center, phi.shape).reshape(m * n, -1)
    ).reshape(m, n)


def best_of_n(
    policy: PersonalizedPolicy,
    reward_model: PairScorer,
    prompts: Sequence[str],
    users: Sequence[Any],
    *,
    n: int = 8,
    pessimism: float = 0.0,
    uncertainty: LastLayerUncertainty | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    reference: bool = False,
) -> BestOfN:
    """Best-of-``n`` of ``policy`` (or its reference π0) under the users' reward model, with
    last-layer pessimism when ``pessimism > 0`` (module docstring; ``uncertainty`` is a fitted
    :class:`~pluralign.llm.uncertainty.LastLayerUncertainty`)."""
    from pluralign.settings import check_float

    pessimism = check_float("pessimism", pessimism, low=0.0)  # type: ignore[assignment]  # not optional
    if pessimism and uncertainty is None:
        raise ConfigError("pessimism > 0 needs a fitted LastLayerUncertainty (uncertainty=...)")
    candidates = policy.generate(
        prompts,
        users,
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        reference=reference,
    )
    flat_prompts = [p for p in candidates.prompts for _ in range(n)]
    flat_users = [u for u in candidates.users for _ in range(n)]
    texts = [t if t else " " for group in candidates.texts for t in group]
    rewards = reward_model.score(flat_prompts, texts, flat_users).reshape(len(prompts), n)
    # uncertainty is given with pessimism > 0 (checked above)
    norms = _norms(reward_model, uncertainty, candidates) if pessimism else None  # type: ignore[arg-type]
    chosen = select_best(rewards, norms, pessimism)
    return BestOfN(
        prompts=list(prompts),
        users=candidates.users,
        responses=[candidates.texts[i][j] for i, j in enumerate(chosen)],
        token_ids=[candidates.token_ids[i][j] for i, j in enumerate(chosen)],
        chosen=chosen,
        rewards=rewards,
        norms=norms,
        candidates=candidates,
    )


def pool_estimate(
    rewards: np.ndarray,
    gold: np.ndarray,
    n: int,
    *,
    norms_of: Callable[[np.ndarray], np.ndarray] | None = None,
    pessimism: float = 0.0,
    draws: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """``(expected gold reward, KL to the pool)`` of best-of-``n`` on one prompt's pool of
    ``P`` samples (module docstring). ``rewards`` and ``gold`` are ``(P,)``; with pessimism,
    ``norms_of(indices)`` returns the norms ``‖φ − ν‖_{M⁻¹}`` of the drawn candidates (``ν``
    their mean) for an ``(draws, n)`` index array."""
    rewards = np.asarray(rewards, float)
    gold = np.asarray(gold, float)
    size = rewards.size
    if pessimism:
        if norms_of is None:
            raise PluralignError("pessimism > 0 needs norms_of")
        idx = np.random.default_rng(seed).integers(0, size, size=(draws, n))
        pick = idx[np.arange(draws), select_best(rewards[idx], norms_of(idx), pessimism)]
        q = np.bincount(pick, minlength=size) / draws
    else:
        # exact: the item of rank k (ascending) is the draw's best with probability
        # (k/P)^n − ((k−1)/P)^n; tied items are interchangeable within a draw, so a group of
        # ties shares its ranks' total mass equally
        order = np.argsort(rewards, kind="stable")
        k = np.arange(1, size + 1)
        mass = (k / size) ** n - ((k - 1) / size) ** n
        _, start, counts = np.unique(rewards[order], return_index=True, return_counts=True)
        q = np.empty(size)
        q[order] = np.repeat(np.add.reduceat(mass, start) / counts, counts)
    nz = q > 0
    return float(q @ gold), float(np.sum(q[nz] * np.log(q[nz] * size)))


# ---------------------------------------------------------------------- rejection sampling
@dataclass(frozen=True, eq=False)
class _Samples:
    """Accepted responses to train on: prompts, response token ids, users."""

    prompts: list[str]
    responses: list[list[int] | str]  # token ids, or text
    users: list[str]
    encoded: list[dict[str, list[int]]] = field(default_factory=list)
    user_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(repr((self.prompts, self.responses, self.users)).encode())
        return h.hexdigest()[:16]

    def batch(self, rows: Sequence[int], policy: PersonalizedPolicy) -> dict[str, torch.Tensor]:
        rows = list(rows)
        batch = policy.collate([self.encoded[i] for i in rows])
        batch["user_index"] = torch.as_tensor(self.user_index[rows], dtype=torch.long)
        return batch


class SFTTrainer(LoRATrainer):
    """Maximum likelihood of given responses, ``−(1/n_y) log π_u(y|x)`` per row (mean over
    the response tokens), on the shared loop of :class:`~pluralign.llm.trainer.LoRATrainer`;
    the fine-tuning step of multi-step rejection sampling. Built as the other trainers are:
    ``SFTTrainer(args=TrainingConfig(...))`` (TRL's names) or the loop's keywords; the data go
    to :meth:`fit` as prompts, responses and users (TRL's ``SFTTrainer``: a dataset)."""

    def fit(
        self,
        policy: PersonalizedPolicy,
        prompts: Sequence[str],
        responses: Sequence[Sequence[int] | str],
        users: Sequence[str],
    ) -> SFTTrainer:
        self._check()
        data = _Samples(
            prompts=list(prompts),
            responses=[list(r) if not isinstance(r, str) else r for r in responses],
            users=[str(u) for u in users],
            encoded=policy.encode(prompts, responses),
            user_index=policy.user_index(users).numpy(),
        )
        if not len(data):
            raise PluralignError("no samples to fine-tune on")
        return self.fit_encoded(policy, data)

    def _row_losses(
        self,
        wrapped: Any,
        policy: PersonalizedPolicy,
        data: _Samples,
        rows: list[int],
        device: torch.device,
    ) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in data.batch(rows, policy).items()}
        logps, tokens = wrapped(**batch)
        return -logps / tokens.clamp_min(1)

    @torch.no_grad()
    def evaluate(
        self, policy: PersonalizedPolicy, data: _Samples, accelerator: Any = None
    ) -> dict[str, Any]:
        losses = []
        for start in range(0, len(data), self.batch_size):
            rows = list(range(start, min(len(data), start + self.batch_size)))
            batch = {k: v.to(policy.device) for k, v in data.batch(rows, policy).items()}
            logps, tokens = policy(**batch)
            losses.append((-logps / tokens.clamp_min(1)).double().cpu())
        loss = float(torch.cat(losses).mean()) if losses else float("nan")
        return {
            "loss": loss,
            "accuracy": float("nan"),
            "mean_user_accuracy": float("nan"),
            "n": len(data),
        }


@dataclass(frozen=True)
class RejectionStage:
    """One stage of :func:`multistep_rejection_sampling`: its ``eta``, the acceptance rate,
    the number of accepted samples, and the policy after fine-tuning evaluated on fresh
    samples: mean reward (of ``reward``), and ``KL(π_s‖π0)`` estimated on them."""

    eta: float
    acceptance: float
    accepted: int
    reward: float
    kl: float


def multistep_rejection_sampling(
    policy: PersonalizedPolicy,
    reward: Callable[[str, str, str], float],
    prompts: Sequence[str],
    users: Sequence[str],
    etas: Sequence[float],
    *,
    n: int = 8,
    max_new_tokens: int = 32,
    eval_samples: int = 4,
    trainer: SFTTrainer | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
    on_stage: Callable[[int, PersonalizedPolicy], None] | None = None,
) -> list[RejectionStage]:
    """Run the schedule ``etas`` (decreasing, > 0) on ``policy`` in place (module docstring).

    ``reward(prompt, response, user)`` scores a response (a reward model's ``score`` or a
    gold reward). Every user's adapter is fine-tuned on its own accepted samples, in mixed
    batches. After each stage the policy is evaluated on ``eval_samples`` fresh samples per
    prompt (``0``: not evaluated, ``reward`` and ``kl`` are NaN) and ``on_stage(s, policy)``
    is called (e.g. to measure a gold reward). Returns one :class:`RejectionStage` per stage."""
    from pluralign.settings import check_float

    etas = [check_float("eta", e, low=0.0, low_open=True) for e in etas]  # type: ignore[misc]  # not optional
    if not etas or any(b >= a for a, b in itertools.pairwise(etas)):
        raise ConfigError(f"etas must be a non-empty decreasing schedule, got {etas}")
    trainer = trainer or SFTTrainer(epochs=2, lr=5e-3, batch_size=batch_size, progress=False)
    rng = np.random.default_rng(seed)
    stages, previous = [], np.inf
    users = [str(u) for u in users]
    for s, eta in enumerate(etas):
        samples = policy.generate(
            prompts,
            users,
            n=n,
            max_new_tokens=max_new_tokens,
            seed=seed + 7919 * s,
            batch_size=batch_size,
        )
        keep_p, keep_ids, keep_u, total = [], [], [], 0
        step = 1.0 / eta - (0.0 if np.isinf(previous) else 1.0 / previous)
        for p, u, texts, ids in zip(
            samples.prompts, samples.users, samples.texts, samples.token_ids, strict=True
        ):
            r = np.array([reward(p, t, u) for t in texts])
            accept = rng.random(len(r)) < np.exp((r - r.max()) * step)
            total += len(r)
            for j in np.flatnonzero(accept):
                keep_p.append(p)
                keep_ids.append(ids[j])
                keep_u.append(u)
        trainer.seed = seed + s
        trainer.fit(policy, keep_p, keep_ids, keep_u)
        value, kl = (
            evaluate_policy(
                policy,
                reward,
                prompts,
                users,
                n=eval_samples,
                max_new_tokens=max_new_tokens,
                seed=seed + 104729 + s,
                batch_size=batch_size,
            )
            if eval_samples
            else (math.nan, math.nan)
        )
        if on_stage is not None:
            on_stage(s, policy)
        stages.append(
            RejectionStage(
                eta=eta,
                acceptance=len(keep_p) / max(total, 1),
                accepted=len(keep_p),
                reward=value,
                kl=kl,
            )
        )
        if progress is not None:
            progress(
                f"stage {s + 1}/{len(etas)} eta={eta:g}: accepted "
                f"{stages[-1].acceptance:.1%}, reward {value:.4f}, KL {kl:.3f}"
            )
        previous = eta
    return stages


def evaluate_policy(
    policy: PersonalizedPolicy,
    reward: Callable[[str, str, str], float],
    prompts: Sequence[str],
    users: Sequence[str],
    *,
    n: int = 4,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    reference: bool = False,
) -> tuple[float, float]:
    """``(mean reward, KL(π‖π0))`` of ``policy`` on ``n`` fresh samples per (prompt, user):
    KL is the sample mean of ``log π(y) − log π0(y)`` (0 for the reference itself)."""
    samples = policy.generate(
        prompts,
        users,
        n=n,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        reference=reference,
    )
    p, ids, u = samples.flat()
    texts = [t for group in samples.texts for t in group]
    value = float(np.mean([reward(pp, t, uu) for pp, t, uu in zip(p, texts, u, strict=True)]))
    if reference:
        return value, 0.0
    gap = policy.logprobs(p, ids, u, batch_size=batch_size) - policy.logprobs(
        p, ids, u, reference=True, batch_size=batch_size
    )
    return value, float(gap.mean())
