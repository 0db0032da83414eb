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
``choice`` (0/1: the preferred summary), ``worker`` (the labeler = the user). The prompt is
P-ShareLoRA's ``SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:`` and the response
the summary, joined by one space (``template = "{prompt} {response}"``). Rows without a post (the
CNN/DM part) are skipped unless ``include_articles=True`` (prompt ``ARTICLE: {article}\\nTL;DR:``).

**PRISM-style data** (Kirk et al. 2024): a survey file, one row per participant (``user_id`` and
attributes, nested mappings flattened as ``location.reside_region``), and a pairs file: either
TRL-style rows with ``user_id``, or PRISM's ``utterances`` rows (``user_id``, ``conversation_id``,
``turn``, ``user_prompt``, ``model_response``, ``score``, ``if_chosen``), which are turned into
pairs within each (conversation, turn): the chosen response against every other one. The
chosen survey ``attributes`` become the user context.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pluralign.data.preference import PreferenceData
from pluralign.data.sources import Columns, Problems, dumps_short, iter_rows
from pluralign.errors import DataValidationError

__all__ = [
    "PRISM_ATTRIBUTES",
    "ContextSchema",
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


# ---------------------------------------------------------------------------- errors
_Errors = Problems  # every row is checked; raise mode raises one (summarized) error at the end


class _RowError(Exception):
    def __init__(
        self, field: str | None, message: str, columns: Iterable[Any] | None = None
    ) -> None:
        super().__init__(message)
        self.field, self.message = field, message
        self.columns = None if columns is None else list(columns)


def _bad(errs: Problems, bad: _RowError, path: str, line: int) -> None:
    errs.add(bad.message, path=path, line=line, field=bad.field, columns=bad.columns)


# ---------------------------------------------------------------------------- row sources
def _rows(
    source: Any, errors: Problems, *, split: str | None = None, typed: Iterable[str] = ()
) -> Iterator[tuple[str, int, Any]]:
    """``(path, line, row)`` of any source (:func:`pluralign.data.sources.iter_rows`); rows
    that cannot be parsed are reported and skipped."""
    return iter_rows(source, errors, split=split, typed=typed)


def _number(value: Any, name: str) -> float:
    """A finite real number (not a boolean) as a float; huge integers that overflow a float
    are refused, not turned into ``inf`` or an ``OverflowError``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _RowError(name, f"must hold finite numbers, got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        raise _RowError(name, "holds a number too large for a 64-bit float") from None
    if not math.isfinite(out):
        raise _RowError(name, f"must hold finite numbers, got {value!r}")
    return out


def _messages(value: Any, name: str) -> list[dict[str, Any]] | None:
    """TRL's conversational form: a non-empty list of ``{"role": str, "content": str}``
    messages (other keys are kept, null ones dropped: columnar sources fill absent keys with
    null); ``None`` for a string. Anything else is refused."""
    if value is None:
        raise _RowError(name, "missing (null)")
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(name, "is empty")
        return None
    if isinstance(value, list) and value:
        out = []
        for i, message in enumerate(value):
            if (
                not isinstance(message, Mapping)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise _RowError(name, f"message {i} must be {{'role': str, 'content': str}}")
            if not message["role"].strip() or not message["content"].strip():
                raise _RowError(name, f"message {i} has an empty role or content")
            out.append({str(k): v for k, v in message.items() if v is not None})
        return out
    raise _RowError(
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
    except _RowError as bad:
        raise DataValidationError(bad.message, field=bad.field, **where) from None


def _user(value: Any, name: str = "user_id") -> str | int:
    if value is None:
        raise _RowError(name, "missing (null)")
    if isinstance(value, bool):
        raise _RowError(name, f"must be a non-empty string or an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise _RowError(name, f"must be a non-empty string or an integer, got {value!r}")


def _context(value: Any, name: str = "user_context") -> tuple[str, Any]:
    """``("vector", [floats])`` or ``("attributes", {name: value})``."""
    if isinstance(value, list):
        out = [_number(v, name) for v in value]
        if not out:
            raise _RowError(name, "is an empty list")
        return "vector", out
    if isinstance(value, Mapping):
        flat = _flatten(value)
        for key, v in flat.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                _number(v, f"{name}.{key}")
            if not (v is None or isinstance(v, str | int | float | bool)):
                raise _RowError(
                    f"{name}.{key}",
                    f"must be a number, string, boolean or null, got {type(v).__name__}",
                )
        return "attributes", flat
    raise _RowError(
        name, f"must be a list of numbers or a mapping of attributes, got {type(value).__name__}"
    )


def _hashable(parsed: Any) -> Any:
    """A parsed context (a list of floats or a flat mapping of scalars) as a hashable key;
    equal numbers are equal (``2`` and ``2.0``: both encode as 2.0), booleans and strings are
    not numbers."""

    def scalar(v: Any) -> tuple[str, Any]:
        if isinstance(v, bool):
            return "bool", v
        if isinstance(v, int | float):
            return "number", float(v)
        return type(v).__name__, v

    if isinstance(parsed, Mapping):
        return tuple(sorted((k, *scalar(v)) for k, v in parsed.items()))
    return tuple(parsed)


def _flatten(mapping: Mapping, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Nested attributes as dotted names (``{"a": {"b": 1}}`` → ``{"a.b": 1}``). Two entries
    that flatten to the same name (``{"a.b": 1, "a": {"b": 2}}``) are refused, not merged."""
    from pluralign._parse import MAX_DEPTH

    if depth > MAX_DEPTH:
        raise _RowError(prefix.rstrip(".") or None, f"nested more than {MAX_DEPTH} levels deep")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise _RowError(
                prefix.rstrip(".") or None, f"attribute names must be strings, got {key!r}"
            )
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not value:
            raise _RowError(name, "is an empty mapping (give the attribute a value, or null)")
        items = (
            _flatten(value, name + ".", depth + 1).items()
            if isinstance(value, Mapping)
            else [(name, value)]
        )
        for flat_name, flat_value in items:
            if flat_name in out:
                raise _RowError(
                    flat_name,
                    "two attributes flatten to this name (a dotted key "
                    "and a nested mapping); rename one",
                )
            out[flat_name] = flat_value
    return out


class _Contexts:
    """Per-user contexts: one kind and one length for all rows, the same for every row of a
    user (checked at the end by :meth:`check`, against the context most of the user's rows
    have); attribute mappings encoded as numbers (numeric attributes) and one-hot columns (the
    others)."""

    def __init__(self, name: str = "user_context") -> None:
        self.name = name
        self.kind: str | None = None
        self.by_user: dict[Any, list[tuple[Any, str, int]]] = {}
        self.rows: list[Any] = []
        self.where: list[tuple[str, int]] = []

    def add(self, user: Any, value: Any, path: str, line: int) -> None:
        kind, parsed = _context(value, self.name)
        if self.kind is None:
            self.kind = kind
        elif kind != self.kind:
            raise _RowError(self.name, f"is a {kind} but earlier rows have a {self.kind}")
        if kind == "vector" and self.rows and len(parsed) != len(self.rows[0]):
            raise _RowError(
                self.name, f"has length {len(parsed)}, earlier rows have {len(self.rows[0])}"
            )
        self.by_user.setdefault(user, []).append((parsed, path, line))
        self.rows.append(parsed)
        self.where.append((path, line))

    def check(self, errors: Problems) -> None:
        """Each user's context is the one most of its rows have (a tie: the first row's);
        every row with another context is reported, naming both."""
        for user, entries in self.by_user.items():
            keys = [_hashable(parsed) for parsed, _, _ in entries]
            counts = Counter(keys)
            if len(counts) == 1:
                continue
            first_at: dict[Any, int] = {}
            for i, key in enumerate(keys):
                first_at.setdefault(key, i)
            top = max(counts.values())
            leaders = [k for k in counts if counts[k] == top]
            majority = min(leaders, key=first_at.__getitem__)  # ties: the earliest
            value, first_path, first_line = entries[first_at[majority]]
            if len(leaders) == 1:
                theirs = (
                    f"{top} of the user's {len(entries)} rows (the first on line "
                    f"{first_line} of {first_path}) have {dumps_short(value)}"
                )
            else:
                theirs = (
                    f"no context is on most of the user's {len(entries)} rows, so the "
                    f"first row's is taken: {dumps_short(value)}, on line {first_line} "
                    f"of {first_path}"
                )
            for key, (parsed, path, line) in zip(keys, entries, strict=True):
                if key != majority:
                    errors.add(
                        f"differs from user {user!r}'s context: {theirs}; this row has "
                        f"{dumps_short(parsed)}",
                        path=path,
                        line=line,
                        field=self.name,
                    )

    def matrix(self) -> tuple[np.ndarray | None, list[str]]:
        """``(contexts (n, d_x), column names)``; :attr:`schema` is set to their encoding."""
        self.schema: ContextSchema | None = None
        if self.kind is None:
            return None, []
        if self.kind == "vector":
            arr = np.array(self.rows, dtype=np.float64)
            self.schema = ContextSchema.vector(arr.shape[1])
            return arr, list(self.schema.names)
        numeric = sorted(
            {
                k
                for row in self.rows
                for k, v in row.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        categorical = sorted(
            {f"{k}={v}" for row in self.rows for k, v in row.items() if k not in numeric}
        )
        mixed = [
            k
            for k in numeric
            if any(
                k in row and (isinstance(row[k], bool) or not isinstance(row[k], int | float))
                for row in self.rows
            )
        ]
        if mixed:
            raise DataValidationError(
                f"attribute {mixed[0]!r} mixes numbers and other values",
                field=f"{self.name}.{mixed[0]}",
            )
        for i, row in enumerate(self.rows):  # a missing number would silently become 0
            absent = [k for k in numeric if k not in row]
            if absent:
                first = next(j for j, r in enumerate(self.rows) if absent[0] in r)
                raise DataValidationError(
                    f"numeric attribute {absent[0]!r} (given on line {self.where[first][1]} of "
                    f"{self.where[first][0]}) is missing here; give it on every row",
                    field=f"{self.name}.{absent[0]}",
                    path=self.where[i][0],
                    line=self.where[i][1],
                )
        pairs = {(k, str(v)) for row in self.rows for k, v in row.items() if k not in numeric}
        if len({f"{k}={v}" for k, v in pairs}) != len(pairs) or set(categorical) & set(numeric):
            clash = sorted(f"{k}={v}" for k, v in pairs)
            dup = next(n for n in clash if clash.count(n) > 1 or n in numeric)
            raise DataValidationError(
                f"two attributes give the same one-hot column {dup!r}; rename one", field=self.name
            )
        names = numeric + categorical
        self.schema = ContextSchema("attributes", tuple(names), tuple(numeric))
        col = {n: i for i, n in enumerate(names)}
        arr = np.zeros((len(self.rows), len(names)))
        for i, row in enumerate(self.rows):
            for key, value in row.items():
                if key in numeric:
                    arr[i, col[key]] = float(value)
                else:
                    arr[i, col[f"{key}={value}"]] = 1.0
        return arr, names


@dataclass(frozen=True)
class ContextSchema:
    """How user contexts became the columns of ``x``, so that a context given later (a new
    user's, ``pluralign rank --context``) is encoded into the same columns.

    ``kind`` is ``"vector"`` (a list of numbers; ``names`` are ``x0, x1, …``) or
    ``"attributes"`` (a mapping, nested keys dotted): each numeric attribute is a column of its
    value (``numeric`` lists them), every other attribute a one-hot column ``name=value`` per
    value seen in training (a missing non-numeric attribute is all zeros there, and here)."""

    kind: str
    names: tuple[str, ...]
    numeric: tuple[str, ...] = ()

    @classmethod
    def vector(cls, d: int) -> ContextSchema:
        names = tuple(f"x{i}" for i in range(d))
        return cls("vector", names, names)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names), "numeric": list(self.numeric)}

    @classmethod
    def from_dict(cls, value: Any, field: str = "context") -> ContextSchema:
        """The inverse of :meth:`to_dict`, validated (a model folder may come from anyone)."""
        ok = (
            isinstance(value, Mapping)
            and set(value) == {"kind", "names", "numeric"}
            and value["kind"] in ("vector", "attributes")
            and all(
                isinstance(v, list) and all(isinstance(n, str) and n for n in v)
                for v in (value["names"], value["numeric"])
            )
        )
        if ok:
            names, numeric = value["names"], value["numeric"]
            ok = (
                bool(names)
                and len(set(names)) == len(names)
                and set(numeric) <= set(names)
                and (value["kind"] == "attributes" or numeric == names)
            )
        if not ok:
            raise DataValidationError(
                "must be {kind: vector|attributes, names: [column names], numeric: [the "
                "numeric ones]} with distinct, non-empty names",
                field=field,
            )
        return cls(value["kind"], tuple(value["names"]), tuple(value["numeric"]))

    def encode(self, value: Any, name: str = "context") -> np.ndarray:
        """One context (a list of numbers, or a mapping of attributes) as a ``(d_x,)`` row;
        anything the training contexts did not have is refused, naming it (``name`` is how
        the message calls the value)."""
        try:
            kind, parsed = _context(value, name)
        except _RowError as err:
            raise DataValidationError(err.message, field=err.field) from None
        if kind != self.kind:
            want = (
                f"a list of {len(self.names)} numbers"
                if self.kind == "vector"
                else "a mapping of attributes (" + ", ".join(self._attributes()) + ")"
            )
            raise DataValidationError(
                f"must be {want}, like the model's training contexts", field=name
            )
        if kind == "vector":
            if len(parsed) != len(self.names):
                raise DataValidationError(
                    f"has {len(parsed)} numbers; the model's contexts have {len(self.names)}",
                    field=name,
                )
            return np.asarray(parsed, dtype=np.float64)
        out = np.zeros(len(self.names))
        col = {n: i for i, n in enumerate(self.names)}
        for key, v in parsed.items():
            if key in self.numeric:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise DataValidationError(
                        f"must be a number (a numeric attribute in training), got {v!r}",
                        field=f"{name}.{key}",
                    )
                out[col[key]] = float(v)
            elif f"{key}={v}" in col:
                out[col[f"{key}={v}"]] = 1.0
            else:
                known = [
                    n.split("=", 1)[1]
                    for n in self.names
                    if n.startswith(f"{key}=") and n not in self.numeric
                ]
                raise DataValidationError(
                    f"value {v!r} was not seen in training; known values: "
                    + ", ".join(map(repr, known))
                    if known
                    else "not an attribute of the model's contexts; they have: "
                    + ", ".join(self._attributes()),
                    field=f"{name}.{key}",
                )
        missing = [n for n in self.numeric if n not in parsed]
        if missing:
            raise DataValidationError(
                "missing (a numeric attribute of every training context)",
                field=f"{name}.{missing[0]}",
            )
        return out

    def _attributes(self) -> list[str]:
        return list(
            dict.fromkeys(n if n in self.numeric else n.split("=", 1)[0] for n in self.names)
        )


def _finish(
    columns: dict[str, list],
    contexts: _Contexts | None,
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
TRL_FIELDS = ("prompt", "chosen", "rejected", "user_id")
COLUMN_ARGUMENTS = (
    "prompt_column",
    "chosen_column",
    "rejected_column",
    "user_column",
    "context_column",
)
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
        raise _RowError(
            cols["prompt"],
            "missing, and an implicit prompt needs chosen and "
            "rejected both strings or both message lists",
            columns=row,
        )
    if not _same(chosen[0], rejected[0]):
        raise _RowError(cols["prompt"], NO_SHARED_START, columns=row)
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise _RowError(cols["prompt"], NO_SHARED_START, columns=row)
    return prompt, chosen, rejected


def _trl_row(row: Any, cols: Columns) -> tuple[str, str, str, Any, tuple | None, bool]:
    """``(prompt, chosen, rejected, user, messages or None, implicit string prompt?)``."""
    if not isinstance(row, Mapping):
        raise _RowError(None, "each row must be a JSON object")
    for key in ("chosen", "rejected", "user"):
        if cols[key] not in row:
            raise _RowError(cols[key], cols.missing(key, row), columns=row)
    prompt, chosen, rejected = row.get(cols["prompt"]), row[cols["chosen"]], row[cols["rejected"]]
    implicit = prompt is None
    if implicit and cols.mapped().get("prompt_column") and cols["prompt"] not in row:
        raise _RowError(cols["prompt"], cols.missing("prompt", row), columns=row)
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
        raise _RowError(cols["rejected"], f"is identical to {cols['chosen']!r}")
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
    errs = _Errors(errors)
    cols = Columns.of(
        "trl",
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
        user_column=user_column,
        context_column=context_column,
    )
    context = cols["context"]
    out, contexts = _columns(), _Contexts(context)
    seen_context = False
    for path, line, row in _rows(source, errs, split=split, typed=(context,)):
        try:
            has = isinstance(row, Mapping) and row.get(context) is not None
            if seen_context and not has and isinstance(row, Mapping):
                raise _RowError(context, "missing here but present on earlier rows")
            if has and not seen_context and out["prompts"]:
                raise _RowError(context, "present here but missing on earlier rows")
            prompt, chosen, rejected, user, messages, implicit = _trl_row(row, cols)
            if has:
                contexts.add(user, row[context], path, line)
        except _RowError as bad:
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
) -> tuple[str, str, str, str] | None:
    if not isinstance(row, Mapping):
        raise _RowError(None, "each row must be a JSON object")
    for key in ("info", "summaries", "choice"):
        if key not in row:
            raise _RowError(key, "missing", columns=row)
    if cols["user"] not in row:
        raise _RowError(cols["user"], cols.missing("user", row), columns=row)
    info = row["info"]
    if not isinstance(info, Mapping):
        raise _RowError("info", "must be an object with post, title and subreddit")
    summaries = row["summaries"]
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise _RowError("summaries", "must be a list of two {'text': ...} objects")
    texts = []
    for i, summary in enumerate(summaries):
        if (
            not isinstance(summary, Mapping)
            or not isinstance(summary.get("text"), str)
            or not summary["text"].strip()
        ):
            raise _RowError(f"summaries[{i}].text", "must be a non-empty string")
        texts.append(summary["text"].strip())
    choice = row["choice"]
    if isinstance(choice, bool) or not isinstance(choice, int) or choice not in (0, 1):
        raise _RowError("choice", f"must be 0 or 1, got {choice!r}")
    worker = _user(row[cols["user"]], cols["user"])
    post = info.get("post")
    if post is None:
        article = info.get("article")
        if not isinstance(article, str) or not article.strip():
            raise _RowError("info.post", "missing (and no info.article)")
        if not include_articles:
            return None
        prompt = f"ARTICLE: {article.strip()}\nTL;DR:"
    else:
        for key in ("post", "title", "subreddit"):
            if not isinstance(info.get(key), str):
                raise _RowError(f"info.{key}", "must be a string")
        prompt = (
            f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\n"
            f"POST: {post.strip()}\nTL;DR:"
        )
    if texts[0] == texts[1]:
        raise _RowError("summaries", "the two summaries are identical")
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
    errs = _Errors(errors)
    names = Columns.of("summarize", user_column=user_column, **columns)
    cols, skipped = _columns(), 0
    for path, line, row in _rows(source, errs, split=split, typed=("info", "summaries", "choice")):
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
        except _RowError as bad:
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
PRISM_TYPED = ("turn", "if_chosen", "score")


def _read_survey(
    source: Any, attributes: Sequence[str], errs: Problems, cols: Columns
) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    uid = cols["user"]
    for path, line, row in _rows(source, errs):
        try:
            if not isinstance(row, Mapping):
                raise _RowError(None, "each row must be a JSON object")
            if uid not in row:
                raise _RowError(uid, cols.missing("user", row), columns=row)
            user = _user(row[uid], uid)
            flat = _flatten(row)
            for key in attributes:
                if key not in flat:
                    raise _RowError(key, "missing survey attribute", columns=flat)
            values = {k: ("(missing)" if flat[k] is None else flat[k]) for k in attributes}
            _context(values, "survey")
            if user in out:
                raise _RowError(uid, f"user {user!r} appears twice in the survey")
        except _RowError as bad:
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
                raise _RowError(None, "each row must be a JSON object")
            if uid not in row:
                raise _RowError(uid, cols.missing("user", row), columns=row)
            for key in ("conversation_id", "turn", "user_prompt", "model_response", "if_chosen"):
                if key not in row:
                    raise _RowError(key, "missing", columns=row)
            user = _user(row[uid], uid)
            if not isinstance(row["if_chosen"], bool):
                raise _RowError("if_chosen", f"must be true or false, got {row['if_chosen']!r}")
            turn = row["turn"]
            if isinstance(turn, bool) or not isinstance(turn, int):
                raise _RowError("turn", f"must be an integer, got {turn!r}")
            conversation = row["conversation_id"]
            if isinstance(conversation, bool) or not isinstance(conversation, str | int):
                raise _RowError(
                    "conversation_id", f"must be a string or an integer, got {conversation!r}"
                )
            parsed = {
                "user": user,
                "prompt": _text(row["user_prompt"], "user_prompt"),
                "response": _text(row["model_response"], "model_response"),
                "chosen": row["if_chosen"],
            }
        except _RowError as bad:
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
    errs = _Errors(errors)
    cols = Columns.of(
        "prism",
        user_column=user_column,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
        **columns,
    )
    users = _read_survey(survey, attributes, errs, cols)
    rows = list(_rows(pairs, errs, typed=PRISM_TYPED))
    utterances = bool(rows) and isinstance(rows[0][2], Mapping) and "model_response" in rows[0][2]
    items: Iterable[tuple[str, int, str, str, str, Any]] = (
        _utterance_pairs(rows, errs, cols) if utterances else _trl_items(rows, errs, cols)
    )
    out, contexts = _columns(), _Contexts()
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
        except _RowError as bad:
            _bad(errs, bad, path, line)
            continue
        yield path, line, prompt, chosen, rejected, user


# ---------------------------------------------------------------------------- validation
FORMATS = ("numeric", "trl", "summarize", "prism")


def _replayable(source: Any) -> Any:
    """A one-shot iterator (a generator) as a list, so that the format can be detected from
    its first row and the rows still read."""
    if not isinstance(source, str | Path | Mapping) and hasattr(source, "__next__"):
        return list(source)
    return source


def detect_format(source: Any, *, split: str | None = None) -> str:
    """``numeric`` (``.npz`` or rows with ``phi0``), ``trl``, ``summarize`` or ``prism`` (PRISM
    utterances), from the suffix and the keys of the first row (of a file or of in-memory
    rows: a ``datasets`` object, a DataFrame, a list of mappings)."""
    if isinstance(source, str | Path) and Path(source).suffix.lower() == ".npz":
        return "numeric"
    errs = _Errors("collect")
    for _, _, row in _rows(source, errs, split=split):
        if not isinstance(row, Mapping):
            break
        keys = set(row)
        if "phi0" in keys:
            return "numeric"
        if {"summaries", "info"} <= keys:
            return "summarize"
        if "model_response" in keys:
            return "prism"
        return "trl"
    raise DataValidationError(
        "cannot tell the format (no JSON object in the first row); pass --format",
        path=_source_name(source),
    )


def _column_kwargs(columns: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(columns) - set(COLUMN_ARGUMENTS))
    if unknown:
        raise DataValidationError(
            f"unknown keyword {unknown[0]!r}; valid: {', '.join(COLUMN_ARGUMENTS)}",
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
    if fmt == "trl":
        return read_trl(source, split=split, **given)
    if fmt == "summarize":
        return read_summarize_from_feedback(source, split=split, **given)
    if fmt == "prism":
        if survey is None:
            raise DataValidationError(
                "PRISM pairs need the survey file (--survey / survey:)", path=_source_name(source)
            )
        if split is not None:
            raise DataValidationError(
                "split= is not supported for PRISM data: pass the split's rows", field="split"
            )
        return read_prism(survey, source, **given)
    raise DataValidationError(
        f"not a text preference format: {fmt!r} (valid: trl, summarize, prism)",
        path=_source_name(source),
    )


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
    if fmt not in FORMATS:
        raise DataValidationError(
            f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}", field="format"
        )
    if fmt == "numeric":
        from pluralign.data.io import load_preferences

        try:
            data, found = load_preferences(path, errors="collect", split=split, **given)
        except DataValidationError as err:
            if err.line is None and err.field is None and err.row is None:
                raise  # the file itself is unreadable (missing, a folder, not an .npz)
            return 0, [err]
        return (0 if data is None else data.n), found
    reader: Callable[..., Any]
    if fmt == "trl":
        reader = read_trl
    elif fmt == "summarize":
        reader = read_summarize_from_feedback
    elif survey is not None:
        return _count(read_prism(survey, path, errors="collect", **given))
    else:  # PRISM utterances alone: check the rows and the pairing, without user contexts
        errs = _Errors("collect")
        cols = Columns.of("prism", **given)
        n = sum(
            1
            for _ in _utterance_pairs(
                list(_rows(path, errs, split=split, typed=PRISM_TYPED)), errs, cols
            )
        )
        return n, errs.ordered()
    return _count(reader(path, errors="collect", split=split, **given))


def _count(
    result: tuple[TextPreferences | None, list[DataValidationError]],
) -> tuple[int, list[DataValidationError]]:
    prefs, found = result
    return (0 if prefs is None else prefs.n), found
