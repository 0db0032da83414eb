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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pluralign.data.loaders import TextPreferences
from pluralign.data.split import per_user_test_mask
from pluralign.errors import DataValidationError, PluralignError

__all__ = ["EncodedPairs", "chat_ids", "encode_pairs", "split_per_user", "uses_chat_template"]


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


def chat_ids(tokenizer, messages: list[dict], max_length: int) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (TRL's reward
    tokenization: ``apply_chat_template(messages, tokenize=True, return_dict=True)``), at
    most ``max_length``, cut on the tokenizer's ``truncation_side``."""
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    except Exception as exc:  # a template may raise anything (jinja2 raise_exception)
        raise PluralignError(f"the tokenizer's chat template cannot render this "
                             f"conversation ({type(exc).__name__}: {str(exc)[:160]})") from None
    ids = out["input_ids"] if hasattr(out, "keys") else out
    ids = [int(t) for t in ids]
    if len(ids) <= max_length:
        return ids
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    return ids[-max_length:] if left else ids[:max_length]


def _chat_row(keys: list[str], ids: list[int]) -> dict[str, list[int]]:
    fill = {"input_ids": ids, "attention_mask": [1] * len(ids)}
    return {k: fill.get(k, [0] * len(ids)) for k in keys}  # token_type_ids: one segment


def encode_pairs(model, prefs: TextPreferences) -> EncodedPairs:
    """Tokenize ``prefs`` for ``model`` (a :class:`~pluralign.llm.PersonalizedRewardModel`);
    conversational rows through the tokenizer's chat template when it has one (module
    docstring)."""
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
                field="user_id", **_where(prefs, i))
        index[i] = position.get(u, 0)
    chosen = model.tokenize(prefs.prompts, prefs.chosen)
    rejected = model.tokenize(prefs.prompts, prefs.rejected)
    keys = list(chosen.keys())
    rows_c = [{k: chosen[k][i] for k in keys} for i in range(prefs.n)]
    rows_r = [{k: rejected[k][i] for k in keys} for i in range(prefs.n)]
    messages = getattr(prefs, "messages", None)
    if messages and uses_chat_template(model.tokenizer):
        for i, parts in enumerate(messages):
            if parts is None:
                continue
            prompt, good, bad = parts
            try:
                rows_c[i] = _chat_row(keys, chat_ids(model.tokenizer, prompt + good,
                                                     model.max_length))
                rows_r[i] = _chat_row(keys, chat_ids(model.tokenizer, prompt + bad,
                                                     model.max_length))
            except PluralignError as err:
                raise DataValidationError(str(err), **_where(prefs, i)) from None
    return EncodedPairs(chosen=rows_c, rejected=rows_r, user_index=index, users=users)


def split_per_user(prefs: TextPreferences, test_size: float, seed: int
                   ) -> tuple[TextPreferences, TextPreferences | None]:
    """Hold out ``test_size`` of each user's rows (:func:`~pluralign.data.split.per_user_test_mask`:
    a user with a single row is training-only); ``(train, None)`` when nothing is held out."""
    test = per_user_test_mask(prefs.users, test_size, seed)
    return prefs.subset(~test), (prefs.subset(test) if test.any() else None)
