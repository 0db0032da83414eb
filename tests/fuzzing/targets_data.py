"""Fuzz targets of the data boundary: the numeric (JSONL, ``.npz``) and text (TRL, Parquet,
summarize_from_feedback, PRISM) loaders, ``pluralign data validate``, the saved multi-user
model that ``pluralign rank`` reads, rank's candidate files, and YAML config files."""

from __future__ import annotations

import functools
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzzing.core import (
    Target,
    mutated_bytes,
    mutated_json,
    mutated_jsonl,
    mutated_value,
    mutated_yaml,
    register,
)
from pluralign.errors import PluralignError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _fixture_rows(name: str, limit: int = 4) -> list[dict[str, Any]]:
    lines = (FIXTURES / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][:limit]


NUMERIC_ROWS = [
    {"x": [0.5, -1.0], "phi0": [1.0, 0.0, 2.0], "phi1": [0.0, 1.0, -1.0], "y": 1, "user": "a"},
    {"x": [0.5, -1.0], "phi0": [0.5, 0.5, 0.0], "phi1": [1.0, 1.0, 1.0], "y": 0, "user": "a"},
    {"x": [1.0, 2.0], "phi0": [0.0, 0.0, 1.0], "phi1": [2.0, -1.0, 0.0], "y": 1, "user": "b"},
]
TRL_ROWS = [
    {"prompt": "Hi?", "chosen": "Hello there.", "rejected": "Go away.", "user_id": "u1",
     "user_context": {"age": 30, "region": {"name": "north"}}},
    {"prompt": [{"role": "user", "content": "Tea?"}], "chosen": "Yes please.",
     "rejected": "No.", "user_id": "u2", "user_context": {"age": 41, "region": {"name": "s"}}},
    {"prompt": "Why?", "chosen": "Because.", "rejected": "Why not.", "user_id": "u1",
     "user_context": {"age": 30, "region": {"name": "north"}}},
]


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------- numeric data
def _load_numeric(value: bytes, tmp: Path) -> None:
    from pluralign.data import load_preferences

    load_preferences(_write(tmp, "prefs.jsonl", value))


register(Target("data.numeric_jsonl", mutated_jsonl(NUMERIC_ROWS), _load_numeric))


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


_GOOD_ARRAYS = {"x": np.ones((3, 2)), "phi0": np.eye(3), "phi1": np.zeros((3, 3)),
                "y": np.array([1, 0, 1]), "users": np.array(["a", "b", "a"])}
_WEIRD_ARRAYS = [np.zeros((3, 0)), np.zeros(3), np.zeros((2, 3)), np.array([1 + 2j] * 3),
                 np.array(["2020-01-01"] * 3, dtype="datetime64[D]"), np.array([b"a"] * 3),
                 np.array([np.nan, 1.0, 2.0]), np.full((3, 3), 1e308), np.full((3, 3), -1e308),
                 np.array([True, False, True]), np.array([7, 7, 8]), np.array(["", "a", "b"]),
                 np.zeros((3, 3), dtype=np.float16), np.array([0.5, 1.0, 0.0]),
                 np.zeros((3, 3, 1)), np.array([[1, 2, 3]] * 3, dtype=np.uint8),
                 np.zeros(3, dtype=[("a", "f8")])]


@st.composite
def _npz_files(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(mutated_bytes(_npz_bytes(_GOOD_ARRAYS)))
    arrays = dict(_GOOD_ARRAYS)
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from([*_GOOD_ARRAYS, "extra"]))
        if draw(st.integers(0, 4)) == 0:
            arrays.pop(key, None)
        else:
            arrays[key] = draw(st.sampled_from(_WEIRD_ARRAYS))
    return _npz_bytes(arrays)


def _load_npz(value: bytes, tmp: Path) -> None:
    from pluralign.data import load_preferences

    load_preferences(_write(tmp, "prefs.npz", value))


register(Target("data.npz", _npz_files(), _load_npz))


# -------------------------------------------------------------------------- text data
def _read_trl_file(value: bytes, tmp: Path) -> None:
    from pluralign.data import read_trl

    path = _write(tmp, "prefs.jsonl", value)
    read_trl(path)
    read_trl(path, errors="collect")


register(Target("data.trl_jsonl", mutated_jsonl(TRL_ROWS), _read_trl_file))


def _read_trl_rows(value: Any, tmp: Path) -> None:
    from pluralign.data import read_trl

    rows = value if isinstance(value, list) else [value]
    read_trl(rows, errors="collect")


register(Target("data.trl_rows", mutated_value(TRL_ROWS, max_edits=4), _read_trl_rows))


@functools.cache
def _parquet_seed() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    rows = [{k: v for k, v in r.items() if k != "user_context"} for r in TRL_ROWS]
    rows[1]["prompt"] = "Tea?"
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


@st.composite
def _parquet_files(draw: st.DrawFn) -> bytes:
    return draw(mutated_bytes(_parquet_seed()))


def _read_parquet(value: bytes, tmp: Path) -> None:
    from pluralign.data import read_trl

    read_trl(_write(tmp, "prefs.parquet", value))


register(Target("data.trl_parquet", _parquet_files(), _read_parquet))


def _read_summarize(value: bytes, tmp: Path) -> None:
    from pluralign.data import read_summarize_from_feedback

    path = _write(tmp, "cmp.jsonl", value)
    read_summarize_from_feedback(path, errors="collect")
    read_summarize_from_feedback(path, include_articles=True)


register(Target("data.summarize", mutated_jsonl(_fixture_rows("summarize_from_feedback.jsonl")),
                _read_summarize))


@st.composite
def _prism_files(draw: st.DrawFn) -> tuple[bytes, bytes]:
    survey = _fixture_rows("prism_survey.jsonl")
    pairs = _fixture_rows("prism_utterances.jsonl", limit=8)
    if draw(st.booleans()):
        return draw(mutated_jsonl(survey)), "\n".join(map(json.dumps, pairs)).encode()
    return "\n".join(map(json.dumps, survey)).encode(), draw(mutated_jsonl(pairs))


def _read_prism(value: tuple[bytes, bytes], tmp: Path) -> None:
    from pluralign.data import read_prism

    survey, pairs = _write(tmp, "survey.jsonl", value[0]), _write(tmp, "pairs.jsonl", value[1])
    read_prism(survey, pairs, errors="collect")
    read_prism(survey, pairs)


register(Target("data.prism", _prism_files(), _read_prism))


# ---------------------------------------------------------------------- data validate
def _cli(args: list[str]) -> int:
    from typer.testing import CliRunner

    from pluralign.cli import app

    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if "Traceback" in result.output:
        raise AssertionError(f"traceback in the output:\n{result.output}")
    return result.exit_code


@st.composite
def _any_data_file(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["numeric", "trl", "summarize", "npz", "dir"]))
    if kind == "numeric":
        return "prefs.jsonl", draw(mutated_jsonl(NUMERIC_ROWS))
    if kind == "trl":
        return "prefs.jsonl", draw(mutated_jsonl(TRL_ROWS))
    if kind == "summarize":
        return "prefs.jsonl", draw(mutated_jsonl(_fixture_rows("summarize_from_feedback.jsonl")))
    if kind == "npz":
        return "prefs.npz", draw(_npz_files())
    return "dir.jsonl", b""


def _validate_cli(value: tuple[str, bytes], tmp: Path) -> None:
    name, data = value
    path = tmp / name
    if name == "dir.jsonl":
        path.mkdir()
    else:
        path.write_bytes(data)
    code = _cli(["data", "validate", str(path)])
    if code not in (0, 1, 2):
        raise AssertionError(f"exit code {code}")
    if code:
        raise PluralignError(f"exit {code}")  # a clean refusal


register(Target("cli.data_validate", _any_data_file(), _validate_cli))


# ------------------------------------------------------------- saved models and rank
@functools.cache
def _model_folder() -> Path:
    """A small fitted SharedBasis with design matrices, saved once per process."""
    import tempfile

    from pluralign.cli import _designs
    from pluralign.data import PreferenceData
    from pluralign.rewards import SharedBasis
    from pluralign.rewards.persistence import save_model

    rng = np.random.default_rng(0)
    n, d = 60, 3
    phi0, phi1 = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    users = np.array(["a", "b", "c"] * (n // 3))
    y = (rng.random(n) < 0.5).astype(int)
    data = PreferenceData(None, phi0, phi1, y, users)
    model = SharedBasis(1, 1e-2).fit(data)
    folder = Path(tempfile.mkdtemp(prefix="pluralign-fuzz-model-"))
    save_model(model, folder, designs=_designs(model, data),
               metadata={"features": {"kind": "numeric", "format": "numeric"}, "ridge": 1.0,
                         "seed": 0, "test_size": 0.2, "data": "x.jsonl"})
    return folder


@st.composite
def _model_files(draw: st.DrawFn) -> tuple[str, bytes]:
    folder = _model_folder()
    if draw(st.integers(0, 2)):
        meta = json.loads((folder / "model.json").read_text())
        return "model.json", draw(mutated_json(meta))
    with np.load(folder / "model.npz") as f:
        arrays = {k: f[k] for k in f.files}
    if draw(st.booleans()):
        return "model.npz", draw(mutated_bytes((folder / "model.npz").read_bytes()))
    key = draw(st.sampled_from([*arrays, "extra"]))
    arrays[key] = draw(st.sampled_from([*_WEIRD_ARRAYS, np.full(np.shape(arrays.get(key, 1.0)),
                                                                  np.nan),
                                        -np.ones(3, dtype=int), np.array([5, 0, 0])]))
    return "model.npz", _npz_bytes(arrays)


def _copy_model(value: tuple[str, bytes], tmp: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(_model_folder(), folder)
    (folder / value[0]).write_bytes(value[1])
    return folder


def _load_model(value: tuple[str, bytes], tmp: Path) -> None:
    from pluralign.rewards.persistence import load_model

    model, _, _ = load_model(_copy_model(value, tmp))
    theta = model.user_theta(model.users_[0])
    if not np.isfinite(theta).all():
        raise AssertionError("a loaded model has non-finite parameters")


register(Target("model.load", _model_files(), _load_model))


def _rank_cli(value: tuple[str, bytes], tmp: Path) -> None:
    candidates = tmp / "candidates.jsonl"
    if value[0] == "candidates.jsonl":
        folder = _model_folder()
        candidates.write_bytes(value[1])
    else:
        folder = _copy_model(value, tmp)
        candidates.write_text(json.dumps({"phi": [[1, 0, 0], [0, 1, 0]]}) + "\n")
    code = _cli(["rank", str(folder), str(candidates), "--user", "a", "--pessimism", "1.0"])
    if code:
        raise PluralignError(f"exit {code}")


@st.composite
def _rank_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    if draw(st.booleans()):
        rows = [{"phi": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]]}, {"phi": [[0, 0, 1], [1, 1, 1]]}]
        return "candidates.jsonl", draw(mutated_jsonl(rows))
    return draw(_model_files())


register(Target("cli.rank", _rank_inputs(), _rank_cli))


# ------------------------------------------------------------------------ YAML configs
def _load_config(value: bytes, tmp: Path) -> None:
    from pluralign.experiments.config import load_config

    load_config(_write(tmp, "config.yaml", value))


_CONFIG_SEED = {"experiment": "loco", "seed": 0, "repeats": 2,
                "env": {"d_x": 4, "d_phi": 4, "rank": 2}, "n_samples": [100, 200],
                "methods": ["greedy", "prs"], "options": {"l2": 1e-4}, "quick": {"repeats": 1}}
register(Target("config.yaml_file", mutated_yaml(_CONFIG_SEED), _load_config))
