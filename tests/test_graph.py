"""Tracing: positions, activations, residuals, boundaries and valid blocks."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import depthcompress as dc


def mbv2_reference() -> dc.ConvChain:
    model = torchvision.models.mobilenet_v2()
    return dc.trace(
        model,
        torch.randn(1, 3, 224, 224),
        mode="reference",
        exclude=["features.0", "features.18"],
    )


def test_mobilenet_v2_reference_blocks_match_paper_table(shared):
    chain = mbv2_reference()
    path = shared / "reference" / "kim2023_mbv2_w1.0_rtx2080ti_trt_time.csv"
    with path.open() as f:
        ref = [(int(r["st"]), int(r["end"])) for r in csv.DictReader(f)]
    assert len(ref) == 171
    assert list(chain.blocks) == ref
    assert chain.num_positions == 50
    assert sorted(chain.barriers) == [5, 11, 20, 41]
    assert [(r.start, r.end) for r in chain.residuals] == [
        (5, 8), (11, 14), (14, 17), (20, 23), (23, 26), (26, 29),
        (32, 35), (35, 38), (41, 44), (44, 47),
    ]  # fmt: skip
    assert chain.linear_positions == tuple(range(2, 51, 3))
    assert len(chain.activation_positions) == 33
    assert chain.insert_activation == "relu6"


def test_mobilenet_v2_general_mode_allows_more():
    model = torchvision.models.mobilenet_v2()
    x = torch.randn(1, 3, 224, 224)
    ref = dc.trace(model, x, mode="reference", exclude=["features.0", "features.18"])
    gen = dc.trace(model, x, mode="general", exclude=["features.0", "features.18"])
    assert set(ref.blocks) < set(gen.blocks)
    assert not gen.barriers
    for i, j in gen.blocks:
        assert max(gen.geometry(i, j).kernel) <= 15
    unlimited = dc.trace(model, x, max_kernel_size=None, exclude=["features.0", "features.18"])
    assert len(unlimited.blocks) > len(gen.blocks)


def test_vgg19_bn_gives_36_blocks():
    chain = dc.trace(torchvision.models.vgg19_bn(), torch.randn(1, 3, 64, 64), mode="reference")
    assert chain.num_positions == 16
    assert len(chain.blocks) == 36
    assert sorted(chain.barriers) == [2, 4, 8, 12]
    assert chain.activation_positions == tuple(range(1, 17))


def test_block_geometry_matches_reference_kernel_growth():
    chain = mbv2_reference()
    geo = chain.geometry(20, 41)  # seven 3x3 depthwise convs, the last with stride 2
    assert geo.kernel == (15, 15)
    assert geo.stride == (2, 2)
    assert geo.padding == (7, 7)
    assert geo.groups == 1
    assert (geo.in_channels, geo.out_channels) == (64, 160)
    single = chain.geometry(1, 2)
    assert single.kernel == (1, 1) and single.groups == 1
    dw = chain.geometry(3, 4)
    assert dw.groups == 96 and dw.stride == (2, 2)


class Functional(nn.Module):
    """Functional activations, a residual with a projection shortcut and a max-pool boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 16, 1)
        self.proj = nn.Conv2d(8, 16, 1, bias=False)
        self.c4 = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.c5 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.c1(x))
        y = torch.relu(self.b2(self.c2(x)))
        y = self.c3(y)
        x = F.hardswish(self.proj(x) + y)
        x = F.max_pool2d(self.c4(x), 2)
        return F.gelu(self.c5(x))


def test_functional_forms_shortcut_and_hard_boundaries():
    chain = dc.trace(Functional(), torch.randn(1, 3, 16, 16))
    assert chain.num_positions == 5
    acts = {p.index: p.activation for p in chain.positions[1:]}
    assert acts == {1: "relu6", 2: "relu", 3: "hardswish", 4: None, 5: "gelu"}
    (res,) = chain.residuals
    assert (res.start, res.end, res.shortcut) == (1, 3, "proj")
    assert res.fusable
    assert chain.positions[2].bn == "b2"
    # reflect padding cannot merge: boundaries on both sides; max-pool: boundary after c4
    assert set(chain.barriers) == {3, 4}
    assert "reflect" in chain.barriers[3]
    assert (1, 3) in chain.blocks and (0, 3) in chain.blocks
    assert (1, 2) in chain.blocks and (0, 2) not in chain.blocks  # would cut the residual
    assert (2, 4) not in chain.blocks and (3, 4) in chain.blocks


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.dw(F.relu(self.c1(x))))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return torch.cat([self.c2(y * s), x], 1)


def test_squeeze_excitation_and_concat_are_boundaries():
    chain = dc.trace(SqueezeExcite(), torch.randn(1, 4, 8, 8))
    names = [p.conv for p in chain.positions[1:]]
    assert names == ["c1", "dw", "fc1", "fc2", "c2"]
    assert (0, 2) in chain.blocks
    assert set(chain.barriers) == {2, 4}  # dw output fans out to the SE; fc2 feeds a gate
    assert chain.barriers[2].startswith(".mean() (mean) lies between position 2 and conv fc1")
    plan = dc.Plan.identity(chain)
    model = SqueezeExcite().eval()
    merged = dc.merge(dc.linearize(model, chain, plan), chain, plan)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-4)


def test_trace_does_not_modify_the_model():
    model = torchvision.models.resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dc.trace(model, torch.randn(2, 3, 32, 32))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_chain_json_is_plain_data():
    import json

    chain = dc.trace(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    data = json.loads(chain.to_json())
    assert data["num_positions"] == chain.num_positions
    assert [tuple(b) for b in data["blocks"]] == list(chain.blocks)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_model_names_the_module_and_the_fix():
    with pytest.raises(dc.TraceError) as err:
        dc.trace(DataDependent(), torch.randn(1, 3, 8, 8))
    assert "'gate' (Gate)" in str(err.value)
    assert "leaf_modules=['gate']" in str(err.value)
    chain = dc.trace(DataDependent(), torch.randn(1, 3, 8, 8), leaf_modules=["gate"])
    assert chain.num_positions == 1


def test_model_without_convolutions():
    with pytest.raises(dc.NoConvolutionError, match=r"no nn\.Conv2d"):
        dc.trace(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))
    with pytest.raises(dc.DepthCompressError, match="excluded"):
        dc.trace(nn.Sequential(nn.Conv2d(3, 3, 1)), torch.randn(1, 3, 2, 2), exclude=["0"])


def test_bad_trace_arguments():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    with pytest.raises(dc.TraceError, match="4-D tensor"):
        dc.trace(model, torch.randn(3, 4))
    with pytest.raises(dc.TraceError, match="mode"):
        dc.trace(model, torch.randn(1, 3, 4, 4), mode="fast")
    with pytest.raises(dc.TraceError, match="not submodules"):
        dc.trace(model, torch.randn(1, 3, 4, 4), exclude=["stem"])
    with pytest.raises(dc.TraceError, match="failed"):
        dc.trace(model, torch.randn(1, 5, 4, 4))
