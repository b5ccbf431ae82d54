"""Linearize a network for a plan: removed activations become identities and each block's
padding moves to its first conv, so that after fine-tuning every block merges exactly
(ALGORITHM.md §2, §3, §8.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import PlanError
from .graph import (
    ConvChain,
    Residual,
    analyze,
    check_model_matches,
    example_input_for,
    prepare,
)
from .kernels import Pair, pair
from .kinds import make_activation
from .plan import Plan

META_KEY = "depthcompress"


class ResidualJoin(nn.Module):
    """``branch + shortcut(window(skip))``: a residual add whose skip is cropped or zero-padded to
    line up with a branch computed on padding moved to the block front (ALGORITHM.md §3). With
    ``branch_pruned`` (every branch conv pruned) it is the shortcut alone (docs/layermerge.md)."""

    def __init__(
        self,
        offset: Pair,
        stride: Pair,
        kernel: Pair,
        shortcut: nn.Module | None = None,
        branch_pruned: bool = False,
    ) -> None:
        super().__init__()
        self.offset = offset
        self.stride = stride
        self.kernel = kernel
        self.shortcut = shortcut
        self.branch_pruned = branch_pruned

    def forward(self, branch: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h, w = branch.shape[-2:]
        need_h = (h - 1) * self.stride[0] + self.kernel[0]
        need_w = (w - 1) * self.stride[1] + self.kernel[1]
        oh, ow = self.offset
        x = F.pad(
            skip,
            (-ow, ow + need_w - skip.shape[-1], -oh, oh + need_h - skip.shape[-2]),
        )
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x if self.branch_pruned else branch + x

    def extra_repr(self) -> str:
        return (
            f"offset={self.offset}, stride={self.stride}, kernel={self.kernel}, "
            f"branch_pruned={self.branch_pruned}"
        )


@dataclass(frozen=True)
class BlockLayout:
    """Where padding sits inside block ``(start, end)``: ``margin[k]`` is how much larger (per
    side) the map at position ``k`` is than in the original network; ``margin[start]`` is the
    front padding, carried by the block's first kept conv ``first`` (pruned convs before it are
    identities on the unpadded map, whose margins are then 0)."""

    start: int
    end: int
    margin: dict[int, Pair]
    first: int


def block_layouts(chain: ConvChain, plan: Plan) -> list[BlockLayout]:
    """Margins of every block of ``plan``: ``m_j = 0``, ``m_k = p_{k+1} + s_{k+1}·m_{k+1}``, a
    pruned conv counting as the identity (no padding, stride 1)."""
    layouts = []
    for i, j in plan.blocks:
        margin: dict[int, Pair] = {j: (0, 0)}
        for k in range(j - 1, i - 1, -1):
            nxt = chain.positions[k + 1]
            if k + 1 in plan.pruned:
                margin[k] = margin[k + 1]
            else:
                margin[k] = tuple(
                    nxt.padding[d] + nxt.stride[d] * margin[k + 1][d] for d in range(2)
                )
        kept = [k for k in range(i + 1, j + 1) if k not in plan.pruned]
        first = kept[0] if kept else j + 1
        for k in range(i + 1, min(first, j + 1)):
            margin[k] = (0, 0)
        layouts.append(BlockLayout(i, j, margin, first))
    return layouts


def fused_residuals(chain: ConvChain, plan: Plan) -> list[Residual]:
    """Residuals absorbed into one merged kernel: no boundary strictly inside, and fusable."""
    return [
        r
        for r in chain.residuals
        if r.fusable and not any(r.start < b < r.end for b in plan.boundaries)
    ]


def branch_pruned(r: Residual, pruned: frozenset[int]) -> bool:
    """Whether every conv of ``r``'s branch is pruned: the residual is then its shortcut alone."""
    return all(k in pruned for k in range(r.start + 1, r.end + 1))


def block_of(layouts: list[BlockLayout], position: int) -> BlockLayout:
    """The block whose span covers ``position`` as an interior point or end."""
    for lay in layouts:
        if lay.start < position <= lay.end:
            return lay
    raise AssertionError(f"position {position} is in no block")


def retrace(model: nn.Module, chain: ConvChain) -> tuple[fx.GraphModule, ConvChain]:
    """Trace a copy of ``model`` like ``chain`` was traced, and check the two match."""
    gm = prepare(model, example_input_for(chain), chain.leaf_modules)
    fresh = analyze(
        gm,
        mode=chain.mode,
        max_kernel_size=chain.max_kernel_size,
        exclude=chain.exclude,
        leaf=chain.leaf_modules,
    )
    check_model_matches(chain, fresh)
    return gm, fresh


def _no_inplace(gm: fx.GraphModule) -> None:
    """Rewrites can give a tensor new readers, so in-place activations are made out-of-place."""
    for mod in gm.modules():
        if hasattr(mod, "inplace") and isinstance(mod.inplace, bool):
            mod.inplace = False
    for node in gm.graph.nodes:
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}


def linearize(model: nn.Module, chain: ConvChain, plan: Plan) -> fx.GraphModule:
    """A new trainable copy of ``model`` shaped for ``plan``: activations outside
    ``plan.activations`` are identities, activations kept at linear positions are inserted,
    each block's padding sits on its first conv, and residuals inside a block add a re-aligned
    skip. ``model`` is unchanged.
    """
    plan.validate(chain)
    gm, chain = retrace(model, chain)
    nodes = {n.name: n for n in gm.graph.nodes}
    layouts = block_layouts(chain, plan)
    for lay in layouts:
        for k in range(lay.start + 1, lay.end + 1):
            if not chain.positions[k].mergeable or k in plan.pruned:
                continue  # a single-conv block of its own keeps its padding as it is
            conv = gm.get_submodule(chain.positions[k].conv)
            conv.padding = lay.margin[lay.start] if k == lay.first else (0, 0)

    fused = fused_residuals(chain, plan)
    for r in fused:
        lay = block_of(layouts, r.end)
        skip_margin = lay.margin[r.start] if r.start > lay.start else (0, 0)
        end_margin = lay.margin[r.end]
        geo = chain.geometry(r.start, r.end, plan.pruned)
        shortcut = None
        kernel: Pair = (1, 1)
        source = nodes[r.skip_node]
        pad_s = r.shortcut_padding
        if r.shortcut is not None:
            conv = gm.get_submodule(r.shortcut)
            conv.padding = (0, 0)
            kernel = (
                conv.dilation[0] * (conv.kernel_size[0] - 1) + 1,
                conv.dilation[1] * (conv.kernel_size[1] - 1) + 1,
            )
            parts = [conv] + ([gm.get_submodule(r.shortcut_bn)] if r.shortcut_bn else [])
            shortcut = nn.Sequential(*parts)
            source = nodes[r.shortcut_node].args[0]
        offset = tuple(skip_margin[d] - pad_s[d] - geo.stride[d] * end_margin[d] for d in range(2))
        name = f"depthcompress_join_{r.start}_{r.end}"
        whole = branch_pruned(r, plan.pruned)
        gm.add_submodule(name, ResidualJoin(offset, geo.stride, kernel, shortcut, whole))
        add = nodes[r.add_node]
        branch = nodes[chain.positions[r.end].tail_node]
        with gm.graph.inserting_before(add):
            join = gm.graph.call_module(name, (branch, source))
        add.replace_all_uses_with(join)
        gm.graph.erase_node(add)
        nodes[r.add_node] = join
        if r.shortcut_tail is not None:
            _erase_chain(gm.graph, nodes[r.shortcut_tail], nodes[r.shortcut_node])

    for k in range(1, chain.num_positions + 1):
        pos = chain.positions[k]
        if pos.act_node is not None and k not in plan.activations:
            act = nodes[pos.act_node]
            act.replace_all_uses_with(act.args[0])
            gm.graph.erase_node(act)
        elif pos.act_node is None and k in plan.activations:
            out = nodes[pos.out_node]
            name = f"depthcompress_act_{k}"
            gm.add_submodule(name, make_activation(chain.insert_activation))
            with gm.graph.inserting_after(out):
                act = gm.graph.call_module(name, (out,))
            out.replace_all_uses_with(act, delete_user_cb=lambda user, a=act: user is not a)

    for r in chain.residuals:
        if r not in fused and branch_pruned(r, plan.pruned):
            _skip_only(nodes[r.add_node], nodes[chain.positions[r.end].tail_node])
    for k in sorted(plan.pruned):
        _prune(gm, nodes, chain, k)
    _no_inplace(gm)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.meta[META_KEY] = {
        "kind": "linearized",
        "plan": plan.to_dict(),
        "signature": chain.signature(),
    }
    gm.train(model.training)
    return gm


def _prune(gm: fx.GraphModule, nodes: dict[str, fx.Node], chain: ConvChain, k: int) -> None:
    """Make position ``k`` the identity: its conv, BN and post-activation BN call an
    ``nn.Identity`` (the nodes stay, so merge finds the block ends as without pruning)."""
    pos = chain.positions[k]
    conv = nodes[str(pos.conv_node)]
    targets = [conv, *(u for u in conv.users if pos.bn is not None and u.target == pos.bn)]
    if pos.post_bn_node is not None:
        targets.append(nodes[pos.post_bn_node])
    for node in targets:
        name = f"depthcompress_pruned_{node.name}"
        gm.add_submodule(name, nn.Identity())
        node.target = name


def _skip_only(add: fx.Node, branch: fx.Node) -> None:
    """Make an explicit residual ``add`` of a fully pruned ``branch`` return its other operand,
    the skip (its shortcut, if any, stays as it is)."""
    skip = next(a for a in add.args if isinstance(a, fx.Node) and a is not branch)
    add.replace_all_uses_with(skip)
    add.graph.erase_node(add)


def _erase_chain(graph: fx.Graph, last: fx.Node, first: fx.Node) -> None:
    """Erase the now unused nodes from ``last`` back to ``first`` (a shortcut's conv → BN...)."""
    node = last
    while True:
        if node.users:
            raise PlanError(f"internal: node {node.name} still has users")
        prev = node.args[0] if node is not first else None
        graph.erase_node(node)
        if prev is None:
            return
        node = prev


def linearized_plan(module: nn.Module) -> Plan:
    """The plan a module returned by ``linearize`` was built for."""
    meta = getattr(module, "meta", {}).get(META_KEY)
    if not meta:
        raise PlanError(
            "this module was not produced by depthcompress.linearize(); merge() needs that module"
        )
    return Plan.from_dict(meta["plan"])


__all__ = [
    "BlockLayout",
    "ResidualJoin",
    "block_layouts",
    "branch_pruned",
    "fused_residuals",
    "linearize",
    "linearized_plan",
    "pair",
]
