"""LowRank's closed-form NumPy solver (``solver="numpy"``, the CPU/float64 default) against
computations written here: the Burer–Monteiro objective with an explicit ``Θ = L Rᵀ`` (torch
autograd, central finite differences), SciPy fits of that objective, and the torch path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from pluralign.data import PreferenceData
from pluralign.errors import ConvergenceWarning, DataValidationError
from pluralign.rewards import LowRank
from pluralign.rewards import lowrank as lowrank_module
from pluralign.rewards.lowrank import _newton_logistic


def lowrank_data(
    n: int, d_x: int, d_phi: int, rank: int, seed: int, scale: float = 2.0
) -> tuple[PreferenceData, np.ndarray]:
    """Bradley–Terry draws from a rank-``rank`` truth ``Θ*``; returns ``(data, Θ*)``."""
    rng = np.random.default_rng(seed)
    theta = scale * rng.standard_normal((d_x, rank)) @ rng.standard_normal((rank, d_phi))
    theta *= scale / np.linalg.norm(theta, 2)
    x = rng.standard_normal((n, d_x))
    phi0, phi1 = rng.standard_normal((n, d_phi)), rng.standard_normal((n, d_phi))
    margin = np.einsum("ni,ij,nj->n", x, theta, phi1 - phi0)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-margin))).astype(np.int64)
    return PreferenceData(x=x, phi0=phi0, phi1=phi1, y=y), theta


def explicit_objective(
    params: torch.Tensor,
    data: PreferenceData,
    rank: int,
    l2: float,
    balance: float,
    free_rows: int = 0,
) -> torch.Tensor:
    """The objective of docs/models.md, written independently of pluralign: the full ``Θ`` is
    formed and every margin is ``x_iᵀ Θ Δφ_i``."""
    x = torch.as_tensor(data.x, dtype=torch.float64)
    dphi = torch.as_tensor(data.phi1 - data.phi0, dtype=torch.float64)
    sign = torch.as_tensor(2.0 * data.y - 1.0, dtype=torch.float64)
    d_x, d_phi, f = data.d_x, data.d_phi, free_rows
    free = params[: f * d_phi].reshape(f, d_phi)
    rest = params[f * d_phi :]
    left = rest[: (d_x - f) * rank].reshape(d_x - f, rank)
    right = rest[(d_x - f) * rank :].reshape(d_phi, rank)
    theta = torch.cat([free, left @ right.T])
    margin = torch.einsum("ni,ij,nj->n", x, theta, dphi)
    t = -sign * margin
    loss = torch.logaddexp(torch.zeros_like(t), t).mean()  # exact softplus (F.softplus is linear
    # above 20, an error of up to e⁻²⁰ per term)
    gap = left.T @ left - right.T @ right
    return loss + 0.5 * l2 * (theta * theta).sum() + 0.25 * balance * (gap * gap).sum()


def explicit_value_grad(flat: np.ndarray, *args) -> tuple[float, np.ndarray]:
    params = torch.tensor(flat, dtype=torch.float64, requires_grad=True)
    value = explicit_objective(params, *args)
    (grad,) = torch.autograd.grad(value, params)
    return float(value.detach()), grad.numpy()


def fitted_params(model: LowRank) -> np.ndarray:
    free = model.theta_free_.ravel() if model.free_rows else np.zeros(0)
    return np.concatenate([free, model.L_.ravel(), model.R_.ravel()])


@pytest.mark.parametrize(
    ("d_x", "d_phi", "rank", "free_rows", "l2", "balance"),
    [
        (5, 7, 2, 0, 1e-3, 1e-4),
        (6, 4, 3, 0, 0.0, 0.5),
        (7, 5, 2, 2, 1e-2, 1e-1),
    ],
)
def test_closed_form_gradient_matches_autograd_and_finite_differences(
    d_x, d_phi, rank, free_rows, l2, balance
):
    data, _ = lowrank_data(200, d_x, d_phi, rank, seed=d_x)
    model = LowRank(rank, l2=l2, balance=balance, free_rows=free_rows)
    args = (data, rank, l2, balance, free_rows)
    rng = np.random.default_rng(1)
    size = free_rows * d_phi + (d_x - free_rows + d_phi) * rank
    for _ in range(3):
        flat = rng.standard_normal(size)
        value, grad = model.objective_and_gradient(flat, data)
        ref_value, ref_grad = explicit_value_grad(flat, *args)
        assert value == pytest.approx(ref_value, abs=1e-12)
        np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-10)
        # Central differences of the explicit objective (truncation error O(h²) ≈ 1e-10).
        h = 1e-5
        fd = np.array(
            [
                (
                    explicit_value_grad(flat + h * e, *args)[0]
                    - explicit_value_grad(flat - h * e, *args)[0]
                )
                / (2 * h)
                for e in np.eye(size)
            ]
        )
        np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-8)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_gemm_and_gemv_evaluations_agree(monkeypatch, rank):
    """Low ranks multiply column by column, higher ones by GEMM; both match the explicit
    objective at every rank."""
    data, _ = lowrank_data(300, 6, 5, rank, seed=7)
    model = LowRank(rank, l2=1e-3, balance=0.3)
    flat = np.random.default_rng(2).standard_normal((6 + 5) * rank)
    ref_value, ref_grad = explicit_value_grad(flat, data, rank, 1e-3, 0.3)
    for limit in (0, 8):
        monkeypatch.setattr(lowrank_module, "_GEMV_RANK", limit)
        value, grad = model.objective_and_gradient(flat, data)
        assert value == pytest.approx(ref_value, abs=1e-12)
        np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-10)


def test_closed_form_objective_handles_huge_margins():
    """A margin of −1000 (log σ underflows in a naive form) gives a finite loss and gradient."""
    data, _ = lowrank_data(50, 3, 3, 1, seed=0)
    model = LowRank(1, l2=0.0)
    flat = np.full(6, 40.0)
    value, grad = model.objective_and_gradient(flat, data)
    ref_value, ref_grad = explicit_value_grad(flat, data, 1, 0.0, model.balance)
    assert np.isfinite(value) and value == pytest.approx(ref_value, rel=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("n", "d_x", "d_phi", "rank", "l2", "seed"),
    [
        (600, 8, 6, 2, 1e-3, 0),
        (800, 10, 10, 3, 1e-4, 1),
        (500, 6, 9, 1, 1e-2, 2),
    ],
)
def test_numpy_fit_reaches_the_torch_path_and_an_independent_scipy_fit(
    n, d_x, d_phi, rank, l2, seed
):
    data, theta = lowrank_data(n, d_x, d_phi, rank, seed)
    tol = 1e-7
    new = LowRank(rank, l2=l2, tol=tol).fit(data)
    old = LowRank(rank, l2=l2, tol=tol, solver="torch").fit(data)
    assert new.converged_ and old.converged_
    args = (data, rank, l2, new.balance)
    value_new = explicit_value_grad(fitted_params(new), *args)[0]
    value_old = explicit_value_grad(fitted_params(old), *args)[0]
    assert new.solver_info_.objective == pytest.approx(value_new, abs=1e-12)
    # Independent: SciPy BFGS on the explicit objective from the truth's balanced SVD factors.
    u, s, vt = np.linalg.svd(theta)
    start = np.concatenate(
        [(u[:, :rank] * np.sqrt(s[:rank])).ravel(), (vt[:rank].T * np.sqrt(s[:rank])).ravel()]
    )
    ref = minimize(
        explicit_value_grad,
        start,
        args=args,
        jac=True,
        method="BFGS",
        options={"gtol": 1e-10, "maxiter": 5000},
    )
    assert value_new <= value_old + 1e-8
    assert value_new <= ref.fun + 1e-8
    # Same estimate too (rank-r optimum, unique Θ here).
    np.testing.assert_allclose(new.theta_, old.theta_, atol=1e-5)


def test_free_rows_numpy_and_torch_paths_reach_the_same_objective():
    data, _ = lowrank_data(600, 6, 5, 2, seed=3)
    args = dict(l2=1e-3, free_rows=1, tol=1e-8)
    new = LowRank(2, **args).fit(data)
    old = LowRank(2, solver="torch", **args).fit(data)
    value_new = explicit_value_grad(fitted_params(new), data, 2, 1e-3, new.balance, 1)[0]
    value_old = explicit_value_grad(fitted_params(old), data, 2, 1e-3, old.balance, 1)[0]
    assert value_new <= value_old + 1e-8
    assert abs(value_new - value_old) <= 1e-8


@pytest.mark.parametrize("max_iter", [1000, 2])
def test_converged_agrees_with_a_recomputed_gradient(max_iter):
    data, _ = lowrank_data(500, 8, 7, 2, seed=4)
    tol = 1e-7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LowRank(2, l2=1e-3, tol=tol, max_iter=max_iter, init="random").fit(data)
    grad = explicit_value_grad(fitted_params(model), data, 2, 1e-3, model.balance)[1]
    grad_max = float(np.max(np.abs(grad)))
    assert model.converged_ == (grad_max <= tol)
    assert model.solver_info_.grad_max == pytest.approx(grad_max, rel=1e-6, abs=1e-12)
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    assert warned == (not model.converged_)
    if max_iter == 2:
        assert not model.converged_ and model.solver_info_.stop == "max_iter"
    else:
        assert model.converged_


def test_core_newton_matches_an_independent_logistic_fit():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((400, 4))
    sign = np.where(rng.random(400) < 1 / (1 + np.exp(-z @ [1.0, -2.0, 0.5, 0.0])), 1.0, -1.0)
    l2 = 1e-3

    def f(th):
        t = -sign * (z @ th)
        p = 1 / (1 + np.exp(-t))
        return np.mean(np.logaddexp(0, t)) + 0.5 * l2 * th @ th, z.T @ (-sign * p) / 400 + l2 * th

    ref = minimize(f, np.zeros(4), jac=True, method="BFGS", options={"gtol": 1e-12})
    np.testing.assert_allclose(_newton_logistic(z, sign, l2, 1e-10, 100), ref.x, atol=1e-8)


def test_solver_option_is_validated_and_float32_uses_torch():
    data, _ = lowrank_data(200, 4, 4, 1, seed=6)
    with pytest.raises(DataValidationError) as err:
        LowRank(1, solver="jax").fit(data)
    assert err.value.field == "solver"
    with pytest.raises(DataValidationError) as err:
        LowRank(1, solver="numpy", dtype="float32").fit(data)
    assert err.value.field == "solver"
    model = LowRank(1, dtype="float32", tol=1e-4).fit(data)  # "auto" → torch in float32
    assert model.is_fitted_ and not hasattr(model, "_fit_dphi")
    assert "solver" in model.get_params()
