"""The sweep runner: resumability, reproducibility, parallelism, outputs and config errors."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import yaml

from pluralign.errors import ConfigError
from pluralign.experiments import read_results, resolve_config, run_experiment
from pluralign.experiments.config import TOP_LEVEL_KEYS
from pluralign.experiments.loco.methods import ENV_DEFAULTS

N_UNITS = 4  # 1 setting × 2 repeats × 2 sample sizes
N_ROWS = 2 * N_UNITS  # 2 methods per unit
METRICS = ("suboptimality", "estimation_error", "heldout_loglik")


class Interrupted(Exception):
    pass


def interrupt_after(k: int):
    done = []

    def on_unit(unit):
        done.append(unit.key)
        if len(done) == k:
            raise Interrupted

    return on_unit


def counter():
    seen = []
    return seen, seen.append


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]


def run(config, out, **kwargs):
    kwargs.setdefault("jobs", 1)
    return run_experiment(config, out, progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the tiny config (shared by several tests)."""
    from conftest import TINY_CONFIG

    out = tmp_path_factory.mktemp("reference")
    resolved = run(copy.deepcopy(TINY_CONFIG), out)
    return out, resolved, read_results(out / "results.jsonl")


def test_reference_run_has_one_row_per_method_and_unit(reference, tiny_config):
    _, resolved, rows = reference
    assert len(rows) == N_ROWS
    keys = [(r["n"], r["repeat"], r["method"]) for r in rows]
    assert len(set(keys)) == N_ROWS
    assert {r["method"] for r in rows} == set(tiny_config["methods"])
    for row in rows:
        assert row["suboptimality"] >= 0
        assert row["heldout_loglik"] < 0
        assert row["fit_seconds"] >= 0
        assert ("estimation_error" in row) == (row["method"] == "fullrank_greedy")
    assert resolved == resolve_config(tiny_config)


def test_interrupted_run_resumes_without_recomputing(tmp_path, tiny_config, reference):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(tiny_config, out, on_unit=interrupt_after(2))
    before = read_results(out / "results.jsonl")
    assert len(before) == 2 * 2  # two finished units, both methods

    seen, on_unit = counter()
    run(tiny_config, out, on_unit=on_unit)
    assert len(seen) == N_UNITS - 2
    finished_before = {(r["n"], r["repeat"]) for r in before}
    assert not finished_before & {(u.n, u.repeat) for u in seen}

    after = read_results(out / "results.jsonl")
    assert without_time(after) == without_time(reference[2])
    # the finished rows were kept as they were, fit_seconds included (not recomputed)
    for row in before:
        assert row in after

    # a third run has nothing to do
    seen, on_unit = counter()
    run(tiny_config, out, on_unit=on_unit)
    assert seen == []
    assert read_results(out / "results.jsonl") == after


def test_torn_last_line_and_partial_unit_are_tolerated(tmp_path, tiny_config, reference):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(tiny_config, out, on_unit=interrupt_after(3))
    path = out / "results.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 6
    # drop the last row (its unit becomes partial) and append a torn line
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert len(read_results(path)) == 5

    seen, on_unit = counter()
    run(tiny_config, out, on_unit=on_unit)
    assert len(seen) == N_UNITS - 2  # the partial unit is recomputed, whole
    assert without_time(read_results(path)) == without_time(reference[2])
    # the file is clean JSONL again
    for line in path.read_text().splitlines():
        json.loads(line)


def test_same_seed_same_results_different_seed_different(tmp_path, tiny_config, reference):
    run(tiny_config, tmp_path / "again")
    again = read_results(tmp_path / "again" / "results.jsonl")
    ref = reference[2]
    assert len(again) == len(ref)
    for a, b in zip(again, ref, strict=True):
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if k != "fit_seconds"} == {
            k: v for k, v in b.items() if k != "fit_seconds"
        }

    other = {**tiny_config, "seed": 1}
    run(other, tmp_path / "other")
    rows = read_results(tmp_path / "other" / "results.jsonl")
    assert [(r["n"], r["repeat"], r["method"]) for r in rows] == [
        (r["n"], r["repeat"], r["method"]) for r in ref
    ]
    for a, b in zip(rows, ref, strict=True):
        assert (
            a["suboptimality"] != b["suboptimality"] or a["heldout_loglik"] != b["heldout_loglik"]
        )
    assert all(a["heldout_loglik"] != b["heldout_loglik"] for a, b in zip(rows, ref, strict=True))


def test_parallel_run_equals_serial_run(tmp_path, tiny_config, reference):
    run(tiny_config, tmp_path / "par", jobs=2)
    rows = read_results(tmp_path / "par" / "results.jsonl")
    assert without_time(rows) == without_time(reference[2])


def test_outputs_exist_and_summary_matches_results(reference, tiny_config):
    out, resolved, rows = reference
    assert yaml.safe_load((out / "config.yaml").read_text()) == resolved
    png = (out / "suboptimality.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")

    with (out / "summary.csv").open(newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 2 * 2  # methods × sample sizes
    for record in summary:
        group = [
            r
            for r in rows
            if r["method"] == record["method"]
            and r["n"] == int(record["n"])
            and r["setting"] == record["setting"]
        ]
        assert int(record["count"]) == len(group) == tiny_config["repeats"]
        for metric in (*METRICS, "fit_seconds"):
            values = [r[metric] for r in group if metric in r]
            if not values:
                assert record.get(f"{metric}_mean", "") == ""
                continue
            mean = sum(values) / len(values)
            se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
            assert float(record[f"{metric}_mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(record[f"{metric}_se"]) == pytest.approx(se, rel=1e-9, abs=1e-15)
    # no stray temporary files from atomic writes
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "results.jsonl",
        "suboptimality.png",
        "summary.csv",
    ]


def test_estimation_error_shrinks_with_more_samples():
    """The full-rank MLE behind ``fullrank_greedy`` (Bilinear) on the tiny config's simulator,
    10 independent repeats at N and 4N: the mean estimation error falls by more than 2 standard
    errors, and at about the 1/√4 = 1/2 rate of an MLE. The ridge is fixed (not the runner's
    ``ridge/N``), so that only N changes: with ``l2 = 1/N`` the shrinking ridge bias alone gives
    a ratio of 0.78 even if the fit ignored all but 150 comparisons."""
    import numpy as np
    from conftest import TINY_CONFIG

    from pluralign.envs import LowRankContextual
    from pluralign.rewards import Bilinear

    keys = ("d_x", "d_phi", "rank", "n_actions")
    env = LowRankContextual(**{k: TINY_CONFIG["env"][k] for k in keys}, seed=0)
    repeats, n = 10, 200

    def errors(size: int, stream: int) -> np.ndarray:
        return np.array(
            [
                env.estimation_error(
                    Bilinear(l2=1e-4).fit(env.sample_offline(size, seed=[stream, k])).theta_
                )
                for k in range(repeats)
            ]
        )

    small, large = errors(n, 1), errors(4 * n, 2)
    se_small, se_large = (np.std(e, ddof=1) / np.sqrt(repeats) for e in (small, large))
    assert small.mean() - large.mean() > 2 * np.hypot(se_small, se_large)
    ratio = large.mean() / small.mean()
    se_ratio = ratio * np.hypot(se_small / small.mean(), se_large / large.mean())
    assert ratio + 2 * se_ratio < 1.0
    assert 0.3 <= ratio <= 0.8


@pytest.mark.parametrize(
    ("change", "kind", "valid"),
    [
        ({"bogus": 1}, "config key", TOP_LEVEL_KEYS),
        ({"env": {"d_x": 4, "dx": 3}}, "env parameter", tuple(ENV_DEFAULTS)),
        ({"methods": ["fullrank_greedy", "magic"]}, "method", ("fullrank_greedy", "linear_greedy")),
        ({"experiment": "nope"}, "experiment", ("loco",)),
        ({"options": {"lambda": 1.0}}, "option", ("ridge_grid",)),
    ],
)
def test_unknown_names_raise_config_error_listing_valid_choices(
    tmp_path, tiny_config, change, kind, valid
):
    config = {**tiny_config, **change}
    with pytest.raises(ConfigError) as info:
        run(config, tmp_path / "out")
    message = str(info.value)
    assert kind in message
    for name in valid:
        assert name in message
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.parametrize(
    "change",
    [
        {"seed": -1},
        {"seed": "0"},
        {"repeats": 0},
        {"repeats": True},
        {"n_samples": []},
        {"n_samples": [10, 0]},
        {"methods": []},
        {"env": []},
        {"env": "d_x=3"},
    ],
)
def test_malformed_values_raise_config_error(tiny_config, change):
    with pytest.raises(ConfigError):
        resolve_config({**tiny_config, **change})


def test_resume_with_a_different_config_is_refused(tmp_path, tiny_config):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(tiny_config, out, on_unit=interrupt_after(1))
    before = (out / "results.jsonl").read_text()
    for change in (
        {"seed": 5},
        {"n_samples": [50]},
        {"methods": ["linear_greedy"]},
        {"env": {**tiny_config["env"], "shift": 1.0}},
    ):
        with pytest.raises(ConfigError) as info:
            run({**tiny_config, **change}, out)
        assert str(out) in str(info.value)
    assert (out / "results.jsonl").read_text() == before
    # the same config, written differently (defaults spelled out), is accepted
    seen, on_unit = counter()
    run({**tiny_config, "env": {**ENV_DEFAULTS, **tiny_config["env"]}}, out, on_unit=on_unit)
    assert len(seen) == N_UNITS - 1


def test_quick_overrides_apply_only_with_quick(tiny_config):
    config = {**tiny_config, "quick": {"repeats": 1, "n_samples": [20]}}
    full = resolve_config(config)
    quick = resolve_config(config, quick=True)
    assert (full["repeats"], full["n_samples"]) == (2, [50, 100])
    assert (quick["repeats"], quick["n_samples"]) == (1, [20])
    with pytest.raises(ConfigError):
        resolve_config({**tiny_config, "quick": {"experiment": "loco"}}, quick=True)


def test_settings_that_differ_only_in_undescribed_parameters_stay_apart(tmp_path, tiny_config):
    env = tiny_config["env"]
    config = {
        **tiny_config,
        "repeats": 1,
        "n_samples": [50],
        "env": [{**env, "n_actions": 3}, {**env, "n_actions": 5}],
    }
    out = tmp_path / "run"
    run(config, out)
    with (out / "summary.csv").open(newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 2 * 2  # settings × methods
    assert all(int(r["count"]) == 1 for r in summary)
    seen, on_unit = counter()
    run(config, out, on_unit=on_unit)  # resuming a finished sweep does nothing
    assert seen == []
    assert len(read_results(out / "results.jsonl")) == 4
