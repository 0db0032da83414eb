"""Text preference data with users: TRL-style files, ``summarize_from_feedback`` and PRISM.

Every reader validates every row; a bad row raises :class:`~pluralign.errors.DataValidationError`
naming the file, the line (the 1-based row number for Parquet and in-memory rows) and the
field — or, with ``errors="collect"``, all bad rows are returned together (what
``pluralign data validate`` prints). Nothing here downloads: the readers take local files or
in-memory rows (for example a Hugging Face ``datasets.Dataset``, which is an iterable of dicts).

**TRL-style rows** (TRL's preference format plus a user), JSONL / JSON-lines, Parquet or rows::

    {"prompt": "...", "chosen": "...", "rejected": "...", "user_id": "u7",
     "user_context": [0.1, 2.0] | {"age": "25-34", "score": 3.5}}     # user_context optional

``prompt``, ``chosen`` and ``rejected`` are strings, or TRL's conversational form (lists of
``{"role", "content"}`` messages, rendered as ``"role: content"`` lines). ``user_id`` is a
non-empty string or an integer. ``user_context`` is a list of numbers (same length on every row)
or a mapping of attributes: numbers are kept (a numeric attribute must be given on every row:
a missing one is refused, not filled with 0), strings/booleans/null become one-hot indicators
``name=value``; it must be the same on every row of a user.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pluralign._parse import iter_json_lines
from pluralign.data.preference import PreferenceData
from pluralign.errors import DataValidationError

__all__ = [
    "PRISM_ATTRIBUTES",
    "TextPreferences",
    "detect_format",
    "read_prism",
    "read_summarize_from_feedback",
    "read_text_preferences",
    "read_trl",
    "validate_file",
]

PRISM_ATTRIBUTES = ("age", "gender", "education", "employment_status", "marital_status",
                    "english_proficiency")
SUMMARIZE_TEMPLATE = "{prompt} {response}"


# ---------------------------------------------------------------------------- the container
@dataclass(frozen=True, eq=False)
class TextPreferences:
    """Text comparisons with users: ``chosen[i] ≻ rejected[i]`` for ``prompts[i]``, by user
    ``users[i]``. ``contexts`` (``(n, d_x)`` or ``None``) are user contexts with column names
    ``context_names``; ``where[i]`` is the ``(file, line)`` of row ``i``; ``template`` (if set)
    is how the source joins prompt and response (see :class:`~pluralign.features.TextEncoder`);
    ``conversational`` is whether some rows were TRL message lists (rendered as text).
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

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        return (f"TextPreferences(n={self.n}, users={len(np.unique(self.users))}, "
                f"d_x={0 if self.contexts is None else self.contexts.shape[1]})")

    def subset(self, index: np.ndarray | Sequence[int]) -> TextPreferences:
        """The rows ``index`` (integer positions or a boolean mask), in that order."""
        rows = np.arange(self.n)[np.asarray(index)] if len(index) else np.zeros(0, int)
        pick = [int(i) for i in rows]
        return TextPreferences(
            prompts=[self.prompts[i] for i in pick], chosen=[self.chosen[i] for i in pick],
            rejected=[self.rejected[i] for i in pick], users=self.users[rows],
            contexts=None if self.contexts is None else self.contexts[rows],
            context_names=list(self.context_names),
            where=[self.where[i] for i in pick] if self.where else [], template=self.template,
            conversational=self.conversational)

    def to_preference_data(self, encoder: Any, *, orient: str = "random",
                           seed: int = 0) -> PreferenceData:
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
            raise DataValidationError(f"must be 'random' or 'chosen_second', got {orient!r}",
                                      field="orient")
        phi1 = np.where(flip[:, None], phi_r, phi_c)
        phi0 = np.where(flip[:, None], phi_c, phi_r)
        return PreferenceData(x=self.contexts, phi0=phi0, phi1=phi1,
                              y=(~flip).astype(np.int8), users=self.users)


# ---------------------------------------------------------------------------- errors
class _Errors:
    """Raise at the first bad row (``errors="raise"``) or collect them all."""

    def __init__(self, mode: str) -> None:
        if mode not in ("raise", "collect"):
            raise DataValidationError(f"must be 'raise' or 'collect', got {mode!r}",
                                      field="errors")
        self.mode = mode
        self.found: list[DataValidationError] = []

    def add(self, message: str, *, path: str, line: int, field: str | None = None) -> None:
        err = DataValidationError(message, path=path, line=line, field=field)
        if self.mode == "raise":
            raise err
        self.found.append(err)


class _RowError(Exception):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


# ---------------------------------------------------------------------------- row sources
def _rows(source: Any, errors: _Errors) -> Iterator[tuple[str, int, Any]]:
    """``(path, line, row)`` from a JSONL / JSON-lines / Parquet file or an iterable of rows.
    Lines that are not JSON objects are reported and skipped."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise DataValidationError("file not found", path=str(path))
        if not path.is_file():
            raise DataValidationError("is not a regular file (a folder?)", path=str(path))
        if path.suffix == ".parquet":
            yield from _parquet_rows(path)
            return
        if path.suffix not in (".jsonl", ".json", ".ndjson"):
            raise DataValidationError(f"unknown suffix {path.suffix!r}; use .jsonl, .json "
                                      "(one object per line) or .parquet", path=str(path))
        sink = errors.found if errors.mode == "collect" else None
        for lineno, row in iter_json_lines(path, errors=sink):
            yield str(path), lineno, row
        return
    label = f"<{type(source).__name__}>"
    for i, row in enumerate(source, start=1):
        yield label, i, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is in the dev/text extras
        raise DataValidationError("reading Parquet needs pyarrow (pip install "
                                  "'pluralign[text]')", path=str(path)) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError, OverflowError) as exc:
        raise DataValidationError(f"not a readable Parquet file ({type(exc).__name__}: "
                                  f"{str(exc)[:160]})", path=str(path)) from None
    for i, row in enumerate(rows, start=1):
        yield str(path), i, row


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


def _text(value: Any, name: str) -> str:
    """A string, or TRL's conversational form rendered as ``role: content`` lines."""
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(name, "is empty")
        return value
    if isinstance(value, list) and value:
        lines = []
        for i, message in enumerate(value):
            if (not isinstance(message, Mapping) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)):
                raise _RowError(name, f"message {i} must be {{'role': str, 'content': str}}")
            if not message["role"].strip() or not message["content"].strip():
                raise _RowError(name, f"message {i} has an empty role or content")
            lines.append(f"{message['role']}: {message['content']}")
        return "\n".join(lines)
    raise _RowError(name, f"must be a non-empty string or a list of messages, got "
                          f"{type(value).__name__}")


def _user(value: Any, name: str = "user_id") -> str | int:
    if isinstance(value, bool) or value is None:
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
                raise _RowError(f"{name}.{key}", f"must be a number, string, boolean or null, "
                                                 f"got {type(v).__name__}")
        return "attributes", flat
    raise _RowError(name, f"must be a list of numbers or a mapping of attributes, got "
                          f"{type(value).__name__}")


def _flatten(mapping: Mapping, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Nested attributes as dotted names (``{"a": {"b": 1}}`` → ``{"a.b": 1}``). Two entries
    that flatten to the same name (``{"a.b": 1, "a": {"b": 2}}``) are refused, not merged."""
    from pluralign._parse import MAX_DEPTH

    if depth > MAX_DEPTH:
        raise _RowError(prefix.rstrip(".") or None, f"nested more than {MAX_DEPTH} levels deep")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise _RowError(prefix.rstrip(".") or None,
                            f"attribute names must be strings, got {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not value:
            raise _RowError(name, "is an empty mapping (give the attribute a value, or null)")
        items = _flatten(value, name + ".", depth + 1).items() if isinstance(value, Mapping) \
            else [(name, value)]
        for flat_name, flat_value in items:
            if flat_name in out:
                raise _RowError(flat_name, "two attributes flatten to this name (a dotted key "
                                           "and a nested mapping); rename one")
            out[flat_name] = flat_value
    return out


class _Contexts:
    """Per-user contexts: consistent per user, one kind and one length for all rows; attribute
    mappings encoded as numbers (numeric attributes) and one-hot columns (the others)."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.by_user: dict[Any, tuple[Any, str, int]] = {}
        self.rows: list[Any] = []
        self.where: list[tuple[str, int]] = []

    def add(self, user: Any, value: Any, path: str, line: int) -> None:
        kind, parsed = _context(value)
        if self.kind is None:
            self.kind = kind
        elif kind != self.kind:
            raise _RowError("user_context", f"is a {kind} but earlier rows have a {self.kind}")
        if kind == "vector" and self.rows and len(parsed) != len(self.rows[0]):
            raise _RowError("user_context", f"has length {len(parsed)}, earlier rows have "
                                            f"{len(self.rows[0])}")
        if user in self.by_user and self.by_user[user][0] != parsed:
            _, first_path, first_line = self.by_user[user]
            raise _RowError("user_context", f"differs from user {user!r}'s context on line "
                                            f"{first_line} of {first_path}")
        self.by_user.setdefault(user, (parsed, path, line))
        self.rows.append(parsed)
        self.where.append((path, line))

    def matrix(self) -> tuple[np.ndarray | None, list[str]]:
        if self.kind is None:
            return None, []
        if self.kind == "vector":
            arr = np.array(self.rows, dtype=np.float64)
            return arr, [f"x{i}" for i in range(arr.shape[1])]
        numeric = sorted({k for row in self.rows for k, v in row.items()
                          if isinstance(v, int | float) and not isinstance(v, bool)})
        categorical = sorted({f"{k}={v}" for row in self.rows for k, v in row.items()
                              if k not in numeric})
        mixed = [k for k in numeric if any(k in row and (isinstance(row[k], bool) or not
                                                         isinstance(row[k], int | float))
                                           for row in self.rows)]
        if mixed:
            raise DataValidationError(f"attribute {mixed[0]!r} mixes numbers and other values",
                                      field=f"user_context.{mixed[0]}")
        for i, row in enumerate(self.rows):  # a missing number would silently become 0
            absent = [k for k in numeric if k not in row]
            if absent:
                first = next(j for j, r in enumerate(self.rows) if absent[0] in r)
                raise DataValidationError(
                    f"numeric attribute {absent[0]!r} (given on line {self.where[first][1]} of "
                    f"{self.where[first][0]}) is missing here; give it on every row",
                    field=f"user_context.{absent[0]}", path=self.where[i][0],
                    line=self.where[i][1])
        pairs = {(k, str(v)) for row in self.rows for k, v in row.items() if k not in numeric}
        if len({f"{k}={v}" for k, v in pairs}) != len(pairs) or set(categorical) & set(numeric):
            clash = sorted(f"{k}={v}" for k, v in pairs)
            dup = next(n for n in clash if clash.count(n) > 1 or n in numeric)
            raise DataValidationError(f"two attributes give the same one-hot column {dup!r}; "
                                      "rename one", field="user_context")
        names = numeric + categorical
        col = {n: i for i, n in enumerate(names)}
        arr = np.zeros((len(self.rows), len(names)))
        for i, row in enumerate(self.rows):
            for key, value in row.items():
                if key in numeric:
                    arr[i, col[key]] = float(value)
                else:
                    arr[i, col[f"{key}={value}"]] = 1.0
        return arr, names


def _finish(columns: dict[str, list], contexts: _Contexts | None, errors: _Errors,
            template: str | None = None, skipped: int = 0, source: str = "data"
            ) -> TextPreferences | None:
    if errors.found:
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
            "strings (7 and '7' would merge); use one type", field="user_id", path=path,
            line=line)
    return TextPreferences(prompts=columns["prompts"], chosen=columns["chosen"],
                           rejected=columns["rejected"], users=np.array(users), contexts=x,
                           context_names=names, where=columns["where"], template=template,
                           skipped=skipped, conversational=bool(columns.get("conversational")))


def _columns() -> dict[str, list]:
    return {"prompts": [], "chosen": [], "rejected": [], "users": [], "where": []}


def _result(prefs: TextPreferences | None, errors: _Errors
            ) -> TextPreferences | tuple[TextPreferences | None, list[DataValidationError]]:
    if errors.mode == "collect":
        return prefs, errors.found
    assert prefs is not None
    return prefs


# ---------------------------------------------------------------------------- TRL-style
TRL_FIELDS = ("prompt", "chosen", "rejected", "user_id")


def _trl_row(row: Any, contexts: _Contexts, path: str, line: int
             ) -> tuple[str, str, str, str | int]:
    if not isinstance(row, Mapping):
        raise _RowError(None, "each row must be a JSON object")
    for key in TRL_FIELDS:
        if key not in row:
            raise _RowError(key, "missing")
    prompt = _text(row["prompt"], "prompt")
    chosen = _text(row["chosen"], "chosen")
    rejected = _text(row["rejected"], "rejected")
    user = _user(row["user_id"])
    if chosen == rejected:
        raise _RowError("rejected", "is identical to 'chosen'")
    if row.get("user_context") is not None:
        contexts.add(user, row["user_context"], path, line)
    return prompt, chosen, rejected, user


def read_trl(source: Any, *, errors: str = "raise") -> Any:
    """Read TRL-style rows (see the module docstring) from a file or an iterable of mappings.

    Returns a :class:`TextPreferences`; with ``errors="collect"`` returns ``(prefs or None,
    [errors])`` with every bad row reported.
    """
    errs = _Errors(errors)
    cols, contexts = _columns(), _Contexts()
    seen_context = False
    for path, line, row in _rows(source, errs):
        try:
            has = isinstance(row, Mapping) and row.get("user_context") is not None
            if seen_context and not has and isinstance(row, Mapping):
                raise _RowError("user_context", "missing here but present on earlier rows")
            if has and not seen_context and cols["prompts"]:
                raise _RowError("user_context", "present here but missing on earlier rows")
            prompt, chosen, rejected, user = _trl_row(row, contexts, path, line)
        except _RowError as bad:
            errs.add(bad.message, path=path, line=line, field=bad.field)
            continue
        seen_context = seen_context or has
        if any(isinstance(row[k], list) for k in ("prompt", "chosen", "rejected")):
            cols["conversational"] = True       # rendered as "role: content" lines
        _append(cols, prompt, chosen, rejected, user, path, line)
    return _result(_finish(cols, contexts, errs, source=str(source)), errs)


def _append(cols: dict[str, list], prompt: str, chosen: str, rejected: str, user: Any,
            path: str, line: int) -> None:
    cols["prompts"].append(prompt)
    cols["chosen"].append(chosen)
    cols["rejected"].append(rejected)
    cols["users"].append(user)
    cols["where"].append((path, line))


# ---------------------------------------------------------------------------- summarize
def _summarize_row(row: Any, include_articles: bool) -> tuple[str, str, str, str] | None:
    if not isinstance(row, Mapping):
        raise _RowError(None, "each row must be a JSON object")
    for key in ("info", "summaries", "choice", "worker"):
        if key not in row:
            raise _RowError(key, "missing")
    info = row["info"]
    if not isinstance(info, Mapping):
        raise _RowError("info", "must be an object with post, title and subreddit")
    summaries = row["summaries"]
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise _RowError("summaries", "must be a list of two {'text': ...} objects")
    texts = []
    for i, summary in enumerate(summaries):
        if not isinstance(summary, Mapping) or not isinstance(summary.get("text"), str) \
                or not summary["text"].strip():
            raise _RowError(f"summaries[{i}].text", "must be a non-empty string")
        texts.append(summary["text"].strip())
    choice = row["choice"]
    if isinstance(choice, bool) or not isinstance(choice, int) or choice not in (0, 1):
        raise _RowError("choice", f"must be 0 or 1, got {choice!r}")
    worker = _user(row["worker"], "worker")
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
        prompt = (f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\n"
                  f"POST: {post.strip()}\nTL;DR:")
    if texts[0] == texts[1]:
        raise _RowError("summaries", "the two summaries are identical")
    return prompt, texts[choice], texts[1 - choice], worker


def read_summarize_from_feedback(source: Any, *, include_articles: bool = False,
                                 splits: Sequence[str] | None = None,
                                 errors: str = "raise") -> Any:
    """Read ``openai/summarize_from_feedback`` comparison rows (user = ``worker``).

    ``source`` is a local JSONL/Parquet file or an iterable of rows (e.g. the ``datasets``
    split). ``splits`` keeps only rows whose ``split`` field is listed. See the module docstring
    for the text format; ``TextPreferences.template`` is ``"{prompt} {response}"``.
    """
    errs = _Errors(errors)
    cols, skipped = _columns(), 0
    for path, line, row in _rows(source, errs):
        try:
            if splits is not None and isinstance(row, Mapping) and row.get("split") not in splits:
                skipped += 1
                continue
            parsed = _summarize_row(row, include_articles)
        except _RowError as bad:
            errs.add(bad.message, path=path, line=line, field=bad.field)
            continue
        if parsed is None:
            skipped += 1
            continue
        _append(cols, *parsed, path, line)
    prefs = _finish(cols, None, errs, template=SUMMARIZE_TEMPLATE, skipped=skipped,
                    source=str(source))
    return _result(prefs, errs)


# ---------------------------------------------------------------------------- PRISM
def _read_survey(source: Any, attributes: Sequence[str], errs: _Errors
                 ) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for path, line, row in _rows(source, errs):
        try:
            if not isinstance(row, Mapping):
                raise _RowError(None, "each row must be a JSON object")
            if "user_id" not in row:
                raise _RowError("user_id", "missing")
            user = _user(row["user_id"])
            flat = _flatten(row)
            for key in attributes:
                if key not in flat:
                    raise _RowError(key, "missing survey attribute")
            values = {k: ("(missing)" if flat[k] is None else flat[k]) for k in attributes}
            _context(values, "survey")
            if user in out:
                raise _RowError("user_id", f"user {user!r} appears twice in the survey")
        except _RowError as bad:
            errs.add(bad.message, path=path, line=line, field=bad.field)
            continue
        out[user] = values
    return out


def _utterance_pairs(rows: Iterable[tuple[str, int, Any]], errs: _Errors
                     ) -> Iterator[tuple[str, int, str, str, str, Any]]:
    """PRISM utterances → (path, line, prompt, chosen, rejected, user) per (conversation, turn)."""
    groups: dict[tuple, list[tuple[str, int, dict]]] = {}
    for path, line, row in rows:
        try:
            if not isinstance(row, Mapping):
                raise _RowError(None, "each row must be a JSON object")
            for key in ("user_id", "conversation_id", "turn", "user_prompt", "model_response",
                        "if_chosen"):
                if key not in row:
                    raise _RowError(key, "missing")
            user = _user(row["user_id"])
            if not isinstance(row["if_chosen"], bool):
                raise _RowError("if_chosen", f"must be true or false, got {row['if_chosen']!r}")
            turn = row["turn"]
            if isinstance(turn, bool) or not isinstance(turn, int):
                raise _RowError("turn", f"must be an integer, got {turn!r}")
            conversation = row["conversation_id"]
            if isinstance(conversation, bool) or not isinstance(conversation, str | int):
                raise _RowError("conversation_id", f"must be a string or an integer, got "
                                                   f"{conversation!r}")
            parsed = {"user": user, "prompt": _text(row["user_prompt"], "user_prompt"),
                      "response": _text(row["model_response"], "model_response"),
                      "chosen": row["if_chosen"]}
        except _RowError as bad:
            errs.add(bad.message, path=path, line=line, field=bad.field)
            continue
        groups.setdefault((row["conversation_id"], turn), []).append((path, line, parsed))
    for (conversation, turn), members in groups.items():
        chosen = [m for m in members if m[2]["chosen"]]
        path, line, first = chosen[0] if chosen else members[0]
        if len(chosen) != 1:
            errs.add(f"conversation {conversation!r} turn {turn} has {len(chosen)} chosen "
                     "responses; exactly one is needed", path=path, line=line, field="if_chosen")
            continue
        if any(m[2]["user"] != first["user"] or m[2]["prompt"] != first["prompt"]
               for m in members):
            errs.add(f"conversation {conversation!r} turn {turn} mixes users or prompts",
                     path=path, line=line, field="user_prompt")
            continue
        for _, _, other in members:
            if not other["chosen"] and other["response"] != first["response"]:
                yield path, line, first["prompt"], first["response"], other["response"], \
                    first["user"]


def read_prism(survey: Any, pairs: Any, *, attributes: Sequence[str] = PRISM_ATTRIBUTES,
               errors: str = "raise") -> Any:
    """Read PRISM-style data: a survey (user attributes) and pairs (TRL-style rows or PRISM
    utterances); the survey ``attributes`` become the user contexts (one-hot categories)."""
    errs = _Errors(errors)
    users = _read_survey(survey, attributes, errs)
    rows = list(_rows(pairs, errs))
    utterances = bool(rows) and isinstance(rows[0][2], Mapping) and "model_response" in rows[0][2]
    items: Iterable[tuple[str, int, str, str, str, Any]] = (
        _utterance_pairs(rows, errs) if utterances else _trl_items(rows, errs))
    cols, contexts = _columns(), _Contexts()
    for path, line, prompt, chosen, rejected, user in items:
        if user not in users:
            errs.add(f"user {user!r} is not in the survey", path=path, line=line,
                     field="user_id")
            continue
        contexts.add(user, users[user], path, line)
        _append(cols, prompt, chosen, rejected, user, path, line)
    return _result(_finish(cols, contexts, errs, source=str(pairs)), errs)


def _trl_items(rows: list[tuple[str, int, Any]], errs: _Errors
               ) -> Iterator[tuple[str, int, str, str, str, Any]]:
    ignore = _Contexts()
    for path, line, row in rows:
        try:
            row = {k: v for k, v in row.items() if k != "user_context"} \
                if isinstance(row, Mapping) else row
            prompt, chosen, rejected, user = _trl_row(row, ignore, path, line)
        except _RowError as bad:
            errs.add(bad.message, path=path, line=line, field=bad.field)
            continue
        yield path, line, prompt, chosen, rejected, user


# ---------------------------------------------------------------------------- validation
FORMATS = ("numeric", "trl", "summarize", "prism")


def detect_format(path: str | Path) -> str:
    """``numeric`` (``.npz`` or rows with ``phi0``), ``trl``, ``summarize`` or ``prism`` (PRISM
    utterances), from the suffix and the keys of the first row."""
    path = Path(path)
    if path.suffix == ".npz":
        return "numeric"
    errs = _Errors("collect")
    for _, _, row in _rows(path, errs):
        if not isinstance(row, Mapping):
            break
        keys = set(row)
        if "phi0" in keys:
            return "numeric"
        if {"summaries", "worker"} <= keys:
            return "summarize"
        if "model_response" in keys:
            return "prism"
        return "trl"
    raise DataValidationError("cannot tell the format (no JSON object on any line); pass "
                              "--format", path=str(path))


def read_text_preferences(path: str | Path, *, format: str = "auto",
                          survey: str | Path | None = None) -> TextPreferences:
    """Read a text preference file in ``format`` (``"auto"`` detects it; ``"trl"``,
    ``"summarize"`` or ``"prism"``, which needs the ``survey`` file)."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "trl":
        return read_trl(path)
    if fmt == "summarize":
        return read_summarize_from_feedback(path)
    if fmt == "prism":
        if survey is None:
            raise DataValidationError("PRISM pairs need the survey file (--survey / survey:)",
                                      path=str(path))
        return read_prism(survey, path)
    raise DataValidationError(f"not a text preference format: {fmt!r} (valid: trl, summarize, "
                              "prism)", path=str(path))


def validate_file(path: str | Path, *, format: str = "auto", survey: str | Path | None = None
                  ) -> tuple[int, list[DataValidationError]]:
    """Check every row of ``path``: ``(number of comparisons read, [every error])``.

    Bad rows are returned; a file that cannot be read at all (missing, a folder, not a valid
    ``.npz``/Parquet file, an unknown format) raises :class:`DataValidationError` — what
    ``pluralign data validate`` reports with exit code 1 and 2 respectively."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise DataValidationError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}",
                                  field="format")
    if fmt == "numeric":
        from pluralign.data.io import load_preferences

        try:
            return load_preferences(path).n, []
        except DataValidationError as err:  # the numeric reader stops at the first error
            if err.line is None and err.field is None and err.row is None:
                raise  # the file itself is unreadable (missing, a folder, not an .npz)
            return 0, [err]
    reader: Callable[..., Any]
    if fmt == "trl":
        reader = read_trl
    elif fmt == "summarize":
        reader = read_summarize_from_feedback
    elif survey is not None:
        return _count(read_prism(survey, path, errors="collect"))
    else:  # PRISM utterances alone: check the rows and the pairing, without user contexts
        errs = _Errors("collect")
        n = sum(1 for _ in _utterance_pairs(list(_rows(path, errs)), errs))
        return n, errs.found
    return _count(reader(path, errors="collect"))


def _count(result: tuple[TextPreferences | None, list[DataValidationError]]
           ) -> tuple[int, list[DataValidationError]]:
    prefs, found = result
    return (0 if prefs is None else prefs.n), found
