"""Claim C11's tables from iterate histories: mean ± standard error over seeds, per arm, round
and user, and paired differences between arms (same seeds).

    python examples/c11_table.py DIR ARM [ARM ...] [--pair A:B ...] [--round T] [--plot PNG]

``DIR/ARM_sS/history.json`` (or ``DIR/c11_ARM_sS.json``, the copies in docs/iterate/) for
every seed ``S`` found. Each arm's seeds are found on disk; a paired difference uses the seeds
both arms have. ``A@T1:B@T2`` compares round ``T1`` of ``A`` with round ``T2`` of ``B`` (e.g.
a hybrid run at the same number of labels as an online one). ``--plot`` draws, per user, the
gold reward (mean ± standard error over seeds) against the round and against the per-token KL
(the sampled KL where an arm has no per-token one).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

METRICS = (("gold", "gold"), ("kl", "KL"), ("kl_token", "KL/token"), ("win_rate", "win vs π0"))


def histories(folder: Path, arm: str) -> dict[int, list[dict]]:
    """``{seed: history}`` of one arm."""
    found: dict[int, list[dict]] = {}
    for path in sorted(folder.iterdir()):
        for pattern in (rf"^{re.escape(arm)}_s(\d+)$", rf"^c11_{re.escape(arm)}_s(\d+)\.json$"):
            m = re.match(pattern, path.name)
            if m:
                file = path / "history.json" if path.is_dir() else path
                if file.is_file():
                    found[int(m.group(1))] = json.loads(file.read_text())
    return found


def mean_se(values: list[float]) -> str:
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if not x.size:
        return "-"
    se = x.std(ddof=1) / np.sqrt(x.size) if x.size > 1 else float("nan")
    return f"{x.mean():.3f} ± {se:.3f}"


def value(history: list[dict], t: int, user: str, key: str) -> float | None:
    for record in history:
        if record["round"] == t:
            return record["users"].get(user, {}).get(key)
    return None


def arm_table(folder: Path, arms: list[str]) -> str:
    runs = {arm: histories(folder, arm) for arm in arms}
    first = next(h for r in runs.values() for h in r.values())
    users = list(first[0]["users"])
    keys = [
        (k, label)
        for k, label in METRICS
        if any(value(h, 1, users[0], k) is not None for r in runs.values() for h in r.values())
    ]
    head = ["arm", "seeds", "round"] + [f"{u}: {label}" for u in users for _, label in keys]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for arm, seeds in runs.items():
        if not seeds:
            continue
        rounds = sorted({r["round"] for h in seeds.values() for r in h})
        for t in rounds:
            cells = [
                mean_se([value(h, t, u, k) for h in seeds.values()]) for u in users for k, _ in keys
            ]
            lines.append(
                f"| {arm} | {','.join(map(str, sorted(seeds)))} | {t} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def paired(folder: Path, spec: str, default_round: int, key: str = "gold") -> list[str]:
    left, right = spec.split(":")
    (a, ta), (b, tb) = [
        (s.split("@")[0], int(s.split("@")[1]) if "@" in s else default_round)
        for s in (left, right)
    ]
    ha, hb = histories(folder, a), histories(folder, b)
    seeds = sorted(set(ha) & set(hb))
    users = list(next(iter(ha.values()))[0]["users"]) if ha else []
    out = []
    for u in users:
        d = [value(ha[s], ta, u, key) - value(hb[s], tb, u, key) for s in seeds]
        out.append(
            f"* {a} (round {ta}) − {b} (round {tb}), {u}, {key}, seeds {seeds}: {mean_se(d)}"
        )
    return out


def plot(folder: Path, arms: list[str], path: Path) -> None:
    from pluralign.plots import _new_figure, figure_legend, method_style, save_figure

    runs = {arm: histories(folder, arm) for arm in arms}
    runs = {arm: seeds for arm, seeds in runs.items() if seeds}
    users = list(next(h for r in runs.values() for h in r.values())[0]["users"])
    fig = _new_figure((4.2 * len(users), 6.4))
    axes = fig.subplots(2, len(users), squeeze=False)
    for i, (arm, seeds) in enumerate(runs.items()):
        style = method_style(i)
        rounds = sorted({r["round"] for h in seeds.values() for r in h})
        for j, user in enumerate(users):

            def stats(
                key: str, t: int, user: str = user, seeds: dict = seeds
            ) -> tuple[float, float]:
                x = np.array([value(h, t, user, key) for h in seeds.values()], dtype=float)
                return x.mean(), (x.std(ddof=1) / np.sqrt(x.size) if x.size > 1 else 0.0)

            gold = [stats("gold", t) for t in rounds]
            kl_key = (
                "kl_token"
                if all(value(h, 1, user, "kl_token") is not None for h in seeds.values())
                else "kl"
            )
            kl = [stats(kl_key, t) for t in rounds]
            label = f"{arm} ({len(seeds)} seeds)" + ("" if kl_key == "kl_token" else ", sampled KL")
            axes[0, j].errorbar(
                [t + 0.04 * (i - len(runs) / 2) for t in rounds],
                [m for m, _ in gold],
                yerr=[e for _, e in gold],
                capsize=2,
                label=label,
                **style,
            )
            axes[1, j].errorbar(
                [m for m, _ in kl],
                [m for m, _ in gold],
                xerr=[e for _, e in kl],
                yerr=[e for _, e in gold],
                capsize=2,
                label=label,
                **style,
            )
            axes[0, j].set_title(user, fontsize=9)
            axes[0, j].set_xlabel("round t")
            axes[0, j].xaxis.get_major_locator().set_params(integer=True)
            axes[1, j].set_xlabel(
                "KL(π_t ‖ π0) (per token unless the legend says sampled)", fontsize=8
            )
    for ax in axes.flat:
        ax.set_ylabel("gold reward")
        ax.grid(True, alpha=0.3)
    figure_legend(fig, order=[])
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("arms", nargs="+")
    parser.add_argument("--pair", action="append", default=[])
    parser.add_argument("--round", type=int, default=3)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    print(arm_table(args.folder, args.arms))
    if args.plot is not None:
        plot(args.folder, args.arms, args.plot)
    for spec in args.pair:
        print()
        print("\n".join(paired(args.folder, spec, args.round)))


if __name__ == "__main__":
    main()
