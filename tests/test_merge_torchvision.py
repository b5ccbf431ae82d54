"""Linearize + merge on torchvision architectures with random weights and BN statistics."""

from __future__ import annotations

import os
import random

import pytest
import torch
import torchvision

import depthcompress as dc
from tests.conftest import conv_count, random_plan, randomize_bn, rel_err

MODELS = [
    "vgg11_bn",
    "vgg19_bn",
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
]
# every architecture runs by default with VGG's 4096-wide head swapped for a small one (the head
# is no part of the conv chain; with it, merging vgg19_bn peaks at 6.7 GB); the slow run adds
# the VGGs as torchvision builds them
CASES = [
    *(pytest.param(name, False, id=name) for name in MODELS),
    *(
        pytest.param(
            name,
            True,
            id=f"{name}-full-head",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    not os.environ.get("DEPTHCOMPRESS_SLOW"),
                    reason="the full VGG head needs 7 GB: set DEPTHCOMPRESS_SLOW=1",
                ),
            ],
        )
        for name in MODELS
        if name.startswith("vgg")
    ),
]


def build(name: str, full_head: bool) -> torch.nn.Module:
    """torchvision's NAME, random weights; a VGG gets a 10-class linear head unless full_head."""
    model = torchvision.models.get_model(name, weights=None)
    if not full_head and isinstance(model, torchvision.models.VGG):
        model.classifier = torch.nn.Linear(512 * 7 * 7, 10)
    return model


@pytest.mark.parametrize(("name", "full_head"), CASES)
def test_identity_and_random_plans_merge_exactly(name: str, full_head: bool) -> None:
    torch.manual_seed(0)
    model = randomize_bn(build(name, full_head)).eval()
    x = torch.randn(2, 3, 64, 64)
    chain = dc.trace(model, x)
    with torch.no_grad():
        expected = model(x)

    identity = dc.Plan.identity(chain)
    linear = dc.linearize(model, chain, identity)
    merged = dc.merge(linear, chain, identity)
    with torch.no_grad():
        assert rel_err(expected, linear.eval()(x)) <= 1e-4
        assert rel_err(expected, merged(x)) <= 1e-4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in merged.modules())
    assert conv_count(merged) == conv_count(model)

    rng = random.Random(name)
    for _ in range(3):
        plan = random_plan(chain, rng)
        linear = dc.linearize(model, chain, plan).eval()
        merged = dc.merge(linear, chain, plan, verify=False)
        with torch.no_grad():
            assert rel_err(linear(x), merged(x)) <= 1e-4, plan
        if any(j - i > 1 for i, j in plan.blocks):
            assert conv_count(merged) < conv_count(model)


def test_identity_plan_in_reference_setting_is_the_original_function():
    model = randomize_bn(torchvision.models.mobilenet_v2()).eval()
    x = torch.randn(2, 3, 96, 96)
    chain = dc.trace(model, x, mode="reference", exclude=["features.0", "features.18"])
    linear = dc.linearize(model, chain, dc.Plan.identity(chain)).eval()
    with torch.no_grad():
        assert rel_err(model(x), linear(x)) <= 1e-5
