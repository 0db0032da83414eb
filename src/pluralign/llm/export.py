"""Each user's adapter as a standard PEFT LoRA adapter directory, plus the reward head.

User ``u``'s update ``(α/r) B_u A_u`` of every adapted module is exactly a PEFT LoRA adapter
with ``lora_A.weight = A_u``, ``lora_B.weight = B_u``, ``r`` and ``lora_alpha = α`` (PEFT scales by
``lora_alpha / r`` too). :func:`export_adapters` writes, per user, a folder with

* ``adapter_config.json`` — written by ``peft.LoraConfig.save_pretrained`` (target modules are
  the full module names, so PEFT adapts exactly the same layers);
* ``adapter_model.safetensors`` — the factors under PEFT's key names
  (``base_model.model.<module>.lora_A.weight``);
* ``reward_head.safetensors`` and ``reward_head.json`` — the scalar head, the pooling rule, the
  token budget and the user id.

``peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder)`` then reproduces
user ``u``'s backbone; :class:`ExportedReward` adds the head and scores text (a test checks the
rewards equal the multi-user model's). Folder names are the user ids with characters outside
``[A-Za-z0-9._-]`` replaced; ``users.json`` maps ids to folders. Every file is written into a
temporary folder first and moved into place, so an interrupted export leaves no half adapter.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pluralign._atomic import atomic_write_text
from pluralign.errors import PluralignError
from pluralign.llm.reward_model import (
    PersonalizedRewardModel,
    backbone_inputs,
    check_pad_token,
    pad_right,
    pool_hidden,
    tokenize_pairs,
)

__all__ = ["ExportedReward", "export_adapters"]

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"


def _folder_names(users: Sequence[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    taken: set[str] = set()
    for u in users:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", u).strip(".") or "user"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}-{k}"
        taken.add(name)
        names[u] = name
    return names


def export_adapters(model: PersonalizedRewardModel, out: str | Path,
                    users: Sequence[Any] | None = None) -> dict[str, Path]:
    """Write the adapters of ``users`` (default: all) under ``out``; ``{user: folder}``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(out)
    chosen = model.user_ids if users is None else [str(u) for u in users]
    index = model.user_index(chosen).tolist()
    names = _folder_names(model.user_ids)
    layers = list(model.adapted_layers())
    first = layers[0][1]
    config = LoraConfig(r=first.r, lora_alpha=first.alpha, lora_dropout=first.dropout.p
                        if isinstance(first.dropout, torch.nn.Dropout) else 0.0,
                        target_modules=[name for name, _ in layers], bias="none",
                        base_model_name_or_path=model.name_or_path, inference_mode=True)
    head = {"weight": model.head.weight.detach().cpu().contiguous()}
    written: dict[str, Path] = {}
    for user, i in zip(chosen, index, strict=True):
        final = out / names[user]
        tmp = out / f".{names[user]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config.save_pretrained(str(tmp))
        tensors = {}
        for name, layer in layers:
            a, b = layer.user_factors(i)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        save_file(head, str(tmp / HEAD_WEIGHTS))
        atomic_write_text(tmp / HEAD_CONFIG, json.dumps({
            "user_id": user, "pooling": model.pooling, "max_length": model.max_length,
            "share": model.share, "base_model_name_or_path": model.name_or_path,
            "load_kwargs": model.load_kwargs, "pad_token": model.tokenizer.pad_token,
        }, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        written[user] = final
    mapping = out / "users.json"
    previous = json.loads(mapping.read_text()) if mapping.is_file() else {}
    previous.update({u: str(p.name) for u, p in written.items()})
    atomic_write_text(mapping, json.dumps(previous, indent=1))
    return written


class ExportedReward:
    """One user's exported reward model, loaded through PEFT.

    ``ExportedReward(folder)`` loads the base named in the adapter (or ``base``: a local path,
    or an already loaded ``AutoModel``), applies the adapter with
    ``peft.PeftModel.from_pretrained`` and the head; :meth:`score` gives rewards.
    """

    def __init__(self, folder: str | Path, *, base: Any = None, tokenizer: Any = None) -> None:
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not (folder / HEAD_CONFIG).is_file():
            raise PluralignError(f"{folder} is not an exported pluralign adapter "
                                 f"(no {HEAD_CONFIG})")
        self.config = json.loads((folder / HEAD_CONFIG).read_text())
        source = self.config["base_model_name_or_path"]
        load = self.config.get("load_kwargs") or {}
        if base is None or isinstance(base, str | Path):
            base = AutoModel.from_pretrained(str(base or source), **load)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(source), **load)
            check_pad_token(tokenizer, self.config.get("pad_token"), str(source))
        self.tokenizer = tokenizer
        self.model = PeftModel.from_pretrained(base, str(folder)).eval()
        self.head = load_file(str(folder / HEAD_WEIGHTS))["weight"]
        self.user_id = self.config["user_id"]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              batch_size: int = 32) -> np.ndarray:
        """Rewards of ``(prompt, response)`` pairs for this user (float64)."""
        out = []
        pooling, max_length = self.config["pooling"], self.config["max_length"]
        for start in range(0, len(prompts), batch_size):
            sl = slice(start, start + batch_size)
            batch = pad_right(self.tokenizer, tokenize_pairs(self.tokenizer, prompts[sl],
                                                             responses[sl], max_length))
            mask = batch["attention_mask"]
            kwargs = backbone_inputs(self.model.get_base_model(), batch)
            hidden = self.model(**kwargs).last_hidden_state
            out.append(pool_hidden(hidden, mask, pooling) @ self.head.to(hidden.dtype).T)
        return torch.cat(out).squeeze(-1).double().numpy() if out else np.zeros(0)

