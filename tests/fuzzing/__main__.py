"""``python -m fuzzing [--cases N] [--target NAME ...] [--seed S]`` (what ``make fuzz`` runs).

Runs every registered target on hypothesis-generated inputs, shares ``--cases`` across the
targets and prints, per target, the cases run, how many were accepted, refused with a clean
pluralign error, and escaped (any other exception: a bug). Each distinct escape is printed
once with its traceback and the input that raised it. Exits 1 if anything escaped.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter

from hypothesis import HealthCheck, Phase, given, seed, settings

from fuzzing import TARGETS
from fuzzing.core import run_case

# a traceback line of pluralign's own code (the source tree or an installed package)
_PLURALIGN_FRAME = re.compile(r'\s*File "[^"]*[/\\](?:src|site-packages)[/\\]pluralign[/\\]')


def _shown(value: object, limit: int = 2000) -> str:
    """The input of an escape, for its reproducer (cut to ``limit`` characters)."""
    try:
        text = repr(value)
    except Exception as exc:  # a value whose repr fails is still reported
        text = f"<unprintable {type(value).__name__}: {exc!r}>"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _signature(detail: str) -> str:
    """An escape's exception line and where in pluralign it was raised (the innermost
    ``src/pluralign`` frame), so that one error raised in two places counts twice."""
    lines = detail.strip().splitlines()
    frames = [line.strip() for line in lines if _PLURALIGN_FRAME.match(line)]
    where = f" [{frames[-1]}]" if frames else ""
    return f"{lines[-1][:200]}{where}"


def fuzz_target(name: str, cases: int, rng_seed: int) -> tuple[Counter, dict[str, str]]:
    target = TARGETS[name]
    counts: Counter = Counter()
    escapes: dict[str, str] = {}

    @seed(rng_seed)
    @settings(
        max_examples=cases,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy)
    def check(value):
        outcome, detail = run_case(target, value)
        counts[outcome] += 1
        if detail is not None:
            signature = _signature(detail)
            escapes.setdefault(signature, f"{detail}input: {_shown(value)}\n")

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
        print(
            f"{name:<34} {cases:>6} {counts['accepted']:>9} {counts['clean']:>7} "
            f"{counts['escape']:>8} {time.perf_counter() - start:>6.1f}",
            flush=True,
        )
        if escapes:
            failures[name] = escapes
    cases = sum(total.values())
    print(
        f"{'total':<34} {cases:>6} {total['accepted']:>9} {total['clean']:>7} {total['escape']:>8}"
    )
    for name, escapes in failures.items():
        for signature, detail in escapes.items():
            print(f"\n--- escape in {name}: {signature}\n{detail}", file=sys.stderr)
    return 1 if total["escape"] else 0


if __name__ == "__main__":
    sys.exit(main())
