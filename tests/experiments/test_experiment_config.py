"""The typed run config (issue 15): ``pluralign run`` configs as sections on
:mod:`pluralign.settings`, the experiments' env / options sections generated from their
declarations, and one behaviour whichever way a config is built (a file's mapping through
:func:`resolve_config`, or :class:`RunConfig` in Python)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from pluralign.errors import ConfigError
from pluralign.experiments import EXPERIMENTS, resolve_config
from pluralign.experiments.base import ExperimentSection, coerce, schema_section
from pluralign.experiments.config import EXPERIMENT_DEFAULT, TOP_LEVEL_KEYS, RunConfig
from pluralign.settings import describe, settings_table

GSHF = {
    "experiment": "gshf",
    "env": {"d": 4, "n_actions": 4, "n_eval": 30, "uncovered_dim": 2},
    "n_samples": [2],
    "options": {"batch_size": 20},
}


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ generated sections
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_sections_are_generated_from_the_declarations(name):
    experiment = EXPERIMENTS[name]
    for cls, defaults, spec in (
        (experiment.env_section, experiment.env_defaults, experiment.env_spec),
        (experiment.option_section, experiment.option_defaults, experiment.option_spec),
    ):
        assert issubclass(cls, ExperimentSection) and dataclasses.is_dataclass(cls)
        assert cls.defaults() == dict(defaults)
        assert list(cls.defaults()) == list(defaults)  # the order errors and tables follow
        constraints = cls.constraints()
        assert constraints.keys() == spec.keys()
        assert all(constraints[k] is spec[k] for k in spec)
        built = cls()  # the defaults pass their own checks
        assert built.to_dict() == dict(defaults)


def test_list_defaults_are_fresh_copies():
    env = EXPERIMENTS["loco"].env_section
    first, second = env(), env()
    assert first.singular_values == [1.0, 2.0]
    assert first.singular_values is not second.singular_values
    first.to_dict()["singular_values"].append(9.0)
    assert env().singular_values == [1.0, 2.0]
    assert EXPERIMENTS["loco"].env_defaults["singular_values"] == [1.0, 2.0]


def _reference(section, key, value, defaults, spec):
    """The resolution of one value by hand: coerce, then the constraint (the oracle)."""
    default = defaults[key]
    constraint = spec.get(key)
    if value is None and getattr(constraint, "nullable", False):
        out = None
    else:
        out = coerce(f"{section}.{key}", value, 0.0 if default is None else default)
    mapping = {**defaults, key: out}
    for other, check in spec.items():  # every constraint: others may name this key
        check.check(f"{section}.{other}", mapping[other], mapping)
    return out


VALUES = [None, True, False, 0, 1, 2, 3, -1, 2.5, 0.5, 1e300, "1e3", "0.5", "abc", "nan"]
VALUES += [10**400, [], [1.0], [0.5, 2.0], [2.0, 1.0], {"a": 1}, "uniform", "exact", 10_001]


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_a_section_resolves_each_value_as_coerce_then_the_constraint(name):
    experiment = EXPERIMENTS[name]
    for section, cls, defaults, spec in (
        ("env", experiment.env_section, experiment.env_defaults, experiment.env_spec),
        ("options", experiment.option_section, experiment.option_defaults, experiment.option_spec),
    ):
        checked = 0
        for key in defaults:
            for value in VALUES:
                try:
                    expected = _reference(section, key, value, dict(defaults), spec)
                except ConfigError as error:
                    assert _message(cls.from_dict, {key: value}) == str(error)
                    assert _message(cls, **{key: value}) == str(error)  # in Python too
                    continue
                got = getattr(cls.from_dict({key: value}), key)
                assert got == expected and type(got) is type(expected)
                checked += 1
        assert checked > len(defaults)  # each default passes, so some values do


def test_unknown_and_null_keys_keep_the_experiment_messages():
    env = EXPERIMENTS["loco"].env_section
    message = _message(env.from_dict, {"dx": 3, "dy": 4})
    assert message.startswith("unknown env parameter 'dx'; valid: d_x, d_phi, ")
    options = EXPERIMENTS["loco"].option_section
    assert _message(options.from_dict, {"l2": 1}).startswith("unknown option 'l2'; valid: ")
    assert _message(env.from_dict, {"d_x": None}) == (
        "'env.d_x' must be a whole number like the default 10, got None"
    )
    assert _message(env, d_x=3, rank=4) == "'env.rank' must be ≤ 'env.d_x' = 3, got 4"


def test_sections_are_frozen_and_replace_rechecks():
    env = EXPERIMENTS["gshf"].env_section(d=4, uncovered_dim=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.d = 5  # type: ignore[misc]
    assert dataclasses.replace(env, eta="0.5").eta == 0.5
    assert _message(dataclasses.replace, env, uncovered_dim=5) == (
        "'env.uncovered_dim' must be ≤ 'env.d' = 4, got 5"
    )


def test_schema_section_refuses_inconsistent_declarations():
    with pytest.raises(TypeError, match="undeclared"):
        schema_section("x.env", "env", "env parameter", {"a": 1}, {"b": None})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="cannot be section fields"):
        schema_section("x.env", "env", "env parameter", {"to_dict": 1}, {})


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_the_sections_are_documented_by_the_settings_base(name):
    experiment = EXPERIMENTS[name]
    sections = {"env": experiment.env_section, "options": experiment.option_section}
    rows = describe(sections)
    assert [key for key, _, _ in rows] == [
        *(f"env.{k}" for k in experiment.env_defaults),
        *(f"options.{k}" for k in experiment.option_defaults),
    ]
    table = settings_table(sections)
    for key, spec in experiment.env_spec.items():
        assert f"`env.{key}`" in table and spec.describe().replace("|", "\\|") in table


# ------------------------------------------------------------------ the run config
def test_top_level_keys_are_the_run_config_fields_and_quick():
    fields = [f.name for f in dataclasses.fields(RunConfig)]
    assert set(TOP_LEVEL_KEYS) == {*fields, "quick"}
    assert [k for k in TOP_LEVEL_KEYS if k in fields] == fields


def test_run_config_in_python_equals_the_resolved_file():
    built = RunConfig(experiment="gshf", env=GSHF["env"], n_samples=[2], options={"batch_size": 20})
    assert built.to_dict() == resolve_config(GSHF)
    assert RunConfig.from_dict(GSHF) == built
    assert isinstance(built.options, ExperimentSection) and built.options.batch_size == 20
    assert all(isinstance(env, ExperimentSection) for env in built.env)
    assert built.sweep is None
    # a resolved config rebuilt (and replaced) is itself: the sections pass through
    assert dataclasses.replace(built).to_dict() == built.to_dict()
    assert dataclasses.replace(built, seed=3).to_dict() == {**built.to_dict(), "seed": 3}


def test_defaults_of_n_samples_and_methods_are_the_experiments():
    built = RunConfig(experiment="multi_user")
    experiment = EXPERIMENTS["multi_user"]
    assert built.n_samples == sorted(experiment.default_n_samples)
    assert built.methods == list(experiment.methods)
    assert str(EXPERIMENT_DEFAULT) == "the experiment's default"
    # an explicit null is not the default: refused as before
    assert _message(RunConfig, experiment="multi_user", n_samples=None) == (
        "'n_samples' must be a non-empty list of positive integers"
    )
    assert _message(resolve_config, {"experiment": "multi_user", "methods": None}) == (
        "'methods' must be a non-empty list"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "'seed' must be an integer in [0, 2^63 − 1], got -1"),
        ({"seed": None}, "'seed' must be an integer in [0, 2^63 − 1], got None"),
        ({"repeats": 0}, "'repeats' must be a positive integer ≤ 10_000, got 0"),
        ({"experiment": "nope"}, "unknown experiment 'nope'; valid: gshf, loco, multi_user"),
        ({"env": []}, "'env' must be a mapping, or a non-empty list of mappings"),
        ({"options": [1]}, "'options' must be a mapping"),
        ({"methods": ["prs", "x"]}, "unknown method 'x'; valid: "),
        ({"sweep": {"d_x": 3}}, "sweep.d_x must be a non-empty list of values"),
    ],
)
def test_python_and_file_configs_are_refused_alike(kwargs, message):
    from_python = _message(RunConfig, **kwargs)
    assert from_python == _message(resolve_config, dict(kwargs))
    assert from_python.startswith(message)


def test_a_sweep_is_expanded_into_typed_sections_and_resolved_away():
    config = {"experiment": "multi_user", "env": {}, "sweep": {"diversity": [0, 1, 0]}}
    built = RunConfig.from_dict(config)
    assert [env.diversity for env in built.env] == [0.0, 1.0]
    resolved = built.to_dict()
    assert "sweep" not in resolved and resolve_config(resolved) == resolved


def test_quick_overrides_apply_only_with_quick():
    config = {"experiment": "multi_user", "repeats": 5, "quick": {"repeats": 2}}
    assert RunConfig.from_dict(config).repeats == 5
    assert RunConfig.from_dict(config, quick=True).repeats == 2
    assert _message(RunConfig.from_dict, {"quick": {"experiment": "gshf"}}).startswith(
        "unknown quick override 'experiment'"
    )


def test_resolved_values_have_their_defaults_types_and_yaml_round_trips():
    for name, experiment in sorted(EXPERIMENTS.items()):
        base = copy.deepcopy(GSHF) if name == "gshf" else {"experiment": name}
        resolved = resolve_config(base)
        text = yaml.safe_dump(resolved, sort_keys=False)
        assert yaml.safe_load(text) == resolved and resolve_config(yaml.safe_load(text)) == resolved
        for env in resolved["env"]:
            for key, default in experiment.env_defaults.items():
                if default is not None:
                    assert type(env[key]) is type(default), (name, key)
        for key, default in experiment.option_defaults.items():
            assert type(resolved["options"][key]) is type(default), (name, key)
        assert list(resolved["options"]) == list(experiment.option_defaults)
