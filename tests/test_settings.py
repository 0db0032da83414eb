"""The typed-settings base (:mod:`pluralign.settings`): a section declared on it checks, reads,
writes and documents its settings, independently of the LLM layer that uses it first."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any, ClassVar

import pytest

from pluralign.errors import ConfigError
from pluralign.settings import (
    Section,
    Setting,
    choice,
    describe,
    flag,
    integer,
    real,
    resolve_sections,
    setting,
    settings_table,
    string,
    to_plain,
)


@dataclasses.dataclass(frozen=True)
class Sweep(Section):
    """A section of the kind an experiment config could declare."""

    SECTION: ClassVar[str] = "sweep"
    SHORTHAND: ClassVar[str | None] = "name"

    name: str | None = setting(None, "the sweep's name", string(optional=True), required="a name")
    repeats: int = setting(
        2, "repeats per point (a positive integer)", integer(), renamed_from=("n",)
    )
    delta: float = setting(
        0.1, "the confidence level δ, in (0, 1)", real(low=0.0, low_open=True, high=1.0)
    )
    solver: str = setting("exact", "exact | fast", choice("exact", "fast"))
    verbose: bool = setting(False, "print each point", flag)
    budget: int | None = setting(
        None, "at most this many points; null: all", integer(optional=True)
    )

    @classmethod
    def _cross_check(cls, values: dict[str, Any], section: str) -> None:
        if values["solver"] == "fast" and values["budget"] is None:
            p = f"{section}." if section else ""
            raise ConfigError(f"{p}budget is required when {p}solver is fast")


def test_from_dict_fills_defaults_checks_and_round_trips():
    sweep = Sweep.from_dict({"name": "a", "repeats": "3", "delta": 0.5})
    assert (sweep.name, sweep.repeats, sweep.delta, sweep.solver) == ("a", 3, 0.5, "exact")
    assert type(sweep.repeats) is int  # a number written as text (YAML) is read
    assert sweep.to_dict() == {
        "name": "a",
        "repeats": 3,
        "delta": 0.5,
        "solver": "exact",
        "verbose": False,
        "budget": None,
    }
    assert Sweep.from_dict(sweep.to_dict()) == sweep
    assert Sweep.from_dict("b") == Sweep(name="b")  # the shorthand
    assert Sweep.defaults() == {f.name: f.default for f in dataclasses.fields(Sweep)}


@pytest.mark.parametrize(
    "given,message",
    [
        ({"name": "a", "n": 3}, "unknown key 'n' in 'sweep': renamed to 'repeats'"),
        ({"name": "a", "foo": 1}, "unknown key(s) ['foo'] in 'sweep'; valid: name, repeats, "),
        (
            {"name": "a", "repeats": 0},
            "sweep.repeats must be a positive integer (at most 2**63 - 1), got 0",
        ),
        ({"name": "a", "repeats": True}, "sweep.repeats must be a positive integer, got True"),
        ({"name": "a", "delta": float("nan")}, "sweep.delta must be a finite number > 0 and < 1"),
        ({"name": "a", "solver": "slow"}, "sweep.solver must be one of exact, fast, got 'slow'"),
        ({"name": "a", "verbose": 1}, "sweep.verbose must be true or false, got 1"),
        ({"name": "a", "repeats": None}, "sweep.repeats may not be null (leave it out to use"),
        ({"repeats": 3}, "sweep.name is required (a name)"),
        ({"name": "a", "solver": "fast"}, "sweep.budget is required when sweep.solver is fast"),
        (["name"], "'sweep' must be a mapping, got ['name']"),
    ],
)
def test_from_dict_refuses_naming_the_key(given, message):
    with pytest.raises(ConfigError) as err:
        Sweep.from_dict(given)
    assert str(err.value).startswith(message), str(err.value)
    # resolve_sections reads each section with from_dict: the same message
    with pytest.raises(ConfigError) as again:
        resolve_sections({"sweep": given}, {"sweep": Sweep})
    assert str(again.value) == str(err.value)


def test_building_in_python_runs_the_same_checks():
    with pytest.raises(ConfigError, match=r"^sweep\.repeats must be a positive integer"):
        Sweep(name="a", repeats=0)
    with pytest.raises(ConfigError, match=r"^sweep\.budget is required"):
        dataclasses.replace(Sweep(name="a"), solver="fast")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Sweep(name="a").repeats = 3  # type: ignore[misc]


def test_check_value_is_the_fields_check_strict_for_python_keywords():
    assert Sweep.check_value("repeats", 4) == 4
    with pytest.raises(ConfigError, match=r"^n_repeats must be a positive integer, got '4'$"):
        Sweep.check_value("repeats", "4", name="n_repeats")  # strict: no text numbers
    assert Sweep.check_value("repeats", "4", text=True) == 4
    with pytest.raises(ConfigError, match=r"^delta must be a finite number > 0 and < 1, got 1$"):
        Sweep.check_value("delta", 1)
    # the same refusals as the section's, under another name
    for value in (0, -1, 2.5, True, None, [1], 10**400):
        with pytest.raises(ConfigError) as section:
            Sweep(name="a", repeats=value)
        with pytest.raises(ConfigError) as keyword:
            Sweep.check_value("repeats", value)
        assert str(section.value).replace("sweep.repeats", "repeats") == str(keyword.value) or (
            value is None and "may not be null" in str(section.value)
        )


def test_describe_and_settings_table_document_every_setting():
    top = {"out": Setting("runs/sweep", "the output folder")}
    rows = describe({"sweep": Sweep}, top)
    assert rows[0] == ("sweep.name", None, "required: the sweep's name")
    assert [key for key, _, _ in rows] == [f"sweep.{f.name}" for f in dataclasses.fields(Sweep)] + [
        "out"
    ]
    table = settings_table({"sweep": Sweep}, top)
    assert table.splitlines() == [
        "| key | default | meaning |",
        "| --- | --- | --- |",
        "| `sweep.name` | `null` | required: the sweep's name |",
        "| `sweep.repeats` | `2` | repeats per point (a positive integer) |",
        "| `sweep.delta` | `0.1` | the confidence level δ, in (0, 1) |",
        "| `sweep.solver` | `exact` | exact \\| fast |",
        "| `sweep.verbose` | `false` | print each point |",
        "| `sweep.budget` | `null` | at most this many points; null: all |",
        "| `out` | `runs/sweep` | the output folder |",
    ]


def test_resolve_sections_and_to_plain():
    resolved = resolve_sections(
        {"sweep": "a", "out": "x"}, {"sweep": Sweep}, top_level={"out": "y"}
    )
    assert resolved == {"sweep": Sweep(name="a"), "out": "x"}
    assert to_plain(resolved) == {"sweep": Sweep(name="a").to_dict(), "out": "x"}
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) \['extra'\]; valid: sweep, out$"):
        resolve_sections({"sweep": "a", "extra": 1}, {"sweep": Sweep}, top_level={"out": "y"})
    with pytest.raises(ConfigError, match=r"^out must be a non-empty string"):
        resolve_sections({"sweep": "a", "out": ""}, {"sweep": Sweep}, top_level={"out": "y"})


def test_the_base_imports_neither_torch_nor_the_llm_layer_nor_the_experiments():
    code = (
        "import sys, pluralign.settings; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('pluralign.llm', "
        "'pluralign.experiments'))]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
