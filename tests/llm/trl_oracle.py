"""Test oracle: TRL 1.16's ``DPOTrainer.compute_loss`` (and its LoRA gradients) on a given batch.

Not a test file: tests import :func:`trl_dpo_loss_and_grads` to check pluralign's DPO loss on a
causal LM against TRL's, on the same base weights, LoRA factors and batch.

How the oracle drives TRL
-------------------------
* The model is a ``LlamaForCausalLM`` built from a config (nothing is downloaded), loaded with the
  caller's base ``state_dict`` and cast to ``dtype``. It is handed to ``DPOTrainer`` **with a
  ``peft_config``** (``LoraConfig(r, lora_alpha, target_modules, lora_dropout=0)``): TRL then
  wraps it with ``get_peft_model`` and, having no ``ref_model``, takes as reference the model with
  the adapter **disabled** (``use_adapter(model, None)`` -> ``model.disable_adapter()``), i.e. the
  base model.
  (Passing an already wrapped ``PeftModel`` without ``peft_config`` would make TRL add a ``"ref"``
  adapter copied from the current one, so policy = reference and every log-ratio is zero.)
* After construction the caller's LoRA factors are copied into PEFT's ``lora_A.default.weight``
  ``(r, in)`` / ``lora_B.default.weight`` ``(out, r)``; ``scaling = lora_alpha / r`` (no rsLoRA).
  Every adapted module must be given (both factors), and nothing else.
* ``trainer.compute_loss(trainer.model, batch)`` runs in train mode (``disable_dropout=True``, LoRA
  dropout 0, Llama's ``attention_dropout`` 0), then ``backward()``; the LoRA gradients are returned
  under pluralign's names ``f"{module_name}.lora_A"`` / ``f"{module_name}.lora_B"``, ``module_name``
  the module path inside ``LlamaForCausalLM`` (``"model.layers.0.self_attn.q_proj"``).
* The trainer's ``train_dataset`` is a one-row text dataset that only satisfies the
  constructor; the ``processing_class`` a word-level tokenizer built in code.
  ``DPOTrainer.__init__`` calls ``set_seed(args.seed)``; the oracle saves and restores the torch /
  numpy / ``random`` RNG states so a caller's random stream is not reseeded behind its back.

TRL 1.16's conventions (read from ``trl/trainer/dpo_trainer.py``, checked by
``tests/llm/test_llm_dpo_oracle.py`` against a plain-torch closed form)
------------------------------------------------------------------------------------------------
* Batch layout (``DataCollatorForPreference``): ``input_ids`` / ``attention_mask`` /
  ``completion_mask`` of shape ``(2B, T)``, rows ``[chosen_0..chosen_{B-1}, rejected_0..]``; each
  row is prompt + completion, **right**-padded; ``completion_mask`` is 1 on completion tokens (the
  collator appends EOS to every completion, so the EOS is a completion token).
* Sequence log-prob: ``labels = input_ids`` with ``-100`` where ``completion_mask == 0``; the fused
  head scores hidden state ``t`` against label ``t + 1``, so the sequence log-prob is
  ``sum_{t >= 1} completion_mask[t] * log p(x_t | x_<t)`` -- the last prompt token's prediction of
  the first completion token **is** included; token 0 is never scored (a completion must not start
  at position 0, i.e. the prompt must be non-empty). Plain sum over tokens, no length averaging
  (``ld_alpha=None``).
* The model is called with ``input_ids`` and ``attention_mask`` only (plus ``use_cache=False``):
  **no ``position_ids``**, so Llama uses ``arange(T)`` for every row. That is right for TRL's
  right padding; a left-padded batch would be scored at shifted positions (RoPE), so an
  implementation that left-pads must pass ``position_ids = cumsum(attention_mask) - 1`` to agree.
* ``chosen_logratio = pi_c - ref_c``, ``rejected_logratio = pi_r - ref_r`` (``f_divergence_type
  ="reverse_kl"``), ``delta = chosen_logratio - rejected_logratio``; the reference forward runs
  under ``torch.no_grad()``.
* ``"sigmoid"``: per pair ``-logsigmoid(beta * delta)`` (``label_smoothing`` unused by it).
* ``"ipo"``: **length-normalized**: ``chosen_logratio / n_c - rejected_logratio / n_r`` with
  ``n = completion_mask.sum(1).clamp(min=1)`` (the unshifted mask -- equal to the number of scored
  tokens when the prompt is non-empty), then ``(that - 1 / (2 * beta)) ** 2``.
* The loss is ``per_pair_loss.mean()`` over the ``B`` pairs of the batch (``loss_weights`` default
  ``[1.0]``; no WPO weighting, no MoE aux loss for Llama). ``compute_loss`` ignores
  ``num_items_in_batch``; gradient accumulation and multi-process averaging happen outside it.
* ``loss_type`` may be a string or a list; ``DPOConfig.__post_init__`` turns a string into
  ``[loss_type]``. A list of several types is summed with ``loss_weights``.
* ``fused_lm_head=True``: ``add_fused_lm_head`` (``trl/trainer/utils.py``) patches the forward
  of the ``LlamaForCausalLM`` inside the ``PeftModel``: it runs the backbone (``self.base_model``,
  i.e. ``LlamaModel``, ``use_cache=False``), drops the last position, and computes per-token
  log-probs of the labels with ``trl.kernels.ChunkedLogProbFunction`` (vocab tiles of 32768,
  online logsumexp), returning zeros where the label is ``-100``. For Llama no logit scale or
  softcap applies (``temperature=1``), so mathematically it is ``log_softmax(lm_head(h))[label]``.
  **But the kernel is float32 regardless of the model dtype**: the running max / sum-exp / target
  logit are float32 (``tile.float()``), and the backward forms ``p`` in float32 and accumulates
  the GEMMs in float32.
  So stock TRL is only float32-accurate even with a float64 model (relative ~1e-7 on the loss and
  gradients). ``lm_head="exact"`` (the default) swaps that kernel, for the duration of the call
  only, for the same contract computed by autograd in the model dtype (``_ExactLogProb``);
  everything else -- masks, shift, sums, reference, losses -- is TRL's own code.
  ``lm_head="trl"`` keeps TRL's kernel.
* transformers' own Llama is not float64 either: ``LlamaRMSNorm`` casts its input to **float32**
  (and back), so a float64 Llama is float32-accurate at every norm. Two implementations that run
  the same rows the same way still agree exactly, but a gradient whose upstream scale differs by
  a factor that is not a power of two (a user's mean over 2 pairs vs the same pairs inside a
  mean over 5) is rounded differently (measured: 3e-7 relative on LoRA gradients). Run both
  sides inside :func:`float64_llama` (RMSNorm computed in ``promote_types(dtype, float32)``:
  unchanged for bf16/fp16/fp32) to compare at float64 precision; measured then ~1e-15.
  RoPE ``cos``/``sin`` are still computed in float32 from the integer positions and cast: they
  are identical wherever the positions of the real tokens are, so they do not limit agreement.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
import transformers

__all__ = [
    "LLAMA_LINEAR_MODULES",
    "closed_form_logps",
    "exact_lm_head",
    "float64_llama",
    "tiny_llama_config",
    "tiny_tokenizer",
    "trl_dpo_loss_and_grads",
]

#: Every linear layer of a Llama decoder block (attention and MLP); ``lm_head`` excluded (TRL
#: refuses an adapter on the LM head).
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama_config(**overrides) -> transformers.LlamaConfig:
    """A tiny Llama: vocab 64, hidden 32, 2 layers, 4 heads (2 KV heads), MLP 64, no dropout."""
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def tiny_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer: ``<pad>`` (0), ``<eos>`` (1), ``<unk>`` (2), ``t3``..``t{V-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


class _ExactLogProb:
    """``trl.kernels.ChunkedLogProbFunction``'s contract in plain autograd, in the input dtype.

    ``apply(hidden [N, H], weight [V, H], bias, targets [N], temperature, chunk_size, softcap,
    logit_scale, outputs)`` -> ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``,
    each ``[N]`` (``None`` when not in ``outputs``; ``log_probs`` always).
    """

    @staticmethod
    def apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=("log_probs",),
    ):
        z = hidden @ weight.to(hidden.dtype).T
        if bias is not None:
            z = z + bias.to(z.dtype)
        z = z * logit_scale
        if final_logit_softcapping is not None:
            z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
        z = z / temperature
        log_p = torch.log_softmax(z, dim=-1)
        log_probs = log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
        entropy = log_sum_sq = mean_logits = is_top1 = None
        if "entropy" in outputs:
            entropy = -(log_p.exp() * log_p).sum(-1)
        with torch.no_grad():
            if "log_sum_sq_probs" in outputs:
                log_sum_sq = torch.logsumexp(2 * log_p, dim=-1)
            if "mean_logits" in outputs:
                mean_logits = z.mean(-1)
            if "is_top1" in outputs:
                is_top1 = z.argmax(-1) == targets
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1


@contextlib.contextmanager
def exact_lm_head() -> Iterator[None]:
    """Within the block, TRL's fused LM head computes log-probs exactly (see module docstring)."""
    import trl.trainer.utils as trl_utils

    saved = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = _ExactLogProb
    try:
        yield
    finally:
        trl_utils._ChunkedLogProbFunction = saved


@contextlib.contextmanager
def float64_llama() -> Iterator[None]:
    """Within the block, ``LlamaRMSNorm`` keeps float64 (it casts to float32 otherwise; module
    docstring). Patches the class, so it applies to every Llama, TRL's and the caller's."""
    from transformers.models.llama import modeling_llama

    cls = modeling_llama.LlamaRMSNorm
    saved = cls.forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = saved


@contextlib.contextmanager
def _keep_rng_state() -> Iterator[None]:
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()  # noqa: NPY002 (the global one)
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)


def _peft_name(module_name: str, factor: str) -> str:
    return f"base_model.model.{module_name}.{factor}.default.weight"


def trl_dpo_loss_and_grads(
    model_config: transformers.PretrainedConfig,
    state_dict: Mapping[str, torch.Tensor],
    lora: Mapping,
    lora_weights: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    *,
    beta: float,
    loss_type: str,
    dtype: torch.dtype = torch.float64,
    lm_head: str = "exact",
) -> tuple[float, dict[str, torch.Tensor]]:
    """TRL's DPO loss of ``batch`` and its gradients w.r.t. every LoRA factor.

    Parameters
    ----------
    model_config:
        A ``LlamaConfig`` (e.g. :func:`tiny_llama_config`); its ``vocab_size`` sizes the tokenizer.
    state_dict:
        Base weights of ``LlamaForCausalLM(model_config)`` (loaded strictly, cast to ``dtype``).
    lora:
        ``{"r": int, "alpha": float, "target_modules": [...]}`` -> ``peft.LoraConfig``.
    lora_weights:
        ``{f"{module_name}.lora_A": (r, in), f"{module_name}.lora_B": (out, r)}`` for every module
        PEFT adapts (checked both ways).
    batch:
        ``input_ids``, ``attention_mask``, ``completion_mask``, each ``(2B, T)``, TRL's layout
        (chosen rows then rejected rows, right padding; module docstring).
    beta, loss_type:
        ``DPOConfig(beta=..., loss_type=...)``; ``"sigmoid"`` and ``"ipo"`` are the types checked.
    dtype:
        Model and adapter dtype.
    lm_head:
        ``"exact"`` (default): TRL's float32 fused log-prob kernel replaced by the same math in
        ``dtype``; ``"trl"``: TRL's own kernel (float32-accurate only).

    Returns
    -------
    ``(loss, grads)``: the loss as a Python float, and ``{name: grad}`` keyed like ``lora_weights``.
    """
    import datasets
    import peft
    import trl

    if lm_head not in ("exact", "trl"):
        raise ValueError(f"lm_head must be 'exact' or 'trl', got {lm_head!r}")
    model = transformers.LlamaForCausalLM(model_config)
    model.load_state_dict(dict(state_dict), strict=True)
    model = model.to(dtype)
    peft_config = peft.LoraConfig(
        r=int(lora["r"]),
        lora_alpha=float(lora["alpha"]),
        target_modules=list(lora["target_modules"]),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    tokenizer = tiny_tokenizer(model_config.vocab_size)
    dataset = datasets.Dataset.from_dict(
        {"prompt": ["t3 t4"], "chosen": [" t5<eos>"], "rejected": [" t6<eos>"]}
    )
    with tempfile.TemporaryDirectory() as out_dir, _keep_rng_state(), warnings.catch_warnings():
        # transformers' own deprecation notices about TRL's config fields, not ours
        warnings.simplefilter("ignore", FutureWarning)
        args = trl.DPOConfig(
            output_dir=out_dir,
            beta=float(beta),
            loss_type=[loss_type],
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            precompute_ref_log_probs=False,
            disable_dropout=True,
            per_device_train_batch_size=1,
            max_length=None,
            logging_strategy="no",
            save_strategy="no",
            dataloader_num_workers=0,
        )
        trainer = trl.DPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    policy = trainer.model
    if not isinstance(policy, peft.PeftModel) or trainer.ref_model is not None:
        raise RuntimeError("TRL did not take the adapter-disabled model as its reference")
    params = dict(policy.named_parameters())
    # PEFT keeps float64 adapters for a float64 base; cast anyway so the whole run is in ``dtype``
    for name, p in params.items():
        if ".lora_" in name:
            p.data = p.data.to(dtype)
    peft_names = {n for n, p in params.items() if p.requires_grad}
    wanted = {_peft_name(k.rsplit(".", 1)[0], k.rsplit(".", 1)[1]): k for k in lora_weights}
    if set(wanted) != peft_names:
        raise ValueError(
            f"lora_weights do not match PEFT's adapted modules: missing "
            f"{sorted(peft_names - set(wanted))[:4]}, unknown "
            f"{sorted(set(wanted) - peft_names)[:4]}"
        )
    with torch.no_grad():
        for peft_name, ours in wanted.items():
            target = params[peft_name]
            value = torch.as_tensor(lora_weights[ours])
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{ours}: shape {tuple(value.shape)}, PEFT's "
                    f"{peft_name} is {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))
            target.grad = None
    inputs = {
        k: torch.as_tensor(batch[k]) for k in ("input_ids", "attention_mask", "completion_mask")
    }
    policy.train()
    head = exact_lm_head() if lm_head == "exact" else contextlib.nullcontext()
    with head:
        loss = trainer.compute_loss(policy, inputs)
        loss.backward()
    grads = {ours: params[peft_name].grad.detach().clone() for peft_name, ours in wanted.items()}
    return float(loss.detach()), grads


def closed_form_logps(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row ``sum_t completion_mask[t] log p(x_t | x_<t)`` with plain torch (no TRL)."""
    ids, mask = batch["input_ids"], batch["completion_mask"]
    out = model(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        position_ids=position_ids,
        use_cache=False,
    )
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1)
    tok = log_p.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * mask[:, 1:].to(tok.dtype)).sum(1)
