"""`pluralign fit` / `pluralign rank` on numeric data, model files, and the multi_user runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pluralign.cli import app
from pluralign.data import save_preferences
from pluralign.envs import MultiUser
from pluralign.experiments import read_results, resolve_config, run_experiment
from pluralign.experiments.multi_user import check_multi_user_claims
from pluralign.rewards.persistence import load_model


@pytest.fixture(scope="module")
def numeric(tmp_path_factory):
    folder = tmp_path_factory.mktemp("numeric")
    env = MultiUser(n_users=4, d_phi=5, rank=2, diversity=1.0, n_per_user=40, seed=0)
    path = save_preferences(env.sample_offline(seed=[1]), folder / "prefs.jsonl")
    candidates = folder / "candidates.jsonl"
    rng = np.random.default_rng(0)
    phis = [rng.standard_normal((k, 5)) for k in (3, 6, 2)]
    candidates.write_text("".join(json.dumps({"phi": p.tolist()}) + "\n" for p in phis))
    return folder, path, candidates, phis


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("model", ["shared_basis", "per_user", "pooled"])
def test_fit_saves_model_and_report_without_pickle(numeric, model):
    folder, path, _, _ = numeric
    out = folder / f"fit-{model}"
    result = invoke("fit", path, "--model", model, "--rank", "2", "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("model.json", "model.npz", "report.json", "per_user_accuracy.csv", "accuracy.png"):
        assert (out / name).is_file(), name
    with np.load(out / "model.npz", allow_pickle=False) as f:
        assert "thetas" in f.files and "design" in f.files
    meta = json.loads((out / "model.json").read_text())
    assert meta["users"] == [0, 1, 2, 3] and meta["features"]["kind"] == "numeric"
    report = json.loads((out / "report.json").read_text())
    assert len(report["users"]) == 4 and report["summary"]["n_test"] == 32  # 8 per user
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in report["users"])
    loaded, _, designs = load_model(out)
    assert (
        type(loaded).__name__
        == {"shared_basis": "SharedBasis", "per_user": "PerUser", "pooled": "Pooled"}[model]
    )
    assert designs["design"].shape[0] == (1 if model == "pooled" else 4)


def _lcb(model, designs, user, phi, beta):
    """Brute force: θ̂ᵀφ − β‖Aᵀ(φ − φ̄)‖_{M_u⁻¹} for every candidate."""
    view = model.user_model(user)
    row = designs["design_index"][model.user_index(user)[0]]
    m = designs["design"][row]
    z = (phi - phi.mean(axis=0)) @ view.basis
    width = np.sqrt(np.einsum("kp,pq,kq->k", z, np.linalg.inv(m), z))
    return phi @ view.theta_ - beta * width


@pytest.mark.parametrize("beta", [0.0, 0.7, 50.0])
def test_rank_returns_the_argmax_of_the_users_pessimistic_reward(numeric, beta):
    folder, path, candidates, phis = numeric
    out = folder / "fit-rank"
    if not out.exists():
        assert (
            invoke("fit", path, "--model", "shared_basis", "--rank", "2", "--out", out).exit_code
            == 0
        )
    model, _, designs = load_model(out)
    for user in (0, 3):
        result = invoke("rank", out, candidates, "--user", str(user), "--pessimism", str(beta))
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in result.output.splitlines()]
        assert [r["line"] for r in records] == [1, 2, 3]
        for record, phi in zip(records, phis, strict=True):
            np.testing.assert_allclose(record["reward"], phi @ model.user_theta(user)[0])
            expected = _lcb(model, designs, user, phi, beta)
            assert record["best"] == int(np.argmax(expected))
            if beta > 0:
                np.testing.assert_allclose(record["lcb"], expected, atol=1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_the_python_workflow_is_what_fit_and_rank_run(numeric, tmp_path, beta):
    """fit_personalized + FitResult.save write what `pluralign fit` writes, and
    rank_candidates returns the records `pluralign rank` prints; both against the brute-force
    pessimistic reward of the saved model."""
    from pluralign.personalize import fit_personalized, rank_candidates

    _, path, candidates, phis = numeric
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    assert invoke("fit", path, "--rank", "2", "--seed", "3", "--out", cli_out).exit_code == 0
    result = fit_personalized(path, "shared_basis", 2, seed=3)
    result.save(py_out)
    for name in ("report.json", "per_user_accuracy.csv"):
        assert (py_out / name).read_text() == (cli_out / name).read_text(), name
    assert json.loads((py_out / "model.json").read_text()) == json.loads(
        (cli_out / "model.json").read_text()
    )
    assert result.report == json.loads((cli_out / "report.json").read_text())
    assert result.train.n + result.test.n == result.summary["n_train"] + result.summary["n_test"]
    model, _, designs = load_model(py_out)
    cli_model, _, _ = load_model(cli_out)
    ranked = rank_candidates(py_out, candidates, "3", pessimism=beta)
    assert ranked.user == 3 and ranked.known and not ranked.from_context
    shown = invoke("rank", cli_out, candidates, "--user", "3", "--pessimism", str(beta))
    assert shown.exit_code == 0, shown.output
    assert ranked.records == [json.loads(line) for line in shown.stdout.splitlines()]
    for record, phi in zip(ranked.records, phis, strict=True):
        np.testing.assert_allclose(record["reward"], phi @ cli_model.user_theta(3)[0])
        assert record["best"] == int(np.argmax(_lcb(model, designs, 3, phi, beta)))


def test_rank_refuses_unknown_users_and_bad_candidates(numeric, tmp_path):
    folder, path, candidates, _ = numeric
    out = folder / "fit-unknown"
    assert invoke("fit", path, "--out", out, "--rank", "2").exit_code == 0
    result = invoke("rank", out, candidates, "--user", "42")
    assert result.exit_code == 2 and "unknown user 42" in " ".join(result.output.split())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"phi": [[1.0, 2.0]]}) + "\n")
    result = invoke("rank", out, bad, "--user", "0")
    assert result.exit_code == 2
    assert f"{bad}, line 1, field 'phi'" in " ".join(result.output.split())

    shared = folder / "fit-shared"
    assert (
        invoke("fit", path, "--out", shared, "--rank", "2", "--unknown-user", "shared").exit_code
        == 0
    )
    model, _, _ = load_model(shared)
    result = invoke("rank", shared, candidates, "--user", "42")
    assert result.exit_code == 0
    first = json.loads(result.output.splitlines()[0])
    phi = np.asarray(json.loads(candidates.read_text().splitlines()[0])["phi"])
    assert first["best"] == int(np.argmax(phi @ model.theta0_))


def test_fit_rejects_data_without_users(tmp_path):
    env = MultiUser(n_users=2, d_phi=3, rank=1, n_per_user=10, seed=0)
    data = env.sample_offline(seed=[0])
    from pluralign.data import PreferenceData

    path = save_preferences(PreferenceData(None, data.phi0, data.phi1, data.y), tmp_path / "p.npz")
    result = invoke("fit", path, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "need user ids" in " ".join(result.output.split())


TINY = {
    "experiment": "multi_user",
    "seed": 0,
    "repeats": 1,
    "env": {
        "n_users": 4,
        "d_phi": 4,
        "rank": 1,
        "n_targets": 15,
        "n_heldout": 10,
        "n_new_users": 2,
    },
    "sweep": [{"diversity": [0.0, 1.0]}, {"n_users": [3, 4]}],
    "n_samples": [10],
}


def test_sweep_expands_settings_and_resolves_idempotently():
    resolved = resolve_config(TINY)
    assert [(e["n_users"], e["diversity"]) for e in resolved["env"]] == [
        (4, 0.0),
        (4, 1.0),
        (3, 1.0),
    ]  # (4, 1.0) appears in both grids: kept once
    assert "sweep" not in resolved and resolve_config(resolved) == resolved
    from pluralign.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown sweep parameter 'users'"):
        resolve_config({**TINY, "sweep": {"users": [1, 2]}})
    with pytest.raises(ConfigError, match="non-empty list"):
        resolve_config({**TINY, "sweep": {"n_users": 5}})


def test_multi_user_experiment_runs_with_all_methods(tmp_path):
    resolved = run_experiment(TINY, tmp_path, jobs=1, progress=False)
    rows = read_results(tmp_path / "results.jsonl")
    assert len(rows) == 3 * 4
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == resolved
    for name in (
        "accuracy.png",
        "accuracy_vs_diversity.png",
        "subspace_vs_users.png",
        "new_user_adaptation.png",
    ):
        assert (tmp_path / name).is_file(), name
    by_method = {r["method"]: r for r in rows if r["setting"] == rows[0]["setting"]}
    assert abs(by_method["lowrank_onehot"]["shared_basis_loglik_gap"]) < 1e-5
    assert "subspace_distance" not in by_method["pooled"]
    assert "newuser_truebasis_accuracy_10" in by_method["shared_basis"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["value_gap"] >= -1e-12
        assert row["leximin_gap"] >= -1e-3 and row["utilitarian_gap"] >= -1e-3
    claims = check_multi_user_claims(rows, resolved)
    assert [c["claim"][:2] for c in claims] == ["C5", "C6", "C7"]
    assert all(c["held"] in (True, False) for c in claims)
