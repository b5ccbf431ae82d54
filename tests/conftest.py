"""Shared test helpers: randomised BN statistics, random valid plans, paths to shared data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

import depthcompress as dc

SHARED = Path(__file__).resolve().parents[2] / "shared"

# One intra-op thread per test process, and for the processes the tests start (torchrun,
# importance workers, the latency CLI): processes × threads stay within a shared 2-core machine,
# and OpenMP never spins threads against a busy neighbour.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                mod.running_var.copy_(torch.rand(n, generator=gen) * 0.8 + 0.4)
                mod.weight.copy_(torch.rand(n, generator=gen) * 0.6 + 0.7)
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


def random_plan(chain: dc.ConvChain, rng: random.Random, max_convs: int = 4) -> dc.Plan:
    """A random valid plan: walk from 0 through random valid blocks of at most max_convs convs."""
    valid = set(chain.blocks)
    cur, ends = 0, set()
    while cur < chain.num_positions:
        top = min(chain.num_positions, cur + max_convs)
        choices = [j for j in range(cur + 1, top + 1) if (cur, j) in valid]
        cur = rng.choice(choices)
        ends.add(cur)
    kept = {p for p in ends if rng.random() < 0.6}
    return dc.Plan(activations=frozenset(kept), boundaries=frozenset(ends))


def conv_count(model: torch.nn.Module) -> int:
    """Number of Conv2d modules in a model."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def rel_err(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Max abs error relative to the expected output's scale."""
    return ((expected - actual).abs().max() / expected.abs().max()).item()


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared (reference tables) is not beside the repository")
    return SHARED
