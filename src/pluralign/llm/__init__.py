"""The LLM layer: personalized reward models on transformers (P-ShareLoRA on real networks).

* :class:`MultiUserLoRA` — every user's LoRA update of chosen linear modules in stacked tensors
  (``share="B"``, ``"A"``, ``"independent"``, ``"pooled"``);
* :class:`PersonalizedRewardModel` — backbone + multi-user LoRA + scalar head;
* :class:`RewardTrainer` — Bradley–Terry training with accelerate (multi-process, gradient
  accumulation, per-user evaluation, checkpoints and resume); :func:`adapt_user` — few-shot
  adaptation of a new user;
* :func:`export_adapters` / :class:`ExportedReward` — per-user PEFT adapter folders.

Needs the ``llm`` extra (``pip install 'pluralign[llm]'``: transformers, peft, accelerate).
"""

from pluralign.llm.data import EncodedPairs, encode_pairs, split_per_user
from pluralign.llm.export import (
    ExportedReward,
    export_adapters,
    folder_names,
    read_adapter_config,
    read_head_config,
)
from pluralign.llm.lora import SHARE_MODES, MultiUserLoRA, MultiUserLoRALinear
from pluralign.llm.reward_model import PersonalizedRewardModel, load_tokenizer
from pluralign.llm.trainer import RewardTrainer, adapt_user, per_user_metrics

__all__ = [
    "SHARE_MODES",
    "EncodedPairs",
    "ExportedReward",
    "MultiUserLoRA",
    "MultiUserLoRALinear",
    "PersonalizedRewardModel",
    "RewardTrainer",
    "adapt_user",
    "encode_pairs",
    "export_adapters",
    "folder_names",
    "load_tokenizer",
    "per_user_metrics",
    "read_adapter_config",
    "read_head_config",
    "split_per_user",
]
