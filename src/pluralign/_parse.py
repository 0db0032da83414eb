"""Strict readers for the text formats pluralign accepts: JSON, JSON lines and YAML.

Every file a user hands pluralign (preference data, configs, saved models, results) is parsed
here, so that one set of rules holds everywhere and only pluralign's own errors leave a reader:

* text must be UTF-8 (a bad byte is reported with its line);
* a mapping may not repeat a key (JSON's and YAML's specs leave it open; Python's readers keep
  the last value silently) — the key is named;
* nesting deeper than :data:`MAX_DEPTH` is refused before the parser recurses (Python's JSON
  reader raises ``RecursionError`` and PyYAML takes seconds to fail on a 2,000-deep document);
* integers must fit in 64 bits (larger ones are refused before Python converts them: a
  400-digit integer overflows ``float`` later, one past 4,300 digits cannot be read at all);
* non-finite numbers: in a whole-file read (:func:`read_json_file`: saved models, heads) a JSON
  number that overflows a float (``1e999999``), JSON's non-standard ``NaN``/``Infinity`` and an
  integer past 64 bits are refused. Row readers (:func:`iter_json_lines`) read them as
  ``inf``/``nan`` instead, so that the field validators, which refuse non-finite values where
  numbers are required, can name the field (and ``results.jsonl`` may hold a NaN metric);
  YAML's explicit ``.nan``/``.inf`` are read, and the validators of numeric settings refuse
  them with the key's name;
* YAML aliases are limited to :data:`MAX_ALIASES` (a "billion laughs" document is tiny on disk
  but expands without bound when walked).

``.npz`` archives are read without pickle, and only with the dtypes pluralign writes.

Errors are :class:`~pluralign.errors.DataValidationError` (data and saved models: file, line,
field) or :class:`~pluralign.errors.ConfigError` (configs), chosen by the caller.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pluralign.errors import ConfigError, DataValidationError, PluralignError

__all__ = [
    "MAX_DEPTH",
    "iter_json_lines",
    "parse_json",
    "read_json_file",
    "read_npz",
    "read_text",
    "read_yaml_file",
]

MAX_DEPTH = 64
MAX_ALIASES = 100
INT_LIMIT = 2**63


class _Refused(Exception):
    """A parse-time refusal (message, and the offending key when there is one)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message, self.key = message, key


# ---------------------------------------------------------------------------------- bytes
def _decode(raw: bytes, path: str, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"not valid UTF-8 (byte {exc.start + 1} of the line)"
            if line is not None
            else f"not valid UTF-8 (byte {exc.start + 1})",
            path=path,
            line=line,
        ) from None


def _open_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataValidationError("file not found", path=str(path))
    if not path.is_file():
        raise DataValidationError("is not a regular file (a folder?)", path=str(path))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataValidationError(f"cannot be read ({exc.strerror})", path=str(path)) from None


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path`` (clear errors for a missing file, a folder, bad bytes)."""
    path = Path(path)
    return _decode(_open_bytes(path), str(path))


# ----------------------------------------------------------------------------------- JSON
def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key!r}", key)
        out[key] = value
    return out


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19 or abs(int(text)) >= INT_LIMIT:
        raise _Refused(
            f"integer {text[:24]}{'…' if len(text) > 24 else ''} is out of range "
            "(at most 2**63 - 1 in absolute value)"
        )
    return int(text)


def _int_or_inf(text: str) -> int | float:
    if len(text.lstrip("-")) > 19 or abs(int(text)) >= INT_LIMIT:
        return float("-inf") if text.startswith("-") else float("inf")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"number {text[:24]} overflows a 64-bit float")
    return value


def _constant(text: str) -> float:
    raise _Refused(f"{text} is not valid JSON (use a finite number)")


_HOOKS: dict[bool, dict[str, Any]] = {
    True: {"parse_int": _int, "parse_float": _float, "parse_constant": _constant},
    False: {"parse_int": _int_or_inf},
}


def _json_depth(text: str) -> int:
    """Bracket nesting depth of a JSON text, ignoring brackets inside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_strings(value: Any) -> None:
    """Refuse strings holding lone surrogates (``"\\ud800"``): they are not text and cannot be
    written back as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused("a string holds a lone UTF-16 surrogate (not valid text)") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_json(
    text: str, *, path: str | None = None, line: int | None = None, finite: bool = True
) -> Any:
    """One JSON document under the rules of the module docstring; errors name file and line.
    ``finite=False`` reads non-finite and out-of-range numbers as ``±inf``/``nan`` (for row
    readers whose validators name the field)."""
    if (
        ("[" in text or "{" in text)
        and text.count("[") + text.count("{") > MAX_DEPTH
        and _json_depth(text) > MAX_DEPTH
    ):
        raise DataValidationError(f"nested more than {MAX_DEPTH} levels deep", path=path, line=line)
    try:
        value = json.loads(text, object_pairs_hook=_pairs, **_HOOKS[finite])
        if _SURROGATE.search(text):
            _check_strings(value)
        return value
    except _Refused as exc:
        raise DataValidationError(exc.message, path=path, line=line, field=exc.key) from None
    except json.JSONDecodeError as exc:
        where = line if line is not None else exc.lineno
        raise DataValidationError(
            f"invalid JSON ({exc.msg}, column {exc.colno})", path=path, line=where
        ) from None
    except (RecursionError, ValueError) as exc:  # defensive: json's own limits
        raise DataValidationError(f"invalid JSON ({exc})", path=path, line=line) from None


def read_json_file(path: str | Path) -> Any:
    """A whole JSON file (e.g. ``model.json``) under the rules of the module docstring."""
    path = Path(path)
    return parse_json(read_text(path), path=str(path))


def iter_json_lines(
    path: str | Path, *, errors: list[DataValidationError] | None = None
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSON-lines file.

    A bad line raises :class:`DataValidationError` naming the file and line; with ``errors``
    (a list) bad lines are appended there instead and skipped, so a validator can report all.
    """
    path = Path(path)
    data = _open_bytes(path)
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield (
                lineno,
                parse_json(
                    _decode(raw, str(path), lineno), path=str(path), line=lineno, finite=False
                ),
            )
        except DataValidationError as err:
            if errors is None:
                raise
            errors.append(err)


# ----------------------------------------------------------------------------------- YAML
class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with duplicate keys, deep nesting, huge integers, float overflow
    and alias floods refused."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refused(f"more than {MAX_ALIASES} aliases (*name)")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                raise _Refused(
                    f"a mapping key must be a plain value, got {key!r} "
                    f"(line {key_node.start_mark.line + 1})"
                ) from None
            if duplicate:
                raise _Refused(
                    f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", str(key)
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_int(loader: _StrictLoader, node: yaml.ScalarNode) -> int:
    digits = str(node.value).replace("_", "").lstrip("+-")
    if len(digits) > 20:
        raise _Refused(
            f"integer {node.value[:24]}… is out of range (line {node.start_mark.line + 1})"
        )
    value = yaml.SafeLoader.construct_yaml_int(loader, node)
    if abs(value) >= INT_LIMIT:
        raise _Refused(f"integer {node.value} is out of range (line {node.start_mark.line + 1})")
    return value


def _yaml_float(loader: _StrictLoader, node: yaml.ScalarNode) -> float:
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    text = str(node.value).lower()
    if value in (float("inf"), float("-inf")) and "inf" not in text:
        raise _Refused(
            f"number {node.value[:24]} overflows a 64-bit float (line {node.start_mark.line + 1})"
        )
    return value


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _yaml_float)


def parse_yaml(
    text: str, *, source: str = "<string>", error: type[PluralignError] = ConfigError
) -> Any:
    """One YAML document (safe tags only) under the rules of the module docstring."""
    try:
        loader = _StrictLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _Refused as exc:
        raise error(f"{source}: {exc.message}") from None
    except yaml.YAMLError as exc:
        raise error(f"{source}: invalid YAML ({exc})") from None
    except (RecursionError, ValueError, OverflowError) as exc:  # defensive
        raise error(f"{source}: invalid YAML ({exc})") from None


def read_yaml_file(path: str | Path, *, error: type[PluralignError] = ConfigError) -> Any:
    """A YAML file (a config) under the rules of the module docstring; errors are ``error``
    (default :class:`ConfigError`) prefixed with the file name."""
    path = Path(path)
    try:
        text = read_text(path)
    except DataValidationError as err:
        raise error(str(err)) from None
    return parse_yaml(text, source=str(path), error=error)


# ------------------------------------------------------------------------------------ npz
NPZ_KINDS = "biufU"  # bool, integers, floats, unicode: what pluralign saves
MAX_NPZ_BYTES = 8 << 30


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, read without pickle.

    Refused with a :class:`DataValidationError` naming the file (and the array): a missing file
    or a folder, a file that is not a (complete) zip of ``.npy`` arrays, object arrays, dtypes
    pluralign never writes (complex, datetime, bytes, structured), and arrays whose header
    promises more than :data:`MAX_NPZ_BYTES` (checked before anything is decompressed).
    """
    path = Path(path)
    _open_bytes(path)  # existence, regular file, readable
    where: dict[str, Any] = {"path": str(path)}
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            for name in members:
                field = name[:-4] if name.endswith(".npy") else name
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                if dtype.kind not in NPZ_KINDS or dtype.fields is not None:
                    raise DataValidationError(
                        f"has dtype {dtype}; pluralign reads numbers and strings only",
                        field=field,
                        **where,
                    )
                if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_NPZ_BYTES:
                    raise DataValidationError(
                        f"shape {shape} is larger than {MAX_NPZ_BYTES >> 30} GiB",
                        field=field,
                        **where,
                    )
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except DataValidationError:
        raise
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        RuntimeError,
        TypeError,
        OverflowError,
    ) as exc:
        raise DataValidationError(
            f"not a readable .npz file ({type(exc).__name__}: {str(exc)[:120]})", **where
        ) from None
