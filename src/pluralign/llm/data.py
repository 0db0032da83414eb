"""Tokenized preference pairs for the reward-model trainer.

The rows come from :mod:`pluralign.data.loaders` (``read_trl`` and friends), which already
validate every row (a missing column or an empty ``user_id`` is a
:class:`~pluralign.errors.DataValidationError` naming the file, line and field). Here each row
is tokenized once and bound to the model's user index: a row whose user the model does not
know raises, naming the user and the row's file and line.
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

__all__ = ["EncodedPairs", "encode_pairs", "split_per_user"]


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


def encode_pairs(model, prefs: TextPreferences) -> EncodedPairs:
    """Tokenize ``prefs`` for ``model`` (a :class:`~pluralign.llm.PersonalizedRewardModel`)."""
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
    return EncodedPairs(
        chosen=[{k: chosen[k][i] for k in keys} for i in range(prefs.n)],
        rejected=[{k: rejected[k][i] for k in keys} for i in range(prefs.n)],
        user_index=index, users=users)


def split_per_user(prefs: TextPreferences, test_size: float, seed: int
                   ) -> tuple[TextPreferences, TextPreferences | None]:
    """Hold out ``test_size`` of each user's rows (:func:`~pluralign.data.split.per_user_test_mask`:
    a user with a single row is training-only); ``(train, None)`` when nothing is held out."""
    test = per_user_test_mask(prefs.users, test_size, seed)
    return prefs.subset(~test), (prefs.subset(test) if test.any() else None)
