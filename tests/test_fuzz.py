"""Fuzz every input boundary (``tests/fuzzing``): no input may escape as a raw exception.

Each registered target (a loader, a config resolver, a saved-model reader) runs on
``PLURALIGN_FUZZ_EXAMPLES`` (default 150) generated inputs, mostly valid files with a few
mutations; the test fails on the first input that raises anything but a ``PluralignError``.
``make fuzz`` runs ten thousand and more and prints the counts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
from fuzzing import TARGETS, classify
from hypothesis import HealthCheck, given, settings

EXAMPLES = int(os.environ.get("PLURALIGN_FUZZ_EXAMPLES", "150"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_no_input_escapes_as_a_raw_exception(name):
    target = TARGETS[name]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(target.strategy)
    def check(value):
        tmp = Path(tempfile.mkdtemp(prefix="pluralign-fuzz-"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outcome, detail = classify(target, value, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        assert outcome != "escape", f"{name} let a raw exception escape:\n{detail}"

    check()


def test_every_boundary_has_a_target():
    assert len(TARGETS) >= 1
