"""The fuzz harness: targets, mutation strategies and outcome classification.

A :class:`Target` is a name, a hypothesis strategy that draws an input (usually the bytes of a
file made by mutating a valid one) and ``run(value, tmp)``, which writes the input under the
fresh folder ``tmp`` and calls one pluralign boundary (a loader, a config resolver, a
saved-model reader). Each call ends in one of three outcomes:

* ``accepted`` — it returned (the input was valid, or repaired by a documented rule);
* ``clean`` — it raised a :class:`pluralign.errors.PluralignError` (pluralign's own error);
* ``escape`` — it raised anything else: a bug, whatever the input.

``tests/test_fuzz.py`` runs every target for a few hundred examples and fails on an escape;
``python -m fuzzing`` (``make fuzz``) runs many more and prints the counts per target.
Target modules register themselves with :func:`register`; ``fuzzing/__init__.py`` imports them.
"""

from __future__ import annotations

import json
import shutil
import string
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from pluralign.errors import PluralignError

__all__ = [
    "TARGETS",
    "Target",
    "classify",
    "mutated_bytes",
    "mutated_json",
    "mutated_jsonl",
    "mutated_yaml",
    "nasty_values",
    "register",
    "run_case",
]


@dataclass(frozen=True)
class Target:
    """One fuzzed boundary: ``run(value, tmp)`` on values drawn from ``strategy``."""

    name: str
    strategy: st.SearchStrategy
    run: Callable[[Any, Path], Any]


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    if target.name in TARGETS:
        raise ValueError(f"fuzz target {target.name!r} registered twice")
    TARGETS[target.name] = target
    return target


def classify(target: Target, value: Any, tmp: Path) -> tuple[str, str | None]:
    """``(outcome, detail)``: ``detail`` is the traceback of an escape."""
    try:
        target.run(value, tmp)
    except PluralignError:
        return "clean", None
    except Exception:  # anything else is what we are looking for
        return "escape", traceback.format_exc()
    return "accepted", None


def run_case(target: Target, value: Any) -> tuple[str, str | None]:
    """:func:`classify` in a fresh temporary folder (removed afterwards), warnings silenced."""
    tmp = Path(tempfile.mkdtemp(prefix="pluralign-fuzz-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return classify(target, value, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------- nasty values
_NASTY_LITERALS = [
    None,
    True,
    False,
    0,
    1,
    -1,
    1.0,
    -0.0,
    2,
    7,
    "7",
    "",
    " ",
    "\x00",
    "é",
    "a.b",
    "users.json",
    "..",
    "/",
    "../x",
    "a" * 300,
    [],
    {},
    [[]],
    [None],
    [1, "a"],
    {"a": None},
    {"a.b": 1, "a": {"b": 2}},
    10**400,
    -(10**400),
    1e308,
    -1e308,
    5e-324,
    [1e308, -1e308],
    [[1.0], [2.0, 3.0]],
    {"role": "user"},
    [{"role": "user", "content": ""}],
]
# JSON texts that json.loads maps to non-finite or huge values, spliced in as raw text
RAW_JSON_TOKENS = [
    "1e999999",
    "-1e999999",
    "NaN",
    "Infinity",
    "-Infinity",
    "9" * 400,
    "9" * 5000,
    "[" * 2000 + "]" * 2000,
    '{"a":' * 1500 + "1" + "}" * 1500,
    "1.0",
    "true",
    "null",
    '""',
    "[]",
    "{}",
    '"\\ud800"',
]


def nasty_values() -> st.SearchStrategy:
    """JSON-able values that commonly break readers: wrong types, empty and huge containers,
    out-of-range numbers, colliding names, deep nesting."""
    leaves = st.one_of(
        st.sampled_from(_NASTY_LITERALS),
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.text(string.ascii_letters + "._", max_size=6), inner, max_size=4),
        ),
        max_leaves=12,
    )


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _replace(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {**obj, head: _replace(obj[head], rest, value)}
    copy = list(obj)
    copy[head] = _replace(copy[head], rest, value)
    return copy


def _drop(obj: Any, path: tuple) -> Any:
    if len(path) == 1:
        if isinstance(obj, dict):
            return {k: v for k, v in obj.items() if k != path[0]}
        return [v for i, v in enumerate(obj) if i != path[0]]
    head = path[0]
    if isinstance(obj, dict):
        return {**obj, head: _drop(obj[head], path[1:])}
    copy = list(obj)
    copy[head] = _drop(copy[head], path[1:])
    return copy


@st.composite
def mutated_value(draw: st.DrawFn, seed: Any, max_edits: int = 3) -> Any:
    """``seed`` (a JSON-able value) with up to ``max_edits`` sub-values replaced, dropped or
    given an extra key."""
    value = seed
    for _ in range(draw(st.integers(1, max_edits))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "replace", "drop", "add"]))
        if action == "drop" and path:
            value = _drop(value, path)
        elif action == "add":
            target = value
            for p in path:
                target = target[p]
            if isinstance(target, dict):
                key = draw(st.text(string.ascii_letters + "._", min_size=1, max_size=8))
                value = _replace(value, path, {**target, key: draw(nasty_values())})
            else:
                value = _replace(value, path, draw(nasty_values()))
        else:
            value = _replace(value, path, draw(nasty_values()))
    return value


def _dump_json(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=True)
    except (ValueError, TypeError, RecursionError):
        return "null"


@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with byte-level damage: truncation, flipped or inserted bytes, invalid UTF-8,
    a splice of a raw token that parses to inf/NaN/huge/deep values."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "token", "utf8", "dup"]))
        pos = draw(st.integers(0, max(len(data), 0)))
        if kind == "truncate":
            del data[pos:]
        elif kind == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "token":
            data[pos:pos] = draw(st.sampled_from(RAW_JSON_TOKENS)).encode()
        elif kind == "utf8":
            data[pos:pos] = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]))
        elif kind == "dup" and data:
            data[pos:pos] = data[: draw(st.integers(1, min(len(data), 200)))]
    return bytes(data)


def _with_raw_token(draw: st.DrawFn, text: str) -> str:
    """Replace one scalar token of a JSON text with a raw token (e.g. ``1e999999``)."""
    import re

    scalar = r'-?\d+(\.\d+)?([eE][-+]?\d+)?|"[^"\\]*"|true|false|null'
    spots = [m.span() for m in re.finditer(scalar, text)]
    if not spots:
        return text
    start, end = draw(st.sampled_from(spots))
    return text[:start] + draw(st.sampled_from(RAW_JSON_TOKENS)) + text[end:]


@st.composite
def mutated_json(draw: st.DrawFn, seed: Any) -> bytes:
    """A JSON document made from ``seed``: structurally mutated, token-spliced or byte-damaged."""
    kind = draw(st.sampled_from(["value", "value", "token", "bytes", "dupkey"]))
    if kind == "value":
        return _dump_json(draw(mutated_value(seed))).encode()
    text = json.dumps(seed)
    if kind == "token":
        return _with_raw_token(draw, text).encode()
    if kind == "dupkey" and isinstance(seed, dict) and seed:
        key = draw(st.sampled_from(sorted(seed)))
        return (text[:-1] + f", {json.dumps(key)}: {_dump_json(draw(nasty_values()))}}}").encode()
    return draw(mutated_bytes(text.encode()))


@st.composite
def mutated_jsonl(draw: st.DrawFn, rows: list[Any]) -> bytes:
    """A JSONL file from valid ``rows``: one or more rows mutated (as :func:`mutated_json`),
    rows dropped or duplicated, or the whole file byte-damaged."""
    lines = [json.dumps(r).encode() for r in rows]
    kind = draw(st.sampled_from(["rows", "rows", "rows", "bytes", "reorder"]))
    if kind == "bytes":
        return draw(mutated_bytes(b"\n".join(lines) + b"\n"))
    if kind == "reorder":
        picked = draw(
            st.lists(st.sampled_from(range(len(rows))), min_size=0, max_size=2 * len(rows))
        )
        return b"\n".join(lines[i] for i in picked) + b"\n"
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = draw(mutated_json(rows[i]))
    return b"\n".join(lines) + b"\n"


@st.composite
def mutated_yaml(draw: st.DrawFn, seed: dict[str, Any]) -> bytes:
    """A YAML config from ``seed``: values mutated (dumped as YAML), raw tokens spliced,
    duplicate keys, deep nesting, or byte damage."""
    kind = draw(st.sampled_from(["value", "value", "value", "token", "bytes", "dupkey", "deep"]))
    if kind == "value":
        value = draw(mutated_value(seed))
        try:
            return yaml.safe_dump(value, sort_keys=False).encode()
        except (yaml.YAMLError, RecursionError, ValueError):
            return b"{}"
    text = yaml.safe_dump(seed, sort_keys=False)
    if kind == "token":
        token = draw(
            st.sampled_from(
                [
                    "1e999999",
                    ".nan",
                    ".inf",
                    "-.inf",
                    "9" * 400,
                    "9" * 5000,
                    "~",
                    "[",
                    "{a: 1, a: 2}",
                    "!!python/name:os.system",
                    "&a [*a]",
                    "0x1F",
                    "1_000",
                    "- - -",
                    "'\\u0000'",
                ]
            )
        )
        lines = text.splitlines()
        i = draw(st.integers(0, len(lines) - 1))
        if ":" in lines[i]:
            key, _, _ = lines[i].partition(":")
            lines[i] = f"{key}: {token}"
        return ("\n".join(lines) + "\n").encode()
    if kind == "dupkey":
        key = draw(st.sampled_from(sorted(seed)))
        return (text + f"{key}: {json.dumps(_dump_json(seed[key]))}\n").encode()
    if kind == "deep":
        depth = draw(st.sampled_from([50, 500, 2000]))
        return (text + "extra: " + "[" * depth + "]" * depth + "\n").encode()
    return draw(mutated_bytes(text.encode()))
