"""Best-of-n, pool estimates, rejection sampling and SFT (pluralign.llm.sampling), each checked
against an independent oracle: brute-force enumeration of every ordered draw, known limits of
best-of-n, log-probabilities recomputed from merged LoRA weights on a plain copy of the model,
and rewards / uncertainty norms recomputed in numpy from the reward model's features."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pluralign.errors import ConfigError, PluralignError
from pluralign.llm.policy import PersonalizedPolicy
from pluralign.llm.reward_model import PersonalizedRewardModel
from pluralign.llm.sampling import (
    SFTTrainer,
    best_of_n,
    best_of_n_kl_bound,
    evaluate_policy,
    multistep_rejection_sampling,
    pool_estimate,
    select_best,
)
from pluralign.llm.toy import GOLD_REWARDS, char_tokenizer, tiny_llama

USERS = ["vowels", "digits"]
LLAMA = {
    "hidden_size": 16,
    "layers": 1,
    "heads": 2,
    "kv_heads": 1,
    "intermediate_size": 32,
    "seed": 0,
}
PROMPTS = ["Hello there", "Tell me more"]


# ---------------------------------------------------------------------- tiny models
def _randomize(module, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.trainable_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _policy(share: str = "B", randomize: int | None = None) -> PersonalizedPolicy:
    policy = PersonalizedPolicy(
        tiny_llama(**LLAMA),
        char_tokenizer(),
        USERS,
        target_modules="all-linear",
        r=2,
        share=share,
        max_length=64,
    )
    if randomize is not None:
        _randomize(policy, randomize, 0.5)
    return policy


def _reward_model(seed: int = 1) -> PersonalizedRewardModel:
    from transformers import BertConfig, BertModel

    tok = char_tokenizer()
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=128,
        )
    )
    model = PersonalizedRewardModel(bert, tok, USERS, r=2, max_length=64)
    _randomize(model, seed, 0.5)
    return model


def _merged(policy: PersonalizedPolicy, user: int | None):
    """A plain LlamaForCausalLM with user ``user``'s LoRA merged into its weights
    (``W + (α/r)·B_u A_u``), or the bare base model for ``None``: an oracle that shares
    nothing with the policy's routed, chunked forward pass."""
    plain = tiny_llama(**LLAMA).double()
    if user is None:
        return plain
    with torch.no_grad():
        for name, layer in policy.lora.layers():
            a = layer.lora_A[user if layer.lora_A.shape[0] > 1 else 0].double()
            b = layer.lora_B[user if layer.lora_B.shape[0] > 1 else 0].double()
            plain.get_submodule(name).weight += layer.alpha / layer.r * (b @ a)
    return plain


def _oracle_logprobs(
    policy: PersonalizedPolicy, prompts, responses, users, *, reference: bool = False
) -> np.ndarray:
    """``Σ_t log softmax(logits)[y_t]`` over response tokens, one unpadded row at a time, from
    the full logits of the merged plain model."""
    models = {}
    out = []
    for p, y, u in zip(prompts, responses, users, strict=True):
        key = None if reference else USERS.index(u)
        if key not in models:
            models[key] = _merged(policy, key)
        prompt = policy.tokenizer(p)["input_ids"]
        if isinstance(y, str):
            y = policy.tokenizer(y, add_special_tokens=False)["input_ids"] + [
                policy.tokenizer.eos_token_id
            ]
        ids = torch.tensor([list(prompt) + list(y)])
        with torch.no_grad():
            logp = torch.log_softmax(models[key](input_ids=ids).logits[0].double(), -1)
        out.append(sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(y)))
    return np.array(out)


# ---------------------------------------------------------------------- brute-force pools
def _brute(rewards, gold, n, choose):
    """Exact output distribution of ``choose(draw)`` (an index into the draw) over all ``P^n``
    equally likely ordered draws, with its expected gold reward and ``KL(q ‖ uniform)``."""
    size = len(rewards)
    q = np.zeros(size)
    for draw in itertools.product(range(size), repeat=n):
        q[draw[choose(np.array(draw))]] += 1.0
    q /= size**n
    nz = q > 0
    return q, float(q @ gold), float(np.sum(q[nz] * np.log(q[nz] * size)))


def _first_argmax(values) -> int:
    values = list(values)
    best = max(values)
    return next(j for j, v in enumerate(values) if v == best)


def _mahalanobis(diff, m):
    return math.sqrt(float(diff @ np.linalg.solve(m, diff)))


def _pessimism_problem(size=5, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(size, dim))
    root = rng.normal(size=(dim, dim))
    m = root @ root.T + 0.5 * np.eye(dim)
    m_inv = np.linalg.inv(m)

    def norms_of(idx):
        diff = phi[idx] - phi[idx].mean(axis=1, keepdims=True)
        return np.sqrt(np.einsum("...i,ij,...j->...", diff, m_inv, diff))

    def norms_loop(draw):
        centre = phi[draw].mean(axis=0)
        return [_mahalanobis(phi[i] - centre, m) for i in draw]

    return rng.normal(size=size), rng.normal(size=size), norms_of, norms_loop


def _mc_distribution(rewards, n, **kwargs):
    """The Monte-Carlo output distribution of ``pool_estimate`` read through one-hot gold
    rewards (same seed, so the same draws every call)."""
    eye = np.eye(len(rewards))
    return np.array([pool_estimate(rewards, eye[i], n, **kwargs)[0] for i in range(len(rewards))])


def test_best_of_n_kl_bound_values():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert best_of_n_kl_bound(8) == pytest.approx(math.log(8) - 7 / 8, abs=1e-15)


@pytest.mark.parametrize("size,n,seed", [(5, 3, 0), (4, 4, 1), (6, 2, 2), (5, 1, 3)])
def test_pool_estimate_exact_equals_enumeration_distinct_rewards(size, n, seed):
    rng = np.random.default_rng(seed)
    rewards, gold = rng.normal(size=size), rng.normal(size=size)
    _, value, kl = _brute(rewards, gold, n, lambda d: _first_argmax(rewards[d]))
    got = pool_estimate(rewards, gold, n)
    assert got[0] == pytest.approx(value, abs=1e-12)
    assert got[1] == pytest.approx(kl, abs=1e-12)
    # distinct scores: the KL is the best-of-n value log n − (n−1)/n only in the limit P → ∞,
    # and always below it for a finite pool
    assert kl <= best_of_n_kl_bound(n) + 1e-12


@pytest.mark.parametrize(
    "rewards,n",
    [
        ([0.3, 1.0, 0.2, 1.0, 0.5], 3),
        ([1.0, 0.0, 1.0, 0.0, 1.0], 2),
        ([0.0, 0.0, 2.0, 1.0, 1.0], 3),
    ],
)
def test_pool_estimate_exact_equals_enumeration_tied_rewards(rewards, n):
    rewards = np.array(rewards)
    gold = np.random.default_rng(7).normal(size=rewards.size)  # tied items differ in gold
    _, value, kl = _brute(rewards, gold, n, lambda d: select_best(rewards[d][None])[0])
    got = pool_estimate(rewards, gold, n)
    assert got[0] == pytest.approx(value, abs=1e-12)
    assert got[1] == pytest.approx(kl, abs=1e-12)


@pytest.mark.parametrize(
    "n,expected_max", [(2, 1 / math.sqrt(math.pi)), (3, 3 / (2 * math.sqrt(math.pi))), (4, None)]
)
def test_pool_estimate_large_pool_limits(n, expected_max):
    """P = 20000 distinct rewards: KL → log n − (n−1)/n, and on a (quantile) standard-normal
    pool the expected reward → E max of n standard normals."""
    from scipy.stats import norm

    size = 20000
    pool = norm.ppf((np.arange(size) + 0.5) / size)
    pool = pool[np.random.default_rng(0).permutation(size)]
    value, kl = pool_estimate(pool, pool, n)
    assert abs(kl - (math.log(n) - (n - 1) / n)) < 1e-4  # measured: ~3e-9
    if expected_max is not None:
        assert abs(value - expected_max) < 1e-4  # measured: ~1e-5


def test_pool_estimate_pessimism_needs_norms():
    with pytest.raises(PluralignError, match="norms_of"):
        pool_estimate(np.zeros(3), np.zeros(3), 2, pessimism=1.0)


def _within_se(mc_q, exact_q, draws, k=4.5):
    se = np.sqrt(np.maximum(exact_q * (1 - exact_q), 1e-12) / draws)
    return np.abs(mc_q - exact_q) <= k * se + 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_pool_estimate_pessimism_agrees_with_enumeration(seed):
    rewards, gold, norms_of, norms_loop = _pessimism_problem(seed=seed)
    n, beta, draws = 3, 1.0, 40000

    def pessimistic(draw):
        return _first_argmax(np.array(rewards[draw]) - beta * np.array(norms_loop(draw)))

    q, value, kl = _brute(rewards, gold, n, pessimistic)
    q_plain, _, _ = _brute(rewards, gold, n, lambda d: _first_argmax(rewards[d]))
    assert np.abs(q - q_plain).max() > 0.02  # pessimism changes the choice here
    mc_q = _mc_distribution(rewards, n, norms_of=norms_of, pessimism=beta, draws=draws, seed=3)
    assert _within_se(mc_q, q, draws).all(), (mc_q, q)
    got_value, got_kl = pool_estimate(
        rewards, gold, n, norms_of=norms_of, pessimism=beta, draws=draws, seed=3
    )
    se_value = math.sqrt(max(q @ gold**2 - value**2, 1e-12) / draws)
    assert abs(got_value - value) < 4.5 * se_value
    log_ratio = np.log(np.where(q > 0, q * len(q), 1.0))
    se_kl = math.sqrt(max(q @ log_ratio**2 - kl**2, 1e-12) / draws)
    assert abs(got_kl - kl) < 4.5 * se_kl + len(q) / draws  # plug-in bias ~ (P−1)/(2·draws)


def test_pool_estimate_vanishing_pessimism_is_the_exact_value():
    rewards, gold, norms_of, _ = _pessimism_problem(seed=4)
    n, draws = 3, 40000
    q, value, kl = _brute(rewards, gold, n, lambda d: _first_argmax(rewards[d]))
    exact = pool_estimate(rewards, gold, n)
    assert exact == pytest.approx((value, kl), abs=1e-12)
    mc_q = _mc_distribution(rewards, n, norms_of=norms_of, pessimism=1e-9, draws=draws, seed=5)
    assert _within_se(mc_q, q, draws).all(), (mc_q, q)
    got_value, _ = pool_estimate(
        rewards, gold, n, norms_of=norms_of, pessimism=1e-9, draws=draws, seed=5
    )
    assert abs(got_value - value) < 4.5 * math.sqrt((q @ gold**2 - value**2) / draws)


def test_pool_estimate_huge_pessimism_picks_the_candidate_closest_to_the_mean():
    rewards, gold, norms_of, norms_loop = _pessimism_problem(seed=6)
    n, draws = 3, 40000

    def closest(draw):
        norms = norms_loop(draw)
        return _first_argmax([-v for v in norms])

    q, value, _ = _brute(rewards, gold, n, closest)
    q_plain, _, _ = _brute(rewards, gold, n, lambda d: _first_argmax(rewards[d]))
    assert np.abs(q - q_plain).max() > 0.05
    mc_q = _mc_distribution(rewards, n, norms_of=norms_of, pessimism=1e8, draws=draws, seed=2)
    assert _within_se(mc_q, q, draws).all(), (mc_q, q)
    got_value, _ = pool_estimate(
        rewards, gold, n, norms_of=norms_of, pessimism=1e8, draws=draws, seed=2
    )
    assert abs(got_value - value) < 4.5 * math.sqrt((q @ gold**2 - value**2) / draws)


# ---------------------------------------------------------------------- select_best
@pytest.mark.parametrize("seed", range(20))
def test_select_best_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    m, n = rng.integers(1, 6), rng.integers(1, 7)
    rewards = rng.integers(0, 3, size=(m, n)).astype(float)  # many ties
    norms = rng.integers(0, 3, size=(m, n)).astype(float)
    beta = float(rng.choice([0.5, 1.0, 2.0]))
    plain = [_first_argmax(row) for row in rewards]
    pess = [_first_argmax(r - beta * v) for r, v in zip(rewards, norms, strict=True)]
    assert select_best(rewards).tolist() == plain
    assert select_best(rewards, norms, beta).tolist() == pess
    assert select_best(rewards, norms, 0.0).tolist() == plain
    with pytest.raises(PluralignError, match="norms"):
        select_best(rewards, None, beta)


# ---------------------------------------------------------------------- best_of_n
@pytest.fixture(scope="module")
def bon_setup():
    """A policy with random LoRA, a reward model with random LoRA/head, and the numpy ``M``
    of the last-layer confidence set built from the reward model's features. The uncertainty
    object is given that ``M`` through ConfidenceSet's constructor, so these tests do not
    depend on ``LastLayerUncertainty.fit`` (tests/llm/test_llm_uncertainty.py checks it)."""
    from pluralign.confidence import ConfidenceSet
    from pluralign.data.loaders import TextPreferences
    from pluralign.llm.uncertainty import LastLayerUncertainty

    policy = _policy(randomize=3)
    model = _reward_model()
    rng = np.random.default_rng(0)
    chars = list("abcdefgh ijk0123 XYZ!?")
    texts = ["".join(rng.choice(chars, size=rng.integers(3, 12))) for _ in range(24)]
    prefs = TextPreferences(
        prompts=[PROMPTS[i % 2] for i in range(12)],
        chosen=texts[:12],
        rejected=texts[12:],
        users=np.array([USERS[i % 2] for i in range(12)]),
    )
    lam = 0.3
    delta = model.features(prefs.prompts, prefs.chosen, list(prefs.users)) - model.features(
        prefs.prompts, prefs.rejected, list(prefs.users)
    )
    m = delta.T @ delta / len(delta) + lam * np.eye(delta.shape[1])
    head = model.head.weight.detach().double().numpy().ravel()
    unc = LastLayerUncertainty(beta=1.0, lam=lam)
    unc.confidence_ = ConfidenceSet(
        head, m, 1.0, lam=lam, n=len(delta), kind="design", bound_feature=1.0, bound_theta=1.0
    )
    return policy, model, unc, m


def _candidate_arrays(model, result):
    """Scores and features of every candidate, recomputed one call per candidate."""
    rewards, phis = [], []
    for p, u, group in zip(
        result.candidates.prompts, result.candidates.users, result.candidates.texts, strict=True
    ):
        group = [t if t else " " for t in group]  # empty samples are scored as " "
        rewards.append(model.score([p] * len(group), group, [u] * len(group)))
        phis.append(model.features([p] * len(group), group, [u] * len(group)))
    return np.array(rewards), np.array(phis)


def test_best_of_n_picks_the_argmax_of_the_reward(bon_setup):
    policy, model, _, _ = bon_setup
    n = 6
    result = best_of_n(policy, model, PROMPTS, USERS, n=n, max_new_tokens=8, seed=11)
    again = policy.generate(PROMPTS, USERS, n=n, max_new_tokens=8, seed=11)
    assert result.candidates.texts == again.texts  # the policy's own seeded samples
    rewards, _ = _candidate_arrays(model, result)
    np.testing.assert_allclose(result.rewards, rewards, atol=1e-6)
    assert result.chosen.tolist() == [int(np.argmax(r)) for r in rewards]
    for i, j in enumerate(result.chosen):
        assert result.responses[i] == again.texts[i][j]
        assert result.token_ids[i] == again.token_ids[i][j]
    assert result.norms is None
    assert result.users == USERS


def test_best_of_n_with_pessimism_picks_the_argmax_of_the_pessimistic_reward(bon_setup):
    policy, model, unc, m = bon_setup
    n = 6
    plain = best_of_n(policy, model, PROMPTS, USERS, n=n, max_new_tokens=8, seed=11)
    rewards, phis = _candidate_arrays(model, plain)
    norms = np.array([[_mahalanobis(phi - group.mean(0), m) for phi in group] for group in phis])
    changed = False
    for beta in (0.1, 1.0, 10.0, 100.0):
        result = best_of_n(
            policy,
            model,
            PROMPTS,
            USERS,
            n=n,
            max_new_tokens=8,
            seed=11,
            pessimism=beta,
            uncertainty=unc,
        )
        np.testing.assert_allclose(result.norms, norms, rtol=1e-6, atol=1e-9)
        score = rewards - beta * norms
        for i, row in enumerate(score):
            top = np.sort(row)[::-1]
            if top.size > 1 and top[0] - top[1] < 1e-6:  # too close to call in float32
                continue
            assert result.chosen[i] == int(np.argmax(row)), (beta, i, row)
        changed |= result.chosen.tolist() != plain.chosen.tolist()
    assert changed, "no beta changed the choice: the test would not see pessimism"


def test_best_of_n_errors_and_determinism(bon_setup):
    policy, model, unc, _ = bon_setup
    with pytest.raises(ConfigError, match="LastLayerUncertainty"):
        best_of_n(policy, model, PROMPTS, USERS, n=2, max_new_tokens=4, pessimism=0.5)
    with pytest.raises(ConfigError):
        best_of_n(
            policy, model, PROMPTS, USERS, n=2, max_new_tokens=4, pessimism=-1.0, uncertainty=unc
        )
    a = best_of_n(
        policy, model, PROMPTS, USERS, n=4, max_new_tokens=6, seed=5, pessimism=1.0, uncertainty=unc
    )
    b = best_of_n(
        policy, model, PROMPTS, USERS, n=4, max_new_tokens=6, seed=5, pessimism=1.0, uncertainty=unc
    )
    assert a.responses == b.responses and a.token_ids == b.token_ids
    assert a.chosen.tolist() == b.chosen.tolist()
    np.testing.assert_array_equal(a.rewards, b.rewards)
    np.testing.assert_array_equal(a.norms, b.norms)


# ---------------------------------------------------------------------- rejection sampling
def _sft(**kwargs) -> SFTTrainer:
    kwargs.setdefault("epochs", 1)
    kwargs.setdefault("lr", 5e-3)
    kwargs.setdefault("batch_size", 8)
    return SFTTrainer(progress=False, **kwargs)


def test_rejection_sampling_constant_reward_accepts_everything():
    policy = _policy()
    stages = multistep_rejection_sampling(
        policy,
        lambda p, t, u: 0.7,
        PROMPTS,
        USERS,
        [1.0, 0.5],
        n=4,
        max_new_tokens=6,
        eval_samples=2,
        trainer=_sft(),
    )
    assert [s.eta for s in stages] == [1.0, 0.5]
    assert [s.acceptance for s in stages] == [1.0, 1.0]
    assert [s.accepted for s in stages] == [8, 8]
    assert all(s.reward == pytest.approx(0.7) for s in stages)


@pytest.mark.parametrize(
    "etas", [[], [1.0, 1.0], [0.5, 1.0], [1.0, 0.5, 0.7], [0.0], [1.0, -1.0], [float("nan")]]
)
def test_rejection_sampling_refuses_bad_schedules(etas):
    with pytest.raises(ConfigError):
        multistep_rejection_sampling(
            _policy(), lambda p, t, u: 0.0, PROMPTS, USERS, etas, n=2, max_new_tokens=2
        )


def _coarse_reward(prompt: str, text: str, user: str) -> float:
    return round(GOLD_REWARDS[user](text), 1)  # coarse: ties at the top are common


def test_rejection_sampling_huge_step_keeps_only_the_best_of_each_prompt():
    policy = _policy(randomize=4)
    n, seed = 6, 3
    # stage 0 samples with seed + 7919·0 = seed, before any training
    samples = policy.generate(PROMPTS, USERS, n=n, max_new_tokens=6, seed=seed)
    expected = 0
    for p, u, texts in zip(samples.prompts, samples.users, samples.texts, strict=True):
        r = [_coarse_reward(p, t, u) for t in texts]
        expected += sum(v == max(r) for v in r)
    assert expected < n * len(PROMPTS)  # some samples must be rejected
    stages = multistep_rejection_sampling(
        policy,
        _coarse_reward,
        PROMPTS,
        USERS,
        [1e-9],
        n=n,
        max_new_tokens=6,
        eval_samples=2,
        trainer=_sft(),
        seed=seed,
    )
    assert stages[0].accepted == expected
    assert stages[0].acceptance == pytest.approx(expected / (n * len(PROMPTS)))


def test_rejection_sampling_acceptance_follows_the_schedule_steps():
    """Acceptance probability of stage s is exp((r − max r)·(1/η_s − 1/η_{s−1})): the rewards
    each stage saw are recorded through the reward callable; the count of accepted samples is
    checked statistically against Σ p and exactly with the same uniform stream."""
    policy = _policy(randomize=5)
    n, eval_samples, seed, etas = 8, 2, 2, [0.5, 0.1]
    calls: list[float] = []

    def reward(p, t, u):
        calls.append(3.0 * GOLD_REWARDS[u](t) + 0.1 * len(t) / 6)
        return calls[-1]

    stages = multistep_rejection_sampling(
        policy,
        reward,
        PROMPTS,
        USERS,
        etas,
        n=n,
        max_new_tokens=6,
        eval_samples=eval_samples,
        trainer=_sft(),
        seed=seed,
    )
    per_stage = len(PROMPTS) * (n + eval_samples)
    assert len(calls) == per_stage * len(etas)
    steps = [1 / etas[0], 1 / etas[1] - 1 / etas[0]]
    uniforms = np.random.default_rng(seed)
    for s, (stage, step) in enumerate(zip(stages, steps, strict=True)):
        block = np.array(calls[s * per_stage : (s + 1) * per_stage])
        accept_r = block[: len(PROMPTS) * n].reshape(len(PROMPTS), n)
        eval_r = block[len(PROMPTS) * n :]
        probs = np.exp((accept_r - accept_r.max(1, keepdims=True)) * step)
        assert 0.1 < probs.mean() < 0.95  # the step matters here
        se = math.sqrt(float(np.sum(probs * (1 - probs))))
        assert abs(stage.accepted - probs.sum()) <= 4 * se + 1e-9
        exact = sum(int(np.sum(uniforms.random(n) < row)) for row in probs)
        assert stage.accepted == exact
        assert stage.acceptance == pytest.approx(exact / (len(PROMPTS) * n))
        assert stage.reward == pytest.approx(float(eval_r.mean()))


# ---------------------------------------------------------------------- SFT
def test_sft_raises_each_users_likelihood_of_its_own_responses():
    policy = _policy()
    prompts = PROMPTS * 2
    users = ["vowels", "vowels", "digits", "digits"]
    responses = ["aeiou eia", "oui aie", "12345 67", "908 112"]
    before = policy.logprobs(prompts, responses, users)
    reference = policy.logprobs(prompts, responses, users, reference=True)
    np.testing.assert_allclose(before, reference, atol=1e-5)  # B = 0 at init
    trainer = _sft(epochs=6, lr=2e-2, batch_size=4).fit(policy, prompts, responses, users)
    after = policy.logprobs(prompts, responses, users)
    assert (after > before + 0.5).all(), (before, after)
    np.testing.assert_allclose(
        policy.logprobs(prompts, responses, users, reference=True), reference, atol=1e-6
    )  # π0 does not move
    # the loss is the mean over rows of −log π_u(y|x) / (response tokens, EOS included)
    mine = _oracle_logprobs(policy, prompts, responses, users)
    np.testing.assert_allclose(after, mine, atol=1e-4)
    tokens = np.array([len(r) + 1 for r in responses])
    assert trainer.train_evaluation_["loss"] == pytest.approx(
        float(np.mean(-mine / tokens)), abs=1e-4
    )


def test_sft_on_one_user_leaves_independent_adapters_of_the_others_alone():
    policy = _policy(share="independent")
    prompts, responses = PROMPTS, ["aeiou", "oui"]
    other = policy.logprobs(PROMPTS, ["12345", "9087"], ["digits", "digits"])
    before = policy.logprobs(prompts, responses, ["vowels", "vowels"])
    _sft(epochs=4, lr=2e-2, batch_size=2).fit(policy, prompts, responses, ["vowels", "vowels"])
    assert (policy.logprobs(prompts, responses, ["vowels", "vowels"]) > before + 0.3).all()
    np.testing.assert_array_equal(
        policy.logprobs(PROMPTS, ["12345", "9087"], ["digits", "digits"]), other
    )


def test_sft_refuses_no_samples():
    with pytest.raises(PluralignError, match="no samples"):
        _sft().fit(_policy(), [], [], [])


# ---------------------------------------------------------------------- evaluate_policy
def _gold(p, t, u):
    return GOLD_REWARDS[u](t)


def test_evaluate_policy_reference_has_zero_kl_and_the_reference_samples_reward():
    policy = _policy(randomize=6)
    value, kl = evaluate_policy(
        policy, _gold, PROMPTS, USERS, n=5, max_new_tokens=8, seed=9, reference=True
    )
    assert kl == 0.0
    # the reference π0 is the base model: a fresh policy (B = 0) samples the same responses
    base = _policy().generate(PROMPTS, USERS, n=5, max_new_tokens=8, seed=9)
    rewards = [
        _gold(p, t, u)
        for p, u, g in zip(base.prompts, base.users, base.texts, strict=True)
        for t in g
    ]
    assert value == pytest.approx(float(np.mean(rewards)), abs=1e-12)


def test_evaluate_policy_kl_is_the_mean_log_ratio_on_its_samples():
    policy = _policy(randomize=7)
    value, kl = evaluate_policy(policy, _gold, PROMPTS, USERS, n=4, max_new_tokens=8, seed=4)
    samples = policy.generate(PROMPTS, USERS, n=4, max_new_tokens=8, seed=4)
    p, ids, u = samples.flat()
    texts = [t for g in samples.texts for t in g]
    ratio = _oracle_logprobs(policy, p, ids, u) - _oracle_logprobs(
        policy, p, ids, u, reference=True
    )
    assert np.ptp(ratio) > 0.1  # the policy is not the reference
    assert kl == pytest.approx(float(ratio.mean()), abs=1e-4)
    assert value == pytest.approx(
        float(np.mean([_gold(a, t, b) for a, t, b in zip(p, texts, u, strict=True)]))
    )
