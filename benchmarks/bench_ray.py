"""P10 (issue 16): the Ray backend of ``pluralign run`` against the local process pool.

Budget: 200 small units (units of the quick LoCo config, ``configs/quick.yaml``: d_x = d_phi =
10, rank 2, 8 actions, 1,000 target states, its 6 methods, N from 250 to 4,000; 40 repeats ×
5 sample sizes = 200 units) on the same 2 cores: the Ray backend's wall time is at most 1.3×
the local pool's (``--jobs 2``), both measured in this run, alternating, best of ``ROUNDS``.
Both runs are whole ``run_experiment`` calls into a fresh folder (start-up of the worker
processes and their imports included, the final rewrite, summary and plot included). Each Ray
round starts a fresh local cluster just before its timing (``ray.init(num_cpus=2)``, as a
cluster is started once with ``ray start`` before a sweep; that start-up is reported apart, and
in a second ratio), so Ray's workers import torch and pluralign within the timing, as the
pool's do. Processes: the
local pool spawns 2 workers; Ray runs 2 worker processes (one task per CPU) beside its own
services (GCS, raylet, …); one BLAS / torch thread per unit in both. The rows of both are
checked to be equal (timings aside).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from pluralign._packaged import packaged_configs_dir
from pluralign.configfile import load_config
from pluralign.experiments import read_results, run_experiment
from pluralign.experiments.runner import RayBackend

BUDGET_RATIO = 1.3
REPEATS = 40  # × 5 sample sizes = 200 units
ROUNDS = 2
CPUS = 2


def _config() -> dict:
    config = load_config(packaged_configs_dir() / "quick.yaml")
    config["repeats"] = REPEATS
    return config


def _timed(out: Path, **kwargs) -> tuple[float, list[dict]]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run_experiment(_config(), out, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    rows = [
        {k: v for k, v in r.items() if k != "fit_seconds"}
        for r in read_results(out / "results.jsonl")
    ]
    return seconds, rows


def bench_ray_backend() -> dict:
    """P10 (issue 16): 200 quick-LoCo units, Ray backend ≤ 1.3× the local pool (2 cores)."""
    try:
        import ray
    except ImportError:
        return {"skipped": "ray is not installed (pip install 'pluralign[ray]')"}
    out: dict = {
        "setting": f"quick LoCo units, {REPEATS} repeats x 5 N = {5 * REPEATS} units, "
        f"{CPUS} CPUs; local pool: {CPUS} spawned workers; Ray: {CPUS} workers "
        "(num_cpus=1 per unit); 1 BLAS/torch thread per unit",
    }
    local_times, ray_times, starts = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(ROUNDS):
            seconds, local_rows = _timed(Path(tmp) / "local", jobs=CPUS)
            local_times.append(seconds)
            start = time.perf_counter()
            ray.init(
                num_cpus=CPUS,
                include_dashboard=False,
                object_store_memory=100 * 2**20,
                logging_level="warning",
            )
            starts.append(time.perf_counter() - start)
            try:
                seconds, ray_rows = _timed(Path(tmp) / "ray", backend=RayBackend())
            finally:
                ray.shutdown()
            ray_times.append(seconds)
            out.setdefault("same_rows", True)
            out["same_rows"] = out["same_rows"] and ray_rows == local_rows
    local, ray_best = min(local_times), min(ray_times)
    out["local_pool_seconds"] = [round(t, 2) for t in local_times]
    out["ray_seconds"] = [round(t, 2) for t in ray_times]
    out["ray_start_seconds"] = [round(t, 2) for t in starts]
    out["ratio_ray/local"] = round(ray_best / local, 3)
    out["ratio_with_ray_start"] = round((ray_best + min(starts)) / local, 3)
    out[f"budget_ratio<={BUDGET_RATIO:g}"] = ray_best / local <= BUDGET_RATIO
    return out


if __name__ == "__main__":  # pragma: no cover
    for key, value in bench_ray_backend().items():
        print(f"   {key:<34} {value}")
