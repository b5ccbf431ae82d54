"""Merge a linearized network into a shallower one: one conv per block, BN folded, residuals
inside a block absorbed into its kernel (ALGORITHM.md §8.3). The result is checked numerically
against the network it came from."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils._pytree import tree_leaves

from .errors import DepthCompressError, MergeError
from .graph import ConvChain, Residual, example_input_for, param_place
from .kernels import (
    ConvSpec,
    add_shortcut,
    fold_bn,
    merge_chain,
    spec_from_conv,
    to_conv2d,
)
from .kinds import is_batchnorm, is_conv
from .linearization import META_KEY, branch_pruned, fused_residuals, linearized_plan
from .plan import Plan
from .pruning import wired_through

MERGE_TOLERANCE = 1e-4


def merge(
    linearized: fx.GraphModule, chain: ConvChain, plan: Plan, *, verify: bool = True
) -> fx.GraphModule:
    """A new eval-mode module with one conv per block of ``plan`` (BN folded everywhere).

    ``linearized`` must come from ``linearize(model, chain, plan)`` (fine-tuned or not) and is
    left unchanged. With ``verify`` the result is compared with ``linearized`` on a random input
    and a MergeError is raised if they differ by more than 1e-4 of the output scale or either
    output holds NaN or Inf.
    """
    built_for = linearized_plan(linearized)
    if built_for != plan:
        raise MergeError(
            f"this network was linearized for a different plan ({built_for.to_dict()}); "
            f"merge it with that plan, or linearize again for {plan.to_dict()}"
        )
    if linearized.meta[META_KEY].get("signature") != chain.signature():
        raise MergeError("this linearized network was made from a different chain")
    plan.validate(chain)
    gm = copy.deepcopy(linearized).eval()
    x = example_input_for(chain).to(**param_place(gm))
    if verify:
        with torch.no_grad():
            reference = gm(x)

    nodes = {n.name: n for n in gm.graph.nodes}
    fused = fused_residuals(chain, plan)
    for i, j in plan.blocks:
        pos = chain.positions[j]
        end = nodes[pos.tail_node]
        residual = chain.residual_ending_at(j)
        if residual is not None and residual in fused and residual.start >= i:
            end = next(iter(end.users))
        post_bn = None
        if pos.post_bn_node is not None and j not in plan.activations | plan.pruned:
            # activation removed: the BN after it reads the block output, an exact fold
            after = nodes[pos.post_bn_node]
            if after.args[0] is end:
                post_bn, end = pos.post_bn, after
        first = nodes[chain.positions[i + 1].conv_node]
        if wired_through(chain, i, j, plan.pruned):
            end.replace_all_uses_with(first.args[0])
            gm.graph.eliminate_dead_code()
            continue
        conv = _merged_conv(gm, chain, fused, plan.pruned, i, j, post_bn)
        name = f"depthcompress_block_{i}_{j}"
        gm.add_submodule(name, conv)
        with gm.graph.inserting_before(first):
            new = gm.graph.call_module(name, (first.args[0],))
        end.replace_all_uses_with(new)
        gm.graph.eliminate_dead_code()
    _fold_remaining_bn(gm)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.meta[META_KEY] = {"kind": "merged", "plan": plan.to_dict()}
    gm.eval()
    if verify:
        with torch.no_grad():
            check_close(reference, gm(x), "merged network", "linearized network")
    return gm


def check_close(
    expected: object,
    actual: object,
    what: str,
    against: str,
    tol: float = MERGE_TOLERANCE,
    *,
    error: type[DepthCompressError] = MergeError,
    outcome: str = "nothing was returned",
) -> float:
    """Max abs error of ``actual`` (``what``) against ``expected`` (``against``) relative to the
    output scale; raise ``error`` above ``tol`` or when either output holds NaN or Inf, since a
    numerical gate must never pass on garbage. ``outcome`` ends the message (what was not done)."""
    worst = 0.0
    for a, b in zip(tree_leaves(expected), tree_leaves(actual), strict=True):
        if not isinstance(a, torch.Tensor):
            continue
        if not isinstance(b, torch.Tensor):
            raise error(f"{what} output is a {type(b).__name__} where the {against} gave a tensor")
        if a.shape != b.shape:
            raise error(f"{what} output shape {tuple(b.shape)} != {against} {tuple(a.shape)}")
        a, b = a.detach(), b.detach()
        _check_finite(a, against, what, error, outcome)
        _check_finite(b, what, against, error, outcome)
        scale = a.abs().max().item() if a.numel() else 0.0
        err = (a - b).abs().max().item() if a.numel() else 0.0
        rel = err / scale if scale > 0 else err
        if not rel <= worst:
            worst = rel
    if not worst <= tol:
        raise error(
            f"{what} differs from the {against} by {worst:.3g} of the output scale (limit {tol:g})"
            f"; {outcome}. Please report this with the model."
        )
    return worst


def _check_finite(
    out: torch.Tensor, who: str, other: str, error: type[DepthCompressError], outcome: str
) -> None:
    """Refuse an output holding NaN or Inf, naming the network that produced it."""
    bad = int((~torch.isfinite(out)).sum().item())
    if bad:
        raise error(
            f"the {who} produced non-finite values ({bad} of {out.numel()} outputs are NaN or "
            f"Inf), so it cannot be checked against the {other}: look for NaN/Inf in its weights "
            f"(e.g. a fine-tuning that diverged) or its input; {outcome}."
        )


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _conv_spec(gm: fx.GraphModule, chain: ConvChain, k: int) -> ConvSpec:
    pos = chain.positions[k]
    bn = gm.get_submodule(pos.bn) if pos.bn else None
    return spec_from_conv(gm.get_submodule(pos.conv), bn, padding=pos.padding)


def _identity_spec(channels: int) -> ConvSpec:
    """The identity as a 1x1 depthwise conv (what a fully pruned span computes)."""
    weight = torch.ones(channels, 1, 1, 1, dtype=torch.float64)
    return ConvSpec(weight, weight.new_zeros(channels), (1, 1), (0, 0), channels)


def _chain_spec(
    gm: fx.GraphModule,
    chain: ConvChain,
    fused: list[Residual],
    pruned: frozenset[int],
    i: int,
    j: int,
) -> ConvSpec:
    """Convs ``i+1..j`` (pruned ones left out) merged into one spec; the identity if none."""
    specs = _span_specs(gm, chain, fused, pruned, i, j)
    return merge_chain(specs) if specs else _identity_spec(chain.positions[i + 1].in_channels)


def _span_specs(
    gm: fx.GraphModule,
    chain: ConvChain,
    fused: list[Residual],
    pruned: frozenset[int],
    i: int,
    j: int,
) -> list[ConvSpec]:
    """Normal forms of convs ``i+1..j``, each fused residual inside collapsed into one spec and
    each pruned conv (an identity, BNs and all) left out."""
    specs: list[ConvSpec] = []
    k = i + 1
    while k <= j:
        inner = [r for r in fused if r.start == k - 1 and r.end <= j and (r.start, r.end) != (i, j)]
        if inner:
            r = max(inner, key=lambda r: r.end)
            spec, k = _residual_spec(gm, chain, fused, pruned, r), r.end
        elif k in pruned:
            k += 1
            continue
        else:
            spec = _conv_spec(gm, chain, k)
        post_bn = chain.positions[k].post_bn
        if k < j and post_bn is not None and k not in pruned:  # its activation is removed
            spec = fold_bn(spec, gm.get_submodule(post_bn))
        specs.append(spec)
        k += 1
    return specs


def _residual_spec(
    gm: fx.GraphModule,
    chain: ConvChain,
    fused: list[Residual],
    pruned: frozenset[int],
    r: Residual,
) -> ConvSpec:
    """A fused residual as one spec: branch plus shortcut, or the shortcut alone (the identity
    for an identity skip) when every branch conv is pruned."""
    shortcut = None
    if r.shortcut is not None:
        join = gm.get_submodule(f"depthcompress_join_{r.start}_{r.end}")
        conv, *rest = list(join.shortcut)
        shortcut = spec_from_conv(conv, rest[0] if rest else None, padding=r.shortcut_padding)
    if branch_pruned(r, pruned):
        if shortcut is not None:
            return shortcut
        return _identity_spec(chain.positions[r.start + 1].in_channels)
    branch = _chain_spec(gm, chain, fused, pruned, r.start, r.end)
    return add_shortcut(branch, shortcut)


def _merged_conv(
    gm: fx.GraphModule,
    chain: ConvChain,
    fused: list[Residual],
    pruned: frozenset[int],
    i: int,
    j: int,
    post_bn: str | None = None,
) -> nn.Conv2d:
    """The single conv of block ``(i, j)`` (then ``post_bn`` folded in), computed in float64 and
    cast to the model's dtype."""
    pos = chain.positions[j]
    dtype = param_place(gm)["dtype"] if j in pruned else gm.get_submodule(pos.conv).weight.dtype
    residual = chain.residual_ending_at(j)
    whole = residual is not None and residual in fused and (residual.start, residual.end) == (i, j)
    if j == i + 1 and not whole and j not in pruned:
        return _folded_copy(gm, pos.conv, pos.bn, post_bn)
    spec = _chain_spec(gm, chain, fused, pruned, i, j)
    if whole:
        spec = _residual_spec(gm, chain, fused, pruned, residual)
    if post_bn is not None:
        spec = fold_bn(spec, gm.get_submodule(post_bn))
    conv = to_conv2d(spec, dtype)
    return conv.to(_device(gm))


def _folded_copy(gm: fx.GraphModule, conv_name: str, *bn_names: str | None) -> nn.Conv2d:
    """A copy of one conv (padding mode, dilation and all) with the eval BNs after it folded in:
    torch's ``fuse_conv_bn_eval`` on float64 copies, cast back to the conv's dtype."""
    conv = gm.get_submodule(conv_name)
    bns = [gm.get_submodule(name) for name in bn_names if name is not None]
    fused = copy.deepcopy(conv)
    if not bns:
        return fused
    fused = fused.double().eval()
    with torch.no_grad():
        for bn in bns:
            fused = fuse_conv_bn_eval(fused, copy.deepcopy(bn).double().eval())
    fused.requires_grad_(conv.weight.requires_grad)
    return fused.to(conv.weight.dtype).train(conv.training)


def _fold_remaining_bn(gm: fx.GraphModule) -> None:
    """Fold every other conv → BN pair (stem, head, kept shortcuts): exact in eval mode."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_conv(gm.get_submodule(node.target)):
            continue
        if len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or calls.get(node.target) != 1 or calls.get(user.target) != 1:
            continue
        bn = gm.get_submodule(user.target)
        if not is_batchnorm(bn):
            continue
        name = node.target.replace(".", "_") + "_folded"
        gm.add_submodule(name, _folded_copy(gm, node.target, user.target))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, node.args, node.kwargs)
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
        gm.graph.erase_node(node)
