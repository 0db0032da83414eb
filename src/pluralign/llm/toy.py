"""Tiny models built in code, for tests and for the LLM runs with known truth.

* :func:`char_tokenizer` — a character-level ``PreTrainedTokenizerFast`` (one token per
  printable ASCII character, plus ``<pad>``, ``<s>``, ``</s>``, ``<unk>``), with no download.
* :func:`tiny_llama` — a randomly initialized ``LlamaForCausalLM`` of that vocabulary.
* :data:`GOLD_REWARDS` — per-user gold rewards computed from the text (fraction of vowels,
  fraction of digits, ...), dense in ``[0, 1]`` and cheap, so a run knows the truth.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

__all__ = ["GOLD_REWARDS", "char_tokenizer", "gold_reward", "tiny_llama"]

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,!?'-:;\n"


def char_tokenizer() -> Any:
    """A character-level tokenizer: BOS is prepended to plain-text prompts, decoding joins
    characters back into the text; no chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def tiny_llama(
    vocab_size: int | None = None,
    *,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 64,
    max_positions: int = 256,
    seed: int = 0,
    **config: Any,
) -> Any:
    """A random ``LlamaForCausalLM`` (seeded; the char tokenizer's vocabulary by default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = vocab_size or len(SPECIAL) + len(CHARACTERS)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **config,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def _fraction(chars: str) -> Callable[[str], float]:
    allowed = set(chars)

    def reward(text: str) -> float:
        return sum(c in allowed for c in text) / max(len(text), 1)

    return reward


GOLD_REWARDS: dict[str, Callable[[str], float]] = {
    "vowels": _fraction("aeiouAEIOU"),
    "digits": _fraction(string.digits),
    "spaces": _fraction(" "),
    "capitals": _fraction(string.ascii_uppercase),
}


def gold_reward(name: str, text: str) -> float:
    """The gold reward ``name`` (:data:`GOLD_REWARDS`) of ``text``."""
    return GOLD_REWARDS[name](text)
