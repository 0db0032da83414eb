"""``python -m fuzzing [--cases N] [--target NAME ...] [--seed S]`` (what ``make fuzz`` runs).

Runs every registered target on hypothesis-generated inputs, shares ``--cases`` across the
targets and prints, per target, the cases run, how many were accepted, refused with a clean
pluralign error, and escaped (any other exception: a bug). Each distinct escape is printed
once with its traceback. Exits 1 if anything escaped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from hypothesis import HealthCheck, Phase, given, seed, settings

from fuzzing import TARGETS
from fuzzing.core import run_case


def fuzz_target(name: str, cases: int, rng_seed: int) -> tuple[Counter, dict[str, str]]:
    target = TARGETS[name]
    counts: Counter = Counter()
    escapes: dict[str, str] = {}

    @seed(rng_seed)
    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(target.strategy)
    def check(value):
        outcome, detail = run_case(target, value)
        counts[outcome] += 1
        if detail is not None:
            signature = detail.strip().splitlines()[-1][:200]
            escapes.setdefault(signature, detail)

    check()
    return counts, escapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzzing", description=__doc__)
    parser.add_argument("--cases", type=int, default=10_000, help="total cases (all targets)")
    parser.add_argument("--target", action="append", help="only these targets (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = args.target or sorted(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(sorted(TARGETS))}")
    per = max(1, -(-args.cases // len(names)))
    total: Counter = Counter()
    print(f"{'target':<34} {'cases':>6} {'accepted':>9} {'clean':>7} {'escapes':>8} {'s':>6}")
    failures = {}
    for name in names:
        start = time.perf_counter()
        counts, escapes = fuzz_target(name, per, args.seed)
        total.update(counts)
        cases = sum(counts.values())
        print(f"{name:<34} {cases:>6} {counts['accepted']:>9} {counts['clean']:>7} "
              f"{counts['escape']:>8} {time.perf_counter() - start:>6.1f}", flush=True)
        if escapes:
            failures[name] = escapes
    cases = sum(total.values())
    print(f"{'total':<34} {cases:>6} {total['accepted']:>9} {total['clean']:>7} "
          f"{total['escape']:>8}")
    for name, escapes in failures.items():
        for signature, detail in escapes.items():
            print(f"\n--- escape in {name}: {signature}\n{detail}", file=sys.stderr)
    return 1 if total["escape"] else 0


if __name__ == "__main__":
    sys.exit(main())
