"""``pluralign iterate CONFIG.yaml``: online iterative DPO of a personalized policy (issue 13).

Round ``t = 1..T`` (``iterate.rounds``):

1. **Sample.** ``n`` responses per row ``(prompt, user)`` of ``iterate.prompts`` from the
   current policy ``π_{t−1}`` (the main agent; ``π_0`` is the adapters-off reference), users
   mixed in each ``generate`` batch. Blank and repeated responses are dropped: a row's
   candidates are its distinct non-blank texts. ``iterate.sampler: reference`` samples every
   round from π0 instead: the same labels and DPO steps on offline data (with ``restart:
   true`` the last round is offline DPO on all ``T`` rounds' π0 pairs).
2. **Score and annotate.** The *selection score* of a candidate is the reward model's r̂
   (``iterate.reward_model``, a train-rm folder) when one is given, else the gold reward of the
   simulation (``iterate.annotator: gold:toy | gold:anchors``, :mod:`pluralign.llm.pairs`). The
   label of a pair comes from the annotator: ``reward_model`` — the response of higher r̂ is
   chosen; ``gold:<name>`` — a Bradley–Terry draw ``P(a ≻ b) = σ(s·(g_a − g_b))`` with
   ``s = iterate.bt_scale`` (seeded).
3. **Choose pairs.** One pair per row by ``iterate.pairs`` (``max_min``, ``max_random``,
   ``random``, ``enhancer``: :func:`pluralign.llm.pairs.select_pair`). A pair whose two selection
   scores are equal is a **tie** and is dropped (counted); a row with fewer than two distinct
   non-blank candidates gives no pair (counted as ``degenerate``). Every kept pair records its
   margin ``|s_a − s_b|`` and its uncertainty ``‖Δφ‖_{Σ⁻¹}`` (Σ as it was at the start of the
   round); then ``Σ += Σ Δφ Δφᵀ`` over the round's kept pairs (``Σ_0 = λI``, ``λ =
   iterate.lam``; φ is the reward model's pooled feature, or the gold's features without one).
   The pairs are written as ``round-XX.jsonl`` (TRL rows ``prompt``, ``chosen``, ``rejected``,
   ``user_id``, plus ``margin`` and ``uncertainty``).
4. **Reference log-probabilities.** ``log π0`` of both sides of every pair is computed once
   for the whole run and saved (``state/reference-XX.npy``): every DPO epoch and every restart
   reads it instead of running the reference pass again (π0 is fixed, so these are the same
   numbers). When π0 itself sampled the round (round 1, or ``sampler: reference``), a side
   whose DPO encoding is exactly the sampled token sequence (it stopped at EOS, its text
   re-tokenizes to the same ids, nothing was truncated) takes it from the sampling pass; the
   others get one reference pass. The round's record counts both (``reference_logps``).
5. **DPO** against the **fixed** reference π0 (the adapters off, never the previous round's
   policy), with the ``dpo`` and ``train`` sections (a fresh AdamW each round, row order seeded
   from ``(iterate.seed, t)``). ``restart: false`` (default): continue from ``π_{t−1}`` on the
   round's new pairs only; ``restart: true``: reset the adapters to their π0 initialization and
   retrain on every pair so far (the ICML paper's variant). A round whose pairs are all ties
   (or that has none) warns, is recorded, and skips its DPO step: ``π_t = π_{t−1}``. A user
   without pairs in a round keeps its own factors that round (shared factors still move).

**Hybrid.** ``iterate.offline`` (TRL JSONL with ``user_id``) is saved as ``round-00.jsonl``:
its pairs join round 1's DPO data (and every restart's), and their ``Δφ`` seed Σ. Its columns
may have other names: ``iterate.offline_user_column``, ``offline_prompt_column``,
``offline_chosen_column`` and ``offline_rejected_column`` map them, as ``data.user_column``
and friends do for train-rm and train-policy (``round-00.jsonl`` has TRL's names). Its
conversational rows (TRL message lists) stay messages: DPO tokenizes them with the policy's
chat template (:func:`~pluralign.llm.dpo.encode_dpo_pairs`), Σ takes the reward model's
features of them as it was trained on them, and ``round-00.jsonl`` keeps them as messages.

**Records** (``history.json``; round 0 is π0 itself): per round and per user, on
``iterate.eval_samples`` fresh samples per row of ``iterate.eval_prompts``: the gold reward
(gold annotators) and the proxy reward r̂ (with a reward model); ``KL(π_t‖π0)`` estimated
two ways on those samples (:meth:`~pluralign.llm.PersonalizedPolicy.kl_to_reference`):
``kl``, the mean sampled log-ratio ``log π_t(y) − log π0(y)``, and ``kl_token``, the mean of
the exact next-token KLs ``Σ_k KL(π_t(·|x, y_<k) ‖ π0(·|x, y_<k))`` along each sample (the
same expectation by the chain rule, never negative, lower variance); the win rate against π0
under the gold reward (sample ``j`` of π_t against sample ``j`` of π0 for the same row, the π0
samples being the same every round; a tie counts ½); the pair statistics (count, ties,
degenerate rows, mean margin, mean uncertainty) and the DPO step's training accuracy and loss.

**Resume.** After each finished round the state is written (``state/``: the adapters of every
round, Σ, the pairs' reference log-probs, the history; the pairs are the ``round-XX.jsonl``
files; ``config.yaml`` is the resolved config), ``state/state.json`` last and atomically. A
rerun with the same ``out`` resumes after the last finished round and gives the same adapters
and history as an
uninterrupted run: every random draw is seeded from ``(iterate.seed, round, stream)``. A rerun
whose config differs (other than ``iterate.rounds``, which may grow, and ``out``), or whose
prompt / offline files changed, is refused naming the changed keys; ``--no-resume`` starts
over. Single process only (no ``accelerate launch``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from pluralign._atomic import atomic_write_text
from pluralign.errors import ConfigError, DataValidationError, PluralignWarning
from pluralign.llm.config import (
    DPOConfig,
    IterateConfig,
    LoraConfig,
    PolicyModelConfig,
    TrainingConfig,
)
from pluralign.llm.pairs import (
    FeatureCovariance,
    GoldOracle,
    bradley_terry,
    distinct_candidates,
    make_gold,
    select_pair,
    win_rate,
)
from pluralign.settings import Section, Setting, check_string, resolve_sections, to_plain

if TYPE_CHECKING:
    from pluralign.data.loaders import TextPreferences
    from pluralign.llm.policy import PersonalizedPolicy
    from pluralign.llm.protocols import BatchedRewardModel

__all__ = [
    "ITERATE_SECTIONS",
    "ITERATE_TOP_LEVEL",
    "STREAMS",
    "check_reward_model_users",
    "read_prompt_file",
    "resolve_iterate_config",
    "round_seed",
    "rounds_table",
    "run_iterate",
]

ITERATE_SECTIONS: dict[str, type[Section]] = {
    "model": PolicyModelConfig,
    "lora": LoraConfig,
    "train": TrainingConfig,
    "dpo": DPOConfig,
    "iterate": IterateConfig,
}
ITERATE_TOP_LEVEL = {
    "out": Setting("runs/iterate", "the output folder (a rerun with the same out resumes)")
}
# the random streams of a round (round_seed(seed, round, STREAMS[...]))
STREAMS = {"generate": 0, "pairs": 1, "labels": 2, "dpo": 3, "evaluate": 4, "reference": 5}
# config keys that may differ on resume
_RESUMABLE_CHANGES = {"out", "iterate.rounds"}


def round_seed(seed: int, round_: int, stream: int) -> int:
    """A seed derived from ``(seed, round, stream)`` (a 31-bit integer)."""
    return int(np.random.SeedSequence([seed, round_, stream]).generate_state(1)[0] >> 1)


# ---------------------------------------------------------------------- config and inputs
def resolve_iterate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check an iterate config and fill in the defaults: ``{"model", "lora", "train", "dpo",
    "iterate", "out"}`` (sections as :func:`pluralign.llm.policy_job.resolve_policy_config`)."""
    from pluralign.llm.policy_job import TOY_MODEL

    if not isinstance(config, dict):
        raise ConfigError("an iterate config must be a mapping")
    resolved = resolve_sections(config, ITERATE_SECTIONS, top_level=ITERATE_TOP_LEVEL)
    m: PolicyModelConfig = resolved["model"]
    if m.name_or_path == TOY_MODEL:
        for key in ("gguf_file", "tokenizer", "pad_token"):
            if getattr(m, key) is not None:
                raise ConfigError(f"model.{key} cannot be set with model {TOY_MODEL!r}")
    if resolved["dpo"].loss_type == "pessimistic":
        raise ConfigError(
            "dpo.loss_type pessimistic is not supported by iterate (its margins "
            "come from a fixed offline data set); use sigmoid or ipo"
        )
    return resolved


def read_prompt_file(path: str | Path) -> list[tuple[str, str]]:
    """``(prompt, user)`` rows of a JSONL file of ``{"prompt", "user_id"}`` objects; a row
    without a user (or with a blank one) is refused naming its file and line.
    ``builtin:NAME`` is a prompt set of :data:`pluralign.llm.pairs.PROMPT_SETS` (``toy``,
    ``toy-eval``, ``smollm2``, ``smollm2-eval``)."""
    from pluralign.data.io import check_user_id, iter_jsonl_objects
    from pluralign.llm.pairs import PROMPT_SETS

    if isinstance(path, str) and path.startswith("builtin:"):
        name = path.partition(":")[2]
        if name not in PROMPT_SETS:
            raise ConfigError(
                f"unknown built-in prompt set {name!r}; known: {', '.join(PROMPT_SETS)}"
            )
        return list(PROMPT_SETS[name])
    path = Path(path)
    if not path.is_file():
        raise DataValidationError("file not found", path=str(path))
    rows: list[tuple[str, str]] = []
    first = None
    for row, where in iter_jsonl_objects(path):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataValidationError("missing or not a non-empty string", field="prompt", **where)
        if row.get("user_id") is None:
            raise DataValidationError(
                "missing: every prompt of an iterate run needs the user it is asked for",
                field="user_id",
                **where,
            )
        check_user_id(row["user_id"], "user_id", where, first)
        first = first or (row["user_id"], where["line"])
        rows.append((prompt, str(row["user_id"])))
    if not rows:
        raise DataValidationError("no prompts", path=str(path))
    return rows


def check_reward_model_users(reward_model: Any, users: list[str]) -> None:
    """Refuse a reward model without an adapter for every user of the policy."""
    if getattr(reward_model, "share", None) == "pooled":
        return
    known = set(reward_model.user_ids)
    missing = [u for u in users if u not in known]
    if missing:
        raise ConfigError(
            f"the reward model was trained for other users than the policy: it "
            f"has no adapter for {missing[:10]} (its users: "
            f"{list(reward_model.user_ids)[:10]})"
        )


def _file_hash(path: str | None) -> str | None:
    if path is None:
        return None
    if path.startswith("builtin:"):
        return hashlib.sha256(repr(read_prompt_file(path)).encode()).hexdigest()[:16]
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _flat(plain: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in plain.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _setting_defaults() -> dict[str, Any]:
    """``{"section.key": default}`` of every setting of an iterate config."""
    return {
        f"{name}.{key}": default
        for name, cls in ITERATE_SECTIONS.items()
        for key, default in cls.defaults().items()
    }


def _changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Keys whose value differs between a saved and the current resolved config. A setting
    the saved config lacks (added in a later pluralign) counts as unchanged while it keeps its
    default, which is the behaviour the saved run had."""
    a, b = _flat(saved), _flat(now)
    defaults = _setting_defaults()
    return sorted(
        k
        for k in set(a) | set(b)
        if k not in _RESUMABLE_CHANGES
        and a.get(k, defaults.get(k, "<unset>")) != b.get(k, "<unset>")
    )


# ---------------------------------------------------------------------- files
def _pairs_rows(prefs: Any, margins: list | None = None, uncertainty: list | None = None) -> str:
    lines = []
    messages = getattr(prefs, "messages", None) or [None] * prefs.n
    for i in range(prefs.n):
        parts = messages[i] or (prefs.prompts[i], prefs.chosen[i], prefs.rejected[i])
        row: dict[str, Any] = {
            "prompt": parts[0],
            "chosen": parts[1],
            "rejected": parts[2],
            "user_id": str(prefs.users[i]),
        }
        if margins is not None:
            row["margin"] = margins[i]
            row["uncertainty"] = uncertainty[i] if uncertainty is not None else None
        lines.append(json.dumps(row, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def _read_pairs(path: Path) -> Any:
    from pluralign.data.loaders import TextPreferences, read_trl

    if not path.read_text(encoding="utf-8").strip():
        return TextPreferences(prompts=[], chosen=[], rejected=[], users=np.array([], str))
    return read_trl(path)


def _read_offline(it: IterateConfig) -> Any:
    """The rows of ``iterate.offline``, its columns mapped by the ``iterate.offline_*_column``
    settings; an error (a mapped column missing, ...) names the file, line and column, and the
    mapping."""
    from pluralign.data.loaders import read_trl

    columns = it.offline_columns()
    try:
        return read_trl(it.offline, **columns)
    except DataValidationError as err:
        if not columns:
            raise
        mapping = ", ".join(f"iterate.offline_{kw}={col!r}" for kw, col in columns.items())
        raise DataValidationError(
            f"{err.bare} [iterate.offline read with {mapping}]",
            field=err.field,
            row=err.row,
            path=err.path,
            line=err.line,
        ) from None


def _concat(parts: list[Any]) -> Any:
    from pluralign.data.loaders import TextPreferences

    parts = [p for p in parts if p is not None and p.n]
    messages = [m for p in parts for m in (p.messages or [None] * p.n)]
    return TextPreferences(
        prompts=[x for p in parts for x in p.prompts],
        chosen=[x for p in parts for x in p.chosen],
        rejected=[x for p in parts for x in p.rejected],
        users=np.array([str(u) for p in parts for u in p.users], dtype=str),
        conversational=any(p.conversational for p in parts),
        messages=messages if any(m is not None for m in messages) else None,
    )


def _save_npy(path: Path, array: np.ndarray) -> None:
    from pluralign.llm._files import write_bytes

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float64), allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


# ---------------------------------------------------------------------- the loop
class _Loop:
    """The state of one iterate run (module docstring)."""

    def __init__(
        self,
        resolved: dict[str, Any],
        out: Path,
        *,
        policy: PersonalizedPolicy,
        users: list[str],
        rows: list[tuple[str, str]],
        eval_rows: list[tuple[str, str]],
        gold: GoldOracle | None,
        reward_model: BatchedRewardModel | None,
        offline: TextPreferences | None,
        progress: bool,
    ) -> None:
        self.r = resolved
        self.it: IterateConfig = resolved["iterate"]
        self.out = out
        self.policy = policy
        self.users = users
        self.rows = rows
        self.eval_rows = eval_rows
        self.gold = gold
        self.rm = reward_model
        self.offline = offline
        self.progress = progress
        self.batch = resolved["train"].train_batch_size
        self.history: list[dict[str, Any]] = []
        self.timings: list[dict[str, float]] = []
        self.data: list[Any] = []  # pairs per round, round 0 = offline (or empty)
        self.refs: list[np.ndarray] = []  # their log π0 (pairs × 2), per round
        self.sigma: FeatureCovariance | None = None
        self.initial = policy.trainable_state()
        self._reference_samples: Any = None

    # -------------------------------------------------------------- scoring
    def selection_scores(
        self, prompts: list[str], texts: list[str], users: list[str]
    ) -> np.ndarray:
        if self.rm is not None:
            return self.rm.score(
                prompts, [t if t.strip() else " " for t in texts], users, batch_size=self.batch
            )
        return self.gold.score(prompts, texts, users)  # type: ignore[union-attr]  # no rm: gold

    def features(
        self,
        prompts: list[str],
        texts: list[str],
        users: list[str],
        conversations: list | None = None,
    ) -> np.ndarray:
        if self.rm is not None:
            return self.rm.features(
                prompts,
                [t if t.strip() else " " for t in texts],
                users,
                batch_size=self.batch,
                conversations=conversations,
            )
        return self.gold.features(prompts, texts, users)  # type: ignore[union-attr]  # no rm: gold

    def _sigma_for(self, dim: int) -> FeatureCovariance:
        if self.sigma is None:
            self.sigma = FeatureCovariance(dim, self.it.lam)
        return self.sigma

    def seed_sigma(self) -> None:
        """Σ from the offline pairs' Δφ (hybrid start)."""
        if self.offline is None or not self.offline.n:
            return
        from pluralign.llm.data import conversations

        users = [str(u) for u in self.offline.users]
        phi_c, phi_r = (
            self.features(
                list(self.offline.prompts),
                list(getattr(self.offline, side)),
                users,
                conversations(self.offline, side),
            )
            for side in ("chosen", "rejected")
        )
        self._sigma_for(phi_c.shape[1]).add(phi_c - phi_r)

    # -------------------------------------------------------------- one round
    def collect(
        self, t: int, timing: dict[str, float]
    ) -> tuple[Any, dict[str, Any], dict[str, list] | None]:
        """Steps 1–3 of round ``t``: the round's pairs, their statistics per user and, when π0
        sampled them, the sampled token ids and log-probabilities (``None`` otherwise)."""
        from pluralign.data.loaders import TextPreferences

        it = self.it
        start = time.perf_counter()
        prompts = [p for p, _ in self.rows]
        users = [u for _, u in self.rows]
        # round 1's policy is π0 (the adapters start at B = 0); sampler: reference keeps π0
        from_reference = t == 1 or it.sampler == "reference"
        samples = self.policy.generate(
            prompts,
            users,
            n=it.n,
            max_new_tokens=it.max_new_tokens,
            temperature=it.temperature,
            seed=round_seed(it.seed, t, STREAMS["generate"]),
            batch_size=self.batch,
            reference=from_reference,
        )
        timing["generate"] = time.perf_counter() - start
        start = time.perf_counter()
        flat_p, flat_t, flat_u, owner, flat_ids, flat_lp = [], [], [], [], [], []
        for i, (p, u, texts) in enumerate(zip(prompts, users, samples.texts, strict=True)):
            for j in distinct_candidates(texts):
                flat_p.append(p)
                flat_t.append(texts[j])
                flat_u.append(u)
                owner.append(i)
                flat_ids.append(samples.token_ids[i][j])
                flat_lp.append(samples.logprobs[i][j])  # type: ignore[index]  # generate records them
        owner_arr = np.asarray(owner, dtype=np.int64)
        scores = self.selection_scores(flat_p, flat_t, flat_u) if flat_t else np.zeros(0)
        phi = self.features(flat_p, flat_t, flat_u) if flat_t else np.zeros((0, 1))
        gold = self.gold.score(flat_p, flat_t, flat_u) if self.gold is not None and flat_t else None
        timing["annotate"] = time.perf_counter() - start
        start = time.perf_counter()
        sigma = self._sigma_for(phi.shape[1]) if flat_t else self.sigma
        sigma_inv = sigma.inverse() if sigma is not None else None
        rng_pairs = np.random.default_rng(round_seed(it.seed, t, STREAMS["pairs"]))
        rng_labels = np.random.default_rng(round_seed(it.seed, t, STREAMS["labels"]))
        stats: dict[str, dict[str, Any]] = {
            u: {
                "rows": 0,
                "pairs": 0,
                "ties": 0,
                "degenerate": 0,
                "margin": [],
                "uncertainty": [],
                "gold_margin": [],
            }
            for u in self.users
        }
        kept: dict[str, list] = {
            "p": [],
            "c": [],
            "r": [],
            "u": [],
            "m": [],
            "unc": [],
            "d": [],
            "ids": [],
            "lp": [],
        }
        for i, (p, u) in enumerate(self.rows):
            s = stats[u]
            s["rows"] += 1
            idx = np.flatnonzero(owner_arr == i)
            if idx.size < 2:
                s["degenerate"] += 1
                continue
            a, b = select_pair(
                scores[idx], it.pairs, rng=rng_pairs, features=phi[idx], sigma_inv=sigma_inv
            )
            ia, ib = idx[a], idx[b]
            if scores[ia] == scores[ib]:
                s["ties"] += 1
                continue
            if it.annotator == "reward_model":
                a_wins = bool(scores[ia] > scores[ib])
            else:
                a_wins = bool(
                    bradley_terry(gold[ia : ia + 1], gold[ib : ib + 1], it.bt_scale, rng_labels)[0]  # type: ignore[index]  # a gold annotator
                )
            ic, ir = (ia, ib) if a_wins else (ib, ia)
            delta = phi[ic] - phi[ir]
            unc = float(sigma.norm(delta)[0])  # type: ignore[union-attr]  # set: there are samples
            margin = float(abs(scores[ia] - scores[ib]))
            s["pairs"] += 1
            s["margin"].append(margin)
            s["uncertainty"].append(unc)
            if gold is not None:
                s["gold_margin"].append(float(gold[ic] - gold[ir]))
            for key, value in (
                ("p", p),
                ("c", flat_t[ic]),
                ("r", flat_t[ir]),
                ("u", u),
                ("m", margin),
                ("unc", unc),
                ("d", delta),
                ("ids", (flat_ids[ic], flat_ids[ir])),
                ("lp", (flat_lp[ic], flat_lp[ir])),
            ):
                kept[key].append(value)
        if kept["d"]:
            sigma.add(np.array(kept["d"]))  # type: ignore[union-attr]  # set: there are pairs
        pairs = TextPreferences(
            prompts=kept["p"],
            chosen=kept["c"],
            rejected=kept["r"],
            users=np.array(kept["u"], dtype=str),
        )
        atomic_write_text(
            self.out / f"round-{t:02d}.jsonl", _pairs_rows(pairs, kept["m"], kept["unc"])
        )
        timing["select"] = time.perf_counter() - start
        summary = {
            u: {
                "rows": s["rows"],
                "pairs": s["pairs"],
                "ties": s["ties"],
                "degenerate": s["degenerate"],
                "mean_margin": _mean(s["margin"]),
                "mean_uncertainty": _mean(s["uncertainty"]),
                "mean_gold_margin": _mean(s["gold_margin"]),
            }
            for u, s in stats.items()
        }
        sampled = {"ids": kept["ids"], "logps": kept["lp"]} if from_reference else None
        return pairs, summary, sampled

    def reference_logps(
        self, pairs: Any, sampled: dict[str, list] | None, timing: dict[str, float]
    ) -> tuple[np.ndarray, dict[str, int]]:
        """``log π0`` of each pair's chosen and rejected response (``(pairs, 2)``), computed
        once per pair for the whole run (π0 is fixed: every epoch and every restart reads
        them). When π0 sampled the pair (``sampled``), a side whose DPO encoding is exactly
        the sampled token sequence (it ended with EOS, its text re-tokenizes to the same ids,
        nothing was truncated) takes its log-probability from the sampling pass; the other
        sides get one reference pass."""
        from pluralign.llm.dpo import encode_dpo_pairs

        start = time.perf_counter()
        out = np.full((pairs.n, 2), np.nan)
        if not pairs.n:
            timing["reference"] = 0.0
            return out, {"from_sampling": 0, "computed": 0}
        encoded = encode_dpo_pairs(self.policy, pairs)
        todo: list[tuple[int, int]] = []
        for i in range(pairs.n):
            for side, enc in enumerate((encoded.chosen[i], encoded.rejected[i])):
                if sampled is not None and enc["response_ids"] == list(sampled["ids"][i][side]):
                    out[i, side] = sampled["logps"][i][side]
                else:
                    todo.append((i, side))
        if todo:
            # the encoded sides themselves: a conversational offline row's prompt is its
            # messages' tokens (pairs.prompts holds their "role: content" text)
            sides = [(encoded.chosen, encoded.rejected)[side][i] for i, side in todo]
            logps = self.policy.encoded_logprobs(sides, reference=True, batch_size=self.batch)
            for (i, side), value in zip(todo, logps, strict=True):
                out[i, side] = value
        timing["reference"] = time.perf_counter() - start
        return out, {"from_sampling": 2 * pairs.n - len(todo), "computed": len(todo)}

    def train(
        self,
        t: int,
        pairs: Any,
        refs: np.ndarray,
        timing: dict[str, float],
        before_dpo: Callable[[int, Any, Any], None] | None,
    ) -> dict[str, Any]:
        """Step 4 of round ``t``."""
        from pluralign.llm.dpo import DPOTrainer, encode_dpo_pairs

        it = self.it
        start = time.perf_counter()
        if not pairs.n:
            warnings.warn(
                f"round {t}: no pair survived (every chosen pair was a tie or no "
                "row had two distinct responses); the round's DPO step is skipped "
                "and the policy stays π_{t-1}",
                PluralignWarning,
                stacklevel=3,
            )
            timing["dpo"] = 0.0
            return {"skipped": "all pairs were ties", "n": 0}
        if it.restart:
            self.policy.load_trainable_state(self.initial)
            data, ref = _concat([*self.data, pairs]), np.concatenate([*self.refs, refs])
        elif t == 1:
            data, ref = _concat([self.data[0], pairs]), np.concatenate([self.refs[0], refs])
        else:
            data, ref = pairs, refs
        if before_dpo is not None:
            before_dpo(t, self.policy, data)
        dpo: DPOConfig = self.r["dpo"]
        kwargs = self.r["train"].trainer_kwargs()
        for key in ("checkpoint_every", "keep_checkpoints"):
            kwargs.pop(key)
        kwargs["seed"] = round_seed(it.seed, t, STREAMS["dpo"])
        trainer = DPOTrainer(
            beta=dpo.beta,
            loss_type=dpo.loss_type,
            kl_samples=0,
            output_dir=None,
            progress=self.progress,
            eval_every_epoch=False,
            **kwargs,
        )
        # on encoded pairs: a user without pairs this round is allowed (fit refuses); the
        # settings are checked before the pairs are encoded
        trainer._check()
        trainer.fit_encoded(self.policy, encode_dpo_pairs(self.policy, data).with_reference(ref))
        timing["dpo"] = time.perf_counter() - start
        ev = trainer.train_evaluation_
        return {
            "n": data.n,
            "steps": trainer.global_step_,
            "accuracy": ev["accuracy"],
            "loss": ev["loss"],
        }

    def evaluate(self, t: int, timing: dict[str, float]) -> dict[str, dict[str, Any]]:
        """Gold / proxy reward, KL and win rate of ``π_t`` per user (module docstring)."""
        it = self.it
        start = time.perf_counter()
        prompts = [p for p, _ in self.eval_rows]
        users = [u for _, u in self.eval_rows]
        if self._reference_samples is None:
            self._reference_samples = self.policy.generate(
                prompts,
                users,
                n=it.eval_samples,
                max_new_tokens=it.max_new_tokens,
                temperature=it.temperature,
                seed=round_seed(it.seed, 0, STREAMS["reference"]),
                batch_size=self.batch,
                reference=True,
            )
        ref = self._reference_samples
        samples = (
            ref
            if t == 0
            else self.policy.generate(
                prompts,
                users,
                n=it.eval_samples,
                max_new_tokens=it.max_new_tokens,
                temperature=it.temperature,
                seed=round_seed(it.seed, t, STREAMS["evaluate"]),
                batch_size=self.batch,
            )
        )
        p, ids, u = samples.flat()
        texts = [x for group in samples.texts for x in group]
        ref_texts = [x for group in ref.texts for x in group]
        timing["eval_generate"] = time.perf_counter() - start
        start = time.perf_counter()
        gap, token_kl = self.policy.kl_to_reference(p, ids, u, batch_size=self.batch)
        timing["eval_logprobs"] = time.perf_counter() - start
        start = time.perf_counter()
        gold = gold_ref = proxy = None
        if self.gold is not None:
            gold = self.gold.score(p, texts, u)
            gold_ref = self.gold.score(p, ref_texts, u)
        if self.rm is not None:
            proxy = self.rm.score(
                p, [x if x.strip() else " " for x in texts], u, batch_size=self.batch
            )
        timing["eval_score"] = time.perf_counter() - start
        u_arr = np.asarray(u)
        out = {}
        for user in self.users:
            m = u_arr == user
            if not m.any():
                continue
            out[user] = {
                "gold": None if gold is None else float(gold[m].mean()),
                "proxy": None if proxy is None else float(proxy[m].mean()),
                "kl": float(gap[m].mean()),
                "kl_token": float(token_kl[m].mean()),
                "win_rate": None if gold is None else win_rate(gold[m], gold_ref[m]),  # type: ignore[index]  # set with gold
            }
        return out

    # -------------------------------------------------------------- state
    def save(self, t: int, fingerprint: dict[str, Any]) -> None:
        from pluralign.llm._files import write_tensors

        folder = self.out / "state"
        folder.mkdir(parents=True, exist_ok=True)
        write_tensors(folder / f"adapters-{t:02d}.safetensors", self.policy.trainable_state())
        _save_npy(folder / f"reference-{t:02d}.npy", self.refs[t])
        sigma_file = None
        if self.sigma is not None:
            sigma_file = f"sigma-{t:02d}.npy"
            _save_npy(folder / sigma_file, self.sigma.matrix)
        state = {
            "round": t,
            "users": self.users,
            "history": self.history,
            "timings": self.timings,
            "adapters": f"adapters-{t:02d}.safetensors",
            "sigma": sigma_file,
            "sigma_count": None if self.sigma is None else self.sigma.count,
            "fingerprint": fingerprint,
        }
        atomic_write_text(folder / "state.json", json.dumps(state, indent=1) + "\n")

    def load(self, state: dict[str, Any]) -> int:
        from pluralign.llm._files import read_tensors

        folder = self.out / "state"
        t = int(state["round"])
        self.policy.load_trainable_state(read_tensors(folder / state["adapters"]))
        if state.get("sigma"):
            matrix = np.load(folder / state["sigma"], allow_pickle=False)
            self.sigma = FeatureCovariance(matrix.shape[0], self.it.lam)
            self.sigma.matrix = matrix
            self.sigma.count = int(state["sigma_count"])
        self.history = list(state["history"])
        self.timings = list(state.get("timings", []))
        self.data = [self.data[0]] + [
            _read_pairs(self.out / f"round-{k:02d}.jsonl") for k in range(1, t + 1)
        ]
        self.refs = [
            np.load(folder / f"reference-{k:02d}.npy", allow_pickle=False).reshape(-1, 2)
            for k in range(t + 1)
        ]
        return t


def _load_state(out: Path) -> dict[str, Any] | None:
    from pluralign._parse import parse_json, read_text

    path = out / "state" / "state.json"
    if not path.is_file():
        return None
    state = parse_json(read_text(path), path=str(path), finite=False)
    if not isinstance(state, dict) or not isinstance(state.get("round"), int):
        raise DataValidationError("not an iterate state file", path=str(path))
    return state


def run_iterate(
    config: dict[str, Any],
    *,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
    before_dpo: Callable[[int, Any, Any], None] | None = None,
    gold: GoldOracle | None = None,
    reward_model: Any = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) an iterate config (module docstring); returns ``{"history",
    "timings", "out", "resumed_from", "policy", "sigma"}`` (the trained policy and the
    :class:`~pluralign.llm.pairs.FeatureCovariance` Σ, or ``None`` before any feature).

    ``stop_after``: finish at most this many rounds in this call (the rest on a rerun);
    ``on_round(t, record)`` after round ``t`` is saved; ``before_dpo(t, policy, data)`` just
    before round ``t``'s DPO step (after a restart's reset; ``data``: the TextPreferences it
    trains on). ``gold`` and ``reward_model`` replace the
    config's oracle / reward model with objects (tests, notebooks)."""
    from pluralign.llm.job import _quiet_transformers
    from pluralign.llm.policy_job import build_policy, load_reward_model

    resolved = resolve_iterate_config(config)
    if out is not None:
        resolved["out"] = check_string("--out", str(out))
    out = Path(resolved["out"])
    it: IterateConfig = resolved["iterate"]
    _quiet_transformers()
    say = log or (print if progress else (lambda _msg: None))

    rows = read_prompt_file(it.prompts)  # type: ignore[arg-type]  # iterate.prompts is required
    users = list(dict.fromkeys(u for _, u in rows))
    eval_rows = read_prompt_file(it.eval_prompts) if it.eval_prompts else rows
    extra = sorted({u for _, u in eval_rows} - set(users))
    if extra:
        raise ConfigError(f"iterate.eval_prompts has users without training prompts: {extra}")
    offline = _read_offline(it) if it.offline else None
    if offline is not None:
        extra = sorted({str(u) for u in offline.users} - set(users))
        if extra:
            raise ConfigError(
                f"iterate.offline has users without prompts in iterate.prompts: {extra[:10]}"
            )
    if gold is None and it.annotator.startswith("gold:"):
        gold = make_gold(it.annotator.partition(":")[2])
    if gold is not None:
        gold.check_users(users)
    if reward_model is None and it.reward_model is not None:
        reward_model = load_reward_model(it.reward_model)
    if reward_model is not None:
        check_reward_model_users(reward_model, users)
    if it.annotator == "reward_model" and reward_model is None:
        raise ConfigError("iterate.annotator reward_model needs iterate.reward_model")

    plain = to_plain(resolved)
    fingerprint: dict[str, Any] = {
        "config": {k: v for k, v in plain.items() if k != "out"},
        "files": {
            "iterate.prompts (contents)": _file_hash(it.prompts),
            "iterate.eval_prompts (contents)": _file_hash(it.eval_prompts),
            "iterate.offline (contents)": _file_hash(it.offline),
        },
        "users": users,
    }
    state = _load_state(out) if resume else None
    if state is not None:
        saved = state.get("fingerprint", {})
        changed = _changed_keys(saved.get("config", {}), fingerprint["config"])
        changed += [
            k for k, v in fingerprint["files"].items() if saved.get("files", {}).get(k) != v
        ]
        if changed:
            raise ConfigError(
                f"{out} holds an iterate run of another config; changed: "
                f"{', '.join(changed)}. Use the same config to resume, or "
                "--no-resume (or another --out) to start over"
            )

    policy = build_policy(resolved, users)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(plain, sort_keys=False))
    loop = _Loop(
        resolved,
        out,
        policy=policy,
        users=users,
        rows=rows,
        eval_rows=eval_rows,
        gold=gold,
        reward_model=reward_model,
        offline=offline,
        progress=progress,
    )
    loop.data = [offline if offline is not None else _concat([])]
    atomic_write_text(out / "round-00.jsonl", _pairs_rows(loop.data[0]))
    done, resumed_from = 0, None
    if state is not None:
        done = loop.load(state)
        resumed_from = done
        say(f"resuming after round {done} of {it.rounds} ({out})")
    else:
        loop.seed_sigma()
        timing: dict[str, float] = {}
        refs, _ = loop.reference_logps(loop.data[0], None, timing)
        loop.refs = [refs]
        record: dict[str, Any] = {
            "round": 0,
            "users": loop.evaluate(0, timing),
            "pairs": None,
            "dpo": None,
        }
        loop.history = [record]
        loop.timings = [timing]
        loop.save(0, fingerprint)
    for finished, t in enumerate(range(done + 1, it.rounds + 1)):
        if stop_after is not None and finished >= stop_after:
            break
        timing = {}
        pairs, stats, sampled = loop.collect(t, timing)
        refs, reuse = loop.reference_logps(pairs, sampled, timing)
        dpo = loop.train(t, pairs, refs, timing, before_dpo)
        loop.data.append(pairs)
        loop.refs.append(refs)
        evaluation = loop.evaluate(t, timing)
        record = {
            "round": t,
            "users": {u: {**evaluation.get(u, {}), **stats[u]} for u in users},
            "pairs": pairs.n,
            "ties": sum(s["ties"] for s in stats.values()),
            "reference_logps": reuse,
            "dpo": dpo,
        }
        loop.history.append(record)
        loop.timings.append({k: round(v, 4) for k, v in timing.items()})
        loop.save(t, fingerprint)
        _write_outputs(loop, resolved)
        say(
            f"round {t}/{it.rounds}: {pairs.n} pairs, {record['ties']} ties; "
            + "; ".join(
                f"{u}: gold {_fmt(v.get('gold'))} KL {_fmt(v.get('kl'))} "
                f"win {_fmt(v.get('win_rate'))}"
                for u, v in record["users"].items()
            )
        )
        if on_round is not None:
            on_round(t, record)
    _write_outputs(loop, resolved)
    return {
        "history": loop.history,
        "timings": loop.timings,
        "out": str(out),
        "resumed_from": resumed_from,
        "policy": policy,
        "sigma": loop.sigma,
    }


def _fmt(value: Any) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    )


def rounds_table(history: list[dict[str, Any]]) -> str:
    """The per-round, per-user Markdown table of ``rounds.md``."""
    lines = [
        "| round | user | pairs | ties | mean margin | mean uncertainty | gold | proxy | "
        "KL(π‖π0) sampled | KL(π‖π0) per-token | win vs π0 |",
        "|" + " --- |" * 11,
    ]
    for record in history:
        for user, v in record["users"].items():
            lines.append(
                f"| {record['round']} | {user} | {v.get('pairs', '-')} | "
                f"{v.get('ties', '-')} | {_fmt(v.get('mean_margin'))} | "
                f"{_fmt(v.get('mean_uncertainty'))} | {_fmt(v.get('gold'))} | "
                f"{_fmt(v.get('proxy'))} | {_fmt(v.get('kl'))} | "
                f"{_fmt(v.get('kl_token'))} | {_fmt(v.get('win_rate'))} |"
            )
    return "\n".join(lines) + "\n"


def _write_outputs(loop: _Loop, resolved: dict[str, Any]) -> None:
    out = loop.out
    atomic_write_text(out / "history.json", json.dumps(loop.history, indent=1) + "\n")
    atomic_write_text(out / "timings.json", json.dumps(loop.timings, indent=1) + "\n")
    it: IterateConfig = resolved["iterate"]
    atomic_write_text(
        out / "rounds.md",
        f"# {resolved['model'].name_or_path}: iterate, pairs={it.pairs}, "
        f"restart={str(it.restart).lower()}, annotator={it.annotator}, "
        f"seed={it.seed}\n\n" + rounds_table(loop.history),
    )
    _plot(
        loop.history,
        out / "rounds.png",
        f"{Path(str(resolved['model'].name_or_path)).name}: pairs={it.pairs}, seed={it.seed}",
    )


def _plot(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Gold (or proxy) reward and KL(π_t‖π0) against the round, one style per user (the KL
    per token dashed beside the sampled one), one legend below both panels."""
    from pluralign.plots import (
        _new_figure,
        figure_legend,
        method_style,
        save_figure,
    )

    users = list(dict.fromkeys(u for r in history for u in r["users"]))
    has_gold = any(v.get("gold") is not None for r in history for v in r["users"].values())
    key = "gold" if has_gold else "proxy"
    fig = _new_figure((9.0, 4.0))
    axes = fig.subplots(1, 2)
    for i, user in enumerate(users):
        style = method_style(i)
        pts = [(r["round"], r["users"][user]) for r in history if user in r["users"]]
        rounds = [t for t, _ in pts]
        axes[0].plot(
            rounds,
            [v.get(key) if v.get(key) is not None else np.nan for _, v in pts],
            label=user,
            **style,
        )
        axes[1].plot(rounds, [v.get("kl") for _, v in pts], label="_sampled", **style)
        if all(v.get("kl_token") is not None for _, v in pts):
            axes[1].plot(
                rounds,
                [v["kl_token"] for _, v in pts],
                label=f"{user}: KL per token",
                **{**style, "linestyle": ":", "marker": "x"},
            )
    axes[0].set_ylabel(f"{key} reward of π_t samples")
    axes[1].set_ylabel("KL(π_t ‖ π0)")
    axes[1].set_title("sampled (user's line) and per token (dotted, ×)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("round t")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    figure_legend(fig, order=users)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
