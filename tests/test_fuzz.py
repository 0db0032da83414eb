"""Fuzz every input boundary (``tests/fuzzing``): no input may escape as a raw exception.

Each registered target (a loader, a config resolver, a saved-model reader) runs on
``PLURALIGN_FUZZ_EXAMPLES`` (default 150) generated inputs, mostly valid files with a few
mutations; the test fails on the first input that raises anything but a ``PluralignError``.
``make fuzz`` runs ten thousand and more and prints the counts.
"""

from __future__ import annotations

import os

import pytest
from fuzzing import TARGETS
from fuzzing.core import run_case
from hypothesis import HealthCheck, given, settings

EXAMPLES = int(os.environ.get("PLURALIGN_FUZZ_EXAMPLES", "150"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_no_input_escapes_as_a_raw_exception(name):
    target = TARGETS[name]

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(target.strategy)
    def check(value):
        outcome, detail = run_case(target, value)
        assert outcome != "escape", f"{name} let a raw exception escape:\n{detail}"

    check()


BOUNDARIES = {
    "data.numeric_jsonl",
    "data.npz",
    "data.trl_jsonl",
    "data.trl_rows",
    "data.trl_parquet",
    "data.summarize",
    "data.prism",
    "cli.data_validate",
    "model.load",
    "cli.rank",
    "config.yaml_file",
    "run.resolve_config",
    "run.results_jsonl",
    "run.report",
    "llm.train_rm_config",
    "llm.set_overrides",
    "llm.reward_head_json",
    "llm.adapter_files",
    "llm.checkpoint_state",
}


def test_every_boundary_has_a_target():
    """Every loader, config resolver and saved-model reader of issue 10 is fuzzed (a target
    module that stopped registering would otherwise pass silently)."""
    assert set(TARGETS) >= BOUNDARIES, sorted(BOUNDARIES - set(TARGETS))


def test_the_harness_tells_escapes_from_clean_errors():
    from fuzzing.core import Target
    from hypothesis import strategies as st

    from pluralign.errors import ConfigError

    def raising(exc):
        def run(value, tmp):
            assert tmp.is_dir()
            raise exc

        return run

    assert run_case(Target("t", st.none(), raising(ConfigError("x"))), None)[0] == "clean"
    outcome, detail = run_case(Target("t", st.none(), raising(TypeError("boom"))), None)
    assert outcome == "escape" and "TypeError: boom" in detail
    assert run_case(Target("t", st.none(), lambda v, tmp: None), None) == ("accepted", None)
