"""DPO on a causal LM checked against TRL 1.16's ``DPOTrainer.compute_loss`` (tests/trl_oracle.py).

First the oracle itself is checked against a plain-torch closed form of the DPO / IPO losses on a
PEFT model (so a later mismatch with pluralign is pluralign's, not a misread TRL convention); then
pluralign's :class:`~pluralign.llm.DPOTrainer` loss on a batch mixing two users is compared, user
by user, with TRL run on that user's LoRA factors.

Precision: everything runs in float64 inside :func:`trl_oracle.float64_llama` (transformers'
``LlamaRMSNorm`` otherwise computes in float32) with TRL's fused LM-head kernel replaced by exact
math (it is float32 inside; ``lm_head="exact"``), so the two sides can agree to ~1e-15.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

import peft
import transformers
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl_oracle import (
    LLAMA_LINEAR_MODULES,
    closed_form_logps,
    float64_llama,
    tiny_llama_config,
    tiny_tokenizer,
    trl_dpo_loss_and_grads,
)

from pluralign.llm.dpo import DPOTrainer, EncodedDPOPairs, dpo_loss
from pluralign.llm.policy import PersonalizedPolicy

R, ALPHA = 4, 8.0
LORA = {"r": R, "alpha": ALPHA, "target_modules": list(LLAMA_LINEAR_MODULES)}
BETA = {"sigmoid": 0.5, "ipo": 0.1}


def _base(seed: int = 0) -> tuple[transformers.LlamaConfig, dict[str, torch.Tensor], list]:
    """Config, base weights and the adapted linear modules (name, in, out) of a tiny Llama."""
    config = tiny_llama_config()
    with torch.random.fork_rng():  # the caller's RNG stream is left alone
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    modules = [
        (n, m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_LINEAR_MODULES
    ]
    return config, {k: v.clone() for k, v in model.state_dict().items()}, modules


def _random_lora(modules, seed: int, scale: float = 0.4) -> dict[str, torch.Tensor]:
    """Non-zero factors (B = 0 would make the policy the reference)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, d_in, d_out in modules:
        out[f"{name}.lora_A"] = scale * torch.randn(R, d_in, generator=g, dtype=torch.float64)
        out[f"{name}.lora_B"] = scale * torch.randn(d_out, R, generator=g, dtype=torch.float64)
    return out


def _examples(seed: int, n: int, vocab: int = 64) -> list[dict[str, list[int]]]:
    """Pairs of varied prompt / completion lengths (tokens 3..vocab-1, EOS 1 ends completions)."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    out = []
    for i in range(n):
        p, c, r = 2 + (3 * i) % 5, 1 + (2 * i) % 4, 1 + (5 * i + 2) % 5
        out.append({"prompt_ids": ids(p), "chosen_ids": [*ids(c), 1], "rejected_ids": [*ids(r), 1]})
    return out


def _trl_batch(examples) -> dict[str, torch.Tensor]:
    """TRL's own collator: [chosen rows, rejected rows], right padding."""
    return DataCollatorForPreference(pad_token_id=0)(examples)


def _peft_model(config, state_dict, lora_weights) -> peft.PeftModel:
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state_dict)
    model = peft.get_peft_model(
        model.to(torch.float64),
        peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=list(LLAMA_LINEAR_MODULES), lora_dropout=0.0
        ),
    )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in lora_weights.items():
            module, factor = key.rsplit(".", 1)
            params[f"base_model.model.{module}.{factor}.default.weight"].copy_(value)
    return model


def _closed_form_loss(model: peft.PeftModel, batch, *, beta: float, loss_type: str):
    policy = closed_form_logps(model, batch)
    with torch.no_grad(), model.disable_adapter():
        ref = closed_form_logps(model, batch)
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    if loss_type == "sigmoid":
        per_pair = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    else:
        n_c, n_r = batch["completion_mask"].sum(1).to(torch.float64).chunk(2)
        per_pair = ((pc - rc) / n_c - (pr - rr) / n_r - 1 / (2 * beta)) ** 2
    return per_pair.mean()


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    scale = max(v.abs().max().item() for v in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_trl_oracle_matches_closed_form(loss_type):
    """TRL's loss and LoRA gradients equal mean(-logsigmoid(β Δ)) / IPO's length-normalized
    square computed by hand in float64 (reference = adapter disabled, last prompt token's
    prediction of the first completion token included, mean over pairs)."""
    config, state_dict, modules = _base()
    lora = _random_lora(modules, seed=1)
    batch = _trl_batch(_examples(seed=2, n=3))
    beta = BETA[loss_type]
    assert batch["attention_mask"].min() == 0  # the batch really has padding

    with float64_llama():
        model = _peft_model(config, state_dict, lora)
        want = _closed_form_loss(model, batch, beta=beta, loss_type=loss_type)
        want.backward()
        loss, grads = trl_dpo_loss_and_grads(
            config, state_dict, LORA, lora, batch, beta=beta, loss_type=loss_type
        )
    params = dict(model.named_parameters())
    want_grads = {
        k: params[
            f"base_model.model.{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.default.weight"
        ].grad
        for k in lora
    }
    assert set(grads) == set(lora)
    assert abs(loss - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
    assert _max_rel(grads, want_grads) <= 1e-10
    if loss_type == "sigmoid":  # a non-zero adapter: the reference is not a copy of the policy
        assert abs(loss - math.log(2)) > 1e-3

    # TRL's stock fused LM-head kernel is float32 inside: same loss, to float32 accuracy only
    with float64_llama():
        loss32, grads32 = trl_dpo_loss_and_grads(
            config, state_dict, LORA, lora, batch, beta=beta, loss_type=loss_type, lm_head="trl"
        )
    assert abs(loss32 - want.item()) <= 2e-6 * max(1.0, abs(want.item()))
    assert _max_rel(grads32, want_grads) <= 2e-5


# ---------------------------------------------------------------------- pluralign vs TRL
USERS = ["u0", "u1"]
MIXED_USERS = np.array([0, 1, 1, 0, 1, 0])  # the rows of the batch: two users interleaved
# pluralign's float32 fallback: what its LM head's float32 cast allows (measured ~2e-7)
LOOSE = 2e-6


def _policy(
    config, state_dict, share: str, seed: int = 7, dtype: torch.dtype = torch.float64
) -> PersonalizedPolicy:
    """The tiny Llama with every linear layer of attention and MLP adapted, and random
    non-zero factors for every user."""
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state_dict)
    policy = PersonalizedPolicy(
        model.to(dtype),
        tiny_tokenizer(config.vocab_size),
        USERS,
        target_modules="all-linear",
        r=R,
        alpha=ALPHA,
        share=share,
        chat_template="none",
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in policy.lora.layers():
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return policy


def _pairs(examples, users: np.ndarray) -> EncodedDPOPairs:
    """The same pairs as TRL's examples, as pluralign's encoded rows."""
    return EncodedDPOPairs(
        prompts=[f"prompt {i}" for i in range(len(examples))],
        chosen=[{"prompt_ids": e["prompt_ids"], "response_ids": e["chosen_ids"]} for e in examples],
        rejected=[
            {"prompt_ids": e["prompt_ids"], "response_ids": e["rejected_ids"]} for e in examples
        ],
        user_index=np.asarray(users, dtype=np.int64),
        users=[USERS[u] for u in users],
    )


def _user_weights(policy: PersonalizedPolicy, user: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in policy.lora.layers():
        a, b = layer.user_factors(user)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a.detach().clone(), b.detach().clone()
    return out


def _composed_row_losses(policy, data, rows, *, beta, loss_type, padding_side):
    """The per-pair losses from pluralign's public pieces, with a choice of padding side."""
    batch = data.batch(rows, policy, padding_side=padding_side)
    batch.pop("margins")
    logps, tokens = policy(**batch)
    plain = {k: v for k, v in batch.items() if k != "user_index"}
    reference, _ = policy.sequence_logprobs(**plain, reference=True)
    ratios = logps - reference.to(logps.dtype)
    k = len(rows)
    return dpo_loss(
        ratios[:k],
        ratios[k:],
        beta=beta,
        loss_type=loss_type,
        chosen_tokens=tokens[:k],
        rejected_tokens=tokens[k:],
    )


def _lora_grads(policy) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in policy.lora.lora_parameters()}


def _zero_grads(policy) -> None:
    for _, p in policy.lora.lora_parameters():
        p.grad = None


def _compare_with_trl(
    share: str, loss_type: str, dtype: torch.dtype = torch.float64, lm_head: str = "exact"
) -> dict[str, float]:
    """pluralign's training loss of a mixed two-user batch and its gradients vs TRL's per user.

    The batch loss is the mean over its N pairs, so with user ``u``'s n_u pairs and TRL's mean
    L_u over them: L = Σ_u (n_u/N) L_u, and since user u's rows touch only u's factors (and
    the shared ones): ∂L/∂(u's own factor) = (n_u/N) ∂L_u/∂(that factor), ∂L/∂(shared factor)
    = Σ_u (n_u/N) ∂L_u/∂(shared factor). Returns the max differences (abs and relative)."""
    config, state_dict, modules = _base()
    beta = BETA[loss_type]
    examples = _examples(seed=2, n=len(MIXED_USERS))
    rows = list(range(len(MIXED_USERS)))
    n_total = len(rows)
    exact = float64_llama() if dtype == torch.float64 else contextlib.nullcontext()
    with exact:
        policy = _policy(config, state_dict, share, dtype=dtype)
        # "all-linear" adapts exactly the modules TRL's LoraConfig targets
        assert set(policy.lora.module_names) == {n for n, _, _ in modules}
        data = _pairs(examples, MIXED_USERS)
        policy.train(True)
        trainer = DPOTrainer(beta=beta, loss_type=loss_type)
        row_losses = trainer._row_losses(policy, policy, data, rows, torch.device("cpu"))
        loss = row_losses.mean()
        loss.backward()
        grads = _lora_grads(policy)

        per_user = {}
        for u in range(len(USERS)):
            mine = [i for i in rows if MIXED_USERS[i] == u]
            batch = _trl_batch([examples[i] for i in mine])
            per_user[u] = (
                len(mine),
                *trl_dpo_loss_and_grads(
                    config,
                    state_dict,
                    LORA,
                    _user_weights(policy, u),
                    batch,
                    beta=beta,
                    loss_type=loss_type,
                    dtype=dtype,
                    lm_head=lm_head,
                ),
            )

    want = sum(n / n_total * lu for n, lu, _ in per_user.values())
    diffs = {"loss": abs(loss.item() - want), "loss_value": want}
    diffs["user_loss"] = max(
        abs(row_losses[torch.as_tensor(u == MIXED_USERS)].mean().item() - lu)
        for u, (_, lu, _) in per_user.items()
    )
    # relative to the loss's size (IPO's is ~(1/(2β))² = 25)
    scale = max(1.0, *(abs(lu) for _, lu, _ in per_user.values()))
    diffs["loss_rel"], diffs["user_loss_rel"] = diffs["loss"] / scale, diffs["user_loss"] / scale
    grad_abs = grad_scale = 0.0
    for name, layer in policy.lora.layers():
        for factor, per in (("lora_A", layer.per_user_A), ("lora_B", layer.per_user_B)):
            key = f"{name}.{factor}"
            got = grads[key]
            weighted = [n / n_total * g[key] for n, _, g in per_user.values()]
            expected = torch.stack(weighted) if per else sum(weighted)[None]
            assert got.shape == expected.shape, key
            grad_abs = max(grad_abs, (got - expected).abs().max().item())
            grad_scale = max(grad_scale, expected.abs().max().item())
    diffs.update(grad=grad_abs, grad_rel=grad_abs / grad_scale, dtype=str(row_losses.dtype))
    return diffs


@pytest.mark.parametrize("share", ["B", "independent"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_match_trl(loss_type, share):
    """pluralign's DPO / IPO loss of a batch mixing two users, and its gradients in every LoRA
    factor, equal TRL's DPOTrainer.compute_loss run per user on that user's factors (float64,
    reference = adapters off)."""
    d = _compare_with_trl(share, loss_type)
    print(f"\n{loss_type}/{share}: {d}")
    # always: agreement to float32 accuracy at least
    assert d["loss_rel"] <= LOOSE and d["user_loss_rel"] <= LOOSE
    assert d["grad_rel"] <= 10 * LOOSE
    assert d["dtype"] == str(torch.float64)  # float64 log-probs end to end
    assert d["loss_rel"] <= 1e-12 and d["user_loss_rel"] <= 1e-12
    assert d["grad_rel"] <= 1e-10


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_left_padding_equals_right(loss_type):
    """The same mixed batch padded on the left or on the right gives the same pluralign loss
    and gradients (position ids follow the attention mask), and the composed public pieces
    equal the trainer's own per-row losses."""
    config, state_dict, _ = _base()
    beta = BETA[loss_type]
    examples = _examples(seed=3, n=len(MIXED_USERS))
    rows = list(range(len(MIXED_USERS)))
    out = {}
    with float64_llama():
        policy = _policy(config, state_dict, "B")
        policy.train(True)
        data = _pairs(examples, MIXED_USERS)
        trainer_losses = (
            DPOTrainer(beta=beta, loss_type=loss_type)
            ._row_losses(policy, policy, data, rows, torch.device("cpu"))
            .detach()
        )
        for side in ("right", "left"):
            _zero_grads(policy)
            losses = _composed_row_losses(
                policy, data, rows, beta=beta, loss_type=loss_type, padding_side=side
            )
            losses.mean().backward()
            out[side] = (losses.detach(), _lora_grads(policy))
    assert torch.equal(out["right"][0], trainer_losses)
    assert data.batch(rows, policy, padding_side="left")["attention_mask"][:, 0].min() == 0
    (right, g_right), (left, g_left) = out["right"], out["left"]
    tol = 1e-12 if right.dtype == torch.float64 else LOOSE
    loss_diff = (right - left).abs().max().item()
    grad_rel = _max_rel(g_left, g_right)
    print(f"\n{loss_type} left vs right: loss {loss_diff:.3g}, grad rel {grad_rel:.3g}")
    assert loss_diff <= tol * max(1.0, right.abs().max().item())
    assert grad_rel <= 10 * tol


def test_dpo_float32_matches_stock_trl():
    """The everyday regime, nothing patched: a float32 model against TRL's own float32 fused
    LM-head kernel agree to float32 rounding."""
    d = _compare_with_trl("B", "sigmoid", dtype=torch.float32, lm_head="trl")
    print(f"\nfloat32 sigmoid/B vs stock TRL: {d}")
    assert d["dtype"] == str(torch.float32)
    assert d["loss_rel"] <= LOOSE and d["user_loss_rel"] <= LOOSE
    assert d["grad_rel"] <= 10 * LOOSE
