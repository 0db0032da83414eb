"""The typed config sections of the LLM jobs (:mod:`pluralign.llm.config`) and their resolver."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml

from pluralign.errors import ConfigError
from pluralign.llm.config import (
    RENAMED,
    DataConfig,
    DPOConfig,
    LoraConfig,
    PolicyModelConfig,
    RewardModelConfig,
    TrainingConfig,
)
from pluralign.llm.job import RM_SECTIONS, RM_TOP_LEVEL, apply_overrides, resolve_rm_config
from pluralign.settings import Setting, describe, resolve_sections, settings_table, to_plain

ROOT = Path(__file__).resolve().parents[2]
POLICY = {
    "model": PolicyModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainingConfig,
    "dpo": DPOConfig,
}
ALL = (RewardModelConfig, PolicyModelConfig, LoraConfig, DataConfig, TrainingConfig, DPOConfig)
REQUIRED = {"model": {"name_or_path": "some/model"}, "data": {"train": "x.jsonl"}}
OLD_NAMES = {
    ("train", "lr"): "learning_rate",
    ("train", "epochs"): "num_train_epochs",
    ("train", "batch_size"): "train_batch_size",
    ("train", "grad_accum"): "gradient_accumulation_steps",
    ("train", "schedule"): "lr_scheduler_type",
    ("train", "checkpoint_every"): "save_steps",
    ("train", "keep_checkpoints"): "save_total_limit",
    ("lora", "alpha"): "lora_alpha",
    ("lora", "dropout"): "lora_dropout",
}


def _resolve(section: str, **values):
    """``values`` in ``section`` of an otherwise minimal policy config (every section)."""
    config = {"model": {**REQUIRED["model"]}, "data": {**REQUIRED["data"]}}
    config.setdefault(section, {}).update(values)
    return resolve_sections(config, POLICY, top_level={"out": "runs/x"})[section]


# ------------------------------------------------------------------ defaults and names
@pytest.mark.parametrize("name,cls", [*RM_SECTIONS.items(), *POLICY.items()])
def test_defaults_round_trip_through_the_resolver(name, cls):
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    required = REQUIRED.get(name, {})
    explicit = resolve_sections({name: {**defaults, **required}}, {name: cls})[name]
    implicit = resolve_sections({name: required or None}, {name: cls})[name]
    assert explicit == implicit == cls(**{**defaults, **required})
    assert dataclasses.asdict(implicit) == {**defaults, **required}
    # the resolved plain mapping resolves to the same sections again (config.yaml)
    plain = to_plain(resolve_rm_config(REQUIRED))
    assert to_plain(resolve_rm_config(yaml.safe_load(yaml.safe_dump(plain)))) == plain


def test_the_resolved_rm_config_uses_the_new_names():
    plain = to_plain(resolve_rm_config(REQUIRED))
    assert list(plain) == ["model", "lora", "data", "train", "out"]
    assert set(plain["train"]) == set(TrainingConfig.TRAINER_NAMES)
    assert {"lora_alpha", "lora_dropout", "r", "target_modules", "share"} == set(plain["lora"])
    assert plain["out"] == RM_TOP_LEVEL["out"].default == "runs/reward_model"
    assert plain["model"]["pooling"] == "auto" and plain["train"]["save_steps"] == "epoch"


@pytest.mark.parametrize("section,old", sorted(OLD_NAMES))
def test_every_renamed_key_says_its_new_name(section, old):
    new = OLD_NAMES[(section, old)]
    message = f"unknown key '{old}' in '{section}': renamed to '{new}'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_rm_config({**REQUIRED, section: {old: 1}})
    with pytest.raises(ConfigError, match=re.escape(message)):  # and through --set
        resolve_rm_config(apply_overrides(REQUIRED, [f"{section}.{old}=1"]))
    assert RENAMED[section][old] == new
    assert new in {f.name for f in dataclasses.fields(RM_SECTIONS[section])}


def test_renamed_table_has_exactly_the_old_names():
    assert {(s, old) for s, names in RENAMED.items() for old in names} == set(OLD_NAMES)


def test_an_unknown_key_names_the_section_and_lists_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        resolve_rm_config({**REQUIRED, "lora": {"rank": 4}})
    message = str(err.value)
    assert "unknown key(s) ['rank'] in 'lora'; valid: " in message
    assert message.endswith("target_modules, r, lora_alpha, lora_dropout, share")
    with pytest.raises(
        ConfigError,
        match=r"unknown key\(s\) \['dpo'\]; valid: model, lora, "
        r"data, train, out",
    ):
        resolve_rm_config({**REQUIRED, "dpo": {}})
    # a renamed key and an unknown one in the same section: both are reported
    with pytest.raises(
        ConfigError,
        match=r"renamed to 'learning_rate'; unknown key\(s\) "
        r"\['nope'\] in 'train'; valid: num_train_epochs",
    ):
        resolve_rm_config({**REQUIRED, "train": {"lr": 1, "nope": 2}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        resolve_sections(["model"], RM_SECTIONS)
    with pytest.raises(ConfigError, match="'lora' must be a mapping"):
        resolve_rm_config({**REQUIRED, "lora": "B"})  # only model has a shorthand


@pytest.mark.parametrize("cls", ALL)
def test_an_explicit_null_is_refused_for_every_setting_with_a_default(cls):
    section = cls.SECTION
    sections = {section: cls}
    for f in dataclasses.fields(cls):
        config = {section: {**REQUIRED.get(section, {}), f.name: None}}
        if f.metadata["required"]:
            with pytest.raises(ConfigError, match=rf"^{section}\.{f.name} is required"):
                resolve_sections(config, sections)
        elif f.default is None:
            assert getattr(resolve_sections(config, sections)[section], f.name) is None
        else:
            with pytest.raises(ConfigError, match=rf"^{section}\.{f.name} may not be null"):
                resolve_sections(config, sections)


def test_shorthand_null_sections_and_top_level_settings():
    resolved = resolve_rm_config(
        {"model": "m", "lora": None, "train": None, "data": {"train": "x"}, "out": "runs/y"}
    )
    assert resolved["model"] == RewardModelConfig(name_or_path="m")
    assert resolved["lora"] == LoraConfig() and resolved["train"] == TrainingConfig()
    assert resolved["out"] == "runs/y"
    with pytest.raises(ConfigError, match=r"^out must be a non-empty string"):
        resolve_rm_config({**REQUIRED, "out": ""})
    with pytest.raises(ConfigError, match=r"data\.train is required"):
        resolve_rm_config({"model": "m"})
    checked = resolve_sections(
        {"k": 3}, {}, top_level={"k": Setting(1, "k", lambda n, v: v * 2), "j": "default"}
    )
    assert checked == {"k": 6, "j": "default"}


# ------------------------------------------------------------------ ranges
@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "learning_rate", 0),
        ("train", "learning_rate", -1e-3),
        ("train", "learning_rate", 1e6 * 1.0001),
        ("train", "learning_rate", float("inf")),
        ("train", "learning_rate", True),
        ("train", "weight_decay", -1e-9),
        ("train", "weight_decay", 2e6),
        ("train", "num_train_epochs", 0),
        ("train", "num_train_epochs", True),
        ("train", "num_train_epochs", 1.5),
        ("train", "train_batch_size", 0),
        ("train", "gradient_accumulation_steps", 0),
        ("train", "warmup_steps", -1),
        ("train", "seed", -1),
        ("train", "seed", 2**63),
        ("train", "save_steps", 0),
        ("train", "save_steps", True),
        ("train", "save_steps", "5"),
        ("train", "save_steps", "epochs"),
        ("train", "save_total_limit", 0),
        ("train", "max_steps", 0),
        ("train", "max_grad_norm", 0.0),
        ("train", "lr_scheduler_type", "cosine"),
        ("lora", "r", 0),
        ("lora", "r", False),
        ("lora", "lora_alpha", 0.0),
        ("lora", "lora_dropout", 1.0),
        ("lora", "lora_dropout", -0.01),
        ("lora", "share", "C"),
        ("lora", "target_modules", []),
        ("lora", "target_modules", [""]),
        ("data", "test_size", 1.0),
        ("data", "test_size", -0.01),
        ("data", "split_seed", -1),
        ("data", "format", "csv"),
        ("model", "max_length", 0),
        ("model", "max_prompt_length", 0),
        ("model", "chat_template", "chatml"),
        ("model", "gguf_file", "../x.gguf"),
        ("dpo", "beta", 0),
        ("dpo", "beta", float("nan")),
        ("dpo", "pessimism", -0.1),
        ("dpo", "kl_samples", -1),
        ("dpo", "kl_samples", True),
        ("dpo", "loss_type", "hinge"),
        ("dpo", "reward_model", ""),
    ],
)
def test_out_of_range_values_are_refused_naming_section_and_key(section, key, value):
    with pytest.raises(ConfigError, match=rf"^{section}\.{key} "):
        _resolve(section, **{key: value})


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("train", "learning_rate", 1e6, 1e6),
        ("train", "learning_rate", "1e-3", 1e-3),
        ("train", "weight_decay", 0, 0.0),
        ("train", "weight_decay", 1e6, 1e6),
        ("train", "num_train_epochs", 3.0, 3),
        ("train", "num_train_epochs", "2", 2),
        ("train", "save_steps", "epoch", "epoch"),
        ("train", "save_steps", 5, 5),
        ("train", "save_steps", 1, 1),
        ("train", "warmup_steps", 0, 0),
        ("train", "seed", 2**63 - 1, 2**63 - 1),
        ("train", "max_grad_norm", 1e-9, 1e-9),
        ("train", "lr_scheduler_type", "linear", "linear"),
        ("lora", "lora_dropout", 0.0, 0.0),
        ("lora", "lora_dropout", 0.999, 0.999),
        ("lora", "lora_alpha", 1e-9, 1e-9),
        ("lora", "target_modules", "query", ["query"]),
        ("lora", "share", "independent", "independent"),
        ("data", "test_size", 0, 0.0),
        ("model", "max_prompt_length", 255, 255),
        ("model", "chat_template", "none", "none"),
        ("dpo", "pessimism", 0, 0.0),
        ("dpo", "kl_samples", 0, 0),
        ("dpo", "loss_type", "ipo", "ipo"),
    ],
)
def test_values_at_the_edges_are_accepted(section, key, value, expected):
    resolved = getattr(_resolve(section, **{key: value}), key)
    assert resolved == expected and type(resolved) is type(expected)


def test_cross_checks():
    with pytest.raises(
        ConfigError,
        match=r"dpo\.reward_model is required when "
        r"dpo\.loss_type is pessimistic",
    ):
        _resolve("dpo", loss_type="pessimistic")
    with pytest.raises(ConfigError, match=r"^dpo\.reward_model is required"):
        DPOConfig(loss_type="pessimistic")  # in Python too
    dpo = _resolve("dpo", loss_type="pessimistic", reward_model="runs/rm")
    assert dpo.reward_model == "runs/rm" and dpo.pessimism == 1.0
    with pytest.raises(
        ConfigError,
        match=r"model\.max_prompt_length \(256\) must be less "
        r"than model\.max_length \(256\)",
    ):
        _resolve("model", max_prompt_length=256)


def test_building_a_section_in_python_runs_the_same_checks():
    with pytest.raises(ConfigError, match=r"^train\.learning_rate must be"):
        TrainingConfig(learning_rate=0)
    with pytest.raises(ConfigError, match=r"^lora\.lora_dropout must be"):
        LoraConfig(lora_dropout=1.0)
    with pytest.raises(ConfigError, match=r"^model\.name_or_path is required"):
        RewardModelConfig()
    assert dataclasses.replace(TrainingConfig(), num_train_epochs=5).num_train_epochs == 5
    with pytest.raises(ConfigError, match=r"^train\.num_train_epochs"):
        dataclasses.replace(TrainingConfig(), num_train_epochs=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainingConfig().seed = 1  # type: ignore[misc]


# ------------------------------------------------------------------ the trainer's names
def test_trainer_kwargs_are_reward_trainer_parameters():
    from pluralign.llm.trainer import RewardTrainer

    kwargs = TrainingConfig().trainer_kwargs()
    parameters = inspect.signature(RewardTrainer.__init__).parameters
    assert set(kwargs) == {
        "epochs",
        "lr",
        "batch_size",
        "grad_accum",
        "weight_decay",
        "schedule",
        "warmup_steps",
        "max_grad_norm",
        "seed",
        "checkpoint_every",
        "keep_checkpoints",
        "max_steps",
        "logging_steps",
    }
    assert set(kwargs) <= set(parameters), sorted(set(kwargs) - set(parameters))
    assert set(TrainingConfig.TRAINER_NAMES) == {f.name for f in dataclasses.fields(TrainingConfig)}
    train = _resolve(
        "train",
        num_train_epochs=2,
        learning_rate=5e-3,
        train_batch_size=4,
        gradient_accumulation_steps=2,
        lr_scheduler_type="linear",
        save_steps=3,
        save_total_limit=1,
        max_steps=7,
        max_grad_norm=1.0,
        warmup_steps=1,
        weight_decay=0.1,
        seed=9,
        logging_steps=2,
    )
    assert train.trainer_kwargs() == {
        "epochs": 2,
        "lr": 5e-3,
        "batch_size": 4,
        "grad_accum": 2,
        "weight_decay": 0.1,
        "schedule": "linear",
        "warmup_steps": 1,
        "max_grad_norm": 1.0,
        "seed": 9,
        "checkpoint_every": 3,
        "keep_checkpoints": 1,
        "max_steps": 7,
        "logging_steps": 2,
    }
    trainer = RewardTrainer(**train.trainer_kwargs(), progress=False)
    assert trainer.checkpoint_every == 3 and trainer.lr == 5e-3 and trainer.logging_steps == 2


def test_help_texts_list_the_choices_the_checks_accept():
    from pluralign.llm.lora import SHARE_MODES
    from pluralign.llm.reward_model import POOLINGS
    from pluralign.llm.trainer import MAX_LR, SCHEDULES

    helps = {key: text for key, _, text in describe(POLICY | RM_SECTIONS)}
    assert helps["model.pooling"].startswith(" | ".join(POOLINGS))
    assert helps["lora.share"].startswith(" | ".join(SHARE_MODES))
    assert helps["train.lr_scheduler_type"].startswith(" | ".join(SCHEDULES))
    assert float(re.search(r"at most (\S+)\)", helps["train.learning_rate"])[1]) == MAX_LR
    assert float(re.search(r", (\S+)\]\)", helps["train.weight_decay"])[1]) == MAX_LR
    assert "GLOBAL" in helps["train.train_batch_size"]
    assert (
        "auto applies the tokenizer's chat template"
        in describe({"model": PolicyModelConfig})[-1][2]
    )


# ------------------------------------------------------------------ help and docs
@pytest.mark.parametrize("cls", ALL)
def test_every_field_has_help_and_a_check(cls):
    for f in dataclasses.fields(cls):
        assert isinstance(f.metadata["help"], str) and f.metadata["help"].strip(), f.name
        assert callable(f.metadata["check"]), f.name
    for key, _, text in describe({cls.SECTION: cls}):
        assert text.strip(), key


def test_describe_lists_every_setting_in_config_order():
    rows = describe(RM_SECTIONS, RM_TOP_LEVEL)
    keys = [key for key, _, _ in rows]
    assert keys == [
        f"{s}.{f.name}" for s, cls in RM_SECTIONS.items() for f in dataclasses.fields(cls)
    ] + ["out"]
    assert dict((k, d) for k, d, _ in rows)["train.learning_rate"] == 1e-3
    assert dict((k, t) for k, _, t in rows)["model.name_or_path"].startswith("required: ")
    assert all(text.strip() for _, _, text in rows)


def test_docs_hold_the_generated_settings_table():
    """docs/llm.md's train-rm table is settings_table's output (regenerate it after a change:
    ``python -c "from pluralign.settings import settings_table; from pluralign.llm.job
    import RM_SECTIONS, RM_TOP_LEVEL; print(settings_table(RM_SECTIONS, RM_TOP_LEVEL))"``)."""
    docs = (ROOT / "docs" / "llm.md").read_text(encoding="utf-8")
    assert settings_table(RM_SECTIONS, RM_TOP_LEVEL) in docs


def test_the_packaged_config_is_current():
    from pluralign.configfile import load_config

    for path in (
        ROOT / "configs" / "rm_personas.yaml",
        ROOT / "src" / "pluralign" / "configs" / "rm_personas.yaml",
    ):
        resolved = resolve_rm_config(load_config(path))
        assert resolved["lora"].lora_alpha == 16.0 and resolved["train"].learning_rate == 2e-3
    assert (ROOT / "configs" / "rm_personas.yaml").read_bytes() == (
        ROOT / "src" / "pluralign" / "configs" / "rm_personas.yaml"
    ).read_bytes()
