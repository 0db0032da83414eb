"""PreferenceData: validation, slicing, splitting, concatenation and file round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pluralign.data import PreferenceData, TargetStates, load_preferences, save_preferences
from pluralign.errors import DataValidationError

N, D_X, D_PHI = 12, 3, 4


def arrays(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, D_X)),
        "phi0": rng.standard_normal((n, D_PHI)),
        "phi1": rng.standard_normal((n, D_PHI)),
        "y": rng.integers(0, 2, size=n),
    }


def tagged(n: int = 40) -> PreferenceData:
    """Data whose row i is recognisable: phi0[i, 0] == i and users[i] == f"u{i}"."""
    a = arrays(n)
    a["phi0"][:, 0] = np.arange(n)
    return PreferenceData(**a, users=np.array([f"u{i}" for i in range(n)]))


def assert_error(err: DataValidationError, field: str, row: int | None = None) -> None:
    assert err.field == field
    assert repr(field) in str(err) or field in str(err)
    if row is not None:
        assert err.row == row
        assert f"row {row}" in str(err)


def assert_same(a: PreferenceData, b: PreferenceData) -> None:
    for name in ("x", "phi0", "phi1", "y", "users"):
        va, vb = getattr(a, name), getattr(b, name)
        if va is None or vb is None:
            assert va is None and vb is None, name
        else:
            np.testing.assert_array_equal(va, vb, err_msg=name)


# ----------------------------------------------------------------------------- validation
def test_valid_data_is_stored_as_validated_arrays():
    a = arrays()
    data = PreferenceData(**a)
    assert data.n == len(data) == N
    assert (data.d_x, data.d_phi) == (D_X, D_PHI)
    assert data.phi0.dtype == np.float64
    np.testing.assert_array_equal(data.y, a["y"])
    np.testing.assert_array_equal(data.delta_phi, a["phi1"] - a["phi0"])
    assert PreferenceData(None, a["phi0"], a["phi1"], a["y"]).d_x == 0


@pytest.mark.parametrize("field", ["x", "phi0", "phi1"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_field_and_first_bad_row(field, bad):
    a = arrays()
    a[field][7, 1] = bad
    a[field][9, 0] = bad
    with pytest.raises(DataValidationError) as info:
        PreferenceData(**a)
    assert_error(info.value, field, row=7)


@pytest.mark.parametrize(
    "users",
    [np.arange(N, dtype=float), np.array([1, "a"] * (N // 2), dtype=object)],
    ids=["float-ids", "mixed-int-and-str"],
)
def test_user_ids_must_be_all_int_or_all_str(users):
    # Float ids would not survive a JSONL round trip, and mixed ids would be silently
    # stringified, so both are refused at the boundary.
    with pytest.raises(DataValidationError) as info:
        PreferenceData(**arrays(), users=users)
    assert_error(info.value, "users")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("x", np.zeros(N)),  # 1-D
        ("x", np.zeros((N, D_X, 1))),  # 3-D
        ("phi0", np.zeros(N)),
        ("phi1", np.zeros((N, 2, D_PHI))),
        ("y", np.zeros((N, 1))),
    ],
)
def test_wrong_number_of_dimensions_names_field(field, value):
    a = arrays()
    a[field] = value
    with pytest.raises(DataValidationError) as info:
        PreferenceData(**a)
    assert_error(info.value, field)


def test_phi_column_mismatch_names_phi1():
    a = arrays()
    a["phi1"] = a["phi1"][:, :3]
    with pytest.raises(DataValidationError) as info:
        PreferenceData(**a)
    assert_error(info.value, "phi1")


@pytest.mark.parametrize("bad_label", [2, -1, 0.5, np.nan])
def test_labels_outside_zero_one_name_y_and_row(bad_label):
    a = arrays()
    y = a["y"].astype(float)
    y[5] = bad_label
    y[8] = bad_label
    with pytest.raises(DataValidationError) as info:
        PreferenceData(**{**a, "y": y})
    assert_error(info.value, "y", row=5)


def test_non_numeric_labels_name_y():
    a = arrays()
    with pytest.raises(DataValidationError) as info:
        PreferenceData(**{**a, "y": np.array(["1"] * N)})
    assert_error(info.value, "y")


def test_float_and_bool_zero_one_labels_are_accepted_as_int():
    a = arrays()
    data = PreferenceData(**{**a, "y": a["y"].astype(float)})
    np.testing.assert_array_equal(data.y, a["y"])
    data = PreferenceData(**{**a, "y": a["y"].astype(bool)})
    np.testing.assert_array_equal(data.y, a["y"])


def test_empty_data_is_refused():
    with pytest.raises(DataValidationError) as info:
        PreferenceData(np.zeros((0, D_X)), np.zeros((0, D_PHI)), np.zeros((0, D_PHI)), np.zeros(0))
    assert info.value.field == "y"
    assert "empty" in str(info.value)


@pytest.mark.parametrize("field", ["x", "phi0", "phi1", "users"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_mismatched_lengths_name_field(field, delta):
    a = arrays()
    a["users"] = np.arange(N)
    a[field] = np.concatenate([a[field], a[field][:1]]) if delta > 0 else a[field][:-1]
    with pytest.raises(DataValidationError) as info:
        PreferenceData(**a)
    assert_error(info.value, field)


def test_unreadable_numbers_name_field():
    a = arrays()
    phi0 = a["phi0"].astype(object)
    phi0[2, 2] = "abc"
    with pytest.raises(DataValidationError) as info:
        PreferenceData(**{**a, "phi0": phi0})
    assert_error(info.value, "phi0")


def test_target_states_validation():
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((5, 3, 2))
    phi[3, 1, 0] = np.nan
    with pytest.raises(DataValidationError) as info:
        TargetStates(rng.standard_normal((5, 2)), phi)
    assert_error(info.value, "phi", row=3)
    with pytest.raises(DataValidationError) as info:
        TargetStates(rng.standard_normal((4, 2)), rng.standard_normal((5, 3, 2)))
    assert_error(info.value, "x")


# ------------------------------------------------------------------ subset / split / concat
def test_subset_by_indices_mask_and_slice():
    data = tagged(20)
    idx = np.array([3, 0, 17, 3])
    sub = data.subset(idx)
    np.testing.assert_array_equal(sub.phi0[:, 0], idx)
    np.testing.assert_array_equal(sub.x, data.x[idx])
    np.testing.assert_array_equal(sub.phi1, data.phi1[idx])
    np.testing.assert_array_equal(sub.y, data.y[idx])
    np.testing.assert_array_equal(sub.users, data.users[idx])

    mask = data.y == 1
    np.testing.assert_array_equal(data.subset(mask).phi0[:, 0], np.flatnonzero(mask))
    np.testing.assert_array_equal(data.subset(slice(5, 9)).phi0[:, 0], [5, 6, 7, 8])

    with pytest.raises(DataValidationError) as info:
        data.subset(np.ones(5, dtype=bool))
    assert info.value.field == "index"


def test_split_is_disjoint_covering_and_reproducible():
    data = tagged(40)
    train, test = data.split(test_size=0.25, seed=7)
    ids_train = train.phi0[:, 0].astype(int)
    ids_test = test.phi0[:, 0].astype(int)
    assert len(ids_test) == 10 and len(ids_train) == 30
    assert set(ids_train).isdisjoint(ids_test)
    assert sorted([*ids_train, *ids_test]) == list(range(40))
    # rows stay intact (every field moves together)
    for part, ids in ((train, ids_train), (test, ids_test)):
        assert_same(part, data.subset(ids))

    train2, test2 = data.split(test_size=0.25, seed=7)
    assert_same(train, train2)
    assert_same(test, test2)
    _, test3 = data.split(test_size=0.25, seed=8)
    assert set(test3.phi0[:, 0].astype(int)) != set(ids_test)


@pytest.mark.parametrize("test_size", [0.0, 1.0, -0.1, 1.5, 0.001])
def test_split_refuses_degenerate_sizes(test_size):
    with pytest.raises(DataValidationError) as info:
        tagged(40).split(test_size=test_size)
    assert info.value.field == "test_size"


def test_concatenate_stacks_in_order():
    data = tagged(30)
    parts = [data.subset(slice(0, 10)), data.subset(slice(10, 11)), data.subset(slice(11, 30))]
    assert_same(PreferenceData.concatenate(parts), data)


def test_concatenate_refuses_mixed_or_empty_parts():
    a = arrays()
    with_x = PreferenceData(**a)
    without_x = PreferenceData(None, a["phi0"], a["phi1"], a["y"])
    with pytest.raises(DataValidationError) as info:
        PreferenceData.concatenate([with_x, without_x])
    assert info.value.field == "parts"
    with pytest.raises(DataValidationError) as info:
        PreferenceData.concatenate([])
    assert info.value.field == "parts"


def test_concatenate_refuses_different_feature_dimensions():
    a, b = arrays(), arrays(seed=1)
    b = {**b, "phi0": b["phi0"][:, :2], "phi1": b["phi1"][:, :2]}
    with pytest.raises(DataValidationError) as info:
        PreferenceData.concatenate([PreferenceData(**a), PreferenceData(**b)])
    assert info.value.field is not None


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("suffix", [".npz", ".jsonl"])
@pytest.mark.parametrize("with_x", [True, False])
@pytest.mark.parametrize("users", [None, "str", "int"])
def test_save_load_round_trip(tmp_path, suffix, with_x, users):
    a = arrays(n=15, seed=3)
    # values whose decimal form is long: a lossy float format would change them
    a["phi0"][0, 0] = 0.1 + 0.2
    a["phi1"][1, 1] = 1e-300
    ids = {
        None: None,
        "str": np.array([f"user-{i % 4}" for i in range(15)]),
        "int": np.arange(15) % 4,
    }[users]
    data = PreferenceData(a["x"] if with_x else None, a["phi0"], a["phi1"], a["y"], users=ids)
    path = save_preferences(data, tmp_path / f"prefs{suffix}")
    assert path.exists()
    back = load_preferences(path)
    assert_same(back, data)
    assert_same(load_preferences(save_preferences(data, tmp_path / f"again{suffix}")), data)
    # no temporary files are left behind by the atomic write
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"prefs{suffix}", f"again{suffix}"]
    )


def test_unknown_suffix_and_missing_file(tmp_path):
    data = PreferenceData(**arrays())
    with pytest.raises(DataValidationError) as info:
        save_preferences(data, tmp_path / "prefs.csv")
    assert str(tmp_path / "prefs.csv") in str(info.value)
    with pytest.raises(DataValidationError) as info:
        load_preferences(tmp_path / "nope.jsonl")
    assert info.value.path == str(tmp_path / "nope.jsonl")


def test_npz_with_bad_values_names_path_field_and_row(tmp_path):
    a = arrays()
    a["phi1"][6, 0] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, **a)
    with pytest.raises(DataValidationError) as info:
        load_preferences(path)
    err = info.value
    assert (err.path, err.field, err.row) == (str(path), "phi1", 6)
    assert str(path) in str(err) and "phi1" in str(err)


def test_npz_missing_array_names_it(tmp_path):
    a = arrays()
    del a["y"]
    path = tmp_path / "bad.npz"
    np.savez(path, **a)
    with pytest.raises(DataValidationError) as info:
        load_preferences(path)
    assert (info.value.path, info.value.field) == (str(path), "y")


GOOD = {"x": [0.5, -1.0], "phi0": [1.0, 2.0, 3.0], "phi1": [0.0, -2.0, 0.25], "y": 1}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad_line", "field"),
    [
        ('{"x": [0.5, -1.0], "phi0": [1.0, 2.0', None),  # invalid JSON
        (json.dumps({**GOOD, "phi0": [1.0, float("nan"), 3.0]}), "phi0"),  # NaN literal
        (json.dumps({**GOOD, "phi1": [1.0, float("inf"), 3.0]}), "phi1"),  # Infinity literal
        (json.dumps({**GOOD, "phi0": [1.0, "2.0", 3.0]}), "phi0"),  # string in phi
        (json.dumps({**GOOD, "phi1": [1.0, True, 3.0]}), "phi1"),  # bool in phi
        (json.dumps({**GOOD, "y": 2}), "y"),
        (json.dumps({**GOOD, "y": "1"}), "y"),
        (json.dumps({**GOOD, "y": True}), "y"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "phi1"}), "phi1"),  # missing phi1
        (json.dumps({k: v for k, v in GOOD.items() if k != "y"}), "y"),  # missing y
        (json.dumps({**GOOD, "phi0": [1.0, 2.0]}), "phi0"),  # shorter than earlier lines
        (json.dumps({**GOOD, "phi0": [1.0, 2.0, 3.0, 4.0], "phi1": [1.0, 2.0, 3.0, 4.0]}), "phi0"),
        (json.dumps({**GOOD, "x": [1.0]}), "x"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "x"}), "x"),  # x on some lines only
        (json.dumps({**GOOD, "user": "u1"}), "user"),  # user on some lines only
        (json.dumps({**GOOD, "phi0": []}), "phi0"),
        (json.dumps({**GOOD, "phi0": 1.0}), "phi0"),
        (json.dumps({**GOOD, "colour": "red"}), "colour"),  # unknown field
    ],
)
def test_jsonl_bad_line_names_path_line_and_field(tmp_path, bad_line, field):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [json.dumps(GOOD), json.dumps({**GOOD, "y": 0}), bad_line, json.dumps(GOOD)],
    )
    with pytest.raises(DataValidationError) as info:
        load_preferences(path)
    err = info.value
    assert err.path == str(path)
    assert err.line == 3
    assert err.field == field
    message = str(err)
    assert str(path) in message
    assert "line 3" in message
    if field is not None:
        assert field in message


def test_jsonl_line_numbers_count_physical_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [json.dumps(GOOD), "", json.dumps(GOOD), json.dumps({**GOOD, "y": 3})],
    )
    with pytest.raises(DataValidationError) as info:
        load_preferences(path)
    assert (info.value.line, info.value.field) == (4, "y")


def test_jsonl_phi1_length_differs_from_phi0_on_first_line(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [json.dumps({**GOOD, "phi1": [1.0, 2.0]})])
    with pytest.raises(DataValidationError) as info:
        load_preferences(path)
    assert (info.value.line, info.value.field) == (1, "phi1")


def test_jsonl_by_hand_values_and_empty_file(tmp_path):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            json.dumps({**GOOD, "user": "a"}),
            "",
            json.dumps({**GOOD, "y": 0, "phi0": [1, 2, 3], "user": "7"}),
        ],
    )
    data = load_preferences(path)
    assert data.n == 2
    np.testing.assert_array_equal(data.x, [GOOD["x"], GOOD["x"]])
    np.testing.assert_array_equal(data.phi0, [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(data.y, [1, 0])
    assert list(data.users) == ["a", "7"]

    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataValidationError) as info:
        load_preferences(empty)
    assert info.value.path == str(empty)
