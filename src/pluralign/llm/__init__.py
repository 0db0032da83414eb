"""The LLM layer: personalized reward models and policies on transformers.

Reward models (P-ShareLoRA, Liu et al. 2025, arXiv 2503.19201, on real networks):

* :class:`MultiUserLoRA` — every user's LoRA update of chosen linear modules in stacked tensors
  (``share="B"``, ``"A"``, ``"independent"``, ``"pooled"``);
* :class:`PersonalizedRewardModel` — backbone + multi-user LoRA + scalar head;
* :class:`RewardTrainer` — Bradley–Terry training with accelerate (multi-process, gradient
  accumulation, per-user evaluation, checkpoints and resume); :func:`adapt_user` — few-shot
  adaptation of a new user;
* :func:`export_adapters` / :class:`ExportedReward` — per-user PEFT adapter folders;
* :class:`LastLayerUncertainty` — the bandit layer's confidence set on the reward head.

Policies (the practical forms of GSHF, Xiong et al. 2024, ICML 2024, arXiv 2312.11456):

* :class:`PersonalizedPolicy` — a causal LM with multi-user LoRA, whose reference π0 is the
  adapters switched off; masked response log-probabilities and mixed-user sampling;
* :class:`DPOTrainer` — DPO / IPO / pessimistic DPO against π0;
* :func:`best_of_n` (with last-layer pessimism), :func:`multistep_rejection_sampling`;
* :func:`load_pretrained` — hub name, local folder or GGUF file (dequantized, trainable).

Needs the ``llm`` extra (``pip install 'pluralign[llm]'``: transformers, peft, accelerate).
"""

from pluralign.llm.data import EncodedPairs, encode_pairs, split_per_user
from pluralign.llm.dpo import LOSS_TYPES, DPOTrainer, dpo_loss, encode_dpo_pairs
from pluralign.llm.export import (
    ExportedReward,
    export_adapters,
    folder_names,
    read_adapter_config,
    read_head_config,
)
from pluralign.llm.lora import SHARE_MODES, MultiUserLoRA, MultiUserLoRALinear
from pluralign.llm.models import dequantize, load_pretrained, smollm2_path
from pluralign.llm.policy import Generations, PersonalizedPolicy
from pluralign.llm.reward_model import PersonalizedRewardModel, load_tokenizer
from pluralign.llm.sampling import (
    BestOfN,
    SFTTrainer,
    best_of_n,
    best_of_n_kl_bound,
    multistep_rejection_sampling,
    pool_estimate,
)
from pluralign.llm.trainer import LoRATrainer, RewardTrainer, adapt_user, per_user_metrics
from pluralign.llm.uncertainty import LastLayerUncertainty, pessimism_margins, reference_centers

__all__ = [
    "LOSS_TYPES",
    "SHARE_MODES",
    "BestOfN",
    "DPOTrainer",
    "EncodedPairs",
    "ExportedReward",
    "Generations",
    "LastLayerUncertainty",
    "LoRATrainer",
    "MultiUserLoRA",
    "MultiUserLoRALinear",
    "PersonalizedPolicy",
    "PersonalizedRewardModel",
    "RewardTrainer",
    "SFTTrainer",
    "adapt_user",
    "best_of_n",
    "best_of_n_kl_bound",
    "dequantize",
    "dpo_loss",
    "encode_dpo_pairs",
    "encode_pairs",
    "export_adapters",
    "folder_names",
    "load_pretrained",
    "load_tokenizer",
    "multistep_rejection_sampling",
    "per_user_metrics",
    "pessimism_margins",
    "pool_estimate",
    "read_adapter_config",
    "read_head_config",
    "reference_centers",
    "smollm2_path",
    "split_per_user",
]
