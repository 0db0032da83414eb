"""Run every benchmark: ``python -m benchmarks [NAME ...] [--json FILE]``.

Each ``benchmarks/bench_*.py`` module exposes ``bench_*`` functions that return a dict of
numbers (times, ratios against the peer measured in the same run, budgets and whether they
were met). Nothing here is a test: budgets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
from pathlib import Path

import benchmarks


def discover() -> list[tuple[str, object]]:
    found = []
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda i: i.name):
        if not info.name.startswith("bench_"):
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        for name in sorted(vars(module)):
            if name.startswith("bench_") and callable(getattr(module, name)):
                found.append((f"{info.name}.{name}", getattr(module, name)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="substrings of benchmark names to run")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    machine = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import os

        machine["cores"] = os.cpu_count()
    except Exception:  # pragma: no cover
        pass
    results = {}
    for name, func in discover():
        if args.names and not any(s in name for s in args.names):
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        out = func()
        out["wall_seconds"] = round(time.perf_counter() - start, 2)
        for key, value in out.items():
            print(f"   {key:<34} {value}")
        results[name] = out
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
