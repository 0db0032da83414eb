"""Hardening of runs (issue 10): settings validated when a config is resolved, worker cleanup,
refused and repaired results folders, and results.jsonl / report errors that are pluralign's."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.errors import ConfigError, DataValidationError
from pluralign.experiments import EXPERIMENTS, read_results, resolve_config, run_experiment
from pluralign.experiments.base import coerce
from pluralign.experiments.config import spec_table

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "pluralign" / "configs"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "experiments.md"
EXPERIMENT_CONFIGS = ("loco.yaml", "multi_user.yaml", "gshf.yaml", "quick.yaml")

GSHF_TINY = {
    "experiment": "gshf",
    "seed": 1,
    "repeats": 1,
    "env": {"d": 4, "n_actions": 4, "n_eval": 30, "uncovered_dim": 2},
    "n_samples": [2],
    "methods": ["offline_mle", "online_uniform"],
    "options": {"batch_size": 20, "hybrid_offline": 20},
}


def run(config, out, **kwargs):
    kwargs.setdefault("jobs", 1)
    return run_experiment(copy.deepcopy(config), out, progress=False, **kwargs)


def with_value(config, section, key, value):
    config = copy.deepcopy(config)
    if section is None:
        config[key] = value
    else:
        config.setdefault(section, {})
        config[section] = {**config[section], key: value}
    return config


def flat(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------ A. settings validation
BAD_SETTINGS = [
    # (experiment, section, key, value)
    ("loco", "options", "ridge_grid", [-1]),
    ("loco", "options", "ridge_grid", [0.1, 0.0]),
    ("loco", "options", "ridge_grid", ["1e999999"]),
    ("loco", "options", "ridge_grid", [[1.0]]),
    ("loco", "options", "delta", 0),
    ("loco", "options", "delta", 1),
    ("loco", "options", "delta", "1e999999"),
    ("loco", "options", "beta", -1.0),
    ("loco", "options", "beta", "nan"),
    ("loco", "options", "beta", {"a": 1}),
    ("loco", "options", "fw_tol", 0),
    ("loco", "options", "fw_max_iter", 0),
    ("loco", "options", "fw_max_iter", 10**400),
    ("loco", "options", "fw_max_iter", "nan"),
    ("loco", "options", "fw_max_iter", "1e400"),
    ("loco", "options", "fw_max_iter", "9" * 5000),
    ("loco", "options", "fw_max_iter", 2.5),
    ("loco", "env", "d_x", 0),
    ("loco", "env", "rank", 5),  # > d_x = d_phi = 4 of the tiny config
    ("loco", "env", "n_actions", 1),
    ("loco", "env", "singular_values", [2.0, 1.0]),
    ("loco", "env", "singular_values", [0.0, 1.0]),
    ("loco", "env", "singular_values", [1.0]),
    ("loco", "env", "behavior", "sideways"),
    ("loco", "env", "shift", float("inf")),
    ("loco", "env", "n_targets", 0),
    ("loco", "env", "n_heldout", 10**9),
    ("loco", None, "repeats", 10**400),
    ("loco", None, "repeats", 10_001),
    ("loco", None, "n_samples", [10**400]),
    ("loco", None, "seed", 10**400),
    ("multi_user", "options", "ridge", 0.0),
    ("multi_user", "options", "delta", 1.5),
    ("multi_user", "options", "rank", 17),  # > d_phi = 16
    ("multi_user", "options", "policy_tol", -1e-3),
    ("multi_user", "options", "policies", "yes"),
    ("multi_user", "env", "rank", 17),
    ("multi_user", "env", "imbalance", -1.0),
    ("multi_user", "env", "diversity", -0.5),
    ("multi_user", "env", "n_new_users", 0),
    ("gshf", "env", "coverage", 0.0),
    ("gshf", "env", "coverage", 1.5),
    ("gshf", "env", "ref_alignment", 2.0),
    ("gshf", "env", "uncovered_dim", 5),  # > d = 4
    ("gshf", "env", "uncovered_reward", 1.5),
    ("gshf", "env", "uncovered_reward", "abc"),
    ("gshf", "env", "uncovered_reward", {"a": 1}),
    ("gshf", "env", "eta", 0.0),
    ("gshf", "options", "batch_size", 0),
    ("gshf", "options", "opt_tol", 0.0),
    ("gshf", "options", "target_gap", -0.1),
    ("gshf", None, "n_samples", [1, 2]),
]


def _base(experiment, tiny_config):
    return {
        "loco": tiny_config,
        "gshf": GSHF_TINY,
        "multi_user": {"experiment": "multi_user", "env": {}},
    }[experiment]


@pytest.mark.parametrize(
    ("experiment", "section", "key", "value"),
    BAD_SETTINGS,
    ids=[f"{e}-{s}.{k}-{i}" for i, (e, s, k, _) in enumerate(BAD_SETTINGS)],
)
def test_bad_settings_are_refused_when_resolved_naming_the_key(
    experiment, section, key, value, tiny_config
):
    config = with_value(_base(experiment, tiny_config), section, key, value)
    with pytest.raises(ConfigError) as info:
        resolve_config(config)
    assert key in str(info.value)


def test_negative_ridge_grid_and_zero_delta_never_start_a_run(tmp_path, tiny_config):
    # before: ridge_grid [-1] finished with exit 0 (held-out log-likelihood -3e157) and
    # delta 0 raised ZeroDivisionError in a worker
    for section, key, value in (("options", "ridge_grid", [-1]), ("options", "delta", 0)):
        out = tmp_path / key
        with pytest.raises(ConfigError, match=key):
            run(with_value(tiny_config, section, key, value), out)
        assert not (out / "results.jsonl").exists()


def _every_key():
    for name, experiment in sorted(EXPERIMENTS.items()):
        for section, defaults in (
            ("env", experiment.env_defaults),
            ("options", experiment.option_defaults),
        ):
            for key in defaults:
                yield name, section, key


@pytest.mark.parametrize(("experiment", "section", "key"), list(_every_key()))
def test_every_key_has_a_constraint_and_null_never_skips_it(experiment, section, key, tiny_config):
    spec = getattr(EXPERIMENTS[experiment], f"{'env' if section == 'env' else 'option'}_spec")
    assert key in spec, f"{experiment}.{section}.{key} has no declared constraint"
    config = with_value(_base(experiment, tiny_config), section, key, None)
    if getattr(spec[key], "nullable", False):
        assert resolve_config(config)["env"][0][key] is None
    else:
        with pytest.raises(ConfigError, match=key):
            resolve_config(config)


@pytest.mark.parametrize("name", EXPERIMENT_CONFIGS)
@pytest.mark.parametrize("quick", [False, True])
def test_packaged_configs_and_defaults_still_resolve(name, quick):
    config = yaml.safe_load((CONFIGS / name).read_text())
    resolved = resolve_config(config, quick=quick)
    assert resolve_config(resolved) == resolved  # idempotent
    for experiment in EXPERIMENTS:
        if experiment != "gshf":  # gshf's default n_samples is one value too
            resolve_config({"experiment": experiment})


def test_sample_sizes_of_a_unit_are_bounded_as_a_whole():
    with pytest.raises(ConfigError, match="comparisons per unit"):
        resolve_config(
            {"experiment": "multi_user", "env": {"n_users": 10_000}, "n_samples": [100_000]}
        )
    with pytest.raises(ConfigError, match="T·batch_size"):
        resolve_config({**GSHF_TINY, "n_samples": [10**6], "options": {"batch_size": 10**6}})


def test_nullable_uncovered_reward_takes_null_or_a_share():
    env = dict(GSHF_TINY["env"])
    for share in (None, 0.0, 0.5, "0.5", 1.0):
        resolved = resolve_config({**GSHF_TINY, "env": {**env, "uncovered_reward": share}})
        expected = None if share is None else float(share)
        assert resolved["env"][0]["uncovered_reward"] == expected
    with pytest.raises(ConfigError, match="uncovered_reward"):  # no uncovered subspace
        resolve_config({**GSHF_TINY, "env": {**env, "uncovered_dim": 0, "uncovered_reward": 0.5}})


@pytest.mark.parametrize(
    ("value", "default"),
    [
        ("1e999999", 1.0),
        ("-1e999999", 1.0),
        ("inf", 1.0),
        (float("nan"), 1.0),
        (10**400, 1.0),
        ({"a": 1}, 1.0),
        ([1.0], 1.0),
        (None, 1.0),
        (True, 1.0),
        ("9" * 5000, 3),
        ("1e400", 3),
        ("nan", 3),
        (float("inf"), 3),
        (2.5, 3),
        ({"a": 1}, 3),
        ([1, 2], "text"),
        ({"a": 1}, "text"),
        ("yes", True),
        ([[1.0]], [1.0]),
        ([], [1.0]),
    ],
)
def test_coerce_refuses_with_config_error(value, default):
    with pytest.raises(ConfigError, match="'key'"):
        coerce("key", value, default)


def test_coerce_still_converts_what_it_converted():
    assert coerce("k", "1e-4", 1.0) == pytest.approx(1e-4)
    assert coerce("k", 3, 1.0) == 3.0 and isinstance(coerce("k", 3, 1.0), float)
    assert coerce("k", 2.0, 1) == 2 and isinstance(coerce("k", 2.0, 1), int)
    assert coerce("k", "12", 1) == 12
    assert coerce("k", (1, "2"), [0.5]) == [1.0, 2.0]
    assert coerce("k", False, True) is False
    assert coerce("k", "x", "y") == "x"
    assert coerce("k", {"any": 1}, None) == {"any": 1}


def test_docs_tabulate_the_declared_constraints():
    docs = DOCS.read_text(encoding="utf-8")
    for name, experiment in EXPERIMENTS.items():
        table = spec_table(experiment)
        assert table in docs, f"docs/experiments.md lacks the current table of {name}:\n{table}"


# ------------------------------------------------------------------ B4. sweep expansion
def test_a_27000_setting_sweep_resolves_and_dedupe_keeps_first_seen_order():
    grid = {
        "diversity": [i / 10 for i in range(30)],
        "n_users": list(range(1, 31)),
        "d_phi": list(range(3, 33)),
    }
    resolved = resolve_config({"experiment": "multi_user", "env": {}, "sweep": grid})
    assert len(resolved["env"]) == 27_000
    overlapping = [
        {"diversity": [0.0, 1.0, 2.0]},
        {"diversity": [2.0, 1.0, 3.0]},
        {"diversity": [0.0]},
    ]
    resolved = resolve_config({"experiment": "multi_user", "env": {}, "sweep": overlapping})
    assert [e["diversity"] for e in resolved["env"]] == [0.0, 1.0, 2.0, 3.0]


def test_settings_with_one_name_are_refused_naming_both():
    env = {"n_users": 5, "d_phi": 4, "rank": 2}
    with pytest.raises(ConfigError) as info:  # n_actions is not part of the setting's name
        resolve_config(
            {
                "experiment": "multi_user",
                "env": [env, {**env, "n_actions": 3}, {**env, "n_users": 6}],
            }
        )
    assert "settings 0 and 1" in str(info.value)


def test_a_sweep_too_large_to_expand_is_refused_before_expanding():
    grid = {
        "diversity": list(range(100)),
        "n_users": list(range(1, 101)),
        "d_phi": list(range(1, 101)),
    }
    with pytest.raises(ConfigError, match="1_000_000 env settings"):
        resolve_config({"experiment": "multi_user", "env": {}, "sweep": grid})


# ------------------------------------------------------------------ B1. workers die with the run
def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if int(fields[1]) == pid:
                out.add(int(entry.name))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigkill_of_a_parallel_run_leaves_no_worker_behind(tmp_path, tiny_config):
    config = {**tiny_config, "repeats": 5000, "n_samples": [40], "methods": ["linear_greedy"]}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from pluralign.cli import app; app()",
            "run",
            str(path),
            "--out",
            str(tmp_path / "out"),
            "--jobs",
            "2",
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        children: set[int] = set()
        for _ in range(1200):  # liveness poll: until the two workers have started
            children = _children(proc.pid)
            workers = [p for p in children if b"spawn_main" in _cmdline(p)]
            if len(workers) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before its workers could be observed"
        assert len(workers) >= 2, children
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    for _ in range(600):  # liveness poll, generous: every child (workers included) exits
        if not any(_alive(p) for p in children):
            break
        time.sleep(0.1)
    left = [p for p in children if _alive(p)]
    for pid in left:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, "worker processes outlived the killed run"


# ------------------------------------------------------------------ B2. results without config
def test_results_without_config_yaml_are_refused_unless_forced(tmp_path, tiny_config):
    out = tmp_path / "run"
    run(tiny_config, out)
    rows = read_results(out / "results.jsonl")
    (out / "config.yaml").unlink()
    other = {**tiny_config, "seed": 7}  # before: silently reused every row of seed 0
    with pytest.raises(ConfigError, match="--force"):
        run(other, out)
    assert not (out / "config.yaml").exists()
    assert read_results(out / "results.jsonl") == rows
    seen = []
    run(tiny_config, out, force=True, on_unit=seen.append)
    assert seen == []  # the user vouched for the rows: they are resumed, not recomputed
    assert read_results(out / "results.jsonl") == rows
    assert yaml.safe_load((out / "config.yaml").read_text()) == resolve_config(tiny_config)


def test_cli_run_force_flag(tmp_path, tiny_config):
    config = {**tiny_config, "repeats": 1, "n_samples": [40]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    args = ["run", str(path), "--out", str(out), "-j", "1", "--no-progress"]
    assert CliRunner().invoke(app, args).exit_code == 0
    (out / "config.yaml").unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--force" in flat(result.output)
    result = CliRunner().invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------ B3. duplicate rows
def test_duplicate_rows_are_dropped_on_resume(tmp_path, tiny_config):
    out = tmp_path / "run"
    run(tiny_config, out)
    path = out / "results.jsonl"
    rows = read_results(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[0], lines[3], lines[0]]) + "\n")
    seen = []
    run(tiny_config, out, on_unit=seen.append)
    assert seen == []
    assert read_results(path) == rows  # before: 11 rows, and counts of 3 in summary.csv
    summary = (out / "summary.csv").read_text().splitlines()
    header = summary[0].split(",")
    assert {line.split(",")[header.index("count")] for line in summary[1:]} == {"2"}


def test_duplicate_curve_rows_are_dropped_without_recomputing(tmp_path):
    out = tmp_path / "gshf"
    run(GSHF_TINY, out)
    path = out / "results.jsonl"
    rows = read_results(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], *lines, lines[-1]]) + "\n")
    seen = []
    run(GSHF_TINY, out, on_unit=seen.append)
    assert seen == []  # before: the unit looked incomplete (too many rows) and was recomputed
    assert [{k: v for k, v in r.items() if k != "fit_seconds"} for r in read_results(path)] == [
        {k: v for k, v in r.items() if k != "fit_seconds"} for r in rows
    ]


# ------------------------------------------------------------------ C. results.jsonl
GOOD = {"setting": "s", "method": "m", "n": 10, "repeat": 0, "gap": 0.5}
BAD_LINES = [
    ("[1, 2]", None),
    ('"text"', None),
    (json.dumps({k: v for k, v in GOOD.items() if k != "method"}), "method"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "setting"}), "setting"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "n"}), "n"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "repeat"}), "repeat"),
    (json.dumps({**GOOD, "n": 1.5}), "n"),
    (json.dumps({**GOOD, "n": True}), "n"),
    (json.dumps({**GOOD, "repeat": -1}), "repeat"),
    (json.dumps({**GOOD, "setting": 3}), "setting"),
    (json.dumps({**GOOD, "gap": "0.5"}), "gap"),
    (json.dumps({**GOOD, "gap": [1]}), "gap"),
    (json.dumps(GOOD)[:-1] + ', "n": 11}', None),  # duplicate key
    ("[" * 100_000 + "]" * 100_000, None),  # RecursionError in json
    (json.dumps(GOOD).replace("10", "9" * 5000), None),  # past the 4,300-digit limit
    (json.dumps(GOOD).replace("10", "1e999999"), "n"),  # inf is not a count
    ("{not json", None),
    (b"\xff\xfe".decode("latin-1"), None),  # written below as raw bytes
]


@pytest.mark.parametrize(
    ("bad", "field"), BAD_LINES, ids=[f"line{i}" for i in range(len(BAD_LINES))]
)
def test_a_malformed_middle_line_is_an_error_naming_file_and_line(tmp_path, bad, field):
    path = tmp_path / "results.jsonl"
    good = json.dumps(GOOD).encode()
    raw = bad.encode("latin-1") if bad.startswith("\xff") else bad.encode()
    path.write_bytes(good + b"\n" + raw + b"\n" + good + b"\n")
    with pytest.raises(DataValidationError) as info:
        read_results(path)
    assert info.value.path == str(path) and info.value.line == 2
    if field is not None:
        assert info.value.field == field


def test_a_torn_last_line_is_dropped_silently(tmp_path):
    path = tmp_path / "results.jsonl"
    good = json.dumps(GOOD)
    for torn in (good[:-7].encode(), '{"setting": "é'.encode()[:-1], b"\x00\x00\x00"):
        path.write_bytes((good + "\n").encode() + torn)
        assert read_results(path) == [GOOD]
    path.write_bytes((good + "\n{broken\n").encode())  # complete (newline-ended): not torn
    with pytest.raises(DataValidationError, match="line 2"):
        read_results(path)


def test_non_finite_metrics_read_back_and_a_directory_is_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(
        json.dumps({**GOOD, "gap": float("nan")})
        + "\n"
        + json.dumps(GOOD).replace("0.5", "1e999999")
        + "\n"
    )
    rows = read_results(path)
    assert math.isnan(rows[0]["gap"]) and rows[1]["gap"] == math.inf
    folder = tmp_path / "dir" / "results.jsonl"
    folder.mkdir(parents=True)
    with pytest.raises(DataValidationError, match="directory"):
        read_results(folder)


def test_resume_refuses_rows_of_another_config_and_keeps_the_file(tmp_path, tiny_config):
    out = tmp_path / "run"
    run(tiny_config, out)
    path = out / "results.jsonl"
    for change in ({"setting": "d_x=99"}, {"method": "prs"}, {"n": 77}, {"repeat": 9}):
        lines = path.read_text().splitlines()
        row = {**json.loads(lines[1]), **change}
        text = "\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n"
        path.write_text(text)
        with pytest.raises(DataValidationError) as info:  # before: ValueError or silent use
            run(tiny_config, out)
        assert info.value.line == 2 and str(path) in str(info.value)
        assert path.read_text() == text  # no finished row was thrown away
        path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------ C. report
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from conftest import TINY_CONFIG

    out = tmp_path_factory.mktemp("finished")
    run({**TINY_CONFIG, "repeats": 1, "n_samples": [40]}, out)
    return out


def _report(folder):
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert "Traceback" not in result.output
    return result


def test_report_of_a_finished_run_works(finished):
    result = _report(finished)
    assert result.exit_code == 0, result.output
    assert "fullrank_greedy" in result.output


@pytest.mark.parametrize(
    "config_text",
    [
        b"- a\n- list\n",
        b"experiment: loco\nseed: 0\n",  # lacks keys a resolved config has
        b"experiment: nope\nseed: 0\nrepeats: 1\nenv: []\nn_samples: [1]\n"
        b"methods: []\noptions: {}\n",
        b"seed: [unclosed\n",
        b"seed: " + b"9" * 5000 + b"\n",
        b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n",
        b"\xff\xfe: 1\n",
    ],
)
def test_report_refuses_a_bad_config_yaml_with_exit_2(tmp_path, finished, config_text):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.jsonl").write_bytes((finished / "results.jsonl").read_bytes())
    (folder / "config.yaml").write_bytes(config_text)
    result = _report(folder)
    assert result.exit_code == 2, result.output
    assert "config.yaml" in flat(result.output)


def test_report_revalidates_config_yaml(tmp_path, finished):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.jsonl").write_bytes((finished / "results.jsonl").read_bytes())
    config = yaml.safe_load((finished / "config.yaml").read_text())
    config["options"]["delta"] = 0.0
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    result = _report(folder)
    assert result.exit_code == 2 and "options.delta" in flat(result.output)
    (folder / "config.yaml").unlink()
    (folder / "config.yaml").mkdir()
    result = _report(folder)
    assert result.exit_code == 2 and "config.yaml" in flat(result.output)


@pytest.mark.parametrize(
    "config_text", [b"seed: [unclosed\n", b"a: " + b"[" * 5000 + b"]" * 5000, b"\xff: 1\n", None]
)
def test_run_refuses_an_unreadable_config_yaml_in_its_folder(tmp_path, tiny_config, config_text):
    out = tmp_path / "run"
    out.mkdir()
    if config_text is None:
        (out / "config.yaml").mkdir()
    else:
        (out / "config.yaml").write_bytes(config_text)
    with pytest.raises(ConfigError, match=r"config\.yaml"):
        run(tiny_config, out)


@pytest.mark.parametrize(
    "results",
    [
        b'{"setting": 1}\n{}\n',
        b"[1]\n" * 3,
        b"\xff\n{}\n",
        b'{"setting": "nope", "method": "fullrank_greedy", "n": 40, "repeat": 0}\n\n',
        None,  # a directory named results.jsonl
    ],
)
def test_report_refuses_bad_results_with_exit_2(tmp_path, finished, results):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_bytes((finished / "config.yaml").read_bytes())
    if results is None:
        (folder / "results.jsonl").mkdir()
    else:
        (folder / "results.jsonl").write_bytes(results)
    result = _report(folder)
    assert result.exit_code == 2, result.output
    assert "results.jsonl" in flat(result.output)


def _gshf_folder(folder: Path) -> list[dict]:
    """A gshf run folder with made-up rows (no unit is run): 2 repeats, rounds 0..2."""
    config = resolve_config(
        {
            **GSHF_TINY,
            "repeats": 2,
            "methods": ["online_enhancer", "online_symmetric", "online_uniform"],
        }
    )
    setting = EXPERIMENTS["gshf"].describe_setting(config["env"][0])
    rows = [
        {
            "setting": setting,
            "method": m,
            "n": t,
            "repeat": r,
            "unit_n": 2,
            "gap": 0.1 * t,
            "fit_seconds": 0.0,
            "unit_rows": 9,
        }
        for r in range(2)
        for m in config["methods"]
        for t in range(3)
    ]
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_report_checks_claims_on_whole_units_and_skips_a_missing_point(tmp_path):
    folder = tmp_path / "gshf"
    rows = _gshf_folder(folder)
    assert _report(folder).exit_code == 0
    # an interrupted run: the last unit lacks a row; the table shows it, the claims skip it
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    result = _report(folder)
    assert result.exit_code == 0, result.output  # before: KeyError in the gshf claims
    # a complete unit whose last round was renumbered: the claims skip the repeat that lacks
    # the compared round (the paired counts say how many repeats were compared)
    damaged = [*rows[:-1], {**rows[-1], "n": 7}]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in damaged))
    result = _report(folder)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    text = flat(result.output)
    assert "gap(enhancer) − gap(online_symmetric) = +0.0000 ± 0.0000 (lower in 0/2)" in text
    assert "gap(enhancer) − gap(online_uniform) = +0.0000 ± nan (lower in 0/1)" in text


def test_run_prints_error_messages_verbatim(tmp_path, tiny_config):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tiny_config, "methods": ["[/bold]"]}))
    result = CliRunner().invoke(
        app, ["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert result.exit_code == 2
    assert "[/bold]" in result.output and "Traceback" not in result.output
