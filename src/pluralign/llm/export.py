"""Each user's adapter as a standard PEFT LoRA adapter directory, plus the reward head (or the
policy's settings).

User ``u``'s update ``(α/r) B_u A_u`` of every adapted module is exactly a PEFT LoRA adapter
with ``lora_A.weight = A_u``, ``lora_B.weight = B_u``, ``r`` and ``lora_alpha = α`` (PEFT scales by
``lora_alpha / r`` too). :func:`export_adapters` writes, per user, a folder with

* ``adapter_config.json`` — written by ``peft.LoraConfig.save_pretrained`` (target modules are
  the full module names, so PEFT adapts exactly the same layers);
* ``adapter_model.safetensors`` — the factors under PEFT's key names
  (``base_model.model.<module>.lora_A.weight``);
* for a reward model, ``reward_head.safetensors`` and ``reward_head.json`` — the scalar head,
  the pooling rule, the token budget and the user id;
* for a :class:`~pluralign.llm.policy.PersonalizedPolicy` (no head), ``policy.json`` — the user
  id, the token budgets (``max_length``, ``max_prompt_length``), the chat template rule, the
  share mode, the base model, its load arguments and the pad token.

``peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder)`` then reproduces
user ``u``'s backbone; :class:`ExportedReward` adds the head and scores text (a test checks the
rewards equal the multi-user model's). A policy's module names are paths inside the
``...ForCausalLM``, so ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
folder)`` is user ``u``'s policy (a test checks its log-probabilities). Folder names are the
user ids where those are safe file names, else a sanitized prefix plus a hash of the id
(:func:`folder_names`); ``users.json`` maps ids to folders. Every file is written into a
temporary folder first, fsynced and moved into place, so an interrupted export leaves no half
adapter.

Reading a folder back (:class:`ExportedReward`) validates every file before any model is
loaded: ``reward_head.json`` (:func:`read_head_config`; the ``from_pretrained`` arguments it may
set are allow-listed, and ``trust_remote_code`` is taken only from the caller),
``adapter_config.json`` (:func:`read_adapter_config`: plain LoRA only) and the tensor files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pluralign._atomic import atomic_write_text, fsync_dir
from pluralign._parse import read_json_file
from pluralign.errors import ConfigError, DataValidationError, PluralignError, PluralignWarning
from pluralign.llm._checks import (
    check_choice,
    check_float,
    check_int,
    check_plain_file_name,
    check_string,
    show,
)
from pluralign.llm._files import fsync_file, read_tensors, write_tensors
from pluralign.llm.policy import PersonalizedPolicy
from pluralign.llm.reward_model import (
    PersonalizedRewardModel,
    _check_max_length,
    backbone_inputs,
    check_pad_token,
    pad_right,
    pool_hidden,
    tokenize_pairs,
)

__all__ = ["POLICY_CONFIG", "ExportedReward", "export_adapters", "folder_names",
           "read_adapter_config", "read_head_config"]

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"
POLICY_CONFIG = "policy.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# names that a folder under ``adapters/`` may not take: the mapping file, pluralign's own run
# folders, and the device names Windows reserves in every folder (``CON``, ``nul.txt``, ...)
RESERVED_NAMES = frozenset({"users.json", "checkpoints", "adapters", "con", "prn", "aux", "nul",
                            *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))})
MAX_PLAIN = 128          # bytes: longer ids are shortened (file names stop at 255 bytes)
PREFIX = 48              # bytes of the id kept in a shortened or hashed name
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_HASHED = re.compile(r".*-[0-9a-fA-F]{12}")


def _hashed_name(user: str) -> str:
    digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    # no dots: the name has no extension, so no reserved stem (``nul.txt`` -> ``nul_txt-…``)
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", user)[:PREFIX].strip("_-") or "user"
    return f"{prefix}-{digest}"


def _is_plain(user: str) -> bool:
    stem = user.split(".", 1)[0].lower()
    return (len(user) <= MAX_PLAIN and _PLAIN.fullmatch(user) is not None
            and not user.endswith(".") and user.lower() not in RESERVED_NAMES
            and stem not in RESERVED_NAMES and _HASHED.fullmatch(user) is None)


def folder_names(users: Sequence[str]) -> dict[str, str]:
    """The folder of each user id under ``adapters/`` (``{id: name}``).

    An id that is already a safe file name is its own folder name: ASCII letters, digits and
    ``._-``, starting with a letter, digit or ``_`` (pluralign's temporary folders start with
    ``.``), not ending with ``.``,
    at most :data:`MAX_PLAIN` bytes, not a reserved name (:data:`RESERVED_NAMES`, compared
    without case and extension), and not ending like a hashed name (below). Every other id
    gets ``<prefix>-<h>``: the first :data:`PREFIX` characters with all but ASCII letters,
    digits, ``_`` and ``-`` replaced by ``_`` (``user`` if nothing is left) and ``h`` the first
    12 hex digits of the SHA-256 of the id's UTF-8 bytes. So ``a/b`` and ``a_b`` get different
    folders, an id of 1,000 characters gets a 61-byte name, and ``..``, ``""`` and
    ``users.json`` cannot be reached.

    A name depends on the id alone, except that ids whose plain names differ only in case
    (``Ana``/``ana``: one folder on macOS and Windows) are all hashed. The result therefore
    does not depend on the order of ``users``. Two different ids get the same name only if
    their 48-bit hashes collide, which raises :class:`PluralignError` (it is checked, since the
    caller decides the folders before training).
    """
    plain = list(dict.fromkeys(u for u in users if _is_plain(u)))     # each id once
    folded: dict[str, int] = {}
    for u in plain:
        folded[u.casefold()] = folded.get(u.casefold(), 0) + 1
    names: dict[str, str] = {}
    owners: dict[str, str] = {}
    for u in users:
        if u in names:
            continue
        name = u if _is_plain(u) and folded[u.casefold()] == 1 else _hashed_name(u)
        other = owners.setdefault(name.casefold(), u)
        if other != u:
            raise PluralignError(f"user ids {other!r} and {u!r} map to the same adapter "
                                 f"folder {name!r}; rename one of them")
        names[u] = name
    return names


def export_adapters(model: PersonalizedRewardModel | PersonalizedPolicy, out: str | Path,
                    users: Sequence[Any] | None = None) -> dict[str, Path]:
    """Write the adapters of ``users`` (default: all) under ``out``; ``{user: folder}``.

    ``model`` is a :class:`~pluralign.llm.PersonalizedRewardModel` (each folder gets the head
    files ``reward_head.safetensors`` and ``reward_head.json``) or a
    :class:`~pluralign.llm.policy.PersonalizedPolicy` (no head: ``policy.json`` instead); the
    PEFT files are the same for both (module docstring).

    Folder names come from :func:`folder_names` of all the model's users (so exporting a
    subset gives the same names). Each folder is written into ``out/.<name>.tmp``, every file
    fsynced, the folder fsynced, renamed into place, and ``out`` fsynced: a crash leaves either
    the old adapter or the complete new one."""
    from peft import LoraConfig

    out = Path(out)
    chosen = model.user_ids if users is None else [str(u) for u in users]
    index = model.user_index(chosen).tolist()
    names = folder_names(model.user_ids)
    extra = sorted(set(model.load_kwargs) - set(ALLOWED_LOAD_KWARGS))
    if extra:
        raise ConfigError(f"the model's load_kwargs {extra} cannot be saved: an exported "
                          f"adapter may only record {', '.join(ALLOWED_LOAD_KWARGS)}")
    load_kwargs = {k: check_plain_file_name(f"load_kwargs.{k}", v)
                   for k, v in model.load_kwargs.items() if v is not None}
    layers = list(model.lora.layers())
    first = layers[0][1]
    config = LoraConfig(r=first.r, lora_alpha=first.alpha, lora_dropout=first.dropout.p
                        if isinstance(first.dropout, torch.nn.Dropout) else 0.0,
                        target_modules=[name for name, _ in layers], bias="none",
                        base_model_name_or_path=model.name_or_path, inference_mode=True)
    head = getattr(model, "head", None)
    head = None if head is None else {"weight": head.weight}
    written: dict[str, Path] = {}
    for user, i in zip(chosen, index, strict=True):
        final = out / names[user]
        tmp = out / f".{names[user]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config.save_pretrained(str(tmp))
        fsync_file(tmp / ADAPTER_CONFIG)
        tensors = {}
        for name, layer in layers:
            a, b = layer.user_factors(i)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
        write_tensors(tmp / ADAPTER_WEIGHTS, tensors)
        if head is not None:
            write_tensors(tmp / HEAD_WEIGHTS, head)
            atomic_write_text(tmp / HEAD_CONFIG, json.dumps({
                "user_id": user, "pooling": model.pooling, "max_length": model.max_length,
                "share": model.share, "base_model_name_or_path": model.name_or_path,
                "load_kwargs": load_kwargs, "pad_token": model.tokenizer.pad_token,
            }, indent=1))
        else:
            atomic_write_text(tmp / POLICY_CONFIG, json.dumps({
                "user_id": user, "max_length": model.max_length,
                "max_prompt_length": model.max_prompt_length,
                "chat_template": model.chat_template, "share": model.share,
                "base_model_name_or_path": model.name_or_path, "load_kwargs": load_kwargs,
                "pad_token": model.tokenizer.pad_token,
            }, indent=1))
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(out)
        written[user] = final
    mapping = out / "users.json"
    previous = _read_users_json(mapping)
    now = {p.name.casefold(): u for u, p in written.items()}
    # an entry of an earlier export whose folder was just rewritten for another user is stale
    merged = {u: n for u, n in previous.items() if now.get(n.casefold(), u) == u}
    merged.update({u: str(p.name) for u, p in written.items()})
    atomic_write_text(mapping, json.dumps(merged, indent=1))
    return written


def _read_users_json(path: Path) -> dict[str, str]:
    """The ``{user id: folder}`` mapping of an earlier export into the same folder, to extend.
    A file that is not such a mapping (damaged, or not pluralign's) is replaced, with a
    :class:`PluralignWarning`: the folders themselves are intact, and each holds its user id in
    ``reward_head.json`` (a policy's in ``policy.json``)."""
    if not path.is_file():
        return {}
    try:
        value = read_json_file(path)
    except PluralignError as err:
        warnings.warn(f"{err}; writing a new {path.name}", PluralignWarning, stacklevel=3)
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(v, str) and _PLAIN.fullmatch(v) for v in value.values()):
        warnings.warn(f"{path}: not a mapping of user ids to folder names; writing a new "
                      f"{path.name}", PluralignWarning, stacklevel=3)
        return {}
    return value


# what a saved reward_head.json may hold: key -> required?
HEAD_KEYS = {"user_id": True, "pooling": True, "max_length": True, "share": True,
             "base_model_name_or_path": True, "pad_token": True, "load_kwargs": False}
# the from_pretrained arguments a saved file may set (trust_remote_code never: only the caller)
ALLOWED_LOAD_KWARGS = ("gguf_file",)
SAVED_POOLINGS = ("mean", "cls", "last")       # "auto" is resolved before a model is saved
# adapter_config.json fields ExportedReward reads; every other LoraConfig field must keep
# PEFT's default (pluralign writes nothing else), since a non-default one would change the model
_ADAPTER_READ = ("r", "lora_alpha", "lora_dropout", "target_modules", "peft_type")
_ADAPTER_IGNORED = ("base_model_name_or_path", "task_type", "inference_mode", "peft_version",
                    "revision", "init_lora_weights", "auto_mapping")


def _field(path: Path, key: str, check: Any, *args: Any, **kwargs: Any) -> Any:
    """``check(key, *args, **kwargs)`` with its :class:`ConfigError` re-raised as a
    :class:`DataValidationError` naming the file and field."""
    try:
        return check(key, *args, **kwargs)
    except ConfigError as err:
        raise DataValidationError(str(err), field=key, path=str(path)) from None


def read_head_config(folder: str | Path) -> dict[str, Any]:
    """The validated ``reward_head.json`` of an exported adapter folder.

    The file must be strict JSON (UTF-8, no duplicate keys, :func:`pluralign._parse.parse_json`)
    holding an object with exactly the keys of :data:`HEAD_KEYS`: ``user_id`` (a non-empty
    string), ``pooling`` (``mean``, ``cls`` or ``last``), ``max_length`` (a positive integer),
    ``share`` (a LoRA share mode), ``base_model_name_or_path`` (a non-empty string, or null
    when the caller gives ``base``), ``pad_token`` (a string or null) and, optionally,
    ``load_kwargs``: arguments for ``from_pretrained`` limited to
    :data:`ALLOWED_LOAD_KWARGS` — ``gguf_file``, a plain file name inside the base model's
    folder. ``trust_remote_code`` (which runs a model folder's Python code on load) and any
    other argument are refused: a file that anyone could have edited must not decide what
    code runs; :class:`ExportedReward` takes ``trust_remote_code`` only from its caller.
    Anything else raises :class:`DataValidationError` naming the file and field.
    """
    from pluralign.llm.lora import SHARE_MODES

    path = Path(folder) / HEAD_CONFIG
    raw = read_json_file(path)
    if not isinstance(raw, dict):
        raise DataValidationError(f"must be a JSON object, got {type(raw).__name__}",
                                  path=str(path))
    unknown = sorted(set(raw) - set(HEAD_KEYS))
    if unknown:
        raise DataValidationError(f"unknown key(s) {unknown}; valid: {', '.join(HEAD_KEYS)}",
                                  field=unknown[0], path=str(path))
    missing = [k for k, required in HEAD_KEYS.items() if required and k not in raw]
    if missing:
        raise DataValidationError(f"missing key(s) {missing}", field=missing[0],
                                  path=str(path))
    load = raw.get("load_kwargs")
    if load is None:
        load = {}
    if not isinstance(load, dict):
        raise DataValidationError(f"must be an object, got {show(load)}", field="load_kwargs",
                                  path=str(path))
    refused = sorted(set(load) - set(ALLOWED_LOAD_KWARGS))
    if refused:
        hint = (" (remote code is enabled only by the caller: "
                "ExportedReward(folder, trust_remote_code=True))"
                if "trust_remote_code" in refused else "")
        raise DataValidationError(
            f"from_pretrained argument(s) {refused} may not be set by a saved file; allowed: "
            f"{', '.join(ALLOWED_LOAD_KWARGS)}{hint}",
            field=f"load_kwargs.{refused[0]}", path=str(path))
    clean_load = {}
    if load.get("gguf_file") is not None:
        clean_load["gguf_file"] = _field(path, "load_kwargs.gguf_file", check_plain_file_name,
                                         load["gguf_file"])
    return {
        "user_id": _field(path, "user_id", check_string, raw["user_id"]),
        "pooling": _field(path, "pooling", check_choice, raw["pooling"], SAVED_POOLINGS),
        "max_length": _field(path, "max_length", check_int, raw["max_length"]),
        "share": _field(path, "share", check_choice, raw["share"], SHARE_MODES),
        "base_model_name_or_path": _field(path, "base_model_name_or_path", check_string,
                                          raw["base_model_name_or_path"], optional=True),
        "pad_token": _field(path, "pad_token", _pad_token, raw["pad_token"]),
        "load_kwargs": clean_load,
    }


def _pad_token(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string or null, got {show(value)}")
    return value


def _lora_defaults() -> dict[str, Any]:
    from peft import LoraConfig

    return json.loads(json.dumps(LoraConfig().to_dict(), default=str))


def read_adapter_config(folder: str | Path) -> Any:
    """A ``peft.LoraConfig`` built from the validated ``adapter_config.json`` of ``folder``.

    PEFT's own reader accepts whatever the file says (other adapter types, DoRA, layer
    replication, Megatron modules to import). Here the file must be strict JSON holding a LoRA
    adapter (``peft_type: LORA``) with a positive integer ``r``, a finite positive
    ``lora_alpha``, ``lora_dropout`` in [0, 1) and a non-empty list of ``target_modules``;
    every other field PEFT knows must have PEFT's default (what pluralign writes). Fields PEFT
    does not know are ignored: the config is rebuilt from the checked fields only.
    """
    from peft import LoraConfig

    path = Path(folder) / ADAPTER_CONFIG
    raw = read_json_file(path)
    if not isinstance(raw, dict):
        raise DataValidationError(f"must be a JSON object, got {type(raw).__name__}",
                                  path=str(path))
    missing = [k for k in _ADAPTER_READ if k not in raw]
    if missing:
        raise DataValidationError(f"missing key(s) {missing}", field=missing[0],
                                  path=str(path))
    if raw["peft_type"] != "LORA":
        raise DataValidationError(f"must be 'LORA', got {show(raw['peft_type'])}",
                                  field="peft_type", path=str(path))
    r = _field(path, "r", check_int, raw["r"])
    alpha = _field(path, "lora_alpha", check_float, raw["lora_alpha"], low=0.0, low_open=True)
    dropout = _field(path, "lora_dropout", check_float, raw["lora_dropout"], low=0.0, high=1.0)
    targets = raw["target_modules"]
    if not isinstance(targets, list) or not targets or not all(
            isinstance(t, str) and t for t in targets):
        raise DataValidationError(f"must be a non-empty list of module names, got "
                                  f"{show(targets)}", field="target_modules", path=str(path))
    defaults = _lora_defaults()
    for key in sorted(set(raw) & set(defaults)):
        if key in _ADAPTER_READ or key in _ADAPTER_IGNORED:
            continue
        if raw[key] != defaults[key] and not (raw[key] in (None, {}, []) and
                                              defaults[key] in (None, {}, [])):
            raise DataValidationError(f"{show(raw[key])} is not PEFT's default "
                                      f"{show(defaults[key])}: pluralign exports plain LoRA "
                                      "adapters only", field=key, path=str(path))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      bias="none", inference_mode=True)


def _check_adapter_tensors(folder: Path, config: Any) -> None:
    """``adapter_model.safetensors`` must hold exactly ``lora_A``/``lora_B`` of every target
    module, of shapes ``(r, in)``/``(out, r)``, finite. (PEFT would load a file with missing
    tensors with a warning, leaving those layers at their initialization.)"""
    path = folder / ADAPTER_WEIGHTS
    tensors = read_tensors(path)
    expected = {f"base_model.model.{m}.lora_{ab}.weight" for m in config.target_modules
                for ab in "AB"}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise DataValidationError(f"tensors do not match adapter_config.json's "
                                  f"target_modules (e.g. {odd[:2]})", field=odd[0],
                                  path=str(path))
    for name, t in tensors.items():
        r_axis = 0 if ".lora_A." in name else 1
        if t.dim() != 2 or t.shape[r_axis] != config.r:
            raise DataValidationError(f"has shape {tuple(t.shape)}; expected rank r = "
                                      f"{config.r} on axis {r_axis}", field=name,
                                      path=str(path))


def _read_head_weights(folder: Path, hidden: int | None) -> torch.Tensor:
    path = folder / HEAD_WEIGHTS
    tensors = read_tensors(path)
    if set(tensors) != {"weight"}:
        raise DataValidationError(f"must hold one tensor 'weight', got {sorted(tensors)[:5]}",
                                  path=str(path))
    weight = tensors["weight"]
    if weight.dim() != 2 or weight.shape[0] != 1 or (hidden is not None
                                                     and weight.shape[1] != hidden):
        raise DataValidationError(f"has shape {tuple(weight.shape)}; expected (1, "
                                  f"{hidden if hidden is not None else 'hidden size'})",
                                  field="weight", path=str(path))
    return weight


# failures of from_pretrained on a folder that is not a (loadable) model
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError)


class ExportedReward:
    """One user's exported reward model, loaded through PEFT.

    ``ExportedReward(folder)`` loads the base named in the adapter (or ``base``: a local path,
    or an already loaded ``AutoModel``, which PEFT then modifies in place), applies the adapter
    with ``peft.PeftModel.from_pretrained`` and the head; :meth:`score` gives rewards. The
    tokenizer (unless given) comes from the same place as the base: ``base`` when it is a path,
    else the folder's ``base_model_name_or_path``.

    Every file of the folder is validated first (:func:`read_head_config`,
    :func:`read_adapter_config`, the tensor files), and a missing or damaged one raises
    :class:`~pluralign.errors.DataValidationError` naming the file and field. The saved files
    cannot enable remote code: ``trust_remote_code`` (run the Python files of a model folder
    that declares ``auto_map``) comes only from this argument, default ``False``.
    """

    def __init__(self, folder: str | Path, *, base: Any = None, tokenizer: Any = None,
                 trust_remote_code: bool = False) -> None:
        from peft import PeftModel
        from safetensors import SafetensorError
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not (folder / HEAD_CONFIG).is_file():
            raise PluralignError(f"{folder} is not an exported pluralign adapter "
                                 f"(no {HEAD_CONFIG})")
        if not isinstance(trust_remote_code, bool):
            raise ConfigError(f"trust_remote_code must be True or False, got "
                              f"{show(trust_remote_code)}")
        self.config = read_head_config(folder)
        lora_config = read_adapter_config(folder)
        _check_adapter_tensors(folder, lora_config)
        source = self.config["base_model_name_or_path"]
        load = {**self.config["load_kwargs"], "trust_remote_code": trust_remote_code}
        errors = (*_LOAD_ERRORS, SafetensorError)
        if base is None or isinstance(base, str | Path):
            where = base or source
            if where is None:
                raise DataValidationError("names no base model; pass base=",
                                          field="base_model_name_or_path",
                                          path=str(folder / HEAD_CONFIG))
            try:
                base = AutoModel.from_pretrained(str(where), **load)
            except errors as exc:
                raise ConfigError(f"cannot load the base model {where} of {folder}: "
                                  f"{str(exc)[:300]}") from None
            source = where
        if tokenizer is None:
            if source is None:
                raise DataValidationError("names no base model to take the tokenizer from; "
                                          "pass tokenizer=", field="base_model_name_or_path",
                                          path=str(folder / HEAD_CONFIG))
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(source), **load)
            except errors as exc:
                raise ConfigError(f"cannot load the tokenizer of {source}: {str(exc)[:300]}"
                                  ) from None
            check_pad_token(tokenizer, self.config["pad_token"], str(source))
        elif tokenizer.pad_token is None:
            check_pad_token(tokenizer, self.config["pad_token"], "the tokenizer")
        self.tokenizer = tokenizer
        _field(folder / HEAD_CONFIG, "max_length", lambda _, v: _check_max_length(v, tokenizer),
               self.config["max_length"])
        hidden = getattr(getattr(base, "config", None), "hidden_size", None)
        self.head = _read_head_weights(folder, hidden if isinstance(hidden, int) else None)
        try:
            self.model = PeftModel.from_pretrained(base, str(folder), config=lora_config).eval()
        except (*errors, TypeError) as exc:
            raise DataValidationError(f"the adapter does not fit the base model "
                                      f"({type(exc).__name__}: {str(exc)[:300]})",
                                      path=str(folder / ADAPTER_WEIGHTS)) from None
        self.user_id = self.config["user_id"]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              batch_size: int = 32) -> np.ndarray:
        """Rewards of ``(prompt, response)`` pairs for this user (float64)."""
        if len(prompts) != len(responses):
            raise PluralignError(f"{len(prompts)} prompts but {len(responses)} responses")
        batch_size = check_int("batch_size", batch_size)
        out = []
        pooling, max_length = self.config["pooling"], self.config["max_length"]
        for start in range(0, len(prompts), batch_size):
            sl = slice(start, start + batch_size)
            batch = pad_right(self.tokenizer, tokenize_pairs(self.tokenizer, prompts[sl],
                                                             responses[sl], max_length))
            mask = batch["attention_mask"]
            kwargs = backbone_inputs(self.model.get_base_model(), batch)
            hidden = self.model(**kwargs).last_hidden_state
            out.append(pool_hidden(hidden, mask, pooling) @ self.head.to(hidden.dtype).T)
        return torch.cat(out).squeeze(-1).double().numpy() if out else np.zeros(0)

