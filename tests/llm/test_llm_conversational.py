"""Conversational preference rows (TRL message lists) in the LLM layer, checked against oracles.

* DPO (:func:`pluralign.llm.dpo.encode_dpo_pairs`): the prompt and response token ids of a
  conversational row are TRL 1.16's own — ``DPOTrainer`` run on the same conversations, its
  ``train_dataset`` read back (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) — and the
  collated batch is TRL's ``DataCollatorForPreference``'s, for a template whose prompt is a
  prefix of the conversation and for one that renders the prompt alone differently (TRL then
  starts the response where the two diverge). Plain-text rows of the same data keep the
  policy's plain encoding.
* The reward model's scoring (:meth:`PersonalizedRewardModel.features` / ``score``) and the
  last-layer uncertainty of pessimistic DPO (:mod:`pluralign.llm.uncertainty`): the features of
  a conversational row are those of the model run directly on :func:`encode_pairs`' token ids
  (which are the tokenizer's own ``apply_chat_template`` ids), i.e. the tokens it was trained
  on; ``M``, the margins and the reference centers are recomputed from those features.
"""

from __future__ import annotations

import json
import tempfile
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from pluralign.data.loaders import read_trl
from pluralign.errors import ConfigError, DataValidationError, PluralignWarning
from pluralign.llm import encode_pairs
from pluralign.llm.data import chat_response, conversations, row_prompts
from pluralign.llm.dpo import encode_dpo_pairs, reference_logprobs
from pluralign.llm.policy import PersonalizedPolicy
from pluralign.llm.reward_model import PersonalizedRewardModel
from pluralign.llm.toy import char_tokenizer, tiny_llama
from pluralign.llm.uncertainty import (
    LastLayerUncertainty,
    pair_features,
    pessimism_margins,
    prompt_key,
    reference_centers,
)

torch.set_num_threads(1)

USERS = ["ana", "ben"]
# the char tokenizer knows letters, digits, " .,!?'-:;\n": templates are written in those
PREFIX_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# the prompt alone ends with a marker that the whole conversation does not have (the
# Gemma-style case TRL's common_prefix_length handles)
DIVERGING_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}think!\nassistant:{% endif %}"
)

ROWS = [
    # a multi-turn prompt with a system message
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Why?"},
        ],
        "chosen": [{"role": "assistant", "content": "Because."}],
        "rejected": [{"role": "assistant", "content": "Long story, sit down."}],
        "user_id": "ana",
    },
    # a plain-text row in the same file
    {"prompt": "plain words", "chosen": "aeiou", "rejected": "xyz", "user_id": "ben"},
    # a string prompt with message responses (read as one user message)
    {
        "prompt": "Sky?",
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green, at times."}],
        "user_id": "ben",
    },
    # TRL's implicit prompt: one conversation is a prefix of the other, so the rejected
    # response is three messages
    {
        "prompt": None,
        "chosen": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "Ok"}],
        "rejected": [
            {"role": "user", "content": "Go"},
            {"role": "assistant", "content": "Ok"},
            {"role": "user", "content": "More"},
            {"role": "assistant", "content": "No"},
        ],
        "user_id": "ana",
    },
]


def _tokenizer(template: str):
    tok = char_tokenizer()
    tok.chat_template = template
    return tok


def _policy(template: str, **kwargs) -> PersonalizedPolicy:
    kwargs.setdefault("max_length", 512)
    return PersonalizedPolicy(
        tiny_llama(), _tokenizer(template), USERS, target_modules="all-linear", r=2, **kwargs
    )


def _trl_tokenization(tokenizer, prefs) -> list[dict[str, list[int]]]:
    """TRL 1.16's DPOTrainer tokenization of the conversational rows of ``prefs`` (its
    ``train_dataset`` after construction: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    rows = [
        {"prompt": m[0], "chosen": m[1], "rejected": m[2]} for m in prefs.messages if m is not None
    ]
    from trl_oracle import _keep_rng_state  # DPOTrainer reseeds the global RNGs

    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings(), _keep_rng_state():
        warnings.simplefilter("ignore")
        # bf16/fp16 off: the accelerate state it sets up is the one pluralign's trainer uses
        args = trl.DPOConfig(
            output_dir=out,
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            max_length=None,
            logging_strategy="no",
            save_strategy="no",
            dataloader_num_workers=0,
            per_device_train_batch_size=1,
        )
        trainer = trl.DPOTrainer(
            model=tiny_llama(),
            ref_model=tiny_llama(),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    return [
        {k: list(r[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for r in trainer.train_dataset
    ]


# ---------------------------------------------------------------------- DPO tokenization
@pytest.mark.parametrize(
    "template", [PREFIX_TEMPLATE, DIVERGING_TEMPLATE], ids=["prompt-is-prefix", "prompt-diverges"]
)
def test_dpo_tokenizes_conversational_rows_as_trls_dpo_trainer(template):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    prefs = read_trl(ROWS)
    conv = [i for i, m in enumerate(prefs.messages) if m is not None]
    assert conv == [0, 2, 3] and prefs.messages[1] is None
    policy = _policy(template)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = encode_dpo_pairs(policy, prefs)
    diverged = [
        w
        for w in caught
        if issubclass(w.category, PluralignWarning) and "differently" in str(w.message)
    ]
    assert bool(diverged) == (template is DIVERGING_TEMPLATE)
    assert policy.truncated_ == 0
    oracle = _trl_tokenization(policy.tokenizer, prefs)
    for i, expected in zip(conv, oracle, strict=True):
        for side, key in ((encoded.chosen, "chosen_ids"), (encoded.rejected, "rejected_ids")):
            assert side[i]["prompt_ids"] == expected["prompt_ids"], (i, key)
            assert side[i]["response_ids"] == expected[key], (i, key)
        # the prompt the KL estimate samples from is the prompt messages
        assert encoded.prompts[i] == prefs.messages[i][0]
        # ... which is not what the flattened "role: content" text would have given
        flat = policy.encode([prefs.prompts[i]], [prefs.chosen[i]])[0]
        assert flat != encoded.chosen[i]
    if template is DIVERGING_TEMPLATE:  # the response starts where prompt and conversation part
        full_prompt = policy.prompt_ids(prefs.messages[0][0])
        assert len(encoded.chosen[0]["prompt_ids"]) < len(full_prompt)
    # the plain-text row keeps the policy's plain encoding (one user turn, response + EOS)
    assert encoded.prompts[1] == "plain words"
    assert encoded.chosen[1] == policy.encode(["plain words"], ["aeiou"])[0]
    assert encoded.rejected[1] == policy.encode(["plain words"], ["xyz"])[0]
    # the batch the loss sees is TRL's collated batch (chosen rows, then rejected, right-padded)
    ours = encoded.batch(conv, policy)
    theirs = DataCollatorForPreference(pad_token_id=policy.tokenizer.pad_token_id)(oracle)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["response_mask"], theirs["completion_mask"])


def test_conversational_rows_are_truncated_by_the_policys_rule():
    """Prompt: its last max_prompt_length tokens; response: the first ones that fit."""
    prefs = read_trl(ROWS[:1])
    full = encode_dpo_pairs(_policy(PREFIX_TEMPLATE), prefs)
    short = _policy(PREFIX_TEMPLATE, max_length=60, max_prompt_length=40)
    with pytest.warns(PluralignWarning, match="truncated"):
        cut = encode_dpo_pairs(short, prefs)
    assert short.truncated_ == 2  # both sides: the prompt is longer than 40 tokens
    for whole, part in ((full.chosen[0], cut.chosen[0]), (full.rejected[0], cut.rejected[0])):
        assert part["prompt_ids"] == whole["prompt_ids"][-40:]
        assert part["response_ids"] == whole["response_ids"][:20]


def test_conversational_rows_need_a_chat_template_and_a_renderable_conversation(tmp_path):
    prefs = read_trl(ROWS)
    with pytest.raises(ConfigError, match="no chat template"):
        encode_dpo_pairs(_policy(PREFIX_TEMPLATE, chat_template="none"), prefs)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    refuses = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}" + PREFIX_TEMPLATE
    )
    with pytest.raises(
        DataValidationError,
        match=r"c.jsonl, line 1: the tokenizer's chat "
        r"template cannot render",
    ):
        encode_dpo_pairs(_policy(refuses), read_trl(path))


def test_reference_logprobs_of_conversational_rows_score_the_encoded_tokens():
    """log π0 of a conversational row is that of its encoded tokens (what iterate keeps for
    its offline pairs): PersonalizedPolicy.encoded_logprobs against reference_logprobs and
    against a plain-torch sum over the response tokens."""
    prefs = read_trl(ROWS)
    policy = _policy(PREFIX_TEMPLATE)
    encoded = encode_dpo_pairs(policy, prefs)
    ref = reference_logprobs(policy, encoded, batch_size=2)
    got = policy.encoded_logprobs(encoded.chosen + encoded.rejected, reference=True, batch_size=3)
    np.testing.assert_allclose(got, np.concatenate([ref[:, 0], ref[:, 1]]), atol=1e-9)
    with torch.no_grad(), policy.reference():
        for i, row in enumerate(encoded.chosen):
            ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
            logp = policy.model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            n = len(row["prompt_ids"])
            want = logp[n - 1 :, :].gather(1, ids[0, n:, None]).sum().item()
            assert got[i] == pytest.approx(want, rel=1e-5)  # float32 model
    # the flattened text would be another sequence (a different number)
    flat = policy.logprobs([prefs.prompts[0]], [prefs.chosen[0]], ["ana"], reference=True)
    assert abs(flat[0] - got[0]) > 1e-3


# ---------------------------------------------------------------------- reward model scoring
RM_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _randomize(module, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.trainable_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def reward_model() -> PersonalizedRewardModel:
    from transformers import BertConfig, BertModel

    tok = _tokenizer(RM_TEMPLATE)
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
    _randomize(model, 1, 0.5)  # users' features differ, head is non-trivial
    return model


@pytest.fixture(scope="module")
def prefs():
    rows = [
        *ROWS,
        # longer than max_length=64: cut as training cuts it
        {
            "prompt": [{"role": "user", "content": "Tell me a long story about it " * 3}],
            "chosen": [{"role": "assistant", "content": "Once upon a time."}],
            "rejected": [{"role": "assistant", "content": "No."}],
            "user_id": "ben",
        },
    ]
    return read_trl(rows)


def _oracle_features(model, encoded_rows, users) -> np.ndarray:
    """The model run on each row's token ids alone (no padding, no batching)."""
    out = []
    with torch.no_grad():
        for row, u in zip(encoded_rows, users, strict=True):
            batch = {k: torch.tensor([v]) for k, v in row.items()}
            index = model.user_index([u])
            out.append(model.pooled(user_index=index, **batch)[0].double().numpy())
    return np.stack(out)


def test_reward_features_and_scores_are_those_of_the_training_tokens(reward_model, prefs):
    tok = reward_model.tokenizer
    encoded = encode_pairs(reward_model, prefs)
    users = [str(u) for u in prefs.users]
    # encode_pairs' ids are the tokenizer's own chat-template ids (cut to max_length)
    for i, parts in enumerate(prefs.messages):
        if parts is not None:
            ids = tok.apply_chat_template(parts[0] + parts[1], tokenize=True, return_dict=True)[
                "input_ids"
            ]
            assert encoded.chosen[i]["input_ids"] == list(ids)[:64]
    assert (
        len(
            tok.apply_chat_template(
                prefs.messages[4][0] + prefs.messages[4][1], tokenize=True, return_dict=True
            )["input_ids"]
        )
        > 64
    )
    head = reward_model.head.weight.detach().double().numpy().ravel()
    for side, rows in (("chosen", encoded.chosen), ("rejected", encoded.rejected)):
        oracle = _oracle_features(reward_model, rows, users)
        for batch_size in (1, 3, 32):
            phi = reward_model.features(
                prefs.prompts,
                getattr(prefs, side),
                users,
                batch_size=batch_size,
                conversations=conversations(prefs, side),
            )
            np.testing.assert_allclose(phi, oracle, atol=1e-6)
            score = reward_model.score(
                prefs.prompts,
                getattr(prefs, side),
                users,
                batch_size=batch_size,
                conversations=conversations(prefs, side),
            )
            np.testing.assert_allclose(score, oracle @ head, atol=1e-6)
        # without the conversations, a conversational row would be scored on other tokens
        text_pair = reward_model.features(prefs.prompts, getattr(prefs, side), users)
        assert np.abs(text_pair[0] - oracle[0]).max() > 1e-3
        np.testing.assert_allclose(text_pair[1], oracle[1], atol=1e-6)  # the plain row
    chosen, rejected = pair_features(reward_model, prefs, batch_size=2)
    np.testing.assert_allclose(
        chosen, _oracle_features(reward_model, encoded.chosen, users), atol=1e-6
    )
    np.testing.assert_allclose(
        rejected, _oracle_features(reward_model, encoded.rejected, users), atol=1e-6
    )


def _mnorm(d: np.ndarray, m: np.ndarray) -> np.ndarray:
    d = np.atleast_2d(d)
    return np.sqrt(np.einsum("ij,ji->i", d, np.linalg.solve(m, d.T)))


def test_pessimism_uses_the_training_tokens_of_conversational_rows(reward_model, prefs):
    """M, the margins Γ_w − Γ_l and the reference centers ν(x) from the oracle features."""
    encoded = encode_pairs(reward_model, prefs)
    users = [str(u) for u in prefs.users]
    delta = _oracle_features(reward_model, encoded.chosen, users) - _oracle_features(
        reward_model, encoded.rejected, users
    )
    lam = 0.3
    m = delta.T @ delta / len(delta) + lam * np.eye(delta.shape[1])
    unc = LastLayerUncertainty(beta=1.5, lam=lam).fit(reward_model, prefs, batch_size=2)
    np.testing.assert_allclose(unc.confidence_.M, m, atol=1e-8)

    # reference centers: π0 answers the prompt messages through its chat template; a sample's
    # feature is that of the conversation with it as one assistant message
    policy = _policy(PREFIX_TEMPLATE, max_length=64)
    prompts = row_prompts(prefs)
    assert prompts[0] == prefs.messages[0][0] and prompts[1] == "plain words"
    centers = reference_centers(
        policy, reward_model, prompts, users, n=3, max_new_tokens=6, seed=2, batch_size=2
    )
    keys = list(dict.fromkeys((prompt_key(p), u) for p, u in zip(prompts, users, strict=True)))
    assert list(centers) == keys and keys[1] == ("plain words", "ben")
    first: dict = {}
    for i, (p, u) in enumerate(zip(prompts, users, strict=True)):
        first.setdefault((prompt_key(p), u), i)
    unique = list(first.values())
    samples = policy.generate(
        [prompts[i] for i in unique],
        [users[i] for i in unique],
        n=3,
        max_new_tokens=6,
        seed=2,
        batch_size=2,
        reference=True,
    )
    tok = reward_model.tokenizer
    for i, texts in zip(unique, samples.texts, strict=True):
        rows = []
        for t in texts:
            t = t or " "
            if isinstance(prompts[i], str):
                rows.append({k: v[0] for k, v in reward_model.tokenize([prompts[i]], [t]).items()})
            else:
                ids = tok.apply_chat_template(
                    prompts[i] + [{"role": "assistant", "content": t}],
                    tokenize=True,
                    return_dict=True,
                )["input_ids"]
                ids = list(ids)[:64]
                fill = {"input_ids": ids, "attention_mask": [1] * len(ids)}
                rows.append({k: fill.get(k, [0] * len(ids)) for k in encoded.chosen[1]})
        want = _oracle_features(reward_model, rows, [users[i]] * len(rows)).mean(0)
        np.testing.assert_allclose(centers[(prompt_key(prompts[i]), users[i])], want, atol=1e-6)
    # the margins of pessimistic DPO, from the oracle features and those centers
    nu = np.stack([centers[(prompt_key(p), u)] for p, u in zip(prompts, users, strict=True)])
    got = pessimism_margins(reward_model, unc, prefs, centers, scale=0.7, batch_size=3)
    chosen = _oracle_features(reward_model, encoded.chosen, users)
    rejected = _oracle_features(reward_model, encoded.rejected, users)
    beta = unc.confidence_.beta
    np.testing.assert_allclose(
        got, 0.7 * beta * (_mnorm(chosen - nu, m) - _mnorm(rejected - nu, m)), rtol=1e-6, atol=1e-7
    )
    assert np.abs(got).max() > 1e-3


def test_chat_response_is_the_loaders_row():
    """A response to prompt messages is the row the loader reads from the same JSON."""
    prompt = ROWS[0]["prompt"]
    text, response, conversation = chat_response(prompt, "Sure.")
    row = read_trl([{"prompt": prompt, "chosen": "Sure.", "rejected": "Nope.", "user_id": "ana"}])
    assert (text, response) == (row.prompts[0], row.chosen[0])
    assert conversation == row.messages[0][0] + row.messages[0][1]
    assert chat_response("plain", "yes") == ("plain", "yes", None)
