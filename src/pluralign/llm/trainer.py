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

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pluralign._atomic import atomic_write_text
from pluralign.data.loaders import TextPreferences
from pluralign.errors import ConfigError, PluralignError
from pluralign.llm.data import EncodedPairs, encode_pairs
from pluralign.llm.reward_model import PersonalizedRewardModel

__all__ = ["RewardTrainer", "adapt_user", "per_user_metrics", "use_cpu"]

SCHEDULES = ("constant", "linear")


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


class RewardTrainer:
    """Trains a :class:`~pluralign.llm.PersonalizedRewardModel` on preference rows.

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
        for name in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        every = self.checkpoint_every
        if every != "epoch" and not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"checkpoint_every must be 'epoch' or a positive integer, "
                              f"got {every!r}")

    def _fingerprint(self, data: EncodedPairs, model: PersonalizedRewardModel,
                     trainable: str) -> dict[str, Any]:
        return {"lr": self.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "weight_decay": self.weight_decay, "schedule": self.schedule,
                "warmup_steps": self.warmup_steps, "max_grad_norm": self.max_grad_norm,
                "seed": self.seed, "data": data.fingerprint(), "users": list(model.user_ids),
                "share": model.share, "trainable": trainable,
                "shapes": {n: list(p.shape) for n, p in model.trainable_named_parameters()}}

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
    def fit(self, model: PersonalizedRewardModel, train: TextPreferences,
            eval: TextPreferences | None = None) -> RewardTrainer:
        """Train ``model`` in place on ``train``; evaluate per user on ``eval``.

        Every user of the model needs at least one training row (an adapter with no data would
        stay at its initialization): the users come from the data, not the other way round.
        """
        data = encode_pairs(model, train)
        missing = sorted(set(model.user_ids) - set(data.users))
        if missing:
            raise PluralignError(f"{len(missing)} user(s) of the model have no training rows: "
                                 f"{missing[:10]}")
        eval_data = encode_pairs(model, eval) if eval is not None and eval.n else None
        return self._train(model, data, eval_data, trainable="all")

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

        per_epoch = [self._micro_batches(len(data), e, world) for e in range(self.epochs)]
        steps_per_epoch = [math.ceil(len(b) / self.grad_accum) for b in per_epoch]
        total_steps = sum(steps_per_epoch)
        fingerprint = self._fingerprint(data, model, trainable if user is None
                                        else f"{trainable}:{model.user_ids[user]}")
        ckpt_dir = Path(self.output_dir) / "checkpoints" if self.output_dir else None

        state = {"epoch": 0, "group": 0, "global_step": 0, "history": []}
        self.resumed_from_ = None
        if ckpt_dir is not None and self.resume:
            latest = _latest_checkpoint(ckpt_dir)
            if latest is not None:
                state = _load_checkpoint(latest, model, optimizer, fingerprint)
                self.resumed_from_ = str(latest)
        history: list[dict[str, Any]] = state["history"]
        step = state["global_step"]
        stop = self.max_steps if self.max_steps is not None else total_steps
        progress = _Progress(self.progress and accelerator.is_main_process, total_steps, step)
        try:
            for epoch in range(state["epoch"], self.epochs):
                batches = per_epoch[epoch]
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
                        batch = {k: v.to(device) for k, v in data.batch(local, model).items()}
                        rewards = wrapped(**batch)
                        k = len(local)
                        margin = rewards[:k] - rewards[k:]
                        loss = F.softplus(-margin).sum() * (world / n_rows)
                        sync = m == len(group) - 1
                        if sync:
                            accelerator.backward(loss)
                        else:
                            with accelerator.no_sync(wrapped):
                                accelerator.backward(loss)
                        loss_sum += float(F.softplus(-margin).sum().detach())
                    if self.max_grad_norm is not None:
                        accelerator.clip_grad_norm_([p for _, p in params], self.max_grad_norm)
                    for group_ in optimizer.param_groups:
                        group_["lr"] = self._lr_at(step, total_steps)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    total = accelerator.gather(torch.tensor([loss_sum], device=device)).sum()
                    losses.append(float(total) / n_rows)
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
                                    "fingerprint": fingerprint}
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
def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _save_checkpoint(ckpt_dir: Path, step: int, model: PersonalizedRewardModel, optimizer,
                     state: dict[str, Any], accelerator, keep: int) -> None:
    from safetensors.torch import save_file

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = ckpt_dir / f"step-{step:07d}"
        tmp = ckpt_dir / f".step-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.trainable_state().items()},
                  tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(ckpt_dir.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(path: Path, model: PersonalizedRewardModel, optimizer,
                     fingerprint: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    saved = state.get("fingerprint")
    if saved != json.loads(json.dumps(fingerprint)):
        diff = sorted(k for k in set(fingerprint) | set(saved or {})
                      if (saved or {}).get(k) != json.loads(json.dumps(fingerprint)).get(k))
        raise PluralignError(f"cannot resume from {path}: it was trained with different "
                             f"{', '.join(diff)}; use another output folder or resume=False "
                             "(--no-resume)")
    model.load_trainable_state(load_file(path / "trainable.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return state


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
