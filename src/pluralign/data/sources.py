"""Where preference rows come from: files in every format pluralign reads, and in-memory data.

:func:`iter_rows` turns a *source* into ``(label, line, row)`` triples for the readers of
:mod:`pluralign.data.loaders` and :mod:`pluralign.data.io`, which validate each row and name
``label`` (the file), ``line`` and the field in their errors.

============================================  =============================  ====================
source                                        read with                      ``line`` is
============================================  =============================  ====================
``.jsonl`` / ``.ndjson`` / ``.json`` (lines)  pluralign's strict JSON         the line of the row
``.json`` holding one JSON array              pluralign's strict JSON         the line the element
                                                                             starts on
any of these ``.gz``-compressed               :mod:`gzip` + the same          a line of the text
``.csv`` (``.csv.gz``)                        :mod:`csv`, every cell text     the line the record
                                                                             starts on
``.parquet``                                  pyarrow                         the 1-based row
``datasets.Dataset`` / ``IterableDataset``    its rows, as Python objects     the 1-based row
``datasets.DatasetDict`` (and a dict of       the split ``split=`` names      the 1-based row
splits)
``pandas.DataFrame``                          its records (NaN cells: null)   the 1-based row
a mapping of equal-length columns             its rows                        the 1-based row
any other iterable of mappings                as given                        the 1-based row
============================================  =============================  ====================

Why not Hugging Face ``datasets`` for the files: its JSON and CSV builders unify every row
into one Arrow schema first, which loses what the row-level messages need — a key missing
from a row becomes ``null``, a repeated key keeps its last value, mixed types fail for the
whole file, CSV cells ``NA``/``null``/``None``/``nan`` become missing values (a response
"None" would vanish), and physical line numbers are gone. pluralign's readers keep them and
need no extra dependency; plain JSONL never imports ``datasets`` or pandas. In-memory
``datasets`` objects and DataFrames are read as they are (nothing is imported to recognize
them: a Dataset or DataFrame can only exist if its library is loaded). Parquet is read with
pyarrow, which is what ``datasets`` itself uses for it.

**CSV** cells are text: ``user_id`` ``7`` is the string ``"7"``. The cells of fields that
hold structured values (``user_context``; numeric ``x``, ``phi0``, ``phi1``, ``y``; PRISM's
``turn``, ``if_chosen``, ``score``) are read as JSON text when they parse as JSON
(``[0.1, 2.0]``, ``{"age": "25-34"}``); an empty cell is ``null``; a record whose cells are
all blank is skipped. A quoted cell may span lines (the record's line is where it starts).

Errors are collected by :class:`Problems`: every row is checked; in ``errors="raise"`` mode
one error is raised at the end (the first bad row's, summarized when many rows share the
problem — :meth:`Problems.summary`), in ``errors="collect"`` mode all are returned.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pluralign._parse import MAX_DEPTH, iter_json_lines, parse_json
from pluralign.errors import DataValidationError

__all__ = ["SUFFIXES", "Problems", "RowError", "iter_rows", "summarize_errors"]

# suffix -> kind; each may also end in .gz (not .parquet)
SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
MAX_DECOMPRESSED = 8 << 30  # a .gz file may not expand past this (a "zip bomb")
# in errors="raise" mode, after the first bad row at most this many more rows are read to
# count how many share its problem
SUMMARY_SCAN = 100_000


# ---------------------------------------------------------------------------- problems
class RowError(Exception):
    """One bad field of one row, raised while a row is checked; the reader records it in its
    :class:`Problems` (with the row's file and line) and goes on with the next row.
    ``columns`` (optional) are the row's columns, for a message about a missing one."""

    def __init__(
        self, field: str | None, message: str, columns: Iterable[Any] | None = None
    ) -> None:
        super().__init__(message)
        self.field, self.message = field, message
        self.columns = None if columns is None else list(columns)


class Problems:
    """The bad rows of one read. ``mode="raise"`` raises one error when the read is done
    (:meth:`check`); ``"collect"`` keeps them all for the caller (``found``)."""

    def __init__(self, mode: str) -> None:
        if mode not in ("raise", "collect"):
            raise DataValidationError(f"must be 'raise' or 'collect', got {mode!r}", field="errors")
        self.mode = mode
        self.found: list[DataValidationError] = []
        self.columns: dict[int, list[str]] = {}  # id(error) -> the columns of its row
        self.rows = 0  # rows (and unparsable lines) read
        self.capped = False
        self._first_at: int | None = None

    def add(
        self,
        message: str,
        *,
        path: str,
        line: int | None,
        field: str | None = None,
        columns: Iterable[Any] | None = None,
    ) -> None:
        self.append(
            DataValidationError(message, path=path, line=line, field=field), columns=columns
        )

    def append(self, err: DataValidationError, columns: Iterable[Any] | None = None) -> None:
        """Record ``err`` (also the sink of :func:`pluralign._parse.iter_json_lines`, whose
        bad lines count as rows read)."""
        if self._first_at is None:
            self._first_at = self.rows
        if columns is not None:
            self.columns[id(err)] = [str(c) for c in columns]
        self.found.append(err)

    def next_row(self) -> bool:
        """Count a row about to be read; ``False`` when a raise-mode read has seen enough rows
        after its first error to summarize it (:data:`SUMMARY_SCAN`)."""
        if (
            self.mode == "raise"
            and self._first_at is not None
            and self.rows - self._first_at >= SUMMARY_SCAN
        ):
            self.capped = True
            return False
        self.rows += 1
        return True

    def ordered(self) -> list[DataValidationError]:
        """The errors by file (in the order the files were read) and line."""
        rank: dict[Any, int] = {}
        for err in self.found:
            rank.setdefault(err.path, len(rank))
        return sorted(self.found, key=lambda e: (rank[e.path], -1 if e.line is None else e.line))

    def check(self) -> None:
        """In raise mode, raise :meth:`summary` if any row was bad."""
        if self.mode == "raise" and self.found:
            raise self.summary()

    def summary(self) -> DataValidationError:
        """One error for all the bad rows.

        The rule: the bad rows are grouped by problem (the same field and message); the
        largest group (ties: the one with the earliest row) is reported at its first row. A
        problem of one row only reads as before; one shared by many rows adds how many and
        the last row's line (``missing; the same problem on 200 rows, the first at line 3, the
        last at line 202``). A missing field adds the columns the first such row has; other
        bad rows are counted after it. In raise mode, reading stops :data:`SUMMARY_SCAN` rows
        after the first bad row (said in the message), so the counts are exact for files up
        to that size past their first error.
        """
        errs = self.ordered()
        groups: dict[tuple[Any, str], list[DataValidationError]] = {}
        for err in errs:
            groups.setdefault((err.field, err.bare), []).append(err)
        group = max(groups.values(), key=len)  # max keeps the first of equal lengths
        lead = group[0]
        columns = self.columns.get(id(lead))
        if len(group) == 1 and len(errs) == 1 and columns is None:
            return lead
        parts = [lead.bare]
        if len(group) > 1:
            lines = [e.line for e in group if e.line is not None]
            paths = {e.path for e in group}
            where = (
                f", the first at line {lines[0]}, the last at line {lines[-1]}"
                if len(lines) == len(group) and len(paths) == 1
                else ""
            )
            scope = f" of {len(paths)} files" if len(paths) > 1 else ""
            parts.append(f"the same problem on {len(group)} rows{scope}{where}")
        if columns is not None:
            parts.append("columns found: " + (", ".join(columns) if columns else "none"))
        others = [e for e in errs if (e.field, e.bare) != (lead.field, lead.bare)]
        if others:
            first = others[0]
            at = f"line {first.line}" if first.line is not None else "a row"
            in_file = "" if first.path == lead.path else f" of {first.path}"
            what = f"field {first.field!r}: " if first.field is not None else ""
            parts.append(
                f"and {len(others)} other bad row(s), the first at {at}{in_file} "
                f"({what}{_short(first.bare, 120)})"
            )
        if self.capped:
            parts.append(
                f"reading stopped {SUMMARY_SCAN} rows after the first bad row "
                "(errors='collect' or `pluralign data validate` reads every row)"
            )
        return DataValidationError(
            "; ".join(parts), path=lead.path, line=lead.line, field=lead.field
        )


def summarize_errors(
    errors: list[DataValidationError], *, show: int = 3, limit: int = 5
) -> list[str]:
    """Lines to print for ``errors`` (``pluralign data validate``): every error, except that a
    problem shared by more than ``limit`` rows (same field and message) prints its first
    ``show`` rows and one line counting the rest."""
    groups: dict[tuple[Any, Any, str], list[DataValidationError]] = {}
    for err in errors:
        groups.setdefault((err.path, err.field, err.bare), []).append(err)
    out: list[str] = []
    done: set[tuple[Any, Any, str]] = set()
    for err in errors:
        key = (err.path, err.field, err.bare)
        group = groups[key]
        if len(group) <= limit:
            out.append(str(err))
            continue
        if key in done:
            continue
        done.add(key)
        out.extend(str(e) for e in group[:show])
        rest = group[show:]
        lines = [e.line for e in rest if e.line is not None]
        span = f" (lines {lines[0]}–{lines[-1]})" if len(lines) == len(rest) else ""
        what = f"field {err.field!r}: " if err.field is not None else ""
        out.append(
            f"{err.path}: … and {len(rest)} more rows{span} with the same problem "
            f"({what}{_short(err.bare, 120)})"
        )
    return out


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------------------- sources
def _kind(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    suffix = (
        suffixes[-2]
        if compressed and len(suffixes) == 2
        else ("" if compressed else (suffixes[-1] if suffixes else ""))
    )
    kind = SUFFIXES.get(suffix)
    if kind is None or (compressed and kind == "parquet"):
        raise DataValidationError(
            f"unknown suffix {''.join(path.suffixes[-2:]) or '(none)'!r}; use .jsonl, .json "
            "(JSON lines or one array), .csv (each optionally .gz) or .parquet",
            path=str(path),
        )
    return kind, compressed


def _file_bytes(path: Path, compressed: bool) -> bytes:
    if not path.exists():
        raise DataValidationError("file not found", path=str(path))
    if not path.is_file():
        raise DataValidationError("is not a regular file (a folder?)", path=str(path))
    try:
        if not compressed:
            return path.read_bytes()
        chunks, size = [], 0
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                size += len(chunk)
                if size > MAX_DECOMPRESSED:
                    raise DataValidationError(
                        f"expands past {MAX_DECOMPRESSED >> 30} GiB when decompressed",
                        path=str(path),
                    )
                chunks.append(chunk)
        return b"".join(chunks)
    except DataValidationError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        what = "not a readable gzip file" if compressed else "cannot be read"
        raise DataValidationError(
            f"{what} ({type(exc).__name__}: {str(exc)[:120]})", path=str(path)
        ) from None


def _decode(raw: bytes, path: str, line: int | None, bom: bool = False) -> str:
    if bom and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if line is None:  # a whole file: name the line of the bad byte
            line = raw.count(b"\n", 0, exc.start) + 1
        raise DataValidationError("not valid UTF-8", path=path, line=line) from None


def _json_lines(data: bytes, path: str, problems: Problems) -> Iterator[tuple[str, int, Any]]:
    """The rows of JSON-lines bytes (what :func:`pluralign._parse.iter_json_lines` does for a
    file, for decompressed text)."""
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if not problems.next_row():
            return
        try:
            yield (
                path,
                lineno,
                parse_json(_decode(raw, path, lineno), path=path, line=lineno, finite=False),
            )
        except DataValidationError as err:
            problems.append(err)


_WHITESPACE = re.compile(r"[ \t\n\r]*")
# finds where each element ends without building it (the element is then parsed strictly)
_SKIMMER = json.JSONDecoder(
    object_pairs_hook=lambda pairs: None,
    parse_int=lambda t: 0,
    parse_float=lambda t: 0.0,
    parse_constant=lambda t: 0.0,
)


def _json_array(text: str, path: str, problems: Problems) -> Iterator[tuple[str, int, Any]]:
    """The elements of a JSON array, each with the line it starts on, under the strict rules
    of :mod:`pluralign._parse`: each element is parsed on its own, so a bad one (a repeated
    key, a lone surrogate) is reported and the others are read. Broken JSON syntax ends the
    file: it is reported at its line."""

    def where(i: int) -> int:
        return text.count("\n", 0, i) + 1

    pos = _WHITESPACE.match(text, text.index("[") + 1).end()  # type: ignore[union-attr]  # the pattern matches the empty string
    line, counted = where(pos), pos
    if text[pos : pos + 1] == "]":
        stop = pos + 1
    else:
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            try:
                _, stop = _SKIMMER.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataValidationError(
                    f"invalid JSON ({exc.msg})", path=path, line=exc.lineno
                ) from None
            except RecursionError:
                raise DataValidationError(
                    f"nested more than {MAX_DEPTH} levels deep", path=path, line=line
                ) from None
            if not problems.next_row():
                return
            try:
                yield path, line, parse_json(text[pos:stop], path=path, line=line, finite=False)
            except DataValidationError as err:
                # parse_json counts lines from the element's start; name the element's line
                problems.append(
                    DataValidationError(err.bare, path=path, line=line, field=err.field)
                )
            pos = _WHITESPACE.match(text, stop).end()  # type: ignore[union-attr]  # the pattern matches the empty string
            if text[pos : pos + 1] == "]":
                stop = pos + 1
                break
            if text[pos : pos + 1] != ",":
                got = repr(text[pos]) if pos < len(text) else "the end of the file"
                raise DataValidationError(
                    f"invalid JSON (expected ',' or ']' in the array, got {got})",
                    path=path,
                    line=where(pos),
                )
            pos = _WHITESPACE.match(text, pos + 1).end()  # type: ignore[union-attr]  # the pattern matches the empty string
            if text[pos : pos + 1] == "]":
                raise DataValidationError(
                    "invalid JSON (a trailing comma in the array)", path=path, line=where(pos)
                )
    if text[stop:].strip():
        raise DataValidationError(
            "invalid JSON (text after the closing ']' of the array)", path=path, line=where(stop)
        )


def _csv_rows(
    text: str, path: str, problems: Problems, typed: frozenset[str]
) -> Iterator[tuple[str, int, Any]]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(old_limit, 2**31 - 1))  # a long response is one cell
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header: list[str] | None = None
        previous_end = 0
        while True:
            start = previous_end + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataValidationError(
                    f"not a readable CSV file ({exc})", path=path, line=reader.line_num
                ) from None
            previous_end = reader.line_num
            if all(not cell.strip() for cell in record):
                continue  # a blank line or a record of blank cells
            if header is None:
                header = [cell.strip() for cell in record]
                dup = next((h for h in header if header.count(h) > 1 or not h), None)
                if dup is not None:
                    what = "an empty column name" if not dup else f"column {dup!r} twice"
                    raise DataValidationError(f"the CSV header has {what}", path=path, line=start)
                continue
            if not problems.next_row():
                return
            if len(record) != len(header):
                problems.add(
                    f"has {len(record)} cells but the header has {len(header)} columns",
                    path=path,
                    line=start,
                )
                continue
            yield (
                path,
                start,
                {
                    name: _cell(cell, name in typed)
                    for name, cell in zip(header, record, strict=True)
                },
            )
    finally:
        csv.field_size_limit(old_limit)


def _cell(text: str, typed: bool) -> Any:
    if not text.strip():
        return None
    if typed:
        try:
            return parse_json(text, finite=False)
        except DataValidationError:
            return text  # not JSON: the field's validator names the problem
    return text


def _parquet_rows(path: Path, problems: Problems) -> Iterator[tuple[str, int, Any]]:
    if not path.exists():
        raise DataValidationError("file not found", path=str(path))
    if not path.is_file():
        raise DataValidationError("is not a regular file (a folder?)", path=str(path))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is in the dev/text extras
        raise DataValidationError(
            "reading Parquet needs pyarrow (pip install 'pluralign[text]')", path=str(path)
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (
        pa.ArrowException,
        OSError,
        ValueError,
        TypeError,
        OverflowError,
        KeyError,
        IndexError,
    ) as exc:
        raise DataValidationError(
            f"not a readable Parquet file ({type(exc).__name__}: {str(exc)[:160]})", path=str(path)
        ) from None
    for i, row in enumerate(rows, start=1):
        if not problems.next_row():
            return
        yield str(path), i, row


def _file_rows(
    path: Path, problems: Problems, typed: frozenset[str]
) -> Iterator[tuple[str, int, Any]]:
    kind, compressed = _kind(path)
    if kind == "parquet":
        yield from _parquet_rows(path, problems)
        return
    if kind in ("jsonl", "json") and not compressed:
        if kind == "json" and _starts_with_bracket(path):
            yield from _json_array(
                _decode(_file_bytes(path, False), str(path), None), str(path), problems
            )
            return
        rows = iter_json_lines(path, errors=problems)  # type: ignore[arg-type]
        while problems.next_row():
            try:
                lineno, row = next(rows)
            except StopIteration:
                return
            yield str(path), lineno, row
        return
    data = _file_bytes(path, compressed)
    if kind == "csv":
        yield from _csv_rows(_decode(data, str(path), None, bom=True), str(path), problems, typed)
    elif kind == "json" and data.lstrip()[:1] == b"[":
        yield from _json_array(_decode(data, str(path), None), str(path), problems)
    else:
        yield from _json_lines(data, str(path), problems)


def _starts_with_bracket(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)
            while head and not head.strip():
                head = handle.read(4096)
    except OSError:
        return False
    return head.lstrip()[:1] == b"["


def _loaded(module: str) -> Any:
    return sys.modules.get(module)


def _splits(source: Any) -> list[str] | None:
    """The split names of a ``datasets.DatasetDict`` (or a dict whose values are all
    datasets), else ``None``."""
    ds = _loaded("datasets")
    if ds is not None and isinstance(source, ds.DatasetDict | ds.IterableDatasetDict):
        return [str(k) for k in source]
    if (
        isinstance(source, Mapping)
        and source
        and ds is not None
        and all(isinstance(v, ds.Dataset | ds.IterableDataset) for v in source.values())
    ):
        return [str(k) for k in source]
    return None


def _plain(value: Any, depth: int = 0) -> Any:
    """A pandas/numpy cell as plain Python: numpy scalars and arrays as numbers and lists, a
    missing cell (``NaN``, ``None``, ``pd.NA``, ``NaT``) as ``None`` at the top level."""
    np = _loaded("numpy")
    if depth > MAX_DEPTH:
        return value
    if value is None:
        return None
    if np is not None and isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value) and depth == 0:
        return None
    if type(value).__name__ in ("NAType", "NaTType") and depth == 0:
        return None
    if np is not None and isinstance(value, np.ndarray):
        return (
            [_plain(v, depth + 1) for v in value.tolist()]
            if value.ndim
            else _plain(value.item(), depth)
        )
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    return value


def _frame_rows(frame: Any, label: str, problems: Problems) -> Iterator[tuple[str, int, Any]]:
    columns = list(frame.columns)
    if len(set(map(str, columns))) != len(columns):
        raise DataValidationError("the DataFrame has duplicate column names", path=label)
    for i, values in enumerate(frame.itertuples(index=False, name=None), start=1):
        if not problems.next_row():
            return
        yield label, i, {str(c): _plain(v) for c, v in zip(columns, values, strict=True)}


def iter_rows(
    source: Any, problems: Problems, *, split: str | None = None, typed: Iterable[str] = ()
) -> Iterator[tuple[str, int, Any]]:
    """``(label, line, row)`` of every row of ``source`` (module docstring). Rows that cannot
    be parsed (bad JSON, a CSV record of the wrong width) go to ``problems`` and are skipped;
    a source that cannot be read at all raises :class:`DataValidationError` at once.

    ``split`` picks a split of a ``datasets.DatasetDict`` (required for one); ``typed`` are
    the CSV columns read as JSON text.
    """
    typed = frozenset(typed)
    splits = _splits(source)
    if splits is not None:
        if split is None:
            raise DataValidationError(
                f"is a {type(source).__name__} with splits {', '.join(map(repr, splits))}; "
                f"pass one split (source[{splits[0]!r}]) or split={splits[0]!r}",
                path=f"<{type(source).__name__}>",
            )
        if split not in source:
            raise DataValidationError(
                f"has no split {split!r}; its splits: {', '.join(map(repr, splits))}",
                field="split",
                path=f"<{type(source).__name__}>",
            )
        label = f"<{type(source).__name__}[{split!r}]>"
        source = source[split]
    elif split is not None:
        raise DataValidationError(
            f"split={split!r} picks a split of a datasets.DatasetDict; "
            f"this source is a {type(source).__name__}",
            field="split",
        )
    else:
        label = f"<{type(source).__name__}>"
    if isinstance(source, str | Path):
        yield from _file_rows(Path(source), problems, typed)
        return
    pd = _loaded("pandas")
    if pd is not None and isinstance(source, pd.DataFrame):
        yield from _frame_rows(source, label, problems)
        return
    ds = _loaded("datasets")
    if ds is not None and isinstance(source, ds.Dataset | ds.IterableDataset):
        source = source.with_format(None)
    elif isinstance(source, Mapping):
        source = _column_rows(source, label)
    elif isinstance(source, bytes | bytearray):
        raise DataValidationError("is bytes; give a file path, rows or a dataset", path=label)
    try:
        rows = iter(source)
    except TypeError:
        raise DataValidationError(
            f"cannot read rows from a {type(source).__name__}: give a "
            "file path, an iterable of mappings, a datasets.Dataset or a "
            "pandas DataFrame",
            path=label,
        ) from None
    for i, row in enumerate(rows, start=1):
        if not problems.next_row():
            return
        yield label, i, row


def _column_rows(columns: Mapping[Any, Any], label: str) -> Iterator[dict[str, Any]]:
    """A mapping of equal-length columns (``Dataset.to_dict()``) as rows."""
    lengths = set()
    for name, values in columns.items():
        if not isinstance(values, list | tuple):
            raise DataValidationError(
                f"is a mapping but column {name!r} is a {type(values).__name__}, not a list: "
                "give rows (a list of mappings), equal-length columns, or a dataset",
                path=label,
            )
        lengths.add(len(values))
    if len(lengths) > 1:
        raise DataValidationError(
            f"is a mapping of columns of different lengths "
            f"({', '.join(map(str, sorted(lengths)))})",
            path=label,
        )
    n = lengths.pop() if lengths else 0
    names = list(columns)
    return ({str(k): columns[k][i] for k in names} for i in range(n))


def json_text(value: str) -> Any:
    """``value`` parsed as JSON (strict), or ``None`` when it is not JSON."""
    try:
        return parse_json(value, finite=False)
    except DataValidationError:
        return None


def dumps_short(value: Any, n: int = 80) -> str:
    """A compact, bounded rendering of a parsed value for messages."""
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=True, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return _short(text, n)
