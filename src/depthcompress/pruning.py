"""Layer pruning inside merged blocks (LayerMerge, docs/layermerge.md): which convolutions may be
replaced by the identity, and the merged configurations a block reaches by pruning some of them.

A pruned position is the identity: its conv, BN and post-activation BN are gone (its activation
slot still follows the plan). Pruning only ever shrinks a merged kernel, so it never makes a
valid block invalid.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

from .errors import PlanError
from .graph import ConvChain, Position, Residual
from .kernels import Pair

SEMANTICS = "shortcut-alone"
"""What a fully pruned residual branch means, recorded in the configuration tables' sidecars so
that tables made under another meaning (``x + x`` before) are refused or made again."""

MAX_SUBSETS = 4096
"""Most pruned subsets ``block_configs`` enumerates for one block (2^12): beyond that the block
holds too many reducible convs to list, and a caller must restrict the block or the subsets."""


def is_reducible(pos: Position) -> bool:
    """Whether conv ``pos`` can be replaced by the identity: same channels in and out, stride 1,
    the spatial size kept, and a conv the merge understands (zero padding, called once)."""
    return (
        pos.conv is not None
        and pos.mergeable
        and pos.in_channels == pos.out_channels
        and pos.stride == (1, 1)
        and tuple(pos.in_shape) == tuple(pos.shape)
    )


def reducible(chain: ConvChain) -> frozenset[int]:
    """Positions whose conv can be pruned (replaced by the identity) without changing shapes."""
    return frozenset(p.index for p in chain.positions[1:] if is_reducible(p))


def shortcut_fits(chain: ConvChain, r: Residual, pruned: frozenset[int]) -> bool:
    """Whether residual ``r``'s conv shortcut still lies inside its branch's merged kernel once
    ``pruned`` convs are identities (an identity skip always fits). A fully pruned branch is its
    shortcut alone, yet only a 1x1 shortcut fits it: the geometry has no k x k shortcut as a
    block's only conv."""
    if r.shortcut is None:
        return True
    geo = chain.geometry(r.start, r.end, pruned)
    offset = (geo.padding[0] - r.shortcut_padding[0], geo.padding[1] - r.shortcut_padding[1])
    return all(0 <= offset[d] <= geo.kernel[d] - r.shortcut_kernel[d] for d in range(2))


def misfit_shortcuts(
    chain: ConvChain, pruned: frozenset[int], boundaries: Iterable[int]
) -> list[Residual]:
    """Residuals fused under ``boundaries`` (none strictly inside) whose shortcut no longer fits
    the pruned branch: such a plan cannot merge exactly."""
    cuts = set(boundaries)
    return [
        r
        for r in chain.residuals
        if r.fusable
        and not any(r.start < b < r.end for b in cuts)
        and not shortcut_fits(chain, r, pruned)
    ]


@dataclass(frozen=True)
class Config:
    """One merged configuration of a block: the merged ``kernel`` and ``groups`` reached by
    pruning any of ``subsets`` (sets of pruned positions, fewest pruned first)."""

    kernel: Pair
    groups: int
    in_channels: int
    identity: bool
    subsets: tuple[frozenset[int], ...]

    @property
    def depthwise(self) -> bool:
        """Whether the merged conv has one group per input channel."""
        return self.groups == self.in_channels > 1


def _subsets(candidates: list[int]) -> Iterable[frozenset[int]]:
    for size in range(len(candidates) + 1):
        for combo in combinations(candidates, size):
            yield frozenset(combo)


def block_configs(chain: ConvChain, i: int, j: int, limit: int = MAX_SUBSETS) -> list[Config]:
    """The merged configurations of valid block ``(i, j)`` under every pruned subset of its
    reducible convs, grouped by (kernel, groups); the unpruned configuration comes first, then
    larger kernels before smaller ones. Raise PlanError beyond ``limit`` subsets."""
    why = chain.why_invalid(i, j)
    if why is not None:
        raise PlanError(f"block ({i}, {j}) cannot be merged: {why}")
    candidates = sorted(k for k in reducible(chain) if i < k <= j)
    if 2 ** len(candidates) > limit:
        raise PlanError(
            f"block ({i}, {j}) holds {len(candidates)} reducible convs: {2 ** len(candidates)} "
            f"pruned subsets exceed the limit of {limit}"
        )
    channels = chain.positions[i + 1].in_channels
    grouped: dict[tuple[Pair, int, bool], list[frozenset[int]]] = {}
    for pruned in _subsets(candidates):
        if misfit_shortcuts(chain, pruned, (i, j)):
            continue
        geo = chain.geometry(i, j, pruned)
        identity = len(pruned) == j - i
        grouped.setdefault((geo.kernel, geo.groups, identity), []).append(pruned)
    full = next(iter(grouped))
    rest = sorted(
        (key for key in grouped if key != full),
        key=lambda key: (-key[0][0] * key[0][1], key[2], key[1]),
    )
    order = [full, *rest]
    return [
        Config(
            kernel=k,
            groups=g,
            in_channels=channels,
            identity=ident,
            subsets=tuple(grouped[k, g, ident]),
        )
        for k, g, ident in order
    ]


def wired_through(chain: ConvChain, i: int, j: int, pruned: frozenset[int]) -> bool:
    """Whether block ``(i, j)`` with ``pruned`` is no conv at all: every conv pruned and no conv
    shortcut inside (a fully pruned residual is its shortcut alone), so merge wires it through
    and the latency table times the activation alone."""
    shortcut = any(
        r.fusable and r.shortcut and i <= r.start and r.end <= j for r in chain.residuals
    )
    return not shortcut and all(k in pruned for k in range(i + 1, j + 1))


def config_of(chain: ConvChain, i: int, j: int, pruned: frozenset[int]) -> int:
    """The configuration ``c`` of block ``(i, j)`` that pruning ``pruned`` gives (0: none), the
    index ``block_configs`` and the configuration tables use."""
    if not pruned:
        return 0
    for c, config in enumerate(block_configs(chain, i, j)):
        if pruned in config.subsets:
            return c
    raise PlanError(f"block ({i}, {j}) has no configuration pruning {sorted(pruned)}")
