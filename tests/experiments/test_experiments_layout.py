"""The experiments' layout (docs in ``pluralign.experiments``): the registry, and an import
graph without cycles in which nothing below the experiments imports them.

The import graph is read from the source with :mod:`ast` (every ``import`` and ``from ...
import``, at module level or inside a function), and cross-checked with grimp where it is
installed.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import pluralign
from pluralign.errors import ConfigError
from pluralign.experiments import GSHF, LOCO, MULTI_USER, resolve_config
from pluralign.experiments.registry import (
    EXPERIMENTS,
    experiment_names,
    get_experiment,
    register,
)

SRC = Path(pluralign.__file__).resolve().parent
PACKAGE = "pluralign.experiments"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str) -> list[tuple[str, bool]]:
    """``(imported module, inside a function)`` for every pluralign import of module ``name``;
    ``from P import X`` counts as an import of ``P.X`` when that is a module, else of ``P``."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    nested = {
        id(node)
        for func in ast.walk(tree)
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(func)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in MODULES
                else node.module
                for alias in node.names
            ]
        else:
            assert not isinstance(node, ast.ImportFrom), f"{name}: a relative import"
            continue
        out += [(t, id(node) in nested) for t in targets if t.split(".")[0] == "pluralign"]
    return out


def _is_experiments(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (empty iff the graph is acyclic)."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif state[nxt] == 0:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_experiment_modules_import_each_other_without_cycles():
    inside = sorted(m for m in MODULES if _is_experiments(m))
    assert {
        "pluralign.experiments.registry",
        "pluralign.experiments.loco.methods",
        "pluralign.experiments.loco.claims",
        "pluralign.experiments.multi_user.plots",
        "pluralign.experiments.gshf.claims",
    } <= set(inside)
    graph = {m: {t for t, _ in _imports(m) if _is_experiments(t)} for m in inside}
    assert _cycles(graph) == []
    for module in inside:
        assert PACKAGE not in graph[module], f"{module} imports the package {PACKAGE} itself"
        hidden = [t for t, local in _imports(module) if local]
        assert hidden == [], f"{module} imports {hidden} inside a function"


def test_nothing_below_the_experiments_imports_them():
    importers = {
        module
        for module in MODULES
        if not _is_experiments(module)
        for target, _ in _imports(module)
        if _is_experiments(target)
    }
    assert importers == {"pluralign.cli.experiments", "pluralign.cli.report"}
    for neutral in ("pluralign.plots", "pluralign.configfile"):
        targets = {t for t, _ in _imports(neutral)}
        assert targets <= {
            "pluralign._atomic",
            "pluralign._packaged",
            "pluralign._parse",
            "pluralign.errors",
        }, f"{neutral} imports {targets}"


def test_grimp_agrees_that_there_is_no_cycle():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("pluralign")
    inside = sorted(m for m in graph.modules if _is_experiments(m))
    assert graph.find_modules_that_directly_import(PACKAGE) == {
        "pluralign.cli.experiments",
        "pluralign.cli.report",
    }
    for a in inside:
        for b in inside:
            if a < b:
                assert not (graph.chain_exists(a, b) and graph.chain_exists(b, a)), (a, b)


def test_registry_holds_each_experiment_once_and_refuses_a_second_under_its_name():
    assert EXPERIMENTS == {"loco": LOCO, "gshf": GSHF, "multi_user": MULTI_USER}
    assert experiment_names() == ["gshf", "loco", "multi_user"]
    for name, experiment in EXPERIMENTS.items():
        assert get_experiment(name) is experiment
        assert register(experiment) is experiment  # registering the same object again is a no-op
    impostor = dataclasses.replace(LOCO, default_n_samples=(7,))
    with pytest.raises(ValueError, match="'loco' is already registered"):
        register(impostor)
    assert EXPERIMENTS["loco"] is LOCO


@pytest.mark.parametrize("name", ["nope", "LOCO", 3, None, ["loco"]])
def test_unknown_experiment_is_refused_with_the_valid_names(name):
    expected = f"unknown experiment {name!r}; valid: gshf, loco, multi_user"
    with pytest.raises(ConfigError) as caught:
        get_experiment(name)
    assert str(caught.value) == expected
    with pytest.raises(ConfigError) as caught:
        resolve_config({"experiment": name})
    assert str(caught.value) == expected
