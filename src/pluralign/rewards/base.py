"""The estimator contract, the reward-model interface and the Bradley–Terry maximum-likelihood
machinery the estimators share.

:class:`EstimatorMixin` is every estimator's scikit-learn contract (hyper-parameters,
``repr``, the fitted check); :class:`RewardModel` is the interface of a reward;
:class:`BradleyTerryModel` fits one.

Every estimator fits the penalized Bradley–Terry MLE

    minimize  (1/N) Σ_i −log σ(s_i · (r(x_i, φ1_i) − r(x_i, φ0_i)))  +  penalty(params),
    s_i = 2 y_i − 1,

with ``−log σ(t) = softplus(−t)`` evaluated stably. Subclasses say how the margin
``r(x, φ1) − r(x, φ0)`` depends on the parameters; this module solves, stores and predicts.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pluralign.data import PreferenceData
from pluralign.errors import (
    ConvergenceWarning,
    DataValidationError,
    DisconnectedComparisonsWarning,
    NotFittedError,
    SeparableDataWarning,
)
from pluralign.rewards._solver import SolverInfo, minimize_lbfgs
from pluralign.rewards.diagnostics import (
    convergence_message,
    find_separation,
    rank,
    separable_message,
    unidentified_message,
    warn,
)
from pluralign.rewards.validation import check_int, check_number

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["BradleyTerryModel", "EstimatorMixin", "RewardModel", "log_sigmoid"]


def log_sigmoid(t: np.ndarray) -> np.ndarray:
    """Numerically stable ``log σ(t)``."""
    t = np.asarray(t, dtype=np.float64)
    return -np.logaddexp(0.0, -t)


class EstimatorMixin:
    """scikit-learn's estimator contract (its ``base.BaseEstimator``), shared by every estimator.

    Implemented here without importing scikit-learn (it is not a dependency): the
    hyper-parameters are the arguments of ``__init__``, which only stores them, verbatim, as
    attributes of the same name (``fit`` validates them and sets the learned attributes, whose
    names end in ``_``). :meth:`get_params` and :meth:`set_params` are what
    :func:`sklearn.base.clone` and ``GridSearchCV`` use, ``repr`` shows them, and
    :meth:`_check_fitted` raises :class:`~pluralign.errors.NotFittedError` until ``fit`` (or a
    constructor of a fitted model) has set ``is_fitted_``.
    """

    # ``__init__`` arguments that are fitted inputs, not hyper-parameters: a fitted model passed
    # in (``RTVReduced.base``). ``get_params(deep=True)`` does not descend into them and
    # ``set_params`` does not reach inside them (as for scikit-learn's ``FrozenEstimator``);
    # the class's ``__sklearn_clone__`` keeps the same object, so a clone can still be fitted.
    _fitted_inputs: tuple[str, ...] = ()

    def _check_fitted(self) -> None:
        if not getattr(self, "is_fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet; call fit(data) first")

    @classmethod
    def _get_param_names(cls) -> list[str]:
        """The hyper-parameters: the named arguments of ``__init__``, in signature order."""
        if cls.__init__ is object.__init__:
            return []
        return [
            p.name
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyper-parameters, as given to ``__init__`` (scikit-learn convention).

        With ``deep``, the parameters of estimator-valued hyper-parameters are included as
        ``name__param`` (none of pluralign's estimators has one: ``RTVReduced.base`` is a fitted
        input, see ``_fitted_inputs``)."""
        out: dict[str, Any] = {}
        for name in self._get_param_names():
            value = getattr(self, name)
            out[name] = value
            if (
                deep
                and name not in self._fitted_inputs
                and hasattr(value, "get_params")
                and not isinstance(value, type)
            ):
                out.update((f"{name}__{k}", v) for k, v in value.get_params(deep=True).items())
        return out

    def set_params(self, **params: Any) -> Self:
        """Set hyper-parameters (``name=value``, or ``name__param=value`` for an
        estimator-valued one) and return ``self``, scikit-learn style: values are stored as
        given and checked by ``fit``. An unknown name raises a ``DataValidationError`` (a
        ``ValueError``) naming the valid parameters; then nothing is set."""
        names = self._get_param_names()
        direct: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            name, delim, sub = key.partition("__")
            owner = type(self).__name__
            if name not in names:
                raise DataValidationError(
                    f"invalid parameter {key!r} for {owner}; valid parameters are: "
                    f"{', '.join(names) or '(none)'}",
                    field=key,
                )
            if not delim:
                direct[name] = value
                continue
            inner = getattr(self, name)
            if name in self._fitted_inputs or not hasattr(inner, "set_params"):
                why = "is a fitted input" if name in self._fitted_inputs else "is not an estimator"
                raise DataValidationError(
                    f"invalid parameter {key!r} for {owner}: {name!r} {why}; set {name} "
                    "itself instead",
                    field=key,
                )
            nested.setdefault(name, {})[sub] = value
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        for name, value in direct.items():
            setattr(self, name, value)
        return self

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's estimator tags (those of ``BaseEstimator``): ``GridSearchCV`` and
        ``cross_validate`` read them. Only scikit-learn calls this, so it imports it here."""
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params(deep=False).items())
        return f"{type(self).__name__}({args})"


class RewardModel(EstimatorMixin, ABC):
    """A reward ``r(x, φ)``; fitted from comparisons by Bradley–Terry maximum likelihood.

    An estimator in scikit-learn's sense (:class:`EstimatorMixin`): :meth:`score` (higher is
    better) is what ``GridSearchCV`` maximises, with ``PreferenceData`` as ``X`` (the labels
    are ``data.y``; ``y`` is accepted only as ``None`` or ``data.y`` itself).
    """

    is_fitted_: bool  # set by ``fit`` (or a constructor of a fitted model)

    @abstractmethod
    def fit(self, data: PreferenceData, y: None = None) -> Self:
        """Fit to ``data`` and return ``self`` (``y``: see :meth:`_check_y`)."""

    @abstractmethod
    def reward(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """Rewards of responses ``phi``.

        ``phi`` is ``(n, d_phi)`` with ``x`` ``(n, d_x)``, giving ``(n,)``; or ``(m, K, d_phi)``
        (K candidates per state) with ``x`` ``(m, d_x)``, giving ``(m, K)``. Context-free models
        ignore ``x`` (it may be ``None``).
        """

    def predict_proba(self, data: PreferenceData) -> np.ndarray:
        """``P(y = 1) = σ(r(x, φ1) − r(x, φ0))`` for each comparison."""
        margin = self.reward(data.x, data.phi1) - self.reward(data.x, data.phi0)
        return np.exp(log_sigmoid(margin))

    def log_likelihood(self, data: PreferenceData) -> float:
        """Mean Bradley–Terry log-likelihood per comparison (higher is better; ≤ 0)."""
        margin = self.reward(data.x, data.phi1) - self.reward(data.x, data.phi0)
        sign = 2.0 * data.y - 1.0
        return float(np.mean(log_sigmoid(sign * margin)))

    def score(self, data: PreferenceData, y: None = None) -> float:
        """:meth:`log_likelihood` of ``data``: the mean Bradley–Terry log-likelihood per
        comparison, higher is better (what ``GridSearchCV`` maximises without ``scoring``)."""
        self._check_y(data, y)
        return self.log_likelihood(data)

    def _check_y(self, data: PreferenceData, y: Any) -> None:
        """Refuse a ``y`` other than ``None`` or the data's own labels.

        ``fit(X, y)`` / ``score(X, y)`` is scikit-learn's signature; here the labels are part of
        ``data`` (``data.y``). ``GridSearchCV(...).fit(data)`` passes no ``y``; a pipeline or a
        stratified splitter may pass ``y``, which must then be ``data.y`` (rows in order).
        """
        if y is None:
            return
        labels = getattr(data, "y", None)
        if labels is None or np.shape(y) != labels.shape or not np.array_equal(y, labels):
            raise DataValidationError(
                f"{type(self).__name__} reads its labels from data.y; y must be None or equal "
                "to data.y",
                field="y",
            )


class BradleyTerryModel(RewardModel):
    """Shared fitting code: torch objective, SciPy L-BFGS, fitted-state bookkeeping.

    Parameters common to all estimators
    -----------------------------------
    l2:
        Ridge strength λ: the objective adds ``(λ/2)·‖params‖²``.
    tol:
        Gradient tolerance: stop when the largest absolute entry of the objective's gradient
        is ``≤ tol``.
    max_iter:
        Iteration cap of L-BFGS.
    dtype, device:
        Torch dtype (``"float64"`` by default) and device (``"cpu"``, ``"cuda"``, ...) for the
        objective's evaluation.

    Validation and warnings
    -----------------------
    ``fit`` refuses (``DataValidationError`` with ``field`` the parameter's name) an ``l2`` that
    is not a finite number ``≥ 0``, a ``tol`` that is not finite and ``> 0`` and a ``max_iter``
    that is not an integer ``≥ 1``. After the fit (see :mod:`pluralign.rewards.diagnostics`):

    * ``ConvergenceWarning`` when the gradient criterion was not met (``converged_`` False);
    * with ``l2 = 0`` only, ``SeparableDataWarning`` when the MLE does not exist (the data are
      (quasi-)separable: a linear program finds a recession direction of the likelihood, or the
      fitted margins classify every comparison correctly), and, for models linear in their
      parameters, ``DisconnectedComparisonsWarning`` when some direction that changes reward
      differences between training responses is not informed by any comparison.

    ``separable_`` (``True``/``False``, ``None`` when not checked or undecided) and
    ``unidentified_`` (the number of such directions, ``None`` when not checked) record the
    outcome.
    """

    # learned by ``fit``
    solver_info_: SolverInfo
    n_iter_: int
    converged_: bool
    separable_: bool | None
    unidentified_: int | None

    _quiet = False  # internal fits (spectral starts, wrapped estimators) warn through their owner
    _start_note = (
        "0, since L-BFGS starts at 0 and its iterates stay in the span of the "
        "gradients: the minimum-norm estimate, the limit of the ridge estimate as "
        "l2 → 0"
    )

    def __init__(
        self,
        l2: float = 1e-3,
        *,
        tol: float = 1e-6,
        max_iter: int = 1000,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> None:
        self.l2 = l2
        self.tol = tol
        self.max_iter = max_iter
        self.dtype = dtype
        self.device = device

    # ---- to be provided by subclasses ---------------------------------------------------
    @abstractmethod
    def _initial_params(self, data: PreferenceData) -> np.ndarray:
        """Flat starting point for the solver."""

    @abstractmethod
    def _margins(self, params: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``r(x, φ1) − r(x, φ0)`` for every comparison, differentiable in ``params``."""

    @abstractmethod
    def _store(self, params: np.ndarray, data: PreferenceData) -> None:
        """Unpack the solution into the learned attributes (ending in ``_``)."""

    def _penalty(self, params: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Regularizer added to the mean loss; the ridge ``(λ/2)‖params‖²`` by default."""
        return 0.5 * self.l2 * torch.sum(params * params)

    def _validate(self, data: PreferenceData) -> None:
        """Model-specific checks on the training data (e.g. that contexts exist); sets nothing."""

    def _prepare(self, data: PreferenceData) -> None:
        """Learned state that the start and the objective need, set by ``fit`` after
        :meth:`_validate` and before solving (e.g. ``RTVReduced``'s reduction ``rtv_``)."""

    def _check_params(self) -> None:
        """Refuse invalid common hyper-parameters (scikit-learn style: checked at ``fit``)."""
        owner = type(self).__name__
        check_number(self.l2, "l2", owner=owner)
        check_number(self.tol, "tol", owner=owner, strict=True)
        check_int(self.max_iter, "max_iter", owner=owner)
        _ = self._torch_dtype

    def _separation_problems(self, data: PreferenceData) -> list[Any] | None:
        """Signed designs ``s_i Δz_i`` of convex sub-models through the estimate, for the
        separability LP (``None``: too large or not available; only the margin check runs)."""
        return None

    def _identification_problem(self, data: PreferenceData) -> tuple[np.ndarray, np.ndarray] | None:
        """``(Δz rows, rows spanning S)`` for the identifiability check, or ``None``."""
        return None

    def _estimate_norm(self) -> float | None:
        theta = getattr(self, "theta_", None)
        return None if theta is None else float(np.linalg.norm(theta))

    def _signed_margins(self, data: PreferenceData) -> np.ndarray | None:
        """``s_i (r̂(x_i, φ1_i) − r̂(x_i, φ0_i))``; ``None`` when the model is not a cone (scaling
        the estimate would leave the model), so the margin certificate does not apply."""
        margin = self.reward(data.x, data.phi1) - self.reward(data.x, data.phi0)
        return (2.0 * data.y - 1.0) * margin

    def _diagnose(
        self,
        data: PreferenceData,
        *,
        owner: str | None = None,
        users: np.ndarray | None = None,
        identification: bool = True,
    ) -> None:
        """Issue the warnings of the class docstring for the fit just made on ``data``.

        ``owner`` names the estimator in the messages (a wrapper such as ``PerUser``), ``users``
        (one id per row of ``data``) lets the messages name the users of separated rows.
        """
        owner = owner or type(self).__name__
        if not self.solver_info_.converged:
            warn(
                convergence_message(owner, self.solver_info_, self.tol, self.dtype),
                ConvergenceWarning,
            )
        self.separable_, self.unidentified_ = None, None
        if self.l2 != 0:
            return
        ties = ~np.any(data.delta_phi != 0, axis=1)
        found, mask = find_separation(
            self._separation_problems(data), self._signed_margins(data), ties
        )
        self.separable_ = found
        if found:
            who = None if users is None else np.unique(users[mask]).tolist()
            warn(
                separable_message(
                    owner,
                    int(mask.sum()),
                    data.n,
                    self._estimate_norm(),
                    who,
                    getattr(self, "_separation_how", ""),
                ),
                SeparableDataWarning,
            )
        problem = self._identification_problem(data) if identification else None
        if problem is not None:
            dz, span = problem
            self.unidentified_ = max(rank(span) - rank(dz), 0)
            if self.unidentified_:
                warn(
                    unidentified_message(owner, self.unidentified_, self._start_note),
                    DisconnectedComparisonsWarning,
                )

    # ---- shared machinery -----------------------------------------------------------------
    @property
    def _torch_dtype(self) -> torch.dtype:
        try:
            dtype = getattr(torch, self.dtype)
        except AttributeError:
            raise DataValidationError(
                f"unknown torch dtype {self.dtype!r}; use 'float64' or 'float32'", field="dtype"
            ) from None
        if dtype not in (torch.float64, torch.float32):
            raise DataValidationError(
                f"must be 'float64' or 'float32', got {self.dtype!r}", field="dtype"
            )
        return dtype

    def _tensors(self, data: PreferenceData) -> dict[str, torch.Tensor]:
        dtype, device = self._torch_dtype, torch.device(self.device)
        batch = {
            "dphi": torch.as_tensor(data.delta_phi, dtype=dtype, device=device),
            "sign": torch.as_tensor(2.0 * data.y - 1.0, dtype=dtype, device=device),
        }
        if data.x is not None:
            batch["x"] = torch.as_tensor(data.x, dtype=dtype, device=device)
        return batch

    def _objective(self, batch: dict[str, torch.Tensor]):
        def objective(params: torch.Tensor) -> torch.Tensor:
            margins = self._margins(params, batch)
            return F.softplus(-batch["sign"] * margins).mean() + self._penalty(params, batch)

        return objective

    def _solve(self, data: PreferenceData, x0: np.ndarray) -> tuple[np.ndarray, SolverInfo]:
        batch = self._tensors(data)
        return minimize_lbfgs(
            self._objective(batch),
            x0,
            dtype=self._torch_dtype,
            device=self.device,
            tol=self.tol,
            max_iter=self.max_iter,
            work=data.n * x0.size,
        )

    def fit(self, data: PreferenceData, y: None = None) -> Self:
        """Penalized Bradley–Terry MLE on ``data``; returns ``self`` (``y``: ``None`` or
        ``data.y``, for scikit-learn's ``fit(X, y)``)."""
        if not isinstance(data, PreferenceData):
            raise DataValidationError(
                f"fit expects PreferenceData, got {type(data).__name__}", field="data"
            )
        self._check_y(data, y)
        self._check_params()
        self._validate(data)
        self._prepare(data)
        params, info = self._solve(data, self._initial_params(data))
        self._store(params, data)
        self.solver_info_ = info
        self.n_iter_ = info.n_iter
        self.converged_ = info.converged
        self.is_fitted_ = True
        self.separable_, self.unidentified_ = None, None
        if not self._quiet:
            self._diagnose(data)
        return self
