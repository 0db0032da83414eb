"""A personalized policy: a causal LM with every user's LoRA, and its reference π0 for free.

``π_u(y | x)`` is a causal LM whose chosen linear layers carry user ``u``'s LoRA update
(:class:`~pluralign.llm.MultiUserLoRA`, every share mode). The reference policy ``π0`` of DPO
and of the KL-regularized objective ``E r − η·KL(π‖π0)`` (GSHF, Xiong et al. 2024, ICML 2024,
arXiv 2312.11456) is the same network with the adapters switched off
(:meth:`PersonalizedPolicy.reference`), so no second copy of the weights is kept: DPO's "fixed
reference" costs one extra forward pass, not a model.

**Sequences.** A row is a prompt and a response. The prompt is rendered with the tokenizer's
chat template as one user turn with the generation prompt when the tokenizer has one
(``chat_template="auto"``), else tokenized as plain text with the tokenizer's special tokens;
the response is tokenized without special tokens and ends with the EOS token (a response given
as token ids, e.g. sampled by :meth:`generate`, is used as it is). Only response tokens are
scored: ``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` over the response positions, the prompt and
the padding masked out.

**Conversational rows** (TRL message lists, :meth:`PersonalizedPolicy.encode_conversation`)
are tokenized as TRL's ``DPOTrainer`` tokenizes conversational data: the prompt ids are
``apply_chat_template(prompt, add_generation_prompt=True)``, each response's ids are those of
``apply_chat_template(prompt + response)`` after the prompt (after the longest beginning the
prompt ids share with every response's conversation, TRL's ``common_prefix_length``: a
template may render a prompt alone differently), with no EOS appended (the template ends the
turn). A prompt may also be given to :meth:`~PersonalizedPolicy.prompt_ids`,
:meth:`~PersonalizedPolicy.generate` and :meth:`~PersonalizedPolicy.logprobs` as its messages.

**Truncation** (documented, not refused): the prompt keeps its last ``max_prompt_length``
tokens (default ``max_length // 2``; the end of a prompt is what the response answers), and the
response keeps its first ``max_length − len(prompt)`` tokens (conversational rows too, where
TRL's collator would cut the end of the sequence instead). :attr:`truncated_` counts the rows
of the last :meth:`encode` (or :meth:`encode_conversation`) that were cut.

**Memory.** The log-probabilities never materialize the ``(batch, tokens, vocabulary)``
log-softmax: the decoder body runs once, the response positions are picked out of its hidden
states, and the output layer is applied to them in chunks of ``logits_chunk`` tokens, each chunk
computing ``logit(y_t) − logsumexp(logits)`` and, when gradients are needed, recomputed in the
backward pass (activation checkpointing) so that one chunk's logits are alive at a time. For
SmolLM2's 49k vocabulary that is ~50 MB per 256 tokens instead of gigabytes for a batch.

**Padding.** Position ids are computed from the attention mask (``cumsum − 1``), so a left- or
right-padded batch gives the same log-probabilities as each row alone.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pluralign.errors import ConfigError, PluralignError, PluralignWarning
from pluralign.llm.config import LoraConfig, PolicyModelConfig, check_prompt_budget
from pluralign.llm.data import chat_ids
from pluralign.llm.lora import MultiUserLoRA, TrainableState
from pluralign.llm.reward_model import (
    _unique_users,
    _user_key,
    check_pad_token,
    default_target_modules,
)

__all__ = ["CHAT_TEMPLATES", "Generations", "PersonalizedPolicy", "all_linear_modules"]

CHAT_TEMPLATES = ("auto", "none")
# the keywords that are settings of train-policy's model and lora sections take their defaults
# and checks (the LoRA settings are checked by MultiUserLoRA)
_MODEL = PolicyModelConfig.defaults()
_LORA = LoraConfig.defaults()
NO_TEMPLATE = (
    "the preference data is conversational (TRL message lists) but the policy's "
    "tokenizer has no chat template (or chat_template='none'): the conversation "
    "would be scored as plain 'role: content' text; give a tokenizer with a chat "
    "template, or plain-text prompts"
)
PROMPT_DIVERGES = (
    "the chat template renders a prompt alone (with the generation prompt) "
    "differently from its beginning in the whole conversation; as TRL does, the "
    "response starts where they diverge, so the model is trained on a context "
    "that differs from the one it is sampled with"
)
_UNSUPPORTED_HEADS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def all_linear_modules(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` of ``model`` except its output layer (PEFT's
    ``"all-linear"``): attention and MLP projections of every block."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]  # a transformers model
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not output and name
    ]


@dataclass(frozen=True)
class Generations:
    """Samples of :meth:`PersonalizedPolicy.generate`: ``texts[i][j]`` and ``token_ids[i][j]``
    are the ``j``-th response to ``prompts[i]`` for ``users[i]``; ``token_ids`` end with EOS
    when the model stopped by itself and are cut at ``max_new_tokens`` otherwise.
    ``logprobs[i][j]`` is ``log π(token_ids[i][j] | prompt)`` under the policy that sampled it
    (temperature 1, the whole vocabulary), read off the sampling pass's logits."""

    prompts: list[str]
    users: list[str]
    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    logprobs: list[list[float]] | None = None

    def flat(self) -> tuple[list[str], list[list[int]], list[str]]:
        """``(prompts, response token ids, users)`` with one entry per sample."""
        prompts, ids, users = [], [], []
        for p, u, group in zip(self.prompts, self.users, self.token_ids, strict=True):
            for response in group:
                prompts.append(p)
                ids.append(response)
                users.append(u)
        return prompts, ids, users


class PersonalizedPolicy(TrainableState, nn.Module):
    """Causal LM + multi-user LoRA; the reference is the adapters switched off (module
    docstring).

    Parameters
    ----------
    model:
        A Hugging Face ``...ForCausalLM`` (its weights are frozen). Output layers that scale or
        soft-cap the logits (Gemma 2, Cohere) are refused: the chunked log-probabilities
        apply the output layer as a plain linear map.
    tokenizer:
        Its tokenizer, with a pad token (:func:`~pluralign.llm.reward_model.check_pad_token`).
    users:
        User ids, in adapter order.
    target_modules:
        Linear modules to adapt: a list of names, ``"all-linear"`` (every linear layer but the
        output layer; what a small model needs to move), or ``None`` for PEFT's defaults of
        the model type (``q_proj``/``v_proj`` for Llama).
    r, alpha, share, dropout:
        The multi-user LoRA (:class:`~pluralign.llm.MultiUserLoRA`).
    max_length, max_prompt_length:
        Token budgets of prompt + response and of the prompt (module docstring).
    chat_template:
        ``"auto"`` (use the tokenizer's template when it has one) or ``"none"``.
    logits_chunk:
        Response tokens per chunk of the output layer (memory, not numerics).
    seed:
        Seeds the LoRA initialization.

    The parameters that are ``train-policy`` settings too (``r``, ``alpha``, ``share``,
    ``dropout``: ``lora.*``; ``max_length``, ``max_prompt_length``, ``chat_template``:
    ``model.*``) take those settings' defaults and checks
    (:class:`~pluralign.llm.config.LoraConfig`, :class:`~pluralign.llm.config.PolicyModelConfig`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        users: Sequence[Any],
        *,
        target_modules: Sequence[str] | str | None = None,
        r: int = _LORA["r"],
        alpha: float = _LORA["lora_alpha"],
        share: str = _LORA["share"],
        dropout: float = _LORA["lora_dropout"],
        max_length: int = _MODEL["max_length"],
        max_prompt_length: int | None = _MODEL["max_prompt_length"],
        chat_template: str = _MODEL["chat_template"],
        logits_chunk: int = 256,
        seed: int = 0,
        name_or_path: str | None = None,
        load_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        from pluralign.settings import check_int

        self.user_ids = _unique_users(users)
        if not self.user_ids:
            raise ConfigError("a personalized policy needs at least one user")
        config = getattr(model, "config", None)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]  # a transformers model
        if not isinstance(output, nn.Linear):
            raise ConfigError(
                f"{type(model).__name__} has no linear output layer: give a "
                "...ForCausalLM model (AutoModelForCausalLM)"
            )
        odd = [k for k in _UNSUPPORTED_HEADS if getattr(config, k, None) not in (None, 1, 1.0)]
        if odd:
            raise ConfigError(
                f"{type(model).__name__} transforms its logits ({odd[0]}="
                f"{getattr(config, odd[0])}); the policy's log-probabilities "
                "assume logits = lm_head(hidden)"
            )
        prefix = getattr(model, "base_model_prefix", "model")
        body = getattr(model, prefix, None)
        if not isinstance(body, nn.Module) or body is model:
            raise ConfigError(
                f"cannot find the decoder of {type(model).__name__} (base_model_prefix={prefix!r})"
            )
        self.model = model
        self.tokenizer = check_pad_token(tokenizer, None)
        self.max_length = PolicyModelConfig.check_value("max_length", max_length)
        budget = PolicyModelConfig.check_value("max_prompt_length", max_prompt_length)
        self.max_prompt_length = self.max_length // 2 if budget is None else budget
        check_prompt_budget(self.max_prompt_length, self.max_length)
        PolicyModelConfig.check_value("chat_template", chat_template)
        self.chat_template = chat_template
        self.logits_chunk: int = check_int("logits_chunk", logits_chunk)  # type: ignore[assignment]  # not optional
        self.model_type = getattr(config, "model_type", None)
        self.name_or_path = name_or_path or getattr(config, "_name_or_path", None)
        self.load_kwargs = dict(load_kwargs or {})
        if target_modules == "all-linear" or (
            isinstance(target_modules, list | tuple) and list(target_modules) == ["all-linear"]
        ):
            targets = all_linear_modules(model)
        elif target_modules is None:
            targets = default_target_modules(self.model_type)
        else:
            targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.lora = MultiUserLoRA(
                model, len(self.user_ids), targets, r=r, alpha=alpha, share=share, dropout=dropout
            )
        finally:
            torch.random.set_rng_state(state)
        self._body = body
        self._output = output
        self._index = {u: i for i, u in enumerate(self.user_ids)}
        self.truncated_ = 0
        self.train(False)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        users: Sequence[Any],
        *,
        gguf_file: str | None = None,
        pad_token: str | None = None,
        tokenizer: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> PersonalizedPolicy:
        """Load a causal LM and its tokenizer from a hub name, a local folder or a GGUF file
        (dequantized into a plain, trainable model: :func:`pluralign.llm.models.load_pretrained`)
        and wrap them."""
        from pluralign.llm.models import load_pretrained

        model, tok = load_pretrained(
            name_or_path,
            causal_lm=True,
            gguf_file=gguf_file,
            dtype=torch_dtype,
            tokenizer=tokenizer,
            pad_token=pad_token,
        )
        load_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return cls(
            model, tok, users, name_or_path=str(name_or_path), load_kwargs=load_kwargs, **kwargs
        )

    # ------------------------------------------------------------------ users
    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def share(self) -> str:
        return self.lora.share

    @property
    def device(self) -> torch.device:
        return self._output.weight.device

    def user_index(self, users: Sequence[Any]) -> torch.Tensor:
        """Indices of ``users``; an unknown user raises (naming it), except with
        ``share="pooled"``, whose one adapter serves everybody."""
        out = []
        for u in users:
            key = _user_key(u)
            if key not in self._index:
                if self.share == "pooled":
                    out.append(0)
                    continue
                known = ", ".join(self.user_ids[:10]) + (" ..." if self.n_users > 10 else "")
                raise PluralignError(
                    f"unknown user {key!r}: the policy knows {self.n_users} users ({known})"
                )
            out.append(self._index[key])
        return torch.tensor(out, dtype=torch.long)

    # ------------------------------------------------------------------ parameters
    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The LoRA factors, named ``lora.<module>.lora_A`` / ``lora.<module>.lora_B``."""
        for name, p in self.lora.lora_parameters():
            yield f"lora.{name}", p

    def train(self, mode: bool = True) -> PersonalizedPolicy:
        """Training mode switches on the LoRA dropout only; the base model's own dropout stays
        off (as TRL's ``disable_dropout``), so π0 is deterministic."""
        super().train(mode)
        self.model.eval()
        for _, layer in self.lora.layers():
            layer.dropout.train(mode)
        return self

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Forward passes inside this block are the reference policy π0 (adapters off)."""
        with self.lora.disabled():
            yield

    # ------------------------------------------------------------------ tokens
    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts go through the tokenizer's chat template (module docstring)."""
        return self.chat_template == "auto" and bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str | Sequence[dict]) -> list[int]:
        """Token ids of ``prompt`` as the model sees it (chat template or plain), truncated to
        its last ``max_prompt_length`` tokens. A prompt given as TRL messages (a conversational
        row's prompt) is rendered with the chat template and the generation prompt; it needs
        a tokenizer with a chat template (and ``chat_template="auto"``)."""
        if isinstance(prompt, list | tuple):
            if not prompt:
                raise PluralignError("a prompt must be a non-empty string or message list")
            if not self.uses_chat_template:
                raise ConfigError(NO_TEMPLATE)
            ids = chat_ids(self.tokenizer, list(prompt), add_generation_prompt=True)
        elif not isinstance(prompt, str) or not prompt:
            raise PluralignError(f"a prompt must be a non-empty string, got {prompt!r}")
        elif self.uses_chat_template:
            ids = chat_ids(
                self.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True
            )
        else:
            ids = [int(t) for t in self.tokenizer(prompt, add_special_tokens=True)["input_ids"]]
        return ids[-self.max_prompt_length :]

    def encode_conversation(
        self, prompt: Sequence[dict], responses: Sequence[Sequence[dict]]
    ) -> list[dict[str, list[int]]]:
        """``{"prompt_ids", "response_ids"}`` of each response (a message list) to ``prompt``
        (a message list), as TRL's ``DPOTrainer`` tokenizes a conversational row (module
        docstring; give the chosen and the rejected response together: their prompt is the
        beginning shared with both), then truncated as :meth:`encode` truncates.
        :attr:`truncated_` counts the responses that were cut."""
        if not self.uses_chat_template:
            raise ConfigError(NO_TEMPLATE)
        if not prompt or not responses or not all(responses):
            raise PluralignError("a conversation needs prompt messages and response messages")
        prompt_ids = chat_ids(self.tokenizer, list(prompt), add_generation_prompt=True)
        full = [chat_ids(self.tokenizer, list(prompt) + list(r)) for r in responses]
        start = min(_common_prefix(prompt_ids, ids) for ids in full)
        if start == 0:
            raise PluralignError(
                "the chat template renders the prompt and the conversation "
                "with no common beginning: no prompt tokens to condition on"
            )
        if any(len(ids) == start for ids in full):
            raise PluralignError(
                "a response renders to no tokens after the prompt in the chat template"
            )
        if start < len(prompt_ids):
            warnings.warn(PROMPT_DIVERGES, PluralignWarning, stacklevel=2)
        shared = full[0][:start][-self.max_prompt_length :]
        room = self.max_length - len(shared)
        cut = 0
        out = []
        for ids in full:
            response = ids[start:]
            cut += len(response) > room or start > len(shared)
            out.append({"prompt_ids": list(shared), "response_ids": response[:room]})
        self.truncated_ = cut
        return out

    def response_ids(self, response: str | Sequence[int]) -> list[int]:
        """Token ids of a response: a string gets the EOS token appended; token ids are used
        as given."""
        if isinstance(response, str):
            if not response:
                raise PluralignError("an empty response cannot be scored or trained on")
            ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            eos = self.tokenizer.eos_token_id
            return [int(t) for t in ids] + ([] if eos is None else [int(eos)])
        ids = [int(t) for t in response]
        if not ids:
            raise PluralignError("an empty response cannot be scored or trained on")
        return ids

    def encode(
        self,
        prompts: Sequence[str | Sequence[dict]],
        responses: Sequence[str | Sequence[int]],
        *,
        rows: Sequence[int] | None = None,
    ) -> list[dict[str, list[int]]]:
        """``{"prompt_ids", "response_ids"}`` per row, truncated (module docstring); a prompt
        is a text or TRL messages (:meth:`prompt_ids`), a response a text (EOS appended) or
        token ids. An error names the row (``rows[i]`` when given, else ``i``)."""
        if len(prompts) != len(responses):
            raise PluralignError(f"{len(prompts)} prompts for {len(responses)} responses")
        out, cut = [], 0
        cache: dict[str, list[int]] = {}
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            try:
                prompt = cache.get(p) if isinstance(p, str) else None
                if prompt is None:
                    prompt = self.prompt_ids(p)
                    if isinstance(p, str):
                        cache[p] = prompt
                response = self.response_ids(r)
            except PluralignError as err:
                raise PluralignError(f"row {i if rows is None else rows[i]}: {err}") from None
            room = self.max_length - len(prompt)
            full = len(prompt) + len(response)
            if len(response) > room or (isinstance(p, str) and full > self.max_length):
                cut += 1
            out.append({"prompt_ids": prompt, "response_ids": response[:room]})
        self.truncated_ = cut
        return out

    def collate(
        self, encoded: Sequence[dict[str, list[int]]], *, padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """Pad rows into ``input_ids``, ``attention_mask``, ``response_mask`` (1 on response
        tokens) and ``position_ids`` (from the mask), padded on ``padding_side``."""
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [e["prompt_ids"] + e["response_ids"] for e in encoded]
        width = max(len(r) for r in rows)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        response = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (e, row) in enumerate(zip(encoded, rows, strict=True)):
            start = 0 if padding_side == "right" else width - len(row)
            ids[i, start : start + len(row)] = torch.tensor(row)
            mask[i, start : start + len(row)] = 1
            response[i, start + len(e["prompt_ids"]) : start + len(row)] = 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "response_mask": response,
            "position_ids": positions,
        }

    # ------------------------------------------------------------------ log-probabilities
    def sequence_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        user_index: torch.Tensor | None = None,
        *,
        reference: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ_t log π(y_t | ...), number of response tokens)`` per row (``(batch,)`` each),
        under user ``user_index[i]``'s adapter, or the reference π0 when ``reference``.

        Differentiable in the LoRA factors (no gradient flows under ``reference``)."""
        picked, targets, rows = self._response_states(
            input_ids, attention_mask, response_mask, position_ids, user_index, reference=reference
        )
        grad = contextlib.nullcontext() if not reference else torch.no_grad()
        with grad:
            token_logps = self._token_logprobs(picked, targets)
        total = torch.zeros(
            input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device
        ).index_add(0, rows, token_logps)
        return total, response_mask[:, 1:].bool().sum(1)

    def _response_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        user_index: torch.Tensor | None,
        *,
        reference: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(hidden states predicting the response tokens, those tokens, their rows)``: one
        decoder pass under the users' adapters (or π0), the response positions picked out."""
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
        context = self.reference() if reference else contextlib.nullcontext()
        grad = contextlib.nullcontext() if not reference else torch.no_grad()
        with context, grad, self.lora.route(None if reference else user_index):
            hidden = self._body(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state
        # the token at t is predicted from position t − 1
        targets_mask = response_mask[:, 1:].bool()
        picked = hidden[:, :-1][targets_mask]  # (n tokens, hidden)
        targets = input_ids[:, 1:][targets_mask]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand(
            -1, input_ids.shape[1] - 1
        )[targets_mask]
        return picked, targets, rows

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        user_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sequence_logprobs` under the users' adapters (what a training step calls
        through accelerate's wrapper)."""
        return self.sequence_logprobs(
            input_ids, attention_mask, response_mask, position_ids, user_index
        )

    def _token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``log softmax(W h)[y]`` for each row of ``hidden``, in chunks (module docstring)."""
        weight, bias = self._output.weight, self._output.bias

        def chunk_logprobs(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = nn.functional.linear(h.to(weight.dtype), weight, bias)
            # half-precision logits are scored in float32; float32 and float64 stay as they are
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)

        pieces = []
        for start in range(0, hidden.shape[0], self.logits_chunk):
            h = hidden[start : start + self.logits_chunk]
            y = targets[start : start + self.logits_chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                pieces.append(checkpoint(chunk_logprobs, h, y, use_reentrant=False))
            else:
                pieces.append(chunk_logprobs(h, y))
        if not pieces:
            return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return torch.cat(pieces)

    @torch.no_grad()
    def logprobs(
        self,
        prompts: Sequence[str | Sequence[dict]],
        responses: Sequence[str | Sequence[int]],
        users: Sequence[Any],
        *,
        reference: bool = False,
        batch_size: int = 8,
    ) -> np.ndarray:
        """``log π_u(response | prompt)`` per row (or ``log π0`` with ``reference``), float64."""
        if not len(prompts) == len(responses) == len(users):
            raise PluralignError("prompts, responses and users must have the same length")
        index = self.user_index(users)
        return self.encoded_logprobs(
            self.encode(prompts, responses), index, reference=reference, batch_size=batch_size
        )

    @torch.no_grad()
    def encoded_logprobs(
        self,
        encoded: Sequence[dict[str, list[int]]],
        user_index: torch.Tensor | None = None,
        *,
        reference: bool = False,
        batch_size: int = 8,
    ) -> np.ndarray:
        """:meth:`logprobs` of rows already encoded (``{"prompt_ids", "response_ids"}``, e.g.
        by :meth:`encode` or :meth:`encode_conversation`) under the adapters of
        ``user_index`` (``(rows,)``; ``None`` only with ``reference``)."""
        if user_index is None and not reference:
            raise PluralignError("encoded_logprobs needs the users' indices unless reference")
        was_training = self.training
        self.train(False)
        out = []
        try:
            for start in range(0, len(encoded), batch_size):
                batch = self.collate(encoded[start : start + batch_size])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                user = (
                    None
                    if user_index is None
                    else user_index[start : start + batch_size].to(self.device)
                )
                logps, _ = self.sequence_logprobs(**batch, user_index=user, reference=reference)
                out.append(logps.double().cpu())
        finally:
            self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros(0)

    @torch.no_grad()
    def kl_to_reference(
        self,
        prompts: Sequence[str],
        responses: Sequence[str | Sequence[int]],
        users: Sequence[Any],
        *,
        batch_size: int = 8,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Two estimators of ``KL(π_u ‖ π0)`` per row, for responses ``y`` sampled from ``π_u``
        (float64, ``(rows,)`` each):

        * ``log π_u(y|x) − log π0(y|x)``, the sampled log-ratio (unbiased, can be negative);
        * ``Σ_k KL(π_u(·|x, y_<k) ‖ π0(·|x, y_<k))`` over the response positions, the exact
          next-token KL along the sampled prefix. By the chain rule of KL its mean over
          ``y ~ π_u`` is the same sequence KL; every term is ≥ 0 and its variance is lower
          (the sampled next token is averaged out at each position).

        One pass with the adapters and one without, the vocabulary handled in chunks."""
        if not len(prompts) == len(responses) == len(users):
            raise PluralignError("prompts, responses and users must have the same length")
        index = self.user_index(users)
        encoded = self.encode(prompts, responses)
        weight, bias = self._output.weight, self._output.bias
        was_training = self.training
        self.train(False)
        ratios, kls = [], []
        try:
            for start in range(0, len(encoded), batch_size):
                batch = self.collate(encoded[start : start + batch_size])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                user = index[start : start + batch_size].to(self.device)
                h_pi, targets, rows = self._response_states(
                    **batch, user_index=user, reference=False
                )
                h_ref, _, _ = self._response_states(**batch, user_index=None, reference=True)
                n_rows = batch["input_ids"].shape[0]
                ratio = torch.zeros(n_rows, dtype=torch.float64, device=self.device)
                kl = torch.zeros(n_rows, dtype=torch.float64, device=self.device)
                for lo in range(0, targets.shape[0], self.logits_chunk):
                    hi = lo + self.logits_chunk
                    lp, lq = (
                        nn.functional.linear(h[lo:hi].to(weight.dtype), weight, bias)
                        .to(torch.promote_types(weight.dtype, torch.float32))
                        .log_softmax(-1)
                        for h in (h_pi, h_ref)
                    )
                    y = targets[lo:hi, None]
                    ratio.index_add_(
                        0, rows[lo:hi], (lp.gather(1, y) - lq.gather(1, y)).squeeze(1).double()
                    )
                    kl.index_add_(
                        0, rows[lo:hi], (lp.exp() * (lp - lq)).sum(1).clamp_min(0).double()
                    )
                ratios.append(ratio.cpu())
                kls.append(kl.cpu())
        finally:
            self.train(was_training)
        if not ratios:
            return np.zeros(0), np.zeros(0)
        return torch.cat(ratios).numpy(), torch.cat(kls).numpy()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        users: Sequence[Any],
        *,
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        reference: bool = False,
    ) -> Generations:
        """Sample ``n`` responses per ``(prompt, user)`` from ``π_u`` (or π0), users mixed in
        one ``generate`` call per batch.

        Sampling is from the policy itself: ``top_k`` is off unless given (transformers
        otherwise applies ``top_k=50``), ``top_p=1`` keeps the whole distribution, and no
        generation defaults of the model's ``generation_config`` (repetition penalties, ...)
        apply. Batch ``b`` is drawn with torch's generator seeded from ``(seed, b)`` inside a
        forked RNG, so the global RNG is untouched and a call is reproducible.
        """
        from transformers import GenerationConfig, LogitsProcessorList

        from pluralign.settings import check_float, check_int

        if len(prompts) != len(users):
            raise PluralignError(f"{len(prompts)} prompts for {len(users)} users")
        # check_int / check_float return None only when ``optional``
        n = check_int("n", n)  # type: ignore[assignment]
        max_new_tokens = check_int("max_new_tokens", max_new_tokens)  # type: ignore[assignment]
        temperature = check_float("temperature", temperature, low=0.0, low_open=True)  # type: ignore[assignment]
        top_p = check_float("top_p", top_p, low=0.0, low_open=True, high=1.0, high_open=False)  # type: ignore[assignment]
        top_k = check_int("top_k", top_k, optional=True)
        seed = check_int("seed", seed, minimum=0)  # type: ignore[assignment]
        users = [_user_key(u) for u in users]
        index = self.user_index(users)
        rows = [(i, self.prompt_ids(p)) for i, p in enumerate(prompts) for _ in range(n)]
        config = GenerationConfig(
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k or 0,
            max_new_tokens=max_new_tokens,
            pad_token_id=int(self.tokenizer.pad_token_id),
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        was_training = self.training
        self.train(False)
        samples: list[list[int]] = []
        logps: list[float] = []
        eos = self.tokenizer.eos_token_id
        try:
            for b, start in enumerate(range(0, len(rows), batch_size)):
                chunk = rows[start : start + batch_size]
                batch = self.collate(
                    [{"prompt_ids": ids, "response_ids": []} for _, ids in chunk],
                    padding_side="left",
                )
                user = index[[i for i, _ in chunk]].to(self.device)
                context = self.reference() if reference else contextlib.nullcontext()
                devices = [self.device] if self.device.type == "cuda" else []
                with (
                    torch.random.fork_rng(devices=devices),
                    context,
                    self.lora.route(None if reference else user),
                ):
                    torch.manual_seed(_batch_seed(seed, b))
                    recorder = _SampledLogprobs()
                    out = self.model.generate(  # type: ignore[operator]  # a transformers causal LM
                        input_ids=batch["input_ids"].to(self.device),
                        attention_mask=batch["attention_mask"].to(self.device),
                        generation_config=config,
                        logits_processor=LogitsProcessorList([recorder]),
                    )
                width = batch["input_ids"].shape[1]
                token_logps = recorder.finish(out[:, width:])
                for tokens, row_logps in zip(
                    out[:, width:].cpu().tolist(), token_logps.cpu().tolist(), strict=True
                ):
                    if eos is not None and eos in tokens:
                        tokens = tokens[: tokens.index(eos) + 1]
                    samples.append([int(t) for t in tokens])
                    logps.append(float(sum(row_logps[: len(tokens)])))
        finally:
            self.train(was_training)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in samples]
        group = lambda xs: [xs[i * n : (i + 1) * n] for i in range(len(prompts))]  # noqa: E731
        return Generations(
            prompts=list(prompts),
            users=users,
            texts=group(texts),
            token_ids=group(samples),
            logprobs=group(logps),
        )


class _SampledLogprobs:
    """A logits processor that reads ``log π(y_k | ...)`` of each sampled token off the raw
    logits of the sampling pass (it sits before every warper of ``generate``, so it sees
    ``log_softmax`` of the model's own logits; it changes nothing). Step ``k``'s distribution is
    kept until step ``k + 1`` shows which token was drawn; :meth:`finish` reads the last."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.picked: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.picked.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = scores.double().log_softmax(-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, new tokens)`` log-probabilities of the sampled tokens (pad positions after
        EOS included; the caller cuts each row at its EOS)."""
        if self.previous is not None and new_tokens.shape[1] > len(self.picked):
            self.picked.append(self.previous.gather(1, new_tokens[:, -1:]).squeeze(1))
        if not self.picked:
            return new_tokens.new_zeros(new_tokens.shape, dtype=torch.float64)
        return torch.stack(self.picked, dim=1)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share (TRL's ``common_prefix_length``)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def _warn_truncated(policy: PersonalizedPolicy, what: str) -> None:
    if policy.truncated_:
        warnings.warn(
            f"{policy.truncated_} {what} were longer than max_length="
            f"{policy.max_length} (prompt budget {policy.max_prompt_length}) and "
            "were truncated",
            PluralignWarning,
            stacklevel=3,
        )
