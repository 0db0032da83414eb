"""Fit diagnostics shared by the estimators and policies: pluralign's warnings and the tests
behind them (hyper-parameter and input validation is :mod:`pluralign.rewards.validation`).

**Diagnostics** run after every fit and issue pluralign's warnings (from the first frame outside
the package, so the user's call site is shown):

* :class:`~pluralign.errors.ConvergenceWarning` — the solver stopped before its tolerance was
  met (``converged_`` is False): the iteration cap, a failed line search, or the objective no
  longer decreasing at the arithmetic's precision (``tol`` tighter than it can certify); the
  message says which.
* :class:`~pluralign.errors.SeparableDataWarning` — only with ``l2 = 0``: the maximum-likelihood
  estimate does not exist. For a Bradley–Terry model linear in ``θ`` with signed difference
  features ``a_i = s_i Δz_i`` (``s_i = 2y_i − 1``), the MLE exists iff there is no
  **recession direction**: no ``w`` with ``a_iᵀw ≥ 0`` for all ``i`` and ``> 0`` for some
  (Albert & Anderson 1984, Silvapulle 1981; along such a ``w`` every term of the loss is
  non-increasing and one strictly decreasing, so ``θ̂ + tw`` always does better; without one,
  the loss is coercive on the identified subspace). :func:`find_separation` decides it by the
  linear program ``max Σ_i âᵢᵀw  s.t. âᵢᵀw ≥ 0, ‖w‖_∞ ≤ 1`` (rows normalized, ties ``Δz = 0``
  dropped; HiGHS): separable iff the optimum is positive. A cheaper, sound certificate comes
  first: if the fitted margins classify every non-tie comparison correctly, scaling the
  estimate up drives the loss to its infimum 0, which no finite estimate attains (the models are
  cones: ``t·θ̂`` stays in the model; a fit with a fixed offset, ``adapt_user``'s, skips it).
  Above :data:`LP_BUDGET` constraint entries only that certificate is used.
* :class:`~pluralign.errors.DisconnectedComparisonsWarning` — only with ``l2 = 0``, for models
  linear in ``θ``: some direction of the parameter space changes reward differences between
  the training responses but no comparison informs it. With the identified span
  ``I = span{Δz_i}`` and the relevant span ``S = span{z(x, φ) − z(x, φ′)}`` over training
  contexts ``x`` and training responses ``φ, φ′`` (``I ⊆ S``), it fires when
  ``dim S − dim I > 0``. With one-hot item features (item-level Bradley–Terry) ``dim S − dim I``
  is exactly the number of connected components of the comparison graph minus one, hence the
  name (the incidence matrix of a graph with ``c`` components on ``n`` items has rank ``n − c``,
  the differences of ``n`` items span ``n − 1`` dimensions); directions that change no reward
  difference (a constant feature, the common shift of all item strengths) are not in ``S`` and
  are not reported. No estimator adds a fallback ridge: the estimate in those directions is the
  solver's start, ``0`` for the zero-started fits (L-BFGS iterates stay in the span of the
  gradients, which lies in ``I``), i.e. the minimum-norm estimate and the limit of the ridge
  estimate as ``l2 → 0``.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

__all__ = [
    "ID_BUDGET",
    "LP_BUDGET",
    "convergence_message",
    "find_separation",
    "gap_message",
    "kron_nnz",
    "rank",
    "response_basis",
    "row_basis",
    "row_kron",
    "separable_message",
    "signed",
    "svd_cost",
    "unidentified_message",
    "warn",
]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

LP_BUDGET = 500_000
"""Largest number of non-zeros of the separability LP (``N·p`` for dense features with ``p``
parameters; about 0.5 s with HiGHS). Above it only the fitted-margin certificate is checked."""

ID_BUDGET = 10**9
"""Largest ``rows·cols·min(rows, cols)`` of a rank computation (an SVD) in the identifiability
check; above it the check is skipped."""

_MARGIN_TOL = 1e-6  # a row is separated when its normalized margin along w exceeds this
_FEAS_TOL = 1e-9  # ... and no normalized margin is below −_FEAS_TOL


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` with the ``stacklevel`` of the first frame outside pluralign."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


# ----------------------------------------------------------------------------- linear algebra
def svd_cost(shape: tuple[int, int]) -> int:
    """``rows·cols·min(rows, cols)``: the order of the flops of an SVD of that shape."""
    return shape[0] * shape[1] * min(shape)


def rank(matrix: np.ndarray | sparse.spmatrix) -> int:
    """Numerical rank (NumPy's tolerance: ``s_max · max(shape) · eps``)."""
    dense = matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix, dtype=np.float64)  # type: ignore[union-attr]  # scipy is untyped: a sparse matrix here
    if dense.size == 0:
        return 0
    values = np.linalg.svd(dense, compute_uv=False)
    if values[0] == 0.0:
        return 0
    return int(np.sum(values > values[0] * max(dense.shape) * np.finfo(np.float64).eps))


def row_basis(matrix: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the row space of ``matrix`` (same tolerance as :func:`rank`)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.size == 0:
        return np.zeros((0, matrix.shape[1]))
    _, values, vt = np.linalg.svd(matrix, full_matrices=False)
    if values[0] == 0.0:
        return np.zeros((0, matrix.shape[1]))
    return vt[values > values[0] * max(matrix.shape) * np.finfo(np.float64).eps]


def response_basis(phi0: np.ndarray, phi1: np.ndarray) -> np.ndarray:
    """Orthonormal basis (rows) of ``span{φ − φ′}`` over the training responses ``φ0, φ1``."""
    responses = np.concatenate([phi0, phi1])
    return row_basis(responses - responses.mean(axis=0))


def row_kron(x: np.ndarray, g: np.ndarray) -> np.ndarray | sparse.csr_matrix:
    """Rows ``x_i ⊗ g_i`` (row-major ``vec(x_i g_iᵀ)``), sparse when ``x`` is mostly zeros (e.g.
    one-hot user contexts), dense otherwise."""
    n, r = g.shape
    if np.count_nonzero(x) > 0.25 * x.size:
        return (x[:, :, None] * g[:, None, :]).reshape(n, -1)
    xs = sparse.coo_matrix(x)
    cols = (xs.col[:, None] * r + np.arange(r)).ravel()
    vals = (xs.data[:, None] * g[xs.row]).ravel()
    return sparse.csr_matrix((vals, (np.repeat(xs.row, r), cols)), shape=(n, x.shape[1] * r))


def kron_nnz(x: np.ndarray, r: int) -> int:
    """Non-zeros that :func:`row_kron` of ``x`` with ``r`` columns would store."""
    nnz = int(np.count_nonzero(x))
    return (x.size if nnz > 0.25 * x.size else nnz) * r


# ----------------------------------------------------------------------------- separability
def _lp_direction(a: np.ndarray | sparse.spmatrix) -> np.ndarray | None:
    """Rows separated by a recession direction of ``a`` (LP of the module docstring), an empty
    mask if there is none, ``None`` if the LP failed or its direction does not verify in float64
    (a positive optimum whose margins dip below ``−_FEAS_TOL``: undecided, not "no")."""
    norms = (
        np.sqrt(np.asarray(a.multiply(a).sum(axis=1)).ravel())  # type: ignore[union-attr]  # scipy is untyped: a sparse matrix here
        if sparse.issparse(a)
        else np.linalg.norm(a, axis=1)
    )
    live = norms > 0
    if not live.any():
        return np.zeros(a.shape[0], dtype=bool)
    if sparse.issparse(a):
        unit = sparse.diags(1.0 / norms[live]) @ sparse.csr_matrix(a)[np.flatnonzero(live)]
        objective = -np.asarray(unit.sum(axis=0)).ravel()
    else:
        unit = a[live] / norms[live, None]
        objective = -unit.sum(axis=0)
    res = linprog(
        objective,
        A_ub=-unit,
        b_ub=np.zeros(unit.shape[0]),
        bounds=[(-1.0, 1.0)] * unit.shape[1],
        method="highs",
    )
    if res.status != 0:
        return None
    margins = np.asarray(unit @ res.x).ravel()
    mask = np.zeros(a.shape[0], dtype=bool)
    if margins.max() <= _MARGIN_TOL:
        return mask  # the optimum is 0: no recession direction
    if margins.min() < -_FEAS_TOL:
        return None
    mask[np.flatnonzero(live)] = margins > _MARGIN_TOL
    return mask


def find_separation(
    problems: list[Any] | None, margins: np.ndarray | None, ties: np.ndarray
) -> tuple[bool | None, np.ndarray]:
    """Whether the MLE fails to exist, and which comparisons are separated.

    ``margins`` are the fitted ``s_i (r̂(φ1_i) − r̂(φ0_i))``, ``ties`` marks comparisons with
    ``Δφ = 0``; ``problems`` are signed designs ``a_i = s_i Δz_i`` of convex sub-models through
    the estimate (the model itself when it is linear), or ``None`` when they are too large.
    Returns ``(True, mask)`` when separable, ``(False, empty)`` when proved not separable and
    ``(None, empty)`` when undetermined (LP over :data:`LP_BUDGET` or failed). ``margins=None``
    skips the fitted-margin certificate (it is sound only for models that are cones: scaling
    the estimate must stay in the model, which a fixed offset breaks).
    """
    none = np.zeros(ties.shape[0], dtype=bool)
    if margins is not None and (~ties).any() and np.all(margins[~ties] > 0):
        return True, ~ties
    if problems is None:
        return None, none
    decided = True
    for a in problems:
        nnz = a.nnz if sparse.issparse(a) else a.size
        if nnz > LP_BUDGET:
            decided = False
            continue
        mask = _lp_direction(a)
        if mask is None:
            decided = False
        elif mask.any():
            return True, mask
    return (False if decided else None), none


def signed(a: np.ndarray | sparse.spmatrix, sign: np.ndarray) -> np.ndarray | sparse.spmatrix:
    """Rows ``s_i a_i``."""
    if sparse.issparse(a):
        return sparse.diags(sign) @ a
    return sign[:, None] * a


def separable_message(
    owner: str,
    n_sep: int,
    n: int,
    norm: float | None,
    users: list[Any] | None = None,
    how: str = "",
) -> str:
    """The text of a :class:`~pluralign.errors.SeparableDataWarning`."""
    who = ""
    if users:
        shown = ", ".join(map(repr, users[:5])) + (
            f", … ({len(users)} users)" if len(users) > 5 else ""
        )
        who = f"; users: {shown}"
    size = "" if norm is None else f" (‖θ̂‖ = {norm:.4g})"
    return (
        f"{owner}: the maximum-likelihood estimate does not exist: with l2 = 0 the "
        f"comparisons are (quasi-)separable{how} ({n_sep} of {n} comparisons separated{who}), "
        "so the likelihood keeps increasing as ‖θ‖ → ∞ and the estimate"
        f"{size} is wherever the solver stopped. Add a ridge (l2 > 0)."
    )


def unidentified_message(owner: str, count: int, start: str, users: list[Any] | None = None) -> str:
    """The text of a :class:`~pluralign.errors.DisconnectedComparisonsWarning`."""
    who = ""
    if users:
        who = (
            " (users "
            + ", ".join(map(repr, users[:5]))
            + (f", … ({len(users)} users)" if len(users) > 5 else "")
            + ")"
        )
    return (
        f"{owner}: with l2 = 0 the comparisons leave {count} direction(s) of the parameter "
        f"space unidentified{who}: they change reward differences between training "
        "responses, but no comparison informs them (the comparison graph is disconnected: "
        f"with one-hot item features it has {count + 1} connected components). "
        f"The estimate there is the solver's start: {start}. Add a ridge (l2 > 0) or more "
        "comparisons that link the components."
    )


def convergence_message(owner: str, info: Any, tol: float, dtype: str = "float64") -> str:
    """The text of a fit's :class:`~pluralign.errors.ConvergenceWarning` (by ``info.stop``)."""
    head = (
        f"{owner} did not converge: the largest gradient entry is {info.grad_max:.3g} > "
        f"tol = {tol:g} after {info.n_iter} L-BFGS iterations"
    )
    stop = getattr(info, "stop", "other")
    if stop == "precision":
        why = (
            f"the objective stopped decreasing at {dtype} precision (relative decrease below "
            "64·eps of float64), so tol is tighter than this problem can certify: loosen tol "
            f"to about {info.grad_max:.1g}"
        )
    elif stop == "max_iter":
        why = "the iteration cap was reached: increase max_iter"
    elif stop == "line_search":
        why = (
            "the line search failed (often a tol below the objective's precision, e.g. in "
            "float32): loosen tol, or use float64"
        )
    else:
        why = f"solver message: {info.message}"
    return f"{head}; {why}. The estimate is the last iterate."


def gap_message(owner: str, gap: float, tol: float, n_iter: int, reason: str = "") -> str:
    """The text of a policy solver's :class:`~pluralign.errors.ConvergenceWarning`."""
    why = f" ({reason})" if reason else ""
    return (
        f"{owner} stopped after {n_iter} iterations{why} with certified duality gap "
        f"{gap:.3g} > tol = {tol:g}; the policy is the best iterate, within that gap of the "
        "optimum. Increase max_iter or tol."
    )
