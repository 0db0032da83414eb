"""Fuzz targets of experiment runs: config resolution, resuming from ``results.jsonl`` and
``pluralign report`` on a damaged run folder. Nothing here runs a unit: every case is cheap."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from fuzzing.core import Target, mutated_jsonl, mutated_value, mutated_yaml, register
from pluralign.errors import PluralignError

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "pluralign" / "configs"
SEED_CONFIGS = [
    yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    for name in ("loco.yaml", "multi_user.yaml", "gshf.yaml", "quick.yaml")
]

# small resolved configs and the rows a finished run of each would hold (made up, not run)
_RUNS: dict[str, dict[str, Any]] = {
    "loco": {
        "experiment": "loco",
        "seed": 0,
        "repeats": 2,
        "env": {"d_x": 4, "d_phi": 4, "rank": 1, "n_actions": 4, "n_targets": 50, "n_heldout": 100},
        "n_samples": [50, 100],
        "methods": ["prs", "fullrank_greedy", "linear_greedy"],
    },
    "multi_user": {
        "experiment": "multi_user",
        "seed": 0,
        "repeats": 2,
        "env": [{"n_users": 4, "d_phi": 5, "rank": 2, "diversity": d} for d in (0.0, 1.0)],
        "n_samples": [10, 20],
        "methods": ["shared_basis", "per_user", "pooled"],
    },
    "gshf": {
        "experiment": "gshf",
        "seed": 0,
        "repeats": 2,
        "env": {"d": 4, "n_actions": 4, "n_eval": 30, "uncovered_dim": 2, "coverage": 0.5},
        "n_samples": [2],
        "methods": [
            "offline_mle",
            "offline_option1",
            "online_enhancer",
            "online_symmetric",
            "online_uniform",
            "hybrid_enhancer",
        ],
    },
}


def _rows(config: dict[str, Any]) -> list[dict[str, Any]]:
    from pluralign.experiments import EXPERIMENTS
    from pluralign.experiments.runner import units_of

    experiment = EXPERIMENTS[config["experiment"]]
    rows = []
    for unit in units_of(config):
        setting = experiment.describe_setting(config["env"][unit.setting])
        base = {"setting": setting, "repeat": unit.repeat}
        if config["experiment"] == "gshf":
            per = len(config["methods"]) * (unit.n + 1)
            for method in config["methods"]:
                for t in range(unit.n + 1):
                    rows.append(
                        {
                            **base,
                            "method": method,
                            "n": t,
                            "unit_n": unit.n,
                            "gap": 0.5 / (t + 1 + unit.repeat),
                            "kl": 0.1,
                            "reward": 0.2,
                            "comparisons": 20.0 * t,
                            "reached_target": float(t == 2),
                            "fit_seconds": 0.01,
                            "unit_rows": per,
                        }
                    )
            continue
        for i, method in enumerate(config["methods"]):
            metrics = {
                m: 0.1 * (i + 1) + 0.01 * unit.repeat + 1.0 / unit.n for m in experiment.metrics
            }
            rows.append({**base, "method": method, "n": unit.n, **metrics, "fit_seconds": 0.01})
    return rows


def _fixtures() -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    from pluralign.experiments import resolve_config

    out = []
    for config in _RUNS.values():
        resolved = resolve_config(config)
        out.append((resolved, _rows(resolved)))
    return out


FIXTURES = _fixtures()


# ------------------------------------------------------------------ run.resolve_config
def _resolve(value: tuple[Any, bool], tmp: Path) -> None:
    from pluralign.experiments import resolve_config

    config, quick = value
    resolved = resolve_config(config, quick=quick)
    assert resolve_config(copy.deepcopy(resolved)) == resolved  # idempotent: what config.yaml holds


register(
    Target(
        "run.resolve_config",
        st.tuples(st.sampled_from(SEED_CONFIGS).flatmap(mutated_value), st.booleans()),
        _resolve,
    )
)


# ------------------------------------------------------------------ run.results_jsonl
def _results(value: tuple[int, bytes], tmp: Path) -> None:
    from pluralign.experiments import read_results
    from pluralign.experiments.runner import resume_rows, run_rows

    index, data = value
    resolved, _ = FIXTURES[index]
    path = tmp / "results.jsonl"
    path.write_bytes(data)
    rows = read_results(path)
    selected = run_rows(path, resolved)
    kept, complete = resume_rows(path, resolved)
    identities = [
        (r["setting"], r.get("unit_n", r["n"]), r["repeat"], r["method"], r["n"]) for r in selected
    ]
    assert len(set(identities)) == len(identities), "a repeated row survived"
    assert len(kept) <= len(selected) <= len(rows)
    assert len({(r["setting"], r.get("unit_n", r["n"]), r["repeat"]) for r in kept}) == len(
        complete
    ), "kept rows and complete units disagree"
    assert path.read_bytes() == data  # reading never changes the file


register(
    Target(
        "run.results_jsonl",
        st.integers(0, len(FIXTURES) - 1).flatmap(
            lambda i: st.tuples(st.just(i), mutated_jsonl(FIXTURES[i][1]))
        ),
        _results,
    )
)


# ------------------------------------------------------------------ run.report
def _report(value: tuple[bytes, bytes], tmp: Path) -> None:
    from typer.testing import CliRunner

    from pluralign.cli import app

    config, results = value
    (tmp / "config.yaml").write_bytes(config)
    (tmp / "results.jsonl").write_bytes(results)
    result = CliRunner().invoke(app, ["report", str(tmp)])
    if "Traceback" in result.output:
        raise AssertionError(f"report printed a traceback:\n{result.output}")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 2:
        raise PluralignError(result.output)  # a clean refusal
    if result.exit_code != 0:
        raise AssertionError(f"report exited {result.exit_code}:\n{result.output}")


@st.composite
def _run_folder(draw: st.DrawFn) -> tuple[bytes, bytes]:
    resolved, rows = draw(st.sampled_from(FIXTURES))
    config = yaml.safe_dump(resolved, sort_keys=False).encode()
    results = "".join(json.dumps(r) + "\n" for r in rows).encode()
    kind = draw(st.sampled_from(["config", "results", "both"]))
    if kind in ("config", "both"):
        config = draw(mutated_yaml(resolved))
    if kind in ("results", "both"):
        results = draw(mutated_jsonl(rows))
    return config, results


register(Target("run.report", _run_folder(), _report))
