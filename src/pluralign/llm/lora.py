"""Multi-user LoRA: every user's low-rank update of a linear layer, in stacked tensors.

P-ShareLoRA (Liu et al. 2025, arXiv 2503.19201) personalizes a reward model by giving each
user ``u`` a low-rank update of chosen weight matrices, with one factor shared across users::

    W_u = W + (α / r) · B_u A_u,     A_u ∈ R^{r×in}, B_u ∈ R^{out×r}

``share`` picks what is per user:

* ``"B"`` (the P-ShareLoRA default): ``B_u = B`` is shared, ``A_u`` is the user's;
* ``"A"``: ``A_u = A`` is shared, ``B_u`` is the user's;
* ``"independent"``: both factors per user (ordinary LoRA, one adapter per user);
* ``"pooled"``: both shared (one LoRA for everybody, users ignored).

Per-user factors live in one stacked parameter (``lora_A`` of shape ``(U, r, in)``, ``lora_B`` of
shape ``(U, out, r)``; a shared factor has a leading dimension of one). A batch that mixes users
gathers each example's factor (``lora_A[user_index]``) and applies it with one batched matmul,
so adding users adds no forward passes. As in LoRA (Hu et al. 2021) and PEFT, ``A`` starts
Kaiming-uniform and ``B`` — the factor applied last — starts at zero, so an untrained adapter is
the base model; dropout is applied to the layer input of the low-rank path only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from pluralign.errors import ConfigError, PluralignError
from pluralign.llm.config import LoraConfig

__all__ = ["SHARE_MODES", "MultiUserLoRA", "MultiUserLoRALinear", "TrainableState"]

SHARE_MODES = ("B", "A", "independent", "pooled")
# the keywords that are settings of the configs' lora section take its defaults and checks
_LORA = LoraConfig.defaults()


class _Router:
    """The user index of the batch in flight, shared by all adapted layers of one model."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.enabled = True


class MultiUserLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus every user's low-rank update (see the module docstring).

    ``forward(x)`` reads the per-example user index from the shared router that
    :class:`MultiUserLoRA` sets; ``x`` has the batch in its first dimension.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        n_users: int,
        r: int,
        alpha: float,
        share: str,
        dropout: float,
        router: _Router,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.share = share
        self.scaling = alpha / r
        self.router = router
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        n_a = n_users if share in ("B", "independent") else 1
        n_b = n_users if share in ("A", "independent") else 1
        weight = base_layer.weight
        self.lora_A = nn.Parameter(
            torch.empty(n_a, r, base_layer.in_features, dtype=weight.dtype, device=weight.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(n_b, base_layer.out_features, r, dtype=weight.dtype, device=weight.device)
        )
        for a in self.lora_A.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default for lora_A

    @property
    def per_user_A(self) -> bool:
        return self.share in ("B", "independent")

    @property
    def per_user_B(self) -> bool:
        return self.share in ("A", "independent")

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha}, share={self.share!r}, "
            f"users={max(self.lora_A.shape[0], self.lora_B.shape[0])}"
        )

    def _factor(
        self, stacked: torch.Tensor, per_user: bool, index: torch.Tensor | None
    ) -> torch.Tensor:
        if not per_user:
            return stacked[0]
        if index is None:
            raise PluralignError(
                "a per-user LoRA layer was called without user indices; "
                "call the model through MultiUserLoRA.route(user_index)"
            )
        return stacked[index]  # (batch, ...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.router.enabled:
            return out
        index = self.router.index
        if index is not None and index.shape[0] != x.shape[0]:
            raise PluralignError(
                f"user index has {index.shape[0]} entries for a batch of {x.shape[0]}"
            )
        a = self._factor(self.lora_A, self.per_user_A, index)
        b = self._factor(self.lora_B, self.per_user_B, index)
        h = self.dropout(x).to(a.dtype)
        flat = h.reshape(h.shape[0], -1, h.shape[-1])  # (batch, tokens, in)
        # per-example factors (3-d, gathered by user) go through one batched matmul
        z = torch.bmm(flat, a.transpose(1, 2)) if a.dim() == 3 else flat @ a.T
        delta = torch.bmm(z, b.transpose(1, 2)) if b.dim() == 3 else z @ b.T
        delta = delta.reshape(*x.shape[:-1], delta.shape[-1]) * self.scaling
        return out + delta.to(out.dtype)

    def user_factors(self, user: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_u, B_u)`` of user index ``user`` (``(r, in)`` and ``(out, r)``)."""
        a = self.lora_A[user if self.per_user_A else 0]
        b = self.lora_B[user if self.per_user_B else 0]
        return a, b

    def delta_weight(self, user: int) -> torch.Tensor:
        """``(α/r) B_u A_u`` (``(out, in)``): the user's update of the base weight."""
        a, b = self.user_factors(user)
        return self.scaling * (b @ a)

    def _grow(self, stacked: nn.Parameter, init: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(
            torch.cat([stacked.data, init[None]], dim=0), requires_grad=stacked.requires_grad
        )

    def add_user(self) -> None:
        """Append one user whose factors start at the mean of the existing users' factors."""
        if self.per_user_A:
            self.lora_A = self._grow(self.lora_A, self.lora_A.data.mean(0))
        if self.per_user_B:
            self.lora_B = self._grow(self.lora_B, self.lora_B.data.mean(0))


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


class MultiUserLoRA(nn.Module):
    """Wrap the linear modules of ``model`` named by ``target_modules`` with multi-user LoRA.

    The modules are replaced in place (``model`` is changed and its own weights frozen).
    A module matches a target when its name equals it or ends with ``"." + target`` (PEFT's
    rule), e.g. ``["query", "value"]`` for BERT or ``["q_proj", "v_proj"]`` for Llama.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module`` (typically a Hugging Face ``PreTrainedModel``).
    n_users:
        Number of users (the leading dimension of the per-user factors).
    target_modules:
        Names of the ``nn.Linear`` modules to adapt.
    r, alpha:
        Rank and scale: the update is ``(alpha / r) · B A``.
    share:
        ``"B"`` (default), ``"A"``, ``"independent"`` or ``"pooled"`` (module docstring).
    dropout:
        Dropout on the input of the low-rank path.

    Use :meth:`route` around a forward pass to say which user each example belongs to.
    """

    def __init__(
        self,
        model: nn.Module,
        n_users: int,
        target_modules: Sequence[str],
        *,
        r: int = _LORA["r"],
        alpha: float = _LORA["lora_alpha"],
        share: str = _LORA["share"],
        dropout: float = _LORA["lora_dropout"],
    ) -> None:
        super().__init__()
        from pluralign.settings import check_int

        LoraConfig.check_value("share", share)
        r = LoraConfig.check_value("r", r, name="LoRA rank r")
        n_users = check_int("n_users", n_users)  # type: ignore[assignment]  # not optional
        alpha = LoraConfig.check_value("lora_alpha", alpha, name="alpha")
        dropout = LoraConfig.check_value("lora_dropout", dropout, name="dropout")
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        if not targets:
            raise ConfigError("target_modules is empty")
        self.model = model
        self.n_users = int(n_users)
        self.r = int(r)
        self.alpha = float(alpha)
        self.share = share
        self.dropout = float(dropout)
        self.target_modules = targets
        self._router = _Router()
        for p in model.parameters():
            p.requires_grad_(False)
        matched = [
            (name, module)
            for name, module in model.named_modules()
            if name and _matches(name, targets)
        ]
        other = [(n, type(m).__name__) for n, m in matched if not isinstance(m, nn.Linear)]
        if other:
            raise ConfigError(
                f"target_modules {targets} match modules that are not nn.Linear: "
                f"{other[:5]}; name the linear layers inside them"
            )
        linear = [(n, m) for n, m in matched if isinstance(m, nn.Linear)]
        if not linear:
            available = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            )
            raise ConfigError(
                f"target_modules {targets} match no nn.Linear module of "
                f"{type(model).__name__}; its linear modules are named "
                f"{available}"
            )
        smallest = min(min(m.in_features, m.out_features) for _, m in linear)
        if self.r > smallest:
            # rank(B A) <= min(r, in, out): a larger r only adds parameters (and memory)
            raise ConfigError(
                f"LoRA rank r={self.r} is larger than min(in, out) = {smallest} "
                f"of the adapted layers; B·A cannot have a rank above that"
            )
        self.module_names: list[str] = []
        for name, module in linear:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(
                parent,
                child,
                MultiUserLoRALinear(
                    module,
                    n_users=self.n_users,
                    r=self.r,
                    alpha=self.alpha,
                    share=share,
                    dropout=self.dropout,
                    router=self._router,
                ),
            )
            self.module_names.append(name)

    def layers(self) -> Iterator[tuple[str, MultiUserLoRALinear]]:
        """``(module name, adapted layer)`` pairs, in model order."""
        for name in self.module_names:
            yield name, self.model.get_submodule(name)  # type: ignore[misc]  # an adapted layer

    @contextlib.contextmanager
    def route(self, user_index: torch.Tensor | None) -> Iterator[None]:
        """Forward passes inside this block use user ``user_index[i]`` for example ``i``."""
        if user_index is not None:
            user_index = torch.as_tensor(user_index, dtype=torch.long)
            # checked on CPU only: on an accelerator the check would synchronize every forward
            # (indices built by PersonalizedRewardModel are valid by construction)
            if (
                user_index.device.type == "cpu"
                and user_index.numel()
                and (int(user_index.min()) < 0 or int(user_index.max()) >= self.n_users)
            ):
                raise PluralignError(f"user index out of range [0, {self.n_users})")
        previous = self._router.index
        self._router.index = user_index
        try:
            yield
        finally:
            self._router.index = previous

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Forward passes inside this block skip every adapter: the frozen base model, i.e.
        the reference policy π0 of DPO without a second copy of the weights (PEFT's
        ``disable_adapter``)."""
        previous = self._router.enabled
        self._router.enabled = False
        try:
            yield
        finally:
            self._router.enabled = previous

    def forward(self, *args, user_index: torch.Tensor | None = None, **kwargs):
        with self.route(user_index):
            return self.model(*args, **kwargs)

    def add_user(self) -> int:
        """Add one user (factors start at the users' mean); returns its index."""
        for _, layer in self.layers():
            layer.add_user()
        self.n_users += 1
        return self.n_users - 1

    def lora_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """All LoRA factors, named ``"<module>.lora_A"`` / ``"<module>.lora_B"``."""
        for name, layer in self.layers():
            yield f"{name}.lora_A", layer.lora_A
            yield f"{name}.lora_B", layer.lora_B

    def user_parameters(self) -> Iterator[tuple[nn.Parameter, bool]]:
        """Each factor with whether it is per user (stacked over users)."""
        for _, layer in self.layers():
            yield layer.lora_A, layer.per_user_A
            yield layer.lora_B, layer.per_user_B


class TrainableState:
    """Checkpointing of a model's trainable tensors (LoRA factors, and a reward head), shared
    by :class:`~pluralign.llm.PersonalizedRewardModel` and
    :class:`~pluralign.llm.PersonalizedPolicy`; the class defines
    ``trainable_named_parameters()`` (an iterator of ``(name, parameter)``)."""

    trainable_named_parameters: Any

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the trainable tensors (what checkpoints hold)."""
        return {n: p.detach().cpu().clone() for n, p in self.trainable_named_parameters()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (names and shapes as :meth:`trainable_state`'s) into the model."""
        params = dict(self.trainable_named_parameters())
        missing = sorted(set(params) - set(state))
        if missing:
            raise PluralignError(f"checkpoint lacks {missing[:3]}")
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise PluralignError(
                    f"checkpoint tensor {name} has shape "
                    f"{tuple(state[name].shape)}, the model {tuple(p.shape)}"
                )
            with torch.no_grad():
                p.copy_(state[name].to(p.device, p.dtype))
