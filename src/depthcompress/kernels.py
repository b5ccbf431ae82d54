"""Pure merge math: conv normal form, BN folding, conv∘conv composition, shortcut absorption.

Every function returns new tensors and never touches a module. Composition follows
ALGORITHM.md §2: with all padding moved to the front of a chain, the chain *is* one conv.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

Pair = tuple[int, int]


def pair(value: int | Sequence[int]) -> Pair:
    """Normalise an int or a 2-sequence into an (h, w) pair."""
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


@dataclass(frozen=True)
class ConvSpec:
    """One zero-padded, undilated conv: ``weight`` (O, C/groups, kh, kw), ``bias`` (O,)."""

    weight: Tensor
    bias: Tensor
    stride: Pair
    padding: Pair
    groups: int

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel(self) -> Pair:
        return (self.weight.shape[2], self.weight.shape[3])


def expand_dilation(weight: Tensor, dilation: Pair) -> Tensor:
    """Dense kernel of size d(k-1)+1 with zeros between the taps: the same conv, undilated."""
    dh, dw = dilation
    if (dh, dw) == (1, 1):
        return weight
    o, c, kh, kw = weight.shape
    out = weight.new_zeros(o, c, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out[:, :, ::dh, ::dw] = weight
    return out


def fold_bn_weights(
    weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d
) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` of a conv followed by ``bn`` in eval form (running statistics, the
    module's own eps), by torch's ``fuse_conv_bn_weights`` in ``weight``'s dtype."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} keeps no running statistics and cannot be folded")

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(weight.dtype)

    w, b = fuse_conv_bn_weights(
        weight.detach(),
        cast(bias),
        bn.running_mean.detach().to(weight.dtype),
        bn.running_var.detach().to(weight.dtype),
        bn.eps,
        cast(bn.weight),
        cast(bn.bias),
    )
    return w.detach(), b.detach()


def spec_from_conv(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d | None = None,
    *,
    padding: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float64,
) -> ConvSpec:
    """Normal form of ``conv`` (+ folded eval ``bn``); ``padding`` overrides the module's own."""
    weight = expand_dilation(conv.weight.detach().to(dtype), pair(conv.dilation))
    bias = (
        conv.bias.detach().to(dtype)
        if conv.bias is not None
        else weight.new_zeros(conv.out_channels)
    )
    spec = ConvSpec(
        weight=weight,
        bias=bias,
        stride=pair(conv.stride),
        padding=pair(conv.padding if padding is None else padding),
        groups=conv.groups,
    )
    return fold_bn(spec, bn) if bn is not None else spec


def fold_bn(spec: ConvSpec, bn: nn.BatchNorm2d) -> ConvSpec:
    """Fold an eval-mode BatchNorm that follows ``spec`` into its weight and bias, in the spec's
    dtype (float64 in a merge). A ``ConvSpec`` is bare tensors, not a module, so this goes
    through torch's ``fuse_conv_bn_weights`` rather than ``fuse_conv_bn_eval``."""
    weight, bias = fold_bn_weights(spec.weight, spec.bias, bn)
    return replace(spec, weight=weight, bias=bias)


def to_dense(spec: ConvSpec) -> ConvSpec:
    """The same conv with ``groups = 1``: a block-diagonal dense weight."""
    if spec.groups == 1:
        return spec
    g = spec.groups
    o, cg, kh, kw = spec.weight.shape
    og = o // g
    dense = spec.weight.new_zeros(o, cg * g, kh, kw)
    for r in range(g):
        dense[r * og : (r + 1) * og, r * cg : (r + 1) * cg] = spec.weight[r * og : (r + 1) * og]
    return ConvSpec(dense, spec.bias, spec.stride, spec.padding, 1)


def regroup(spec: ConvSpec, groups: int) -> ConvSpec:
    """Express a dense (groups=1) spec with ``groups`` groups; it must be block-diagonal."""
    if groups == spec.groups:
        return spec
    if spec.groups != 1:
        spec = to_dense(spec)
    o, c = spec.weight.shape[:2]
    og, cg = o // groups, c // groups
    parts = [spec.weight[r * og : (r + 1) * og, r * cg : (r + 1) * cg] for r in range(groups)]
    return ConvSpec(torch.cat(parts, 0), spec.bias, spec.stride, spec.padding, groups)


def compose(first: ConvSpec, second: ConvSpec) -> ConvSpec:
    """One conv equal to ``second ∘ first`` when ``second`` runs unpadded ("valid").

    ``W[o,c,δ] = Σ_m Σ_q W2[o,m,q] W1[m,c,δ − S1·q]``; kernel ``K1 + S1(K2 − 1)``; stride ``S1·s2``;
    bias ``b2 + Σ_m ΣqW2[o,m,q] b1[m]``. Grouping is kept when both share it, else densified.
    """
    if second.padding != (0, 0):
        raise ValueError("compose() needs the second conv unpadded; move padding first")
    if first.out_channels != second.in_channels:
        raise ValueError(
            f"cannot compose: {first.out_channels} channels out, {second.in_channels} in"
        )
    if first.groups != second.groups:
        first, second = to_dense(first), to_dense(second)
    g = first.groups
    s1h, s1w = first.stride
    k1h, k1w = first.kernel
    k2h, k2w = second.kernel
    o, c = second.out_channels, first.in_channels
    w1 = first.weight.reshape(g, -1, c // g, k1h, k1w)
    w2 = second.weight.reshape(g, o // g, -1, k2h, k2w)
    w = first.weight.new_zeros(g, o // g, c // g, k1h + s1h * (k2h - 1), k1w + s1w * (k2w - 1))
    # One batched matmul per tap q of the second kernel: W[δ] += W2[q] · W1[δ − S1·q].
    for qh in range(k2h):
        for qw in range(k2w):
            tap = torch.einsum("gom,gmcyx->gocyx", w2[..., qh, qw], w1)
            w[..., qh * s1h : qh * s1h + k1h, qw * s1w : qw * s1w + k1w] += tap
    w = w.reshape(o, c // g, w.shape[-2], w.shape[-1])
    bias = second.bias + torch.einsum("gom,gm->go", w2.sum((-2, -1)), first.bias.view(g, -1)).view(
        -1
    )
    return ConvSpec(
        weight=w,
        bias=bias,
        stride=(s1h * second.stride[0], s1w * second.stride[1]),
        padding=first.padding,
        groups=g,
    )


def front_padding(strides: Sequence[Pair], paddings: Sequence[Pair]) -> Pair:
    """Front padding ``P = Σ_l p_l · Π_{m<l} s_m`` that makes a chain exactly one conv."""
    total = [0, 0]
    scale = [1, 1]
    for s, p in zip(strides, paddings, strict=True):
        for d in range(2):
            total[d] += p[d] * scale[d]
            scale[d] *= s[d]
    return (total[0], total[1])


def merge_chain(specs: Sequence[ConvSpec]) -> ConvSpec:
    """Fuse a chain of convs into one, padding moved to the front (the linearized semantics)."""
    if not specs:
        raise ValueError("merge_chain() needs at least one conv")
    pad = front_padding([s.stride for s in specs], [s.padding for s in specs])
    fused = specs[0]
    for nxt in specs[1:]:
        fused = compose(fused, ConvSpec(nxt.weight, nxt.bias, nxt.stride, (0, 0), nxt.groups))
    return ConvSpec(fused.weight, fused.bias, fused.stride, pad, fused.groups)


def shortcut_offset(branch: ConvSpec, shortcut: ConvSpec | None) -> Pair:
    """Where a shortcut's taps land in the fused branch kernel: ``P_branch − p_shortcut``."""
    ph, pw = shortcut.padding if shortcut is not None else (0, 0)
    return (branch.padding[0] - ph, branch.padding[1] - pw)


def add_shortcut(branch: ConvSpec, shortcut: ConvSpec | None) -> ConvSpec:
    """Absorb a residual into the fused branch: identity (``None``) or a conv shortcut."""
    oh, ow = shortcut_offset(branch, shortcut)
    kh, kw = branch.kernel
    if shortcut is None:
        if branch.stride != (1, 1) or branch.in_channels != branch.out_channels:
            raise ValueError("an identity shortcut needs a stride-1 branch with equal channels")
        sh, sw = 1, 1
    else:
        if shortcut.stride != branch.stride:
            raise ValueError("shortcut and branch strides differ")
        sh, sw = shortcut.kernel
    if not (0 <= oh <= kh - sh and 0 <= ow <= kw - sw):
        raise ValueError("the shortcut does not fit inside the fused branch kernel")
    if shortcut is None:
        weight = branch.weight.clone()
        c = branch.out_channels
        cg = weight.shape[1]
        idx = torch.arange(c)
        weight[idx, idx % cg, oh, ow] += 1.0
        return ConvSpec(weight, branch.bias, branch.stride, branch.padding, branch.groups)
    if shortcut.groups != branch.groups:
        branch, shortcut = to_dense(branch), to_dense(shortcut)
    weight = branch.weight.clone()
    weight[:, :, oh : oh + sh, ow : ow + sw] += shortcut.weight
    return ConvSpec(
        weight, branch.bias + shortcut.bias, branch.stride, branch.padding, branch.groups
    )


def to_conv2d(spec: ConvSpec, dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    """A fresh ``nn.Conv2d`` (with bias) computing ``spec``."""
    conv = nn.Conv2d(
        spec.in_channels,
        spec.out_channels,
        spec.kernel,
        stride=spec.stride,
        padding=spec.padding,
        groups=spec.groups,
        bias=True,
        dtype=dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(spec.weight)
        conv.bias.copy_(spec.bias)
    return conv
