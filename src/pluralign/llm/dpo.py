"""DPO against a fixed reference on a personalized policy (the practical offline form of GSHF,
Xiong et al. 2024, ICML 2024, arXiv 2312.11456).

For a comparison ``(x, y_w ≻ y_l)`` of user ``u`` and the log-ratios
``h_w = log π_u(y_w|x) − log π0(y_w|x)``, ``h_l`` likewise (π0: the adapters off,
:meth:`~pluralign.llm.PersonalizedPolicy.reference`), the per-pair losses are

* ``"sigmoid"`` (DPO, Rafailov et al. 2023): ``−log σ(β (h_w − h_l))`` — the Bradley–Terry
  likelihood of the reward ``r = β log π/π0`` that makes π the Gibbs policy
  ``π ∝ π0 exp(r/β)`` of the KL-regularized objective (GSHF, with ``η = β``);
* ``"ipo"`` (Azar et al. 2023): ``(h_w/n_w − h_l/n_l − 1/(2β))²`` with the log-ratios averaged
  over the ``n`` response tokens (TRL's convention, confirmed with the IPO authors);
* ``"pessimistic"`` (GSHF's offline pessimism): ``−log σ(β (h_w − h_l) + Γ_w − Γ_l)``.
  If π is the Gibbs policy of the pessimistic reward ``r − Γ``, the reward it implies is
  ``β log π/π0 + Γ``, whose Bradley–Terry likelihood is this loss: fitting it makes
  ``β log π/π0`` estimate ``r − Γ``, so responses whose reward is uncertain (large
  ``Γ(x, y) = c·‖φ(x, y) − ν(x)‖_{M⁻¹}``, :mod:`pluralign.llm.uncertainty`) are discounted. The
  margins ``Γ_w − Γ_l`` are computed once, from a reward model, before training.

The loss of a batch is the mean over its pairs; :class:`DPOTrainer` runs it through the shared
loop of :class:`~pluralign.llm.trainer.LoRATrainer` (accelerate, accumulation, checkpoints,
exact resume, progress). The reference log-probabilities are recomputed in each step with the
adapters off and no gradient (what TRL does without ``precompute_ref_log_probs``), or read from
the pairs when they carry them (``precompute_ref_log_probs=True``: one reference pass before
training; :mod:`pluralign.llm.iterate` keeps them from the sampling pass of π0); no second
model is held.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pluralign.data.loaders import TextPreferences
from pluralign.errors import ConfigError, DataValidationError, PluralignError
from pluralign.llm.config import DPOConfig, TrainingConfig
from pluralign.llm.data import _where, row_prompts
from pluralign.llm.policy import NO_TEMPLATE, PersonalizedPolicy, _warn_truncated
from pluralign.llm.trainer import LoRATrainer

__all__ = [
    "LOSS_TYPES",
    "DPOTrainer",
    "EncodedDPOPairs",
    "dpo_loss",
    "encode_dpo_pairs",
    "reference_logprobs",
]

LOSS_TYPES = ("sigmoid", "ipo", "pessimistic")
# the keywords that are settings of train-policy's dpo section take its defaults and checks
_DPO = DPOConfig.defaults()


def dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-pair loss (module docstring) from the log-ratios ``h_w``, ``h_l`` (``(pairs,)``).

    ``ipo`` needs the token counts, ``pessimistic`` the margins ``Γ_w − Γ_l``."""
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise PluralignError("the ipo loss needs the response token counts")
        average = chosen_logratios / chosen_tokens.clamp_min(
            1
        ) - rejected_logratios / rejected_tokens.clamp_min(1)
        return (average - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "pessimistic":
        if margins is None:
            raise PluralignError("the pessimistic loss needs the margins Γ_w − Γ_l")
        return -F.logsigmoid(
            beta * (chosen_logratios - rejected_logratios) + margins.to(chosen_logratios.dtype)
        )
    raise ConfigError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


@dataclass(frozen=True, eq=False)
class EncodedDPOPairs:
    """Token ids of each row's prompt with its chosen and its rejected response, the row's
    user, (for ``loss_type="pessimistic"``) its margin ``Γ_w − Γ_l``, and optionally the
    reference log-probabilities ``log π0(y_w|x), log π0(y_l|x)`` (``(rows, 2)``,
    :func:`reference_logprobs`): given, training and evaluation read them instead of running
    the reference pass (π0 is fixed, so they are the same numbers)."""

    prompts: list[str | list[dict]]
    chosen: list[dict[str, list[int]]]
    rejected: list[dict[str, list[int]]]
    user_index: np.ndarray
    users: list[str]
    margins: np.ndarray | None = None
    reference_logps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.chosen)

    def fingerprint(self) -> str:
        """A hash of tokens, users and margins (a resumed run checks it is the same data)."""
        h = hashlib.sha256()
        for c, r, u in zip(self.chosen, self.rejected, self.users, strict=True):
            h.update(repr((c["prompt_ids"], c["response_ids"], r["response_ids"], u)).encode())
        for extra in (self.margins, self.reference_logps):
            if extra is not None:
                h.update(np.ascontiguousarray(extra, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def with_reference(self, reference_logps: np.ndarray) -> EncodedDPOPairs:
        """These pairs with their reference log-probabilities (``(rows, 2)``, finite)."""
        reference_logps = np.asarray(reference_logps, dtype=np.float64)
        if reference_logps.shape != (len(self), 2) or not np.isfinite(reference_logps).all():
            raise PluralignError(
                f"reference_logps must be {len(self)} × 2 finite numbers "
                f"(chosen, rejected); got shape {reference_logps.shape}"
            )
        return dataclasses.replace(self, reference_logps=reference_logps)

    def batch(
        self, rows: Sequence[int], policy: PersonalizedPolicy, padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """The chosen sequences of ``rows`` then their rejected ones, padded, with
        ``user_index`` (twice) and ``margins`` (once per row, zeros without margins)."""
        rows = list(rows)
        batch = policy.collate(
            [self.chosen[i] for i in rows] + [self.rejected[i] for i in rows],
            padding_side=padding_side,
        )
        index = torch.as_tensor(self.user_index[rows], dtype=torch.long)
        batch["user_index"] = torch.cat([index, index])
        margins = np.zeros(len(rows)) if self.margins is None else self.margins[rows]
        batch["margins"] = torch.as_tensor(margins, dtype=torch.float64)
        if self.reference_logps is not None:
            ref = self.reference_logps[rows]
            batch["reference_logps"] = torch.as_tensor(
                np.concatenate([ref[:, 0], ref[:, 1]]), dtype=torch.float64
            )
        return batch


@torch.no_grad()
def reference_logprobs(
    policy: PersonalizedPolicy, data: EncodedDPOPairs, *, batch_size: int = 8
) -> np.ndarray:
    """``log π0`` of every pair's chosen and rejected response (``(rows, 2)``, float64): one
    reference pass (what TRL's ``precompute_ref_log_probs`` does), to attach with
    :meth:`EncodedDPOPairs.with_reference`."""
    was_training = policy.training
    policy.train(False)
    out = np.empty((len(data), 2))
    try:
        for start in range(0, len(data), batch_size):
            rows = list(range(start, min(len(data), start + batch_size)))
            batch = policy.collate(
                [data.chosen[i] for i in rows] + [data.rejected[i] for i in rows]
            )
            logps, _ = policy.sequence_logprobs(
                **{k: v.to(policy.device) for k, v in batch.items()}, reference=True
            )
            logps = logps.double().cpu().numpy()  # type: ignore[assignment]  # as an array
            out[start : start + len(rows), 0] = logps[: len(rows)]
            out[start : start + len(rows), 1] = logps[len(rows) :]
    finally:
        policy.train(was_training)
    return out


def encode_dpo_pairs(
    policy: PersonalizedPolicy, prefs: TextPreferences, margins: np.ndarray | None = None
) -> EncodedDPOPairs:
    """Tokenize ``prefs`` for ``policy``; a row of a user the policy does not know raises,
    naming the row's file, line and user (nothing trains on another user's adapter).

    A plain-text row is a prompt and two responses (:meth:`PersonalizedPolicy.encode`); a
    conversational row (TRL message lists, :attr:`TextPreferences.messages`) is tokenized from
    its messages as TRL's ``DPOTrainer`` tokenizes conversational data
    (:meth:`PersonalizedPolicy.encode_conversation`), and its entry of ``prompts`` is its prompt
    messages (what the KL estimate samples from). Conversational rows need a policy whose
    tokenizer has a chat template."""
    if prefs.n == 0:
        raise PluralignError("no preference rows to train or evaluate on")
    if getattr(prefs, "conversational", False) and not policy.uses_chat_template:
        raise ConfigError(NO_TEMPLATE)
    users = [str(u.item() if isinstance(u, np.generic) else u) for u in prefs.users]
    position = {u: i for i, u in enumerate(policy.user_ids)}
    index = np.empty(len(users), dtype=np.int64)
    for i, u in enumerate(users):
        if u not in position and policy.share != "pooled":
            raise DataValidationError(
                f"unknown user {u!r}: the policy has adapters for {policy.n_users} users",
                field="user_id",
                **_where(prefs, i),
            )
        index[i] = position.get(u, 0)
    if margins is not None:
        margins = np.asarray(margins, dtype=np.float64)
        if margins.shape != (prefs.n,) or not np.isfinite(margins).all():
            raise PluralignError(
                f"margins must be {prefs.n} finite numbers, one per row; got shape {margins.shape}"
            )
    messages = getattr(prefs, "messages", None) or [None] * prefs.n
    plain = [i for i, parts in enumerate(messages) if parts is None]
    chosen: list[Any] = [None] * prefs.n
    rejected: list[Any] = [None] * prefs.n
    cut = 0
    if plain:
        for side, texts in ((chosen, prefs.chosen), (rejected, prefs.rejected)):
            rows = policy.encode(
                [prefs.prompts[i] for i in plain], [texts[i] for i in plain], rows=plain
            )
            cut += policy.truncated_
            for i, row in zip(plain, rows, strict=True):
                side[i] = row
    for i, parts in enumerate(messages):
        if parts is None:
            continue
        prompt, good, bad = parts
        try:
            chosen[i], rejected[i] = policy.encode_conversation(prompt, [good, bad])
        except PluralignError as err:
            raise DataValidationError(str(err), **_where(prefs, i)) from None
        cut += policy.truncated_
    policy.truncated_ = cut
    _warn_truncated(policy, "preference responses")
    return EncodedDPOPairs(
        prompts=row_prompts(prefs),
        chosen=chosen,
        rejected=rejected,
        user_index=index,
        users=users,
        margins=margins,
    )


class DPOTrainer(LoRATrainer):
    """DPO (or IPO, or GSHF's pessimistic DPO) of a :class:`~pluralign.llm.PersonalizedPolicy`
    against its adapters-off reference (module docstring).

    TRL's ``DPOConfig`` is transformers' ``TrainingArguments`` plus the DPO settings; here
    the training settings are ``args`` (a :class:`~pluralign.llm.config.TrainingConfig` or a
    mapping of its keys, as for :class:`~pluralign.llm.trainer.RewardTrainer`) and the DPO
    settings are keywords of TRL's names (``beta``, ``loss_type``,
    ``precompute_ref_log_probs``), which are also the keys of ``train-policy``'s ``dpo``
    section (:class:`~pluralign.llm.config.DPOConfig`; its ``reward_model`` and ``pessimism``
    make the margins that :meth:`fit` takes)::

        DPOTrainer(args=TrainingConfig(num_train_epochs=2, learning_rate=5e-3), beta=0.1)

    Without ``args`` the loop's defaults are one epoch at ``lr=5e-4``; with ``args`` they are
    the section's (``train-policy``'s: 3 epochs at 1e-3).

    Parameters
    ----------
    args:
        The training settings (:class:`~pluralign.llm.trainer.LoRATrainer`).
    beta:
        The KL strength β (GSHF's η): ``β log π/π0`` is the implicit reward.
    loss_type:
        ``"sigmoid"``, ``"ipo"`` or ``"pessimistic"`` (``fit`` then needs ``margins``).
    precompute_ref_log_probs:
        Compute every pair's ``log π0`` once before training (one reference pass over the
        data, TRL's option of the same name) instead of in every step of every epoch: the
        same numbers, since π0 is fixed; pairs whose :class:`EncodedDPOPairs` already carry
        ``reference_logps`` never run the reference pass.
    kl_samples, kl_max_prompts, kl_max_new_tokens:
        Evaluation estimates ``KL(π_u‖π0)`` per user as the mean of ``log π_u(y) − log π0(y)``
        over ``kl_samples`` responses sampled from ``π_u`` (temperature 1, no top-k/top-p) for
        each of at most ``kl_max_prompts`` prompts of the user; ``kl_samples=0`` skips it.
    **kwargs:
        The loop's settings (:class:`~pluralign.llm.trainer.LoRATrainer`: ``epochs``, ``lr``,
        ``batch_size``, ``grad_accum``, checkpoints, ...).

    After :meth:`fit`: as :class:`LoRATrainer`, with ``evaluation_`` from :meth:`evaluate`.
    """

    _DEFAULTS: ClassVar[dict[str, Any]] = {"epochs": 1, "lr": 5e-4}

    def __init__(
        self,
        *,
        args: TrainingConfig | Mapping[str, Any] | None = None,
        beta: float = _DPO["beta"],
        loss_type: str = _DPO["loss_type"],
        kl_samples: int = _DPO["kl_samples"],
        kl_max_prompts: int = 8,
        kl_max_new_tokens: int = 64,
        precompute_ref_log_probs: bool = _DPO["precompute_ref_log_probs"],
        **kwargs: Any,
    ) -> None:
        super().__init__(args=args, **kwargs)
        self.beta = beta
        self.loss_type = loss_type
        self.kl_samples = kl_samples
        self.kl_max_prompts = kl_max_prompts
        self.kl_max_new_tokens = kl_max_new_tokens
        self.precompute_ref_log_probs = precompute_ref_log_probs

    def _check(self) -> None:
        """The loop's checks, then the DPO keywords': those of ``dpo`` section settings by
        that setting's check (:class:`~pluralign.llm.config.DPOConfig`), strict."""
        from pluralign.settings import check_int

        super()._check()
        for key in ("beta", "loss_type", "kl_samples"):
            DPOConfig.check_value(key, getattr(self, key))
        check_int("kl_max_prompts", self.kl_max_prompts)
        check_int("kl_max_new_tokens", self.kl_max_new_tokens)
        DPOConfig.check_value("precompute_ref_log_probs", self.precompute_ref_log_probs)

    def _loss_settings(self) -> dict[str, Any]:
        return {"beta": self.beta, "loss_type": self.loss_type}

    def fit(
        self,
        policy: PersonalizedPolicy,
        train: TextPreferences,
        eval: TextPreferences | None = None,
        *,
        margins: np.ndarray | None = None,
        eval_margins: np.ndarray | None = None,
    ) -> DPOTrainer:
        """Train ``policy``'s adapters in place on ``train``; evaluate per user on ``eval``.

        ``margins`` (``Γ_w − Γ_l`` per training row) are required by ``loss_type=
        "pessimistic"`` and refused otherwise (they would be silently ignored)."""
        self._check()
        if (self.loss_type == "pessimistic") != (margins is not None):
            raise ConfigError(
                "loss_type='pessimistic' needs margins (Γ_w − Γ_l per row, "
                "pluralign.llm.uncertainty.pessimism_margins)"
                if margins is None
                else f"margins given but loss_type={self.loss_type!r} does not "
                "use them; set loss_type='pessimistic'"
            )
        data = encode_dpo_pairs(policy, train, margins)
        missing = sorted(set(policy.user_ids) - set(data.users))
        if missing and policy.share != "pooled":
            raise PluralignError(
                f"{len(missing)} user(s) of the policy have no training rows: {missing[:10]}"
            )
        eval_data = (
            encode_dpo_pairs(
                policy, eval, eval_margins if self.loss_type == "pessimistic" else None
            )
            if eval is not None and eval.n
            else None
        )
        if eval_data is not None and self.loss_type == "pessimistic" and eval_margins is None:
            eval_data = EncodedDPOPairs(
                **{**eval_data.__dict__, "margins": np.zeros(len(eval_data))}
            )
        if self.precompute_ref_log_probs:
            data = data.with_reference(reference_logprobs(policy, data, batch_size=self.batch_size))
            if eval_data is not None:
                eval_data = eval_data.with_reference(
                    reference_logprobs(policy, eval_data, batch_size=self.batch_size)
                )
        return self.fit_encoded(policy, data, eval_data)

    def _row_losses(
        self,
        wrapped: Any,
        policy: PersonalizedPolicy,
        data: EncodedDPOPairs,
        rows: list[int],
        device: torch.device,
    ) -> torch.Tensor:
        return self._row_outputs(wrapped, policy, data, rows, device)[0]

    def _row_outputs(
        self,
        wrapped: Any,
        policy: PersonalizedPolicy,
        data: EncodedDPOPairs,
        rows: list[int],
        device: torch.device,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each pair's loss and its implicit-reward accuracy (``h_w > h_l``; a tie counts
        one half), logged as ``accuracy``."""
        batch = {k: v.to(device) for k, v in data.batch(rows, policy).items()}
        margins = batch.pop("margins")
        reference = batch.pop("reference_logps", None)
        logps, tokens = wrapped(**batch)
        if reference is None:
            reference, _ = policy.sequence_logprobs(
                **{k: v for k, v in batch.items() if k != "user_index"}, reference=True
            )
        k = len(rows)
        ratios = logps - reference.to(logps.dtype)
        losses = dpo_loss(
            ratios[:k],
            ratios[k:],
            beta=self.beta,
            loss_type=self.loss_type,
            chosen_tokens=tokens[:k],
            rejected_tokens=tokens[k:],
            margins=margins if self.loss_type == "pessimistic" else None,
        )
        margin = (ratios[:k] - ratios[k:]).detach()
        accuracy = (margin > 0).to(torch.float64) + 0.5 * (margin == 0).to(torch.float64)
        return losses, {"accuracy": accuracy}

    @torch.no_grad()
    def evaluate(
        self,
        policy: PersonalizedPolicy,
        data: EncodedDPOPairs | TextPreferences,
        accelerator: Any = None,
    ) -> dict[str, Any]:
        """Per user and overall: implicit-reward accuracy (``β h_w > β h_l``; a tie counts
        one half), mean loss, mean implicit-reward margin ``β (h_w − h_l)``, and
        ``KL(π_u‖π0)`` estimated on samples (class docstring). Every process computes the
        same numbers (the sampling is seeded), so no gather is needed."""
        if isinstance(data, TextPreferences):
            pair_margins = np.zeros(data.n) if self.loss_type == "pessimistic" else None
            data = encode_dpo_pairs(policy, data, pair_margins)
        was_training = policy.training
        policy.train(False)
        device = policy.device
        chosen, rejected, losses = [], [], []
        try:
            for start in range(0, len(data), self.batch_size):
                rows = list(range(start, min(len(data), start + self.batch_size)))
                batch = {k: v.to(device) for k, v in data.batch(rows, policy).items()}
                margins = batch.pop("margins")
                reference = batch.pop("reference_logps", None)
                logps, tokens = policy(**batch)
                if reference is None:
                    plain = {k: v for k, v in batch.items() if k != "user_index"}
                    reference, _ = policy.sequence_logprobs(**plain, reference=True)
                ratios = logps.double() - reference.double()
                k = len(rows)
                losses.append(
                    dpo_loss(
                        ratios[:k],
                        ratios[k:],
                        beta=self.beta,
                        loss_type=self.loss_type,
                        chosen_tokens=tokens[:k],
                        rejected_tokens=tokens[k:],
                        margins=margins.double() if self.loss_type == "pessimistic" else None,
                    ).cpu()
                )
                chosen.append(ratios[:k].cpu())
                rejected.append(ratios[k:].cpu())
            kl = self._kl_per_user(policy, data)
        finally:
            policy.train(was_training)
        return dpo_metrics(
            self.beta * torch.cat(chosen).numpy(),
            self.beta * torch.cat(rejected).numpy(),
            torch.cat(losses).numpy(),
            data.users,
            kl,
        )

    def _kl_per_user(self, policy: PersonalizedPolicy, data: EncodedDPOPairs) -> dict[str, float]:
        if not self.kl_samples:
            return {}
        prompts: dict[str, list[str | list[dict]]] = {}
        for prompt, u in zip(data.prompts, data.users, strict=True):
            mine = prompts.setdefault(u, [])
            if prompt not in mine and len(mine) < self.kl_max_prompts:
                mine.append(prompt)
        flat_prompts = [p for u in prompts for p in prompts[u]]
        flat_users = [u for u in prompts for _ in prompts[u]]
        samples = policy.generate(
            flat_prompts,  # type: ignore[arg-type]  # conversational prompts too (prompt_ids)
            flat_users,
            n=self.kl_samples,
            max_new_tokens=self.kl_max_new_tokens,
            seed=self.seed,
            batch_size=self.batch_size,
        )
        p, ids, users = samples.flat()
        gap = policy.logprobs(p, ids, users, batch_size=self.batch_size) - policy.logprobs(
            p, ids, users, reference=True, batch_size=self.batch_size
        )
        users_arr = np.asarray(users)
        return {u: float(gap[users_arr == u].mean()) for u in prompts}


def dpo_metrics(
    chosen_rewards: np.ndarray,
    rejected_rewards: np.ndarray,
    losses: np.ndarray,
    users: Sequence[str],
    kl: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Implicit-reward accuracy, loss, margin and KL per user and overall, from the implicit
    rewards ``β h`` of the chosen and rejected responses."""
    margin = np.asarray(chosen_rewards) - np.asarray(rejected_rewards)
    correct = (margin > 0) + 0.5 * (margin == 0)
    users_arr = np.asarray(users)
    kl = kl or {}
    per_user = {}
    for u in dict.fromkeys(users_arr.tolist()):
        m = users_arr == u
        per_user[str(u)] = {
            "accuracy": float(correct[m].mean()),
            "loss": float(losses[m].mean()),
            "margin": float(margin[m].mean()),
            "chosen_reward": float(chosen_rewards[m].mean()),
            "rejected_reward": float(rejected_rewards[m].mean()),
            "kl": kl.get(str(u)),
            "n": int(m.sum()),
        }
    kls = [v for v in kl.values() if v is not None]
    return {
        "accuracy": float(correct.mean()),
        "loss": float(losses.mean()),
        "margin": float(margin.mean()),
        "mean_user_accuracy": float(np.mean([v["accuracy"] for v in per_user.values()])),
        "kl": float(np.mean(kls)) if kls else None,
        "n": len(margin),
        "per_user": per_user,
    }
