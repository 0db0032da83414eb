"""``pluralign.rewards._solver``: the L-BFGS-B wrapper every Bradley–Terry estimator uses,
against closed forms and SciPy called directly, and its stopping diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

from pluralign.rewards._solver import FTOL, SolverInfo, minimize_lbfgs, minimize_lbfgs_numpy


def quadratic(a: np.ndarray, b: np.ndarray):
    """½ xᵀAx − bᵀx: minimum at A⁻¹b."""
    at, bt = torch.as_tensor(a), torch.as_tensor(b)
    return lambda x: 0.5 * x @ at @ x - bt @ x


def spd(d: int, seed: int) -> np.ndarray:
    m = np.random.default_rng(seed).standard_normal((d, d))
    return m @ m.T + d * np.eye(d)


def test_torch_objective_reaches_the_closed_form_minimum():
    a, b = spd(6, 0), np.arange(6.0)
    x, info = minimize_lbfgs(
        quadratic(a, b), np.zeros(6), dtype=torch.float64, device="cpu", tol=1e-6, max_iter=500
    )
    assert info.converged and info.stop == "gradient" and info.grad_max <= 1e-6
    # ‖x − x*‖ ≤ ‖A⁻¹‖ ‖∇f(x)‖ ≤ √d · grad_max / λ_min(A)
    bound = np.sqrt(6) * info.grad_max / np.linalg.eigvalsh(a)[0]
    assert np.linalg.norm(x - np.linalg.solve(a, b)) <= bound
    assert info.objective == pytest.approx(-0.5 * b @ np.linalg.solve(a, b), rel=1e-10)


def test_float32_evaluation_reaches_the_minimum_to_float32_precision():
    a, b = spd(6, 0), np.arange(6.0)
    a32, b32 = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    x, _ = minimize_lbfgs(
        lambda t: 0.5 * t @ a32 @ t - b32 @ t,
        np.zeros(6),
        dtype=torch.float32,
        device="cpu",
        tol=1e-4,
        max_iter=500,
    )
    np.testing.assert_allclose(x, np.linalg.solve(a, b), atol=1e-4)


def test_numpy_path_is_the_same_run_as_scipy_called_directly():
    a, b = spd(5, 1), np.ones(5)

    def fun(x):
        return 0.5 * x @ a @ x - b @ x, a @ x - b

    x, info = minimize_lbfgs_numpy(fun, np.zeros(5), tol=1e-8, max_iter=200)
    ref = minimize(
        fun,
        np.zeros(5),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-8, "ftol": FTOL, "maxiter": 200, "maxcor": 20, "maxls": 50},
    )
    np.testing.assert_array_equal(x, ref.x)
    assert info.n_iter == ref.nit and info.objective == float(ref.fun)


def test_logistic_loss_matches_scikit_learns_lbfgs_fit():
    """Mean log-loss + (λ/2)‖θ‖² through the torch path = LogisticRegression(C = 1/(λN))."""
    rng = np.random.default_rng(2)
    z = rng.standard_normal((400, 4))
    y = (rng.random(400) < 1 / (1 + np.exp(-z @ np.array([1.0, -2.0, 0.5, 0.0])))).astype(float)
    zt, st = torch.as_tensor(z), torch.as_tensor(2 * y - 1)
    lam = 0.01

    def objective(theta):
        return torch.nn.functional.softplus(-st * (zt @ theta)).mean() + 0.5 * lam * theta @ theta

    x, info = minimize_lbfgs(
        objective, np.zeros(4), dtype=torch.float64, device="cpu", tol=1e-8, max_iter=1000
    )
    ref = LogisticRegression(C=1 / (lam * 400), fit_intercept=False, tol=1e-12, max_iter=10000).fit(
        z, y
    )
    np.testing.assert_allclose(x, ref.coef_[0], atol=1e-6)
    assert info.converged or info.stop == "precision"


def test_iteration_cap_and_precision_stops_are_reported():
    a, b = spd(8, 3) * np.logspace(0, 4, 8), np.ones(8)  # ill-conditioned
    a = (a + a.T) / 2 + 1e-3 * np.eye(8)
    _, capped = minimize_lbfgs(
        quadratic(a, b), np.zeros(8), dtype=torch.float64, device="cpu", tol=1e-14, max_iter=2
    )
    assert not capped.converged and capped.stop == "max_iter" and capped.n_iter <= 2
    _, tight = minimize_lbfgs_numpy(
        lambda x: (0.5 * x @ x, x), np.full(3, 1e-3), tol=0.0, max_iter=1000
    )
    assert tight.stop in ("gradient", "precision")
    assert isinstance(tight, SolverInfo) and tight.message


def test_thread_count_is_restored_after_a_small_problem(monkeypatch):
    seen = []
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    before = torch.get_num_threads()
    minimize_lbfgs(
        quadratic(np.eye(2), np.ones(2)),
        np.zeros(2),
        dtype=torch.float64,
        device="cpu",
        tol=1e-8,
        max_iter=50,
        work=10,
    )

    def failing(theta):
        raise ZeroDivisionError("objective failed")

    with pytest.raises(ZeroDivisionError):
        minimize_lbfgs(
            failing, np.zeros(2), dtype=torch.float64, device="cpu", tol=1e-8, max_iter=5, work=10
        )
    # one thread for the solve, then the caller's count back, on the error path too
    assert seen == [1, before, 1, before]
    monkeypatch.undo()
    torch.set_num_threads(original)
