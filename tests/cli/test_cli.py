"""The ``pluralign`` command line."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
import yaml
from typer.testing import CliRunner

import pluralign
from pluralign.cli import app
from pluralign.experiments import read_results, resolve_config


@pytest.fixture
def runner():
    return CliRunner()


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def write_config(path, config):
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_run_writes_outputs_and_exits_zero(tmp_path, runner, tiny_config):
    config = {**tiny_config, "repeats": 1, "n_samples": [40]}
    path = write_config(tmp_path / "tiny.yaml", config)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["run", str(path), "--out", str(out), "--jobs", "1", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "results.jsonl", "summary.csv", "suboptimality.png"):
        assert (out / name).is_file(), name
    rows = read_results(out / "results.jsonl")
    assert [(r["method"], r["n"], r["repeat"]) for r in rows] == [
        ("fullrank_greedy", 40, 0),
        ("linear_greedy", 40, 0),
    ]
    assert yaml.safe_load((out / "config.yaml").read_text()) == resolve_config(config)
    text = flat(result.output)
    assert "fullrank_greedy" in text and "linear_greedy" in text
    # the printed table shows the mean suboptimality of each method (4 significant digits)
    for row in rows:
        assert f"{row['suboptimality']:.4g}" in text


def test_quick_flag_applies_overrides(tmp_path, runner, tiny_config):
    config = {**tiny_config, "quick": {"repeats": 1, "n_samples": [30]}}
    path = write_config(tmp_path / "tiny.yaml", config)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["run", str(path), "-o", str(out), "-j", "1", "--quick", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert {(r["n"], r["repeat"]) for r in read_results(out / "results.jsonl")} == {(30, 0)}


def test_unknown_method_exits_2_and_lists_valid_methods(tmp_path, runner, tiny_config):
    path = write_config(tmp_path / "bad.yaml", {**tiny_config, "methods": ["magic"]})
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2
    text = flat(result.output)
    assert "magic" in text
    assert "fullrank_greedy" in text and "linear_greedy" in text
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.parametrize(
    "content",
    ["experiment: loco\nseed: [unclosed\n", "- just\n- a list\n"],
)
def test_malformed_config_file_exits_2(tmp_path, runner, content):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "bad.yaml" in flat(result.output)


def test_missing_config_file_exits_2(tmp_path, runner):
    result = runner.invoke(
        app, ["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "not found" in flat(result.output)


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"pluralign {pluralign.__version__}"
    assert pluralign.__version__ == version("pluralign")


def test_yaml_exponent_without_dot_is_a_number_or_a_clear_error(tmp_path, runner, tiny_config):
    config = {**tiny_config, "repeats": 1, "n_samples": [40]}
    text = yaml.safe_dump(config) + "options: {fw_tol: 1e-4}\n"
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    result = runner.invoke(
        app, ["run", str(path), "--out", str(tmp_path / "out"), "-j", "1", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert resolved["options"]["fw_tol"] == pytest.approx(1e-4)
    json.dumps(resolved)


def test_report_refuses_a_folder_without_a_valid_config(tmp_path, runner):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "config.yaml" in flat(result.output)
    (tmp_path / "config.yaml").write_text("experiment: nope\n")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "config.yaml" in flat(result.output)
