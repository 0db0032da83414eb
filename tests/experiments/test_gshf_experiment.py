"""The ``gshf`` experiment through the shared runner: per-round rows, resuming, summaries."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import yaml

from pluralign.errors import ConfigError
from pluralign.experiments import EXPERIMENTS, read_results, resolve_config, run_experiment
from pluralign.experiments.gshf import check_gshf_claims, report, rounds_to_target

ROUNDS = 2
METHODS = [
    "offline_mle",
    "offline_option1",
    "offline_option2",
    "online_enhancer",
    "online_symmetric",
    "online_uniform",
    "online_uncertainty",
    "online_best_worst",
    "hybrid_enhancer",
]
TINY: dict = {
    "experiment": "gshf",
    "seed": 3,
    "repeats": 2,
    "env": [
        {"d": 4, "n_actions": 4, "n_eval": 60, "uncovered_dim": 2},
        {"d": 4, "n_actions": 4, "n_eval": 60, "uncovered_dim": 2, "coverage": 0.3},
    ],
    "n_samples": [ROUNDS],
    "methods": METHODS,
    "options": {"batch_size": 30, "hybrid_offline": 40},
}
N_UNITS = 2 * 2  # settings × repeats
ROWS_PER_UNIT = len(METHODS) * (ROUNDS + 1)


class Interrupted(Exception):
    pass


def run(config, out, **kwargs):
    kwargs.setdefault("jobs", 1)
    return run_experiment(copy.deepcopy(config), out, progress=False, **kwargs)


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("gshf")
    run(TINY, out)
    return out, read_results(out / "results.jsonl")


def test_every_method_reports_every_round(reference):
    out, rows = reference
    assert len(rows) == N_UNITS * ROWS_PER_UNIT
    for row in rows:
        assert row["unit_n"] == ROUNDS and row["unit_rows"] == ROWS_PER_UNIT
        assert 0 <= row["n"] <= ROUNDS and row["gap"] >= 0.0
        online = row["method"].startswith(("online", "hybrid"))
        offline = 40 if row["method"] == "hybrid_enhancer" else 0
        assert row["comparisons"] == offline + 30 * row["n"]
        assert ("duality_gap" in row) == (row["method"] == "offline_option1")
        assert ("uncertainty" in row) == (online and row["n"] > 0)
        if online and row["n"] > 0:  # distinct pairs by default: no pair compares a response
            assert row["identical_pairs"] == 0.0 and row["pair_uncertainty"] > 0.0
            policy_level = not row["method"].endswith(("uncertainty", "best_worst"))
            assert ("identical_pairs_expected" in row) == policy_level
            assert ("certified_gap" in row) == row["method"].endswith("enhancer")
        if row["method"] == "offline_option1":
            assert row["duality_gap"] <= 1e-8
    # round 0 without data: every method but the hybrid deploys π0, so all gaps agree
    for repeat in range(2):
        zero = {
            r["gap"]
            for r in rows
            if r["n"] == 0
            and r["repeat"] == repeat
            and r["method"] != "hybrid_enhancer"
            and "coverage=1.0" in r["setting"]
        }
        assert max(zero) - min(zero) <= 1e-12
    with (out / "summary.csv").open(newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 2 * len(METHODS) * (ROUNDS + 1)  # settings × methods × rounds
    assert all(int(r["count"]) == 2 for r in summary)
    assert (out / "gap.png").read_bytes().startswith(b"\x89PNG")


def test_interrupted_run_resumes_and_a_torn_unit_is_recomputed(tmp_path, reference):
    config = {**TINY, "env": TINY["env"][:1]}  # setting 0 only: 2 units, seeds as in TINY
    out = tmp_path / "run"
    done = []

    def stop_after_two(unit):
        done.append(unit)
        if len(done) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(config, out, on_unit=stop_after_two)
    path = out / "results.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * ROWS_PER_UNIT
    # cut the second unit short: its last method's last rounds are lost (all methods remain)
    path.write_text("\n".join(lines[:-2]) + "\n")
    seen = []
    run(config, out, on_unit=seen.append)
    assert len(seen) == 1  # the torn unit is recomputed whole, the first is kept
    setting = reference[1][0]["setting"]
    expected = [r for r in reference[1] if r["setting"] == setting]
    assert without_time(read_results(path)) == without_time(expected)


def test_claims_are_checked_per_setting(reference):
    out, rows = reference
    config = yaml.safe_load((out / "config.yaml").read_text())
    claims = check_gshf_claims(rows, config)
    names = [c["claim"].split()[0] for c in claims]
    assert names == ["C9", "C10", "C8", "C9", "C10"]  # C8 only where coverage < 1
    assert all(c["held"] in (True, False) and c["detail"] for c in claims)
    # a comparison holds only if the paired difference is negative beyond two standard errors
    fake = [
        {
            "setting": r["setting"],
            "method": r["method"],
            "repeat": r["repeat"],
            "n": r["n"],
            "gap": (0.0 if r["method"] == "online_enhancer" else 1.0) + 0.01 * r["repeat"],
        }
        for r in rows
    ]
    c9 = [c for c in check_gshf_claims(fake, config) if c["claim"].startswith("C9")]
    assert all(c["held"] for c in c9)
    partial = [r for r in rows if r["method"] != "online_uniform"]
    assert any(c["held"] is None for c in check_gshf_claims(partial, config))


def test_pair_options_are_validated():
    resolve_config(
        {
            **TINY,
            "options": {
                "enhancer_search": "directions",
                "n_candidates": 4,
                "distinct_pairs": False,
            },
        }
    )
    for bad in ({"enhancer_search": "grid"}, {"n_candidates": 1}, {"distinct_pairs": "yes"}):
        with pytest.raises(ConfigError):
            resolve_config({**TINY, "options": bad})


def test_gshf_takes_one_rounds_value(tmp_path):
    with pytest.raises(ConfigError, match="one value"):
        run({**TINY, "n_samples": [1, 2]}, tmp_path / "out")
    with pytest.raises(ConfigError, match="option"):
        resolve_config({**TINY, "options": {"rounds": 3}})
    assert "gshf" in EXPERIMENTS


def test_report_and_rounds_to_target(reference):
    out, _ = reference
    text = report(out)
    assert "gap(offline_option1) − gap(offline_mle)" in text
    assert "hybrid_enhancer: first round with gap" in text
    assert "rounds(hybrid) − rounds(online), paired" in text
    assert rounds_to_target({0: 1.0, 1: 0.2, 2: 0.01, 3: 0.3}, 0.05) == 2
    assert rounds_to_target({0: 1.0}, 0.05) is None


def test_shipped_config_resolves():
    path = Path(__file__).parents[2] / "src" / "pluralign" / "configs" / "gshf.yaml"
    config = yaml.safe_load(path.read_text())
    resolved = resolve_config(config)
    assert resolved["methods"] == METHODS
    assert len(resolved["n_samples"]) == 1
    assert resolve_config(config, quick=True)["repeats"] < resolved["repeats"]
