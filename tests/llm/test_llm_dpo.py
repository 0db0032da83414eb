"""DPOTrainer on a tiny Llama with multi-user LoRA: evaluation against log-probs computed
independently, the pessimistic margin's direction, user isolation, exact resume, the KL
estimate, and refused settings. (Loss and gradients against TRL: test_llm_dpo_oracle.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from pluralign.data.loaders import TextPreferences
from pluralign.errors import ConfigError, DataValidationError
from pluralign.llm.dpo import DPOTrainer, dpo_loss
from pluralign.llm.policy import PersonalizedPolicy
from pluralign.llm.toy import char_tokenizer, tiny_llama


def toy_prefs(n: int = 24) -> TextPreferences:
    prompts, chosen, rejected, users = [], [], [], []
    for i in range(n):
        user = ("vowels", "digits")[i % 2]
        prompts.append(f"say {i % 3}")
        chosen.append("aeiou ea" if user == "vowels" else "1234 567")
        rejected.append("xyz qrst")
        users.append(user)
    return TextPreferences(
        prompts=prompts,
        chosen=chosen,
        rejected=rejected,
        users=np.array(users),
        where=[("toy.jsonl", i + 1) for i in range(n)],
    )


def make_policy(share: str = "B", seed: int = 0) -> PersonalizedPolicy:
    return PersonalizedPolicy(
        tiny_llama(seed=seed),
        char_tokenizer(),
        ["vowels", "digits"],
        target_modules="all-linear",
        r=4,
        alpha=8.0,
        share=share,
        seed=seed,
    )


def trainer(**kwargs) -> DPOTrainer:
    settings = dict(beta=0.1, epochs=2, lr=5e-3, batch_size=8, progress=False, kl_samples=0)
    settings.update(kwargs)
    return DPOTrainer(**settings)


def test_training_raises_the_implicit_reward_margin_and_evaluation_matches_logprobs():
    prefs = toy_prefs()
    policy = make_policy()
    before = trainer().evaluate(policy, prefs)
    assert before["margin"] == pytest.approx(0.0, abs=1e-9)  # B = 0: π = π0
    fitted = trainer(epochs=4).fit(policy, prefs)
    after = fitted.evaluation_
    assert after["loss"] < before["loss"] - 0.05
    # the reported margins equal β(h_w − h_l) from independent log-prob calls
    users = list(prefs.users)
    h_w = policy.logprobs(prefs.prompts, prefs.chosen, users) - policy.logprobs(
        prefs.prompts, prefs.chosen, users, reference=True
    )
    h_l = policy.logprobs(prefs.prompts, prefs.rejected, users) - policy.logprobs(
        prefs.prompts, prefs.rejected, users, reference=True
    )
    margin = 0.1 * (h_w - h_l)
    assert after["margin"] == pytest.approx(margin.mean(), rel=1e-4, abs=1e-6)
    assert after["accuracy"] == pytest.approx(np.mean(margin > 0))
    loss = np.logaddexp(0.0, -margin).mean()
    assert after["loss"] == pytest.approx(loss, rel=1e-4)
    for user in ("vowels", "digits"):
        m = np.asarray(users) == user
        assert after["per_user"][user]["margin"] == pytest.approx(margin[m].mean(), rel=1e-4)


def test_precomputed_reference_logprobs_train_the_same_adapters():
    """precompute_ref_log_probs reads log π0 from the pairs instead of the per-step reference
    pass: the same numbers (π0 is fixed), so the same training, to float rounding."""
    from pluralign.llm.dpo import encode_dpo_pairs, reference_logprobs

    prefs = toy_prefs()
    stepwise, once = make_policy(), make_policy()
    trainer(epochs=3).fit(stepwise, prefs)
    fitted = trainer(epochs=3, precompute_ref_log_probs=True).fit(once, prefs)
    for (name, a), (_, b) in zip(
        stepwise.trainable_named_parameters(), once.trainable_named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert fitted.evaluation_["loss"] == pytest.approx(
        trainer().evaluate(stepwise, prefs)["loss"], rel=1e-4
    )
    # the attached numbers are log π0 of each side, from independent calls
    data = encode_dpo_pairs(once, prefs)
    ref = reference_logprobs(once, data, batch_size=5)
    users = list(prefs.users)
    np.testing.assert_allclose(
        ref[:, 0], once.logprobs(prefs.prompts, prefs.chosen, users, reference=True), atol=1e-5
    )
    np.testing.assert_allclose(
        ref[:, 1], once.logprobs(prefs.prompts, prefs.rejected, users, reference=True), atol=1e-5
    )
    # wrong reference numbers change the loss: they are really read
    # (a rejected side's log π0 raised by 50 raises β(h_w − h_l) by β·50 = 5)
    shifted = trainer().evaluate(once, data.with_reference(ref + np.array([0.0, 50.0])))
    plain = trainer().evaluate(once, data.with_reference(ref))
    assert shifted["margin"] == pytest.approx(plain["margin"] + 5.0, rel=1e-6)
    with pytest.raises(Exception, match="2 finite numbers"):
        data.with_reference(ref[:3])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pessimistic_margin_shrinks_or_grows_the_learned_log_ratio(sign):
    """With Γ_w − Γ_l = m > 0 the loss −log σ(βΔh + m) is satisfied with a smaller Δh than
    DPO's, so after the same steps the learned implicit margin is smaller (larger for m < 0)."""
    prefs = toy_prefs()
    plain = make_policy()
    trainer(epochs=3).fit(plain, prefs)
    pess = make_policy()
    t = trainer(epochs=3, loss_type="pessimistic")
    t.fit(pess, prefs, margins=np.full(prefs.n, 2.0 * sign))
    ev = trainer()
    diff = ev.evaluate(pess, prefs)["margin"] - ev.evaluate(plain, prefs)["margin"]
    assert sign * diff < -1e-3


def test_zero_margins_make_the_pessimistic_loss_dpo():
    torch.manual_seed(0)
    hw, hl = torch.randn(7), torch.randn(7)
    a = dpo_loss(hw, hl, beta=0.3, loss_type="pessimistic", margins=torch.zeros(7))
    b = dpo_loss(hw, hl, beta=0.3)
    torch.testing.assert_close(a, b)


def test_another_users_rows_do_not_change_a_users_adapter():
    """With independent adapters, user digits' factors follow digits' rows only: changing every
    vowels row (same lengths, other texts) leaves digits' trained factors identical, bit for
    bit (the other rows add exact zeros to its gradient), while vowels' factors differ."""
    prefs = toy_prefs()
    vowels = prefs.users == "vowels"
    changed = TextPreferences(
        prompts=prefs.prompts,
        users=prefs.users,
        chosen=["ooo aaao" if v else c for c, v in zip(prefs.chosen, vowels, strict=True)],
        rejected=["bbb cccd" if v else r for r, v in zip(prefs.rejected, vowels, strict=True)],
    )
    states = []
    for data in (prefs, changed):
        policy = PersonalizedPolicy(
            tiny_llama(),
            char_tokenizer(),
            ["vowels", "digits"],
            target_modules="all-linear",
            r=4,
            share="independent",
        )
        trainer(epochs=2).fit(policy, data)
        states.append(policy.trainable_state())
    a, b = states
    assert all(torch.equal(a[k][1], b[k][1]) for k in a)  # digits: identical
    assert any(not torch.equal(a[k][0], b[k][0]) for k in a)  # vowels: differs


def test_resume_gives_the_same_adapters_as_an_uninterrupted_run(tmp_path):
    prefs = toy_prefs()
    full = make_policy()
    trainer(epochs=2, output_dir=tmp_path / "a", checkpoint_every=1).fit(full, prefs)
    part = make_policy()
    trainer(epochs=2, output_dir=tmp_path / "b", checkpoint_every=1, max_steps=3).fit(part, prefs)
    resumed = make_policy()
    t = trainer(epochs=2, output_dir=tmp_path / "b", checkpoint_every=1)
    t.fit(resumed, prefs)
    assert t.resumed_from_ is not None and t.resumed_from_.endswith("step-0000003")
    a, b = full.trainable_state(), resumed.trainable_state()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="different"):
        trainer(epochs=2, output_dir=tmp_path / "b", beta=0.5).fit(make_policy(), prefs)


def test_kl_estimate_is_zero_at_the_reference_and_positive_after_training():
    prefs = toy_prefs()
    policy = make_policy()
    ev = trainer(kl_samples=3, kl_max_new_tokens=6)
    assert ev.evaluate(policy, prefs)["kl"] == pytest.approx(0.0, abs=1e-9)
    trainer(epochs=4, lr=2e-2).fit(policy, prefs)
    kl = ev.evaluate(policy, prefs)
    assert kl["kl"] > 1e-3
    assert set(kl["per_user"]) == {"vowels", "digits"}
    assert all(v["kl"] is not None for v in kl["per_user"].values())


def test_bad_settings_and_rows_are_refused():
    prefs = toy_prefs()
    with pytest.raises(ConfigError, match="needs margins"):
        trainer(loss_type="pessimistic").fit(make_policy(), prefs)
    with pytest.raises(ConfigError, match="does not use them"):
        trainer().fit(make_policy(), prefs, margins=np.zeros(prefs.n))
    with pytest.raises(ConfigError, match="beta"):
        trainer(beta=0.0).fit(make_policy(), prefs)
    with pytest.raises(ConfigError, match="loss_type"):
        trainer(loss_type="hinge").fit(make_policy(), prefs)
    stranger = TextPreferences(
        prompts=["a"], chosen=["b"], rejected=["c"], users=np.array(["zed"]), where=[("f.jsonl", 9)]
    )
    with pytest.raises(DataValidationError, match="unknown user 'zed'") as err:
        trainer().fit(
            make_policy(),
            TextPreferences(
                prompts=prefs.prompts + stranger.prompts,
                chosen=prefs.chosen + stranger.chosen,
                rejected=prefs.rejected + stranger.rejected,
                users=np.concatenate([prefs.users, stranger.users]),
                where=prefs.where + stranger.where,
            ),
        )
    assert "f.jsonl" in str(err.value) and "9" in str(err.value)


def test_conversational_data_needs_a_chat_template(tmp_path):
    from pluralign.data.loaders import read_trl

    path = tmp_path / "conv.jsonl"
    path.write_text(
        '{"prompt": [{"role": "user", "content": "hi"}], "chosen": "aeiou", '
        '"rejected": "xyz", "user_id": "vowels"}\n'
        '{"prompt": "plain", "chosen": "1234", "rejected": "xyz", '
        '"user_id": "digits"}\n'
    )
    prefs = read_trl(str(path))
    assert prefs.conversational and prefs.prompts[0] == "user: hi"
    with pytest.raises(ConfigError, match="no chat template"):
        trainer().fit(make_policy(), prefs)
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}:{% endif %}"
    )
    policy = PersonalizedPolicy(
        tiny_llama(), tok, ["vowels", "digits"], target_modules="all-linear", r=4
    )
    trainer(epochs=1).fit(policy, prefs)  # with a template it trains
    assert prefs.subset([1]).conversational  # the flag follows the rows' source


def test_dpo_logs_its_training_implicit_reward_accuracy():
    """The log entries carry DPO's training accuracy: at step 1 π = π0 (B = 0), so every pair
    is a tie and counts one half; on the separable toy pairs it then rises."""
    prefs = toy_prefs()
    fitted = trainer(epochs=4, logging_steps=1).fit(make_policy(), prefs)
    train = [e for e in fitted.log_history_ if "loss" in e and "eval_loss" not in e]
    assert [e["step"] for e in train] == list(range(1, fitted.global_step_ + 1))
    assert train[0]["accuracy"] == 0.5
    assert train[0]["loss"] == pytest.approx(np.log(2.0), rel=1e-6)
    assert train[-1]["accuracy"] == 1.0
