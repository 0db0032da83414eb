"""``pluralign report FOLDER`` on every kind of output folder: it knows the folder by its files
and prints what the command that wrote it printed at its end (the same tables, through the
same code), and with ``--json`` the same document as that command's ``--json``.

fit, train-policy (toy Llama, one epoch) and iterate (toy Llama, one round) run for real;
train-rm has no toy model, so its job is a stub that writes the files the real job writes.
For the LLM commands the ``--json`` run reuses the report of the real job (recorded from the
first run): one training per kind, the command's own JSON printing of that result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_output import invoke, narrow_fallback, table_rows  # noqa: F401

from pluralign.cli import llm as cli_llm

pytestmark = pytest.mark.usefixtures("narrow_fallback")


def assert_same_ending(command_stdout: str, report_stdout: str) -> None:
    """``report`` prints exactly what the command printed at its end (after its progress)."""
    assert report_stdout.strip(), "report printed nothing"
    assert command_stdout.endswith(report_stdout), (command_stdout, report_stdout)


def _recording(monkeypatch) -> list[tuple[dict[str, Any], Any]]:
    """Run the real job, and keep its ``(raw config, report)``."""
    calls: list[tuple[dict[str, Any], Any]] = []
    real = cli_llm.run_llm_job

    def job(*args: Any, **kwargs: Any):
        result = real(*args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(cli_llm, "run_llm_job", job)
    return calls


def _replay(monkeypatch, result: tuple[dict[str, Any], Any]) -> None:
    monkeypatch.setattr(cli_llm, "run_llm_job", lambda *args, **kwargs: result)


# ---------------------------------------------------------------------------------------- fit
def test_report_of_a_fit_folder(tmp_path):
    from pluralign.data import save_preferences
    from pluralign.envs import MultiUser

    env = MultiUser(n_users=4, d_phi=5, rank=2, diversity=1.0, n_per_user=40, seed=0)
    data = save_preferences(env.sample_offline(seed=[1]), tmp_path / "prefs.jsonl")
    out = tmp_path / "model"
    fitted = invoke("fit", data, "--rank", "2", "--out", out)
    assert fitted.exit_code == 0, fitted.output
    shown = invoke("report", out)
    assert shown.exit_code == 0, shown.output
    assert len(table_rows(shown.stdout)) == 4
    assert table_rows(shown.stdout) == table_rows(fitted.stdout)
    assert_same_ending(fitted.stdout, shown.stdout)
    assert f"shared_basis on {data} (4 users, d_phi=5)" in shown.stdout.splitlines()[0]

    fitted_json = invoke("fit", data, "--rank", "2", "--out", out, "--json")
    assert fitted_json.exit_code == 0, fitted_json.output
    shown_json = invoke("report", out, "--json")
    assert shown_json.exit_code == 0, shown_json.output
    assert json.loads(shown_json.stdout) == json.loads(fitted_json.stdout)

    refused = invoke("report", out, "--markdown", "suboptimality")
    assert refused.exit_code == 2
    assert "--markdown is for run folders" in " ".join(refused.output.split())


# ----------------------------------------------------------------------------------- train-rm
def _rm_job(out: Path):
    """A stub of the train-rm job: writes what its ``write_run`` writes (and config.yaml, so
    that the folder is not taken for a run folder), returns the report."""
    users = [
        {
            "user": u,
            "n_train": 30 + i,
            "train_accuracy": 0.912345678 - i / 7,
            "train_loss": 0.3123456789,
            "n_test": 10,
            "test_accuracy": 0.8123456789 - i / 9,
            "test_loss": 0.41234567,
        }
        for i, u in enumerate(["ana", "ben", "cy"])
    ]
    summary = {
        "model": "tiny-bert",
        "share": "B",
        "r": 4,
        "users": 3,
        "n_train": 93,
        "n_test": 30,
        "train_accuracy": 0.8765432198,
        "test_accuracy": 0.7654321987,
        "test_mean_user_accuracy": 0.76,
        "test_loss": float("nan"),
        "steps": 24,
        "resumed_from": None,
        "processes": 1,
    }
    report = {"summary": summary, "users": users}

    def job(command, module, function, config, overrides, **kwargs):
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text("model: {name_or_path: tiny-bert}\n")
        (out / "per_user_accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "history.json").write_text("[]\n")
        return {"out": str(out)}, report

    return job


def test_report_of_a_train_rm_folder(monkeypatch, tmp_path):
    out = tmp_path / "rm"
    monkeypatch.setattr(cli_llm, "run_llm_job", _rm_job(out))
    trained = invoke("train-rm", tmp_path / "c.yaml", "--out", out)
    assert trained.exit_code == 0, trained.output
    trained_json = invoke("train-rm", tmp_path / "c.yaml", "--out", out, "--json")
    assert trained_json.exit_code == 0, trained_json.output

    shown = invoke("report", out)
    assert shown.exit_code == 0, shown.output
    assert len(table_rows(shown.stdout)) == 4  # 3 users and "all"
    assert table_rows(shown.stdout) == table_rows(trained.stdout)
    assert_same_ending(trained.stdout, shown.stdout)
    shown_json = invoke("report", out, "--json")
    assert shown_json.exit_code == 0, shown_json.output
    doc = json.loads(shown_json.stdout)
    assert doc == json.loads(trained_json.stdout)
    assert doc["summary"]["test_loss"] is None  # NaN in the file, null in strict JSON


# ------------------------------------------------------------------------------- train-policy
def test_report_of_a_train_policy_folder(monkeypatch, tmp_path):
    out = tmp_path / "policy"
    calls = _recording(monkeypatch)
    trained = invoke(
        "train-policy",
        "policy_toy",
        "--out",
        out,
        "--no-progress",
        "--set",
        "train.num_train_epochs=1",
    )
    assert trained.exit_code == 0, trained.output
    _replay(monkeypatch, calls[0])
    trained_json = invoke("train-policy", "policy_toy", "--out", out, "--json")
    assert trained_json.exit_code == 0, trained_json.output

    shown = invoke("report", out)
    assert shown.exit_code == 0, shown.output
    assert [r[0] for r in table_rows(shown.stdout)] == ["vowels", "digits", "all"]
    assert table_rows(shown.stdout) == table_rows(trained.stdout)
    assert_same_ending(trained.stdout, shown.stdout)
    shown_json = invoke("report", out, "--json")
    assert shown_json.exit_code == 0, shown_json.output
    assert json.loads(shown_json.stdout) == json.loads(trained_json.stdout)


# ------------------------------------------------------------------------------------ iterate
def test_report_of_an_iterate_folder(monkeypatch, tmp_path):
    out = tmp_path / "iterate"
    calls = _recording(monkeypatch)
    ran = invoke(
        "iterate", "iterate_toy", "--out", out, "--no-progress", "--set", "iterate.rounds=1"
    )
    assert ran.exit_code == 0, ran.output
    _replay(monkeypatch, calls[0])
    ran_json = invoke("iterate", "iterate_toy", "--out", out, "--json")
    assert ran_json.exit_code == 0, ran_json.output

    shown = invoke("report", out)
    assert shown.exit_code == 0, shown.output
    rows = [line for line in shown.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 2 * 2  # the header and its rule, rounds 0 and 1 of two users
    assert_same_ending(ran.stdout, shown.stdout)
    assert f"wrote {out}/history.json" in shown.stdout
    shown_json = invoke("report", out, "--json")
    assert shown_json.exit_code == 0, shown_json.output
    assert json.loads(shown_json.stdout) == json.loads(ran_json.stdout)


# -------------------------------------------------------------------------------- not a folder
def test_report_of_an_unknown_folder_names_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("not an output\n")
    for args in ([], ["--json"]):
        result = invoke("report", tmp_path, *args)
        assert result.exit_code == 2
        assert result.stdout == ""
        message = " ".join(result.stderr.split())
        assert "not a pluralign output folder" in message
        for name in (
            "report.json",
            "per_user_accuracy.json",
            "per_user.json",
            "history.json",
            "rounds.md",
            "config.yaml",
        ):
            assert name in message
    missing = invoke("report", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "is not a folder" in " ".join(missing.stderr.split())
