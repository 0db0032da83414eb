"""Bradley–Terry training of a personalized reward model, with accelerate.

The loss of a batch ``S`` of rows ``(x, y_c, y_r, u)`` is the mean negative log-likelihood
``−(1/|S|) Σ log σ(r_u(x, y_c) − r_u(x, y_r))`` (P-ShareLoRA's objective, seed 001 eq. 4).
Only the LoRA factors and the head are trained (AdamW).

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
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pluralign._atomic import atomic_write_text, fsync_dir
from pluralign._parse import parse_json, read_text
from pluralign.data.loaders import TextPreferences
from pluralign.errors import ConfigError, DataValidationError, PluralignError, PluralignWarning
from pluralign.llm._checks import (
    INT_MAX,
    check_choice,
    check_float,
    check_int,
    check_string,
    show,
)
from pluralign.llm._files import read_tensors, read_torch, write_bytes, write_tensors
from pluralign.llm.data import EncodedPairs, encode_pairs
from pluralign.llm.reward_model import PersonalizedRewardModel

__all__ = ["LoRATrainer", "RewardTrainer", "adapt_user", "per_user_metrics", "use_cpu"]

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


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def per_user_metrics(margins: np.ndarray, users: Sequence[str]) -> dict[str, Any]:
    """Pairwise accuracy (``r_c > r_r``; a tie counts one half) and mean BT loss, per user and
    overall (``accuracy`` over rows, ``mean_user_accuracy`` over users)."""
    margins = np.asarray(margins, dtype=np.float64)
    users = np.asarray(users)
    correct = (margins > 0) + 0.5 * (margins == 0)
    loss = np.logaddexp(0.0, -margins)
    per_user = {}
    for u in dict.fromkeys(users.tolist()):
        m = users == u
        per_user[str(u)] = {"accuracy": float(correct[m].mean()), "loss": float(loss[m].mean()),
                            "n": int(m.sum())}
    return {"accuracy": float(correct.mean()) if len(margins) else float("nan"),
            "loss": float(loss.mean()) if len(margins) else float("nan"),
            "mean_user_accuracy": float(np.mean([v["accuracy"] for v in per_user.values()]))
            if per_user else float("nan"),
            "n": len(margins), "per_user": per_user}


class LoRATrainer:
    """The training loop shared by :class:`RewardTrainer` and
    :class:`~pluralign.llm.DPOTrainer`: LoRA factors (and a reward head) trained with AdamW
    under accelerate, with the batching, accumulation, checkpoints and resume of the module
    docstring. A subclass defines ``_row_losses`` (the loss of each row of a micro-batch),
    ``evaluate`` and ``fit``.

    Parameters
    ----------
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
        Evaluate on the evaluation rows after every epoch (else only at the end).
    progress:
        Show a progress bar (on the main process).
    cpu, mixed_precision:
        Passed to ``accelerate.Accelerator`` (``accelerate launch`` options take precedence).

    After :meth:`fit`: ``history_`` (per-epoch loss and evaluation), ``evaluation_`` (the final
    :func:`per_user_metrics` of the evaluation rows, or of the training rows without them),
    ``train_evaluation_``, ``global_step_``, ``resumed_from_``.
    """

    def __init__(self, *, epochs: int = 3, lr: float = 1e-3, batch_size: int = 16,
                 grad_accum: int = 1, weight_decay: float = 0.0, schedule: str = "constant",
                 warmup_steps: int = 0, max_grad_norm: float | None = None, seed: int = 0,
                 output_dir: str | Path | None = None, checkpoint_every: int | str = "epoch",
                 keep_checkpoints: int = 2, resume: bool = True, max_steps: int | None = None,
                 eval_every_epoch: bool = True, progress: bool = True, cpu: bool = False,
                 mixed_precision: str = "no") -> None:
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.output_dir = output_dir
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.resume = resume
        self.max_steps = max_steps
        self.eval_every_epoch = eval_every_epoch
        self.progress = progress
        self.cpu = cpu
        self.mixed_precision = mixed_precision

    # ------------------------------------------------------------------ checks
    def _check(self) -> None:
        """Refuse bad settings before any work (scikit-learn style: ``__init__`` only stores
        them). The same ranges as ``train-rm``'s config
        (:func:`~pluralign.llm.job.resolve_rm_config`): a non-finite or non-positive ``lr``
        would train to NaN, and a negative ``warmup_steps`` makes the warm-up factor
        ``(step + 1) / warmup_steps`` negative, i.e. gradient *ascent*; ``bool`` is refused
        where a number is expected."""
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            check_int(name, getattr(self, name))
        check_int("max_steps", self.max_steps, optional=True)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_float("lr", self.lr, low=0.0, low_open=True, high=MAX_LR, high_open=False)
        check_float("weight_decay", self.weight_decay, low=0.0, high=MAX_LR, high_open=False)
        check_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, optional=True)
        check_choice("schedule", self.schedule, SCHEDULES)
        every = self.checkpoint_every
        if not (every == "epoch" and isinstance(every, str)) and (
                isinstance(every, bool) or not isinstance(every, int | np.integer)
                or not 1 <= every <= INT_MAX):
            raise ConfigError(f"checkpoint_every must be 'epoch' or a positive integer, "
                              f"got {show(every)}")
        if self.output_dir is not None:
            check_string("output_dir", self.output_dir)

    def _fingerprint(self, data: EncodedPairs, model: PersonalizedRewardModel,
                     trainable: str) -> dict[str, Any]:
        return {"lr": self.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "weight_decay": self.weight_decay, "schedule": self.schedule,
                "warmup_steps": self.warmup_steps, "max_grad_norm": self.max_grad_norm,
                "seed": self.seed, "data": data.fingerprint(), "users": list(model.user_ids),
                "share": model.share, "trainable": trainable,
                "shapes": {n: list(p.shape) for n, p in model.trainable_named_parameters()},
                **self._loss_settings()}

    def _loss_settings(self) -> dict[str, Any]:
        """Settings of the subclass's loss that a resumed run must share (its fingerprint)."""
        return {}

    # ------------------------------------------------------------------ schedule
    def _micro_batches(self, n: int, epoch: int, world: int) -> list[list[int]]:
        order = np.random.default_rng(_seed(self.seed, epoch)).permutation(n)
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if batches and len(batches[-1]) < world:        # every process needs at least one row
            batches.pop()
        return batches

    def _lr_at(self, step: int, total: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.schedule == "linear":
            return self.lr * warm * max(0.0, 1.0 - step / max(total, 1))
        return self.lr * warm

    # ------------------------------------------------------------------ fit
    def _train(self, model: PersonalizedRewardModel, data: EncodedPairs,
               eval_data: EncodedPairs | None, *, trainable: str,
               user: int | None = None) -> RewardTrainer:
        from accelerate import Accelerator

        self._check()
        accelerator = Accelerator(cpu=use_cpu(self.cpu), mixed_precision=self.mixed_precision)
        world, rank = accelerator.num_processes, accelerator.process_index
        params, hooks = _select_trainable(model, trainable, user)
        optimizer = torch.optim.AdamW([p for _, p in params], lr=self.lr,
                                      weight_decay=self.weight_decay)
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        device = accelerator.device

        # every epoch has the same number of micro-batches (only their rows differ), so the
        # schedule is known without drawing all epochs' orders up front
        n_batches = len(self._micro_batches(len(data), 0, world))
        steps_per_epoch = math.ceil(n_batches / self.grad_accum)
        total_steps = self.epochs * steps_per_epoch
        fingerprint = self._fingerprint(data, model, trainable if user is None
                                        else f"{trainable}:{model.user_ids[user]}")
        ckpt_dir = Path(self.output_dir) / "checkpoints" if self.output_dir else None

        state: dict[str, Any] = {"epoch": 0, "group": 0, "global_step": 0, "history": []}
        self.resumed_from_ = None
        if ckpt_dir is not None and self.resume:
            loaded, path, damaged = _resume(ckpt_dir, model, optimizer, fingerprint,
                                            (self.epochs, steps_per_epoch), self.schedule)
            accelerator.wait_for_everyone()          # every process has read the files
            if accelerator.is_main_process:
                _set_aside(damaged)
            if loaded is not None:
                state = loaded
                self.resumed_from_ = str(path)
        history: list[dict[str, Any]] = state["history"]
        step = state["global_step"]
        stop = self.max_steps if self.max_steps is not None else total_steps
        progress = _Progress(self.progress and accelerator.is_main_process, total_steps, step)
        try:
            for epoch in range(state["epoch"], self.epochs):
                batches = self._micro_batches(len(data), epoch, world)
                groups = [batches[i:i + self.grad_accum]
                          for i in range(0, len(batches), self.grad_accum)]
                start = state["group"] if epoch == state["epoch"] else 0
                losses = list(state.get("epoch_losses", [])) if start else []
                for g in range(start, len(groups)):
                    if step >= stop:
                        break
                    group = groups[g]
                    n_rows = sum(len(b) for b in group)
                    wrapped.train()
                    loss_sum = 0.0
                    for m, rows in enumerate(group):
                        torch.manual_seed(_seed(self.seed, epoch, g, m, rank))
                        local = rows[rank::world]
                        row_losses = self._row_losses(wrapped, model, data, local, device)
                        loss = row_losses.sum() * (world / n_rows)
                        sync = m == len(group) - 1
                        if sync:
                            accelerator.backward(loss)
                        else:
                            with accelerator.no_sync(wrapped):
                                accelerator.backward(loss)
                        loss_sum += float(row_losses.detach().sum())
                    total = accelerator.gather(torch.tensor([loss_sum], device=device)).sum()
                    loss_value = float(total) / n_rows
                    # before the update: a non-finite loss or gradient is not applied (the
                    # gradients are all-reduced, so every process decides the same)
                    bad = (f"the loss is {loss_value}" if not math.isfinite(loss_value) else
                           f"a gradient is not finite (loss {loss_value:.4g})"
                           if not _all_finite(p.grad for _, p in params) else None)
                    if bad is not None:
                        raise PluralignError(
                            f"training diverged at epoch {epoch + 1}, step {step + 1}: {bad}; "
                            "stopped before that step was applied, nothing was exported, and "
                            "the checkpoints hold only finite states. Lower "
                            "train.learning_rate (or weight_decay) or set train.max_grad_norm")
                    if self.max_grad_norm is not None:
                        accelerator.clip_grad_norm_([p for _, p in params], self.max_grad_norm)
                    for group_ in optimizer.param_groups:
                        group_["lr"] = self._lr_at(step, total_steps)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if not _all_finite(p for _, p in params):
                        raise PluralignError(
                            f"training diverged at epoch {epoch + 1}, step {step + 1}: the "
                            "update made a trainable tensor non-finite; nothing was exported "
                            "or checkpointed from it. Lower train.learning_rate (or "
                            "weight_decay) or set train.max_grad_norm")
                    step += 1
                    losses.append(loss_value)
                    progress.advance(epoch, losses[-1])
                    last_group = g == len(groups) - 1
                    if last_group:
                        history.append(self._epoch_record(epoch, step, losses, model, eval_data,
                                                          accelerator))
                        losses = []
                    every = self.checkpoint_every
                    if ckpt_dir is not None and ((every == "epoch" and last_group) or step >= stop
                                                 or (every != "epoch" and step % every == 0)):
                        snapshot = {"epoch": epoch + 1 if last_group else epoch,
                                    "group": 0 if last_group else g + 1, "global_step": step,
                                    "history": history, "epoch_losses": losses,
                                    "fingerprint": fingerprint, "epochs": self.epochs,
                                    "total_steps": total_steps}
                        _save_checkpoint(ckpt_dir, step, model, optimizer, snapshot,
                                         accelerator, self.keep_checkpoints)
                if step >= stop:
                    break
        finally:
            progress.close()
            for hook in hooks:
                hook.remove()
        model.train(False)
        self.history_ = history
        self.global_step_ = step
        self.train_evaluation_ = self.evaluate(model, data, accelerator)
        self.evaluation_ = (self.evaluate(model, eval_data, accelerator) if eval_data is not None
                            else self.train_evaluation_)
        accelerator.wait_for_everyone()
        return self

    def _epoch_record(self, epoch: int, step: int, losses: list[float],
                      model: PersonalizedRewardModel, eval_data: EncodedPairs | None,
                      accelerator) -> dict[str, Any]:
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                                  "train_loss": float(np.mean(losses)) if losses else None}
        if eval_data is not None and self.eval_every_epoch:
            metrics = self.evaluate(model, eval_data, accelerator)
            record.update(eval_loss=metrics["loss"], eval_accuracy=metrics["accuracy"],
                          eval_mean_user_accuracy=metrics["mean_user_accuracy"])
        return record


class RewardTrainer(LoRATrainer):
    """Trains a :class:`~pluralign.llm.PersonalizedRewardModel` on preference rows by
    Bradley–Terry maximum likelihood (module docstring); the settings and the fitted
    attributes are :class:`LoRATrainer`'s."""

    def fit(self, model: PersonalizedRewardModel, train: TextPreferences,
            eval: TextPreferences | None = None) -> RewardTrainer:
        """Train ``model`` in place on ``train``; evaluate per user on ``eval``.

        Every user of the model needs at least one training row (an adapter with no data would
        stay at its initialization): the users come from the data, not the other way round.
        """
        self._check()
        data = encode_pairs(model, train)
        missing = sorted(set(model.user_ids) - set(data.users))
        if missing:
            raise PluralignError(f"{len(missing)} user(s) of the model have no training rows: "
                                 f"{missing[:10]}")
        eval_data = encode_pairs(model, eval) if eval is not None and eval.n else None
        return self._train(model, data, eval_data, trainable="all")

    def _row_losses(self, wrapped: Any, model: PersonalizedRewardModel, data: EncodedPairs,
                    rows: list[int], device: torch.device) -> torch.Tensor:
        """``−log σ(r_u(x, y_c) − r_u(x, y_r))`` of each row."""
        batch = {k: v.to(device) for k, v in data.batch(rows, model).items()}
        rewards = wrapped(**batch)
        k = len(rows)
        return F.softplus(-(rewards[:k] - rewards[k:]))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: PersonalizedRewardModel, data: EncodedPairs | TextPreferences,
                 accelerator=None) -> dict[str, Any]:
        """:func:`per_user_metrics` of ``model`` on ``data`` (rows split across processes)."""
        if isinstance(data, TextPreferences):
            data = encode_pairs(model, data)
        world = accelerator.num_processes if accelerator is not None else 1
        rank = accelerator.process_index if accelerator is not None else 0
        device = model.head.weight.device
        was_training = model.training
        model.train(False)
        rows = list(range(rank, len(data), world))
        margins = []
        for i in range(0, len(rows), self.batch_size):
            local = rows[i:i + self.batch_size]
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


def adapt_user(model: PersonalizedRewardModel, user: Any, train: TextPreferences, *,
               epochs: int = 30, lr: float = 5e-3, batch_size: int = 16, seed: int = 0,
               progress: bool = False) -> RewardTrainer:
    """Few-shot adaptation of a new user: register ``user`` (its factor starts at the mean of
    the existing users') and train only its own factor on its rows ``train``, with the shared
    factor, the other users and the head frozen (P-ShareLoRA §4.3).

    With ``share="B"`` the user's ``A_u`` is trained, with ``share="A"`` its ``B_u``, with
    ``"independent"`` both; ``"pooled"`` has nothing per user and raises. The rows must all be
    the new user's. Adam without weight decay leaves every other user's factors bit-for-bit
    unchanged. Returns the trainer (``evaluation_`` holds the fit on ``train``).
    """
    if model.share == "pooled":
        raise PluralignError("share='pooled' has no per-user factors: a new user gets the "
                             "pooled reward as it is")
    users = {str(u.item() if isinstance(u, np.generic) else u) for u in train.users}
    key = str(user)
    if users != {key}:
        raise PluralignError(f"adaptation rows must all belong to user {key!r}; found "
                             f"{sorted(users)[:5]}")
    index = model.add_user(key)
    data = encode_pairs(model, train)
    trainer = RewardTrainer(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                            progress=progress, output_dir=None)
    return trainer._train(model, data, None, trainable="user", user=index)


# ---------------------------------------------------------------------- trainable selection
def _select_trainable(model: PersonalizedRewardModel, trainable: str, user: int | None
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
            mask = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype,
                               device=p.device)
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


def _save_checkpoint(ckpt_dir: Path, step: int, model: PersonalizedRewardModel, optimizer,
                     state: dict[str, Any], accelerator, keep: int) -> None:
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
        raise DataValidationError(f"must be an integer >= {minimum}, got {show(value)}",
                                  field=key, path=str(path))
    return value


def _read_state(path: Path, fingerprint: dict[str, Any], layout: tuple[int, int],
                schedule: str) -> dict[str, Any]:
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
        raise DataValidationError(f"must be an object, got {show(saved)}", field="fingerprint",
                                  path=str(file))
    if saved != expected:
        diff = sorted(str(k) for k in set(expected) | set(saved)
                      if saved.get(k) != expected.get(k))
        raise _Mismatch(f"cannot resume from {path}: it was trained with different "
                        f"{', '.join(diff)}; use another output folder or resume=False "
                        "(--no-resume)")
    epoch, group = _count(state, "epoch", file), _count(state, "group", file)
    step = _count(state, "global_step", file)
    saved_epochs = state.get("epochs")
    epochs, per_epoch = layout
    if epoch > epochs or (epoch == epochs and group):
        raise _Mismatch(f"cannot resume from {path}: it is at epoch {epoch + 1} (step {step}), "
                        f"past the end of a run of epochs={epochs}; set train.num_train_epochs to "
                        f"at least {epoch + (1 if group else 0)}, or resume=False "
                        "(--no-resume)")
    total = epochs * per_epoch
    saved_total = state.get("total_steps")
    if schedule == "linear" and saved_total is not None and saved_total != total:
        raise _Mismatch(f"cannot resume from {path}: the linear schedule spans the whole run "
                        f"and this checkpoint's run had {show(saved_total)} steps "
                        f"(epochs={show(saved_epochs)}), this one {total} "
                        f"(epochs={epochs}); keep train.num_train_epochs, or resume=False "
                        "(--no-resume)")
    if (epoch < epochs and group >= per_epoch) or step != epoch * per_epoch + group:
        raise DataValidationError(f"position epoch={epoch}, group={group}, global_step={step} "
                                  "is not a step of this run", field="global_step",
                                  path=str(file))
    history = state.get("history")
    if not isinstance(history, list) or len(history) != epoch or not all(
            isinstance(h, dict) for h in history):
        raise DataValidationError(f"must be a list of {epoch} epoch record(s)",
                                  field="history", path=str(file))
    losses = state.get("epoch_losses", [])
    if not isinstance(losses, list) or len(losses) != group or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in losses):
        raise DataValidationError(f"must be a list of {group} finite loss(es)",
                                  field="epoch_losses", path=str(file))
    return {"epoch": epoch, "group": group, "global_step": step, "history": history,
            "epoch_losses": losses}


def _read_trainable(path: Path, model: PersonalizedRewardModel) -> dict[str, torch.Tensor]:
    file = path / "trainable.safetensors"
    tensors = read_tensors(file)
    shapes = {n: tuple(p.shape) for n, p in model.trainable_named_parameters()}
    if set(tensors) != set(shapes):
        odd = sorted(set(tensors) ^ set(shapes))
        raise DataValidationError(f"tensors do not match the model's (e.g. {odd[:2]})",
                                  field=odd[0], path=str(file))
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise DataValidationError(f"has shape {tuple(tensors[name].shape)}, the model "
                                      f"{shape}", field=name, path=str(file))
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
    if not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != len(
            current["param_groups"]):
        raise DataValidationError("is not the state of this run's optimizer", path=str(file))
    params: dict[int, torch.Tensor] = {}
    for mine, theirs, live in zip(current["param_groups"], groups, optimizer.param_groups,
                                  strict=True):
        ids = theirs.get("params") if isinstance(theirs, dict) else None
        if not isinstance(ids, list) or not all(type(i) is int for i in ids) or (
                ids != mine["params"]):
            raise DataValidationError("parameter groups differ from this run's optimizer",
                                      field="param_groups", path=str(file))
        params.update(zip(mine["params"], live["params"], strict=True))
    for key, entry in state.items():
        if key not in params or not isinstance(entry, dict) or not set(entry) <= _ADAM_STATE:
            raise DataValidationError(f"unexpected state entry {show(key)}", field="state",
                                      path=str(file))
        for name, value in entry.items():
            ok = isinstance(value, torch.Tensor) and value.is_floating_point() and bool(
                torch.isfinite(value).all())
            if ok and name == "step":
                ok = value.numel() == 1 and float(value) >= 0
            elif ok:
                ok = tuple(value.shape) == tuple(params[key].shape) and (
                    name == "exp_avg" or bool((value >= 0).all()))
            if not ok:
                raise DataValidationError(f"parameter {key}: bad {name!r}", field="state",
                                          path=str(file))
    return {"state": state, "param_groups": [{**mine} for mine in current["param_groups"]]}


def _resume(ckpt_dir: Path, model: PersonalizedRewardModel, optimizer: Any,
            fingerprint: dict[str, Any], layout: tuple[int, int], schedule: str
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
            warnings.warn(f"checkpoint {path} is damaged and is skipped: {err}",
                          PluralignWarning, stacklevel=3)
            damaged.append(path)
            continue
        model.load_trainable_state(tensors)
        optimizer.load_state_dict(optim)
        return state, path, damaged
    if damaged:
        warnings.warn(f"no intact checkpoint in {ckpt_dir}: training starts from scratch",
                      PluralignWarning, stacklevel=3)
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
    """A rich progress bar over optimizer steps (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("training", total=total, completed=done)
            self.bar.start()

    def advance(self, epoch: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1,
                            description=f"epoch {epoch + 1} loss {loss:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
