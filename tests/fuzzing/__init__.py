"""Fuzzing pluralign's input boundaries (see :mod:`fuzzing.core`). Importing the package
registers every target of the ``targets_*`` modules beside this file."""

from __future__ import annotations

import importlib
import pkgutil

from fuzzing.core import TARGETS, Target, classify, register

for _module in sorted(
    m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("targets_")
):
    importlib.import_module(f"fuzzing.{_module}")

__all__ = ["TARGETS", "Target", "classify", "register"]
