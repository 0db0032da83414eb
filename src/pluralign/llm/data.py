"""Tokenized preference pairs for the reward-model trainer.

The rows come from :mod:`pluralign.data.loaders` (``read_trl`` and friends), which already
validate every row (a missing column or an empty ``user_id`` is a
:class:`~pluralign.errors.DataValidationError` naming the file, line and field). Here each row
is tokenized once and bound to the model's user index: a row whose user the model does not
know raises, naming the user and the row's file and line.

**Conversational rows** (TRL message lists, :attr:`TextPreferences.messages`) are rendered with
the tokenizer's chat template when it has one, as TRL's ``RewardTrainer`` does: the token ids
of ``chosen`` are ``tokenizer.apply_chat_template(prompt + chosen, tokenize=True)`` (likewise
``rejected``), cut to the model's ``max_length`` on the tokenizer's ``truncation_side``. Without
a chat template (MiniLM and other encoders have none) they are the text pair of their
``role: content`` renderings, like plain rows.

That rendering is :func:`encode_texts`, the one place a reward model's input tokens are made:
training (:func:`encode_pairs`), :meth:`~pluralign.llm.PersonalizedRewardModel.score` and
:meth:`~pluralign.llm.PersonalizedRewardModel.features` (their ``conversations=``), and so the
last-layer uncertainty (:mod:`pluralign.llm.uncertainty`), all tokenize a conversational row
alike. :func:`conversations` gives a :class:`TextPreferences`' conversations per row,
:func:`row_prompts` its prompts as a policy answers them (the prompt messages of a
conversational row), :func:`chat_response` the row that a response sampled for such a prompt
makes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pluralign.data.loaders import TextPreferences
from pluralign.data.split import per_user_test_mask
from pluralign.errors import DataValidationError, PluralignError

__all__ = [
    "EncodedPairs",
    "chat_ids",
    "chat_response",
    "conversations",
    "encode_pairs",
    "encode_texts",
    "row_prompts",
    "split_per_user",
    "uses_chat_template",
]


@dataclass(frozen=True, eq=False)
class EncodedPairs:
    """Token ids of ``chosen`` and ``rejected`` (``prompt`` + response), per row, and the
    row's user index in the model."""

    chosen: list[dict[str, list[int]]]
    rejected: list[dict[str, list[int]]]
    user_index: np.ndarray
    users: list[str]

    def __len__(self) -> int:
        return len(self.chosen)

    def fingerprint(self) -> str:
        """A hash of the tokens and users (a resumed run checks it is the same data)."""
        h = hashlib.sha256()
        for c, r, u in zip(self.chosen, self.rejected, self.users, strict=True):
            h.update(repr((c["input_ids"], r["input_ids"], u)).encode())
        return h.hexdigest()[:16]

    def batch(self, rows: Sequence[int], model) -> dict[str, torch.Tensor]:
        """One padded batch: the chosen texts of ``rows`` then their rejected texts."""
        rows = list(rows)
        batch = model.collate([self.chosen[i] for i in rows] + [self.rejected[i] for i in rows])
        index = torch.as_tensor(self.user_index[rows], dtype=torch.long)
        batch["user_index"] = torch.cat([index, index])
        return batch


def _where(prefs: TextPreferences, i: int) -> dict:
    if i < len(prefs.where):
        path, line = prefs.where[i]
        return {"path": path, "line": line}
    return {"row": i}


def uses_chat_template(tokenizer) -> bool:
    """Whether conversational rows are rendered with ``tokenizer``'s chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(
    tokenizer,
    messages: list[dict],
    max_length: int | None = None,
    *,
    add_generation_prompt: bool = False,
) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (TRL's tokenization:
    ``apply_chat_template(messages, tokenize=True, return_dict=True)``, with
    ``add_generation_prompt`` for a prompt that a response is to follow), at most
    ``max_length`` (``None``: all of them), cut on the tokenizer's ``truncation_side``."""
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # a template may raise anything (jinja2 raise_exception)
        raise PluralignError(
            f"the tokenizer's chat template cannot render this "
            f"conversation ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    ids = out["input_ids"] if hasattr(out, "keys") else out
    ids = [int(t) for t in ids]
    if max_length is None or len(ids) <= max_length:
        return ids
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    return ids[-max_length:] if left else ids[:max_length]


def _chat_row(keys: list[str], ids: list[int]) -> dict[str, list[int]]:
    fill = {"input_ids": ids, "attention_mask": [1] * len(ids)}
    return {k: fill.get(k, [0] * len(ids)) for k in keys}  # token_type_ids: one segment


def conversations(prefs: TextPreferences, side: str) -> list[list[dict] | None] | None:
    """Per row of ``prefs``, the conversation ``prompt + chosen`` (``side="chosen"``) or
    ``prompt + rejected`` as one message list, ``None`` for a plain-text row; ``None`` when no
    row is conversational (the ``conversations=`` of :func:`encode_texts`)."""
    if side not in ("chosen", "rejected"):
        raise PluralignError(f"side must be 'chosen' or 'rejected', got {side!r}")
    messages = getattr(prefs, "messages", None)
    if not messages:
        return None
    k = 1 if side == "chosen" else 2
    return [None if parts is None else list(parts[0]) + list(parts[k]) for parts in messages]


def row_prompts(prefs: TextPreferences) -> list[str | list[dict]]:
    """The prompt of each row as a policy answers it: the prompt messages of a conversational
    row (rendered with the policy's chat template), else the prompt text."""
    messages = getattr(prefs, "messages", None) or [None] * prefs.n
    return [
        p if parts is None else list(parts[0])
        for p, parts in zip(prefs.prompts, messages, strict=True)
    ]


def chat_response(prompt: str | list[dict], response: str) -> tuple[str, str, list[dict] | None]:
    """``(prompt text, response text, conversation or None)`` of a response to ``prompt`` (a
    text, or the prompt messages of a conversational row): what the data loader makes of the
    row ``{"prompt": prompt, "chosen": response}`` — for messages, the conversation is the
    prompt and the response as one assistant message, the prompt text their ``role: content``
    rendering, the response text the response itself. The arguments of :func:`encode_texts`
    (and of a reward model's ``score``/``features``) for that row."""
    from pluralign.data.loaders import _render  # the loader's own "role: content" lines

    if isinstance(prompt, str):
        return prompt, response, None
    return (_render(list(prompt)), response, [*prompt, {"role": "assistant", "content": response}])


def encode_texts(
    model,
    prompts: Sequence[str],
    responses: Sequence[str],
    conversations: Sequence[list[dict] | None] | None = None,
    *,
    where: Callable[[int], dict[str, Any]] | None = None,
) -> list[dict[str, list[int]]]:
    """Token ids of each ``(prompt, response)`` row for ``model`` (a
    :class:`~pluralign.llm.PersonalizedRewardModel`), as training sees them (module docstring):
    the text pair (``model.tokenize``), or, for a row whose ``conversations[i]`` is a message
    list (the whole conversation: prompt and response messages) when the tokenizer has a chat
    template, :func:`chat_ids` of it cut to ``model.max_length``. A conversation the template
    cannot render raises :class:`DataValidationError` at ``where(i)`` (default: the row)."""
    if not len(prompts) == len(responses):
        raise PluralignError(f"{len(prompts)} prompts for {len(responses)} responses")
    if conversations is not None and len(conversations) != len(prompts):
        raise PluralignError(f"{len(conversations)} conversations for {len(prompts)} rows")
    encoded = model.tokenize(list(prompts), list(responses))
    keys = list(encoded.keys())
    rows = [{k: encoded[k][i] for k in keys} for i in range(len(prompts))]
    if conversations is not None and uses_chat_template(model.tokenizer):
        for i, conversation in enumerate(conversations):
            if conversation is None:
                continue
            try:
                rows[i] = _chat_row(keys, chat_ids(model.tokenizer, conversation, model.max_length))
            except PluralignError as err:
                raise DataValidationError(
                    str(err), **(where or (lambda j: {"row": j}))(i)
                ) from None
    return rows


def encode_pairs(model, prefs: TextPreferences) -> EncodedPairs:
    """Tokenize ``prefs`` for ``model`` (a :class:`~pluralign.llm.PersonalizedRewardModel`);
    conversational rows through the tokenizer's chat template when it has one (module
    docstring, :func:`encode_texts`)."""
    if prefs.n == 0:
        raise PluralignError("no preference rows to train or evaluate on")
    users = [str(u.item() if isinstance(u, np.generic) else u) for u in prefs.users]
    index = np.empty(len(users), dtype=np.int64)
    position = {u: i for i, u in enumerate(model.user_ids)}
    for i, u in enumerate(users):
        if u not in position and model.share != "pooled":
            raise DataValidationError(
                f"unknown user {u!r}: the reward model has adapters for {model.n_users} users; "
                "a user needs training rows (or adapt_user) before it can be scored",
                field="user_id",
                **_where(prefs, i),
            )
        index[i] = position.get(u, 0)

    def where(i: int) -> dict[str, Any]:
        return _where(prefs, i)

    rows_c = encode_texts(
        model, prefs.prompts, prefs.chosen, conversations(prefs, "chosen"), where=where
    )
    rows_r = encode_texts(
        model, prefs.prompts, prefs.rejected, conversations(prefs, "rejected"), where=where
    )
    return EncodedPairs(chosen=rows_c, rejected=rows_r, user_index=index, users=users)


def split_per_user(
    prefs: TextPreferences, test_size: float, seed: int
) -> tuple[TextPreferences, TextPreferences | None]:
    """Hold out ``test_size`` of each user's rows (:func:`~pluralign.data.split.per_user_test_mask`:
    a user with a single row is training-only); ``(train, None)`` when nothing is held out."""
    test = per_user_test_mask(prefs.users, test_size, seed)
    return prefs.subset(~test), (prefs.subset(test) if test.any() else None)
