"""Text preference data with users: TRL-style files, ``summarize_from_feedback`` and PRISM.

Every reader validates every row; bad rows raise :class:`~pluralign.errors.DataValidationError`
naming the file, the line (the 1-based row number for Parquet and in-memory rows) and the
field — one error for the whole read, summarized when many rows share a problem
(:meth:`pluralign.data.sources.Problems.summary`: ``missing; the same problem on 200 rows, the
first at line 3, …; columns found: …``) — or, with ``errors="collect"``, all bad rows are
returned together (what ``pluralign data validate`` prints). Nothing here downloads: the
readers take local files (JSONL, a JSON array, CSV, Parquet, each text format also
``.gz``-compressed), or in-memory data: a ``datasets.Dataset``, a ``DatasetDict`` with
``split=``, a pandas ``DataFrame`` or any iterable of mappings (:mod:`pluralign.data.sources`).
Each format's name, detection, reader and columns are declared once, in
:data:`pluralign.data.formats.FORMATS`; user contexts are checked and encoded by
:mod:`pluralign.data.contexts`.

**Column mapping.** ``user_column``, ``prompt_column``, ``chosen_column``, ``rejected_column``
and ``context_column`` name the columns that hold a format's fields when the data calls them
something else (``user_column="annotator_id"``); errors then name the data's column. A mapped
column that is missing is refused, naming the mapping (and the default column when the row
has it: a column left under its default name is not read).

**TRL-style rows** (TRL's preference format plus a user), from any source::

    {"prompt": "...", "chosen": "...", "rejected": "...", "user_id": "u7",
     "user_context": [0.1, 2.0] | {"age": "25-34", "score": 3.5}}     # user_context optional

``prompt``, ``chosen`` and ``rejected`` are strings, or TRL's conversational form (lists of
``{"role", "content"}`` messages, rendered as ``"role: content"`` lines; the messages are kept in
:attr:`TextPreferences.messages` for a tokenizer's chat template). A row without a prompt
(no prompt column, or null) has TRL's *implicit prompt*: the beginning ``chosen`` and
``rejected`` share, as ``trl.extract_prompt`` takes it — the leading messages both
conversations share, or for strings their longest common prefix, less a space that ends it
(the space stays with the responses); the responses are the rest. A row whose chosen and
rejected share no beginning is refused. When every row is an implicit-prompt string row the
texts are joined back without a separator (``template = "{prompt}{response}"``, so the encoder
sees the original text). ``user_id`` is a non-empty string or an integer. ``user_context`` is a
list of numbers (same length on every row) or a mapping of attributes: numbers are kept (a
numeric attribute must be given on every row: a missing one is refused, not filled with 0),
strings/booleans/null become one-hot indicators ``name=value``; it must be the same on every
row of a user: the context most of the user's rows have is the user's, and each row that
differs is refused, naming both values.

**summarize_from_feedback** (``openai/summarize_from_feedback``, ``comparisons`` configuration):
``info`` {``post``, ``title``, ``subreddit``, ``article``…}, ``summaries`` (two ``{"text": ...}``),
``choice`` (0/1: the preferred summary), ``worker`` (the labeler = the user). The prompt is that
of P-ShareLoRA (Liu et al. 2025, arXiv 2503.19201),
``SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:``, and the response is the
summary, joined by one space (``template = "{prompt} {response}"``). Rows without a post (the
CNN/DM part) are skipped unless ``include_articles=True`` (prompt ``ARTICLE: {article}\\nTL;DR:``).

**PRISM-style data** (Kirk et al. 2024): a survey file, one row per participant (``user_id`` and
attributes, nested mappings flattened as ``location.reside_region``), and a pairs file: either
TRL-style rows with ``user_id``, or PRISM's ``utterances`` rows (``user_id``, ``conversation_id``,
``turn``, ``user_prompt``, ``model_response``, ``score``, ``if_chosen``), which are turned into
pairs within each (conversation, turn): the chosen response against every other one. The
chosen survey ``attributes`` become the user context.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pluralign.data.contexts import ContextSchema, UserContexts, flatten, parse_context
from pluralign.data.formats import (
    COLUMN_KEYWORDS,
    FORMATS,
    TEXT_FORMATS,
    Columns,
    Format,
    detect_by_keys,
)
from pluralign.data.preference import PreferenceData
from pluralign.data.sources import Problems, RowError, iter_rows
from pluralign.errors import DataValidationError

__all__ = [
    "PRISM_ATTRIBUTES",
    "TextPreferences",
    "detect_format",
    "read_prism",
    "read_summarize_from_feedback",
    "read_text_preferences",
    "read_trl",
    "render_text",
    "validate_file",
]

PRISM_ATTRIBUTES = (
    "age",
    "gender",
    "education",
    "employment_status",
    "marital_status",
    "english_proficiency",
)
SUMMARIZE_TEMPLATE = "{prompt} {response}"
IMPLICIT_TEMPLATE = "{prompt}{response}"


# ---------------------------------------------------------------------------- the container
@dataclass(frozen=True, eq=False)
class TextPreferences:
    """Text comparisons with users: ``chosen[i] ≻ rejected[i]`` for ``prompts[i]``, by user
    ``users[i]``. ``contexts`` (``(n, d_x)`` or ``None``) are user contexts with column names
    ``context_names``; ``where[i]`` is the ``(file, line)`` of row ``i``; ``template`` (if set)
    is how the source joins prompt and response (see :class:`~pluralign.features.TextEncoder`);
    ``conversational`` is whether some rows were TRL message lists (rendered as text);
    ``messages[i]`` is, for such a row, ``(prompt, chosen, rejected)`` as message lists (a
    string prompt as one user message, a string response as one assistant message) for a
    tokenizer's chat template, ``None`` for a plain-text row (``messages`` is ``None`` when no
    row is conversational). ``context_schema`` says how the contexts were encoded (a
    :class:`ContextSchema`, to encode a new user's context into the same columns).
    """

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    users: np.ndarray
    contexts: np.ndarray | None = None
    context_names: list[str] = field(default_factory=list)
    where: list[tuple[str, int]] = field(default_factory=list)
    template: str | None = None
    skipped: int = 0
    conversational: bool = False
    messages: list[tuple[list, list, list] | None] | None = None
    context_schema: ContextSchema | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        return (
            f"TextPreferences(n={self.n}, users={len(np.unique(self.users))}, "
            f"d_x={0 if self.contexts is None else self.contexts.shape[1]})"
        )

    def subset(self, index: np.ndarray | Sequence[int]) -> TextPreferences:
        """The rows ``index`` (integer positions or a boolean mask), in that order."""
        rows = np.arange(self.n)[np.asarray(index)] if len(index) else np.zeros(0, int)
        pick = [int(i) for i in rows]
        return TextPreferences(
            prompts=[self.prompts[i] for i in pick],
            chosen=[self.chosen[i] for i in pick],
            rejected=[self.rejected[i] for i in pick],
            users=self.users[rows],
            contexts=None if self.contexts is None else self.contexts[rows],
            context_names=list(self.context_names),
            where=[self.where[i] for i in pick] if self.where else [],
            template=self.template,
            conversational=self.conversational,
            messages=None if self.messages is None else [self.messages[i] for i in pick],
            context_schema=self.context_schema,
        )

    def to_preference_data(
        self, encoder: Any, *, orient: str = "random", seed: int = 0
    ) -> PreferenceData:
        """Features ``φ(s, a)`` from ``encoder.features(prompts, responses, template=...)``.

        ``orient="random"`` (default) puts the chosen response in slot 1 (``y = 1``) or slot 0
        (``y = 0``) by a seeded coin, so labels are balanced; ``"chosen_second"`` always uses
        ``y = 1``. The likelihood is the same either way.
        """
        phi_c = encoder.features(self.prompts, self.chosen, template=self.template)
        phi_r = encoder.features(self.prompts, self.rejected, template=self.template)
        if orient == "chosen_second":
            flip = np.zeros(self.n, dtype=bool)
        elif orient == "random":
            flip = np.random.default_rng(seed).random(self.n) < 0.5
        else:
            raise DataValidationError(
                f"must be 'random' or 'chosen_second', got {orient!r}", field="orient"
            )
        phi1 = np.where(flip[:, None], phi_r, phi_c)
        phi0 = np.where(flip[:, None], phi_c, phi_r)
        return PreferenceData(
            x=self.contexts, phi0=phi0, phi1=phi1, y=(~flip).astype(np.int8), users=self.users
        )


# ---------------------------------------------------------------------------- rows
# Every row is checked: a bad field raises RowError, which the reader records in its Problems
# (raise mode raises one, summarized, error at the end) before it goes on with the next row.
def _bad(errs: Problems, bad: RowError, path: str, line: int) -> None:
    errs.add(bad.message, path=path, line=line, field=bad.field, columns=bad.columns)


def _messages(value: Any, name: str) -> list[dict[str, Any]] | None:
    """TRL's conversational form: a non-empty list of ``{"role": str, "content": str}``
    messages (other keys are kept, null ones dropped: columnar sources fill absent keys with
    null); ``None`` for a string. Anything else is refused."""
    if value is None:
        raise RowError(name, "missing (null)")
    if isinstance(value, str):
        if not value.strip():
            raise RowError(name, "is empty")
        return None
    if isinstance(value, list) and value:
        out = []
        for i, message in enumerate(value):
            if (
                not isinstance(message, Mapping)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise RowError(name, f"message {i} must be {{'role': str, 'content': str}}")
            if not message["role"].strip() or not message["content"].strip():
                raise RowError(name, f"message {i} has an empty role or content")
            out.append({str(k): v for k, v in message.items() if v is not None})
        return out
    raise RowError(
        name, f"must be a non-empty string or a list of messages, got {type(value).__name__}"
    )


def _render(messages: list[dict[str, Any]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _text(value: Any, name: str) -> str:
    """A string, or TRL's conversational form rendered as ``role: content`` lines."""
    messages = _messages(value, name)
    return value if messages is None else _render(messages)


def render_text(value: Any, field: str = "text", **where: Any) -> str:
    """``value`` (a string or TRL message list) as the text pluralign's encoders see: the
    string itself, or ``role: content`` lines; a bad value raises
    :class:`DataValidationError` naming ``field`` (and ``where``: ``path``, ``line``)."""
    try:
        return _text(value, field)
    except RowError as bad:
        raise DataValidationError(bad.message, field=bad.field, **where) from None


def _user(value: Any, name: str = "user_id") -> str | int:
    if value is None:
        raise RowError(name, "missing (null)")
    if isinstance(value, bool):
        raise RowError(name, f"must be a non-empty string or an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise RowError(name, f"must be a non-empty string or an integer, got {value!r}")


def _finish(
    columns: dict[str, list],
    contexts: UserContexts | None,
    errors: Problems,
    template: str | None = None,
    skipped: int = 0,
    source: str = "data",
    user_field: str = "user_id",
) -> TextPreferences | None:
    """The read rows as :class:`TextPreferences`, or ``None`` after bad rows (raise mode:
    the summarized error is raised here)."""
    if contexts is not None:
        contexts.check(errors)
    if errors.found:
        errors.check()
        return None
    if not columns["prompts"]:
        raise DataValidationError("no comparisons", path=source)
    x, names = contexts.matrix() if contexts is not None else (None, [])
    users = columns["users"]
    kinds = {type(u) for u in users}
    if len(kinds) > 1:
        first = users[0]
        i = next(i for i, u in enumerate(users) if type(u) is not type(first))
        path, line = columns["where"][i]
        raise DataValidationError(
            f"is {users[i]!r} but the first row's is {first!r}: user ids mix integers and "
            "strings (7 and '7' would merge); use one type",
            field=user_field,
            path=path,
            line=line,
        )
    messages = columns.get("messages")
    if template is None and columns.get("implicit") == len(columns["prompts"]):
        template = IMPLICIT_TEMPLATE  # implicit string prompts: the original text, rejoined
    return TextPreferences(
        prompts=columns["prompts"],
        chosen=columns["chosen"],
        rejected=columns["rejected"],
        users=np.array(users),
        contexts=x,
        context_names=names,
        where=columns["where"],
        template=template,
        skipped=skipped,
        conversational=bool(columns.get("conversational")),
        messages=messages if messages and any(m is not None for m in messages) else None,
        context_schema=None if contexts is None else contexts.schema,
    )


def _columns() -> dict[str, Any]:
    return {
        "prompts": [],
        "chosen": [],
        "rejected": [],
        "users": [],
        "where": [],
        "messages": [],
        "implicit": 0,
    }


def _result(
    prefs: TextPreferences | None, errors: Problems
) -> TextPreferences | tuple[TextPreferences | None, list[DataValidationError]]:
    if errors.mode == "collect":
        return prefs, errors.ordered()
    errors.check()
    assert prefs is not None
    return prefs


def _source_name(source: Any) -> str:
    return str(source) if isinstance(source, str | Path) else f"<{type(source).__name__}>"


# ---------------------------------------------------------------------------- TRL-style
NO_SHARED_START = (
    "missing, and chosen and rejected share no beginning to take an implicit "
    "prompt from (TRL's implicit prompt: the leading messages both "
    "conversations share, or the common prefix of two strings)"
)


def _same(a: Any, b: Any) -> bool:
    """``a == b`` for two messages or characters; a message holding arrays (an in-memory row
    of NumPy values), whose ``==`` has no truth value, counts as different."""
    try:
        return bool(a == b)
    except (ValueError, TypeError):
        return False


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a row without a prompt, as TRL's
    ``trl.data_utils.extract_prompt`` splits it: the longest common beginning of ``chosen`` and
    ``rejected`` (messages of two conversations, characters of two strings; for strings a space
    that ends it stays with the responses), and the rest of each. Only the split is done here;
    the caller checks the parts. When one response is a beginning of the other, TRL leaves the
    last shared element with the responses; so does this."""
    n = min(len(chosen), len(rejected))
    if n == 0:
        return chosen[:0], chosen, rejected
    split = next((i for i in range(n) if not _same(chosen[i], rejected[i])), None)
    if split is None:
        split = n - 1
    elif split > 0 and chosen[split - 1] == " ":
        split -= 1
    return chosen[:split], chosen[split:], rejected[split:]


def _implicit(chosen: Any, rejected: Any, cols: Columns, row: Mapping) -> tuple[Any, Any, Any]:
    """TRL's implicit prompt of a row without one (:func:`extract_prompt`), refused when the
    two responses share no beginning."""
    for value, key in ((chosen, "chosen"), (rejected, "rejected")):
        _messages(value, cols[key])  # a bad response is named first
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError(
            cols["prompt"],
            "missing, and an implicit prompt needs chosen and "
            "rejected both strings or both message lists",
            columns=row,
        )
    if not _same(chosen[0], rejected[0]):
        raise RowError(cols["prompt"], NO_SHARED_START, columns=row)
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise RowError(cols["prompt"], NO_SHARED_START, columns=row)
    return prompt, chosen, rejected


def _trl_row(row: Any, cols: Columns) -> tuple[str, str, str, Any, tuple | None, bool]:
    """``(prompt, chosen, rejected, user, messages or None, implicit string prompt?)``."""
    if not isinstance(row, Mapping):
        raise RowError(None, "each row must be a JSON object")
    for key in ("chosen", "rejected", "user"):
        if cols[key] not in row:
            raise RowError(cols[key], cols.missing(key, row), columns=row)
    prompt, chosen, rejected = row.get(cols["prompt"]), row[cols["chosen"]], row[cols["rejected"]]
    implicit = prompt is None
    if implicit and cols.mapped().get("prompt_column") and cols["prompt"] not in row:
        raise RowError(cols["prompt"], cols.missing("prompt", row), columns=row)
    if implicit:
        prompt, chosen, rejected = _implicit(chosen, rejected, cols, row)
    parts = [
        _messages(v, cols[k])
        for v, k in ((prompt, "prompt"), (chosen, "chosen"), (rejected, "rejected"))
    ]
    texts = [
        v if m is None else _render(m)
        for v, m in zip((prompt, chosen, rejected), parts, strict=True)
    ]
    user = _user(row[cols["user"]], cols["user"])
    if texts[1] == texts[2]:
        raise RowError(cols["rejected"], f"is identical to {cols['chosen']!r}")
    messages = None
    if any(m is not None for m in parts):
        roles = ("user", "assistant", "assistant")
        messages = tuple(
            m if m is not None else [{"role": r, "content": t}]
            for m, r, t in zip(parts, roles, texts, strict=True)
        )
    return texts[0], texts[1], texts[2], user, messages, implicit and messages is None


def read_trl(
    source: Any,
    *,
    errors: str = "raise",
    split: str | None = None,
    prompt_column: str | None = None,
    chosen_column: str | None = None,
    rejected_column: str | None = None,
    user_column: str | None = None,
    context_column: str | None = None,
) -> Any:
    """Read TRL-style rows (see the module docstring) from a file, a ``datasets`` object, a
    DataFrame or an iterable of mappings (``split`` picks a ``DatasetDict``'s split; the
    ``*_column`` keywords name columns that hold the fields under other names).

    Returns a :class:`TextPreferences`; with ``errors="collect"`` returns ``(prefs or None,
    [errors])`` with every bad row reported.
    """
    errs = Problems(errors)
    cols = Columns.of(
        "trl",
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
        user_column=user_column,
        context_column=context_column,
    )
    context = cols["context"]
    out, contexts = _columns(), UserContexts(context)
    seen_context = False
    for path, line, row in iter_rows(source, errs, split=split, typed=cols.json_columns()):
        try:
            has = isinstance(row, Mapping) and row.get(context) is not None
            if seen_context and not has and isinstance(row, Mapping):
                raise RowError(context, "missing here but present on earlier rows")
            if has and not seen_context and out["prompts"]:
                raise RowError(context, "present here but missing on earlier rows")
            prompt, chosen, rejected, user, messages, implicit = _trl_row(row, cols)
            if has:
                contexts.add(user, row[context], path, line)
        except RowError as bad:
            _bad(errs, bad, path, line)
            continue
        seen_context = seen_context or has
        if messages is not None:
            out["conversational"] = True  # rendered as "role: content" lines
        out["messages"].append(messages)
        out["implicit"] += implicit
        _append(out, prompt, chosen, rejected, user, path, line)
    return _result(
        _finish(out, contexts, errs, source=_source_name(source), user_field=cols["user"]), errs
    )


def _append(
    cols: dict[str, Any], prompt: str, chosen: str, rejected: str, user: Any, path: str, line: int
) -> None:
    cols["prompts"].append(prompt)
    cols["chosen"].append(chosen)
    cols["rejected"].append(rejected)
    cols["users"].append(user)
    cols["where"].append((path, line))


# ---------------------------------------------------------------------------- summarize
def _summarize_row(
    row: Any, include_articles: bool, cols: Columns
) -> tuple[str, str, str, str | int] | None:
    if not isinstance(row, Mapping):
        raise RowError(None, "each row must be a JSON object")
    for key in ("info", "summaries", "choice"):
        if key not in row:
            raise RowError(key, "missing", columns=row)
    if cols["user"] not in row:
        raise RowError(cols["user"], cols.missing("user", row), columns=row)
    info = row["info"]
    if not isinstance(info, Mapping):
        raise RowError("info", "must be an object with post, title and subreddit")
    summaries = row["summaries"]
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise RowError("summaries", "must be a list of two {'text': ...} objects")
    texts = []
    for i, summary in enumerate(summaries):
        if (
            not isinstance(summary, Mapping)
            or not isinstance(summary.get("text"), str)
            or not summary["text"].strip()
        ):
            raise RowError(f"summaries[{i}].text", "must be a non-empty string")
        texts.append(summary["text"].strip())
    choice = row["choice"]
    if isinstance(choice, bool) or not isinstance(choice, int) or choice not in (0, 1):
        raise RowError("choice", f"must be 0 or 1, got {choice!r}")
    worker = _user(row[cols["user"]], cols["user"])
    post = info.get("post")
    if post is None:
        article = info.get("article")
        if not isinstance(article, str) or not article.strip():
            raise RowError("info.post", "missing (and no info.article)")
        if not include_articles:
            return None
        prompt = f"ARTICLE: {article.strip()}\nTL;DR:"
    else:
        for key in ("post", "title", "subreddit"):
            if not isinstance(info.get(key), str):
                raise RowError(f"info.{key}", "must be a string")
        prompt = (
            f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\n"
            f"POST: {post.strip()}\nTL;DR:"
        )
    if texts[0] == texts[1]:
        raise RowError("summaries", "the two summaries are identical")
    return prompt, texts[choice], texts[1 - choice], worker


def read_summarize_from_feedback(
    source: Any,
    *,
    include_articles: bool = False,
    splits: Sequence[str] | None = None,
    errors: str = "raise",
    split: str | None = None,
    user_column: str | None = None,
    **columns: str | None,
) -> Any:
    """Read ``openai/summarize_from_feedback`` comparison rows (user = ``worker``, or
    ``user_column``).

    ``source`` is a local file (JSONL, JSON array, Parquet, …), a ``datasets`` object (``split``
    picks a ``DatasetDict``'s split) or an iterable of rows. ``splits`` keeps only rows whose
    ``split`` field is listed. See the module docstring for the text format;
    ``TextPreferences.template`` is ``"{prompt} {response}"``. The other ``*_column`` keywords
    are refused: the format's other columns are fixed.
    """
    errs = Problems(errors)
    names = Columns.of("summarize", user_column=user_column, **columns)
    cols, skipped = _columns(), 0
    for path, line, row in iter_rows(source, errs, split=split, typed=names.json_columns()):
        try:
            split_name = row.get("split") if isinstance(row, Mapping) else None
            if (
                splits is not None
                and isinstance(row, Mapping)
                and not (isinstance(split_name, str) and split_name in splits)
            ):
                skipped += 1
                continue
            parsed = _summarize_row(row, include_articles, names)
        except RowError as bad:
            _bad(errs, bad, path, line)
            continue
        if parsed is None:
            skipped += 1
            continue
        _append(cols, *parsed, path, line)
    prefs = _finish(
        cols,
        None,
        errs,
        template=SUMMARIZE_TEMPLATE,
        skipped=skipped,
        source=_source_name(source),
        user_field=names["user"],
    )
    return _result(prefs, errs)


# ---------------------------------------------------------------------------- PRISM
def _read_survey(
    source: Any, attributes: Sequence[str], errs: Problems, cols: Columns
) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    uid = cols["user"]
    for path, line, row in iter_rows(source, errs):
        try:
            if not isinstance(row, Mapping):
                raise RowError(None, "each row must be a JSON object")
            if uid not in row:
                raise RowError(uid, cols.missing("user", row), columns=row)
            user = _user(row[uid], uid)
            flat = flatten(row)
            for key in attributes:
                if key not in flat:
                    raise RowError(key, "missing survey attribute", columns=flat)
            values = {k: ("(missing)" if flat[k] is None else flat[k]) for k in attributes}
            parse_context(values, "survey")
            if user in out:
                raise RowError(uid, f"user {user!r} appears twice in the survey")
        except RowError as bad:
            _bad(errs, bad, path, line)
            continue
        out[user] = values
    return out


def _utterance_pairs(
    rows: Iterable[tuple[str, int, Any]], errs: Problems, cols: Columns | None = None
) -> Iterator[tuple[str, int, str, str, str, Any]]:
    """PRISM utterances → (path, line, prompt, chosen, rejected, user) per (conversation, turn)."""
    cols = cols or Columns.of("prism")
    uid = cols["user"]
    groups: dict[tuple, list[tuple[str, int, dict]]] = {}
    for path, line, row in rows:
        try:
            if not isinstance(row, Mapping):
                raise RowError(None, "each row must be a JSON object")
            if uid not in row:
                raise RowError(uid, cols.missing("user", row), columns=row)
            for key in ("conversation_id", "turn", "user_prompt", "model_response", "if_chosen"):
                if key not in row:
                    raise RowError(key, "missing", columns=row)
            user = _user(row[uid], uid)
            if not isinstance(row["if_chosen"], bool):
                raise RowError("if_chosen", f"must be true or false, got {row['if_chosen']!r}")
            turn = row["turn"]
            if isinstance(turn, bool) or not isinstance(turn, int):
                raise RowError("turn", f"must be an integer, got {turn!r}")
            conversation = row["conversation_id"]
            if isinstance(conversation, bool) or not isinstance(conversation, str | int):
                raise RowError(
                    "conversation_id", f"must be a string or an integer, got {conversation!r}"
                )
            parsed = {
                "user": user,
                "prompt": _text(row["user_prompt"], "user_prompt"),
                "response": _text(row["model_response"], "model_response"),
                "chosen": row["if_chosen"],
            }
        except RowError as bad:
            _bad(errs, bad, path, line)
            continue
        groups.setdefault((row["conversation_id"], turn), []).append((path, line, parsed))
    for (conversation, turn), members in groups.items():
        chosen = [m for m in members if m[2]["chosen"]]
        path, line, first = chosen[0] if chosen else members[0]
        if len(chosen) != 1:
            errs.add(
                f"conversation {conversation!r} turn {turn} has {len(chosen)} chosen "
                "responses; exactly one is needed",
                path=path,
                line=line,
                field="if_chosen",
            )
            continue
        if any(m[2]["user"] != first["user"] or m[2]["prompt"] != first["prompt"] for m in members):
            errs.add(
                f"conversation {conversation!r} turn {turn} mixes users or prompts",
                path=path,
                line=line,
                field="user_prompt",
            )
            continue
        for _, _, other in members:
            if not other["chosen"] and other["response"] != first["response"]:
                yield (
                    path,
                    line,
                    first["prompt"],
                    first["response"],
                    other["response"],
                    first["user"],
                )


def read_prism(
    survey: Any,
    pairs: Any,
    *,
    attributes: Sequence[str] = PRISM_ATTRIBUTES,
    errors: str = "raise",
    user_column: str | None = None,
    prompt_column: str | None = None,
    chosen_column: str | None = None,
    rejected_column: str | None = None,
    **columns: str | None,
) -> Any:
    """Read PRISM-style data: a survey (user attributes) and pairs (TRL-style rows or PRISM
    utterances); the survey ``attributes`` become the user contexts (one-hot categories).
    ``user_column`` names the user column of both; the prompt/chosen/rejected columns apply to
    TRL-style pairs (``context_column`` is refused: the contexts come from the survey)."""
    errs = Problems(errors)
    cols = Columns.of(
        "prism",
        user_column=user_column,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
        **columns,
    )
    users = _read_survey(survey, attributes, errs, cols)
    rows = list(iter_rows(pairs, errs, typed=cols.json_columns()))
    utterances = bool(rows) and isinstance(rows[0][2], Mapping) and "model_response" in rows[0][2]
    items: Iterable[tuple[str, int, str, str, str, Any]] = (
        _utterance_pairs(rows, errs, cols) if utterances else _trl_items(rows, errs, cols)
    )
    out, contexts = _columns(), UserContexts()
    for path, line, prompt, chosen, rejected, user in items:
        if user not in users:
            errs.add(
                f"user {user!r} is not in the survey", path=path, line=line, field=cols["user"]
            )
            continue
        contexts.add(user, users[user], path, line)
        _append(out, prompt, chosen, rejected, user, path, line)
    return _result(
        _finish(out, contexts, errs, source=_source_name(pairs), user_field=cols["user"]), errs
    )


def _trl_items(
    rows: list[tuple[str, int, Any]], errs: Problems, cols: Columns
) -> Iterator[tuple[str, int, str, str, str, Any]]:
    for path, line, row in rows:
        try:
            prompt, chosen, rejected, user, _, _ = _trl_row(row, cols)
        except RowError as bad:
            _bad(errs, bad, path, line)
            continue
        yield path, line, prompt, chosen, rejected, user


# ---------------------------------------------------------------------------- dispatch
# Which reader a format has, how it is detected and its columns: the table FORMATS of
# pluralign.data.formats.


def _replayable(source: Any) -> Any:
    """A one-shot iterator (a generator) as a list, so that the format can be detected from
    its first row and the rows still read."""
    if not isinstance(source, str | Path | Mapping) and hasattr(source, "__next__"):
        return list(source)
    return source


def _format(name: Any) -> Format | None:
    """The format called ``name`` (``None`` for an unknown name, or one that is not a string)."""
    return FORMATS.get(name) if isinstance(name, str) else None


def detect_format(source: Any, *, split: str | None = None) -> str:
    """``numeric`` (``.npz`` or rows with ``phi0``), ``trl``, ``summarize`` or ``prism`` (PRISM
    utterances), from the suffix and the keys of the first row (of a file or of in-memory
    rows: a ``datasets`` object, a DataFrame, a list of mappings); the rules are each
    format's ``suffixes`` and ``keys`` in :data:`pluralign.data.formats.FORMATS`."""
    if isinstance(source, str | Path):
        suffix = Path(source).suffix.lower()
        for spec in FORMATS.values():
            if suffix in spec.suffixes:
                return spec.name
    errs = Problems("collect")
    for _, _, row in iter_rows(source, errs, split=split):
        if not isinstance(row, Mapping):
            break
        return detect_by_keys(row).name
    raise DataValidationError(
        "cannot tell the format (no JSON object in the first row); pass --format",
        path=_source_name(source),
    )


def _column_kwargs(columns: Mapping[str, Any]) -> dict[str, Any]:
    keywords = tuple(COLUMN_KEYWORDS.values())
    unknown = sorted(set(columns) - set(keywords))
    if unknown:
        raise DataValidationError(
            f"unknown keyword {unknown[0]!r}; valid: {', '.join(keywords)}",
            field=unknown[0],
        )
    return {k: v for k, v in columns.items() if v is not None}


def read_text_preferences(
    source: Any,
    *,
    format: str = "auto",
    survey: str | Path | None = None,
    split: str | None = None,
    **columns: str | None,
) -> TextPreferences:
    """Read text preferences in ``format`` (``"auto"`` detects it; ``"trl"``, ``"summarize"``
    or ``"prism"``, which needs the ``survey``) from a file or in-memory rows; ``split`` and the
    ``*_column`` keywords (``user_column="annotator_id"``) as for :func:`read_trl`."""
    given = _column_kwargs(columns)
    source = _replayable(source)
    fmt = detect_format(source, split=split) if format == "auto" else format
    spec = _format(fmt)
    if spec is None or spec.kind != "text":
        raise DataValidationError(
            f"not a text preference format: {fmt!r} (valid: {', '.join(TEXT_FORMATS)})",
            path=_source_name(source),
        )
    if not spec.survey:
        return spec.read(source, split=split, **given)
    if survey is None:
        raise DataValidationError(
            "PRISM pairs need the survey file (--survey / survey:)", path=_source_name(source)
        )
    if split is not None:
        raise DataValidationError(
            "split= is not supported for PRISM data: pass the split's rows", field="split"
        )
    return spec.read(survey, source, **given)


def validate_file(
    path: Any,
    *,
    format: str = "auto",
    survey: str | Path | None = None,
    split: str | None = None,
    **columns: str | None,
) -> tuple[int, list[DataValidationError]]:
    """Check every row of ``path`` (a file, or in-memory rows): ``(number of comparisons read,
    [every error])``.

    Bad rows are returned; a file that cannot be read at all (missing, a folder, not a valid
    ``.npz``/Parquet file, an unknown format) raises :class:`DataValidationError` — what
    ``pluralign data validate`` reports with exit code 1 and 2 respectively."""
    given = _column_kwargs(columns)
    path = _replayable(path)
    fmt = detect_format(path, split=split) if format == "auto" else format
    spec = _format(fmt)
    if spec is None:
        raise DataValidationError(
            f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}", field="format"
        )
    if spec.kind == "numeric":
        try:
            data, found = spec.read(path, errors="collect", split=split, **given)
        except DataValidationError as err:
            if err.line is None and err.field is None and err.row is None:
                raise  # the file itself is unreadable (missing, a folder, not an .npz)
            return 0, [err]
        return (0 if data is None else data.n), found
    if not spec.survey:
        return _count(spec.read(path, errors="collect", split=split, **given))
    if survey is not None:
        return _count(spec.read(survey, path, errors="collect", **given))
    # PRISM utterances alone: check the rows and the pairing, without user contexts
    errs = Problems("collect")
    cols = Columns.of(fmt, **given)
    rows = list(iter_rows(path, errs, split=split, typed=cols.json_columns()))
    n = sum(1 for _ in _utterance_pairs(rows, errs, cols))
    return n, errs.ordered()


def _count(
    result: tuple[TextPreferences | None, list[DataValidationError]],
) -> tuple[int, list[DataValidationError]]:
    prefs, found = result
    return (0 if prefs is None else prefs.n), found
