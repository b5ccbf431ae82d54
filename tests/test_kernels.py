"""Pure merge math of ``depthcompress.kernels`` (ALGORITHM.md §2, §3, §10.1–§10.2).

Everything runs in float64 against plain ``F.conv2d`` references: a chain with its padding moved to
the front (first conv padded by ``front_padding``, the rest unpadded) must equal the single merged
conv to 1e-10, with the original chain's output shape.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import nn

from depthcompress.kernels import (
    ConvSpec,
    add_shortcut,
    compose,
    expand_dilation,
    fold_bn,
    front_padding,
    merge_chain,
    pair,
    regroup,
    spec_from_conv,
    to_conv2d,
    to_dense,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs: one intra-op thread avoids OpenMP hand-off costs on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


F64_TOL = 1e-10
SETTINGS = {
    "derandomize": True,
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow],
}


# ---------------------------------------------------------------------------------------------
# helpers


def make_conv(
    cin: int,
    cout: int,
    kernel: tuple[int, int],
    *,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    bias: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Conv2d:
    """A Conv2d with seeded random weights (and bias) of unit-ish scale."""
    conv = nn.Conv2d(
        cin,
        cout,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
    ).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=dtype) / fan_in**0.5)
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=gen, dtype=dtype))
    return conv


def make_bn(channels: int, *, eps: float, seed: int, dtype: torch.dtype = torch.float64):
    """An eval-mode BatchNorm2d with random running statistics and affine parameters."""
    bn = nn.BatchNorm2d(channels, eps=eps).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen, dtype=dtype))
        bn.running_var.copy_(torch.rand(channels, generator=gen, dtype=dtype) * 2 + 0.05)
        bn.weight.copy_(torch.randn(channels, generator=gen, dtype=dtype))
        bn.bias.copy_(torch.randn(channels, generator=gen, dtype=dtype))
    return bn


def run_spec(spec: ConvSpec, x: torch.Tensor) -> torch.Tensor:
    """Apply a ConvSpec with F.conv2d (its own padding, no dilation)."""
    return F.conv2d(
        x, spec.weight.to(x.dtype), spec.bias.to(x.dtype), spec.stride, spec.padding, 1, spec.groups
    )


def run_layer(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, x, padding) -> torch.Tensor:
    """``conv`` (with ``padding`` instead of its own) followed by the eval ``bn``."""
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)
    return bn(y) if bn is not None else y


def run_original(layers, x: torch.Tensor) -> torch.Tensor:
    """The chain as built: every conv with its own padding."""
    for conv, bn in layers:
        x = run_layer(conv, bn, x, conv.padding)
    return x


def run_linearized(layers, x: torch.Tensor) -> torch.Tensor:
    """The chain with all padding moved onto the first conv (ALGORITHM.md §2)."""
    front = front_padding([pair(c.stride) for c, _ in layers], [pair(c.padding) for c, _ in layers])
    for n, (conv, bn) in enumerate(layers):
        x = run_layer(conv, bn, x, front if n == 0 else (0, 0))
    return x


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def chains(draw, *, max_len: int = 4, allow_bn: bool = True, max_stride: int = 2):
    """Random chains of (Conv2d, BN | None) in float64 with a matching input tensor.

    Each conv is dense, grouped or depthwise; kernels 1–5 (not necessarily square), strides up to
    ``max_stride``, paddings 0–2, dilation 1–2, with or without bias. The input is large enough
    for every conv of the chain to see a non-empty padded map.
    """
    n = draw(st.integers(1, max_len))
    cin = draw(st.sampled_from([2, 4, 6]))
    channels = [cin]
    layers = []
    seed = draw(st.integers(0, 2**16))
    for k in range(n):
        c = channels[-1]
        kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
        if kind == "depthwise":
            groups, cout = c, c * draw(st.sampled_from([1, 1, 2]))
        elif kind == "grouped" and c % 2 == 0:
            groups = 2
            cout = draw(st.sampled_from([2, 4, 6]))
        else:
            groups, cout = 1, draw(st.sampled_from([2, 3, 4, 6]))
        kh = draw(st.integers(1, 5))
        kw = draw(st.one_of(st.just(kh), st.integers(1, 5)))
        stride = draw(st.tuples(st.integers(1, max_stride), st.integers(1, max_stride)))
        if draw(st.booleans()):
            stride = (stride[0], stride[0])
        dilation = draw(st.sampled_from([(1, 1), (1, 1), (2, 2), (1, 2), (2, 1)]))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        conv = make_conv(
            c,
            cout,
            (kh, kw),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=draw(st.booleans()),
            seed=seed + 7 * k,
        )
        bn = None
        if allow_bn and draw(st.booleans()):
            bn = make_bn(cout, eps=draw(st.sampled_from([1e-3, 0.1, 1e-5])), seed=seed + 7 * k + 1)
        layers.append((conv, bn))
        channels.append(cout)
    # input size: walk backwards so every conv gets at least its effective kernel
    need = [1, 1]
    for conv, _ in reversed(layers):
        for d in range(2):
            eff = conv.dilation[d] * (conv.kernel_size[d] - 1) + 1
            need[d] = max(1, (need[d] - 1) * conv.stride[d] + eff - 2 * conv.padding[d])
    h = need[0] + draw(st.integers(0, 6))
    w = need[1] + draw(st.integers(0, 6))
    x = torch.randn(
        2, cin, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return layers, x


def specs_of(layers) -> list[ConvSpec]:
    return [spec_from_conv(conv, bn) for conv, bn in layers]


def describe(layers) -> str:
    return " -> ".join(
        f"[{c.in_channels}->{c.out_channels} k{tuple(c.kernel_size)} s{tuple(c.stride)} "
        f"p{tuple(c.padding)} d{tuple(c.dilation)} g{c.groups}{' bn' if b is not None else ''}]"
        for c, b in layers
    )


# ---------------------------------------------------------------------------------------------
# merge_chain: the core identity of §2


@settings(max_examples=200, **SETTINGS)
@given(chains(max_len=4))
def test_merge_chain_equals_front_padded_chain(case):
    layers, x = case
    note(describe(layers))
    with torch.no_grad():
        expected = run_linearized(layers, x)
        original = run_original(layers, x)
    fused = merge_chain(specs_of(layers))
    got = run_spec(fused, x)
    assert got.shape == expected.shape == original.shape
    assert max_err(expected, got) <= F64_TOL
    # geometry of §2: K = 1 + Σ (K_l − 1) Π_{m<l} s_m, S = Π s_l, P = front_padding
    kernel, scale = [1, 1], [1, 1]
    for conv, _ in layers:
        for d in range(2):
            kernel[d] += conv.dilation[d] * (conv.kernel_size[d] - 1) * scale[d]
            scale[d] *= conv.stride[d]
    assert fused.kernel == tuple(kernel)
    assert fused.stride == tuple(scale)
    assert fused.padding == front_padding(
        [pair(c.stride) for c, _ in layers], [pair(c.padding) for c, _ in layers]
    )
    assert fused.in_channels == layers[0][0].in_channels
    assert fused.out_channels == layers[-1][0].out_channels


@settings(max_examples=60, **SETTINGS)
@given(chains(max_len=3, max_stride=3))
def test_merge_chain_with_stride_three(case):
    layers, x = case
    note(describe(layers))
    with torch.no_grad():
        expected = run_linearized(layers, x)
        original = run_original(layers, x)
    got = run_spec(merge_chain(specs_of(layers)), x)
    assert got.shape == expected.shape == original.shape
    assert max_err(expected, got) <= F64_TOL


@settings(max_examples=60, **SETTINGS)
@given(chains(max_len=4, allow_bn=True))
def test_merge_chain_float32_via_to_conv2d(case):
    layers, x = case
    note(describe(layers))
    fused = merge_chain(specs_of(layers))
    conv = to_conv2d(fused, torch.float32)
    assert conv.weight.dtype == torch.float32
    assert conv.groups == fused.groups and tuple(conv.stride) == fused.stride
    layers32 = [
        (copy.deepcopy(c).float(), copy.deepcopy(b).float() if b is not None else None)
        for c, b in layers
    ]
    x32 = x.float()
    with torch.no_grad():
        expected = run_linearized(layers32, x32)
        got = conv(x32)
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    assert max_err(expected, got) <= 1e-4 * scale


def test_merge_chain_single_conv_is_the_conv():
    conv = make_conv(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2, seed=3)
    spec = merge_chain([spec_from_conv(conv)])
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        assert max_err(conv(x), run_spec(spec, x)) <= F64_TOL


def test_merge_chain_keeps_depthwise_and_shared_grouping():
    dw = [make_conv(4, 4, (3, 3), padding=(1, 1), groups=4, seed=s) for s in range(3)]
    fused = merge_chain([spec_from_conv(c) for c in dw])
    assert fused.groups == 4 and fused.weight.shape == (4, 1, 7, 7)
    g2 = [make_conv(4, 6, (1, 1), groups=2, seed=5), make_conv(6, 4, (3, 3), groups=2, seed=6)]
    fused = merge_chain([spec_from_conv(c) for c in g2])
    assert fused.groups == 2 and fused.weight.shape == (4, 2, 3, 3)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert max_err(g2[1](g2[0](x)), run_spec(fused, x)) <= F64_TOL
    mixed = [make_conv(4, 4, (1, 1), seed=7), make_conv(4, 4, (3, 3), groups=4, seed=8)]
    assert merge_chain([spec_from_conv(c) for c in mixed]).groups == 1


def test_front_padding_formula():
    assert front_padding([(1, 1)], [(2, 1)]) == (2, 1)
    assert front_padding([(2, 1), (1, 1), (3, 2)], [(1, 0), (1, 2), (2, 1)]) == (
        1 + 2 + 4,
        0 + 2 + 1,
    )
    assert front_padding([(2, 2), (2, 2), (2, 2)], [(1, 1), (1, 1), (1, 1)]) == (7, 7)


# ---------------------------------------------------------------------------------------------
# dilation, BN folding, grouping


@pytest.mark.parametrize("dilation", [(1, 1), (2, 2), (2, 1), (3, 2)])
def test_expand_dilation_is_the_same_conv(dilation):
    conv = make_conv(3, 5, (3, 2), padding=(2, 1), dilation=dilation, seed=11)
    w = expand_dilation(conv.weight.detach(), dilation)
    assert w.shape[-2:] == (dilation[0] * 2 + 1, dilation[1] * 1 + 1)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x)
    got = F.conv2d(x, w, conv.bias, 1, conv.padding)
    assert max_err(expected, got) <= F64_TOL


@settings(max_examples=40, **SETTINGS)
@given(
    groups=st.sampled_from([1, 2, 4]),
    eps=st.sampled_from([1e-3, 0.5, 1e-1, 2.0]),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_fold_bn_equals_conv_then_eval_bn(groups, eps, bias, affine, seed):
    conv = make_conv(4, 8, (3, 3), padding=(1, 1), groups=groups, bias=bias, seed=seed)
    bn = make_bn(8, eps=eps, seed=seed + 1)
    if not affine:
        bn = nn.BatchNorm2d(8, eps=eps, affine=False).double().eval()
        bn.running_mean.normal_(generator=torch.Generator().manual_seed(seed))
        bn.running_var.uniform_(0.1, 3.0, generator=torch.Generator().manual_seed(seed + 2))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = bn(conv(x))
    folded = fold_bn(spec_from_conv(conv), bn)
    assert max_err(expected, run_spec(folded, x)) <= F64_TOL
    assert max_err(expected, run_spec(spec_from_conv(conv, bn), x)) <= F64_TOL


def test_fold_bn_uses_the_modules_eps():
    conv = make_conv(2, 3, (1, 1), seed=1)
    bn = make_bn(3, eps=0.7, seed=2)
    with torch.no_grad():
        bn.running_var.fill_(0.01)  # eps dominates: 1e-5 would be far off
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert max_err(bn(conv(x)), run_spec(spec_from_conv(conv, bn), x)) <= F64_TOL


def test_fold_bn_without_running_stats_raises():
    conv = make_conv(2, 3, (1, 1))
    bn = nn.BatchNorm2d(3, track_running_stats=False).double()
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn(spec_from_conv(conv), bn)


@pytest.mark.parametrize(("cin", "cout", "groups"), [(4, 4, 4), (4, 8, 4), (6, 4, 2), (8, 8, 8)])
def test_to_dense_and_regroup_round_trip(cin, cout, groups):
    conv = make_conv(cin, cout, (3, 1), stride=(1, 2), padding=(1, 0), groups=groups, seed=4)
    spec = spec_from_conv(conv)
    dense = to_dense(spec)
    assert dense.groups == 1 and dense.weight.shape == (cout, cin, 3, 1)
    assert dense.in_channels == spec.in_channels and dense.out_channels == spec.out_channels
    # block-diagonal: zero outside each group
    og, cg = cout // groups, cin // groups
    mask = torch.zeros(cout, cin, dtype=torch.bool)
    for r in range(groups):
        mask[r * og : (r + 1) * og, r * cg : (r + 1) * cg] = True
    assert torch.all(dense.weight[~mask] == 0)
    back = regroup(dense, groups)
    assert back.groups == groups
    assert torch.equal(back.weight, spec.weight) and torch.equal(back.bias, spec.bias)
    assert regroup(spec, groups) is spec and to_dense(dense) is dense
    x = torch.randn(2, cin, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x)
    assert max_err(expected, run_spec(dense, x)) <= F64_TOL
    assert max_err(expected, run_spec(back, x)) <= F64_TOL


# ---------------------------------------------------------------------------------------------
# shortcuts (§3)


@st.composite
def same_branches(draw):
    """Stride-1 chains that preserve shape with symmetric "same" padding (odd effective kernels),
    returning to the input's channel count: the branch of an identity residual."""
    c = draw(st.sampled_from([2, 4, 6]))
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    layers, cur = [], c
    for k in range(n):
        last = k == n - 1
        cout = c if last else draw(st.sampled_from([cur, 2 * cur]))
        kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
        groups = {"dense": 1, "grouped": 2, "depthwise": cur}[kind]
        if kind == "depthwise" and cout != cur:
            groups = cur if cout % cur == 0 else 1
        kh = draw(st.sampled_from([1, 3, 5]))
        kw = draw(st.sampled_from([kh, 1, 3]))
        dil = draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
        pad = (dil[0] * (kh - 1) // 2, dil[1] * (kw - 1) // 2)
        conv = make_conv(
            cur, cout, (kh, kw), padding=pad, dilation=dil, groups=groups, seed=seed + k
        )
        bn = make_bn(cout, eps=1e-3, seed=seed + 100 + k) if draw(st.booleans()) else None
        layers.append((conv, bn))
        cur = cout
    h, w = draw(st.integers(5, 12)), draw(st.integers(5, 12))
    gen = torch.Generator().manual_seed(seed)
    return layers, torch.randn(2, c, h, w, dtype=torch.float64, generator=gen)


@settings(max_examples=100, **SETTINGS)
@given(same_branches())
def test_add_identity_shortcut_equals_branch_plus_skip(case):
    layers, x = case
    note(describe(layers))
    branch = merge_chain(specs_of(layers))
    fused = add_shortcut(branch, None)
    with torch.no_grad():
        lin = run_linearized(layers, x)
        assert lin.shape == x.shape == run_original(layers, x).shape
        expected = lin + x
    assert fused.groups == branch.groups
    assert max_err(expected, run_spec(fused, x)) <= F64_TOL


def test_add_identity_shortcut_to_depthwise_branch_stays_depthwise():
    layers = [(make_conv(4, 4, (3, 3), padding=(1, 1), groups=4, seed=s), None) for s in (1, 2)]
    branch = merge_chain(specs_of(layers))
    fused = add_shortcut(branch, None)
    assert fused.groups == 4
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = run_linearized(layers, x) + x
    assert max_err(expected, run_spec(fused, x)) <= F64_TOL


@pytest.mark.parametrize("size", [(16, 16), (15, 17), (9, 10)])
@pytest.mark.parametrize(
    "variant", ["basic", "bottleneck", "grouped_bottleneck", "grouped_shortcut", "bn_shortcut"]
)
def test_add_strided_conv_shortcut(variant, size):
    """A 1x1 stride-2 conv (+BN) shortcut around a stride-2 branch (ResNet downsampling)."""
    cin, cout = 4, 8
    if variant == "basic":
        layers = [
            (make_conv(cin, cout, (3, 3), stride=(2, 2), padding=(1, 1), seed=1), None),
            (make_conv(cout, cout, (3, 3), padding=(1, 1), seed=2), make_bn(8, eps=1e-3, seed=3)),
        ]
    else:
        g = 2 if "grouped" in variant else 1
        layers = [
            (make_conv(cin, 4, (1, 1), seed=1), make_bn(4, eps=1e-3, seed=4)),
            (make_conv(4, 4, (3, 3), stride=(2, 2), padding=(1, 1), groups=g, seed=2), None),
            (make_conv(4, cout, (1, 1), seed=3), make_bn(8, eps=0.1, seed=5)),
        ]
    sc_groups = 2 if variant == "grouped_shortcut" else 1
    sc_conv = make_conv(cin, cout, (1, 1), stride=(2, 2), groups=sc_groups, bias=False, seed=9)
    sc_bn = make_bn(cout, eps=1e-3, seed=10) if variant in ("bn_shortcut", "basic") else None
    branch = merge_chain(specs_of(layers))
    fused = add_shortcut(branch, spec_from_conv(sc_conv, sc_bn))
    x = torch.randn(2, cin, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        skip = run_layer(sc_conv, sc_bn, x, sc_conv.padding)
        lin = run_linearized(layers, x)
        assert lin.shape == skip.shape == run_original(layers, x).shape
        expected = lin + skip
    assert max_err(expected, run_spec(fused, x)) <= F64_TOL


@pytest.mark.parametrize("size", [(15, 15), (17, 13)])
def test_add_off_centre_shortcut(size):
    """4x4 stride-2 pad-2 branch, 1x1 stride-2 shortcut, odd input: both give (H+1)/2 rows, and
    the shortcut tap sits at offset P − p_s = 2 of the 4-wide kernel, not at its centre (1)."""
    layers = [
        (
            make_conv(4, 6, (4, 4), stride=(2, 2), padding=(2, 2), seed=1),
            make_bn(6, eps=0.1, seed=2),
        ),
        (make_conv(6, 6, (1, 1), seed=3), None),
    ]
    sc = make_conv(4, 6, (1, 1), stride=(2, 2), seed=4)
    branch = merge_chain(specs_of(layers))
    assert branch.kernel == (4, 4) and branch.padding == (2, 2)
    fused = add_shortcut(branch, spec_from_conv(sc))
    x = torch.randn(2, 4, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        lin = run_linearized(layers, x)
        skip = sc(x)
        assert lin.shape == skip.shape == run_original(layers, x).shape
        expected = lin + skip
    assert max_err(expected, run_spec(fused, x)) <= F64_TOL


def test_add_padded_3x3_shortcut_inside_5x5_branch():
    """A conv shortcut with its own padding lands at offset P_branch − p_shortcut."""
    layers = [
        (make_conv(4, 4, (3, 3), padding=(1, 1), seed=1), None),
        (make_conv(4, 6, (3, 3), padding=(1, 1), seed=2), None),
    ]
    sc = make_conv(4, 6, (3, 3), padding=(1, 1), seed=3)
    fused = add_shortcut(merge_chain(specs_of(layers)), spec_from_conv(sc))
    x = torch.randn(1, 4, 8, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = run_linearized(layers, x) + sc(x)
    assert max_err(expected, run_spec(fused, x)) <= F64_TOL


# ---------------------------------------------------------------------------------------------
# errors


def test_compose_rejects_a_padded_second_conv():
    a = spec_from_conv(make_conv(2, 3, (3, 3), padding=(1, 1)))
    b = spec_from_conv(make_conv(3, 4, (3, 3), padding=(1, 0)))
    with pytest.raises(ValueError, match="unpadded"):
        compose(a, b)


def test_compose_rejects_a_channel_mismatch():
    a = spec_from_conv(make_conv(2, 3, (3, 3)))
    b = spec_from_conv(make_conv(4, 4, (1, 1)))
    with pytest.raises(ValueError, match="channels"):
        compose(a, b)
    with pytest.raises(ValueError, match="channels"):
        merge_chain([a, b])


def test_merge_chain_rejects_an_empty_chain():
    with pytest.raises(ValueError, match="at least one"):
        merge_chain([])


def test_add_shortcut_errors():
    strided = merge_chain([spec_from_conv(make_conv(4, 4, (3, 3), stride=(2, 2), padding=(1, 1)))])
    with pytest.raises(ValueError, match="identity shortcut"):
        add_shortcut(strided, None)
    widening = merge_chain([spec_from_conv(make_conv(4, 8, (3, 3), padding=(1, 1)))])
    with pytest.raises(ValueError, match="identity shortcut"):
        add_shortcut(widening, None)
    stride1_sc = spec_from_conv(make_conv(4, 4, (1, 1)))
    with pytest.raises(ValueError, match="strides differ"):
        add_shortcut(strided, stride1_sc)
    # a 5x5 shortcut cannot fit inside a 3x3 branch kernel
    small = merge_chain([spec_from_conv(make_conv(4, 4, (3, 3), padding=(1, 1)))])
    big_sc = spec_from_conv(make_conv(4, 4, (5, 5), padding=(2, 2)))
    with pytest.raises(ValueError, match="does not fit"):
        add_shortcut(small, big_sc)
