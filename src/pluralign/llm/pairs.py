"""Pair selection and gold oracles of online iterative DPO (:mod:`pluralign.llm.iterate`).

**Pair rules** (:data:`PAIR_RULES`; one pair out of the ``n`` distinct candidates of a
(prompt, user), by their *selection score* ``s`` — the reward model's r̂ when one is given,
else the gold reward):

* ``max_min`` — the candidate of largest ``s`` against the one of smallest ``s`` (best-of-n vs
  worst-of-n, RLHFlow's default; the bandit layer's ``best_worst``); ties in ``s`` go to the
  first candidate;
* ``max_random`` — the best against a uniformly drawn other candidate;
* ``random`` — two distinct candidates drawn uniformly;
* ``enhancer`` — among the pairs ``(a, b)`` with ``a`` in the top half and ``b`` in the bottom
  half of the candidates ordered by ``s`` (top half: the first ``⌊n/2⌋``; a stable sort, so
  equal scores keep the candidates' order) and ``s_a ≠ s_b``, the pair of largest
  ``‖φ_a − φ_b‖_{Σ⁻¹}`` (the per-pair prototype of the code of GSHF's authors, Xiong et al.
  2024, ICML 2024, arXiv 2312.11456; the bandit layer's ``uncertainty``); the first such pair in
  (top, bottom) order on equal norms. ``Σ = λI + Σ Δφ Δφᵀ`` over the pairs kept so far
  (:class:`FeatureCovariance`).

A pair is a **tie** when its two selection scores are equal (its label would carry no
information about the score); ties are dropped by the loop and counted.

**Gold oracles** (simulation with a known truth, :func:`make_gold`): ``gold:toy`` (the toy
task's per-user rewards :data:`pluralign.llm.toy.GOLD_REWARDS`; users named ``vowels``,
``digits``, ``spaces``, ``capitals``; features: the fractions of vowels, digits, spaces,
capitals, other letters and punctuation, in which the gold rewards are linear) and
``gold:anchors`` (the cosine similarity of the offline MiniLM embedding of the response to the
user's anchor text, :data:`ANCHORS`; users ``cook`` and ``runner``; features: the embedding).
:func:`bradley_terry` draws the labels ``P(a ≻ b) = σ(s·(g_a − g_b))``.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pluralign.errors import ConfigError, PluralignError

__all__ = [
    "ANCHORS",
    "GOLDS",
    "PAIR_RULES",
    "PROMPT_SETS",
    "FeatureCovariance",
    "GoldOracle",
    "bradley_terry",
    "distinct_candidates",
    "make_gold",
    "select_pair",
    "win_rate",
]

PAIR_RULES = ("max_min", "max_random", "random", "enhancer")
GOLDS = ("toy", "anchors")
# the SmolLM2 task's gold users (examples/policy_known_truth.py uses the same anchors)
ANCHORS = {
    "cook": "I love cooking: recipes, fresh bread, pasta and spices in the kitchen.",
    "runner": "I love sport: running, football matches, training and fitness.",
}

# built-in prompt sets of the packaged configs (``iterate.prompts: builtin:NAME``): rows
# ``(prompt, user)``, every prompt asked for every gold user of the task
TOY_PROMPTS = [
    "".join(np.random.default_rng(i).choice(list("abcdefghijklmnop "), size=2 + i % 6)).strip()
    or "a"
    for i in range(80)
]  # also examples/policy_known_truth.py's prompts
EVERYDAY_PROMPTS = [
    "Write one sentence about your weekend.",
    "Describe your favourite place.",
    "Tell me about something you enjoy.",
    "What did you do today?",
    "Give me a short piece of advice.",
    "Describe a perfect afternoon.",
    "What is worth learning?",
    "Tell me a short story.",
    "What makes a good day?",
    "Describe something you saw recently.",
    "What should I do this evening?",
    "Write a sentence about a friend.",
    "What is your favourite hobby?",
    "Describe a memorable meal.",
    "What would you like to try next?",
    "Write a line for a postcard.",
    "What do you think about in the morning?",
    "Describe a good habit.",
    "What makes you curious?",
    "Tell me about a trip.",
]


def _rows(texts: list[str], users: list[str]) -> list[tuple[str, str]]:
    return [(p, u) for p in texts for u in users]


PROMPT_SETS: dict[str, list[tuple[str, str]]] = {
    "toy": _rows(TOY_PROMPTS[16:28], ["vowels", "digits"]),
    "toy-eval": _rows(TOY_PROMPTS[:8], ["vowels", "digits"]),
    "smollm2": _rows(EVERYDAY_PROMPTS[6:], list(ANCHORS)),
    "smollm2-eval": _rows(EVERYDAY_PROMPTS[:6], list(ANCHORS)),
}


# ---------------------------------------------------------------------- pair rules
def distinct_candidates(texts: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of every distinct non-blank text (a blank response
    cannot be trained on; two equal texts cannot form a pair)."""
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(texts):
        if t.strip() and t not in seen:
            seen.add(t)
            keep.append(i)
    return keep


def select_pair(
    scores: np.ndarray,
    rule: str,
    *,
    rng: np.random.Generator | None = None,
    features: np.ndarray | None = None,
    sigma_inv: np.ndarray | None = None,
) -> tuple[int, int]:
    """``(a, b)``: the indices of the pair rule ``rule`` (module docstring) among candidates
    with selection scores ``scores`` (``(n,)``, n >= 2); ``a`` is the higher-scored one except
    for ``random``. ``max_random`` and ``random`` need ``rng``; ``enhancer`` needs ``features``
    (``(n, d)``) and ``sigma_inv`` (``(d, d)``). A tie (``scores[a] == scores[b]``) is returned
    as it is: the caller drops it."""
    s = np.asarray(scores, dtype=np.float64)
    n = s.shape[0]
    if s.ndim != 1 or n < 2:
        raise PluralignError(f"a pair needs at least 2 candidates, got scores of shape {s.shape}")
    if rule == "max_min":
        return int(np.argmax(s)), int(np.argmin(s))
    if rule in ("max_random", "random"):
        if rng is None:
            raise PluralignError(f"pair rule {rule!r} needs a random generator")
        if rule == "max_random":
            a = int(np.argmax(s))
            others = [i for i in range(n) if i != a]
            return a, int(others[int(rng.integers(len(others)))])
        a, b = (int(i) for i in rng.choice(n, size=2, replace=False))
        return a, b
    if rule == "enhancer":
        if features is None or sigma_inv is None:
            raise PluralignError("pair rule 'enhancer' needs the candidates' features and Σ⁻¹")
        phi = np.asarray(features, dtype=np.float64)
        order = np.argsort(-s, kind="stable")
        top, bottom = order[: n // 2], order[n // 2 :]
        best, best_norm = None, -np.inf
        for a in top:
            for b in bottom:
                if s[a] == s[b]:
                    continue
                d = phi[a] - phi[b]
                norm = float(d @ sigma_inv @ d)
                if norm > best_norm:
                    best, best_norm = (int(a), int(b)), norm
        # every top × bottom pair is tied: return one tie (dropped by the caller)
        return best if best is not None else (int(top[0]), int(bottom[0]))
    raise ConfigError(f"pair rule must be one of {PAIR_RULES}, got {rule!r}")


class FeatureCovariance:
    """``Σ = λI + Σ_i Δφ_i Δφ_iᵀ`` over the pairs added so far (``Δφ = φ_chosen −
    φ_rejected``; the sign does not matter), with ``norm(Δφ) = ‖Δφ‖_{Σ⁻¹}``."""

    def __init__(self, dim: int, lam: float = 1.0) -> None:
        self.lam = float(lam)
        self.matrix = self.lam * np.eye(int(dim))
        self.count = 0

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def add(self, deltas: np.ndarray) -> None:
        deltas = np.asarray(deltas, dtype=np.float64).reshape(-1, self.dim)
        self.matrix = self.matrix + deltas.T @ deltas
        self.count += deltas.shape[0]

    def inverse(self) -> np.ndarray:
        return np.linalg.inv(self.matrix)

    def norm(self, deltas: np.ndarray) -> np.ndarray:
        """``‖Δφ‖_{Σ⁻¹}`` per row of ``deltas``."""
        deltas = np.asarray(deltas, dtype=np.float64).reshape(-1, self.dim)
        solved = np.linalg.solve(self.matrix, deltas.T).T
        return np.sqrt(np.maximum(np.sum(deltas * solved, axis=1), 0.0))


def bradley_terry(
    gold_a: np.ndarray, gold_b: np.ndarray, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """``True`` where ``a ≻ b`` in a Bradley–Terry draw ``P(a ≻ b) = σ(scale·(g_a − g_b))``."""
    diff = scale * (np.asarray(gold_a, float) - np.asarray(gold_b, float))
    p = 1.0 / (1.0 + np.exp(-diff))
    return rng.random(p.shape) < p


def win_rate(new: np.ndarray, reference: np.ndarray) -> float:
    """The share of pairs ``(new[i], reference[i])`` where the new value is larger, a tie
    counting one half."""
    new, reference = np.asarray(new, float), np.asarray(reference, float)
    if new.shape != reference.shape or new.size == 0:
        raise PluralignError(
            f"win_rate needs two non-empty arrays of one shape, got "
            f"{new.shape} and {reference.shape}"
        )
    return float(np.mean((new > reference) + 0.5 * (new == reference)))


# ---------------------------------------------------------------------- gold oracles
class GoldOracle:
    """A known per-user reward ``g_u(prompt, response)`` and a feature map ``φ(response)``."""

    def __init__(
        self,
        name: str,
        users: Sequence[str],
        reward: Callable[[list[str], list[str]], np.ndarray],
        features: Callable[[list[str]], np.ndarray],
    ) -> None:
        self.name = name
        self.users = list(users)
        self._reward = reward
        self._features = features

    def check_users(self, users: Sequence[str]) -> None:
        unknown = [u for u in dict.fromkeys(users) if u not in self.users]
        if unknown:
            raise ConfigError(
                f"gold:{self.name} has no gold reward for user(s) {unknown}; its "
                f"users are {self.users}"
            )

    def score(
        self, prompts: Sequence[str], texts: Sequence[str], users: Sequence[str]
    ) -> np.ndarray:
        self.check_users(users)
        return self._reward(list(texts), [str(u) for u in users])

    def features(
        self, prompts: Sequence[str], texts: Sequence[str], users: Sequence[str]
    ) -> np.ndarray:
        return self._features(list(texts))


_CLASSES = (
    "aeiouAEIOU",
    string.digits,
    " ",
    string.ascii_uppercase,
    "".join(c for c in string.ascii_lowercase if c not in "aeiou"),
    ".,!?'-:;\n",
)


def _toy_gold() -> GoldOracle:
    from pluralign.llm.toy import GOLD_REWARDS

    def reward(texts: list[str], users: list[str]) -> np.ndarray:
        return np.array([GOLD_REWARDS[u](t) for t, u in zip(texts, users, strict=True)])

    sets = [set(c) for c in _CLASSES]

    def features(texts: list[str]) -> np.ndarray:
        return np.array(
            [[sum(c in s for c in t) / max(len(t), 1) for s in sets] for t in texts],
            dtype=np.float64,
        ).reshape(len(texts), len(sets))

    return GoldOracle("toy", list(GOLD_REWARDS), reward, features)


def _anchors_gold(encoder: Any = None) -> GoldOracle:
    from pluralign.features.text import TextEncoder

    encoder = encoder or TextEncoder(normalize=True)
    anchors = {u: encoder.encode([a])[0] for u, a in ANCHORS.items()}
    cache: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        if new:
            for t, e in zip(
                new, encoder.encode([t if t.strip() else " " for t in new]), strict=True
            ):
                cache[t] = np.asarray(e, dtype=np.float64)
        dim = next(iter(anchors.values())).shape[0]
        return np.array([cache[t] for t in texts]).reshape(len(texts), dim)

    def reward(texts: list[str], users: list[str]) -> np.ndarray:
        e = embed(texts)
        return np.array([float(e[i] @ anchors[u]) for i, u in enumerate(users)])

    return GoldOracle("anchors", list(ANCHORS), reward, embed)


def make_gold(name: str) -> GoldOracle:
    """The gold oracle ``name`` (``toy`` or ``anchors``, module docstring)."""
    if name == "toy":
        return _toy_gold()
    if name == "anchors":
        return _anchors_gold()
    raise ConfigError(f"unknown gold oracle {name!r}; known: {', '.join(GOLDS)}")
