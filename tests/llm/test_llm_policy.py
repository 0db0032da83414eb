"""PersonalizedPolicy: response log-probabilities against a full-logits oracle, the adapters-off
reference against a fresh base model, padding and batch invariance, gradients through the
chunked output layer, generation (seeded, mixed users, no hidden top-k), chat template,
truncation and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from pluralign.errors import ConfigError, PluralignError
from pluralign.llm.policy import PersonalizedPolicy, all_linear_modules
from pluralign.llm.toy import char_tokenizer, tiny_llama

USERS = ["u0", "u1", "u2"]


def make_policy(share: str = "B", seed: int = 0, **kwargs) -> PersonalizedPolicy:
    policy = PersonalizedPolicy(
        tiny_llama(seed=seed),
        char_tokenizer(),
        USERS,
        target_modules="all-linear",
        r=4,
        alpha=8.0,
        share=share,
        seed=seed,
        **kwargs,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in policy.lora.layers():  # non-zero B: each user differs from π0
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=gen))
            layer.lora_A.copy_(0.2 * torch.randn(layer.lora_A.shape, generator=gen))
    return policy


def oracle_logprob(
    policy: PersonalizedPolicy, prompt: str, response, user: int | None
) -> tuple[float, int]:
    """Σ log_softmax(full logits)[y_t] over the response tokens of one unpadded row."""
    enc = policy.encode([prompt], [response])[0]
    ids = torch.tensor([enc["prompt_ids"] + enc["response_ids"]])
    with torch.no_grad():
        if user is None:
            with policy.reference():
                logits = policy.model(input_ids=ids).logits
        else:
            with policy.lora.route(torch.tensor([user])):
                logits = policy.model(input_ids=ids).logits
    logp = logits.double().log_softmax(-1)[0]
    start = len(enc["prompt_ids"])
    total = sum(float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))
    return total, ids.shape[1] - start


PROMPTS = ["hello there", "a", "what is 2 plus 2?", "ok"]
RESPONSES = ["hi, friend", "bcd", "4", "sure thing - yes"]


@pytest.mark.parametrize("share", ["B", "A", "independent", "pooled"])
def test_logprobs_equal_full_logits_oracle_for_every_user(share):
    policy = make_policy(share)
    users = ["u0", "u1", "u2", "u1"]
    got = policy.logprobs(PROMPTS, RESPONSES, users, batch_size=4)
    index = policy.user_index(users).tolist()
    want = [
        oracle_logprob(policy, p, r, i)[0]
        for p, r, i in zip(PROMPTS, RESPONSES, index, strict=True)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    if share != "pooled":  # users really differ
        other = policy.logprobs(PROMPTS, RESPONSES, ["u2", "u0", "u1", "u0"])
        assert np.abs(other - got).max() > 1e-3


def test_reference_is_the_base_model_without_adapters():
    policy = make_policy()
    fresh = tiny_llama(seed=0)  # same seeded base weights, no LoRA at all
    ref = policy.logprobs(PROMPTS, RESPONSES, ["u0"] * 4, reference=True)
    for p, r, got in zip(PROMPTS, RESPONSES, ref, strict=True):
        enc = policy.encode([p], [r])[0]
        ids = torch.tensor([enc["prompt_ids"] + enc["response_ids"]])
        with torch.no_grad():
            logp = fresh(input_ids=ids).logits.double().log_softmax(-1)[0]
        start = len(enc["prompt_ids"])
        want = sum(float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))
        assert got == pytest.approx(want, abs=1e-4)
    assert np.abs(ref - policy.logprobs(PROMPTS, RESPONSES, ["u0"] * 4)).max() > 1e-3


def test_left_and_right_padding_and_batch_composition_give_the_same_logprobs():
    policy = make_policy()
    enc = policy.encode(PROMPTS, RESPONSES)
    users = policy.user_index(["u0", "u1", "u2", "u0"])
    right = policy.collate(enc, padding_side="right")
    left = policy.collate(enc, padding_side="left")
    assert (left["attention_mask"][:, 0] == 0).any()  # really left-padded
    with torch.no_grad():
        lr, nr = policy.sequence_logprobs(**right, user_index=users)
        ll, nl = policy.sequence_logprobs(**left, user_index=users)
        alone = [
            policy.sequence_logprobs(**policy.collate([e]), user_index=users[i : i + 1])[0]
            for i, e in enumerate(enc)
        ]
    torch.testing.assert_close(lr, ll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lr, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert nr.tolist() == nl.tolist() == [len(e["response_ids"]) for e in enc]


def test_gradients_through_the_chunked_output_layer_match_full_logits():
    policy = make_policy(logits_chunk=3)  # many chunks, checkpointed
    enc = policy.encode(PROMPTS, RESPONSES)
    batch = policy.collate(enc)
    users = policy.user_index(["u0", "u1", "u2", "u0"])
    params = [p for _, p in policy.trainable_named_parameters()]
    for p in params:
        p.requires_grad_(True)
    logps, _ = policy.sequence_logprobs(**batch, user_index=users)
    (logps * torch.tensor([1.0, -2.0, 0.5, 1.5])).sum().backward()
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    # oracle: full log-softmax of the whole batch
    with policy.lora.route(users):
        logits = policy.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
    logp = logits.log_softmax(-1)[:, :-1].gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    seq = (logp * batch["response_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(logps.detach(), seq.detach(), rtol=1e-5, atol=1e-5)
    (seq * torch.tensor([1.0, -2.0, 0.5, 1.5])).sum().backward()
    for a, p in zip(ours, params, strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in ours) > 0


def test_reference_pass_has_no_gradient():
    policy = make_policy()
    for _, p in policy.trainable_named_parameters():
        p.requires_grad_(True)
    batch = policy.collate(policy.encode(PROMPTS, RESPONSES))
    ref, _ = policy.sequence_logprobs(**batch, reference=True)
    assert not ref.requires_grad


def test_generation_is_seeded_and_mixed_user_batches_route_each_row():
    policy = make_policy()
    prompts, users = ["abc", "hello", "xyz", "abc"], ["u0", "u1", "u2", "u1"]
    a = policy.generate(prompts, users, n=2, max_new_tokens=6, seed=3)
    b = policy.generate(prompts, users, n=2, max_new_tokens=6, seed=3)
    c = policy.generate(prompts, users, n=2, max_new_tokens=6, seed=4)
    assert a.token_ids == b.token_ids and a.texts == b.texts
    assert a.token_ids != c.token_ids
    # near-greedy sampling: a mixed batch equals each user alone (the adapters follow the rows
    # through the KV-cached steps)
    mixed = policy.generate(prompts, users, max_new_tokens=8, temperature=1e-4, batch_size=4)
    for i, (p, u) in enumerate(zip(prompts, users, strict=True)):
        alone = policy.generate([p], [u], max_new_tokens=8, temperature=1e-4)
        assert mixed.token_ids[i] == alone.token_ids[0]
    ref = policy.generate(prompts, users, max_new_tokens=8, temperature=1e-4, reference=True)
    assert ref.token_ids != mixed.token_ids
    # the reference ignores users
    assert ref.token_ids[0] == ref.token_ids[3]


def test_sampling_has_no_hidden_top_k():
    """transformers applies top_k=50 by default; sampling must come from π itself, so with a
    near-uniform next-token distribution over 74 tokens more than 50 distinct tokens appear."""
    policy = PersonalizedPolicy(
        tiny_llama(seed=5, initializer_range=1e-4),
        char_tokenizer(),
        ["u"],
        target_modules="all-linear",
    )
    out = policy.generate(["a"], ["u"], n=600, max_new_tokens=1, seed=0, batch_size=200)
    distinct = {ids[0] for ids in out.token_ids[0]}
    assert len(distinct) > 55
    capped = policy.generate(
        ["a"], ["u"], n=600, max_new_tokens=1, seed=0, batch_size=200, top_k=10
    )
    assert len({ids[0] for ids in capped.token_ids[0]}) <= 10


def test_generated_token_ids_score_as_given():
    policy = make_policy()
    out = policy.generate(["hello"], ["u1"], n=3, max_new_tokens=5, seed=0)
    for ids in out.token_ids[0]:
        got = policy.logprobs(["hello"], [ids], ["u1"])[0]
        want, n = oracle_logprob(policy, "hello", ids, 1)
        assert n == len(ids)
        assert got == pytest.approx(want, abs=1e-4)


def test_sampling_pass_logprobs_equal_the_full_logits_oracle():
    """Generations.logprobs (read off the sampling pass, KV cache, left padding, mixed users,
    temperature ≠ 1, some rows stopped at EOS) equal a teacher-forced oracle of the same
    policy, for π_u and π0; with EOS made likely, some rows stop early and the padding after
    their EOS is not counted."""
    policy = make_policy()
    eos = policy.tokenizer.eos_token_id
    with torch.no_grad():
        policy._output.bias = None
        policy._output.weight[eos] *= 0.0
        policy._output.weight[eos] += policy._output.weight.mean(0) * 40
    prompts, users = ["hello", "a", "what?"], ["u0", "u2", "u1"]
    for reference in (False, True):
        out = policy.generate(
            prompts,
            users,
            n=3,
            max_new_tokens=6,
            seed=1,
            batch_size=4,
            temperature=1.7,
            reference=reference,
        )
        lengths = set()
        for i, (p, u) in enumerate(zip(prompts, users, strict=True)):
            for ids, got in zip(out.token_ids[i], out.logprobs[i], strict=True):
                want, n = oracle_logprob(policy, p, ids, None if reference else USERS.index(u))
                lengths.add(n)
                assert got == pytest.approx(want, abs=1e-4)
        assert len(lengths) > 1  # rows of several lengths in one batch


def test_kl_to_reference_matches_the_full_logits_oracle_and_the_chain_rule():
    policy = make_policy()
    prompts, users = ["hello", "a", "what?", "ok"], ["u0", "u1", "u2", "u1"]
    out = policy.generate(prompts, users, n=2, max_new_tokens=5, seed=2)
    p, ids, u = out.flat()
    ratio, kl = policy.kl_to_reference(p, ids, u, batch_size=3)
    for k in range(len(p)):
        enc = policy.encode([p[k]], [ids[k]])[0]
        full = torch.tensor([enc["prompt_ids"] + enc["response_ids"]])
        with torch.no_grad(), policy.lora.route(torch.tensor([USERS.index(u[k])])):
            lp = policy.model(input_ids=full).logits.double().log_softmax(-1)[0]
        with torch.no_grad(), policy.reference():
            lq = policy.model(input_ids=full).logits.double().log_softmax(-1)[0]
        start = len(enc["prompt_ids"])
        positions = range(start - 1, full.shape[1] - 1)
        want_kl = sum(float((lp[t].exp() * (lp[t] - lq[t])).sum()) for t in positions)
        want_ratio = sum(float(lp[t, full[0, t + 1]] - lq[t, full[0, t + 1]]) for t in positions)
        assert kl[k] == pytest.approx(want_kl, abs=1e-5)
        assert ratio[k] == pytest.approx(want_ratio, abs=1e-5)
    assert (kl > 0).all()
    # the sampled log-ratio is the log-prob gap of the two policies
    gap = policy.logprobs(p, ids, u) - policy.logprobs(p, ids, u, reference=True)
    np.testing.assert_allclose(ratio, gap, atol=1e-5)


def test_kl_estimators_agree_with_the_exact_sequence_kl_by_enumeration():
    """Chain rule: for one-token responses the mean of either estimator over many samples of
    π_u tends to KL(π_u ‖ π0) summed over the whole vocabulary; the per-token estimator is
    exact for every sample (the KL of the only position), the log-ratio only on average."""
    policy = make_policy()
    with torch.no_grad(), policy.lora.route(torch.tensor([1])):
        ids = torch.tensor([policy.prompt_ids("hey")])
        lp = policy.model(input_ids=ids).logits.double().log_softmax(-1)[0, -1]
    with torch.no_grad(), policy.reference():
        lq = policy.model(input_ids=ids).logits.double().log_softmax(-1)[0, -1]
    exact = float((lp.exp() * (lp - lq)).sum())
    out = policy.generate(["hey"], ["u1"], n=4000, max_new_tokens=1, seed=0, batch_size=500)
    p, tokens, u = out.flat()
    ratio, kl = policy.kl_to_reference(p, tokens, u, batch_size=500)
    np.testing.assert_allclose(kl, exact, rtol=1e-5)
    se = ratio.std() / np.sqrt(ratio.size)
    assert abs(ratio.mean() - exact) < 4 * se


def test_chat_template_is_applied_when_the_tokenizer_has_one():
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}bot:{% endif %}"
    )
    policy = PersonalizedPolicy(tiny_llama(), tok, ["u"], target_modules="all-linear")
    assert policy.prompt_ids("hi") == tok("user: hi\nbot:", add_special_tokens=False)["input_ids"]
    plain = PersonalizedPolicy(
        tiny_llama(), tok, ["u"], target_modules="all-linear", chat_template="none"
    )
    assert plain.prompt_ids("hi") == tok("hi")["input_ids"]


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_response():
    policy = PersonalizedPolicy(
        tiny_llama(),
        char_tokenizer(),
        ["u"],
        target_modules="all-linear",
        max_length=12,
        max_prompt_length=5,
    )
    enc = policy.encode(["abcdefghij"], ["klmnopqrstuv"])[0]
    tok = policy.tokenizer
    assert enc["prompt_ids"] == tok("abcdefghij")["input_ids"][-5:]
    assert enc["response_ids"] == tok("klmnopqrstuv", add_special_tokens=False)["input_ids"][:7]
    assert policy.truncated_ == 1
    policy.encode(["ab"], ["cd"])
    assert policy.truncated_ == 0


def test_bad_input_is_refused():
    policy = make_policy()
    with pytest.raises(PluralignError, match="empty response"):
        policy.logprobs(["a"], [""], ["u0"])
    with pytest.raises(PluralignError, match="unknown user 'nobody'"):
        policy.logprobs(["a"], ["b"], ["nobody"])
    with pytest.raises(PluralignError, match="unknown user"):
        policy.generate(["a"], ["nobody"])
    tok = char_tokenizer()
    tok.pad_token = None
    with pytest.raises(ConfigError, match="no pad token"):
        PersonalizedPolicy(tiny_llama(), tok, ["u"], target_modules="all-linear")
    with pytest.raises(ConfigError, match="transforms its logits"):
        PersonalizedPolicy(
            tiny_llama(logit_scale=0.5), char_tokenizer(), ["u"], target_modules="all-linear"
        )
    with pytest.raises(ConfigError, match="max_prompt_length"):
        PersonalizedPolicy(
            tiny_llama(),
            char_tokenizer(),
            ["u"],
            max_length=8,
            max_prompt_length=8,
            target_modules="all-linear",
        )


def test_all_linear_skips_the_output_layer():
    model = tiny_llama()
    names = all_linear_modules(model)
    assert "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
