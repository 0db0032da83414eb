"""MultiUserLoRA against merged weights and against PEFT's LoRA (the oracles)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pluralign.errors import ConfigError, PluralignError
from pluralign.llm import SHARE_MODES, MultiUserLoRA, MultiUserLoRALinear

U, R, D_IN, D_OUT = 5, 3, 12, 7


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D_IN, 16)
        self.act = nn.Tanh()
        self.out = nn.Linear(16, D_OUT)

    def forward(self, x):
        return self.out(self.act(self.proj(x)))


def _randomize(lora: MultiUserLoRA, seed: int = 0) -> None:
    """Non-zero factors everywhere (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _merged_forward(base: Net, lora: MultiUserLoRA, x: torch.Tensor, users: list[int]):
    """The oracle: for each example, a copy of the net with W + (α/r) B_u A_u merged in."""
    outs = []
    for i, u in enumerate(users):
        net = copy.deepcopy(base)
        with torch.no_grad():
            for name, layer in lora.layers():
                net.get_submodule(name).weight += layer.delta_weight(u)
        outs.append(net(x[i : i + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("share", SHARE_MODES)
def test_mixed_batch_equals_merged_weights_per_user(share):
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    lora = MultiUserLoRA(model, U, ["proj", "out"], r=R, alpha=6.0, share=share)
    _randomize(lora)
    users = [0, 3, 1, 3, 4, 2, 0]
    x = torch.randn(len(users), 4, D_IN)  # (batch, tokens, in)
    got = lora(x, user_index=torch.tensor(users))
    want = _merged_forward(base, lora, x, users)
    assert torch.allclose(got, want, atol=1e-5)
    if share != "pooled":  # users really differ
        assert not torch.allclose(got[0], lora(x[:1], user_index=torch.tensor([1]))[0])


@pytest.mark.parametrize(
    "share,a_users,b_users", [("B", U, 1), ("A", 1, U), ("independent", U, U), ("pooled", 1, 1)]
)
def test_factor_shapes_and_zero_init(share, a_users, b_users):
    torch.manual_seed(1)
    base = Net()
    model = copy.deepcopy(base)
    lora = MultiUserLoRA(model, U, ["proj"], r=R, share=share)
    layer = model.proj
    assert isinstance(layer, MultiUserLoRALinear)
    assert layer.lora_A.shape == (a_users, R, D_IN)
    assert layer.lora_B.shape == (b_users, 16, R)
    assert torch.count_nonzero(layer.lora_B) == 0  # the factor applied last starts at zero
    assert torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(3, D_IN)
    assert torch.equal(lora(x, user_index=torch.tensor([0, 4, 2])), base(x))
    # the base weights are frozen, the factors are trainable
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for _, p in lora.lora_parameters())


def test_same_as_peft_lora_per_user():
    """PEFT as the LoRA oracle: per-user factors copied into PEFT adapters give the same
    outputs, user by user, as one mixed batch through MultiUserLoRA (share='independent')."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    base = Net()
    model = copy.deepcopy(base)
    lora = MultiUserLoRA(model, 3, ["proj", "out"], r=R, alpha=5.0, share="independent")
    _randomize(lora, seed=3)
    config = LoraConfig(r=R, lora_alpha=5.0, target_modules=["proj", "out"])
    peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name="u0")
    for u in (1, 2):
        peft_model.add_adapter(f"u{u}", config)
    with torch.no_grad():
        for name, layer in lora.layers():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            for u in range(3):
                a, b = layer.user_factors(u)
                peft_layer.lora_A[f"u{u}"].weight.copy_(a)
                peft_layer.lora_B[f"u{u}"].weight.copy_(b)
    peft_model.eval()
    users = [2, 0, 1, 1, 2]
    x = torch.randn(len(users), D_IN)
    ours = lora(x, user_index=torch.tensor(users))
    for i, u in enumerate(users):
        peft_model.set_adapter(f"u{u}")
        with torch.no_grad():
            assert torch.allclose(ours[i], peft_model(x[i : i + 1])[0], atol=1e-6)


def test_gradients_reach_only_users_in_the_batch():
    torch.manual_seed(4)
    model = Net()
    lora = MultiUserLoRA(model, U, ["proj"], r=R, share="B")
    _randomize(lora)
    x = torch.randn(4, D_IN)
    lora(x, user_index=torch.tensor([1, 1, 3, 1])).sum().backward()
    grad = model.proj.lora_A.grad
    assert grad is not None
    norms = grad.flatten(1).norm(dim=1)
    assert norms[1] > 0 and norms[3] > 0
    assert torch.all(norms[[0, 2, 4]] == 0)
    assert model.proj.lora_B.grad.abs().sum() > 0  # the shared factor learns from everyone


def test_dropout_only_on_the_low_rank_path_and_off_in_eval():
    torch.manual_seed(5)
    base = Net()
    model = copy.deepcopy(base)
    lora = MultiUserLoRA(model, 2, ["proj"], r=R, share="B", dropout=0.5)
    x = torch.randn(6, D_IN)
    idx = torch.tensor([0, 1, 0, 1, 0, 1])
    lora.train()
    # B = 0: the low-rank path is zero, dropout on its input cannot change the output
    assert torch.equal(lora(x, user_index=idx), base(x))
    _randomize(lora)
    first, second = lora(x, user_index=idx), lora(x, user_index=idx)
    assert not torch.allclose(first, second)  # dropout is active in training
    lora.eval()
    assert torch.equal(lora(x, user_index=idx), lora(x, user_index=idx))
    reference = copy.deepcopy(base)
    no_dropout = MultiUserLoRA(reference, 2, ["proj"], r=R, share="B", dropout=0.0)
    with torch.no_grad():
        for (_, p), (_, q) in zip(
            no_dropout.lora_parameters(), lora.lora_parameters(), strict=True
        ):
            p.copy_(q)
    assert torch.allclose(lora(x, user_index=idx), no_dropout(x, user_index=idx))


@pytest.mark.parametrize("share", ["B", "A", "independent"])
def test_add_user_starts_at_the_mean_and_keeps_the_others(share):
    torch.manual_seed(6)
    model = Net()
    lora = MultiUserLoRA(model, 3, ["proj"], r=R, share=share)
    _randomize(lora)
    before = [model.proj.delta_weight(u).clone() for u in range(3)]
    mean_a = model.proj.lora_A.data.mean(0)
    mean_b = model.proj.lora_B.data.mean(0)
    assert lora.add_user() == 3
    for u in range(3):
        assert torch.equal(model.proj.delta_weight(u), before[u])
    a, b = model.proj.user_factors(3)
    if model.proj.per_user_A:
        assert torch.allclose(a, mean_a)
    if model.proj.per_user_B:
        assert torch.allclose(b, mean_b)


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"match no nn.Linear.*\['out', 'proj'\]"):
        MultiUserLoRA(Net(), 2, ["q_proj"])
    with pytest.raises(ConfigError, match=r"not nn.Linear.*Tanh"):
        MultiUserLoRA(Net(), 2, ["act"])
    with pytest.raises(ConfigError, match="share must be one of"):
        MultiUserLoRA(Net(), 2, ["proj"], share="C")
    with pytest.raises(ConfigError, match="rank"):
        MultiUserLoRA(Net(), 2, ["proj"], r=0)
    lora = MultiUserLoRA(Net(), 2, ["proj"], share="B")
    with pytest.raises(PluralignError, match="out of range"):
        lora(torch.randn(1, D_IN), user_index=torch.tensor([2]))
    with pytest.raises(PluralignError, match="without user indices"):
        lora(torch.randn(1, D_IN))
    with pytest.raises(PluralignError, match="2 entries for a batch of 3"):
        lora(torch.randn(3, D_IN), user_index=torch.tensor([0, 1]))
    pooled = MultiUserLoRA(Net(), 2, ["proj"], share="pooled")
    assert pooled(torch.randn(3, D_IN)).shape == (3, D_OUT)  # pooled needs no users
