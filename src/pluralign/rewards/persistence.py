"""Saving and loading fitted multi-user reward models (what ``pluralign fit`` writes and
``pluralign rank`` reads), without pickle.

A model folder holds ``model.npz`` (arrays, read with ``allow_pickle=False`` and only the dtypes
pluralign writes) and ``model.json`` (class, hyper-parameters, user ids, feature metadata). A
folder may come from someone else, so :func:`load_model` trusts nothing in it: every key of
``model.json`` is checked against this schema (unknown and missing keys, wrong types,
duplicate or mixed-type user ids are refused), every array against the shapes the metadata
implies (NaN or infinite parameters are refused), and nothing in the folder can make pluralign
run code: the feature metadata may only name a sentence-transformers model, which
:class:`~pluralign.features.TextEncoder` loads with ``trust_remote_code=False``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pluralign._parse import read_json_file, read_npz
from pluralign.errors import DataValidationError
from pluralign.rewards.contextual import Contextual
from pluralign.rewards.multi_user import MultiUserModel
from pluralign.rewards.per_user import PerUser, Pooled
from pluralign.rewards.protocols import SavableUserModel
from pluralign.rewards.shared_basis import SharedBasis
from pluralign.rewards.users import user_key

__all__ = ["FORMAT", "FORMAT_VERSION", "MODEL_CLASSES", "load_model", "save_model"]

MODEL_CLASSES: dict[str, type[MultiUserModel]] = {
    "SharedBasis": SharedBasis,
    "PerUser": PerUser,
    "Pooled": Pooled,
    "Contextual": Contextual,
}
FORMAT = "pluralign-multi-user"
FORMAT_VERSION = 1
# hyper-parameters that version 1 folders written by older pluralign name differently (old → new)
RENAMED_PARAMS = {"SharedBasis": {"k": "rank"}, "Contextual": {"k": "rank"}}
# what save_model writes itself, and the metadata `pluralign fit` adds
REQUIRED_KEYS = ("format", "version", "class", "params", "users", "n_train", "d_phi", "has_design")
METADATA_KEYS = ("features", "ridge", "seed", "test_size", "data")
DESIGN_ARRAYS = ("design", "design_index", "design_lam", "design_n")
PARAM_CHOICES = {"unknown_user": ("error", "shared"), "dtype": ("float64", "float32")}
ENCODER_KEYS = {
    "model": (str, type(None)),
    "model_key": (str,),
    "mode": (str,),
    "template": (str,),
    "normalize": (bool,),
    "dim": (int, type(None)),
}


def save_model(
    model: SavableUserModel,
    folder: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    designs: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a fitted model to ``folder``: ``model.npz`` and ``model.json``, atomically.

    ``metadata`` may hold the keys of :data:`METADATA_KEYS` (how the features were made, the
    ridge, the seed and split, the data file). ``designs`` (optional arrays ``design``
    ``(G, p, p)``, ``design_index`` ``(U,)``, ``design_lam`` ``(G,)``, ``design_n`` ``(G,)``) let
    ``pluralign rank`` apply pessimism."""
    from pluralign._atomic import atomic_open, atomic_write_text

    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise DataValidationError(f"cannot save a {name}", field="model")
    unknown = sorted(set(metadata or {}) - set(METADATA_KEYS))
    if unknown:
        raise DataValidationError(
            f"unknown metadata key; valid: {', '.join(METADATA_KEYS)}", field=unknown[0]
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = dict(model.to_arrays())
    arrays.update(designs or {})
    with atomic_open(folder / "model.npz", "wb") as handle:
        np.savez(handle, **arrays)
    users = [user_key(u) for u in model.users_.tolist()]
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "class": name,
        "params": model.get_params(),
        "users": users,
        "n_train": int(model.n_train_),
        "d_phi": int(model.d_phi_),
        "has_design": bool(designs),
        **(metadata or {}),
    }
    atomic_write_text(folder / "model.json", json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return folder


# ----------------------------------------------------------------------------- validation
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _renamed_params(
    params: dict[str, Any], cls_name: str, bad: Callable[[str, str], DataValidationError]
) -> tuple[dict[str, Any], dict[str, str]]:
    """``params`` with the older names of :data:`RENAMED_PARAMS` (``k`` of ``SharedBasis`` and
    ``Contextual``, written by pluralign before the rank was called ``rank``) under their
    names, in order, and ``{new: old}`` for the ones renamed (errors name the key as written).
    A folder giving both names is refused."""
    renames = {old: new for old, new in RENAMED_PARAMS.get(cls_name, {}).items() if old in params}
    for old, new in renames.items():
        if new in params:
            raise bad(f"params.{old}", f"renamed to {new!r}; give only {new!r}")
    out = {renames.get(key, key): value for key, value in params.items()}
    return out, {new: old for old, new in renames.items()}


def _check_meta(meta: Any, where: dict[str, Any]) -> dict[str, Any]:
    def bad(field: str, message: str) -> DataValidationError:
        return DataValidationError(message, field=field, **where)

    if not isinstance(meta, dict):
        raise DataValidationError(f"must be a JSON object, got {type(meta).__name__}", **where)
    if meta.get("format") != FORMAT:
        raise bad("format", f"not a {FORMAT} model (format is {meta.get('format')!r})")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise bad(missing[0], "missing")
    unknown = sorted(set(meta) - set(REQUIRED_KEYS) - set(METADATA_KEYS))
    if unknown:
        raise bad(unknown[0], f"unknown key; valid: {', '.join(REQUIRED_KEYS + METADATA_KEYS)}")
    if meta["version"] != FORMAT_VERSION or not _is_int(meta["version"]):
        raise bad(
            "version",
            f"format version {meta['version']!r} is not supported (this "
            f"pluralign reads version {FORMAT_VERSION})",
        )
    if not isinstance(meta["class"], str) or meta["class"] not in MODEL_CLASSES:
        raise bad("class", f"must be one of {', '.join(MODEL_CLASSES)}, got {meta['class']!r}")
    cls = MODEL_CLASSES[meta["class"]]
    params = meta["params"]
    defaults = cls().get_params()
    if not isinstance(params, dict):
        raise bad("params", "must be a mapping of hyper-parameters")
    params, named = _renamed_params(params, meta["class"], bad)
    meta["params"] = params
    for key in sorted(set(params) | set(defaults)):
        if key not in defaults:
            raise bad(f"params.{key}", f"unknown hyper-parameter of {meta['class']}")
        if key not in params:
            raise bad(f"params.{key}", "missing")
        value, default = params[key], defaults[key]
        number = (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
        if default is None:
            ok = value is None or number
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = number and _is_int(value)
        elif isinstance(default, float):
            ok = number
        else:
            ok = isinstance(value, str)
        if ok and key in PARAM_CHOICES and value not in PARAM_CHOICES[key]:
            ok = False
        if not ok:
            raise bad(
                f"params.{named.get(key, key)}",
                f"must be like {default!r}"
                + (f" (one of {PARAM_CHOICES[key]})" if key in PARAM_CHOICES else "")
                + f", got {value!r}",
            )
    users = meta["users"]
    # a Contextual model may be fitted on contexts alone, without user ids
    if not isinstance(users, list) or not (users or meta["class"] == "Contextual"):
        raise bad("users", "must be a non-empty list of user ids")
    kinds = {type(u) for u in users}
    if not kinds <= {str, int} or len(kinds) > 1 or any(isinstance(u, bool) for u in users):
        raise bad("users", "must all be strings or all integers")
    if len(set(users)) != len(users):
        dup = next(u for u in users if users.count(u) > 1)
        raise bad("users", f"user {dup!r} is listed twice")
    if any(isinstance(u, str) and not u.strip() for u in users):
        raise bad("users", "user ids must be non-empty")
    for key in ("n_train", "d_phi"):
        if not _is_int(meta[key]) or meta[key] < (1 if key == "d_phi" else 0):
            raise bad(
                key,
                f"must be a {'positive' if key == 'd_phi' else 'non-negative'} "
                f"integer, got {meta[key]!r}",
            )
    if not isinstance(meta["has_design"], bool):
        raise bad("has_design", "must be true or false")
    if "features" in meta:
        _check_features(meta["features"], bad)
    return meta


def _check_features(features: Any, bad: Any) -> None:
    if not isinstance(features, dict) or features.get("kind") not in ("numeric", "text"):
        raise bad("features", "must be a mapping with kind 'numeric' or 'text'")
    if "context" in features:
        from pluralign.data.contexts import ContextSchema

        try:
            ContextSchema.from_dict(features["context"])
        except DataValidationError as err:
            raise bad("features.context", err.bare) from None
    if features["kind"] == "numeric":
        return
    encoder = features.get("encoder")
    if not isinstance(encoder, dict):
        raise bad("features.encoder", "text features need the encoder's settings")
    for key, types in ENCODER_KEYS.items():
        if key not in encoder:
            raise bad(f"features.encoder.{key}", "missing")
        if not isinstance(encoder[key], types) or (int in types and isinstance(encoder[key], bool)):
            raise bad(f"features.encoder.{key}", f"has the wrong type ({encoder[key]!r})")
    unknown = sorted(set(encoder) - set(ENCODER_KEYS))
    if unknown:
        raise bad(f"features.encoder.{unknown[0]}", "unknown key")
    if encoder["mode"] not in ("joint", "response"):
        raise bad(
            "features.encoder.mode", f"must be 'joint' or 'response', got {encoder['mode']!r}"
        )
    from pluralign.features.text import check_template

    for field, template in (
        ("features.encoder.template", encoder["template"]),
        ("features.template", features.get("template")),
    ):
        try:
            check_template(template, require=("response",))
        except DataValidationError as err:
            raise bad(field, err.bare) from None


def _check_arrays(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], where: dict[str, Any]
) -> None:
    def bad(field: str, message: str) -> DataValidationError:
        return DataValidationError(message, field=field, **where)

    n_users, d_phi = len(meta["users"]), meta["d_phi"]
    shared, contextual = meta["class"] == "SharedBasis", meta["class"] == "Contextual"
    expected = {"theta0", "thetas", "user_counts"} | ({"basis", "weights"} if shared else set())
    if contextual:
        expected |= {"basis", "context_weights", "contexts", "context_mean", "context_scale"}
    if meta["has_design"]:
        expected |= set(DESIGN_ARRAYS)
    for key in sorted(expected - set(arrays)):
        raise bad(key, "missing array")
    for key in sorted(set(arrays) - expected):
        raise bad(
            key,
            "unknown array"
            + (
                ""
                if meta["has_design"] or key not in DESIGN_ARRAYS
                else " (model.json says has_design: false)"
            ),
        )
    rank = (
        arrays["basis"].shape[-1] if (shared or contextual) and arrays["basis"].ndim == 2 else None
    )
    shapes: dict[str, tuple] = {
        "theta0": (d_phi,),
        "thetas": (n_users, d_phi),
        "user_counts": (n_users,),
    }
    if shared:
        shapes |= {"basis": (d_phi, rank), "weights": (n_users, rank)}
    if contextual:
        weights = arrays["context_weights"]
        d_x = weights.shape[0] if weights.ndim == 2 and weights.shape[0] else None
        shapes |= {
            "basis": (d_phi, rank),
            "context_weights": (d_x, rank),
            "contexts": (n_users, d_x),
            "context_mean": (d_x,),
            "context_scale": (d_x,),
        }
    for key, shape in shapes.items():
        arr = arrays[key]
        if arr.shape != shape:
            raise bad(
                key,
                f"has shape {arr.shape}, expected {shape} for {n_users} users and d_phi = {d_phi}",
            )
        if arr.dtype.kind not in "iuf":
            raise bad(key, f"must hold numbers, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise bad(key, "contains NaN or inf")
    if (arrays["user_counts"] < 0).any() or arrays["user_counts"].dtype.kind == "f":
        raise bad("user_counts", "must be non-negative integers")
    if contextual and (arrays["context_scale"] <= 0).any():
        raise bad("context_scale", "must be positive")
    if meta["has_design"]:
        design, index = arrays["design"], arrays["design_index"]
        if design.ndim != 3 or design.shape[1] != design.shape[2] or design.shape[0] < 1:
            raise bad("design", f"must be (G, p, p), got {design.shape}")
        groups = design.shape[0]
        for key, shape in (
            ("design_index", (n_users,)),
            ("design_lam", (groups,)),
            ("design_n", (groups,)),
        ):
            if arrays[key].shape != shape:
                raise bad(key, f"has shape {arrays[key].shape}, expected {shape}")
        for key in DESIGN_ARRAYS:
            if arrays[key].dtype.kind not in "iuf" or not np.isfinite(arrays[key]).all():
                raise bad(key, "must hold finite numbers")
        if index.dtype.kind not in "iu" or (index < 0).any() or (index >= groups).any():
            raise bad("design_index", f"must be integers in [0, {groups})")
        if (arrays["design_lam"] < 0).any() or (arrays["design_n"] < 0).any():
            raise bad("design_lam", "must be non-negative")


def load_model(folder: str | Path) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
    """Read what :func:`save_model` wrote: ``(model, metadata, design arrays)``.

    Every key and array is validated (module docstring); a bad folder raises
    :class:`DataValidationError` naming the file and the field."""
    folder = Path(folder)
    meta_path, array_path = folder / "model.json", folder / "model.npz"
    for path in (meta_path, array_path):
        if not path.is_file():
            raise DataValidationError(
                "not found; is this a folder written by `pluralign fit`?", path=str(path)
            )
    meta = _check_meta(read_json_file(meta_path), {"path": str(meta_path)})
    arrays = read_npz(array_path)
    _check_arrays(arrays, meta, {"path": str(array_path)})
    schema = meta.get("features", {}).get("context")
    if (
        meta["class"] == "Contextual"
        and schema is not None
        and len(schema["names"]) != arrays["context_weights"].shape[0]
    ):
        raise DataValidationError(
            f"names {len(schema['names'])} context columns, but model.npz's context_weights "
            f"has {arrays['context_weights'].shape[0]}",
            field="features.context",
            path=str(meta_path),
        )
    designs = {k: v for k, v in arrays.items() if k in DESIGN_ARRAYS}
    cls = MODEL_CLASSES[meta["class"]]
    model = cls.from_arrays(arrays, meta["users"], n_train=meta["n_train"], **meta["params"])
    return model, meta, designs
