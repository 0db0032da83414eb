"""The structural types of what callers expect of a fitted reward model.

One job: name, as :class:`typing.Protocol` classes, the attributes and methods that the layers
above (confidence sets, policies, saving, the ``personalize`` workflow) use of a model they are
given, so that a type checker can check the call sites without tying them to one class. They
are checked statically only (no ``runtime_checkable``): the runtime checks stay where they are
(``isinstance(model, LinearInParameters)`` in the confidence sets, the class registry of
:mod:`pluralign.rewards.persistence`).

* :class:`RewardFunction` — anything with ``reward(x, φ)`` (every :class:`RewardModel`);
* :class:`LinearReward` — a reward linear in a parameter vector after a known feature map,
  ``r(x, φ) = θᵀ z(x, φ)`` (what :class:`~pluralign.rewards.LinearInParameters` provides);
* :class:`UserViews` — a fitted multi-user model as the per-user and aggregated policies see
  it: its users, their ``θ_u``, and each user's view ``θ_u = A v`` with the comparisons that
  inform it (P-ShareLoRA, Liu et al. 2025, arXiv 2503.19201);
* :class:`SavableUserModel` — :class:`UserViews` plus what saving a model and its per-user
  design matrices reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from pluralign.data import PreferenceData
    from pluralign.rewards.user_reward import UserReward

__all__ = ["LinearReward", "RewardFunction", "SavableUserModel", "UserViews"]


class RewardFunction(Protocol):
    """A reward ``r(x, φ)``; shapes as in :meth:`pluralign.rewards.RewardModel.reward`."""

    def reward(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """``(n,)`` rewards of ``phi`` ``(n, d_phi)``, or ``(m, K)`` of ``(m, K, d_phi)``."""
        ...


class LinearReward(RewardFunction, Protocol):
    """A fitted reward ``θ̂ᵀ z(x, φ)``, linear in ``θ ∈ R^p`` after a known feature map ``z``."""

    params_: np.ndarray

    @property
    def n_params(self) -> int:
        """Dimension ``p`` of ``z``."""
        ...

    def features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """``z(x, φ)``, trailing dimension ``p``."""
        ...

    def reward_at(self, params: np.ndarray, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """``paramsᵀ z(x, φ)`` for any parameter vector."""
        ...

    def mean_features(self, x: np.ndarray | None, phi: np.ndarray) -> np.ndarray:
        """``(1/n) Σ_i z(x_i, φ_i)``."""
        ...


class UserViews(RewardFunction, Protocol):
    """A fitted multi-user reward model, as per-user and aggregated policies use it."""

    users_: np.ndarray

    def user_theta(self, users: Any) -> np.ndarray:
        """``θ_u`` per user id, shape ``(n, d_phi)``."""
        ...

    def user_model(self, user: Any) -> UserReward:
        """User ``u``'s view ``θ_u = A v`` as a linear-in-parameters reward."""
        ...

    def confidence_rows(self, user: Any, data: PreferenceData) -> PreferenceData:
        """The comparisons of ``data`` that inform user ``u``'s parameters."""
        ...


class SavableUserModel(UserViews, Protocol):
    """:class:`UserViews` plus what :func:`~pluralign.rewards.persistence.save_model` and the
    per-user design matrices read."""

    n_train_: int
    d_phi_: int

    def user_basis(self) -> np.ndarray:
        """``A`` of the per-user views, ``(d_phi, p)``."""
        ...

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fitted arrays, as ``model.npz`` stores them."""
        ...

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The hyper-parameters (scikit-learn's ``get_params``)."""
        ...
