"""`pluralign train-rm`: outputs, resume, bad input, and a 2-process accelerate run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.data.loaders import read_trl
from pluralign.llm import ExportedReward, per_user_metrics, split_per_user

PERSONAS = Path(__file__).parents[1] / "fixtures" / "personas.jsonl"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _config(tmp_path: Path, model: str, **sections) -> Path:
    config = {
        "model": {"name_or_path": model, "max_length": 96},
        "lora": {"r": 4, "share": "B"},
        "data": {"train": str(PERSONAS), "test_size": 0.25},
        "train": {"num_train_epochs": 2, "learning_rate": 1e-2, "train_batch_size": 16},
        "out": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _last_checkpoint(out: Path) -> dict:
    return load_file(sorted((out / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors")


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-rm")
    config = _config(folder, tiny_bert)
    result = invoke("train-rm", config, "--no-progress")
    assert result.exit_code == 0, result.output
    return folder, config, result.output


def test_train_rm_writes_report_plot_and_adapters_that_reproduce_it(trained):
    folder, _, output = trained
    out = folder / "run"
    for name in (
        "config.yaml",
        "per_user_accuracy.json",
        "accuracy.png",
        "history.json",
        "adapters/users.json",
    ):
        assert (out / name).is_file(), name
    assert "held-out acc." in output and "36 steps" not in output  # 2 epochs × 12 batches
    # config.yaml: the resolved plain mapping with the current names, which resolves again
    from pluralign.llm.job import resolve_rm_config
    from pluralign.settings import to_plain

    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["train"]["learning_rate"] == 1e-2 and written["lora"]["lora_alpha"] == 16.0
    assert to_plain(resolve_rm_config(written)) == written
    report = json.loads((out / "per_user_accuracy.json").read_text())
    assert report["summary"]["steps"] == 24 and report["summary"]["n_test"] == 60
    assert [r["user"] for r in report["users"]] == ["ana", "ben", "chen", "dara", "eli", "fay"]
    # the held-out accuracy of each user, recomputed from its exported PEFT adapter alone
    _, test = split_per_user(read_trl(PERSONAS), 0.25, seed=0)
    users = np.array([str(u) for u in test.users])
    for row in report["users"][:2]:
        u = row["user"]
        rows = test.subset(np.flatnonzero(users == u))
        reward = ExportedReward(out / "adapters" / u)
        margins = reward.score(rows.prompts, rows.chosen) - reward.score(
            rows.prompts, rows.rejected
        )
        again = per_user_metrics(margins, [u] * rows.n)
        assert row["test_accuracy"] == pytest.approx(again["accuracy"])
        assert row["test_loss"] == pytest.approx(again["loss"], abs=1e-5)
        assert row["n_test"] == rows.n == 10
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and "eval_accuracy" in history[0]


def test_train_rm_again_resumes_from_the_finished_checkpoint(trained):
    folder, config, _ = trained
    out = folder / "run"
    before = json.loads((out / "per_user_accuracy.json").read_text())
    result = invoke("train-rm", config, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output
    after = json.loads((out / "per_user_accuracy.json").read_text())
    assert after["users"] == before["users"]
    assert after["summary"]["resumed_from"].endswith("step-0000024")


def test_two_accelerate_processes_train_the_same_model(trained, tiny_bert, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each takes half of every batch, and
    the model equals the single-process one up to float summation order."""
    folder, _, _ = trained
    config = _config(tmp_path, tiny_bert)
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    pluralign = shutil.which("pluralign", path=os.path.dirname(sys.executable))
    assert accelerate and pluralign
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            pluralign,
            "train-rm",
            str(config),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    report = json.loads((tmp_path / "run" / "per_user_accuracy.json").read_text())
    single = json.loads((folder / "run" / "per_user_accuracy.json").read_text())
    assert report["summary"]["processes"] == 2 and report["summary"]["steps"] == 24
    ours, theirs = _last_checkpoint(tmp_path / "run"), _last_checkpoint(folder / "run")
    for key in theirs:
        assert np.allclose(ours[key].numpy(), theirs[key].numpy(), atol=1e-5), key
    for a, b in zip(report["users"], single["users"], strict=True):
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-4)


def _bad_rows(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROW = {"prompt": "p", "chosen": "a", "rejected": "b", "user_id": "ana"}


@pytest.mark.parametrize(
    "case,message",
    [
        ("unknown_key", "unknown key(s) ['epoch'] in 'train'"),
        ("share", "lora.share must be one of"),
        ("missing_column", "line 2, field 'rejected'"),
        ("empty_user", "line 1, field 'user_id'"),
        ("unknown_eval_user", "line 2, field 'user_id': unknown user 'zoe'"),
        ("no_pad", "no pad token"),
        ("no_model", "model.name_or_path is required"),
        ("bad_target", "match no nn.Linear"),
        ("missing_model", "model folder not found"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, tiny_bert, tiny_llama, case, message):
    model = tiny_bert
    kwargs: dict = {}
    if case == "unknown_key":
        kwargs["train"] = {"epoch": 2}
    elif case == "share":
        kwargs["lora"] = {"share": "C"}
    elif case == "missing_column":
        bad = _bad_rows(tmp_path, [ROW, {k: v for k, v in ROW.items() if k != "rejected"}])
        kwargs["data"] = {"train": str(bad)}
    elif case == "empty_user":
        kwargs["data"] = {"train": str(_bad_rows(tmp_path, [{**ROW, "user_id": ""}]))}
    elif case == "unknown_eval_user":
        kwargs["data"] = {"eval": str(_bad_rows(tmp_path, [ROW, {**ROW, "user_id": "zoe"}]))}
    elif case == "no_pad":
        from transformers import AutoTokenizer

        model = str(tmp_path / "no-pad")
        shutil.copytree(tiny_llama, model)
        tokenizer = AutoTokenizer.from_pretrained(model)
        tokenizer.pad_token = None
        tokenizer.save_pretrained(model)
    elif case == "no_model":
        model = ""
    elif case == "missing_model":
        model = str(tmp_path / "no-such-model")
    elif case == "bad_target":
        kwargs["lora"] = {"target_modules": ["q_proj"]}
    config = _config(tmp_path, model, **kwargs)
    if case == "no_model":
        raw = yaml.safe_load(config.read_text())
        raw.pop("model")
        config.write_text(yaml.safe_dump(raw))
    result = invoke("train-rm", config, "--no-progress")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "run" / "adapters").exists()  # nothing trained on wrong rows


def test_set_overrides_and_config_validation():
    from pluralign.errors import ConfigError
    from pluralign.llm.job import apply_overrides, resolve_rm_config

    raw = {"model": "some/model", "data": {"train": "x.jsonl"}}
    resolved = resolve_rm_config(
        apply_overrides(
            raw,
            [
                "lora.share=A",
                "train.learning_rate=1e-3",
                "lora.target_modules=[query, value]",
                "out=runs/x",
                "model.max_length=64",
            ],
        )
    )
    assert resolved["lora"].share == "A" and resolved["train"].learning_rate == 1e-3
    assert resolved["lora"].target_modules == ["query", "value"]
    assert resolved["model"].name_or_path == "some/model"
    assert resolved["model"].max_length == 64
    assert resolved["out"] == "runs/x" and raw == {
        "model": "some/model",
        "data": {"train": "x.jsonl"},
    }
    for bad, message in [
        (["lora.share"], "KEY=VALUE"),
        (["train.num_train_epochs=two"], "train.num_train_epochs"),
        (["train.save_steps=0"], "train.save_steps"),
        (["train.lr=1e-3"], "renamed to 'learning_rate'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve_rm_config(apply_overrides(raw, bad))
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_rm_config({**raw, "num_train_epochs": 3})
