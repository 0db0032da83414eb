"""One configuration path: the Python constructors that take the settings of the LLM jobs'
config sections as keywords (the trainers, the models, MultiUserLoRA) have those settings'
defaults and refuse exactly what the sections refuse, with the same message under the keyword's
name; and the trainers' public loop on encoded rows trains what ``fit`` trains."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from pluralign.errors import ConfigError
from pluralign.llm import (
    DPOTrainer,
    MultiUserLoRA,
    PersonalizedRewardModel,
    RewardTrainer,
    encode_pairs,
)
from pluralign.llm.config import (
    DPOConfig,
    LoraConfig,
    PolicyModelConfig,
    RewardModelConfig,
    TrainingConfig,
)
from pluralign.llm.policy import PersonalizedPolicy
from pluralign.llm.toy import char_tokenizer, tiny_llama

LORA = {"r": "r", "alpha": "lora_alpha", "share": "share", "dropout": "lora_dropout"}
# constructor -> {keyword: (section, field)}
KEYWORDS = {
    MultiUserLoRA: {k: (LoraConfig, f) for k, f in LORA.items()},
    PersonalizedRewardModel: {
        **{k: (LoraConfig, f) for k, f in LORA.items()},
        "pooling": (RewardModelConfig, "pooling"),
        "max_length": (RewardModelConfig, "max_length"),
    },
    PersonalizedPolicy: {
        **{k: (LoraConfig, f) for k, f in LORA.items()},
        **{k: (PolicyModelConfig, k) for k in ("max_length", "max_prompt_length", "chat_template")},
    },
    DPOTrainer: {
        k: (DPOConfig, k) for k in ("beta", "loss_type", "kl_samples", "precompute_ref_log_probs")
    },
    RewardTrainer: {k: (TrainingConfig, f) for f, k in TrainingConfig.TRAINER_NAMES.items()},
}


@pytest.mark.parametrize("cls", list(KEYWORDS), ids=lambda c: c.__name__)
def test_constructor_defaults_are_the_sections(cls):
    parameters = inspect.signature(cls.__init__).parameters
    for keyword, (section, name) in KEYWORDS[cls].items():
        default = parameters[keyword].default
        # the trainers' loop keywords show their default through a wrapper (args conflicts)
        shown = default.value if type(default).__name__ == "_Default" else default
        assert shown == section.defaults()[name], (cls.__name__, keyword)
        assert type(shown) is type(section.defaults()[name]), (cls.__name__, keyword)


def _outcome(make) -> str | None:
    """``None`` if ``make()`` is accepted, else its ConfigError's message."""
    try:
        make()
    except ConfigError as err:
        return str(err)
    return None


def _same(section_outcome: str | None, keyword_outcome: str | None, field: str, keyword: str):
    """The keyword is refused iff the section's setting is, with the section's message under
    the keyword's name (the section names it ``SECTION.field``)."""
    if section_outcome is None:
        assert keyword_outcome is None, keyword_outcome
    else:
        assert keyword_outcome is not None, section_outcome
        _, _, rest = section_outcome.partition(f".{field} ")
        assert rest, section_outcome
        assert keyword_outcome == f"{keyword} {rest}", (keyword_outcome, section_outcome)


# values that are not text (the sections read "8" or 8.0 from a YAML file; a keyword is strict)
BAD_OR_GOOD = [0, 1, 2, 3, -1, 0.0, 0.5, 1.0, 16, True, False, [1], {"a": 1}, 10**400]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 16)


@pytest.mark.parametrize("keyword", ["alpha", "dropout", "share"])
@pytest.mark.parametrize("value", [*BAD_OR_GOOD, float("nan"), float("inf"), "B", "C", "pooled"])
def test_multi_user_lora_refuses_what_the_lora_section_refuses(keyword, value):
    field = LORA[keyword]
    _same(
        _outcome(lambda: LoraConfig(**{field: value})),
        _outcome(lambda: MultiUserLoRA(Net(), 2, ["proj"], **{keyword: value})),
        field,
        keyword,
    )


def test_the_lora_rank_is_the_sections_check_under_its_name():
    for value in (0, -1, True, 2.5, 10**400):
        section = _outcome(lambda v=value: LoraConfig(r=v))
        keyword = _outcome(lambda v=value: MultiUserLoRA(Net(), 2, ["proj"], r=v))
        assert keyword == "LoRA rank " + section.replace("lora.r", "r"), (value, keyword)
    assert MultiUserLoRA(Net(), 2, ["proj"], r=3).r == 3


def _policy(**kwargs) -> PersonalizedPolicy:
    return PersonalizedPolicy(
        tiny_llama(seed=0), char_tokenizer(), ["a", "b"], target_modules="all-linear", **kwargs
    )


# the sections also read a whole float (8.0 in a YAML file) as an integer; a keyword is strict
INTEGERS = [v for v in BAD_OR_GOOD if not isinstance(v, float)]


@pytest.mark.parametrize("value", [*INTEGERS, 64, None])
def test_the_policy_budget_is_the_sections(value):
    if value is None:  # null means "half of max_length" for the prompt budget only
        assert _policy(max_prompt_length=None).max_prompt_length == 128
    else:
        _same(
            _outcome(lambda: PolicyModelConfig(name_or_path="m", max_length=value)),
            _outcome(lambda: _policy(max_length=value)),
            "max_length",
            "max_length",
        )
    # the check across the two budgets: the same message without the section prefix
    section = _outcome(
        lambda: PolicyModelConfig(name_or_path="m", max_length=8, max_prompt_length=8)
    )
    assert section.startswith("model.max_prompt_length (8) must be less than model.max_length")
    assert _outcome(lambda: _policy(max_length=8, max_prompt_length=8)) == section.replace(
        "model.", ""
    )


@pytest.mark.parametrize("value", ["auto", "none", "jinja", 1])
def test_the_policy_chat_template_is_the_sections(value):
    _same(
        _outcome(lambda: PolicyModelConfig(name_or_path="m", chat_template=value)),
        _outcome(lambda: _policy(chat_template=value)),
        "chat_template",
        "chat_template",
    )


@pytest.mark.parametrize("value", ["auto", "mean", "cls", "last", "max", None, 1])
def test_the_reward_model_pooling_is_the_sections(value):
    backbone = tiny_llama(seed=0).model
    section = _outcome(lambda: RewardModelConfig(name_or_path="m", pooling=value))
    keyword = _outcome(
        lambda: PersonalizedRewardModel(
            backbone, char_tokenizer(), ["a"], target_modules=["q_proj"], pooling=value
        )
    )
    if value is None:  # the section: "may not be null"; the keyword: the check itself
        assert section.startswith("model.pooling may not be null") and keyword.startswith(
            "pooling must be one of auto, mean, cls, last, got None"
        )
    else:
        _same(section, keyword, "pooling", "pooling")


LOOP_VALUES = {
    "num_train_epochs": [1, 0, -2, True, 2.5, 10**400],
    "learning_rate": [1e-3, 1, 0, -1e-3, 1e7, float("inf"), float("nan"), True],
    "train_batch_size": [8, 0, True],
    "gradient_accumulation_steps": [2, 0, 1.5],
    "weight_decay": [0, 0.1, -0.1, 1e308],
    "lr_scheduler_type": ["linear", "constant", "cosine", 1],
    "warmup_steps": [0, 3, -3, 1.5],
    "max_grad_norm": [None, 1.0, 0, -1.0, float("inf")],
    "seed": [0, 7, -1, 10**400, True],
    "save_steps": ["epoch", 5, np.int64(5), 0, "never", True, 10**400],
    "save_total_limit": [1, 0],
    "max_steps": [None, 4, 0, -1, True],
    "logging_steps": [1, 0, False],
}


@pytest.mark.parametrize(
    "field,value", [(f, v) for f, values in LOOP_VALUES.items() for v in values]
)
@pytest.mark.parametrize("cls", [RewardTrainer, DPOTrainer])
def test_the_trainer_keywords_refuse_what_the_train_section_refuses(cls, field, value):
    keyword = TrainingConfig.TRAINER_NAMES[field]
    _same(
        _outcome(lambda: TrainingConfig(**{field: value})),
        _outcome(lambda: cls(**{keyword: value})._check()),
        field,
        keyword,
    )


@pytest.mark.parametrize(
    "key,value",
    [
        ("beta", 0),
        ("beta", float("nan")),
        ("beta", 0.5),
        ("loss_type", "hinge"),
        ("loss_type", "ipo"),
        ("kl_samples", -1),
        ("kl_samples", 0),
        ("precompute_ref_log_probs", 1),
        ("precompute_ref_log_probs", True),
    ],
)
def test_the_dpo_keywords_refuse_what_the_dpo_section_refuses(key, value):
    extra = {"reward_model": "runs/rm"} if key == "loss_type" else {}
    _same(
        _outcome(lambda: DPOConfig(**{key: value}, **extra)),
        _outcome(lambda: DPOTrainer(**{key: value})._check()),
        key,
        key,
    )


def test_a_number_written_as_text_is_read_from_a_config_but_not_from_a_keyword():
    assert TrainingConfig(learning_rate="1e-3").learning_rate == 1e-3
    with pytest.raises(ConfigError, match=r"^lr must be a finite number > 0 and <= 1e\+06, got"):
        RewardTrainer(lr="1e-3")._check()
    with pytest.raises(ConfigError, match=r"^LoRA rank r must be a positive integer, got '2'"):
        MultiUserLoRA(Net(), 2, ["proj"], r="2")


# ------------------------------------------------------------------ the public loop
def test_fit_encoded_trains_what_fit_trains(tiny_bert, personas):
    rows = personas.subset(np.arange(0, 240, 10))
    users = list(dict.fromkeys(str(u) for u in rows.users))

    def model() -> PersonalizedRewardModel:
        return PersonalizedRewardModel.from_pretrained(tiny_bert, users, r=2, max_length=64)

    settings = dict(epochs=2, lr=2e-2, batch_size=8, grad_accum=2, seed=1, progress=False)
    by_fit, encoded = model(), model()
    fitted = RewardTrainer(**settings).fit(by_fit, rows)
    looped = RewardTrainer(**settings).fit_encoded(encoded, encode_pairs(encoded, rows))
    a, b = by_fit.trainable_state(), encoded.trainable_state()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert looped.log_history_ == fitted.log_history_ and looped.global_step_ == 4
    assert any(not torch.equal(a[k], model().trainable_state()[k]) for k in a)  # it trained
