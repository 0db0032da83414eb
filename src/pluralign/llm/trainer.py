"""Bradley–Terry training of a personalized reward model, with accelerate.

The loss of a batch ``S`` of rows ``(x, y_c, y_r, u)`` is the mean negative log-likelihood
``−(1/|S|) Σ log σ(r_u(x, y_c) − r_u(x, y_r))`` (the objective of P-ShareLoRA, Liu et al.
2025, arXiv 2503.19201, eq. 4). Only the LoRA factors and the head are trained (AdamW).

**Processes.** The trainer runs under ``accelerate launch`` (several processes or GPUs) as well
as in a plain Python process. Every process draws the same seeded order of rows; each global
batch of ``batch_size`` rows is split across the processes, and each process scales its summed
loss so that, after DDP averages the gradients, the step uses the exact mean over the global
batch. Gradient accumulation over ``grad_accum`` micro-batches is done the same way (one
optimizer step per ``grad_accum · batch_size`` rows; DDP syncs only the last micro-batch). So
2 processes, or ``grad_accum=2`` with half the batch, train the same model as one process with
the full batch, up to floating-point summation order (a test checks this).

**Determinism and resume.** The row order of epoch ``e`` is a permutation drawn from
``(seed, e)``; before each micro-batch torch's global generator is reseeded from
``(seed, epoch, micro-batch, process)`` (LoRA dropout). A checkpoint holds the trainable tensors,
the optimizer state and where training stands; a resumed run continues from the last complete
checkpoint and produces the same model as an uninterrupted run. A checkpoint of different
hyper-parameters or data is refused.

**Logs.** Every ``logging_steps`` optimizer steps (and at the first and the last step) the loop
records an entry of ``log_history`` (transformers' ``Trainer`` layout: ``step``, ``epoch``,
``loss`` — the mean step loss since the previous entry —, ``learning_rate`` and the subclass's
training metrics, :meth:`LoRATrainer._row_outputs`), and after each epoch an entry of the
evaluation metrics (``eval_loss``, ``eval_accuracy``, …). With ``progress`` each entry is also a
plain line on stderr (above the progress bar on a terminal). With an ``output_dir`` the history
is written, atomically at every entry, to ``trainer_state.json`` and ``log.jsonl``; the
checkpoints hold it too, so a resumed run continues the same history (an entry written after
the checkpoint it resumes from is dropped and recorded again, not duplicated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from pluralign._atomic import atomic_write_text, fsync_dir
from pluralign._parse import parse_json, read_text
from pluralign.data.loaders import TextPreferences
from pluralign.errors import ConfigError, DataValidationError, PluralignError, PluralignWarning
from pluralign.llm._files import read_tensors, read_torch, write_bytes, write_tensors
from pluralign.llm.config import TrainingConfig
from pluralign.llm.data import EncodedPairs, encode_pairs
from pluralign.llm.reward_model import PersonalizedRewardModel
from pluralign.settings import INT_MAX, Section, check_string, resolve_sections, show

__all__ = [
    "ELSEWHERE",
    "LoRATrainer",
    "RewardTrainer",
    "adapt_user",
    "per_user_metrics",
    "training_arguments_table",
    "use_cpu",
]

SCHEDULES = ("constant", "linear")
# The largest lr and weight_decay accepted. AdamW's step size lr / (1 - β₁ᵗ) (at most 10·lr)
# and its decay factor 1 - lr·weight_decay must be representable as float32 (about 3.4e38),
# or torch raises an overflow error inside optimizer.step; far below that, any lr above 1
# already makes the first steps diverge, which the trainer reports (non-finite loss).
MAX_LR = 1e6


def use_cpu(cpu: bool = False) -> bool:
    """Whether accelerate should run on CPU: asked for, or no CUDA device. On a CPU-only machine
    this makes ``accelerate launch --multi_gpu --num_processes N`` start N CPU processes (gloo
    backend) instead of N copies that each think they are alone."""
    return bool(cpu) or not torch.cuda.is_available()


# ---------------------------------------------------------------------- args and keywords
class _Default:
    """A keyword's default in the trainers' signatures: ``__init__`` tells a keyword left out
    from one given with the default value (``args`` conflicts). It prints as its value, so
    ``help()`` and ``inspect.signature`` show the plain default. (A plain default cannot tell
    ``lr=1e-3`` given, which must agree with ``args``, from ``lr`` left out, and a ``None``
    sentinel would show ``None`` as every default.)"""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


# The defaults of the keywords that ``args`` also sets are TrainingConfig's (one source, so
# ``RewardTrainer()`` and ``RewardTrainer(args=TrainingConfig())`` are the same trainer)
_D: dict[str, Any] = {
    TrainingConfig.TRAINER_NAMES[name]: _Default(default)
    for name, default in TrainingConfig.defaults().items()
}


class _Elsewhere(NamedTuple):
    config: str  # where a train-rm / train-policy config has it
    python: str  # where the Python API has it
    note: str = ""


# Names of transformers' TrainingArguments (and TRL's configs) that are no TrainingConfig key,
# and where pluralign has them: an ``args`` mapping that holds one is refused with this hint,
# and docs/names.md lists them (training_arguments_table)
ELSEWHERE: dict[str, _Elsewhere] = {
    "per_device_train_batch_size": _Elsewhere(
        "train.train_batch_size",
        "batch_size=",
        "pluralign's batch is the global one, split across the processes",
    ),
    "output_dir": _Elsewhere("out", "output_dir=", "checkpoints and logs go there"),
    "resume_from_checkpoint": _Elsewhere(
        "--no-resume",
        "resume=",
        "a run resumes from the last checkpoint in its output folder unless resume=False",
    ),
    "save_strategy": _Elsewhere(
        "train.save_steps", "checkpoint_every=", "save_steps: epoch is save_strategy='epoch'"
    ),
    "eval_strategy": _Elsewhere(
        "—", "eval_every_epoch=", "the default, True, evaluates after every epoch"
    ),
    "bf16": _Elsewhere("—", "mixed_precision='bf16'", "or accelerate launch's option"),
    "fp16": _Elsewhere("—", "mixed_precision='fp16'", "or accelerate launch's option"),
    "use_cpu": _Elsewhere("—", "cpu=True", "also the default without CUDA"),
    "disable_tqdm": _Elsewhere("--no-progress", "progress=False", ""),
    "max_length": _Elsewhere(
        "model.max_length",
        "from_pretrained(max_length=)",
        "the model's token budget, not the trainer's (TRL's configs: 1024)",
    ),
}
# TRL's DPO settings that are DPOTrainer keywords of the same name (train-policy: dpo.NAME)
_DPO_KEYWORDS = ("beta", "loss_type", "precompute_ref_log_probs", "kl_samples")

# For docs/names.md (training_arguments_table): transformers' name where it is not the field's,
# transformers' TrainingArguments defaults and TRL's learning rates (tests/
# test_llm_trainer_args.py checks them against the installed libraries), and what differs
_HF_NAME = {"train_batch_size": "per_device_train_batch_size"}
_HF_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 3.0,
    "learning_rate": 5e-5,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "weight_decay": 0.0,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "max_grad_norm": 1.0,
    "seed": 42,
    "save_steps": 500,
    "save_total_limit": None,
    "max_steps": -1,
    "logging_steps": 500,
    "output_dir": None,
    "resume_from_checkpoint": None,
    "save_strategy": "steps",
    "eval_strategy": "no",
    "bf16": False,
    "fp16": False,
    "use_cpu": False,
    "disable_tqdm": None,
}
_TRL_LEARNING_RATES = {"RewardConfig": 1e-4, "DPOConfig": 1e-6, "SFTConfig": 2e-5}
_DIFFERS = {
    "num_train_epochs": "a whole number",
    "learning_rate": "TRL's configs: "
    + ", ".join(f"{k} {v:g}" for k, v in _TRL_LEARNING_RATES.items())
    + " (LoRA takes larger rates)",
    "train_batch_size": "the global batch, split across the processes of an accelerate run "
    "(transformers: per device), so 1 or N processes train the same model",
    "lr_scheduler_type": "constant or linear only",
    "max_grad_norm": "null (the default): no clipping",
    "seed": "also the row order of each epoch and the dropout of each micro-batch",
    "save_steps": "or epoch (transformers: save_strategy='epoch')",
    "save_total_limit": "transformers keeps all by default",
    "max_steps": "null: all epochs (transformers: -1); the schedule still spans all epochs, "
    "so a stopped run resumes to the same model",
    "logging_steps": "TRL's configs: 10; the first and the last step are always logged",
}


def _shown_default(value: Any, yaml: bool) -> str:
    if value is None:
        return "null" if yaml else "None"
    if isinstance(value, bool):
        return str(value).lower() if yaml else str(value)
    return value if isinstance(value, str) else repr(value)


def training_arguments_table() -> str:
    """The Markdown table of docs/names.md: each name of transformers' ``TrainingArguments``
    (which TRL's configs extend) with pluralign's config key and trainer keyword, generated
    from :class:`~pluralign.llm.config.TrainingConfig` (``TRAINER_NAMES``) and
    :data:`ELSEWHERE` (a test checks the docs hold it)."""
    from pluralign.llm.dpo import DPOTrainer

    lines = [
        "| transformers / TRL | transformers default | pluralign config / CLI | default "
        "| trainer keyword | what differs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def row(hf: str, config: str, default: str, keyword: str, note: str) -> None:
        hf_default = f"`{_shown_default(_HF_DEFAULTS[hf], False)}`" if hf in _HF_DEFAULTS else "—"
        lines.append(
            f"| `{hf}` | {hf_default} | {config} | {default} | {keyword} | "
            f"{note.replace('|', chr(92) + '|')} |"
        )

    for f in dataclasses.fields(TrainingConfig):
        keyword = TrainingConfig.TRAINER_NAMES[f.name]
        shown = f"`{keyword}=`"
        if keyword in DPOTrainer._DEFAULTS:
            shown += f" (DPOTrainer without args: {DPOTrainer._DEFAULTS[keyword]!r})"
        row(
            _HF_NAME.get(f.name, f.name),
            f"`train.{f.name}`",
            f"`{_shown_default(f.default, True)}`",
            shown,
            _DIFFERS.get(f.name, ""),
        )
    named = set(_HF_NAME.values())
    for hf, where in ELSEWHERE.items():
        if hf not in named:
            config = "—" if where.config == "—" else f"`{where.config}`"
            row(hf, config, "", f"`{where.python}`", where.note)
    return "\n".join(lines) + "\n"


def _training_args(owner: str, args: Any) -> tuple[TrainingConfig, set[str]]:
    """``args`` as a checked :class:`TrainingConfig` and the settings it names (a mapping: its
    keys; a TrainingConfig: all of them)."""
    fields = list(TrainingConfig.TRAINER_NAMES)
    if isinstance(args, TrainingConfig):
        return args, set(fields)
    if isinstance(args, Mapping):
        for key in args:
            if isinstance(key, str) and key in ELSEWHERE:
                where = ELSEWHERE[key]
                config = f" ({where.config})" if where.config != "—" else ""
                note = f"; {where.note}" if where.note else ""
                raise ConfigError(
                    f"unknown key {key!r} in 'train': pluralign has it as "
                    f"{where.python}{config}{note}"
                )
            if isinstance(key, str) and key in _DPO_KEYWORDS:
                raise ConfigError(
                    f"unknown key {key!r} in 'train': a DPO setting, given as "
                    f"DPOTrainer({key}=...) (train-policy: dpo.{key}); args "
                    "holds the training settings"
                )
        return resolve_sections({"train": dict(args)}, {"train": TrainingConfig})["train"], set(
            args
        )
    kind = type(args).__name__
    hint = (
        f"a {kind} is the {args.SECTION!r} section, not the training settings"
        if isinstance(args, Section)
        else "transformers' and TRL's argument classes are not read: their names map to "
        "pluralign's in docs/names.md"
        if kind.endswith(("Arguments", "Config"))
        else ""
    )
    raise ConfigError(
        f"{owner}: args must be a pluralign.llm.config.TrainingConfig or a "
        f"mapping of its settings ({', '.join(fields)}), got {kind}" + (f"; {hint}" if hint else "")
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _loop_settings(cls: type[LoRATrainer], args: Any, keywords: dict[str, Any]) -> dict[str, Any]:
    """The trainer's settings from ``args`` and its keywords (:class:`LoRATrainer`, ``args``):
    a setting that ``args`` names comes from ``args``, and a keyword given for it too must
    agree; the others are the keywords given, else their defaults (with ``args``: the
    TrainingConfig's, without: the trainer's)."""
    given = {k: v for k, v in keywords.items() if not isinstance(v, _Default)}
    out = {
        k: cls._DEFAULTS.get(k, v.value) if isinstance(v, _Default) else v
        for k, v in keywords.items()
    }
    if args is None:
        return out
    section, named = _training_args(cls.__name__, args)
    for field, keyword in TrainingConfig.TRAINER_NAMES.items():
        value = getattr(section, field)
        if keyword in given and field not in named:
            continue
        if keyword in given and not _same(given[keyword], value):
            fix = (
                f"leave {field} out of args, or drop {keyword}="
                if isinstance(args, Mapping)
                else "a TrainingConfig holds every setting (its default unless set), so "
                f"change it there (dataclasses.replace(args, {field}="
                f"{show(given[keyword])})) or drop {keyword}="
            )
            raise ConfigError(
                f"{cls.__name__} got both args.{field}={show(value)} and "
                f"{keyword}={show(given[keyword])}: give each setting once; {fix}"
            )
        out[keyword] = value
    return out


T = TypeVar("T", bound="LoRATrainer")


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one training run works on (:meth:`LoRATrainer.fit_encoded`): the model, its
    accelerate-prepared copy, the optimizer and the tensors it trains, the rows, and the run's
    layout in optimizer steps (``stop``: ``max_steps`` or the end of the last epoch)."""

    model: Any
    wrapped: Any
    optimizer: Any
    params: list[tuple[str, torch.nn.Parameter]]
    accelerator: Any
    world: int
    rank: int
    device: torch.device
    data: Any
    eval_data: Any
    steps_per_epoch: int
    total_steps: int
    stop: int
    fingerprint: dict[str, Any]
    ckpt_dir: Path | None


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def per_user_metrics(margins: np.ndarray, users: Sequence[str] | np.ndarray) -> dict[str, Any]:
    """Pairwise accuracy (``r_c > r_r``; a tie counts one half) and mean BT loss, per user and
    overall (``accuracy`` over rows, ``mean_user_accuracy`` over users)."""
    margins = np.asarray(margins, dtype=np.float64)
    users = np.asarray(users)
    correct = (margins > 0) + 0.5 * (margins == 0)
    loss = np.logaddexp(0.0, -margins)
    per_user = {}
    for u in dict.fromkeys(users.tolist()):
        m = users == u
        per_user[str(u)] = {
            "accuracy": float(correct[m].mean()),
            "loss": float(loss[m].mean()),
            "n": int(m.sum()),
        }
    return {
        "accuracy": float(correct.mean()) if len(margins) else float("nan"),
        "loss": float(loss.mean()) if len(margins) else float("nan"),
        "mean_user_accuracy": float(np.mean([v["accuracy"] for v in per_user.values()]))
        if per_user
        else float("nan"),
        "n": len(margins),
        "per_user": per_user,
    }


class LoRATrainer:
    """The training loop shared by :class:`RewardTrainer` and
    :class:`~pluralign.llm.DPOTrainer`: LoRA factors (and a reward head) trained with AdamW
    under accelerate, with the batching, accumulation, checkpoints and resume of the module
    docstring. A subclass defines ``_row_losses`` (the loss of each row of a micro-batch),
    ``evaluate`` and ``fit`` (which encodes its rows and calls :meth:`fit_encoded`, the loop);
    it may override ``_row_outputs`` to log training metrics (such as ``accuracy``) computed in
    the same forward pass.

    Parameters
    ----------
    args:
        The training settings in transformers' ``TrainingArguments`` names, as TRL's trainers
        take them: a :class:`~pluralign.llm.config.TrainingConfig` (the ``train`` section of
        ``train-rm`` and ``train-policy``) or a mapping of its keys, checked by that section
        (the errors of a YAML config: ``train.learning_rate must be ...``). Each of its
        settings replaces a keyword below (``num_train_epochs`` → ``epochs``,
        ``learning_rate`` → ``lr``, …: ``TrainingConfig.TRAINER_NAMES``, docs/names.md); a
        mapping's missing keys take the keyword if given, else the section's default, so
        ``args={}`` is ``args=TrainingConfig()``. A keyword given as well must agree with
        ``args`` (a :class:`ConfigError` names both); the keywords ``args`` has no setting for
        (``output_dir``, ``resume``, ``progress``, ...) are given as keywords.
    epochs, lr, batch_size:
        Passes over the data, AdamW learning rate, rows (pairs) per global batch.
    grad_accum:
        Micro-batches per optimizer step.
    weight_decay:
        AdamW's decoupled weight decay on the trainable tensors.
    schedule, warmup_steps:
        ``"constant"`` or ``"linear"`` decay to zero, after a linear warm-up.
    max_grad_norm:
        Gradient clipping (``None``: off).
    seed:
        Row order and dropout (module docstring).
    output_dir:
        Where checkpoints go (``output_dir/checkpoints``); ``None``: no checkpoints.
    checkpoint_every:
        Optimizer steps between checkpoints, or ``"epoch"``.
    keep_checkpoints:
        How many recent checkpoints to keep.
    resume:
        Continue from the last checkpoint in ``output_dir`` if there is one.
    max_steps:
        Stop after this many optimizer steps in total (``None``: run all epochs); the learning
        rate schedule still spans all epochs, so a stopped run resumes to the same model.
    eval_every_epoch:
        Evaluate on the evaluation rows after every epoch (the default; else only at the end):
        the metrics go into ``history_`` and, as ``eval_*`` entries, into ``log_history_``.
    progress:
        Show a progress bar on stderr when it is a terminal, and print the log lines (module
        docstring) on stderr either way (on the main process).
    logging_steps:
        Optimizer steps between log entries (transformers' ``logging_steps``); the first and
        the last step are always logged.
    cpu, mixed_precision:
        Passed to ``accelerate.Accelerator`` (``accelerate launch`` options take precedence).

    After :meth:`fit`: ``history_`` (per-epoch loss and evaluation), ``log_history_`` (the
    entries of the module docstring, also in ``output_dir/trainer_state.json`` and
    ``output_dir/log.jsonl``), ``evaluation_`` (the final :func:`per_user_metrics` of the
    evaluation rows, or of the training rows without them), ``train_evaluation_``,
    ``global_step_``, ``resumed_from_``.
    """

    # defaults of the keywords above that a subclass changes (DPOTrainer: one epoch at 5e-4);
    # with ``args`` the section's defaults apply instead
    _DEFAULTS: ClassVar[dict[str, Any]] = {}

    # the settings of ``args`` or the keywords, set by ``__init__`` (one ``setattr`` loop)
    epochs: int
    lr: float
    batch_size: int
    grad_accum: int
    weight_decay: float
    schedule: str
    warmup_steps: int
    max_grad_norm: float | None
    seed: int
    checkpoint_every: int | str
    keep_checkpoints: int
    max_steps: int | None
    logging_steps: int

    # defined by each subclass (the class docstring)
    _row_losses: Callable[..., torch.Tensor]
    evaluate: Callable[..., dict[str, Any]]

    def __init__(
        self,
        *,
        args: TrainingConfig | Mapping[str, Any] | None = None,
        epochs: int = _D["epochs"],
        lr: float = _D["lr"],
        batch_size: int = _D["batch_size"],
        grad_accum: int = _D["grad_accum"],
        weight_decay: float = _D["weight_decay"],
        schedule: str = _D["schedule"],
        warmup_steps: int = _D["warmup_steps"],
        max_grad_norm: float | None = _D["max_grad_norm"],
        seed: int = _D["seed"],
        output_dir: str | Path | None = None,
        checkpoint_every: int | str = _D["checkpoint_every"],
        keep_checkpoints: int = _D["keep_checkpoints"],
        resume: bool = True,
        max_steps: int | None = _D["max_steps"],
        eval_every_epoch: bool = True,
        progress: bool = True,
        cpu: bool = False,
        mixed_precision: str = "no",
        logging_steps: int = _D["logging_steps"],
    ) -> None:
        settings = _loop_settings(
            type(self),
            args,
            {
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size,
                "grad_accum": grad_accum,
                "weight_decay": weight_decay,
                "schedule": schedule,
                "warmup_steps": warmup_steps,
                "max_grad_norm": max_grad_norm,
                "seed": seed,
                "checkpoint_every": checkpoint_every,
                "keep_checkpoints": keep_checkpoints,
                "max_steps": max_steps,
                "logging_steps": logging_steps,
            },
        )
        # the settings of ``args`` (TrainingConfig.TRAINER_NAMES' keywords), then the others
        for keyword, value in settings.items():
            setattr(self, keyword, value)
        self.output_dir = output_dir
        self.resume = resume
        self.eval_every_epoch = eval_every_epoch
        self.progress = progress
        self.cpu = cpu
        self.mixed_precision = mixed_precision

    # ------------------------------------------------------------------ checks
    def _check(self) -> None:
        """Refuse bad settings before any work (scikit-learn style: ``__init__`` only stores
        them). Each setting of ``args`` is checked by its ``train`` field's own check
        (:class:`~pluralign.llm.config.TrainingConfig`, the one check of ``train-rm``'s and
        ``train-policy``'s configs), named by its keyword and strict (a number written as a
        string is refused here; a config file may hold one): a non-finite or non-positive
        ``lr`` would train to NaN, and a negative ``warmup_steps`` makes the warm-up factor
        ``(step + 1) / warmup_steps`` negative, i.e. gradient *ascent*; ``bool`` is refused
        where a number is expected."""
        for field, keyword in TrainingConfig.TRAINER_NAMES.items():
            TrainingConfig.check_value(field, getattr(self, keyword), name=keyword)
        if self.output_dir is not None:
            check_string("output_dir", self.output_dir)

    def _fingerprint(
        self, data: EncodedPairs, model: PersonalizedRewardModel, trainable: str
    ) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "max_grad_norm": self.max_grad_norm,
            "seed": self.seed,
            "data": data.fingerprint(),
            "users": list(model.user_ids),
            "share": model.share,
            "trainable": trainable,
            "shapes": {n: list(p.shape) for n, p in model.trainable_named_parameters()},
            **self._loss_settings(),
        }

    def _loss_settings(self) -> dict[str, Any]:
        """Settings of the subclass's loss that a resumed run must share (its fingerprint)."""
        return {}

    # ------------------------------------------------------------------ schedule
    def _micro_batches(self, n: int, epoch: int, world: int) -> list[list[int]]:
        order = np.random.default_rng(_seed(self.seed, epoch)).permutation(n)
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if batches and len(batches[-1]) < world:  # every process needs at least one row
            batches.pop()
        return batches

    def _lr_at(self, step: int, total: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.schedule == "linear":
            return self.lr * warm * max(0.0, 1.0 - step / max(total, 1))
        return self.lr * warm

    # ------------------------------------------------------------------ fit
    def fit_encoded(
        self: T,
        model: Any,
        data: Any,
        eval_data: Any = None,
        *,
        trainable: str = "all",
        user: int | None = None,
    ) -> T:
        """Train ``model`` in place on rows already encoded for it (:class:`EncodedPairs`,
        :class:`~pluralign.llm.dpo.EncodedDPOPairs`, ...) with the loop of the module
        docstring, evaluating on ``eval_data`` (``None``: the training rows); ``fit`` encodes
        its rows and calls this. Unlike ``fit`` it does not require every user of the model
        to have rows (:func:`adapt_user`, a round of ``pluralign iterate``).
        ``trainable="all"`` trains every LoRA factor (and a reward head); ``"user"`` only
        user index ``user``'s own factors, the other users' rows of them masked out.

        The jobs of one run: :meth:`_start` (accelerate, the optimizer, the run's layout),
        :meth:`_resume_checkpoint`, :meth:`_open_log`; per optimizer step
        :meth:`_batch_loss` (the loss and gradients of one global batch) and
        :meth:`_optimizer_step`; per epoch :meth:`_end_epoch`; :meth:`_save_due` and
        :meth:`_save`; and :meth:`_finish` (the final evaluations)."""
        self._check()
        run, hooks = self._start(model, data, eval_data, trainable, user)
        state = self._resume_checkpoint(run)
        history: list[dict[str, Any]] = state["history"]
        step = state["global_step"]
        log = self._open_log(run, state)
        try:
            for epoch in range(state["epoch"], self.epochs):
                groups = self._groups(len(data), epoch, run.world)
                start = state["group"] if epoch == state["epoch"] else 0
                losses = list(state.get("epoch_losses", [])) if start else []
                for g in range(start, len(groups)):
                    if step >= run.stop:
                        break
                    n_rows = sum(len(b) for b in groups[g])
                    loss, metric_sums = self._batch_loss(run, groups[g], epoch, g, n_rows)
                    lr = self._optimizer_step(run, epoch, step, loss)
                    step += 1
                    losses.append(loss)
                    log.progress.advance(epoch, loss)
                    log.add_step(loss, n_rows, metric_sums)
                    logged = log.due(step)
                    if logged:
                        log.log_train(step, lr)
                    last_group = g == len(groups) - 1
                    if last_group:
                        logged = self._end_epoch(run, epoch, step, losses, history, log) or logged
                        losses = []
                    if logged:
                        log.write(step)
                    if self._save_due(run, step, last_group):
                        self._save(run, step, epoch, g, last_group, history, losses, log)
                if step >= run.stop:
                    break
        finally:
            log.progress.close()
            for hook in hooks:
                hook.remove()
        log.write(step)
        return self._finish(run, history, log, step)

    def _start(
        self, model: Any, data: Any, eval_data: Any, trainable: str, user: int | None
    ) -> tuple[_Run, list]:
        """The run: accelerate, the trainable tensors (and the gradient hooks of
        ``trainable="user"``, to remove after training), AdamW, the layout in optimizer steps
        and the checkpoint fingerprint."""
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=use_cpu(self.cpu), mixed_precision=self.mixed_precision)
        world = accelerator.num_processes
        params, hooks = _select_trainable(model, trainable, user)
        optimizer = torch.optim.AdamW(
            [p for _, p in params], lr=self.lr, weight_decay=self.weight_decay
        )
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        # every epoch has the same number of micro-batches (only their rows differ), so the
        # schedule is known without drawing all epochs' orders up front
        n_batches = len(self._micro_batches(len(data), 0, world))
        steps_per_epoch = math.ceil(n_batches / self.grad_accum)
        total_steps = self.epochs * steps_per_epoch
        run = _Run(
            model=model,
            wrapped=wrapped,
            optimizer=optimizer,
            params=params,
            accelerator=accelerator,
            world=world,
            rank=accelerator.process_index,
            device=accelerator.device,
            data=data,
            eval_data=eval_data,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            stop=self.max_steps if self.max_steps is not None else total_steps,
            fingerprint=self._fingerprint(
                data, model, trainable if user is None else f"{trainable}:{model.user_ids[user]}"
            ),
            ckpt_dir=Path(self.output_dir) / "checkpoints" if self.output_dir else None,
        )
        return run, hooks

    def _groups(self, n: int, epoch: int, world: int) -> list[list[list[int]]]:
        """Epoch ``epoch``'s micro-batches, ``grad_accum`` to an optimizer step."""
        batches = self._micro_batches(n, epoch, world)
        return [batches[i : i + self.grad_accum] for i in range(0, len(batches), self.grad_accum)]

    # ------------------------------------------------------------------ checkpoints
    def _resume_checkpoint(self, run: _Run) -> dict[str, Any]:
        """Where training stands: loaded (into the model and the optimizer) from the last
        intact checkpoint of ``output_dir`` when resuming (:func:`_resume`; damaged ones are
        set aside), else the start; sets ``resumed_from_``."""
        state: dict[str, Any] = {"epoch": 0, "group": 0, "global_step": 0, "history": []}
        self.resumed_from_ = None
        if run.ckpt_dir is not None and self.resume:
            loaded, path, damaged = _resume(
                run.ckpt_dir,
                run.model,
                run.optimizer,
                run.fingerprint,
                (self.epochs, run.steps_per_epoch),
                self.schedule,
            )
            run.accelerator.wait_for_everyone()  # every process has read the files
            if run.accelerator.is_main_process:
                _set_aside(damaged)
            if loaded is not None:
                state = loaded
                self.resumed_from_ = str(path)
        return state

    def _save_due(self, run: _Run, step: int, last_group: bool) -> bool:
        """Whether a checkpoint is written after ``step``: every ``checkpoint_every`` steps
        (or at the end of each epoch) and at the last step of the run."""
        every = self.checkpoint_every
        return run.ckpt_dir is not None and (
            (every == "epoch" and last_group)
            or step >= run.stop
            or (every != "epoch" and step % every == 0)  # type: ignore[operator]  # an int here
        )

    def _save(
        self,
        run: _Run,
        step: int,
        epoch: int,
        g: int,
        last_group: bool,
        history: list[dict[str, Any]],
        losses: list[float],
        log: _TrainLog,
    ) -> None:
        """Checkpoint ``step`` (after group ``g`` of ``epoch``): the trainable tensors, the
        optimizer state and where training stands (:func:`_save_checkpoint`)."""
        snapshot = {
            "epoch": epoch + 1 if last_group else epoch,
            "group": 0 if last_group else g + 1,
            "global_step": step,
            "history": history,
            "epoch_losses": losses,
            "log_history": log.history,
            "log_pending": log.pending,
            "fingerprint": run.fingerprint,
            "epochs": self.epochs,
            "total_steps": run.total_steps,
        }
        _save_checkpoint(
            run.ckpt_dir,  # type: ignore[arg-type]  # set: _save runs only when _save_due
            step,
            run.model,
            run.optimizer,
            snapshot,
            run.accelerator,
            self.keep_checkpoints,
        )

    # ------------------------------------------------------------------ logging
    def _open_log(self, run: _Run, state: dict[str, Any]) -> _TrainLog:
        """The run's log (module docstring), continuing a resumed run's history, with its
        progress bar; rewrites the log files (dropping what a killed run logged after the
        checkpoint it resumes from)."""
        step = state["global_step"]
        main = run.accelerator.is_main_process
        last = min(run.stop, run.total_steps)
        progress = _Progress(self.progress and main, last, step)
        log = _TrainLog(
            self.logging_steps,
            run.steps_per_epoch,
            last,
            step,
            state.get("log_history", []),
            state.get("log_pending"),
            progress,
            Path(self.output_dir) if self.output_dir and main else None,
            {
                "num_train_epochs": self.epochs,
                "save_steps": self.checkpoint_every,
                "train_batch_size": self.batch_size,
            },
        )
        if self.resumed_from_ is not None:
            progress.line(f"train resumed at step {step}/{log.last} from {self.resumed_from_}")
        log.write(step)  # drops what a killed run logged after its checkpoint
        return log

    def _end_epoch(
        self,
        run: _Run,
        epoch: int,
        step: int,
        losses: list[float],
        history: list[dict[str, Any]],
        log: _TrainLog,
    ) -> bool:
        """The end of ``epoch``: its evaluation (``eval_every_epoch``) and its record in
        ``history``; whether an evaluation entry was logged."""
        metrics = (
            self.evaluate(run.model, run.eval_data, run.accelerator)
            if run.eval_data is not None and self.eval_every_epoch
            else None
        )
        history.append(self._epoch_record(epoch, step, losses, metrics))
        if metrics is None:
            return False
        log.log_eval(step, metrics)
        return True

    # ------------------------------------------------------------------ one step
    def _batch_loss(
        self, run: _Run, group: list[list[int]], epoch: int, g: int, n_rows: int
    ) -> tuple[float, dict[str, float]]:
        """The loss of one global batch (the ``n_rows`` rows of ``group``'s micro-batches,
        group ``g`` of ``epoch``), its gradients accumulated (module docstring: each process
        its share of each micro-batch, scaled so that DDP's average is the global mean; DDP
        syncs only the last micro-batch), and the sums over the rows of the training metrics,
        all summed over the processes."""
        run.wrapped.train()
        loss_sum = 0.0
        metric_sums: dict[str, float] = {}
        for m, rows in enumerate(group):
            torch.manual_seed(_seed(self.seed, epoch, g, m, run.rank))
            local = rows[run.rank :: run.world]
            row_losses, row_metrics = self._row_outputs(
                run.wrapped, run.model, run.data, local, run.device
            )
            loss = row_losses.sum() * (run.world / n_rows)
            if m == len(group) - 1:
                run.accelerator.backward(loss)
            else:
                with run.accelerator.no_sync(run.wrapped):
                    run.accelerator.backward(loss)
            loss_sum += float(row_losses.detach().sum())
            for name, values in row_metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + float(values.detach().sum())
        names = sorted(metric_sums)
        sums = run.accelerator.gather(
            torch.tensor([loss_sum] + [metric_sums[k] for k in names], device=run.device)
        )
        sums = sums.reshape(run.world, -1).sum(0).tolist()
        return sums[0] / n_rows, dict(zip(names, sums[1:], strict=True))

    def _optimizer_step(self, run: _Run, epoch: int, step: int, loss: float) -> float:
        """Optimizer step ``step + 1`` from the accumulated gradients (clipped to
        ``max_grad_norm``, at the scheduled learning rate, which it returns). A non-finite
        loss or gradient is not applied, and an update that makes a tensor non-finite is
        refused (the gradients are all-reduced, so every process decides the same)."""
        params = [p for _, p in run.params]
        bad = (
            f"the loss is {loss}"
            if not math.isfinite(loss)
            else f"a gradient is not finite (loss {loss:.4g})"
            if not _all_finite(p.grad for p in params)
            else None
        )
        if bad is not None:
            raise PluralignError(
                f"training diverged at epoch {epoch + 1}, step {step + 1}: {bad}; "
                "stopped before that step was applied, nothing was exported, and "
                "the checkpoints hold only finite states. Lower "
                "train.learning_rate (or weight_decay) or set train.max_grad_norm"
            )
        if self.max_grad_norm is not None:
            run.accelerator.clip_grad_norm_(params, self.max_grad_norm)
        lr = self._lr_at(step, run.total_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        if not _all_finite(params):
            raise PluralignError(
                f"training diverged at epoch {epoch + 1}, step {step + 1}: the "
                "update made a trainable tensor non-finite; nothing was exported "
                "or checkpointed from it. Lower train.learning_rate (or "
                "weight_decay) or set train.max_grad_norm"
            )
        return lr

    def _finish(self: T, run: _Run, history: list[dict[str, Any]], log: _TrainLog, step: int) -> T:
        """The fitted attributes: the histories and the final evaluations (module docstring)."""
        run.model.train(False)
        self.history_ = history
        self.log_history_ = log.history
        self.global_step_ = step
        self.train_evaluation_ = self.evaluate(run.model, run.data, run.accelerator)
        self.evaluation_ = (
            self.evaluate(run.model, run.eval_data, run.accelerator)
            if run.eval_data is not None
            else self.train_evaluation_
        )
        run.accelerator.wait_for_everyone()
        return self

    def _row_outputs(
        self, wrapped: Any, model: Any, data: Any, rows: list[int], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of each row of a micro-batch (``_row_losses``) and training metrics by
        name, one value per row (e.g. ``{"accuracy": ...}``): the loop averages each metric over
        the rows since the previous log entry and records it under its name. The default has
        no metrics; a subclass that gets them from the same forward pass overrides this."""
        return self._row_losses(wrapped, model, data, rows, device), {}

    def _epoch_record(
        self, epoch: int, step: int, losses: list[float], metrics: dict[str, Any] | None
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(np.mean(losses)) if losses else None,
        }
        if metrics is not None:
            record.update(
                eval_loss=metrics["loss"],
                eval_accuracy=metrics["accuracy"],
                eval_mean_user_accuracy=metrics["mean_user_accuracy"],
            )
        return record


class RewardTrainer(LoRATrainer):
    """Trains a :class:`~pluralign.llm.PersonalizedRewardModel` on preference rows by
    Bradley–Terry maximum likelihood (module docstring); the settings and the fitted
    attributes are :class:`LoRATrainer`'s. TRL's names (docs/names.md)::

        RewardTrainer(args=TrainingConfig(num_train_epochs=2, learning_rate=2e-3),
                      output_dir="runs/rm").fit(model, train_dataset, eval_dataset)

    is ``RewardTrainer(epochs=2, lr=2e-3, output_dir="runs/rm")``; the model and the data go
    to :meth:`fit` (TRL: to the constructor, then ``train()``), the tokenizer
    (``processing_class``) is the model's."""

    def fit(
        self,
        model: PersonalizedRewardModel,
        train: TextPreferences,
        eval: TextPreferences | None = None,
    ) -> RewardTrainer:
        """Train ``model`` in place on ``train``; evaluate per user on ``eval``.

        Every user of the model needs at least one training row (an adapter with no data would
        stay at its initialization): the users come from the data, not the other way round.
        """
        self._check()
        data = encode_pairs(model, train)
        missing = sorted(set(model.user_ids) - set(data.users))
        if missing:
            raise PluralignError(
                f"{len(missing)} user(s) of the model have no training rows: {missing[:10]}"
            )
        eval_data = encode_pairs(model, eval) if eval is not None and eval.n else None
        return self.fit_encoded(model, data, eval_data)

    def _row_losses(
        self,
        wrapped: Any,
        model: PersonalizedRewardModel,
        data: EncodedPairs,
        rows: list[int],
        device: torch.device,
    ) -> torch.Tensor:
        """``−log σ(r_u(x, y_c) − r_u(x, y_r))`` of each row."""
        return self._row_outputs(wrapped, model, data, rows, device)[0]

    def _row_outputs(
        self,
        wrapped: Any,
        model: PersonalizedRewardModel,
        data: EncodedPairs,
        rows: list[int],
        device: torch.device,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The BT loss of each row and its training ``accuracy`` (``r_c > r_r``; a tie counts
        one half, as in :func:`per_user_metrics`), from one forward pass."""
        batch = {k: v.to(device) for k, v in data.batch(rows, model).items()}
        rewards = wrapped(**batch)
        k = len(rows)
        margins = rewards[:k] - rewards[k:]
        correct = (margins > 0).to(margins.dtype) + 0.5 * (margins == 0).to(margins.dtype)
        return F.softplus(-margins), {"accuracy": correct}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self, model: PersonalizedRewardModel, data: EncodedPairs | TextPreferences, accelerator=None
    ) -> dict[str, Any]:
        """:func:`per_user_metrics` of ``model`` on ``data`` (rows split across processes)."""
        if isinstance(data, TextPreferences):
            data = encode_pairs(model, data)
        world = accelerator.num_processes if accelerator is not None else 1
        rank = accelerator.process_index if accelerator is not None else 0
        device = model.head.weight.device
        was_training = model.training
        model.train(False)
        rows = list(range(rank, len(data), world))
        margins: list[tuple[int, float]] = []
        for i in range(0, len(rows), self.batch_size):
            local = rows[i : i + self.batch_size]
            batch = {k: v.to(device) for k, v in data.batch(local, model).items()}
            r = model(**batch)
            k = len(local)
            margins.extend(zip(local, (r[:k] - r[k:]).double().cpu().tolist(), strict=True))
        model.train(was_training)
        if world > 1:
            from accelerate.utils import gather_object

            margins = gather_object(margins)
        by_row = dict(margins)
        values = np.array([by_row[i] for i in range(len(data))])
        return per_user_metrics(values, data.users)


def adapt_user(
    model: PersonalizedRewardModel,
    user: Any,
    train: TextPreferences,
    *,
    epochs: int = 30,
    lr: float = 5e-3,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> RewardTrainer:
    """Few-shot adaptation of a new user: register ``user`` (its factor starts at the mean of
    the existing users') and train only its own factor on its rows ``train``, with the shared
    factor, the other users and the head frozen (P-ShareLoRA §4.3).

    With ``share="B"`` the user's ``A_u`` is trained, with ``share="A"`` its ``B_u``, with
    ``"independent"`` both; ``"pooled"`` has nothing per user and raises. The rows must all be
    the new user's. Adam without weight decay leaves every other user's factors bit-for-bit
    unchanged. Returns the trainer (``evaluation_`` holds the fit on ``train``).
    """
    if model.share == "pooled":
        raise PluralignError(
            "share='pooled' has no per-user factors: a new user gets the pooled reward as it is"
        )
    users = {str(u.item() if isinstance(u, np.generic) else u) for u in train.users}
    key = str(user)
    if users != {key}:
        raise PluralignError(
            f"adaptation rows must all belong to user {key!r}; found {sorted(users)[:5]}"
        )
    index = model.add_user(key)
    data = encode_pairs(model, train)
    trainer = RewardTrainer(
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress, output_dir=None
    )
    return trainer.fit_encoded(model, data, trainable="user", user=index)


# ---------------------------------------------------------------------- trainable selection
def _select_trainable(
    model: PersonalizedRewardModel, trainable: str, user: int | None
) -> tuple[list[tuple[str, torch.nn.Parameter]], list]:
    """The tensors to train and the gradient hooks that mask out other users' rows (to
    remove after training)."""
    named = list(model.trainable_named_parameters())
    for _, p in model.named_parameters():
        p.requires_grad_(False)
    if trainable == "all":
        for _, p in named:
            p.requires_grad_(True)
        return named, []
    per_user = dict((id(p), flag) for p, flag in model.lora.user_parameters())
    chosen, hooks = [], []
    for name, p in named:
        if per_user.get(id(p)):
            p.requires_grad_(True)
            mask = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype, device=p.device)
            mask[user] = 1.0
            hooks.append(p.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device)))
            chosen.append((name, p))
    return chosen, hooks


# ---------------------------------------------------------------------- checkpoints
_STEP_NAME = re.compile(r"step-(\d{1,18})")


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-N`` folder, by step (leftover ``.step-N.tmp`` and
    ``step-N.corrupt`` folders are not checkpoints)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        match = _STEP_NAME.fullmatch(p.name)
        if match and p.is_dir():
            found.append((int(match.group(1)), p))
    return sorted(found)


def _save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: PersonalizedRewardModel,
    optimizer,
    state: dict[str, Any],
    accelerator,
    keep: int,
) -> None:
    """Write ``ckpt_dir/step-N`` durably: each file into ``.step-N.tmp`` (written and fsynced
    by :func:`pluralign._atomic.atomic_open`), the temporary folder fsynced, renamed into place,
    and ``ckpt_dir`` fsynced, so after a crash ``step-N`` is either absent or complete. Then
    only the ``keep`` latest checkpoints are kept; checkpoints of later steps than ``N`` are
    leftovers of an earlier run this one did not resume (``resume=False``) and are removed,
    so that the next resume continues this run."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = ckpt_dir / f"step-{step:07d}"
        tmp = ckpt_dir / f".step-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_tensors(tmp / "trainable.safetensors", model.trainable_state())
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        write_bytes(tmp / "optimizer.pt", buffer.getvalue())
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        done = _checkpoints(ckpt_dir)
        stale = [p for s, p in done if s > step]
        current = [p for s, p in done if s <= step]
        for old in stale + current[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


class _Mismatch(PluralignError):
    """An intact checkpoint of another run (settings, data, users or epochs): refused, not
    skipped."""


def _count(state: dict[str, Any], key: str, path: Path, minimum: int = 0) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT_MAX:
        raise DataValidationError(
            f"must be an integer >= {minimum}, got {show(value)}", field=key, path=str(path)
        )
    return value


def _read_state(
    path: Path, fingerprint: dict[str, Any], layout: tuple[int, int], schedule: str
) -> dict[str, Any]:
    """The validated ``state.json`` of checkpoint ``path``.

    ``layout`` is ``(epochs, steps per epoch)`` of this run. The position (``epoch``,
    ``group``, ``global_step``) must be a point of that layout
    (``global_step = epoch · steps_per_epoch + group``) and the history must hold one record per
    finished epoch and the losses of the current epoch's steps; a state that is not is
    damaged. A state of other settings (the fingerprint), or of a run that the new ``epochs``
    cannot continue, raises :class:`_Mismatch`.
    """
    file = path / "state.json"
    state = parse_json(read_text(file), path=str(file), finite=False)
    if not isinstance(state, dict):
        raise DataValidationError("must be a JSON object", path=str(file))
    saved = state.get("fingerprint")
    expected = json.loads(json.dumps(fingerprint))
    if not isinstance(saved, dict):
        raise DataValidationError(
            f"must be an object, got {show(saved)}", field="fingerprint", path=str(file)
        )
    if saved != expected:
        diff = sorted(str(k) for k in set(expected) | set(saved) if saved.get(k) != expected.get(k))
        raise _Mismatch(
            f"cannot resume from {path}: it was trained with different "
            f"{', '.join(diff)}; use another output folder or resume=False "
            "(--no-resume)"
        )
    epoch, group = _count(state, "epoch", file), _count(state, "group", file)
    step = _count(state, "global_step", file)
    saved_epochs = state.get("epochs")
    epochs, per_epoch = layout
    if epoch > epochs or (epoch == epochs and group):
        raise _Mismatch(
            f"cannot resume from {path}: it is at epoch {epoch + 1} (step {step}), "
            f"past the end of a run of epochs={epochs}; set train.num_train_epochs to "
            f"at least {epoch + (1 if group else 0)}, or resume=False "
            "(--no-resume)"
        )
    total = epochs * per_epoch
    saved_total = state.get("total_steps")
    if schedule == "linear" and saved_total is not None and saved_total != total:
        raise _Mismatch(
            f"cannot resume from {path}: the linear schedule spans the whole run "
            f"and this checkpoint's run had {show(saved_total)} steps "
            f"(epochs={show(saved_epochs)}), this one {total} "
            f"(epochs={epochs}); keep train.num_train_epochs, or resume=False "
            "(--no-resume)"
        )
    if (epoch < epochs and group >= per_epoch) or step != epoch * per_epoch + group:
        raise DataValidationError(
            f"position epoch={epoch}, group={group}, global_step={step} is not a step of this run",
            field="global_step",
            path=str(file),
        )
    history = state.get("history")
    if (
        not isinstance(history, list)
        or len(history) != epoch
        or not all(isinstance(h, dict) for h in history)
    ):
        raise DataValidationError(
            f"must be a list of {epoch} epoch record(s)", field="history", path=str(file)
        )
    losses = state.get("epoch_losses", [])
    if (
        not isinstance(losses, list)
        or len(losses) != group
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in losses
        )
    ):
        raise DataValidationError(
            f"must be a list of {group} finite loss(es)", field="epoch_losses", path=str(file)
        )
    log_history, pending = _read_log(state, step, file)
    return {
        "epoch": epoch,
        "group": group,
        "global_step": step,
        "history": history,
        "epoch_losses": losses,
        "log_history": log_history,
        "log_pending": pending,
    }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _read_log(
    state: dict[str, Any], step: int, file: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ``log_history`` of a checkpoint's state (entries at steps ``1..step``, in order)
    and the sums of the steps since its last training entry (``log_pending``). A checkpoint
    written before the trainer kept logs has neither: its run continues with an empty log."""
    entries = state.get("log_history", [])
    previous = 0
    if not isinstance(entries, list):
        raise DataValidationError(
            f"must be a list, got {show(entries)}", field="log_history", path=str(file)
        )
    for entry in entries:
        at = entry.get("step") if isinstance(entry, dict) else None
        if isinstance(at, bool) or not isinstance(at, int) or not previous <= at <= step:
            raise DataValidationError(
                f"entries must be objects with steps in order up to {step}, got {show(entry)}",
                field="log_history",
                path=str(file),
            )
        previous = at
    pending = state.get("log_pending")
    if pending is None:
        return entries, _TrainLog.empty()
    metrics = pending.get("metrics") if isinstance(pending, dict) else None
    if not (
        isinstance(pending, dict)
        and set(pending) == {"steps", "loss", "rows", "metrics"}
        and all(type(pending[k]) is int and 0 <= pending[k] <= INT_MAX for k in ("steps", "rows"))
        and _number(pending["loss"])
        and isinstance(metrics, dict)
        and all(isinstance(k, str) and _number(v) for k, v in metrics.items())
    ):
        raise DataValidationError(
            f"must be the sums of the steps since the last log entry, got {show(pending)}",
            field="log_pending",
            path=str(file),
        )
    return entries, pending


def _read_trainable(path: Path, model: PersonalizedRewardModel) -> dict[str, torch.Tensor]:
    file = path / "trainable.safetensors"
    tensors = read_tensors(file)
    shapes = {n: tuple(p.shape) for n, p in model.trainable_named_parameters()}
    if set(tensors) != set(shapes):
        odd = sorted(set(tensors) ^ set(shapes))
        raise DataValidationError(
            f"tensors do not match the model's (e.g. {odd[:2]})", field=odd[0], path=str(file)
        )
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise DataValidationError(
                f"has shape {tuple(tensors[name].shape)}, the model {shape}",
                field=name,
                path=str(file),
            )
    return tensors


_ADAM_STATE = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def _read_optimizer(path: Path, optimizer: Any) -> dict[str, Any]:
    """The optimizer state of checkpoint ``path``, checked against ``optimizer`` (same
    parameter groups and numbering; for each parameter, finite moment tensors of its shape and
    a non-negative second moment) and returned with the current optimizer's hyper-parameters
    (only the moments and step counts come from the file: the hyper-parameters are the run's,
    which the fingerprint already matched)."""
    file = path / "optimizer.pt"
    saved = read_torch(file)
    current = optimizer.state_dict()
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    if (
        not isinstance(groups, list)
        or not isinstance(state, dict)
        or len(groups) != len(current["param_groups"])
    ):
        raise DataValidationError("is not the state of this run's optimizer", path=str(file))
    params: dict[int, torch.Tensor] = {}
    for mine, theirs, live in zip(
        current["param_groups"], groups, optimizer.param_groups, strict=True
    ):
        ids = theirs.get("params") if isinstance(theirs, dict) else None
        if (
            not isinstance(ids, list)
            or not all(type(i) is int for i in ids)
            or (ids != mine["params"])
        ):
            raise DataValidationError(
                "parameter groups differ from this run's optimizer",
                field="param_groups",
                path=str(file),
            )
        params.update(zip(mine["params"], live["params"], strict=True))
    for key, entry in state.items():
        if key not in params or not isinstance(entry, dict) or not set(entry) <= _ADAM_STATE:
            raise DataValidationError(
                f"unexpected state entry {show(key)}", field="state", path=str(file)
            )
        for name, value in entry.items():
            ok = (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and bool(torch.isfinite(value).all())
            )
            if ok and name == "step":
                ok = value.numel() == 1 and float(value) >= 0
            elif ok:
                ok = tuple(value.shape) == tuple(params[key].shape) and (
                    name == "exp_avg" or bool((value >= 0).all())
                )
            if not ok:
                raise DataValidationError(
                    f"parameter {key}: bad {name!r}", field="state", path=str(file)
                )
    return {"state": state, "param_groups": [{**mine} for mine in current["param_groups"]]}


def _resume(
    ckpt_dir: Path,
    model: PersonalizedRewardModel,
    optimizer: Any,
    fingerprint: dict[str, Any],
    layout: tuple[int, int],
    schedule: str,
) -> tuple[dict[str, Any] | None, Path | None, list[Path]]:
    """Load the latest intact checkpoint of ``ckpt_dir`` into ``model`` and ``optimizer``;
    ``(state, folder, damaged folders)``, or ``(None, None, damaged)`` to start fresh.

    Checkpoints are tried from the latest down. A damaged one (a missing, truncated or garbage
    file, an optimizer state that does not fit, a ``state.json`` that is not a position of
    this run: :func:`_read_state`) is skipped with a :class:`PluralignWarning`; every file of
    a checkpoint is read and checked before anything is loaded, so a damaged one changes
    nothing. If none is intact, training starts from scratch (with a warning). An intact
    checkpoint of another run raises (:class:`_Mismatch`): that is a wrong folder, not damage.
    """
    damaged: list[Path] = []
    for _, path in reversed(_checkpoints(ckpt_dir)):
        try:
            state = _read_state(path, fingerprint, layout, schedule)
            tensors = _read_trainable(path, model)
            optim = _read_optimizer(path, optimizer)
        except _Mismatch:
            raise
        except PluralignError as err:
            warnings.warn(
                f"checkpoint {path} is damaged and is skipped: {err}",
                PluralignWarning,
                stacklevel=4,
            )
            damaged.append(path)
            continue
        model.load_trainable_state(tensors)
        optimizer.load_state_dict(optim)
        return state, path, damaged
    if damaged:
        warnings.warn(
            f"no intact checkpoint in {ckpt_dir}: training starts from scratch",
            PluralignWarning,
            stacklevel=4,
        )
    return None, None, damaged


def _set_aside(damaged: Sequence[Path]) -> None:
    """Rename damaged checkpoints to ``step-N.corrupt`` (kept for inspection, no longer
    resumed from or counted by ``keep_checkpoints``)."""
    for path in damaged:
        target = path.with_name(path.name + ".corrupt")
        shutil.rmtree(target, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.replace(path, target)
    if damaged:
        fsync_dir(damaged[0].parent)


def _all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every given tensor is finite (one device synchronisation in all)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


class _Progress:
    """Progress on stderr (a no-op when disabled): a rich bar over optimizer steps when stderr
    is a terminal (or a notebook), and the trainer's log lines, printed above the bar or, with
    no bar (stderr redirected to a file or a pipe), as plain lines."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled:
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal or console.is_jupyter:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.bar = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    console=console,
                    transient=True,
                )
                self.task = self.bar.add_task("training", total=total, completed=done)
                self.bar.start()

    def advance(self, epoch: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"epoch {epoch + 1} loss {loss:.3f}")

    def line(self, text: str) -> None:
        """One log line on stderr."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _plain_number(value: Any) -> Any:
    """A metric as JSON: finite numbers as they are, anything else (NaN, inf) as ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    value = value.item() if isinstance(value, np.generic) else value
    return value if math.isfinite(value) else None


def _shown(value: Any) -> str:
    return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _TrainLog:
    """The log entries of a run (module docstring): kept in memory (and in checkpoints),
    printed through a :class:`_Progress` and written to ``out/trainer_state.json`` and
    ``out/log.jsonl`` (``out=None``: not written; only the main process writes).

    ``pending`` holds the sums of the steps since the last training entry (steps, step losses,
    rows, and per metric the sum over rows), so that a resumed run logs the same averages."""

    def __init__(
        self,
        every: int,
        steps_per_epoch: int,
        last: int,
        step: int,
        history: list[dict[str, Any]],
        pending: dict[str, Any] | None,
        progress: _Progress,
        out: Path | None,
        settings: dict[str, Any],
    ) -> None:
        self.every = every
        self.steps_per_epoch = steps_per_epoch
        self.last = last
        self.start = step
        self.started = time.monotonic()
        self.history = list(history)
        self.pending = _copy_pending(pending) if pending else self.empty()
        self.progress = progress
        self.out = out
        self.settings = settings

    @staticmethod
    def empty() -> dict[str, Any]:
        return {"steps": 0, "loss": 0.0, "rows": 0, "metrics": {}}

    def add_step(self, loss: float, rows: int, metric_sums: dict[str, float]) -> None:
        p = self.pending
        p["steps"] += 1
        p["loss"] += loss
        p["rows"] += rows
        for name, value in metric_sums.items():
            p["metrics"][name] = p["metrics"].get(name, 0.0) + value

    def due(self, step: int) -> bool:
        return step == 1 or step % self.every == 0 or step >= self.last

    def _epoch(self, step: int) -> float:
        return round(step / self.steps_per_epoch, 4)

    def _timing(self, step: int) -> str:
        elapsed = time.monotonic() - self.started
        done = step - self.start
        eta = _duration(elapsed / done * max(self.last - step, 0)) if done > 0 else "-"
        return f"elapsed {_duration(elapsed)} eta {eta}"

    def log_train(self, step: int, lr: float) -> None:
        p = self.pending
        entry: dict[str, Any] = {
            "step": step,
            "epoch": self._epoch(step),
            "loss": _plain_number(p["loss"] / max(p["steps"], 1)),
        }
        for name, total in sorted(p["metrics"].items()):
            entry[name] = _plain_number(total / max(p["rows"], 1))
        entry["learning_rate"] = _plain_number(lr)
        self.history.append(entry)
        self.pending = self.empty()
        values = " ".join(
            f"{k} {_shown(v)}"
            for k, v in entry.items()
            if k not in ("step", "epoch", "learning_rate")
        )
        self.progress.line(
            f"train step {step}/{self.last} epoch {entry['epoch']:.2f} {values} "
            f"lr {lr:.3e} {self._timing(step)}"
        )

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"step": step, "epoch": self._epoch(step)}
        for name, value in metrics.items():  # the scalars: not n, not per_user
            number = isinstance(value, int | float | np.number) and not isinstance(value, bool)
            if name not in ("n", "per_user") and (value is None or number):
                entry[f"eval_{name}"] = _plain_number(value)
        self.history.append(entry)
        values = " ".join(
            f"{k} {_shown(v)}" for k, v in entry.items() if k not in ("step", "epoch")
        )
        self.progress.line(
            f"eval step {step}/{self.last} epoch {entry['epoch']:.2f} {values} {self._timing(step)}"
        )

    def write(self, step: int) -> None:
        """``trainer_state.json`` (transformers' ``TrainerState`` fields) and ``log.jsonl``
        (one entry a line), each written atomically."""
        if self.out is None:
            return
        document = {
            "global_step": step,
            "epoch": self._epoch(step),
            "max_steps": self.last,
            "logging_steps": self.every,
            **self.settings,
            "best_metric": None,
            "best_model_checkpoint": None,
            "is_world_process_zero": True,
            "log_history": self.history,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.out / "log.jsonl",
            "".join(json.dumps(e, allow_nan=False) + "\n" for e in self.history),
        )
        atomic_write_text(
            self.out / "trainer_state.json", json.dumps(document, indent=2, allow_nan=False) + "\n"
        )


def _copy_pending(pending: dict[str, Any]) -> dict[str, Any]:
    return {**pending, "metrics": dict(pending["metrics"])}
