"""What the CLI prints when stdout is not a terminal (piped into a file or a program): whole
table cells and unbroken paths, and ``--json``: one JSON document with the numbers of the run's
own output files and nothing else on stdout.

``CliRunner`` captures stdout in a buffer, which is not a TTY, like ``pluralign run > log``.
``COLUMNS=80`` is set so that rich's fallback width for such a stream is 80 columns whatever
terminal the tests run in (rich reads the size of stdin/stderr and ``COLUMNS``): the width at
which the old output cut and wrapped cells and paths.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_output import invoke, narrow_fallback, table_rows  # noqa: F401

from pluralign.cli import llm as cli_llm
from pluralign.cli import output
from pluralign.experiments import EXPERIMENTS, read_results

# a folder whose paths are far longer than 80 columns
LONG = (
    "a_rather_long_folder_name_for_piped_output/"
    "and_another_long_level_so_paths_exceed_eighty_columns"
)


pytestmark = pytest.mark.usefixtures("narrow_fallback")


def fmt(mean: float | None, se: float | None) -> str:
    """A summary cell as ``pluralign run`` formats it: mean (4 significant digits) ± standard
    error (2), the mean alone for one repeat, — for a metric the method does not report."""
    if mean is None:
        return "—"
    if se is None or math.isnan(se):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {se:.2g}"


def read_summary_csv(path: Path) -> list[dict[str, Any]]:
    """summary.csv with numbers parsed (an empty cell: the metric is not reported)."""
    records = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            record: dict[str, Any] = {}
            for key, value in row.items():
                if value == "":
                    continue
                if key in ("n", "count"):
                    record[key] = int(value)
                elif key.endswith(("_mean", "_se")):
                    record[key] = float(value)
                else:
                    record[key] = value
            records.append(record)
    return records


def json_numbers(record: dict[str, Any]) -> dict[str, Any]:
    """A JSON summary record as summary.csv holds it (JSON's null is the CSV's nan)."""
    return {k: (float("nan") if v is None else v) for k, v in record.items()}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal records, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        (
            isinstance(a[k], float)
            and isinstance(b[k], float)
            and math.isnan(a[k])
            and math.isnan(b[k])
        )
        or a[k] == b[k]
        for k in a
    )


def assert_report_tables(stdout: str, out: Path) -> None:
    """Every row of summary.csv is printed whole: one table line per method × n whose cells are
    exactly the formatted numbers, nothing cut to '…', and the output paths on one line."""
    assert "…" not in stdout
    experiment = EXPERIMENTS["loco"]
    metrics = [*(experiment.table_metrics or experiment.metrics), "fit_seconds"]
    expected = [
        [
            r["method"],
            str(r["n"]),
            str(r["count"]),
            *(fmt(r.get(f"{m}_mean"), r.get(f"{m}_se")) for m in metrics),
        ]
        for r in read_summary_csv(out / "summary.csv")
    ]
    assert sorted(table_rows(stdout)) == sorted(expected)
    lines = stdout.splitlines()
    for name in ("results.jsonl", "summary.csv", "suboptimality.png"):
        path = str(out / name)
        assert len(path) > 100
        assert any(path in line for line in lines), (path, stdout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_config_module):
    """A finished tiny LoCo run (2 methods × 1 N × 2 repeats) in a deep folder, and the
    stdout of `pluralign run` for it (stdout piped)."""
    folder = tmp_path_factory.mktemp("piped")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_module))
    out = folder / LONG / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("COLUMNS", "80")
    try:
        result = invoke("run", config, "--out", out, "--jobs", "1", "--no-progress")
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    return config, out, result


@pytest.fixture(scope="module")
def tiny_config_module():
    from conftest import TINY_CONFIG

    return {**TINY_CONFIG, "repeats": 2, "n_samples": [40]}


def test_run_piped_prints_whole_cells_and_unbroken_paths(finished):
    _, out, result = finished
    assert result.stderr == ""
    assert_report_tables(result.stdout, out)
    assert len(table_rows(result.stdout)) == 2  # fullrank_greedy and linear_greedy at N=40


def test_report_piped_prints_the_same_whole_tables(finished):
    _, out, run_result = finished
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    assert_report_tables(result.stdout, out)
    assert table_rows(result.stdout) == table_rows(run_result.stdout)


def _check_json_document(doc: dict[str, Any], out: Path) -> None:
    """The document's numbers are those of summary.csv and results.jsonl, at full
    precision."""
    assert doc["experiment"] == "loco" and Path(doc["out"]) == out
    assert doc["files"] == {
        "results": str(out / "results.jsonl"),
        "summary": str(out / "summary.csv"),
        "plot": str(out / "suboptimality.png"),
    }
    written = read_summary_csv(out / "summary.csv")
    key = lambda r: (r["setting"], r["method"], r["n"])  # noqa: E731
    assert len(doc["summary"]) == len(written) == 2
    for ours, theirs in zip(sorted(doc["summary"], key=key), sorted(written, key=key), strict=True):
        assert same(json_numbers(ours), theirs), (ours, theirs)
    rows = read_results(out / "results.jsonl")
    for record in doc["summary"]:
        group = [
            r
            for r in rows
            if (r["setting"], r["method"], r["n"])
            == (record["setting"], record["method"], record["n"])
        ]
        assert record["count"] == len(group) == 2
        for metric in ("suboptimality", "heldout_loglik", "fit_seconds"):
            values = [r[metric] for r in group]
            assert record[f"{metric}_mean"] == pytest.approx(sum(values) / len(values), rel=1e-12)
    assert [c["claim"][:2] for c in doc["claims"]] == ["C1", "C2", "C4"]
    assert all(set(c) == {"claim", "held", "detail"} for c in doc["claims"])


def test_run_json_is_one_document_of_the_written_numbers(finished):
    """`run --json` (here resuming the finished run, with its progress bar on) prints only
    the JSON document on stdout; the progress bar goes to stderr."""
    config, out, _ = finished
    result = invoke("run", config, "--out", out, "--jobs", "1", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    _check_json_document(doc, out)
    assert "units" in result.stderr and "units" not in result.stdout


def test_report_json_equals_the_run_files_and_run_json(finished):
    config, out, _ = finished
    result = invoke("report", out, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    doc = json.loads(result.stdout)
    _check_json_document(doc, out)
    again = json.loads(invoke("run", config, "--out", out, "--json", "--no-progress").stdout)
    assert again["summary"] == doc["summary"] and again["claims"] == doc["claims"]


def test_report_through_a_real_pipe(finished):
    """A real ``pluralign`` process whose stdout is a pipe (stdin and stderr too)."""
    _, out, _ = finished
    exe = shutil.which("pluralign", path=os.path.dirname(sys.executable))
    assert exe
    env = {**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [exe, "report", str(out)], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert_report_tables(proc.stdout, out)


def test_json_errors_go_to_stderr_and_leave_stdout_empty(tmp_path, finished):
    config, out, _ = finished
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "methods": ["nope"]}))
    result = invoke("run", bad, "--out", tmp_path / "o", "--json", "--no-progress")
    assert result.exit_code == 2
    assert result.stdout == "" and "nope" in result.stderr
    result = invoke("report", out, "--json", "--markdown", "suboptimality")
    assert result.exit_code == 2
    assert result.stdout == "" and "--json" in result.stderr


# ------------------------------------------------------------------------------------- fit
@pytest.fixture(scope="module")
def numeric(tmp_path_factory):
    from pluralign.data import save_preferences
    from pluralign.envs import MultiUser

    folder = tmp_path_factory.mktemp("fit") / LONG
    folder.mkdir(parents=True)
    env = MultiUser(n_users=4, d_phi=5, rank=2, diversity=1.0, n_per_user=40, seed=0)
    return save_preferences(env.sample_offline(seed=[1]), folder / "prefs.jsonl")


def test_fit_piped_and_json(numeric, tmp_path):
    out = tmp_path / LONG / "model"
    result = invoke("fit", numeric, "--rank", "2", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert "…" not in result.stdout
    expected = [
        [
            str(r["user"]),
            str(r["n_train"]),
            f"{r['train_accuracy']:.3f}",
            str(r["n_test"]),
            f"{r['test_accuracy']:.3f}",
        ]
        for r in report["users"]
    ]
    assert table_rows(result.stdout) == expected
    lines = result.stdout.splitlines()
    assert f"shared_basis on {numeric} (4 users, d_phi=5)" in lines[0]
    assert any(f"model and report in {out}" in line for line in lines)

    again = invoke("fit", numeric, "--rank", "2", "--out", out, "--json")
    assert again.exit_code == 0, again.output
    doc = json.loads(again.stdout)
    report = json.loads((out / "report.json").read_text())
    assert doc["summary"] == report["summary"] and doc["users"] == report["users"]
    assert doc["files"]["report"] == str(out / "report.json")


# ---------------------------------------------------- train-rm, train-policy, iterate, generate
# The printing of the LLM commands, with the job replaced by a stub that returns a report (of
# numbers with many digits) and prints progress lines as a real job does.

MODEL = "/models/" + LONG + "/tiny-backbone"
USERS = [f"user_with_a_long_identifier_{i:04d}" for i in range(3)]


def _stub_job(report: dict[str, Any]):
    def job(command, module, function, config, overrides, **kwargs):
        print("progress line of the job")
        output.console.print("a rich progress line")
        if "log" in kwargs:
            kwargs["log"]("round 1/1: a log line")
        return {"out": kwargs["out"]}, report

    return job


def _rm_report() -> dict[str, Any]:
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
        for i, u in enumerate(USERS)
    ]
    summary = {
        "model": MODEL,
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
    return {"summary": summary, "users": users}


def _policy_report() -> dict[str, Any]:
    report = _rm_report()
    for i, row in enumerate(report["users"]):
        row.update(test_margin=1.23456789 + i, test_kl=0.0123456789 * (i + 1), train_kl=0.5)
    report["summary"].update(beta=0.1, loss_type="sigmoid", test_margin=2.3456789, kl=0.0456789123)
    return report


@pytest.mark.parametrize("command", ["train-rm", "train-policy"])
def test_llm_training_commands_piped_and_json(monkeypatch, tmp_path, command):
    report = _rm_report() if command == "train-rm" else _policy_report()
    monkeypatch.setattr(cli_llm, "run_llm_job", _stub_job(report))
    out = tmp_path / LONG / "run"
    config = tmp_path / "c.yaml"
    result = invoke(command, config, "--out", out)
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    s = report["summary"]
    if command == "train-rm":
        title = f"per-user accuracy ({MODEL}, share=B, r=4)"
        expected = [
            [
                r["user"],
                str(r["n_train"]),
                f"{r['train_accuracy']:.3f}",
                str(r["n_test"]),
                f"{r['test_accuracy']:.3f}",
            ]
            for r in report["users"]
        ]
        expected.append(
            ["all", "93", f"{s['train_accuracy']:.3f}", "30", f"{s['test_accuracy']:.3f}"]
        )
        wrote = f"wrote {out}/per_user_accuracy.json, accuracy.png, adapters/"
    else:
        title = f"per-user DPO ({MODEL}, share=B, r=4, beta=0.1, sigmoid)"
        expected = [
            [
                r["user"],
                str(r["n_train"]),
                f"{r['train_accuracy']:.3f}",
                str(r["n_test"]),
                f"{r['test_accuracy']:.3f}",
                f"{r['test_margin']:.3g}",
                f"{r['test_kl']:.3g}",
            ]
            for r in report["users"]
        ]
        expected.append(
            [
                "all",
                "93",
                f"{s['train_accuracy']:.3f}",
                "30",
                f"{s['test_accuracy']:.3f}",
                f"{s['test_margin']:.3g}",
                f"{s['kl']:.3g}",
            ]
        )
        wrote = f"wrote {out}/per_user.json, per_user.png, adapters/"
    assert table_rows(result.stdout) == expected
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert title in lines
    assert any(wrote in line for line in lines)

    result = invoke(command, config, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # the job's progress lines went to stderr
    assert "progress line of the job" in result.stderr and "a rich progress line" in result.stderr
    assert doc["users"] == report["users"] and Path(doc["out"]) == out
    assert doc["summary"] == {**s, "test_loss": None}  # NaN is null: strict JSON


def test_iterate_json_sends_round_lines_to_stderr(monkeypatch, tmp_path):
    history = [
        {
            "round": 0,
            "users": {USERS[0]: {"gold": 0.123456789, "kl": 0.0, "win_rate": 0.5}},
            "pairs": None,
            "dpo": None,
        },
        {
            "round": 1,
            "users": {
                USERS[0]: {
                    "pairs": 8,
                    "ties": 1,
                    "gold": 0.23456789,
                    "kl": 0.0123456,
                    "win_rate": 0.625,
                }
            },
            "pairs": 8,
            "dpo": {"n": 8, "steps": 2, "accuracy": 0.75},
        },
    ]
    out = tmp_path / LONG / "iterate"
    report = {
        "history": history,
        "timings": [{"round": 1, "seconds": 1.5}],
        "out": str(out),
        "resumed_from": None,
        "policy": object(),
        "sigma": None,
    }
    monkeypatch.setattr(cli_llm, "run_llm_job", _stub_job(report))
    result = invoke("iterate", tmp_path / "c.yaml", "--out", out)
    assert result.exit_code == 0, result.output
    assert "round 1/1: a log line" in result.stdout
    assert any(f"wrote {out}/history.json" in line for line in result.stdout.splitlines())
    result = invoke("iterate", tmp_path / "c.yaml", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert "round 1/1: a log line" in result.stderr
    assert doc["history"] == history and doc["timings"] == report["timings"]
    assert doc["files"]["history"] == str(out / "history.json")


def test_generate_piped_and_json(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    import pluralign.llm.policy_job as policy_job

    response = "a response of well over eighty characters, " * 3

    class Policy:
        checkpoint_ = str(tmp_path / "checkpoints" / "step-0000010")

        def generate(self, texts, who, n, **kwargs):
            return type(
                "Samples", (), {"texts": [[f"{response}#{j}" for j in range(n)] for _ in texts]}
            )()

    monkeypatch.setattr(policy_job, "load_policy", lambda run, users: Policy())
    run = tmp_path / LONG / "policy"
    args = ("generate", run, "--prompt", "hi", "--user", USERS[0], "--n", "2")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert table_rows(result.stdout) == [
        [USERS[0], "hi", f"{response}#{j}".strip()] for j in range(2)
    ]
    assert any(f"responses of {run} (step-0000010)" in line for line in result.stdout.splitlines())
    jsonl = tmp_path / "responses.jsonl"
    result = invoke(*args, "--json", "--out", jsonl)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["checkpoint"] == "step-0000010" and Path(doc["run"]) == run
    assert doc["responses"] == [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["response"] for r in doc["responses"]] == [f"{response}#{j}" for j in range(2)]


# -------------------------------------------------------------------------- the console itself
class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, []

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_console_width_is_the_terminals_on_a_tty_and_unlimited_when_piped():
    from rich.table import Table

    tty, piped = _Stream(True), _Stream(False)
    assert output.OutputConsole(file=tty).width == 80  # COLUMNS, as rich reads it
    assert output.OutputConsole(file=piped).width == output.PIPED_WIDTH
    table = Table()
    table.add_column("path")
    table.add_row("/x/" + "y" * 200)
    output.OutputConsole(file=tty).print(table)
    output.OutputConsole(file=piped).print(table)
    assert "…" in "".join(tty.text)  # a terminal keeps rich's usual (narrow) layout
    assert "/x/" + "y" * 200 in "".join(piped.text)
