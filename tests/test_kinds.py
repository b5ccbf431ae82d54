"""The registry of layer kinds: subclasses keeping their forward are recognised, subclasses that
override it are not taken for the base op, registrations extend it and are undone cleanly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthcompress as dc
from depthcompress.kinds import make_activation
from tests.conftest import conv_count, rel_err

X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))


class KeptConv(nn.Conv2d):
    """A user's Conv2d subclass that keeps nn.Conv2d's forward."""


class SameConv(nn.Conv2d):
    """timm's Conv2dSame: pads TensorFlow-style (more after than before), then convolves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride)


class CheckedConv(nn.Conv2d):
    """Overrides forward but computes exactly nn.Conv2d's: fit for register_conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class DropPath(nn.Module):
    """Stochastic depth, identity in eval mode; its test of the batch size defeats torch.fx."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 or not self.training:
            return x
        return x * (torch.rand(x.shape[0], 1, 1, 1) > 0.1)


class Net(nn.Module):
    """conv → BN → act, three times; ``middle`` is the second conv, ``norm`` the BN class."""

    def __init__(
        self, middle: type[nn.Conv2d] = nn.Conv2d, norm: type[nn.Module] = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = norm(8)
        self.a1 = nn.ReLU()
        self.c2 = middle(
            8, 8, 2 if middle is SameConv else 3, padding=0 if middle is SameConv else 1
        )
        self.b2 = norm(8)
        self.a2 = nn.ReLU()
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a1(self.b1(self.c1(x)))
        return self.c3(self.a2(self.b2(self.c2(x))))


def randomized(model: nn.Module) -> nn.Module:
    """Random running statistics for every batch norm kind (SyncBatchNorm included), eval mode."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.2, generator=gen)
                mod.running_var.uniform_(0.4, 1.2, generator=gen)
                mod.weight.uniform_(0.7, 1.3, generator=gen)
    return model.eval()


def merged_in_one(model: nn.Module) -> tuple[dc.ConvChain, nn.Module]:
    """Trace, drop every activation, merge: the chain and the merged network (checked exact)."""
    chain = dc.trace(model, X)
    plan = dc.Plan(activations=frozenset(), boundaries=frozenset({chain.num_positions}))
    merged = dc.merge(dc.linearize(model, chain, plan), chain, plan)
    return chain, merged


def test_conv2d_subclass_keeping_forward_is_a_position_and_merges_exactly():
    model = randomized(Net(middle=KeptConv))
    chain, merged = merged_in_one(model)
    assert [p.conv for p in chain.positions[1:]] == ["c1", "c2", "c3"]
    assert not chain.barriers
    linear = dc.linearize(model, chain, dc.Plan.identity(chain)).eval()
    with torch.no_grad():
        assert rel_err(model(X), linear(X)) <= 1e-5
    assert conv_count(merged) == 1


def test_conv2d_subclass_overriding_forward_is_a_boundary_that_says_how_to_register():
    model = randomized(Net(middle=SameConv))
    chain = dc.trace(model, X)
    assert [p.conv for p in chain.positions[1:]] == ["c1", "c3"]
    (reason,) = chain.barriers.values()
    assert "SameConv (c2)" in reason and "overrides forward" in reason
    assert "depthcompress.register_conv(SameConv)" in reason
    with pytest.raises(dc.NoConvolutionError, match=r"register_conv\(SameConv\)"):
        dc.trace(nn.Sequential(SameConv(3, 4, 2), nn.ReLU()), X)
    plan = dc.Plan.identity(chain)
    merged = dc.merge(dc.linearize(model, chain, plan), chain, plan)
    with torch.no_grad():
        assert rel_err(model(X), merged(X)) <= 1e-4


def test_registered_conv_with_its_own_forward_is_a_position():
    model = randomized(Net(middle=CheckedConv))
    assert [p.conv for p in dc.trace(model, X).positions[1:]] == ["c1", "c3"]
    with dc.register_conv(CheckedConv):
        chain, merged = merged_in_one(model)
    assert [p.conv for p in chain.positions[1:]] == ["c1", "c2", "c3"]
    assert conv_count(merged) == 1


def test_sync_batchnorm_after_a_conv_is_folded_and_merges_exactly():
    model = randomized(Net(norm=nn.SyncBatchNorm))  # eval mode: no process group needed on CPU
    chain, merged = merged_in_one(model)
    assert [(p.conv, p.bn) for p in chain.positions[1:]] == [
        ("c1", "b1"),
        ("c2", "b2"),
        ("c3", None),
    ]
    assert not chain.barriers
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in merged.modules())
    linear = dc.linearize(model, chain, dc.Plan.identity(chain)).eval()
    identity = dc.merge(linear, chain, dc.Plan.identity(chain))
    with torch.no_grad():
        assert rel_err(model(X), identity(X)) <= 1e-4


def test_registered_activation_is_found_and_inserted():
    model = randomized(Net())
    model.a1 = model.a2 = Swish()
    before = dc.trace(model, X)
    assert before.activation_positions == ()
    with dc.register_activation(Swish, kind="swish"):
        chain = dc.trace(model, X)
        assert [p.activation for p in chain.positions[1:]] == ["swish", "swish", None]
        assert chain.insert_activation == "swish"
        assert isinstance(make_activation("swish"), Swish)
    assert dc.trace(model, X) == before
    assert isinstance(make_activation("swish"), nn.ReLU)  # unknown kinds fall back to ReLU


def test_activation_registered_under_a_known_kind_keeps_that_kinds_module():
    with dc.register_activation(Swish, kind="relu"):
        assert type(make_activation("relu")) is nn.ReLU


def test_registered_passthrough_lets_a_tail_through():
    model = Net()
    model.b1 = nn.Sequential(nn.BatchNorm2d(8), DropPath())  # conv → BN → drop path → ReLU
    model = randomized(model)
    with pytest.raises(dc.TraceError, match="DropPath"):
        dc.trace(model, X)
    with dc.register_passthrough(DropPath):
        chain, merged = merged_in_one(model)
    assert not chain.barriers
    assert chain.positions[1].tail_node == "b1_1"
    assert conv_count(merged) == 1


def test_registrations_are_undone_without_leaking():
    with dc.registry_restored():
        dc.register_conv(CheckedConv)
        dc.register_activation(torch.tanh, kind="tanh")
        dc.register_activation("tanh")
    model = randomized(Net(middle=CheckedConv))
    assert len(dc.trace(model, X).positions) == 3
    reg = dc.register_passthrough(DropPath)
    reg.remove()
    reg.remove()  # a second remove does nothing
    with dc.register_activation(nn.Tanh, kind="tanh") as outer:
        with dc.register_activation(nn.Tanh, kind="tanhish"):
            pass
        assert outer.table[nn.Tanh] == "tanh"
    assert nn.Tanh not in outer.table


def test_register_rejects_what_it_cannot_use():
    with pytest.raises(dc.DepthCompressError, match="subclass of Conv2d"):
        dc.register_conv(nn.Linear)
    with pytest.raises(dc.DepthCompressError, match="subclass of Module"):
        dc.register_batchnorm(int)
