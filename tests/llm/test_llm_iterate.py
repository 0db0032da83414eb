"""Online iterative DPO (``pluralign iterate``, issue 13) on the toy task."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pluralign.data.loaders import read_trl  # noqa: E402
from pluralign.errors import ConfigError, DataValidationError, PluralignWarning  # noqa: E402
from pluralign.llm import config as config_module  # noqa: E402
from pluralign.llm.iterate import run_iterate  # noqa: E402
from pluralign.llm.pairs import (  # noqa: E402
    GOLDS,
    PAIR_RULES,
    FeatureCovariance,
    GoldOracle,
    bradley_terry,
    make_gold,
    select_pair,
    win_rate,
)

torch.set_num_threads(1)

PROMPTS = ["ab", "cd e", "fa", "go"]
USERS = ["vowels", "digits"]


def _prompts(path, users=USERS, with_user=True):
    with open(path, "w") as f:
        for p in PROMPTS:
            for u in users:
                f.write(
                    json.dumps({"prompt": p, "user_id": u} if with_user else {"prompt": p}) + "\n"
                )
    return str(path)


def _config(tmp_path, **iterate):
    return {
        "model": {"name_or_path": "toy-llama", "max_length": 48},
        "lora": {"target_modules": "all-linear", "r": 4},
        "train": {"num_train_epochs": 1, "learning_rate": 5e-3, "train_batch_size": 8},
        "dpo": {"beta": 0.1},
        "iterate": {
            "rounds": 2,
            "n": 3,
            "prompts": _prompts(tmp_path / "prompts.jsonl"),
            "eval_samples": 2,
            "max_new_tokens": 6,
            **iterate,
        },
    }


def _run(tmp_path, name, **kwargs):
    iterate = kwargs.pop("iterate", {})
    return run_iterate(_config(tmp_path, **iterate), out=tmp_path / name, progress=False, **kwargs)


# ---------------------------------------------------------------------- pair rules
def test_config_choices_match_the_pair_module():
    assert config_module.ITERATE_PAIR_RULES == PAIR_RULES
    assert config_module.ITERATE_GOLDS == GOLDS


def test_max_min_max_random_random_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = rng.normal(size=int(rng.integers(2, 9)))
        assert select_pair(s, "max_min") == (int(np.argmax(s)), int(np.argmin(s)))
        a, b = select_pair(s, "max_random", rng=np.random.default_rng(1))
        assert a == int(np.argmax(s)) and b != a and 0 <= b < s.size
        a, b = select_pair(s, "random", rng=np.random.default_rng(2))
        assert a != b
    # max_random's partner is uniform over the other candidates
    s = np.array([0.1, 0.9, 0.3, 0.5])
    draws = np.random.default_rng(3)
    partners = [select_pair(s, "max_random", rng=draws)[1] for _ in range(3000)]
    counts = np.bincount(partners, minlength=4)
    assert counts[1] == 0 and np.all(np.abs(counts[[0, 2, 3]] / 3000 - 1 / 3) < 0.04)


def test_enhancer_picks_the_largest_sigma_inverse_norm_among_top_times_bottom():
    rng = np.random.default_rng(4)
    for trial in range(40):
        n, d = int(rng.integers(2, 8)), 3
        s = rng.normal(size=n)
        phi = rng.normal(size=(n, d))
        root = rng.normal(size=(d, d))
        sigma_inv = np.linalg.inv(root @ root.T + np.eye(d))
        order = np.argsort(-s)
        top, bottom = order[: n // 2], order[n // 2 :]
        norms = {
            (int(a), int(b)): (phi[a] - phi[b]) @ sigma_inv @ (phi[a] - phi[b])
            for a, b in itertools.product(top, bottom)
        }
        best = max(norms, key=norms.get)
        assert select_pair(s, "enhancer", features=phi, sigma_inv=sigma_inv) == best, trial


def test_ties_are_returned_as_ties():
    s = np.array([0.5, 0.5, 0.5])
    a, b = select_pair(s, "max_min")
    assert a != b or s[a] == s[b]
    a, b = select_pair(s, "enhancer", features=np.eye(3), sigma_inv=np.eye(3))
    assert s[a] == s[b]


def test_feature_covariance_and_norm():
    rng = np.random.default_rng(5)
    deltas = rng.normal(size=(7, 4))
    cov = FeatureCovariance(4, lam=0.5)
    cov.add(deltas[:3])
    cov.add(deltas[3:])
    expected = 0.5 * np.eye(4) + sum(np.outer(x, x) for x in deltas)
    np.testing.assert_allclose(cov.matrix, expected, atol=1e-12)
    x = rng.normal(size=4)
    np.testing.assert_allclose(cov.norm(x)[0], np.sqrt(x @ np.linalg.inv(expected) @ x))


def test_bradley_terry_labels_follow_the_logistic_law():
    rng = np.random.default_rng(6)
    draws = 20000
    for diff, scale in ((0.05, 20.0), (-0.1, 5.0), (0.0, 20.0)):
        wins = bradley_terry(np.full(draws, 0.3 + diff), np.full(draws, 0.3), scale, rng)
        p = 1.0 / (1.0 + np.exp(-scale * diff))
        se = np.sqrt(p * (1 - p) / draws)
        assert abs(wins.mean() - p) < 4 * se


def test_win_rate_counts_ties_as_one_half():
    assert win_rate(np.array([0.3, 0.2, 0.5, 0.1]), np.array([0.1, 0.2, 0.6, 0.0])) == 2.5 / 4
    x = np.random.default_rng(7).random(9)
    assert win_rate(x, x) == 0.5


def test_toy_gold_is_the_toy_reward_and_refuses_other_users():
    gold = make_gold("toy")
    assert gold.score(["p", "p"], ["aab1", "12"], ["vowels", "digits"]).tolist() == [0.5, 1.0]
    with pytest.raises(ConfigError, match="no gold reward for user"):
        gold.check_users(["vowels", "nobody"])


# ---------------------------------------------------------------------- the loop
def test_loop_records_pairs_sigma_and_reads_back(tmp_path):
    offline = tmp_path / "offline.jsonl"
    offline.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": c, "rejected": r, "user_id": u}) + "\n"
            for p, c, r, u in (("ab", "aei", "bcd", "vowels"), ("go", "123", "abc", "digits"))
        )
    )
    used = {}
    report = _run(
        tmp_path,
        "run",
        iterate={"pairs": "enhancer", "offline": str(offline), "lam": 0.7},
        before_dpo=lambda t, policy, data: used.setdefault(t, data),
    )
    out = tmp_path / "run"
    history = report["history"]
    assert [r["round"] for r in history] == [0, 1, 2]
    # round 0 is π0 against itself: KL 0 and a win rate of exactly one half
    for v in history[0]["users"].values():
        assert v["win_rate"] == 0.5 and abs(v["kl"]) < 1e-9
    gold = make_gold("toy")
    rounds = [read_trl(out / f"round-{t:02d}.jsonl") for t in (0, 1, 2)]
    # the round files are the pairs trained on: round 1 with the offline pairs, round 2 alone
    for t, parts in ((1, rounds[:2]), (2, rounds[2:])):
        data = used[t]
        assert data.prompts == [p for r in parts for p in r.prompts]
        assert data.chosen == [c for r in parts for c in r.chosen]
        assert data.rejected == [x for r in parts for x in r.rejected]
        assert [str(u) for u in data.users] == [str(u) for r in parts for u in r.users]
    # Σ = λI + Σ Δφ Δφᵀ over the offline pairs and exactly the kept pairs of every round
    expected = 0.7 * np.eye(6)
    for r in rounds:
        d = gold.features(r.prompts, r.chosen, []) - gold.features(r.prompts, r.rejected, [])
        expected = expected + d.T @ d
    np.testing.assert_allclose(report["sigma"].matrix, expected, atol=1e-10)
    # per-user counts: every row gives a pair, a tie or a degenerate row
    for record in history[1:]:
        assert record["pairs"] == sum(v["pairs"] for v in record["users"].values())
        for v in record["users"].values():
            assert v["pairs"] + v["ties"] + v["degenerate"] == v["rows"] == len(PROMPTS)
    rows = [json.loads(line) for line in (out / "round-01.jsonl").read_text().splitlines()]
    assert all({"margin", "uncertainty", "user_id"} <= set(row) for row in rows)
    assert (out / "rounds.png").stat().st_size > 0
    assert "| round | user |" in (out / "rounds.md").read_text()
    assert json.loads((out / "history.json").read_text()) == history


OFFLINE = (("ab", "aei", "bcd", "vowels"), ("go", "123", "abc", "digits"))


def test_offline_columns_are_mapped_like_the_data_section(tmp_path):
    """iterate.offline_*_column read a file whose columns have other names (what data.*_column
    do for train-rm/train-policy); round-00.jsonl and round 1's DPO data are its rows under
    TRL's names; a wrong mapping is refused naming the file, line and column."""
    offline = tmp_path / "renamed.jsonl"
    offline.write_text(
        "".join(
            json.dumps({"question": p, "good": c, "bad": r, "annotator": u}) + "\n"
            for p, c, r, u in OFFLINE
        )
    )
    mapping = {
        "offline_user_column": "annotator",
        "offline_prompt_column": "question",
        "offline_chosen_column": "good",
        "offline_rejected_column": "bad",
    }
    used = {}
    _run(
        tmp_path,
        "mapped",
        iterate={"offline": str(offline), "rounds": 1, **mapping},
        before_dpo=lambda t, policy, data: used.setdefault(t, data),
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "mapped" / "round-00.jsonl").read_text().splitlines()
    ]
    assert rows == [
        {"prompt": p, "chosen": c, "rejected": r, "user_id": u} for p, c, r, u in OFFLINE
    ]
    data = used[1]  # round 1 trains on the offline pairs, then its own
    assert list(
        zip(
            data.prompts[:2],
            data.chosen[:2],
            data.rejected[:2],
            [str(u) for u in data.users[:2]],
            strict=True,
        )
    ) == list(OFFLINE)
    # a mapped column the rows lack: the file, line, column and the mapping are named
    with pytest.raises(DataValidationError) as err:
        _run(
            tmp_path,
            "bad",
            iterate={"offline": str(offline), **{**mapping, "offline_user_column": "worker"}},
        )
    message = str(err.value)
    assert "renamed.jsonl, line 1, field 'worker'" in message
    assert "iterate.offline_user_column='worker'" in message
    # the file's own names without a mapping: the missing TRL column is named
    with pytest.raises(DataValidationError, match=r"line 1, field 'chosen': missing"):
        _run(tmp_path, "bad", iterate={"offline": str(offline)})
    with pytest.raises(
        ConfigError,
        match=r"iterate.offline_user_column is set but "
        r"iterate.offline is null",
    ):
        _run(tmp_path, "bad", iterate={"offline_user_column": "annotator"})
    with pytest.raises(
        ConfigError,
        match=r"iterate.offline_chosen_column and "
        r"iterate.offline_rejected_column both name column",
    ):
        _run(
            tmp_path,
            "bad",
            iterate={
                "offline": str(offline),
                "offline_chosen_column": "x",
                "offline_rejected_column": "x",
            },
        )
    it = config_module.IterateConfig(
        prompts="p.jsonl", offline="o.jsonl", offline_user_column="annotator"
    )
    assert it.offline_columns() == {"user_column": "annotator"}


CONVERSATIONAL = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"}],
        "chosen": [{"role": "assistant", "content": "aei"}],
        "rejected": [{"role": "assistant", "content": "bcd"}],
        "user_id": "vowels",
    },
    {"prompt": "go", "chosen": "123", "rejected": "abc", "user_id": "digits"},
]


def test_conversational_offline_pairs_keep_their_messages(tmp_path):
    """A conversational offline row stays messages in round-00.jsonl, in the DPO data of a
    round (joined with plain pairs) and in its reference log-probabilities, which are those of
    its DPO encoding (the chat template's tokens), not of its "role: content" text."""
    from pluralign.llm.dpo import encode_dpo_pairs, reference_logprobs
    from pluralign.llm.iterate import _concat, _Loop, _pairs_rows, resolve_iterate_config
    from pluralign.llm.policy import PersonalizedPolicy
    from pluralign.llm.toy import char_tokenizer, tiny_llama

    offline = read_trl(CONVERSATIONAL)
    path = tmp_path / "round-00.jsonl"
    path.write_text(_pairs_rows(offline))
    back = read_trl(path)
    assert back.messages == offline.messages and back.prompts == offline.prompts
    plain = read_trl([CONVERSATIONAL[1]])
    joined = _concat([offline, plain])
    assert joined.conversational
    assert joined.messages == [*offline.messages, None]
    assert joined.prompts == offline.prompts + plain.prompts

    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    policy = PersonalizedPolicy(
        tiny_llama(), tok, USERS, target_modules="all-linear", r=2, max_length=96
    )
    loop = _Loop(
        resolve_iterate_config(_config(tmp_path)),
        tmp_path,
        policy=policy,
        users=USERS,
        rows=[],
        eval_rows=[],
        gold=None,
        reward_model=None,
        offline=offline,
        progress=False,
    )
    refs, counts = loop.reference_logps(joined, None, {})
    assert counts == {"from_sampling": 0, "computed": 6}
    expected = reference_logprobs(policy, encode_dpo_pairs(policy, joined))
    np.testing.assert_allclose(refs, expected, rtol=1e-6)
    flat = policy.logprobs(
        joined.prompts, joined.chosen, [str(u) for u in joined.users], reference=True
    )
    assert abs(flat[0] - refs[0, 0]) > 1e-3  # the text would be another sequence
    # toy-llama's tokenizer has no chat template: a conversational offline file is refused
    conv = tmp_path / "conv.jsonl"
    conv.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONAL))
    with pytest.raises(ConfigError, match="no chat template"):
        _run(tmp_path, "conv", iterate={"offline": str(conv)})


def test_reference_stays_pi0_and_restart_resets_to_the_initialization(tmp_path):
    before = []
    report = _run(
        tmp_path,
        "restart",
        iterate={"restart": True, "pairs": "max_random"},
        before_dpo=lambda t, policy, data: before.append((t, policy.trainable_state(), data.n)),
    )
    policy = report["policy"]
    initial = before[0][1]
    # restart: the adapters before each round's training are the π0 initialization
    for _, state, _ in before:
        for k in initial:
            assert torch.equal(state[k], initial[k])
    # restart trains on all pairs so far
    assert before[1][2] == report["history"][1]["pairs"] + report["history"][2]["pairs"]
    # the reference is π0 whatever the adapters: identical to a fresh π0 built from the config
    from pluralign.llm.iterate import resolve_iterate_config
    from pluralign.llm.policy_job import build_policy

    fresh = build_policy(resolve_iterate_config(_config(tmp_path)), USERS)
    args = (["ab", "fa"], ["aeiou", "123"], USERS)
    np.testing.assert_array_equal(
        policy.logprobs(*args, reference=True), fresh.logprobs(*args, reference=True)
    )
    assert not np.allclose(policy.logprobs(*args), fresh.logprobs(*args))


def test_reference_logprobs_come_from_the_sampling_pass_or_one_pass_never_from_dpo(
    tmp_path, monkeypatch
):
    """log π0 of every pair is computed once for the run: from π0's sampling pass where the
    pair's DPO encoding is the sampled sequence, else by one reference pass; the DPO steps
    (every epoch, every restart) read them and never run the reference pass. sampler:
    reference draws every round from π0."""
    import inspect

    from pluralign.llm.iterate import STREAMS, resolve_iterate_config, round_seed
    from pluralign.llm.policy import PersonalizedPolicy
    from pluralign.llm.policy_job import build_policy

    in_dpo = []
    original = PersonalizedPolicy.sequence_logprobs

    def counted(self, *args, reference=False, **kwargs):
        if reference and inspect.stack()[1].function in ("_row_losses", "evaluate"):
            in_dpo.append(1)
        return original(self, *args, reference=reference, **kwargs)

    monkeypatch.setattr(PersonalizedPolicy, "sequence_logprobs", counted)
    settings = {"sampler": "reference", "restart": True, "n": 4, "max_new_tokens": 24}
    report = _run(tmp_path, "ref", iterate=settings)
    assert in_dpo == []
    out = tmp_path / "ref"
    reused = [r["reference_logps"] for r in report["history"][1:]]
    assert all(r["from_sampling"] > 0 and r["computed"] > 0 for r in reused)
    fresh = build_policy(resolve_iterate_config(_config(tmp_path, **settings)), USERS)
    for t in (1, 2):
        pairs = read_trl(out / f"round-{t:02d}.jsonl")
        refs = np.load(out / "state" / f"reference-{t:02d}.npy")
        assert refs.shape == (pairs.n, 2)
        assert reused[t - 1]["from_sampling"] + reused[t - 1]["computed"] == 2 * pairs.n
        users = [str(u) for u in pairs.users]
        for side, texts in enumerate((pairs.chosen, pairs.rejected)):
            np.testing.assert_allclose(
                refs[:, side],
                fresh.logprobs(pairs.prompts, texts, users, reference=True),
                atol=1e-4,
                rtol=0,
            )
        # every round's candidates are π0's samples of that round's seed
        prompts = [p for p in PROMPTS for _ in USERS]
        rows_users = [u for _ in PROMPTS for u in USERS]
        pi0 = fresh.generate(
            prompts,
            rows_users,
            n=4,
            max_new_tokens=24,
            reference=True,
            seed=round_seed(0, t, STREAMS["generate"]),
            batch_size=8,
        )
        candidates = {
            (p, u): set(g) for p, u, g in zip(prompts, rows_users, pi0.texts, strict=True)
        }
        for p, c, r, u in zip(pairs.prompts, pairs.chosen, pairs.rejected, users, strict=True):
            assert {c, r} <= candidates[(p, u)]
    # the exact per-token KL: 0 at π0, positive after training
    for v in report["history"][0]["users"].values():
        assert v["kl_token"] == 0.0
    for v in report["history"][-1]["users"].values():
        assert v["kl_token"] > 0


def test_resume_matches_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    full = _run(tmp_path, "full", iterate={"pairs": "max_random"})
    first = _run(tmp_path, "part", iterate={"pairs": "max_random"}, stop_after=1)
    assert [r["round"] for r in first["history"]] == [0, 1]
    rest = _run(tmp_path, "part", iterate={"pairs": "max_random"})
    assert rest["resumed_from"] == 1
    assert rest["history"] == full["history"]
    a = load_file(tmp_path / "full" / "state" / "adapters-02.safetensors")
    b = load_file(tmp_path / "part" / "state" / "adapters-02.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)

    # a killed run (an exception after round 1) resumes the same way
    def boom(t, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "killed", iterate={"pairs": "max_random"}, on_round=boom)
    again = _run(tmp_path, "killed", iterate={"pairs": "max_random"})
    assert again["resumed_from"] == 1 and again["history"] == full["history"]


# ---------------------------------------------------------------------- bad input
def test_a_changed_config_on_resume_is_refused_naming_the_keys(tmp_path):
    _run(tmp_path, "run", stop_after=1)
    config = _config(tmp_path, n=4)
    config["dpo"]["beta"] = 0.2
    with pytest.raises(ConfigError, match=r"changed: dpo\.beta, iterate\.n"):
        run_iterate(config, out=tmp_path / "run", progress=False)
    # more rounds is not a change: the run continues
    report = run_iterate(_config(tmp_path, rounds=2), out=tmp_path / "run", progress=False)
    assert report["resumed_from"] == 1
    # --no-resume starts over
    report = run_iterate(config, out=tmp_path / "run", progress=False, resume=False, stop_after=1)
    assert report["resumed_from"] is None


def test_a_setting_added_later_keeps_a_saved_run_resumable_at_its_default(tmp_path):
    """A run saved before a setting existed (its config lacks the key) resumes while the
    setting keeps its default, and is refused, naming it, when it is set otherwise."""
    _run(tmp_path, "run", stop_after=1)
    state_file = tmp_path / "run" / "state" / "state.json"
    state = json.loads(state_file.read_text())
    del state["fingerprint"]["config"]["iterate"]["sampler"]  # as an older pluralign saved
    del state["fingerprint"]["config"]["train"]["logging_steps"]
    state_file.write_text(json.dumps(state))
    report = run_iterate(_config(tmp_path), out=tmp_path / "run", progress=False, stop_after=1)
    assert report["resumed_from"] == 1
    state = json.loads(state_file.read_text())
    del state["fingerprint"]["config"]["iterate"]["sampler"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"changed: iterate\.sampler\. Use"):
        run_iterate(_config(tmp_path, sampler="reference"), out=tmp_path / "run", progress=False)


def test_a_round_of_ties_warns_records_and_skips_dpo(tmp_path):
    def flat(texts, users):
        return np.full(len(texts), 0.5)

    gold = GoldOracle("flat", USERS, flat, lambda texts: np.ones((len(texts), 2)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _run(tmp_path, "ties", gold=gold, iterate={"rounds": 1})
    assert any(
        issubclass(w.category, PluralignWarning) and "DPO step is skipped" in str(w.message)
        for w in caught
    )
    record = report["history"][1]
    assert record["pairs"] == 0 and record["dpo"]["skipped"]
    assert record["ties"] == sum(v["ties"] for v in record["users"].values()) > 0
    # the policy did not move: KL 0
    for v in record["users"].values():
        assert abs(v["kl"]) < 1e-9
    assert (tmp_path / "ties" / "round-01.jsonl").read_text() == ""


def test_prompts_without_a_user_are_refused(tmp_path):
    config = _config(tmp_path)
    config["iterate"]["prompts"] = _prompts(tmp_path / "nouser.jsonl", with_user=False)
    with pytest.raises(DataValidationError, match="user_id"):
        run_iterate(config, out=tmp_path / "x", progress=False)


def test_a_reward_model_of_other_users_is_refused(tmp_path):
    from pluralign.llm.policy import all_linear_modules
    from pluralign.llm.reward_model import PersonalizedRewardModel
    from pluralign.llm.toy import char_tokenizer, tiny_llama

    backbone = tiny_llama(seed=5).model
    rm = PersonalizedRewardModel(
        backbone,
        char_tokenizer(),
        ["vowels", "someone"],
        target_modules=all_linear_modules(backbone),
        r=2,
        pooling="mean",
        max_length=48,
    )
    with pytest.raises(ConfigError, match=r"other users than the policy.*digits"):
        _run(tmp_path, "rm", reward_model=rm)


def test_bad_iterate_settings_are_refused(tmp_path):
    for key, value, match in (
        ("pairs", "best", "iterate.pairs"),
        ("annotator", "gold:nope", "iterate.annotator"),
        ("annotator", "reward_model", "iterate.reward_model is required"),
        ("n", 1, "iterate.n"),
        ("restart", "yes", "iterate.restart"),
    ):
        with pytest.raises(ConfigError, match=match):
            _run(tmp_path, "bad", iterate={key: value})
    config = _config(tmp_path)
    config["dpo"]["loss_type"] = "pessimistic"
    config["dpo"]["reward_model"] = "somewhere"
    with pytest.raises(ConfigError, match="pessimistic"):
        run_iterate(config, out=tmp_path / "bad", progress=False)


# ---------------------------------------------------------------------- CLI
def test_cli_runs_the_packaged_toy_config(tmp_path):
    from typer.testing import CliRunner

    from pluralign.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "iterate",
            "configs/iterate_toy.yaml",
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "iterate.rounds=1",
            "--set",
            "iterate.n=2",
            "--set",
            "iterate.eval_samples=1",
            "--set",
            "iterate.max_new_tokens=4",
            "--set",
            "train.num_train_epochs=1",
            "--set",
            "iterate.pairs=enhancer",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in (
        "history.json",
        "rounds.md",
        "rounds.png",
        "round-01.jsonl",
        "config.yaml",
        "state/state.json",
    ):
        assert (out / name).is_file(), name
    assert "win vs π0" in result.output
    bad = CliRunner().invoke(
        app,
        [
            "iterate",
            "configs/iterate_toy.yaml",
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "iterate.rounds=1",
        ],
    )
    assert bad.exit_code != 0 and "changed:" in bad.output


def test_docs_hold_the_generated_iterate_settings_table():
    """docs/iterate.md's table is settings_table's output (regenerate it after a change)."""
    from pathlib import Path

    from pluralign.llm.config import IterateConfig
    from pluralign.llm.iterate import ITERATE_TOP_LEVEL
    from pluralign.settings import settings_table

    docs = (Path(__file__).resolve().parents[2] / "docs" / "iterate.md").read_text()
    assert settings_table({"iterate": IterateConfig}, ITERATE_TOP_LEVEL) in docs
