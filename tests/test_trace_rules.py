"""Tracing rules beyond the plain chain: identity-like skip branches, BatchNorm after an
activation, and boundary messages that name their cause."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthcompress as dc
from depthcompress.linearization import fused_residuals
from tests.conftest import conv_count, random_plan, randomize_bn, rel_err

# ---------------------------------------------------------------------------------------------
# identity-like modules on a residual skip


def skip_module(spelling: str) -> nn.Module | None:
    """What the skip of an identity residual goes through, per spelling of the same net."""
    if spelling == "bare":
        return None
    if spelling == "identity":
        return nn.Identity()
    return nn.Sequential(nn.Identity(), nn.Dropout(0.3), nn.Dropout2d(0.2), nn.AlphaDropout(0.1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, spelling: str) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = skip_module(spelling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + skip)


class SmallResNet(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = BasicBlock(8, 8, 1, spelling)
        self.block2 = BasicBlock(8, 16, 2, spelling)
        self.block3 = BasicBlock(16, 16, 1, spelling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block3(self.block2(self.block1(F.relu(self.stem(x)))))


def resnet(spelling: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(SmallResNet(spelling), seed=1).eval()


def chain_summary(chain: dc.ConvChain) -> tuple:
    residuals = [(r.start, r.end, r.shortcut, r.shortcut_bn, r.fusable) for r in chain.residuals]
    return chain.positions, residuals, dict(chain.barriers), chain.blocks


@pytest.mark.parametrize("spelling", ["identity", "chain"])
def test_identity_like_skip_traces_like_a_bare_skip(spelling):
    x = torch.randn(1, 3, 16, 16)
    bare = dc.trace(resnet("bare"), x)
    other = dc.trace(resnet(spelling), x)
    assert not other.barriers
    assert [(r.start, r.end) for r in other.residuals] == [(1, 3), (3, 5), (5, 7)]
    assert chain_summary(other) == chain_summary(bare)


@pytest.mark.parametrize("spelling", ["identity", "chain"])
def test_identity_like_skip_merges_like_a_bare_skip(spelling):
    x = torch.randn(2, 3, 16, 16)
    bare_model, other_model = resnet("bare"), resnet(spelling)
    other_model.load_state_dict(bare_model.state_dict())
    chain = dc.trace(bare_model, x)
    assert chain.is_valid_block(0, 3) and chain.is_valid_block(3, 7)
    rng = random.Random(5)
    plans = [dc.Plan(activations=frozenset(), boundaries=frozenset({3, 7}))]
    plans += [random_plan(chain, rng) for _ in range(3)]
    for plan in plans:
        merged = []
        for model in (bare_model, other_model):
            linear = dc.linearize(model, chain, plan).eval()
            out = dc.merge(linear, chain, plan, verify=True)
            with torch.no_grad():
                assert rel_err(linear(x), out(x)) <= 1e-4, plan
            kept = [
                r for r in chain.residuals if r.shortcut and r not in fused_residuals(chain, plan)
            ]
            assert conv_count(out) == len(plan.blocks) + len(kept)
            merged.append(out)
        with torch.no_grad():
            assert rel_err(merged[0](x), merged[1](x)) <= 1e-4, plan


# ---------------------------------------------------------------------------------------------
# BatchNorm after the activation (Conv → ReLU → BN → Conv)


class ConvertedBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass, as converters from other frameworks define them."""


class PostActVGG(nn.Module):
    """Six convs, each followed by ReLU then BN (some of them a subclass), one stride 2."""

    def __init__(self) -> None:
        super().__init__()
        # (in, out, kernel, padding, stride)
        spec = [(3, 8, 3, 1, 1), (8, 8, 3, 0, 1), (8, 16, 3, 1, 2), (16, 16, 1, 0, 1)]
        spec += [(16, 16, 3, 1, 1), (16, 16, 3, 1, 1)]
        layers: list[nn.Module] = []
        for k, (cin, cout, size, pad, stride) in enumerate(spec):
            bn = ConvertedBN(cout) if k % 2 else nn.BatchNorm2d(cout)
            layers += [nn.Conv2d(cin, cout, size, stride, pad), nn.ReLU(inplace=True), bn]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def post_act_vgg() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(PostActVGG(), seed=2).eval()


def test_batchnorm_after_activation_belongs_to_its_position():
    chain = dc.trace(post_act_vgg(), torch.randn(1, 3, 20, 20))
    assert chain.num_positions == 6
    assert not chain.barriers
    assert chain.activation_positions == (1, 2, 3, 4, 5, 6)
    # the last BN feeds the head, not a conv: it stays after the chain
    posts = ["features.2", "features.5", "features.8", "features.11", "features.14", None]
    assert [p.post_bn for p in chain.positions[1:]] == posts
    assert chain.is_valid_block(0, 6)
    assert chain.positions[1].out_node == "features_2"


def test_batchnorm_after_activation_merges_exactly():
    model = post_act_vgg()
    x = torch.randn(3, 3, 20, 20)
    chain = dc.trace(model, x)
    n = chain.num_positions
    keep_all = dc.Plan.identity(chain)
    plans = [
        keep_all,
        dc.Plan(activations=frozenset(), boundaries=frozenset({n})),
        dc.Plan(activations=frozenset(), boundaries=frozenset(range(1, n + 1))),
        dc.Plan(activations=frozenset({2}), boundaries=frozenset({2, 4, n})),
    ]
    rng = random.Random(3)
    plans += [random_plan(chain, rng) for _ in range(4)]
    with torch.no_grad():
        expected = model(x)
    for plan in plans:
        linear = dc.linearize(model, chain, plan).eval()
        merged = dc.merge(linear, chain, plan, verify=True)
        with torch.no_grad():
            assert rel_err(linear(x), merged(x)) <= 1e-4, plan
            if plan == keep_all:
                assert rel_err(expected, linear(x)) <= 1e-5
                assert rel_err(expected, merged(x)) <= 1e-4
        assert conv_count(merged) == len(plan.blocks)
        standalone = sum(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
        # a BN after a kept activation stays; after a removed one it is folded into the conv
        assert standalone == len(plan.activations), plan


class PostBNResidual(nn.Module):
    """A residual whose add is followed by ReLU then BN, and one skip that reads a BN output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.b3 = nn.BatchNorm2d(8)
        self.post = nn.BatchNorm2d(8)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.shared = nn.BatchNorm2d(8)
        self.c5 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        y = self.b3(self.c3(F.relu(self.b2(self.c2(x)))))
        x = self.post(F.relu(x + y))
        x = self.shared(F.relu(self.c4(x)))
        return self.c5(x) + x


def test_batchnorm_after_a_residual_add_merges_exactly():
    torch.manual_seed(1)
    model = randomize_bn(PostBNResidual(), seed=4).eval()
    x = torch.randn(2, 3, 12, 12)
    chain = dc.trace(model, x)
    assert [(r.start, r.end) for r in chain.residuals] == [(1, 3), (4, 5)]
    assert chain.positions[3].post_bn == "post"
    assert chain.positions[4].post_bn is None  # it also feeds the skip of c5
    assert chain.barriers == {
        4: "a BatchNorm2d (shared) lies between position 4 and conv c5 "
        "(and add() (add_1) also reads it)"
    }
    rng = random.Random(0)
    covers = [
        frozenset(b) | {4, 5}
        for r in range(4)
        for b in itertools.combinations(range(1, 4), r)
        if dc.Plan(activations=frozenset(), boundaries=frozenset(b) | {4, 5}).blocks
    ]
    plans = []
    for bounds in covers:
        plan = dc.Plan(activations=frozenset(), boundaries=bounds)
        try:
            plan.validate(chain)
        except dc.PlanError:
            continue
        acts = [p for p in bounds if rng.random() < 0.5 and p in chain.activation_positions]
        plans += [plan, dc.Plan(activations=frozenset(acts), boundaries=bounds)]
    assert len(plans) >= 8
    for plan in plans:
        linear = dc.linearize(model, chain, plan).eval()
        merged = dc.merge(linear, chain, plan, verify=True)
        with torch.no_grad():
            assert rel_err(linear(x), merged(x)) <= 1e-4, plan


# ---------------------------------------------------------------------------------------------
# boundary messages


class PoolBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
            nn.BatchNorm2d(4), nn.AvgPool2d(2), nn.Conv2d(4, 4, 1),
        )  # fmt: skip
        self.c4 = nn.Conv2d(4, 4, 1)
        self.side = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        y = self.c4(F.max_pool2d(y, 2))
        return torch.cat([y.flatten(1), self.side(x).flatten(1)], 1), y.mean()


def test_boundary_messages_name_what_lies_between():
    chain = dc.trace(PoolBetween(), torch.randn(1, 3, 24, 24))
    assert [p.conv for p in chain.positions[1:]] == [
        "features.0", "features.3", "features.7", "c4", "side",
    ]  # fmt: skip
    assert chain.barriers == {
        1: "a MaxPool2d (features.2) lies between position 1 and conv features.3",
        2: "a BatchNorm2d (features.5) and an AvgPool2d (features.6) lie between position 2 "
        "and conv features.7",
        3: "max_pool2d() (max_pool2d) lies between position 3 and conv c4",
        4: "conv side reads the network input 'x', not position 4: it does not continue the "
        "chain of convs before it",
    }


class FanOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.relu(self.c1(x))
        z = F.relu(self.c2(y))
        return self.c3(z), self.head(y).mean() + z.sum()


def test_fan_out_message_names_the_other_readers():
    chain = dc.trace(FanOut(), torch.randn(1, 3, 8, 8), exclude=["head"])
    assert chain.barriers == {
        1: "position 1 also feeds a Conv2d (head) besides conv c2: a block through it would "
        "lose that tensor",
        2: "position 2 also feeds .sum() (sum_1) besides conv c3: a block through it would "
        "lose that tensor",
    }


def test_batchnorm_after_an_unmergeable_conv_folds_into_its_copy():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, padding=1, groups=2, dilation=1), nn.ReLU(), nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
    )  # fmt: skip
    model = randomize_bn(model, seed=5).eval()
    x = torch.randn(2, 3, 10, 10)
    chain = dc.trace(model, x)
    assert set(chain.barriers) == {1} and "reflect" in chain.barriers[1]
    assert [p.post_bn for p in chain.positions[1:]] == ["2", "5", None]
    for acts in (set(), {1}, {1, 2}):
        for bounds in ({1, 3}, {1, 2, 3}):
            plan = dc.Plan(activations=frozenset(acts & bounds), boundaries=frozenset(bounds))
            linear = dc.linearize(model, chain, plan).eval()
            merged = dc.merge(linear, chain, plan, verify=True)
            assert merged.get_submodule("depthcompress_block_0_1").padding_mode == "reflect"
            standalone = sum(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
            assert standalone == len(plan.activations), plan
