"""The trainers' TRL-style ``args`` (a TrainingConfig or a dict of its keys): the same training
as the keywords, dicts equal to sections, conflicts and bad values refused as a YAML config
refuses them, and docs/names.md's mapping tables checked against the code (and against the
installed transformers, TRL and PEFT)."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from pluralign.data.loaders import TextPreferences
from pluralign.errors import ConfigError
from pluralign.llm import DPOTrainer, PersonalizedRewardModel, RewardTrainer
from pluralign.llm.config import (
    DPOConfig,
    LoraConfig,
    PolicyModelConfig,
    TrainingConfig,
)
from pluralign.llm.policy import PersonalizedPolicy
from pluralign.llm.sampling import SFTTrainer
from pluralign.llm.toy import char_tokenizer, tiny_llama
from pluralign.llm.trainer import (
    _HF_DEFAULTS,
    _TRL_LEARNING_RATES,
    ELSEWHERE,
    training_arguments_table,
)
from pluralign.settings import resolve_sections

ROOT = Path(__file__).resolve().parents[2]
NAMES = ROOT / "docs" / "names.md"
USERS = ["ana", "ben", "chen", "dara", "eli", "fay"]
KEYWORDS = list(TrainingConfig.TRAINER_NAMES.values())
TRAINERS = [RewardTrainer, DPOTrainer, SFTTrainer]

# every training setting away from its default, as a section and as the keywords it replaces
ARGS = dict(
    num_train_epochs=2,
    learning_rate=2e-2,
    train_batch_size=8,
    gradient_accumulation_steps=2,
    weight_decay=0.01,
    lr_scheduler_type="linear",
    warmup_steps=1,
    max_grad_norm=0.5,
    seed=3,
    save_steps=1,
    save_total_limit=1,
    max_steps=3,
    logging_steps=1,
)
KWARGS = {TrainingConfig.TRAINER_NAMES[k]: v for k, v in ARGS.items()}


def settings(trainer) -> dict:
    return {k: getattr(trainer, k) for k in KEYWORDS}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------ the same training
def test_reward_trainer_args_train_exactly_the_keywords_model(tiny_bert, personas):
    rows = personas.subset(np.arange(0, 240, 10))  # 24 rows, 4 per user

    def fit(**kwargs):
        model = PersonalizedRewardModel.from_pretrained(
            tiny_bert, USERS, r=4, max_length=96, dropout=0.1
        )
        start = {k: v.clone() for k, v in model.trainable_state().items()}
        trainer = RewardTrainer(progress=False, **kwargs).fit(model, rows)
        assert any(not torch.equal(start[k], v) for k, v in model.trainable_state().items())
        return trainer, model.trainable_state()

    by_args, state_args = fit(args=TrainingConfig(**ARGS))
    by_keywords, state_keywords = fit(**KWARGS)
    assert settings(by_args) == KWARGS
    same_tensors(state_args, state_keywords)
    assert by_args.global_step_ == by_keywords.global_step_ == 3  # max_steps from args
    assert by_args.log_history_ == by_keywords.log_history_
    assert [e["learning_rate"] for e in by_args.log_history_ if "loss" in e] == pytest.approx(
        [2e-2, 2e-2 * (1 - 1 / 4), 2e-2 * (1 - 2 / 4)]
    )  # warm-up 1, linear over 2×2 steps


def toy_prefs(n: int = 16) -> TextPreferences:
    users = [("vowels", "digits")[i % 2] for i in range(n)]
    return TextPreferences(
        prompts=[f"say {i % 3}" for i in range(n)],
        chosen=["aeiou ea" if u == "vowels" else "1234 567" for u in users],
        rejected=["xyz qrst"] * n,
        users=np.array(users),
    )


def toy_policy() -> PersonalizedPolicy:
    return PersonalizedPolicy(
        tiny_llama(seed=0),
        char_tokenizer(),
        ["vowels", "digits"],
        target_modules="all-linear",
        r=4,
        alpha=8.0,
        share="B",
        seed=0,
    )


def test_dpo_trainer_args_train_exactly_the_keywords_adapters():
    prefs = toy_prefs()
    dpo = dict(beta=0.2, kl_samples=0, progress=False)
    train = dict(
        num_train_epochs=2,
        learning_rate=5e-3,
        train_batch_size=8,
        lr_scheduler_type="linear",
        seed=1,
    )
    fitted = {}
    for how, kwargs in {
        "section": dict(args=TrainingConfig(**train)),
        "dict": dict(args=train),
        "keywords": dict(epochs=2, lr=5e-3, batch_size=8, schedule="linear", seed=1),
    }.items():
        policy = toy_policy()
        trainer = DPOTrainer(**dpo, **kwargs).fit(policy, prefs)
        fitted[how] = (
            trainer,
            {n: p.detach().clone() for n, p in policy.trainable_named_parameters()},
        )
    for how in ("section", "dict"):
        same_tensors(fitted[how][1], fitted["keywords"][1])
        assert fitted[how][0].evaluation_ == fitted["keywords"][0].evaluation_
        assert fitted[how][0].global_step_ == 4
    # trained at all (B starts at zero: the margin moved), and beta reached the loss
    assert fitted["section"][0].evaluation_["margin"] > 0.01
    assert fitted["section"][0].beta == 0.2


# ------------------------------------------------------------------ dicts and defaults
@pytest.mark.parametrize("cls", TRAINERS)
def test_a_dict_is_the_section_it_names(cls):
    assert settings(cls(args=ARGS)) == settings(cls(args=TrainingConfig(**ARGS))) == KWARGS
    assert settings(cls(args={})) == settings(cls(args=TrainingConfig()))
    partial = cls(args={"learning_rate": 0.5, "seed": 7})
    assert settings(partial) == {**settings(cls(args=TrainingConfig())), "lr": 0.5, "seed": 7}
    # the values are the section's, checked and normalized (an int rate becomes a float)
    assert type(cls(args={"learning_rate": 1}).lr) is float


def test_defaults_without_and_with_args():
    assert settings(RewardTrainer()) == settings(RewardTrainer(args=TrainingConfig()))
    assert settings(SFTTrainer()) == settings(SFTTrainer(args={}))
    # DPOTrainer's own keyword defaults (one epoch at 5e-4) are not the section's
    assert (DPOTrainer().epochs, DPOTrainer().lr) == (1, 5e-4)
    assert (DPOTrainer(args={}).epochs, DPOTrainer(args={}).lr) == (3, 1e-3)
    # the signature shows the plain defaults
    parameters = inspect.signature(RewardTrainer.__init__).parameters
    assert repr(parameters["epochs"].default) == "3"
    assert repr(parameters["checkpoint_every"].default) == "'epoch'"


def test_keywords_fill_what_a_dict_leaves_out():
    trainer = DPOTrainer(args={"learning_rate": 1e-2}, epochs=2, batch_size=4)
    assert (trainer.lr, trainer.epochs, trainer.batch_size) == (1e-2, 2, 4)
    assert trainer.seed == TrainingConfig().seed
    # settings args has no key for stay keywords
    trainer = RewardTrainer(
        args=TrainingConfig(), output_dir="runs/x", resume=False, progress=False, cpu=True
    )
    assert (trainer.output_dir, trainer.resume, trainer.progress, trainer.cpu) == (
        "runs/x",
        False,
        False,
        True,
    )


# ------------------------------------------------------------------ conflicts
@pytest.mark.parametrize(
    "cls,args,keywords,field,keyword",
    [
        (RewardTrainer, TrainingConfig(learning_rate=1e-2), {"lr": 1e-3}, "learning_rate", "lr"),
        (RewardTrainer, {"num_train_epochs": 2}, {"epochs": 5}, "num_train_epochs", "epochs"),
        (
            SFTTrainer,
            {"save_steps": "epoch"},
            {"checkpoint_every": 3},
            "save_steps",
            "checkpoint_every",
        ),
        # a TrainingConfig holds every setting: its default conflicts with another keyword value,
        # even one that is DPOTrainer's own default
        (DPOTrainer, TrainingConfig(), {"epochs": 1}, "num_train_epochs", "epochs"),
        (RewardTrainer, TrainingConfig(), {"max_grad_norm": 1.0}, "max_grad_norm", "max_grad_norm"),
        (RewardTrainer, {"seed": 0}, {"seed": False}, "seed", "seed"),  # not the same value
    ],
)
def test_a_setting_given_in_args_and_as_a_keyword_must_agree(cls, args, keywords, field, keyword):
    value = keywords[keyword]
    with pytest.raises(ConfigError) as err:
        cls(args=args, **keywords)
    text = str(err.value)
    assert text.startswith(f"{cls.__name__} got both args.{field}="), text
    assert f" and {keyword}={value!r}: give each setting once" in text
    expected = args[field] if isinstance(args, dict) else getattr(args, field)
    assert f"args.{field}={expected!r} and" in text


def test_the_same_value_twice_is_no_conflict():
    assert RewardTrainer(args=TrainingConfig(learning_rate=1e-2), lr=1e-2).lr == 1e-2
    assert DPOTrainer(args={"num_train_epochs": 1}, epochs=1).epochs == 1
    assert RewardTrainer(args=TrainingConfig(), max_steps=None).max_steps is None


# ------------------------------------------------------------------ bad args
def yaml_error(train: dict) -> str:
    with pytest.raises(ConfigError) as err:
        resolve_sections({"train": train}, {"train": TrainingConfig})
    return str(err.value)


@pytest.mark.parametrize(
    "train",
    [
        {"learning_rate": 0},
        {"learning_rate": float("nan")},
        {"num_train_epochs": 1.5},
        {"train_batch_size": True},
        {"lr_scheduler_type": "cosine"},
        {"save_steps": "never"},
        {"max_grad_norm": -1.0},
        {"learning_rate": None},
        {"lr": 1e-3},
        {"epochs": 2},
        {"foo": 1},
        {"warmup_steps": -1},
    ],
)
@pytest.mark.parametrize("cls", TRAINERS)
def test_a_bad_value_in_args_raises_the_sections_message(cls, train):
    expected = yaml_error(train)
    assert expected.startswith(("train.", "unknown key")), expected
    with pytest.raises(ConfigError) as err:
        cls(args=train)
    assert str(err.value) == expected


def test_transformers_names_elsewhere_in_pluralign_say_where():
    for key, where in ELSEWHERE.items():
        with pytest.raises(
            ConfigError,
            match=rf"^unknown key '{key}' in 'train': pluralign "
            rf"has it as {re.escape(where.python)}",
        ):
            RewardTrainer(args={key: 1})
    with pytest.raises(ConfigError, match=r"\(train\.train_batch_size\); .*the global one"):
        RewardTrainer(args={"per_device_train_batch_size": 8})
    for key in ("beta", "loss_type", "precompute_ref_log_probs"):
        with pytest.raises(
            ConfigError,
            match=rf"'{key}' in 'train': a DPO setting, given as "
            rf"DPOTrainer\({key}=\.\.\.\) \(train-policy: "
            rf"dpo\.{key}\)",
        ):
            DPOTrainer(args={key: 0.1})


class TrainingArguments:  # stands in for transformers' class (not imported)
    pass


@pytest.mark.parametrize(
    "args,hint",
    [
        (LoraConfig(), "a LoraConfig is the 'lora' section, not the training settings"),
        (DPOConfig(), "a DPOConfig is the 'dpo' section"),
        (TrainingArguments(), "transformers' and TRL's argument classes are not read"),
        ([("learning_rate", 1e-3)], "got list"),
        ("train.yaml", "got str"),
    ],
)
def test_args_of_another_kind_are_refused(args, hint):
    with pytest.raises(
        ConfigError,
        match=r"^DPOTrainer: args must be a pluralign\.llm\.config"
        r"\.TrainingConfig or a mapping of its settings "
        r"\(num_train_epochs, learning_rate, ",
    ) as err:
        DPOTrainer(args=args)
    assert hint in str(err.value)


# ------------------------------------------------------------------ docs/names.md
def table_after(heading: str) -> list[list[str]]:
    """The cells of the rows of the first table under ``heading`` in docs/names.md."""
    lines = NAMES.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading)
    rows, inside = [], False
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            inside = True
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif inside:
            break
    assert rows[1][0].startswith("---"), rows[:2]
    return rows[2:]


def code(cell: str) -> list[str]:
    """The backticked names of a cell."""
    return re.findall(r"`([^`]+)`", cell)


def test_docs_hold_the_generated_training_arguments_table():
    """Regenerate with ``python -c "from pluralign.llm.trainer import
    training_arguments_table as t; print(t())"`` after a change."""
    assert training_arguments_table() in NAMES.read_text(encoding="utf-8")
    rows = table_after("## Training arguments")
    assert [r[2] for r in rows[: len(KEYWORDS)]] == [
        f"`train.{f.name}`" for f in dataclasses.fields(TrainingConfig)
    ]
    assert [code(r[4])[0] for r in rows[: len(KEYWORDS)]] == [f"{k}=" for k in KEYWORDS]


def test_names_page_is_linked():
    assert "(docs/names.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(names.md)" in (ROOT / "docs" / "llm.md").read_text(encoding="utf-8")


def test_the_transformers_and_trl_names_and_defaults_are_theirs():
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")

    def defaults(cls) -> dict:
        return {
            f.name: f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()
            if f.default_factory is not dataclasses.MISSING
            else None
            for f in dataclasses.fields(cls)
        }

    hf = defaults(transformers.TrainingArguments)
    assert {k: hf[k] for k in _HF_DEFAULTS} == _HF_DEFAULTS
    names = set(TrainingConfig.TRAINER_NAMES)
    assert names - {"train_batch_size"} <= set(hf)  # the same names, one renamed
    assert set(ELSEWHERE) - {"max_length"} <= set(hf)
    assert "max_length" in defaults(trl.RewardConfig) and "max_length" in defaults(trl.DPOConfig)
    for name, rate in _TRL_LEARNING_RATES.items():
        assert defaults(getattr(trl, name))["learning_rate"] == rate, name
    # every keyword the tables name exists
    parameters = set(inspect.signature(RewardTrainer.__init__).parameters)
    for where in ELSEWHERE.values():
        keyword = where.python.split("=")[0]
        assert keyword in parameters or where.python == "from_pretrained(max_length=)", keyword


def test_the_dpo_table_names_trl_and_pluralign_as_they_are():
    trl = pytest.importorskip("trl")
    trl_fields = {f.name: f for f in dataclasses.fields(trl.DPOConfig)}
    trainer = inspect.signature(DPOTrainer.__init__).parameters
    policy = inspect.signature(PersonalizedPolicy.__init__).parameters
    fit = inspect.signature(DPOTrainer.fit).parameters
    sections = {"dpo": DPOConfig, "model": PolicyModelConfig}
    rows = table_after("## DPO settings")
    assert {code(r[0])[0] for r in rows if code(r[0])} >= {
        "beta",
        "loss_type",
        "precompute_ref_log_probs",
    }
    for trl_name, trl_default, config, keyword, default, _ in rows:
        for name in code(trl_name):
            f = trl_fields[name]
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert code(trl_default) == [str(value)], name
        for key in code(config):
            section, _, rest = key.partition(".")
            assert rest.split(":")[0] in {f.name for f in dataclasses.fields(sections[section])}
        for name in code(keyword):
            if name.startswith("PersonalizedPolicy("):
                assert name[len("PersonalizedPolicy(") : -2] in policy, name
            elif name.startswith("fit("):
                assert name[len("fit(") : -2] in fit, name
            else:
                key = name.split("=")[0]
                assert key in trainer, name
                if name.endswith("=") and default != "—":  # the keyword's own default
                    shown = trainer[key].default
                    shown = str(shown).lower() if isinstance(shown, bool) else str(shown)
                    assert code(default) == [shown], name
                    assert key in {f.name for f in dataclasses.fields(DPOConfig)}, name


def test_the_lora_table_names_peft_and_pluralign_as_they_are():
    peft = pytest.importorskip("peft")
    peft_fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    lora = {f.name: f for f in dataclasses.fields(LoraConfig)}
    models = [
        set(inspect.signature(PersonalizedRewardModel.__init__).parameters),
        set(inspect.signature(PersonalizedPolicy.__init__).parameters),
    ]
    rows = table_after("## LoRA (PEFT's `LoraConfig`)")
    assert {n for r in rows for n in code(r[0])} >= {
        "r",
        "lora_alpha",
        "target_modules",
        "lora_dropout",
        "modules_to_save",
    }
    for peft_names, peft_defaults, config, keyword, default, _ in rows:
        names, values = code(peft_names), code(peft_defaults)
        assert len(values) == len(names), peft_names
        for name, value in zip(names, values, strict=True):
            f = peft_fields[name]
            expected = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert value == str(expected), name
        for key in code(config):
            name = key.removeprefix("lora.")
            assert name in lora, key
            shown = lora[name].default
            assert code(default) == ["null" if shown is None else str(shown)], key
        for name in code(keyword):
            assert all(name.rstrip("=") in m for m in models), name


def test_library_code_does_not_import_trl():
    for module in ("trainer", "dpo", "sampling", "config"):
        text = (ROOT / "src" / "pluralign" / "llm" / f"{module}.py").read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import trl|from trl\b)", text, re.M), module
