"""Helpers shared by the tests of what the CLI prints (test_cli_output, test_report_folders)."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from pluralign.cli import app


@pytest.fixture
def narrow_fallback(monkeypatch):
    """rich's old 80-column fallback, whatever terminal runs pytest."""
    monkeypatch.setenv("COLUMNS", "80")


def invoke(*args: Any):
    return CliRunner().invoke(app, [str(a) for a in args])


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in ``text``, each as its stripped cells."""
    return [
        [c.strip() for c in line.split("│")[1:-1]]
        for line in text.splitlines()
        if line.startswith("│")
    ]
