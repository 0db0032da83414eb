"""PersonalizedRewardModel, RewardTrainer, adaptation and PEFT export on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pluralign.data.loaders import read_trl
from pluralign.errors import ConfigError, DataValidationError, PluralignError
from pluralign.llm import (
    ExportedReward,
    PersonalizedRewardModel,
    RewardTrainer,
    adapt_user,
    encode_pairs,
    export_adapters,
    folder_names,
    per_user_metrics,
    split_per_user,
)

USERS = ["ana", "ben", "chen", "dara", "eli", "fay"]


def _model(path: str, users=USERS, **kwargs) -> PersonalizedRewardModel:
    kwargs.setdefault("r", 4)
    kwargs.setdefault("max_length", 96)
    return PersonalizedRewardModel.from_pretrained(path, users, **kwargs)


def _trainer(**kwargs) -> RewardTrainer:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("lr", 1e-2)
    return RewardTrainer(**kwargs)


def _randomize(model: PersonalizedRewardModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ---------------------------------------------------------------------- pooling and padding
@pytest.mark.parametrize("which,pooling", [("bert", "mean"), ("llama", "last"), ("bert", "cls")])
@pytest.mark.parametrize("side", ["right", "left"])
def test_rewards_do_not_depend_on_padding(request, which, pooling, side):
    """A row scored alone (no padding) gets the same reward inside a padded batch: batches are
    right-padded whatever the tokenizer says (left padding would shift BERT's and Llama's
    positions), and the pooling reads the right tokens (for a causal LM, the last non-pad one)."""
    path = request.getfixturevalue(f"tiny_{which}")
    model = _model(path, share="independent")
    assert model.pooling == ("mean" if which == "bert" else "last")
    model.pooling = pooling
    model.tokenizer.padding_side = side
    _randomize(model)
    prompts = ["How do I make tea?", "Hi", "How do I fix a flat tire on a bicycle?"]
    responses = ["Boil water.", "Hello there, how can I help you today with anything?", "Patch"]
    users = ["ben", "ana", "fay"]
    batch = model.score(prompts, responses, users, batch_size=3)
    alone = np.array(
        [model.score([p], [r], [u])[0] for p, r, u in zip(prompts, responses, users, strict=True)]
    )
    assert np.allclose(batch, alone, atol=1e-5)
    assert np.ptp(batch) > 1e-3


def test_auto_pooling_and_default_targets(tiny_bert, tiny_llama):
    bert, llama = _model(tiny_bert), _model(tiny_llama)
    assert (bert.pooling, llama.pooling) == ("mean", "last")
    assert {n.rsplit(".", 1)[-1] for n, _ in bert.adapted_layers()} == {"query", "value"}
    assert {n.rsplit(".", 1)[-1] for n, _ in llama.adapted_layers()} == {"q_proj", "v_proj"}


def test_bad_users_and_tokenizers_raise(tiny_bert, tiny_llama):
    model = _model(tiny_bert)
    with pytest.raises(PluralignError, match="unknown user 'zoe'"):
        model.score(["p"], ["r"], ["zoe"])
    with pytest.raises(PluralignError, match="empty user id"):
        _model(tiny_bert, users=["ana", ""])
    with pytest.raises(ConfigError, match="at least one user"):
        _model(tiny_bert, users=[])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = None
    from transformers import AutoModel

    with pytest.raises(ConfigError, match=r"no pad token.*pad_token: eos"):
        PersonalizedRewardModel(AutoModel.from_pretrained(tiny_llama), tokenizer, USERS)
    with pytest.raises(ConfigError, match="no EOS token"):
        _model(tiny_llama, pad_token="eos")  # the MiniLM tokenizer has no EOS
    assert _model(tiny_llama, pad_token="[SEP]").tokenizer.pad_token == "[SEP]"


# ---------------------------------------------------------------------- training
def test_trainer_metrics_match_scores_and_personalization_fits(tiny_bert, personas):
    """The trainer's per-user accuracy and loss are those of the model's own scores; users
    disagree, so per-user adapters fit the training rows far better than one pooled LoRA."""
    train, test = split_per_user(personas, 0.25, seed=0)
    fitted = {}
    for share in ("B", "pooled"):
        model = _model(tiny_bert, share=share)
        trainer = _trainer(epochs=4, batch_size=16).fit(model, train, test)
        margins = model.score(test.prompts, test.chosen, list(test.users)) - model.score(
            test.prompts, test.rejected, list(test.users)
        )
        expected = per_user_metrics(margins, [str(u) for u in test.users])
        got = trainer.evaluation_
        assert got["accuracy"] == pytest.approx(expected["accuracy"])
        assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5)
        for u in USERS:
            assert got["per_user"][u]["accuracy"] == pytest.approx(
                expected["per_user"][u]["accuracy"]
            )
            assert got["per_user"][u]["n"] == 10
        assert [h["epoch"] for h in trainer.history_] == [1, 2, 3, 4]
        fitted[share] = trainer.train_evaluation_["loss"]
    assert fitted["B"] < fitted["pooled"] - 0.2
    assert fitted["pooled"] > 0.6  # one reward cannot fit disagreeing users


def test_per_user_metrics_by_hand():
    m = per_user_metrics(np.array([1.0, -2.0, 0.0, 3.0]), ["a", "a", "b", "b"])
    assert m["per_user"]["a"] == {
        "accuracy": 0.5,
        "loss": pytest.approx((np.log1p(np.exp(-1.0)) + np.log1p(np.exp(2.0))) / 2),
        "n": 2,
    }
    assert m["per_user"]["b"]["accuracy"] == 0.75  # a tie counts one half
    assert m["accuracy"] == pytest.approx(0.625)
    assert m["mean_user_accuracy"] == pytest.approx(0.625)


def _trained_state(path, rows, **trainer_kwargs):
    model = _model(path, share="B", dropout=0.1)
    _trainer(**trainer_kwargs).fit(model, rows)
    return model.trainable_state()


def _assert_same_state(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), k


def test_gradient_accumulation_equals_the_full_batch(tiny_bert, personas):
    rows = personas.subset(np.arange(0, 240, 3))  # 80 rows, all users

    def state(**kw):
        model = _model(tiny_bert, share="B", dropout=0.0)
        _trainer(epochs=2, **kw).fit(model, rows)
        return model.trainable_state()

    full, accumulated = state(batch_size=16), state(batch_size=8, grad_accum=2)
    _assert_same_state(full, accumulated, atol=1e-5)
    halves = state(batch_size=8)  # twice the steps: a different model
    assert max(float((full[k] - halves[k]).abs().max()) for k in full) > 1e-3


def test_resume_after_an_interruption_gives_the_same_model(tiny_bert, personas, tmp_path):
    rows = personas.subset(np.arange(0, 240, 3)[:72])  # all users
    straight = _trained_state(tiny_bert, rows, epochs=2, batch_size=16)
    out = tmp_path / "run"
    first = _model(tiny_bert, share="B", dropout=0.1)
    stopped = _trainer(
        epochs=2, batch_size=16, output_dir=out, max_steps=3, checkpoint_every=2
    ).fit(first, rows)
    assert stopped.global_step_ == 3
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-0000002",
        "step-0000003",
    ]
    second = _model(tiny_bert, share="B", dropout=0.1)  # a fresh process would start so
    resumed = _trainer(epochs=2, batch_size=16, output_dir=out, checkpoint_every=2).fit(
        second, rows
    )
    assert resumed.resumed_from_.endswith("step-0000003")
    assert resumed.global_step_ == 10  # 5 batches per epoch (the last has 8)
    _assert_same_state(straight, second.trainable_state(), atol=1e-6)
    assert [h["epoch"] for h in resumed.history_] == [1, 2]
    with pytest.raises(PluralignError, match=r"cannot resume.*lr"):
        _trainer(epochs=2, batch_size=16, output_dir=out, lr=0.5).fit(
            _model(tiny_bert, share="B", dropout=0.1), rows
        )


def test_fit_refuses_users_without_rows_and_unknown_users(tiny_bert, personas, tmp_path):
    rows = personas.subset(np.flatnonzero(personas.users != "fay"))
    with pytest.raises(PluralignError, match=r"1 user\(s\) of the model have no training rows"):
        _trainer(epochs=1).fit(_model(tiny_bert), rows)
    model = _model(tiny_bert, users=USERS[:5])
    with pytest.raises(DataValidationError, match=r"personas.jsonl, line \d+.*'user_id'.*'fay'"):
        _trainer(epochs=1).fit(model, rows, personas)  # eval rows of a user it never saw


# ---------------------------------------------------------------------- adaptation
@pytest.mark.parametrize("share", ["B", "A", "independent"])
def test_new_user_adaptation_trains_only_its_factor(tiny_bert, personas, share):
    known = personas.subset(np.flatnonzero(personas.users != "fay"))
    new = personas.subset(np.flatnonzero(personas.users == "fay"))
    few, held = new.subset(np.arange(12)), new.subset(np.arange(12, new.n))
    model = _model(tiny_bert, users=USERS[:5], share=share)
    _trainer(epochs=3, batch_size=16).fit(model, known)
    before = model.trainable_state()
    trainer = adapt_user(model, "fay", few, epochs=15, lr=2e-2)
    after = model.trainable_state()
    assert model.user_ids[-1] == "fay"
    for name, old in before.items():
        new_t = after[name]
        if new_t.shape == old.shape:  # shared or head: untouched
            assert torch.equal(new_t, old), name
        else:  # stacked: old users untouched
            assert torch.equal(new_t[:-1], old), name
    start = model.n_users - 1
    changed = [
        n
        for n, t in after.items()
        if t.shape != before[n].shape and not torch.allclose(t[start], before[n].mean(0))
    ]
    assert changed  # the new user's factor moved
    assert trainer.evaluation_["per_user"]["fay"]["loss"] < 0.6
    held_acc = RewardTrainer(progress=False).evaluate(model, held)["accuracy"]
    assert held_acc >= 0.75


def test_adaptation_errors(tiny_bert, personas):
    pooled = _model(tiny_bert, share="pooled")
    # pooled ignores users: a new user gets the pooled reward as it is
    assert np.array_equal(
        pooled.score(["p", "q"], ["a", "b"], ["zoe", "zoe"]),
        pooled.score(["p", "q"], ["a", "b"], ["ana", "ben"]),
    )
    fay = personas.subset(np.flatnonzero(personas.users == "fay"))
    with pytest.raises(PluralignError, match="pooled"):
        adapt_user(pooled, "zoe", fay)
    model = _model(tiny_bert, users=USERS[:5])
    with pytest.raises(PluralignError, match="must all belong to user 'zoe'"):
        adapt_user(model, "zoe", fay)
    with pytest.raises(PluralignError, match="already exists"):
        adapt_user(model, "ana", personas.subset(np.flatnonzero(personas.users == "ana")))


# ---------------------------------------------------------------------- export
@pytest.mark.parametrize("which,share", [("bert", "B"), ("llama", "A"), ("bert", "independent")])
def test_exported_adapters_reload_in_peft_with_the_same_rewards(
    request, tmp_path, which, share, personas
):
    path = request.getfixturevalue(f"tiny_{which}")
    users = ["ana", "user/7 ü"]
    model = _model(path, users=users, share=share)
    _randomize(model, seed=1)
    written = export_adapters(model, tmp_path / "adapters")
    hashed = folder_names(["user/7 ü"])["user/7 ü"]
    assert hashed.startswith("user_7-") and len(hashed) == len("user_7-") + 12
    assert sorted(p.name for p in written.values()) == ["ana", hashed]
    assert json.loads((tmp_path / "adapters" / "users.json").read_text()) == {
        "ana": "ana",
        "user/7 ü": hashed,
    }
    config = json.loads((written["ana"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == sorted(n for n, _ in model.adapted_layers())
    prompts, responses = personas.prompts[:6], personas.chosen[:6]
    scores = {}
    for user in users:
        exported = ExportedReward(written[user])
        assert exported.user_id == user
        ours = model.score(prompts, responses, [user] * 6)
        theirs = exported.score(prompts, responses)
        assert np.allclose(ours, theirs, atol=1e-5)
        scores[user] = ours
    assert not np.allclose(scores["ana"], scores["user/7 ü"])  # the users really differ


def test_encoding_names_the_row_of_an_unknown_user(tiny_bert, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(
            json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "user_id": u})
            for u in ["ana", "ana", "zoe"]
        )
    )
    with pytest.raises(DataValidationError, match=r"rows.jsonl, line 3.*unknown user 'zoe'"):
        encode_pairs(_model(tiny_bert), read_trl(rows))
