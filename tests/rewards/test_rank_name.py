"""One name for the rank of a low-rank model: ``rank`` (issue 15).

What the rename must keep working: model folders that older pluralign wrote with ``params.k``
(``tests/fixtures/legacy_k``: written by ``pluralign fit --k 2`` of the code before the rename,
with their training file ``prefs.jsonl``), the ``--k`` flag as a hidden deprecated alias of
``--rank``, and configs with the old env key ``k``, refused with its new name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.data import save_preferences
from pluralign.envs import MultiUser
from pluralign.errors import ConfigError, DataValidationError
from pluralign.experiments import resolve_config
from pluralign.personalize import fit_personalized
from pluralign.rewards import Contextual, PerUser, SharedBasis
from pluralign.rewards.persistence import load_model, save_model

LEGACY = Path(__file__).parents[1] / "fixtures" / "legacy_k"
CLASSES = {"shared_basis": SharedBasis, "contextual": Contextual}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def arrays(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "model.npz", allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


# ------------------------------------------------------------------ old model folders
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_folder_the_old_code_wrote_with_params_k_loads_as_rank(name):
    folder = LEGACY / name
    written = json.loads((folder / "model.json").read_text())
    assert written["version"] == 1 and written["params"]["k"] == 2
    assert "rank" not in written["params"]  # the fixture is the old format
    model, meta, designs = load_model(folder)
    assert isinstance(model, CLASSES[name])
    assert model.rank == 2 and "k" not in model.get_params()
    assert next(iter(meta["params"])) == "rank"  # in the place k had
    assert designs  # the folder's design matrices are still read
    saved = arrays(folder)
    np.testing.assert_array_equal(model.thetas_, saved["thetas"])
    np.testing.assert_array_equal(model.basis_, saved["basis"])
    # the oracle: the model the old code saved is the one this code fits on the same file
    refit = fit_personalized(LEGACY / "prefs.jsonl", name, rank=2, test_size=0.0).estimator
    np.testing.assert_allclose(refit.thetas_, model.thetas_, rtol=0, atol=1e-10)
    assert refit.get_params() == model.get_params()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_legacy_model_saved_again_writes_rank(name, tmp_path):
    model, _, _ = load_model(LEGACY / name)
    out = save_model(model, tmp_path / "again")
    params = json.loads((out / "model.json").read_text())["params"]
    assert params["rank"] == 2 and "k" not in params
    again, _, _ = load_model(out)
    np.testing.assert_array_equal(again.thetas_, model.thetas_)


def legacy_copy(tmp_path: Path, edit) -> Path:
    folder = shutil.copytree(LEGACY / "shared_basis", tmp_path / "m")
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(edit(meta)))
    return folder


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        # both names: refused, not silently resolved
        (lambda m: {**m, "params": {**m["params"], "rank": 2}}, "params.k", "renamed to 'rank'"),
        # a bad value under the old name is named as written
        (lambda m: {**m, "params": {**m["params"], "k": "2"}}, "params.k", "must be like 2"),
        # only SharedBasis and Contextual ever had k: elsewhere it is unknown
        (
            lambda m: {**m, "class": "PerUser", "params": {**PerUser().get_params(), "k": 2}},
            "params.k",
            "unknown hyper-parameter of PerUser",
        ),
    ],
)
def test_old_names_in_a_model_folder_are_checked(tmp_path, edit, field, message):
    folder = legacy_copy(tmp_path, edit)
    with pytest.raises(DataValidationError, match=message) as info:
        load_model(folder)
    assert info.value.field == field


def test_rank_scores_with_a_legacy_folder(tmp_path):
    candidates = tmp_path / "c.jsonl"
    candidates.write_text(json.dumps({"phi": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}) + "\n")
    result = invoke("rank", LEGACY / "shared_basis", candidates, "--user", "1")
    assert result.exit_code == 0, result.output
    model, _, _ = load_model(LEGACY / "shared_basis")
    reward = json.loads(result.stdout)["reward"]
    np.testing.assert_allclose(reward, model.user_theta(1)[0], rtol=0, atol=1e-12)  # φ = e_i


# ------------------------------------------------------------------ the --k alias
@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    env = MultiUser(n_users=4, d_phi=5, rank=2, diversity=1.0, n_per_user=30, seed=2)
    return save_preferences(
        env.sample_offline(seed=[1]), tmp_path_factory.mktemp("rank") / "p.jsonl"
    )


def test_fit_k_is_a_deprecated_alias_of_rank(prefs, tmp_path):
    new = invoke("fit", prefs, "--rank", "2", "--out", tmp_path / "new")
    old = invoke("fit", prefs, "--k", "2", "--out", tmp_path / "old")
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert "deprecated" not in new.stderr
    notes = [line for line in old.stderr.splitlines() if "--k" in line]
    assert notes == ["note: --k is deprecated; use --rank"]
    a, b = arrays(tmp_path / "new"), arrays(tmp_path / "old")
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    meta = json.loads((tmp_path / "old" / "model.json").read_text())
    assert meta["params"]["rank"] == 2 and "k" not in meta["params"]
    report = json.loads((tmp_path / "old" / "report.json").read_text())
    assert report["summary"]["rank"] == 2


def test_fit_rank_default_and_errors_name_rank(prefs, tmp_path):
    default = invoke("fit", prefs, "--out", tmp_path / "d")
    assert default.exit_code == 0
    assert load_model(tmp_path / "d")[0].rank == 4
    both = invoke("fit", prefs, "--k", "2", "--rank", "3", "--out", tmp_path / "b")
    assert both.exit_code == 2 and "give only --rank" in flat(both.stderr)
    assert not (tmp_path / "b").exists()
    bad = invoke("fit", prefs, "--k", "9", "--out", tmp_path / "x")
    assert bad.exit_code == 2
    assert "--rank: must be an integer in [1, min(n_users, d_phi)] = [1, 4]" in flat(bad.stderr)
    shown = invoke("fit", "--help")
    assert "--rank" in shown.stdout and "--k " not in shown.stdout


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    "config",
    [
        {"experiment": "multi_user", "env": {"k": 3}},
        {"experiment": "multi_user", "env": [{"n_users": 5}, {"k": 2}]},
        {"experiment": "multi_user", "sweep": {"k": [1, 2]}},
    ],
)
def test_a_config_with_the_old_env_key_is_refused_with_the_new_name(config):
    with pytest.raises(ConfigError, match=r"unknown (env|sweep) parameter 'k': renamed to 'rank'"):
        resolve_config(config)


def test_the_env_rank_is_the_simulators_rank():
    resolved = resolve_config({"experiment": "multi_user", "env": {"rank": 2, "d_phi": 4}})
    assert resolved["env"][0]["rank"] == 2 and "k" not in resolved["env"][0]
    with pytest.raises(ConfigError, match="rank"):
        resolve_config({"experiment": "multi_user", "env": {"rank": 5, "d_phi": 4}})
    assert MultiUser(d_phi=4, rank=2).B_star.shape == (4, 2)
