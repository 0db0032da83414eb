"""The LLM-layer commands: ``train-rm``, ``train-policy``, ``iterate`` and ``generate`` (thin
commands over the jobs of :mod:`pluralign.llm`, which need the ``llm`` extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from pluralign.cli.app import (
    JsonFlag,
    fail,
    load_command_config,
    resolve_config_path,
    stdout_to_stderr,
)
from pluralign.cli.output import (
    Column,
    console,
    err_console,
    iterate_view,
    make_table,
    print_json,
    print_table,
    render,
    train_policy_view,
    train_rm_view,
)
from pluralign.errors import PluralignError

__all__ = [
    "generate",
    "iterate_command",
    "read_prompt_rows",
    "run_llm_job",
    "train_policy_command",
    "train_rm",
]


# the options every LLM job command takes (one declaration, the same --help text)
OutOption = Annotated[
    Path | None, typer.Option("--out", "-o", help="Output folder (default: the config's out).")
]
ResumeOption = Annotated[
    bool, typer.Option(help="Continue from the last checkpoint in the output folder.")
]
ProgressOption = Annotated[bool, typer.Option(help="Show a progress bar.")]


def run_llm_job(
    command: str,
    module: str,
    function: str,
    config: Path,
    overrides: list[str] | None,
    **kwargs: Any,
) -> tuple[dict[str, Any], Any]:
    """Run an LLM job (``module.function(raw_config, **kwargs)``) from a YAML config with
    ``--set`` overrides; ``(raw config, report)``. A missing llm extra or a pluralign error
    exits cleanly (code 2)."""
    import importlib

    try:
        path = resolve_config_path(config)
    except PluralignError as err:
        raise fail(str(err)) from None
    try:
        job = getattr(importlib.import_module(module), function)
        from pluralign.llm.job import apply_overrides  # noqa: F401  (for --set)
    except ImportError as err:
        raise fail(f"{command} needs the llm extra (pip install 'pluralign[llm]'): {err}") from None
    try:
        _, raw = load_command_config(path, overrides or [], announce=False)
        return raw, job(raw, **kwargs)
    except PluralignError as err:
        raise fail(str(err)) from None


def train_rm(
    config: Annotated[
        Path,
        typer.Argument(
            help="A train-rm config: a YAML file, or a packaged "
            "config's name (rm_personas); see docs/llm.md."
        ),
    ],
    out: OutOption = None,
    resume: ResumeOption = True,
    progress: ProgressOption = True,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config value, e.g. --set lora.share=A "
            "--set train.num_train_epochs=5 "
            "(repeatable; values are read as YAML).",
        ),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Also write merged per-user models to OUT/merged/<user>/, loadable "
            "with AutoModelForSequenceClassification.from_pretrained alone "
            "(needs pooling cls on BERT-like models, last on decoders).",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Train a personalized (multi-user LoRA) reward model on a transformer; write per-user
    accuracy (JSON + plot), per-user PEFT adapters and checkpoints. Runs under
    `accelerate launch` on several processes or GPUs."""
    with stdout_to_stderr(as_json):
        raw, report = run_llm_job(
            "train-rm",
            "pluralign.llm.job",
            "train_reward_model",
            config,
            set_,
            out=out,
            resume=resume,
            progress=progress,
        )
    from accelerate import PartialState

    if not PartialState().is_main_process:  # initialized by the job
        return
    where = out or Path(raw.get("out", "runs/reward_model"))
    if merge:
        from pluralign.llm.export import merge_adapters

        try:
            merge_adapters(where / "adapters", where / "merged")
        except PluralignError as err:
            raise fail(str(err)) from None
    render(train_rm_view(where, report, merge), as_json)


def train_policy_command(
    config: Annotated[
        Path,
        typer.Argument(
            help="A train-policy config: a YAML file, or a "
            "packaged config's name (policy_toy, "
            "policy_personas); see docs/llm.md."
        ),
    ],
    out: OutOption = None,
    resume: ResumeOption = True,
    progress: ProgressOption = True,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config value, e.g. --set dpo.beta=0.2 "
            "--set train.num_train_epochs=5 "
            "(repeatable; values are read as YAML).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Train a personalized policy (a causal LM with multi-user LoRA) by DPO against its
    adapters-off reference; write per-user implicit-reward accuracy, margin and KL (JSON +
    plot), per-user PEFT adapters and checkpoints. Runs under `accelerate launch` too."""
    with stdout_to_stderr(as_json):
        raw, report = run_llm_job(
            "train-policy",
            "pluralign.llm.policy_job",
            "train_policy",
            config,
            set_,
            out=out,
            resume=resume,
            progress=progress,
        )
    from accelerate import PartialState

    if not PartialState().is_main_process:  # initialized by the job
        return
    where = out or Path(raw.get("out", "runs/policy"))
    render(train_policy_view(where, report), as_json)


def iterate_command(
    config: Annotated[
        Path,
        typer.Argument(
            help="An iterate config: a YAML file, or a "
            "packaged config's name (iterate_toy, "
            "iterate_smollm2); see docs/iterate.md."
        ),
    ],
    out: OutOption = None,
    resume: Annotated[
        bool, typer.Option(help="Continue after the last finished round in the output folder.")
    ] = True,
    progress: Annotated[
        bool, typer.Option(help="Show progress (a line per round and the DPO progress bar).")
    ] = True,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config value, e.g. --set iterate.pairs=enhancer "
            "--set iterate.seed=1 (repeatable; values are read as YAML).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Online iterative DPO of a personalized policy: each round samples from the current
    policy, annotates (reward model or a simulated gold Bradley-Terry oracle), chooses one
    pair per (prompt, user) and runs DPO against the fixed adapters-off reference; writes
    history.json, rounds.md, rounds.png, round-XX.jsonl and a resumable state."""
    log_console = err_console if as_json else console
    with stdout_to_stderr(as_json):
        _, report = run_llm_job(
            "iterate",
            "pluralign.llm.iterate",
            "run_iterate",
            config,
            set_,
            out=out,
            resume=resume,
            progress=progress,
            log=lambda msg: log_console.print(msg, soft_wrap=True, markup=False, highlight=False),
        )
    view = iterate_view(
        Path(report["out"]), report["history"], report["timings"], report["resumed_from"]
    )
    render(view, as_json)


def read_prompt_rows(path: Path, users: list[str]) -> list[tuple[str, str]]:
    """``(prompt, user)`` pairs of a JSONL file of ``{"prompt", "user_id"}`` rows (a row
    without ``user_id`` is taken for each of ``users``)."""
    from pluralign.data.io import iter_jsonl_objects
    from pluralign.errors import DataValidationError

    if not path.is_file():
        raise DataValidationError("file not found", path=str(path))
    pairs = []
    for row, where in iter_jsonl_objects(path):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise DataValidationError("missing or not a non-empty string", field="prompt", **where)
        user = row.get("user_id")
        if user is None:
            if not users:
                raise DataValidationError("missing (or give --user)", field="user_id", **where)
            pairs += [(prompt, u) for u in users]
        elif isinstance(user, bool) or not isinstance(user, str | int) or user == "":
            raise DataValidationError(
                f"must be a non-empty string or an integer, got {user!r}", field="user_id", **where
            )
        else:
            pairs.append((prompt, str(user)))
    if not pairs:
        raise DataValidationError("no prompts", path=str(path))
    return pairs


def generate(
    run: Annotated[
        Path, typer.Argument(help="A train-policy output folder (its config.yaml and checkpoints).")
    ],
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", help="A prompt (repeatable); each is answered for each --user."),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help='JSONL of {"prompt": ..., "user_id": ...} rows.'),
    ] = None,
    user: Annotated[
        list[str] | None, typer.Option("--user", help="The user to answer for (repeatable).")
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Responses per prompt and user.")] = 1,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    temperature: Annotated[float, typer.Option("--temperature")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="Off unless given.")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    best_of: Annotated[
        int | None,
        typer.Option(
            "--best-of",
            min=1,
            help="Sample N candidates per response and keep the one the "
            "--reward-model scores highest.",
        ),
    ] = None,
    reward_model: Annotated[
        Path | None,
        typer.Option("--reward-model", help="A train-rm output folder (for --best-of)."),
    ] = None,
    pessimism: Annotated[
        float | None,
        typer.Option(
            "--pessimism",
            min=0.0,
            help="β: pick by reward − β‖φ − ν‖ (the reward model's "
            "last-layer uncertainty; needs --reward-model).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write JSONL here.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Sample responses of a trained personalized policy for each user (optionally
    best-of-n under a personalized reward model, with pessimism); print a table and write
    JSONL with --out."""
    from rich.text import Text

    from pluralign._atomic import atomic_write_text

    if pessimism is not None and reward_model is None:
        raise fail("--pessimism needs --reward-model (a train-rm output folder) and --best-of N")
    if (best_of is None) != (reward_model is None):
        raise fail(
            "--best-of N and --reward-model RM_FOLDER go together: best-of-n keeps "
            "the candidate the reward model scores highest"
        )
    if best_of is not None and top_k is not None:
        raise fail(
            "--top-k is not available with --best-of (candidates are sampled with "
            "--temperature and --top-p)"
        )
    if (prompt is None) == (prompts is None):
        raise fail("give --prompt TEXT (repeatable, with --user) or --prompts FILE.jsonl")
    if out is not None and out.is_dir():
        raise fail(f"--out {out} is a folder; give a file name")
    users = list(dict.fromkeys(user or []))
    try:
        from pluralign.llm.policy_job import load_policy, load_reward_model, reward_model_rows
    except ImportError as err:
        raise fail(f"generate needs the llm extra (pip install 'pluralign[llm]'): {err}") from None
    try:
        with stdout_to_stderr(as_json):
            if prompts is not None:
                pairs = read_prompt_rows(prompts, users)
            else:
                if not users:
                    raise PluralignError("--prompt needs --user (repeatable)")
                # --prompt is given: exactly one of --prompt and --prompts is (checked above)
                pairs = [(p, u) for p in prompt for u in users]  # type: ignore[union-attr]
            texts, who = [p for p, _ in pairs], [u for _, u in pairs]
            policy = load_policy(run, users=who)
            records: list[dict[str, Any]] = []
            if best_of is not None:
                from pluralign.llm.sampling import best_of_n

                # --best-of comes with --reward-model (checked above)
                rm = load_reward_model(reward_model, users=who)  # type: ignore[arg-type]
                beta = pessimism or 0.0
                uncertainty = None
                if beta > 0:
                    from pluralign.llm.uncertainty import LastLayerUncertainty

                    uncertainty = LastLayerUncertainty(beta=1.0).fit(
                        rm,
                        reward_model_rows(reward_model),  # type: ignore[arg-type]
                    )
                rows = [(i, j) for i in range(len(pairs)) for j in range(n)]
                picked = best_of_n(
                    policy,
                    rm,
                    [texts[i] for i, _ in rows],
                    [who[i] for i, _ in rows],
                    n=best_of,
                    pessimism=beta,
                    uncertainty=uncertainty,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                )
                for k, (i, j) in enumerate(rows):
                    c = int(picked.chosen[k])
                    norm = 0.0 if picked.norms is None else float(picked.norms[k, c])
                    records.append(
                        {
                            "user_id": who[i],
                            "prompt": texts[i],
                            "sample": j,
                            "response": picked.responses[k],
                            "reward": float(picked.rewards[k, c]),
                            "penalty": beta * norm,
                            "best_of": best_of,
                        }
                    )
            else:
                samples = policy.generate(
                    texts,
                    who,
                    n=n,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    seed=seed,
                )
                for i, group in enumerate(samples.texts):
                    for j, text in enumerate(group):
                        records.append(
                            {"user_id": who[i], "prompt": texts[i], "sample": j, "response": text}
                        )
    except PluralignError as err:
        raise fail(str(err)) from None
    if as_json:
        if out is not None:
            atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
        print_json(
            {
                "run": run,
                "checkpoint": Path(policy.checkpoint_).name,
                "out": out,
                "responses": records,
            }
        )
        return
    from rich.markup import escape

    title = escape(f"responses of {run} ({Path(policy.checkpoint_).name})")
    columns = [Column(c, justify="left") for c in ("user", "prompt", "response")]
    if best_of:
        columns += [Column("reward"), Column("penalty")]
    cells: list[list[Text | str]] = []
    for r in records[:200]:
        row: list[Text | str] = [Text(str(r["user_id"])), Text(r["prompt"]), Text(r["response"])]
        if best_of:
            row += [f"{r['reward']:.4g}", f"{r['penalty']:.4g}"]
        cells.append(row)
    if len(records) > 200:
        cells.append([f"... {len(records) - 200} more", "", "", *([""] * (2 if best_of else 0))])
    table = make_table(columns, cells, title, title_justify="left")
    print_table(table)
    if out is not None:
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
        console.print(f"wrote {len(records)} response(s) to {out}")
