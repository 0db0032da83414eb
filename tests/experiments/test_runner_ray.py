"""The Ray backend of the sweep runner (issue 16): the same rows as the local pool, resuming after
a kill, failed units named while the others finish, and the CLI's ``--backend ray``.

One local Ray (2 CPUs, no dashboard, a small object store) serves the whole module; the oracle
of every comparison is the local backend's run of the same config (``--jobs 1``, in-process).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.errors import ConfigError
from pluralign.experiments import read_results, run_experiment
from pluralign.experiments.base import Unit
from pluralign.experiments.runner import (
    LocalBackend,
    RayBackend,
    UnitsFailedError,
    describe_unit,
    resume_rows,
)

ray = pytest.importorskip("ray")  # in the dev extra: `make test` runs these tests

BAD = Unit(setting=0, n=100, repeat=1)  # the unit the failure tests break


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]


def run(config, out, **kwargs):
    return run_experiment(copy.deepcopy(config), out, progress=False, **kwargs)


def counter():
    seen = []
    return seen, seen.append


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray for this module's tests; its GCS address (for a second driver)."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        logging_level=logging.WARNING,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The tiny config run by the local backend, one process (the oracle)."""
    from conftest import TINY_CONFIG

    out = tmp_path_factory.mktemp("local1")
    resolved = run(TINY_CONFIG, out, jobs=1)
    return out, resolved, read_results(out / "results.jsonl")


def summary_without_time(path):
    with path.open(newline="") as handle:
        return [
            {k: v for k, v in record.items() if not k.startswith("fit_seconds")}
            for record in csv.DictReader(handle)
        ]


def test_ray_local_serial_and_local_parallel_give_the_same_rows(
    tmp_path, tiny_config, ray_address, local_reference
):
    ref_out, resolved, reference = local_reference
    run(tiny_config, tmp_path / "local2", jobs=2)
    assert run(tiny_config, tmp_path / "ray", backend=RayBackend()) == resolved
    assert len(reference) == 8  # 4 units × 2 methods
    for name in ("local2", "ray"):
        out = tmp_path / name
        rows = read_results(out / "results.jsonl")
        assert without_time(rows) == without_time(reference), name  # same order too
        assert all(r["fit_seconds"] >= 0 for r in rows)
        assert summary_without_time(out / "summary.csv") == summary_without_time(
            ref_out / "summary.csv"
        )
        assert yaml.safe_load((out / "config.yaml").read_text()) == resolved
        assert (out / "suboptimality.png").read_bytes().startswith(b"\x89PNG")
    # a different seed under Ray gives different numbers: the rows are not copied from anywhere
    other = run({**tiny_config, "seed": 1}, tmp_path / "seed1", backend=RayBackend())
    rows = read_results(tmp_path / "seed1" / "results.jsonl")
    assert other["seed"] == 1
    assert all(
        a["heldout_loglik"] != b["heldout_loglik"] for a, b in zip(rows, reference, strict=True)
    )


def test_an_interrupted_ray_run_resumes_without_recomputing(
    tmp_path, tiny_config, ray_address, local_reference
):
    class Interrupted(Exception):
        pass

    def stop_after_two(unit):
        done.append(unit.key)
        if len(done) == 2:
            raise Interrupted

    done: list = []
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(tiny_config, out, backend=RayBackend(), on_unit=stop_after_two)
    before = read_results(out / "results.jsonl")
    assert len(before) == 4
    seen, on_unit = counter()
    run(tiny_config, out, backend=RayBackend(), on_unit=on_unit)
    assert len(seen) == 2 and not {u.key for u in seen} & set(done)
    after = read_results(out / "results.jsonl")
    assert without_time(after) == without_time(local_reference[2])
    assert all(row in after for row in before)  # kept as written, fit_seconds included


def _unit_failing_at(bad: Unit, how: str):
    """A stand-in for the runner's Ray task that breaks at ``bad`` (a closure: Ray pickles it
    by value, so the workers need nothing from tests/)."""

    def task(config, unit, threads):
        if unit == bad:
            if how == "raise":
                raise ZeroDivisionError(f"injected failure at {unit.key}")
            os._exit(3)  # the worker process dies mid-task
        from pluralign.experiments import EXPERIMENTS

        return EXPERIMENTS[config["experiment"]].run_unit(config, unit)

    return task


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_failed_unit_is_named_the_others_finish_and_a_rerun_computes_only_it(
    tmp_path, tiny_config, ray_address, local_reference, monkeypatch, how
):
    from pluralign.experiments import runner

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(runner, "_ray_unit", _unit_failing_at(BAD, how))
        seen, on_unit = counter()
        with pytest.raises(UnitsFailedError) as info:
            run(tiny_config, out, backend=RayBackend(), on_unit=on_unit)
    error = info.value
    assert [f.unit for f in error.failures] == [BAD]
    _, resolved, reference = local_reference
    assert describe_unit(resolved, BAD) in str(error)
    assert "n=100, repeat=1" in str(error)
    if how == "raise":
        assert "ZeroDivisionError: injected failure at (0, 100, 1)" in str(error)
    else:
        assert "WorkerCrashedError" in str(error) or "died" in str(error).lower()
    # every other unit finished and its rows were written
    assert sorted(u.key for u in seen) == sorted(
        k for k in [(0, n, r) for r in range(2) for n in (50, 100)] if k != BAD.key
    )
    kept, complete = resume_rows(out / "results.jsonl", resolved)
    assert len(kept) == 6 and BAD.key not in complete and len(complete) == 3

    seen, on_unit = counter()
    run(tiny_config, out, backend=RayBackend(), on_unit=on_unit)
    assert seen == [BAD]
    assert without_time(read_results(out / "results.jsonl")) == without_time(reference)


def test_a_killed_ray_driver_resumes_to_the_uninterrupted_rows(tmp_path, tiny_config, ray_address):
    config = {**tiny_config, "repeats": 30}  # 60 units: time to kill it midway
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    results = out / "results.jsonl"
    cmd = [sys.executable, "-c", "from pluralign.cli import app; app()", "run", str(path)]
    cmd += ["--out", str(out), "--backend", "ray", "--address", ray_address, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(3000):  # liveness poll: until a few units are written
            if results.exists() and results.read_bytes().count(b"\n") >= 6:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed midway"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    resolved = run(config, tmp_path / "reference", jobs=1)
    reference = read_results(tmp_path / "reference" / "results.jsonl")
    kept, complete = resume_rows(results, resolved)
    assert 3 <= len(complete) < 60

    seen, on_unit = counter()
    run(config, out, backend=RayBackend(), on_unit=on_unit)
    assert len(seen) == 60 - len(complete)
    assert not {u.key for u in seen} & complete
    after = read_results(results)
    assert without_time(after) == without_time(reference)
    assert all(row in after for row in kept)


def comparable(document):
    """A run's ``--json`` document without what differs between two runs of one config: the
    timings and the output folder's name."""
    if isinstance(document, dict):
        return {
            k: comparable(v)
            for k, v in document.items()
            if not k.startswith("fit_seconds") and k not in ("out", "files", "title")
        }
    if isinstance(document, list):
        return [comparable(v) for v in document if v != "fit_seconds"]
    return document


def test_cli_run_backend_ray(tmp_path, tiny_config, ray_address, local_reference):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    base = ["run", str(path), "--no-progress", "--json"]
    ray_args = ["--out", str(tmp_path / "ray"), "--backend", "ray", "--cpus-per-unit", "1"]
    result = CliRunner().invoke(app, [*base, *ray_args])
    assert result.exit_code == 0, result.output
    local = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "local"), "-j", "1"])
    assert local.exit_code == 0, local.output
    document = json.loads(result.stdout)  # stdout holds the JSON document alone
    assert document["summary"] and document["out"] == str(tmp_path / "ray")
    assert comparable(document) == comparable(json.loads(local.stdout))
    rows = read_results(tmp_path / "ray" / "results.jsonl")
    assert without_time(rows) == without_time(local_reference[2])


def test_cli_backend_options_are_checked_before_anything_runs(tmp_path, tiny_config):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "out"
    base = ["run", str(path), "--out", str(out), "--no-progress"]
    for extra, says in (
        (["--backend", "ray", "--jobs", "2"], "--jobs"),
        (["--address", "auto"], "--backend ray"),
        (["--cpus-per-unit", "2"], "--backend ray"),
        (["--backend", "dask"], "dask"),
    ):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert says in " ".join(result.output.split())
    assert not out.exists()
    with pytest.raises(ConfigError, match="jobs"):
        run(tiny_config, out, jobs=2, backend=LocalBackend())


def test_without_ray_the_backend_says_how_to_install_it(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "out"
    args = ["run", str(path), "--out", str(out), "--backend", "ray", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "pip install 'pluralign[ray]'" in " ".join(result.output.split())
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"pluralign\[ray\]"):
        run(tiny_config, tmp_path / "api", backend=RayBackend())
