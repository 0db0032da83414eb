"""A personalized reward model: a transformer backbone, multi-user LoRA and a scalar head.

``r_u(prompt, response) = wᵀ pool(h_u(prompt, response))`` where ``h_u`` is the backbone's last
hidden state under user ``u``'s LoRA update (:mod:`pluralign.llm.lora`) and ``w`` a shared linear
head without bias (a bias cancels in the Bradley–Terry likelihood
``P(chosen ≻ rejected) = σ(r_u(x, y_c) − r_u(x, y_r))``, so it is not identifiable). This is
P-ShareLoRA's personalized reward model (Liu et al. 2025, arXiv 2503.19201, §4; ``share="B"``
by default).

``pooling``: ``"mean"`` (masked mean over tokens, what sentence-transformers' MiniLM uses),
``"cls"`` (the first token) or ``"last"`` (the last non-pad token, how a causal LM is read);
``"auto"`` takes ``"mean"`` for encoders (model types with a masked-LM head in transformers)
and ``"last"`` otherwise.

User ids are kept as strings (``7`` and ``"7"`` are the same user). A user the model does not
know raises :class:`~pluralign.errors.PluralignError`; nothing is scored with another user's
adapter.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pluralign.errors import ConfigError, PluralignError
from pluralign.llm.config import LoraConfig, RewardModelConfig
from pluralign.llm.lora import MultiUserLoRA, MultiUserLoRALinear, TrainableState

__all__ = [
    "POOLINGS",
    "PersonalizedRewardModel",
    "backbone_inputs",
    "default_target_modules",
    "load_tokenizer",
    "pad_right",
    "pool_hidden",
    "tokenize_pairs",
]

POOLINGS = ("auto", "mean", "cls", "last")
# the keywords that are settings of train-rm's model and lora sections take their defaults and
# checks (the LoRA settings are checked by MultiUserLoRA)
_MODEL = RewardModelConfig.defaults()
_LORA = LoraConfig.defaults()


def default_target_modules(model_type: str | None) -> list[str]:
    """PEFT's default LoRA targets for a transformers ``model_type`` (e.g. query/value)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # no model type (None) has no default targets: refused below
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)  # type: ignore[arg-type]
    if not targets:
        raise ConfigError(
            f"no default LoRA target modules for model type {model_type!r}; give target_modules"
        )
    return list(targets)


def _auto_pooling(config: Any) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (
        "mean"
        if getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        else "last"
    )


def load_tokenizer(
    name_or_path: str, *, pad_token: str | None = None, gguf_file: str | None = None
) -> Any:
    """``AutoTokenizer.from_pretrained`` with a checked pad token.

    A tokenizer without a pad token is refused unless ``pad_token="eos"`` (pad with its EOS
    token; padding is masked out, so it does not change rewards) or another literal token.
    """
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    # never run a folder's own Python (auto_map), and never ask on a terminal whether to
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False, **kwargs)
    return check_pad_token(tokenizer, pad_token, str(name_or_path))


def check_pad_token(tokenizer: Any, pad_token: str | None, name: str = "the tokenizer") -> Any:
    """Set or check ``tokenizer.pad_token`` (see :func:`load_tokenizer`)."""
    if pad_token == "eos":
        if tokenizer.eos_token is None:
            raise ConfigError(f"{name}: pad_token='eos' but the tokenizer has no EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    elif pad_token is not None:
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token is None:
        raise ConfigError(
            f"{name}: the tokenizer has no pad token, so batches cannot be "
            "padded; set pad_token: eos (or another token) in the config, or "
            "tokenizer.pad_token = tokenizer.eos_token"
        )
    return tokenizer


class PersonalizedRewardModel(TrainableState, nn.Module):
    """Backbone + multi-user LoRA + scalar head (module docstring).

    Parameters
    ----------
    backbone:
        A Hugging Face model returning ``last_hidden_state`` (``AutoModel``); a ``...ForCausalLM``
        is unwrapped to its base model. Its weights are frozen.
    tokenizer:
        Its tokenizer, with a pad token (:func:`check_pad_token`).
    users:
        The user ids, in adapter order.
    target_modules, r, alpha, share, dropout:
        The multi-user LoRA (:class:`~pluralign.llm.MultiUserLoRA`); ``target_modules=None``
        takes PEFT's defaults for the model type.
    pooling:
        ``"auto"``, ``"mean"``, ``"cls"`` or ``"last"``.
    max_length:
        Token budget of ``prompt + response`` (longest-first truncation).
    disable_dropout:
        Switch the backbone's own dropout off in training (as TRL's reward trainer does); the
        LoRA dropout stays.
    seed:
        Seeds the LoRA and head initialization.
    name_or_path:
        Where the backbone came from (written into exported adapters).

    The parameters that are ``train-rm`` settings too (``r``, ``alpha``, ``share``,
    ``dropout``: ``lora.*``; ``pooling``, ``max_length``: ``model.*``) take those settings'
    defaults and checks (:class:`~pluralign.llm.config.LoraConfig`,
    :class:`~pluralign.llm.config.RewardModelConfig`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        users: Sequence[Any],
        *,
        target_modules: Sequence[str] | None = None,
        r: int = _LORA["r"],
        alpha: float = _LORA["lora_alpha"],
        share: str = _LORA["share"],
        dropout: float = _LORA["lora_dropout"],
        pooling: str = _MODEL["pooling"],
        max_length: int = _MODEL["max_length"],
        disable_dropout: bool = True,
        seed: int = 0,
        name_or_path: str | None = None,
        load_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        RewardModelConfig.check_value("pooling", pooling)
        self.user_ids = _unique_users(users)
        if not self.user_ids:
            raise ConfigError("a personalized reward model needs at least one user")
        base = getattr(backbone, "base_model", backbone)
        if base is not backbone and hasattr(backbone, "lm_head"):
            backbone = base  # read hidden states, skip lm_head
        self.backbone = backbone
        config = getattr(backbone, "config", None)
        self.model_type = getattr(config, "model_type", None)
        self.pooling = _auto_pooling(config) if pooling == "auto" else pooling
        self.tokenizer = check_pad_token(tokenizer, None)
        self.max_length = _check_max_length(max_length, self.tokenizer)
        self.disable_dropout = disable_dropout
        self.name_or_path = name_or_path or getattr(config, "_name_or_path", None)
        self.load_kwargs = dict(load_kwargs or {})
        targets = (
            default_target_modules(self.model_type)
            if target_modules is None
            else list(target_modules)
        )
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.lora = MultiUserLoRA(
                backbone,
                len(self.user_ids),
                targets,
                r=r,
                alpha=alpha,
                share=share,
                dropout=dropout,
            )
            hidden = int(getattr(config, "hidden_size", 0) or _hidden_size(backbone))
            self.head = nn.Linear(hidden, 1, bias=False)
            nn.init.normal_(self.head.weight, std=1.0 / np.sqrt(hidden))
        finally:
            torch.random.set_rng_state(generator_state)
        self._index = {u: i for i, u in enumerate(self.user_ids)}
        self.train(False)

    # ------------------------------------------------------------------ construction
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
    ) -> PersonalizedRewardModel:
        """Load ``AutoModel`` + ``AutoTokenizer`` from a hub name or local folder (offline
        here) and wrap them; ``gguf_file`` loads a GGUF checkpoint (e.g. SmolLM2): a plain file
        name inside that folder, as exported adapters record it, dequantized into a plain model
        (:func:`pluralign.llm.models.load_pretrained`, which this shares with the policy).

        Remote code is never enabled (``trust_remote_code`` stays ``False``): a model folder
        whose ``config.json`` names Python files in ``auto_map`` loads with transformers' own
        class for its ``model_type``, or is refused."""
        from pluralign.llm.models import load_pretrained

        backbone, tok = load_pretrained(
            name_or_path,
            causal_lm=False,
            gguf_file=gguf_file,
            dtype=torch_dtype,
            tokenizer=tokenizer,
            pad_token=pad_token,
        )
        load_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return cls(
            backbone, tok, users, name_or_path=str(name_or_path), load_kwargs=load_kwargs, **kwargs
        )

    # ------------------------------------------------------------------ users
    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def share(self) -> str:
        return self.lora.share

    def user_index(self, users: Sequence[Any]) -> torch.Tensor:
        """Indices of ``users``; an unknown user raises (naming it). A ``share="pooled"``
        model ignores users, so it scores any user id with its one reward."""
        if self.share == "pooled":
            return torch.tensor([self._index.get(_user_key(u), 0) for u in users], dtype=torch.long)
        out = []
        for u in users:
            key = _user_key(u)
            if key not in self._index:
                known = ", ".join(self.user_ids[:10]) + (" ..." if self.n_users > 10 else "")
                raise PluralignError(
                    f"unknown user {key!r}: the model knows {self.n_users} "
                    f"users ({known}); add it with add_user / adapt"
                )
            out.append(self._index[key])
        return torch.tensor(out, dtype=torch.long)

    def add_user(self, user: Any) -> int:
        """Register a new user whose factors start at the mean of the others'; its index."""
        key = _user_key(user)
        if key in self._index:
            raise PluralignError(f"user {key!r} already exists")
        if self.share == "pooled":
            raise PluralignError("share='pooled' has no per-user factors to add a user to")
        index = self.lora.add_user()
        self.user_ids.append(key)
        self._index[key] = index
        return index

    # ------------------------------------------------------------------ parameters
    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The LoRA factors (``lora.<module>.lora_A`` ...) and the head."""
        for name, p in self.lora.lora_parameters():
            yield f"lora.{name}", p
        yield "head.weight", self.head.weight  # type: ignore[misc]  # a Parameter, typed Tensor

    def train(self, mode: bool = True) -> PersonalizedRewardModel:
        super().train(mode)
        if self.disable_dropout:
            self.backbone.eval()
            for _, layer in self.lora.layers():
                layer.dropout.train(mode)
        return self

    # ------------------------------------------------------------------ forward
    def tokenize(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, list]:
        """Unpadded token ids of each ``(prompt, response)`` pair (:func:`tokenize_pairs`)."""
        return tokenize_pairs(self.tokenizer, prompts, responses, self.max_length)

    def collate(self, encoded: Sequence[dict[str, list]]) -> dict[str, torch.Tensor]:
        """Pad single encodings into a batch (:func:`pad_right`)."""
        return pad_right(self.tokenizer, list(encoded))

    def pooled(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        user_index: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The pooled last-layer features ``φ_u(x, y)`` (``(batch, hidden)``) that the head
        is linear in: ``r_u = wᵀ φ_u``."""
        kwargs = backbone_inputs(
            self.backbone,
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
            },
        )
        with self.lora.route(user_index):
            hidden = self.backbone(**kwargs).last_hidden_state
        return pool_hidden(hidden, attention_mask, self.pooling).to(self.head.weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        user_index: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards ``(batch,)`` of tokenized ``(prompt, response)`` rows for users
        ``user_index`` (``(batch,)``; ignored when ``share="pooled"``)."""
        return self.head(
            self.pooled(input_ids, attention_mask, user_index, token_type_ids)
        ).squeeze(-1)

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        users: Sequence[Any],
        *,
        batch_size: int = 32,
        conversations: Sequence[list | None] | None = None,
    ) -> np.ndarray:
        """Rewards ``r_u(prompt, response)`` as a float64 array (evaluation mode).

        ``conversations[i]`` (optional) is row ``i``'s whole conversation as TRL messages
        (``None`` for a plain-text row): with a chat template it is what is tokenized, as in
        training (:func:`pluralign.llm.data.encode_texts`;
        :func:`~pluralign.llm.data.conversations` gives them for a data set's rows)."""
        return self._batched(prompts, responses, users, batch_size, self.forward, conversations)

    @torch.no_grad()
    def features(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        users: Sequence[Any],
        *,
        batch_size: int = 32,
        conversations: Sequence[list | None] | None = None,
    ) -> np.ndarray:
        """Pooled features ``φ_u(prompt, response)`` (``(n, hidden)`` float64): with the head
        ``w``, ``features(...) @ w`` equals :meth:`score` (the last-layer view of
        :mod:`pluralign.llm.uncertainty`); ``conversations`` as for :meth:`score`."""
        return self._batched(prompts, responses, users, batch_size, self.pooled, conversations)

    def _batched(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        users: Sequence[Any],
        batch_size: int,
        fn: Any,
        conversations: Sequence[list | None] | None = None,
    ) -> np.ndarray:
        from pluralign.llm.data import encode_texts

        if not len(prompts) == len(responses) == len(users):
            raise PluralignError("prompts, responses and users must have the same length")
        if conversations is not None and len(conversations) != len(prompts):
            raise PluralignError(f"{len(conversations)} conversations for {len(prompts)} rows")
        index = self.user_index(users)
        was_training = self.training
        self.train(False)
        device = self.head.weight.device
        out = []
        try:
            for start in range(0, len(prompts), batch_size):
                sl = slice(start, start + batch_size)
                rows = encode_texts(
                    self,
                    prompts[sl],
                    responses[sl],
                    None if conversations is None else conversations[sl],
                    where=lambda i, start=start: {"row": start + i},  # type: ignore[misc]
                )
                batch = self.collate(rows)
                batch = {k: v.to(device) for k, v in batch.items()}
                out.append(fn(user_index=index[sl].to(device), **batch).double().cpu())
        finally:
            self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros(0)

    def adapted_layers(self) -> Iterator[tuple[str, MultiUserLoRALinear]]:
        return self.lora.layers()


def tokenize_pairs(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> Any:
    """Unpadded token ids of each ``prompt`` + ``response`` (a text pair, longest-first
    truncation to ``max_length``)."""
    return tokenizer(list(prompts), list(responses), truncation=True, max_length=max_length)


def pad_right(tokenizer: Any, encoded: Any) -> dict[str, torch.Tensor]:
    """Pad encodings into a batch, on the right whatever the tokenizer's ``padding_side``: real
    tokens keep their positions, so a row's reward does not depend on the rows it is batched
    with."""
    return tokenizer.pad(encoded, return_tensors="pt", padding_side="right")


def backbone_inputs(backbone: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """``input_ids`` and ``attention_mask``, plus ``token_type_ids`` when the batch has them
    and the backbone's ``forward`` takes them (BERT does, Llama does not)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if (
        batch.get("token_type_ids") is not None
        and "token_type_ids" in inspect.signature(backbone.forward).parameters
    ):
        kwargs["token_type_ids"] = batch["token_type_ids"]
    return kwargs


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(batch, hidden)`` summary of ``hidden`` (``(batch, tokens, hidden)``): ``"cls"`` the
    first token, ``"mean"`` the masked mean, ``"last"`` the last non-pad token (left or right
    padding)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * positions).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _check_max_length(max_length: Any, tokenizer: Any) -> int:
    """``max_length`` as a positive integer (the check of ``model.max_length``) that leaves
    room for a token of the prompt and of the response beside the pair's special tokens: with
    less, Hugging Face tokenizers log an error and return the pair *untruncated*, so the token
    budget would silently not hold."""
    value = RewardModelConfig.check_value("max_length", max_length)
    try:
        special = int(tokenizer.num_special_tokens_to_add(pair=True))
    except (AttributeError, TypeError, ValueError):
        special = 0
    if value < special + 2:
        raise ConfigError(
            f"max_length={value} leaves no room for text: a prompt/response pair "
            f"takes {special} special tokens, so max_length must be at least "
            f"{special + 2}"
        )
    return value


def _user_key(user: Any) -> str:
    if isinstance(user, np.generic):
        user = user.item()
    key = str(user)
    if key == "" or user is None:
        raise PluralignError("empty user id")
    return key


def _unique_users(users: Sequence[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for u in users:
        seen.setdefault(_user_key(u), None)
    return list(seen)


def _hidden_size(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            return m.embedding_dim
    raise ConfigError("cannot tell the backbone's hidden size; give a model with config")
