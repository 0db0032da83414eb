"""L-BFGS on torch objectives, through SciPy's reference L-BFGS-B implementation.

The objective and its gradient are evaluated by torch (autograd) on the chosen device and
dtype; the optimizer state lives in float64 on the host. SciPy's L-BFGS-B is the same solver
scikit-learn's ``LogisticRegression(solver="lbfgs")`` uses, so ``tol`` means the same thing in
both: the run stops when the largest absolute gradient entry is ``≤ tol`` (``gtol``), or when the
relative decrease of the objective falls below ``64·eps`` of float64 (``ftol``).
:func:`minimize_lbfgs_numpy` is the same run for an objective that returns its own closed-form
float64 gradient (``LowRank``'s CPU path).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

FTOL = 64 * np.finfo(np.float64).eps
SMALL_PROBLEM = 1 << 20
SMALL_BLAS = 1 << 25


def blas_threads(work: int) -> AbstractContextManager:
    """One BLAS thread for the duration when ``work`` (about the flops of one pass over the data)
    is below ``SMALL_BLAS``, else no change. On a busy 2-core machine OpenBLAS's thread pool made
    the skinny products of a closed-form ``LowRank`` evaluation (N×d by d×r) 5–10× slower than one
    thread. Needs ``threadpoolctl`` (installed with scikit-learn and pluralign's dev extra);
    without it, a no-op."""
    global _CONTROLLER
    if work >= SMALL_BLAS:
        return nullcontext()
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - optional
            return nullcontext()
        # Found once (the BLAS libraries NumPy and SciPy loaded): threadpool_limits rescans the
        # process's libraries on every call, ~1.6 ms with torch loaded, 4% of a small fit.
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


_CONTROLLER = None


def _run(fun, x0: np.ndarray, tol: float, max_iter: int, history: int):
    return minimize(
        fun,
        np.asarray(x0, dtype=np.float64),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": tol, "ftol": FTOL, "maxiter": max_iter, "maxcor": history, "maxls": 50},
    )


@dataclass(frozen=True)
class SolverInfo:
    """What the solver reports: iterations, final max-abs gradient, objective, convergence.

    ``converged`` is the gradient criterion (largest gradient entry ``≤ tol``). ``stop`` says
    why the run ended: ``"gradient"`` (converged), ``"precision"`` (the relative decrease of the
    objective fell below ``64·eps``: the objective no longer decreases at the arithmetic's
    precision, although the gradient is above ``tol``), ``"max_iter"`` (the iteration or
    evaluation cap), ``"line_search"`` (the line search failed) or ``"other"``.
    """

    n_iter: int
    grad_max: float
    objective: float
    converged: bool
    message: str
    stop: str = "gradient"


def minimize_lbfgs(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x0: np.ndarray,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    tol: float,
    max_iter: int,
    history: int = 20,
    work: int | None = None,
) -> tuple[np.ndarray, SolverInfo]:
    """Minimise ``objective(theta)`` over a flat parameter vector starting at ``x0``.

    ``work`` (about the flops of one evaluation) below ``SMALL_PROBLEM`` runs torch on one thread
    for the duration: tiny evaluations are slower on a contended intra-op thread pool.
    """

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        theta = torch.as_tensor(flat, dtype=dtype, device=device).requires_grad_(True)
        value = objective(theta)
        (grad,) = torch.autograd.grad(value, theta)
        return float(value.detach()), grad.detach().to("cpu", torch.float64).numpy()

    # Small problems run faster on one thread than on contended intra-op thread pools.
    threads = torch.get_num_threads()
    if work is not None and work < SMALL_PROBLEM:
        torch.set_num_threads(1)
    try:
        result = _run(fun, x0, tol, max_iter, history)
    finally:
        torch.set_num_threads(threads)
    return result.x, _info(result, tol, max_iter)


def minimize_lbfgs_numpy(
    fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    *,
    tol: float,
    max_iter: int,
    history: int = 20,
) -> tuple[np.ndarray, SolverInfo]:
    """:func:`minimize_lbfgs` for an objective that returns ``(value, gradient)`` itself (closed
    form, float64 NumPy): the same L-BFGS-B run, stopping rules and :class:`SolverInfo`, without
    torch's per-evaluation tensor and autograd overhead."""
    result = _run(fun, x0, tol, max_iter, history)
    return result.x, _info(result, tol, max_iter)


def _info(result, tol: float, max_iter: int) -> SolverInfo:
    """:class:`SolverInfo` of a SciPy L-BFGS-B result (the gradient criterion decides)."""
    grad_max = float(np.max(np.abs(result.jac))) if result.jac.size else 0.0
    converged = bool(grad_max <= tol)
    if converged:
        stop = "gradient"
    elif result.status == 1 or int(result.nit) >= max_iter:
        stop = "max_iter"
    elif result.status == 0:
        stop = "precision"
    elif result.status == 2 and "ABNORMAL" in str(result.message).upper():
        stop = "line_search"
    else:
        stop = "other"
    return SolverInfo(
        n_iter=int(result.nit),
        grad_max=grad_max,
        objective=float(result.fun),
        converged=converged,
        message=str(result.message),
        stop=stop,
    )
