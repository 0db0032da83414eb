"""Bad input at the LLM layer's boundaries (issue 10): saved adapter folders, train-rm settings,
checkpoints and adapter folder names. Every test here failed before the hardening."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pluralign.errors import ConfigError, DataValidationError, PluralignError, PluralignWarning
from pluralign.llm import (
    ExportedReward,
    PersonalizedRewardModel,
    RewardTrainer,
    export_adapters,
    folder_names,
)
from pluralign.llm.export import RESERVED_NAMES
from pluralign.llm.job import apply_overrides, resolve_rm_config, train_reward_model

PERSONAS = Path(__file__).parents[1] / "fixtures" / "personas.jsonl"


# ---------------------------------------------------------------------- shared set-up
@pytest.fixture(scope="module")
def rows(personas):
    """24 rows, all six users: 3 optimizer steps per epoch at batch size 8."""
    return personas.subset(np.arange(0, 240, 10))


def _model(path: str, users=("ana", "ben"), **kwargs) -> PersonalizedRewardModel:
    kwargs.setdefault("r", 2)
    kwargs.setdefault("max_length", 64)
    return PersonalizedRewardModel.from_pretrained(path, list(users), **kwargs)


def _users(rows) -> list[str]:
    return list(dict.fromkeys(str(u) for u in rows.users))


def _trainer(**kwargs) -> RewardTrainer:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("lr", 1e-2)
    kwargs.setdefault("batch_size", 8)
    return RewardTrainer(**kwargs)


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory) -> Path:
    model = _model(tiny_bert)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = tmp_path_factory.mktemp("exported")
    export_adapters(model, out)
    return out / "ana"


@pytest.fixture(scope="module")
def base(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert)


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def _head(folder: Path) -> dict:
    return json.loads((folder / "reward_head.json").read_text())


def _write_head(folder: Path, head: dict) -> None:
    (folder / "reward_head.json").write_text(json.dumps(head))


def _load(folder: Path, base) -> ExportedReward:
    model, tokenizer = base
    return ExportedReward(folder, base=copy.deepcopy(model), tokenizer=tokenizer)


# ---------------------------------------------------------------------- 1. no code from files
def _evil_base(tiny_bert: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny BERT whose config.json names a Python file in ``auto_map``; the file
    creates ``marker`` when it is imported."""
    folder = tmp_path / "evil-base"
    shutil.copytree(tiny_bert, folder)
    marker = tmp_path / "marker"
    (folder / "evil_model.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig, BertModel\n\n"
        "class EvilModel(BertModel):\n    config_class = BertConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil_model.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_a_saved_trust_remote_code_is_refused_and_runs_no_code(exported, tiny_bert, tmp_path):
    """A reward_head.json saying trust_remote_code: true, pointing at a base with auto_map,
    used to run that base's Python on load (transformers imports the file)."""
    evil, marker = _evil_base(tiny_bert, tmp_path)
    folder = _copy(exported, tmp_path)
    _write_head(
        folder,
        {
            **_head(folder),
            "base_model_name_or_path": str(evil),
            "load_kwargs": {"trust_remote_code": True},
        },
    )
    with pytest.raises(DataValidationError, match=r"reward_head\.json.*trust_remote_code") as err:
        ExportedReward(folder)
    assert err.value.field == "load_kwargs.trust_remote_code"
    assert "ExportedReward(folder, trust_remote_code=True)" in str(err.value)
    assert not marker.exists()
    # without the saved flag the same base loads with transformers' own BERT: no code runs
    head = {k: v for k, v in _head(folder).items() if k != "load_kwargs"}
    _write_head(folder, head)
    reward = ExportedReward(folder)
    assert type(reward.model.get_base_model()).__name__ == "BertModel"
    assert not marker.exists()


def test_trust_remote_code_comes_only_from_the_caller(exported, tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    seen = []
    for cls in (AutoModel, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    ExportedReward(exported)
    assert seen == [False, False]  # explicit False: transformers never prompts either
    seen.clear()
    ExportedReward(exported, trust_remote_code=True)
    assert seen == [True, True]
    with pytest.raises(ConfigError, match="trust_remote_code must be True or False"):
        ExportedReward(exported, trust_remote_code="yes")


@pytest.mark.parametrize(
    "load_kwargs,field",
    [
        ({"gguf_file": "../model.gguf"}, "load_kwargs.gguf_file"),
        ({"gguf_file": "/etc/model.gguf"}, "load_kwargs.gguf_file"),
        ({"gguf_file": "sub\\model.gguf"}, "load_kwargs.gguf_file"),
        ({"gguf_file": ".."}, "load_kwargs.gguf_file"),
        ({"gguf_file": 3}, "load_kwargs.gguf_file"),
        ({"revision": "main"}, "load_kwargs.revision"),
        ({"cache_dir": "/tmp"}, "load_kwargs.cache_dir"),
        ({"gguf_file": "m.gguf", "token": "x"}, "load_kwargs.token"),
        (["gguf_file"], "load_kwargs"),
    ],
)
def test_only_allow_listed_load_kwargs_may_be_saved(exported, base, tmp_path, load_kwargs, field):
    folder = _copy(exported, tmp_path)
    _write_head(folder, {**_head(folder), "load_kwargs": load_kwargs})
    with pytest.raises(DataValidationError, match=r"reward_head\.json") as err:
        _load(folder, base)
    assert err.value.field == field


def test_gguf_file_must_be_a_plain_file_name(exported, tmp_path):
    from pluralign.llm import read_head_config

    assert read_head_config(exported)["load_kwargs"] == {}
    folder = _copy(exported, tmp_path)
    for value in ("SmolLM2-135M.Q4_1.gguf", None):
        _write_head(folder, {**_head(folder), "load_kwargs": {"gguf_file": value}})
        expected = {"gguf_file": value} if value else {}
        assert read_head_config(folder)["load_kwargs"] == expected
    with pytest.raises(ConfigError, match="gguf_file must be a plain file name"):
        PersonalizedRewardModel.from_pretrained(str(exported), ["a"], gguf_file="../x.gguf")


def _head_case(case: str, head: dict) -> bytes:
    bad = {
        "utf8": lambda: json.dumps(head).encode().replace(b'"ana"', b'"an\xff"'),
        "json": lambda: json.dumps(head).encode()[:-5],
        "duplicate": lambda: (json.dumps(head)[:-1] + ', "pooling": "cls"}').encode(),
        "array": lambda: b"[1, 2]",
        "deep": lambda: b"[" * 5000 + b"]" * 5000,
        "nan": lambda: json.dumps({**head, "max_length": float("nan")}).encode(),
    }
    if case in bad:
        return bad[case]()
    key, _, value = case.partition("=")
    if value == "<drop>":
        return json.dumps({k: v for k, v in head.items() if k != key}).encode()
    return (
        json.dumps({**head, key: yaml.safe_load(value)})
        .encode()
        .replace(b'"<huge>"', b"1" + b"0" * 400)
    )


@pytest.mark.parametrize(
    "case,field",
    [
        ("utf8", None),
        ("json", None),
        ("duplicate", "pooling"),
        ("array", None),
        ("deep", None),
        ("nan", None),
        ("user_id=<drop>", "user_id"),
        ("extra=1", "extra"),
        ("user_id=''", "user_id"),
        ("user_id=7", "user_id"),
        ("pooling=auto", "pooling"),
        ("pooling=max", "pooling"),
        ("pooling=[mean]", "pooling"),
        ("max_length=0", "max_length"),
        ("max_length=-1", "max_length"),
        ("max_length=3", "max_length"),
        ("max_length=true", "max_length"),
        ("max_length=1.5", "max_length"),
        ("max_length=<huge>", None),
        ("max_length='64'", "max_length"),
        ("share=C", "share"),
        ("share=~", "share"),
        ("base_model_name_or_path=3", "base_model_name_or_path"),
        ("base_model_name_or_path=''", "base_model_name_or_path"),
        ("pad_token=5", "pad_token"),
        ("pad_token=''", "pad_token"),
        ("pad_token=<drop>", "pad_token"),
    ],
)
def test_reward_head_json_is_validated_with_a_clean_error(exported, base, tmp_path, case, field):
    """Each of these used to load (to fail later, or to score wrongly) or to raise a raw
    json / KeyError / TypeError."""
    folder = _copy(exported, tmp_path)
    (folder / "reward_head.json").write_bytes(_head_case(case, _head(folder)))
    with pytest.raises(DataValidationError, match=r"reward_head\.json") as err:
        _load(folder, base)
    if field is not None:
        assert err.value.field == field


def _truncate(path: Path, keep: int = 20) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "case,file",
    [
        ("head_missing", "reward_head.safetensors"),
        ("head_truncated", "reward_head.safetensors"),
        ("head_garbage", "reward_head.safetensors"),
        ("head_shape", "reward_head.safetensors"),
        ("head_nan", "reward_head.safetensors"),
        ("head_int", "reward_head.safetensors"),
        ("adapter_missing", "adapter_model.safetensors"),
        ("adapter_truncated", "adapter_model.safetensors"),
        ("adapter_key_dropped", "adapter_model.safetensors"),
        ("adapter_rank", "adapter_model.safetensors"),
        ("config_garbage", "adapter_config.json"),
        ("config_missing", "adapter_config.json"),
        ("config_type", "adapter_config.json"),
        ("config_dora", "adapter_config.json"),
        ("config_r", "adapter_config.json"),
        ("config_targets", "adapter_model.safetensors"),
        ("config_unknown_module", "adapter_model.safetensors"),
    ],
)
def test_damaged_adapter_files_give_a_clean_error_naming_the_file(
    exported, base, tmp_path, case, file
):
    """safetensors' and PEFT's own exceptions (or a silent load of a half adapter: PEFT only
    warns about missing tensors) used to come through."""
    from safetensors.torch import load_file

    folder = _copy(exported, tmp_path)
    path = folder / file
    what = case.split("_", 1)[1]
    if case.startswith(("head", "adapter")):
        tensors = load_file(str(path)) if path.exists() else {}
        if what == "missing":
            path.unlink()
        elif what == "truncated":
            _truncate(path)
        elif what == "garbage":
            path.write_bytes(b"\x00" * 64)
        elif what == "shape":
            _save_tensors(path, {"weight": torch.zeros(1, 7)})
        elif what == "nan":
            _save_tensors(path, {"weight": torch.full_like(tensors["weight"], float("nan"))})
        elif what == "int":
            _save_tensors(path, {"weight": tensors["weight"].long()})
        elif what == "key_dropped":
            _save_tensors(path, dict(list(tensors.items())[1:]))
        elif what == "rank":
            _save_tensors(
                path,
                {
                    k: torch.zeros(5, v.shape[1]) if ".lora_A." in k else v
                    for k, v in tensors.items()
                },
            )
    else:
        config = json.loads((folder / "adapter_config.json").read_text())
        if what == "garbage":
            (folder / "adapter_config.json").write_bytes(b'{"r": 2,,}')
        elif what == "missing":
            (folder / "adapter_config.json").unlink()
        else:
            config.update(
                {
                    "type": {"peft_type": "LOHA"},
                    "dora": {"use_dora": True},
                    "r": {"r": 0},
                    "targets": {"target_modules": config["target_modules"][:1]},
                    "unknown_module": {"target_modules": ["nope"]},
                }[what]
            )
            (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(DataValidationError) as err:
        _load(folder, base)
    assert err.value.path is not None and Path(err.value.path).name == file, str(err.value)


# ---------------------------------------------------------------------- 2. train-rm settings
RAW = {"model": {"name_or_path": "some/model"}, "data": {"train": "x.jsonl"}}


@pytest.mark.parametrize(
    "key,value",
    [
        ("train.learning_rate", 0),
        ("train.learning_rate", -1e-3),
        ("train.learning_rate", float("inf")),
        ("train.learning_rate", float("nan")),
        ("train.learning_rate", "fast"),
        ("train.learning_rate", True),
        ("train.learning_rate", [1e-3]),
        ("train.learning_rate", {"a": 1}),
        ("train.learning_rate", None),
        ("train.learning_rate", 10**400),
        ("train.learning_rate", 1e7),
        ("train.warmup_steps", -3),
        ("train.warmup_steps", 1.5),
        ("train.warmup_steps", True),
        ("train.warmup_steps", None),
        ("train.max_steps", 0),
        ("train.max_steps", -1),
        ("train.max_steps", True),
        ("train.weight_decay", -0.1),
        ("train.weight_decay", 1e308),
        ("train.weight_decay", None),
        ("lora.lora_alpha", 0),
        ("lora.lora_alpha", float("inf")),
        ("lora.lora_alpha", -16),
        ("lora.r", 0),
        ("lora.r", 10**400),
        ("lora.r", 2.5),
        ("lora.r", True),
        ("lora.lora_dropout", 1.0),
        ("lora.lora_dropout", -0.1),
        ("lora.lora_dropout", float("nan")),
        ("model.max_length", 0),
        ("model.max_length", None),
        ("train.train_batch_size", 0),
        ("train.train_batch_size", None),
        ("train.gradient_accumulation_steps", 0),
        ("train.num_train_epochs", 0),
        ("train.num_train_epochs", [3]),
        ("train.num_train_epochs", {"n": 3}),
        ("train.num_train_epochs", False),
        ("train.save_total_limit", 0),
        ("train.max_grad_norm", 0),
        ("train.max_grad_norm", -1.0),
        ("train.max_grad_norm", float("inf")),
        ("train.seed", -1),
        ("train.seed", 10**400),
        ("train.seed", None),
        ("data.test_size", 1.0),
        ("data.test_size", -0.1),
        ("data.test_size", float("nan")),
        ("data.split_seed", -1),
        ("model.pooling", None),
        ("lora.share", None),
        ("train.lr_scheduler_type", None),
        ("train.lr_scheduler_type", ["linear"]),
        ("data.format", "csv"),
        ("model.gguf_file", "../x.gguf"),
        ("model.gguf_file", "a/b.gguf"),
        ("model.name_or_path", {"a": 1}),
        ("data.train", ["a", "b"]),
        ("lora.target_modules", [{"a": 1}]),
        ("train.save_steps", True),
        ("train.save_steps", None),
        ("train.save_steps", 10**400),
        ("out", ""),
        ("out", None),
        ("out", {"a": 1}),
        ("out", ["runs"]),
    ],
)
def test_bad_settings_are_refused_naming_the_key(key, value):
    """``warmup_steps: -3`` used to train by gradient ascent and ``lr: .inf`` to train to NaN,
    both with exit 0; an explicit null skipped every check; 10**400 overflowed later."""
    config = copy.deepcopy(RAW)
    section, _, name = key.partition(".")
    if name:
        config.setdefault(section, {})[name] = value
    else:
        config[section] = value
    with pytest.raises(ConfigError, match=re.escape(key)):
        resolve_rm_config(config)


def test_yaml_and_set_values_are_checked_too(tmp_path):
    from pluralign.configfile import load_config

    path = tmp_path / "rm.yaml"
    for line, key in [
        ("train: {learning_rate: .inf}", "train.learning_rate"),
        ("train: {warmup_steps: -3}", "train.warmup_steps"),
        ("lora: {lora_alpha: .nan}", "lora.lora_alpha"),
        ("train: {num_train_epochs: 1e999}", "train.num_train_epochs"),
        ("train: {seed: ~}", "train.seed"),
    ]:
        path.write_text(f"model: some/model\ndata: {{train: x.jsonl}}\n{line}\n")
        with pytest.raises(ConfigError, match=re.escape(key)):
            resolve_rm_config(load_config(path))
    for item, key in [
        ("train.learning_rate=.inf", "train.learning_rate"),
        ("train.learning_rate=-1", "train.learning_rate"),
        ("train.num_train_epochs=~", "train.num_train_epochs"),
        ("lora.r=" + "9" * 400, "lora.r"),
        ("train.warmup_steps=[1]", "train.warmup_steps"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            resolve_rm_config(apply_overrides(RAW, [item]))
    with pytest.raises(ConfigError, match="--set"):
        apply_overrides(RAW, ["train.learning_rate=" + "[" * 500 + "]" * 500])


def test_valid_settings_still_resolve():
    resolved = resolve_rm_config(
        {
            "model": {"name_or_path": "m", "gguf_file": "SmolLM2.gguf", "pad_token": None},
            "lora": None,  # a null section: all defaults
            "data": {"train": "x.jsonl", "eval": None, "test_size": 0},
            "train": {
                "learning_rate": "1e-3",
                "num_train_epochs": 3.0,
                "max_grad_norm": None,
                "max_steps": None,
                "warmup_steps": 0,
                "weight_decay": 0,
                "seed": 0,
                "save_steps": 5,
            },
            "out": "runs/x",
        }
    )
    train = resolved["train"]
    assert train.learning_rate == 1e-3 and train.num_train_epochs == 3
    assert isinstance(train.num_train_epochs, int) and train.save_steps == 5
    assert resolved["lora"] == resolve_rm_config(RAW)["lora"]
    assert resolved["model"].gguf_file == "SmolLM2.gguf"
    assert train.max_grad_norm is None and resolved["data"].test_size == 0.0
    # a null section can still take --set values
    assert apply_overrides({**RAW, "lora": None}, ["lora.r=2"])["lora"] == {"r": 2}


def test_max_length_must_leave_room_for_text(tiny_bert):
    """BERT's pair takes 3 special tokens; with max_length below 5 the tokenizer only logs an
    error and returns the pair untruncated, so the token budget silently did not hold."""
    for bad in (1, 4):
        with pytest.raises(ConfigError, match=r"max_length=\d leaves no room.*at least 5"):
            _model(tiny_bert, max_length=bad)
    model = _model(tiny_bert, max_length=5)
    assert [
        len(ids)
        for ids in model.tokenize(["a long prompt " * 5], ["and a reply " * 5])["input_ids"]
    ] == [5]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"lr": float("inf")}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": 0.0}, "lr"),
        ({"warmup_steps": -3}, "warmup_steps"),
        ({"epochs": True}, "epochs"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"keep_checkpoints": 0}, "keep_checkpoints"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"seed": -1}, "seed"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"max_steps": 0}, "max_steps"),
        ({"grad_accum": None}, "grad_accum"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
    ],
)
def test_the_trainer_refuses_bad_settings_before_any_work(
    tiny_bert, rows, kwargs, name, monkeypatch
):
    import pluralign.llm.trainer as trainer_module

    def no_encoding(*args, **kw):
        raise AssertionError("encoded rows before checking the settings")

    monkeypatch.setattr(trainer_module, "encode_pairs", no_encoding)
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        _trainer(**kwargs).fit(_model(tiny_bert, users=_users(rows)), rows)


def test_a_non_finite_loss_stops_training_and_saves_nothing(tiny_bert, rows, tmp_path):
    model = _model(tiny_bert, users=_users(rows))
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(PluralignError, match=r"diverged at epoch 1, step 1: the loss is nan"):
        _trainer(epochs=1, output_dir=tmp_path, checkpoint_every=1).fit(model, rows)
    assert not list((tmp_path / "checkpoints").glob("step-*"))


def test_train_rm_that_diverges_exits_with_an_error_and_no_adapters(tiny_bert, tmp_path):
    """lr and weight_decay at their limits (1e6) blow the weights up within a few steps;
    before, train-rm finished with exit 0 and exported NaN adapters."""
    config = {
        "model": {"name_or_path": tiny_bert, "max_length": 64},
        "lora": {"r": 2},
        "data": {"train": str(PERSONAS), "test_size": 0.5},
        "train": {
            "num_train_epochs": 1,
            "learning_rate": 1e6,
            "weight_decay": 1e6,
            "train_batch_size": 16,
            "save_steps": 1,
        },
        "out": str(tmp_path / "run"),
    }
    with pytest.raises(PluralignError, match=r"diverged at epoch 1, step \d+"):
        train_reward_model(config, progress=False)
    assert not (tmp_path / "run" / "adapters").exists()
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step-*"):
        from safetensors.torch import load_file

        assert all(
            bool(torch.isfinite(t).all())
            for t in load_file(ckpt / "trainable.safetensors").values()
        )


# ---------------------------------------------------------------------- 3. checkpoints
@pytest.fixture(scope="module")
def straight(tiny_bert, rows):
    """The trainable state after 2 uninterrupted epochs (6 steps)."""
    model = _model(tiny_bert, users=_users(rows))
    _trainer(epochs=2).fit(model, rows)
    return model.trainable_state()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _interrupted(tiny_bert, rows, out: Path) -> None:
    """Stop after step 4 with checkpoints step-2 and step-4."""
    _trainer(epochs=2, output_dir=out, max_steps=4, checkpoint_every=2).fit(
        _model(tiny_bert, users=_users(rows)), rows
    )
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-0000002",
        "step-0000004",
    ]


def _damage(folder: Path, how: str) -> None:
    if how == "truncated_tensors":
        _truncate(folder / "trainable.safetensors", 100)
    elif how == "garbage_optimizer":
        (folder / "optimizer.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    elif how == "bad_state_json":
        (folder / "state.json").write_text('{"epoch": 1, "group": ')
    elif how == "inconsistent_state":
        state = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps({**state, "global_step": 5}))
    elif how == "missing_state":
        (folder / "state.json").unlink()


@pytest.mark.parametrize(
    "how", ["truncated_tensors", "garbage_optimizer", "bad_state_json", "inconsistent_state"]
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    tiny_bert, rows, straight, tmp_path, how
):
    """Before, a damaged step-4 raised safetensors' / torch's / json's own exception (or, for
    an inconsistent state, resumed at the wrong position)."""
    out = tmp_path / "run"
    _interrupted(tiny_bert, rows, out)
    _damage(out / "checkpoints" / "step-0000004", how)
    model = _model(tiny_bert, users=_users(rows))
    with pytest.warns(PluralignWarning, match=r"step-0000004 is damaged"):
        trainer = _trainer(epochs=2, output_dir=out, checkpoint_every=2).fit(model, rows)
    assert trainer.resumed_from_.endswith("step-0000002")
    assert _same(model.trainable_state(), straight)  # the same model as no interruption
    assert (out / "checkpoints" / "step-0000004.corrupt").is_dir()  # set aside, not deleted
    assert sorted(p.name for p in (out / "checkpoints").glob("step-???????")) == [
        "step-0000004",
        "step-0000006",
    ]  # rewritten by the resumed run


def test_with_no_intact_checkpoint_training_starts_fresh_with_a_warning(
    tiny_bert, rows, straight, tmp_path
):
    out = tmp_path / "run"
    _interrupted(tiny_bert, rows, out)
    _damage(out / "checkpoints" / "step-0000002", "missing_state")
    _damage(out / "checkpoints" / "step-0000004", "truncated_tensors")
    model = _model(tiny_bert, users=_users(rows))
    with pytest.warns(PluralignWarning) as record:
        trainer = _trainer(epochs=2, output_dir=out, checkpoint_every=2).fit(model, rows)
    messages = [str(w.message) for w in record]
    assert len(messages) == 3, messages
    assert re.search(r"step-0000004 is damaged.*trainable\.safetensors", messages[0])
    assert re.search(r"step-0000002 is damaged.*state\.json: file not found", messages[1])
    assert re.search(r"no intact checkpoint.*from scratch", messages[2])
    assert trainer.resumed_from_ is None and trainer.global_step_ == 6
    assert _same(model.trainable_state(), straight)


class _RunsCode:
    """Unpickling this object would call ``open(marker, "w")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_in_optimizer_pt_is_not_executed(tiny_bert, rows, tmp_path):
    out = tmp_path / "run"
    _interrupted(tiny_bert, rows, out)
    marker = tmp_path / "marker"
    torch.save(
        {"state": _RunsCode(marker), "param_groups": []},
        out / "checkpoints" / "step-0000004" / "optimizer.pt",
    )
    model = _model(tiny_bert, users=_users(rows))
    with pytest.warns(PluralignWarning, match=r"optimizer\.pt.*not a readable torch file"):
        trainer = _trainer(epochs=2, output_dir=out, checkpoint_every=2, max_steps=4).fit(
            model, rows
        )
    assert trainer.resumed_from_.endswith("step-0000002")
    assert not marker.exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_checkpoint_files_and_folders_are_fsynced_around_the_rename(
    tiny_bert, rows, tmp_path, monkeypatch
):
    """Each file (trainable.safetensors, optimizer.pt, state.json) is fsynced and renamed into
    the temporary folder, the folder is fsynced, renamed to step-N, and its parent fsynced.
    Before, only state.json was fsynced."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    _trainer(epochs=1, output_dir=out).fit(_model(tiny_bert, users=_users(rows)), rows)
    ckpt = str((out / "checkpoints").resolve())
    tmp, final = f"{ckpt}/.step-0000003.tmp", f"{ckpt}/step-0000003"
    rename = events.index(("replace", tmp, final))
    synced = set()
    for event in events[:rename]:
        if event[0] == "fsync":
            synced.add(event[1])
        elif event[1] in synced and Path(event[2]).parent == Path(tmp):
            synced.add(event[2])  # a fsynced temp file renamed into tmp
    for name in ("trainable.safetensors", "optimizer.pt", "state.json"):
        assert f"{tmp}/{name}" in synced, name
    last_file = max(
        i
        for i, e in enumerate(events[:rename])
        if e[0] == "replace" and Path(e[2]).parent == Path(tmp)
    )
    assert ("fsync", tmp) in events[last_file:rename]
    assert ("fsync", ckpt) in events[rename:]


def test_changing_epochs_on_resume(tiny_bert, rows, straight, tmp_path):
    """Constant schedule: a finished 1-epoch run resumed with epochs=2 is the 2-epoch run (row
    orders and learning rates do not depend on the total). Linear schedule: refused, the
    decay spans the whole run. Fewer epochs than the checkpoint has done: refused."""
    out = tmp_path / "constant"
    _trainer(epochs=1, output_dir=out).fit(_model(tiny_bert, users=_users(rows)), rows)
    model = _model(tiny_bert, users=_users(rows))
    trainer = _trainer(epochs=2, output_dir=out).fit(model, rows)
    assert trainer.resumed_from_.endswith("step-0000003") and trainer.global_step_ == 6
    assert _same(model.trainable_state(), straight)
    assert [h["epoch"] for h in trainer.history_] == [1, 2]
    with pytest.raises(PluralignError, match=r"past the end of a run of epochs=1.*at least 2"):
        _trainer(epochs=1, output_dir=out).fit(_model(tiny_bert, users=_users(rows)), rows)
    out = tmp_path / "linear"
    _trainer(epochs=1, schedule="linear", output_dir=out).fit(
        _model(tiny_bert, users=_users(rows)), rows
    )
    with pytest.raises(PluralignError, match=r"linear schedule spans the whole run.*epochs=1"):
        _trainer(epochs=2, schedule="linear", output_dir=out).fit(
            _model(tiny_bert, users=_users(rows)), rows
        )


def test_a_run_without_resume_replaces_the_later_checkpoints_of_an_earlier_run(
    tiny_bert, rows, tmp_path
):
    """Before, ``resume=False`` left an earlier run's later checkpoints in place: pruning
    deleted the new run's own checkpoint and the next resume was refused ("different lr")."""
    out = tmp_path / "run"
    _trainer(epochs=2, output_dir=out).fit(_model(tiny_bert, users=_users(rows)), rows)
    _trainer(epochs=2, lr=2e-2, output_dir=out, resume=False, max_steps=2, checkpoint_every=2).fit(
        _model(tiny_bert, users=_users(rows)), rows
    )
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000002"]
    again = _trainer(epochs=2, lr=2e-2, output_dir=out).fit(
        _model(tiny_bert, users=_users(rows)), rows
    )
    assert again.resumed_from_.endswith("step-0000002") and again.global_step_ == 6


# ---------------------------------------------------------------------- 4. folder names
NASTY_IDS = [
    "users.json",
    "a/b",
    "a_b",
    "x" * 1000,
    "",
    "..",
    ".",
    ".hidden",
    "CON",
    "nul.txt",
    "Ana",
    "ana",
    "checkpoints",
    "ok-name",
    "a_b-0123456789ab",
    "trailing.",
    "-dash",
    "é",
    "a\x00b",
    "\ud800",
]


def test_folder_names_are_safe_unique_and_independent_of_order():
    names = folder_names(NASTY_IDS)
    values = list(names.values())
    assert len({v.casefold() for v in values}) == len(NASTY_IDS)  # case-insensitive FS too
    for user, name in names.items():
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name), name
        assert not name.endswith(".") and len(name.encode()) <= 128
        assert (
            name.lower() not in RESERVED_NAMES and name.split(".")[0].lower() not in RESERVED_NAMES
        ), (user, name)
    assert names["a_b"] == "a_b" and names["ok-name"] == "ok-name"
    assert names["a/b"] != names["a_b"] and names["a/b"].startswith("a_b-")
    assert names["users.json"] != "users.json" and names["checkpoints"] != "checkpoints"
    assert names["CON"] != "CON" and names["nul.txt"] != "nul.txt"
    assert names["Ana"] != "Ana" and names["ana"] != "ana"  # one folder on macOS/Windows
    assert names["a_b-0123456789ab"] != "a_b-0123456789ab"  # could be a hashed name
    assert len(names["x" * 1000]) == 48 + 1 + 12
    assert folder_names(["ana", "ana", "ben"]) == {"ana": "ana", "ben": "ben"}  # repeats
    shuffled = NASTY_IDS[:]
    for seed in range(3):
        random.Random(seed).shuffle(shuffled)
        assert folder_names(shuffled) == names


def test_export_of_colliding_and_reserved_ids_keeps_every_user(tiny_bert, tmp_path, base):
    users = ["a/b", "a_b", "users.json", "..", "x" * 300]
    model = _model(tiny_bert, users=users)
    written = export_adapters(model, tmp_path / "adapters")
    mapping = json.loads((tmp_path / "adapters" / "users.json").read_text())
    assert set(mapping) == set(users) and len(set(mapping.values())) == len(users)
    for user in users:
        assert written[user].parent == tmp_path / "adapters"
        assert _load(written[user], base).user_id == user
    # a damaged users.json is rewritten with a warning (the folders are intact)
    (tmp_path / "adapters" / "users.json").write_text("{not json")
    with pytest.warns(PluralignWarning, match="users.json"):
        export_adapters(model, tmp_path / "adapters", users=["a_b"])
    assert json.loads((tmp_path / "adapters" / "users.json").read_text()) == {"a_b": "a_b"}


def test_train_rm_decides_adapter_folders_before_training(tiny_bert, tmp_path, monkeypatch):
    """Two ids whose names collide (forced here: a 48-bit hash collision is not findable)
    fail before the trainer runs, not after hours of training."""
    import pluralign.llm.export as export_module

    monkeypatch.setattr(export_module, "_hashed_name", lambda user: "same-0123456789ab")
    monkeypatch.setattr(RewardTrainer, "fit", lambda *a, **k: pytest.fail("training ran"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "user_id": u}) + "\n"
            for u in ["a/b", "a b"] * 2
        )
    )
    config = {
        "model": {"name_or_path": tiny_bert},
        "data": {"train": str(rows), "test_size": 0.0},
        "out": str(tmp_path / "run"),
    }
    with (
        pytest.raises(PluralignError, match="map to the same adapter folder"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        train_reward_model(config, progress=False)
