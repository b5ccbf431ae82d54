"""Trace a CNN with torch.fx into a ``ConvChain``: convolution positions, activations, residuals,
hard boundaries and the mergeable blocks (ALGORITHM.md §1–§3).

Numbering (see docs/design.md): every Conv2d the chain owns is one *position*, numbered 1..L along
one global sequence that follows each linear chain of convolutions (``conv k+1`` reads position
``k``) before moving to the next. Position 0 is the input of conv 1. Where conv ``k+1`` does not
read position ``k`` (a branch, a pooling, a concat...), ``k`` is a hard boundary. One sequence for
the whole network is what the DP needs: blocks never cross a hard boundary, so several chains
side by side are just several segments of one sequence.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import DepthCompressError, NoConvolutionError, TraceError
from .kernels import Pair, front_padding, pair
from .kinds import (
    ADD_FUNCTIONS,
    ADD_METHODS,
    activation_function_kind,
    activation_method_kind,
    activation_module_kind,
    how_to_register,
    is_batchnorm,
    is_conv,
    is_known_module,
    is_passthrough_function,
    is_passthrough_module,
    overridden_base,
)

MODES = ("general", "reference")


@dataclass(frozen=True)
class Position:
    """One convolution position: the feature map after conv ``index`` (its BN, residual add,
    activation and a BatchNorm right after the activation included). Position 0 is the chain
    input and has no conv."""

    index: int
    shape: tuple[int, ...]
    conv: str | None = None
    bn: str | None = None
    activation: str | None = None
    post_bn: str | None = None
    kernel: Pair = (1, 1)
    dilation: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    groups: int = 1
    in_channels: int = 0
    out_channels: int = 0
    in_shape: tuple[int, ...] = ()
    mergeable: bool = True
    # fx node names in the traced graph (private plumbing for linearize/merge)
    conv_node: str | None = None
    input_node: str | None = None
    tail_node: str | None = None
    pre_act_node: str | None = None
    act_node: str | None = None
    post_bn_node: str | None = None
    out_node: str | None = None

    @property
    def effective_kernel(self) -> Pair:
        """Kernel size once dilation is expanded into zeros."""
        return (
            self.dilation[0] * (self.kernel[0] - 1) + 1,
            self.dilation[1] * (self.kernel[1] - 1) + 1,
        )


@dataclass(frozen=True)
class Residual:
    """A residual add: the branch is convs ``start+1..end``; the skip leaves position ``start``
    (through ``shortcut``, a conv without activation, or as the identity) and is added before the
    activation of position ``end``."""

    start: int
    end: int
    add_node: str
    skip_node: str
    shortcut: str | None = None
    shortcut_bn: str | None = None
    shortcut_node: str | None = None
    shortcut_tail: str | None = None
    shortcut_padding: Pair = (0, 0)
    shortcut_groups: int = 1
    shortcut_kernel: Pair = (1, 1)
    fusable: bool = True
    reason: str = ""


@dataclass(frozen=True)
class BlockGeometry:
    """Shape of the single conv that block ``(i, j)`` merges into (ALGORITHM.md §2/§4)."""

    start: int
    end: int
    in_channels: int
    out_channels: int
    kernel: Pair
    stride: Pair
    padding: Pair
    groups: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def num_convs(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ConvChain:
    """The traced network as convolution positions 0..L, with what may merge and what may not.

    ``barriers`` maps every hard-boundary position to the reason it is one; ``blocks`` lists every
    mergeable span ``(i, j)``, ordered by ``i`` then ``j`` like the reference tables.
    """

    positions: tuple[Position, ...]
    residuals: tuple[Residual, ...]
    barriers: Mapping[int, str]
    mode: str
    max_kernel_size: int | None
    input_shape: tuple[int, ...]
    exclude: tuple[str, ...] = ()
    leaf_modules: tuple[str | type, ...] = ()
    blocks: tuple[tuple[int, int], ...] = field(default=(), compare=False)
    invalid_reasons: Mapping[tuple[int, int], str] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def num_positions(self) -> int:
        """L: the number of convolutions in the chain (positions are 0..L)."""
        return len(self.positions) - 1

    @property
    def activation_positions(self) -> tuple[int, ...]:
        """Positions 1..L that carry an activation in the original network (A0)."""
        return tuple(p.index for p in self.positions[1:] if p.activation is not None)

    @property
    def linear_positions(self) -> tuple[int, ...]:
        """Positions 1..L without an activation (F in ALGORITHM.md)."""
        return tuple(p.index for p in self.positions[1:] if p.activation is None)

    @property
    def insert_activation(self) -> str:
        """Kind of activation inserted where a plan keeps one at a linear position."""
        kinds = Counter(p.activation for p in self.positions[1:] if p.activation is not None)
        return kinds.most_common(1)[0][0] if kinds else "relu"

    def is_valid_block(self, i: int, j: int) -> bool:
        """Whether convs ``i+1..j`` can be merged into one conv."""
        return self.why_invalid(i, j) is None

    def why_invalid(self, i: int, j: int) -> str | None:
        """None for a mergeable block, else the reason it is not."""
        if not (0 <= i < j <= self.num_positions):
            return f"({i}, {j}) is not a span of positions 0..{self.num_positions}"
        if (i, j) in self.invalid_reasons:
            return self.invalid_reasons[(i, j)]
        return None

    def residual_ending_at(self, t: int) -> Residual | None:
        """The residual whose add sits at position ``t``, if any."""
        for r in self.residuals:
            if r.end == t:
                return r
        return None

    def geometry(self, i: int, j: int, pruned: frozenset[int] = frozenset()) -> BlockGeometry:
        """Geometry of the merged conv of block ``(i, j)``: what the latency table times. Convs
        in ``pruned`` (reducible ones, see ``pruning``) are identities and add nothing."""
        every = self.positions[i + 1 : j + 1]
        convs = [p for p in every if p.index not in pruned]
        kernel = [1, 1]
        scale = [1, 1]
        for p in convs:
            for d in range(2):
                kernel[d] += (p.effective_kernel[d] - 1) * scale[d]
                scale[d] *= p.stride[d]
        groups = {p.groups for p in convs} | {
            r.shortcut_groups
            for r in self.residuals
            if r.shortcut and r.fusable and i <= r.start and r.end <= j
        }
        if not groups:  # every conv pruned: the identity, a 1x1 depthwise conv
            groups = {every[0].in_channels}
        return BlockGeometry(
            start=i,
            end=j,
            in_channels=every[0].in_channels,
            out_channels=every[-1].out_channels,
            kernel=(kernel[0], kernel[1]),
            stride=(scale[0], scale[1]),
            padding=front_padding([p.stride for p in convs], [p.padding for p in convs]),
            groups=groups.pop() if len(groups) == 1 else 1,
            in_shape=every[0].in_shape,
            out_shape=every[-1].shape,
        )

    def signature(self) -> tuple[Any, ...]:
        """What must match for a model to be linearized/merged with this chain."""
        return (
            tuple((p.conv, p.shape, p.kernel, p.stride, p.groups) for p in self.positions),
            tuple((r.start, r.end, r.shortcut) for r in self.residuals),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (positions, residuals, barriers, blocks) for files and reports."""
        return {
            "num_positions": self.num_positions,
            "mode": self.mode,
            "max_kernel_size": self.max_kernel_size,
            "input_shape": list(self.input_shape),
            "exclude": list(self.exclude),
            "leaf_modules": [m if isinstance(m, str) else m.__name__ for m in self.leaf_modules],
            "positions": [asdict(p) for p in self.positions],
            "residuals": [asdict(r) for r in self.residuals],
            "barriers": {str(k): v for k, v in sorted(self.barriers.items())},
            "activation_positions": list(self.activation_positions),
            "blocks": [list(b) for b in self.blocks],
        }

    def to_json(self) -> str:
        """JSON text of ``to_dict()``."""
        return json.dumps(self.to_dict(), indent=1)


# ---------------------------------------------------------------------------------------------
# tracing


class _Tracer(fx.Tracer):
    """fx tracer that remembers which module it is inside, to name it when tracing fails."""

    def __init__(self, leaf_modules: Sequence[str], leaf_types: Sequence[type]) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.leaf_types = tuple(leaf_types)
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if is_known_module(m):
            return True  # a recognised kind (subclasses keeping its forward too) is one node
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module is the first to see it
                self.failed_in = self.path_of_module(m)
            raise


def symbolic_trace(model: nn.Module, leaf_modules: Iterable[str | type] = ()) -> fx.GraphModule:
    """torch.fx trace of ``model`` whose failures become a TraceError naming the module."""
    names = [m for m in leaf_modules if isinstance(m, str)]
    types = [m for m in leaf_modules if isinstance(m, type)]
    missing = [n for n in names if n not in dict(model.named_modules())]
    if missing:
        raise TraceError(f"leaf_modules {missing} are not submodules of {type(model).__name__}")
    tracer = _Tracer(names, types)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        where = tracer.failed_in or ""
        if where:
            sub = model.get_submodule(where)
            place = f"module '{where}' ({type(sub).__name__})"
            fix = (
                f"pass leaf_modules=['{where}'] to keep it opaque (it then becomes a hard "
                "boundary), or trace a sub-module that avoids it"
            )
        else:
            place = f"the forward of {type(model).__name__}"
            fix = "trace a sub-module (e.g. model.features) or make its forward fx-traceable"
        raise TraceError(
            f"torch.fx cannot trace {place}: {type(exc).__name__}: {exc}. Fix: {fix}; "
            "data-dependent Python control flow is the usual cause"
        ) from None
    return fx.GraphModule(tracer.root, _portable_graph(graph), type(model).__name__)


def _portable_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` on fx's default tracer, without type annotations, so its module
    pickles and unpickles on every supported torch without depthcompress or the user's code.

    The copy forgets our tracer class (unpickling re-traces with the graph's tracer class, and
    ours is neither importable without depthcompress nor constructible without arguments). The
    annotations go because the saved code imports every annotation's type on load, and a string
    annotation (``from __future__ import annotations`` in the user's file) breaks
    ``GraphModule.__reduce__`` on torch 2.11.
    """
    portable = fx.Graph()
    out = portable.graph_copy(graph, {})
    portable.output(out)
    for node in portable.nodes:
        node.type = None
    return portable


def prepare(
    model: nn.Module, example_input: torch.Tensor, leaf_modules: Iterable[str | type] = ()
) -> fx.GraphModule:
    """Trace an eval-mode deep copy of ``model`` and record every node's shape.

    The copy keeps the user's module untouched (shape propagation would update BN statistics).
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise TraceError(
            "example_input must be a 4-D tensor (N, C, H, W), e.g. torch.randn(1, 3, 224, 224)"
        )
    work = copy.deepcopy(model).eval()
    gm = symbolic_trace(work, leaf_modules)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input.to(**param_place(work)))
    except Exception as exc:
        raise TraceError(
            f"running the traced model on an input of shape {tuple(example_input.shape)} failed: "
            f"{type(exc).__name__}: {exc}. Fix: pass an example input the model accepts"
        ) from None
    return gm


def param_place(model: nn.Module) -> dict[str, Any]:
    """Device and floating dtype of a model's parameters, for inputs made on its behalf."""
    for p in model.parameters():
        if p.is_floating_point():
            return {"device": p.device, "dtype": p.dtype}
    return {"device": torch.device("cpu"), "dtype": torch.float32}


# ---------------------------------------------------------------------------------------------
# graph analysis


@dataclass(eq=False)
class _Unit:
    """A conv of the chain, its BN and the identity-like nodes after them (``tail``)."""

    conv: fx.Node
    bn: fx.Node | None
    tail: fx.Node
    module: nn.Conv2d
    mergeable: bool
    why_not: str


@dataclass(frozen=True)
class _Output:
    """A unit's position tensor (after its BN, residual add, activation and a BN right after the
    activation) and that post-activation BN, if any."""

    node: fx.Node
    post_bn: fx.Node | None = None


@dataclass
class _Join:
    add: fx.Node
    branch: _Unit
    skip: fx.Node
    shortcut: _Unit | None
    units: list[_Unit]
    reader: fx.Node  # what reads the skip's source: the shortcut conv, a pass-through, or the add


class _Analysis:
    """Conv units, residual joins and positions of a shape-propagated GraphModule.

    Joins are classified in one pass in graph (topological) order: classifying an add only looks
    upstream of it (the branch's convs, the skip's source), at adds already classified. Each
    unit's position then follows from the joins.
    """

    def __init__(self, gm: fx.GraphModule, exclude: Sequence[str]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.exclude = tuple(exclude)
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.units: list[_Unit] = []
        self.by_tail: dict[fx.Node, _Unit] = {}
        for node in gm.graph.nodes:
            if is_conv(self.module_of(node)) and not self._excluded(node.target):
                unit = self._make_unit(node)
                self.units.append(unit)
                self.by_tail[unit.tail] = unit
        self.conv_nodes = {u.conv for u in self.units}
        self.joins: dict[fx.Node, _Join] = {}
        for node in gm.graph.nodes:
            join = self._classify(node) if self.is_add(node) else None
            if join is not None:
                self.joins[node] = join
        self.outputs: dict[fx.Node, _Output] = {u.conv: self._output(u) for u in self.units}

    def _excluded(self, name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in self.exclude)

    # -- node kinds --------------------------------------------------------------------------
    def module_of(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def activation_kind(self, node: fx.Node) -> str | None:
        mod = self.module_of(node)
        if mod is not None:
            return activation_module_kind(mod)
        if node.op == "call_function":
            return activation_function_kind(node.target)
        if node.op == "call_method":
            return activation_method_kind(node.target)
        return None

    def is_add(self, node: fx.Node) -> bool:
        if node.op == "call_function" and node.target in ADD_FUNCTIONS:
            pass
        elif not (node.op == "call_method" and node.target in ADD_METHODS):
            return False
        return (
            len(node.args) == 2
            and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args)
        )

    def is_passthrough(self, node: fx.Node) -> bool:
        mod = self.module_of(node)
        if mod is not None:
            return is_passthrough_module(mod)
        return node.op == "call_function" and is_passthrough_function(node.target)

    def is_bn(self, node: fx.Node) -> bool:
        return is_batchnorm(self.module_of(node)) and self.calls[node.target] == 1

    def is_post_bn(self, node: fx.Node) -> bool:
        """A BN right after an activation whose only user is a conv of the chain: part of the
        activation's position (folded back into the conv before it when the activation goes)."""
        user = self.only_user(node)
        return (
            self.is_bn(node)
            and user is not None
            and user in self.conv_nodes
            and user.args[0] is node
        )

    @staticmethod
    def only_user(node: fx.Node) -> fx.Node | None:
        return next(iter(node.users)) if len(node.users) == 1 else None

    # -- units ---------------------------------------------------------------------------------
    def _make_unit(self, conv: fx.Node) -> _Unit:
        mod = self.modules[conv.target]
        why = ""
        if mod.padding_mode != "zeros":
            why = f"padding_mode='{mod.padding_mode}' (only zero padding merges)"
        elif isinstance(mod.padding, str) and mod.padding != "valid":
            eff = [d * (k - 1) for k, d in zip(mod.kernel_size, mod.dilation, strict=True)]
            if any(e % 2 for e in eff):
                why = "padding='same' with an even kernel pads asymmetrically"
        if not why and self.calls[conv.target] > 1:
            why = "the module is called more than once (shared weights)"
        if not why and len(conv.args) != 1:
            why = "called with extra arguments"
        bn = None
        tail = conv
        user = self.only_user(conv)
        if user is not None and self.is_bn(user):
            bn = tail = user
        while (user := self.only_user(tail)) is not None and self.is_passthrough(user):
            tail = user
        return _Unit(conv, bn, tail, mod, not why, why)

    def input_of(self, unit: _Unit) -> fx.Node:
        return unit.conv.args[0]

    def pos(self, unit: _Unit) -> fx.Node:
        """The node holding a unit's position tensor."""
        return self.outputs[unit.conv].node

    def _output(self, unit: _Unit) -> _Output:
        """Where a unit's position tensor is, given the joins classified so far."""
        node = unit.tail
        user = self.only_user(node)
        join = self.joins.get(user) if user is not None else None
        if join is not None and join.branch is unit:
            node = user
        user = self.only_user(node)
        if user is None or self.activation_kind(user) is None:
            return _Output(node)
        after = self.only_user(user)
        if after is not None and self.is_post_bn(after):
            return _Output(after, after)
        return _Output(user)

    def producer(self, node: fx.Node) -> _Unit | None:
        """The unit whose position tensor is ``node``, if any (only upstream joins are read)."""
        candidates = [node]
        cur = node
        for _ in range(2):  # back through a post-activation BN, then the activation
            if not cur.args or not isinstance(cur.args[0], fx.Node):
                break
            if self.activation_kind(cur) is None and not self.is_bn(cur):
                break
            cur = cur.args[0]
            candidates.append(cur)
        for n in candidates:
            join = self.joins.get(n)
            for unit in (self.by_tail.get(n), join.branch if join is not None else None):
                if unit is not None and self._output(unit).node is node:
                    return unit
        return None

    def reaches(self, unit: _Unit, source: fx.Node) -> list[_Unit] | None:
        """Units from the one reading ``source`` up to ``unit``, if they form a linear chain."""
        path = [unit]
        for _ in range(len(self.units) + 1):
            inp = self.input_of(path[-1])
            if inp is source:
                return path[::-1]
            prev = self.producer(inp) if isinstance(inp, fx.Node) else None
            if prev is None or prev in path:
                return None
            path.append(prev)
        return None

    def skip_source(self, node: fx.Node, reader: fx.Node) -> tuple[fx.Node, fx.Node]:
        """Back from a skip operand through identity-like nodes used only by the skip: the tensor
        the skip really carries, and the node that reads it."""
        while (
            self.is_passthrough(node)
            and len(node.users) == 1
            and node.args
            and isinstance(node.args[0], fx.Node)
        ):
            node, reader = node.args[0], node
        return node, reader

    def _shortcut(self, skip_node: fx.Node, branch: _Unit) -> _Unit | None:
        """The conv unit ending at a skip operand, if it can serve as a projection shortcut."""
        shortcut = self.by_tail.get(skip_node)
        if shortcut is None or shortcut is branch or not shortcut.mergeable:
            return None
        return shortcut if len(skip_node.users) == 1 else None

    def _classify(self, add: fx.Node) -> _Join | None:
        """An add as a residual join (branch + identity or conv shortcut), identity preferred."""
        found: list[_Join] = []
        a, b = add.args
        for branch_node, skip_node in ((a, b), (b, a)):
            branch = self.by_tail.get(branch_node)
            if branch is None or len(branch_node.users) != 1:
                continue
            shortcut = self._shortcut(skip_node, branch)
            if shortcut is not None:
                source, reader = self.skip_source(self.input_of(shortcut), shortcut.conv)
            else:
                source, reader = self.skip_source(skip_node, add)
            units = self.reaches(branch, source)
            if units is not None:
                found.append(_Join(add, branch, skip_node, shortcut, units, reader))
        found.sort(key=lambda j: j.shortcut is not None)
        return found[0] if found else None


def _order_units(an: _Analysis, chain_units: list[_Unit]) -> list[_Unit]:
    """Graph order, except that each linear chain is followed to its end before the next."""
    readers: dict[fx.Node, list[_Unit]] = {}
    for u in chain_units:
        readers.setdefault(an.input_of(u), []).append(u)
    order: list[_Unit] = []
    done: set[fx.Node] = set()
    for u in chain_units:
        cur: _Unit | None = u
        while cur is not None and cur.conv not in done:
            order.append(cur)
            done.add(cur.conv)
            nxt = [w for w in readers.get(an.pos(cur), []) if w.conv not in done]
            cur = nxt[0] if nxt else None
    return order


def trace(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    mode: str = "general",
    max_kernel_size: int | None = 15,
    exclude: Iterable[str] = (),
    leaf_modules: Iterable[str | type] = (),
) -> ConvChain:
    """Trace ``model`` into a ConvChain of convolution positions and mergeable blocks.

    ``mode="reference"`` adds the paper's stride rule (no block crosses the position after a
    strided conv's successor); ``"general"`` merges across strides. ``exclude`` keeps convs (by
    module name or prefix, e.g. a stem) out of the chain; ``leaf_modules`` are traced as opaque.
    The model is deep-copied and traced in eval mode; it is never modified.
    """
    if mode not in MODES:
        raise TraceError(f"mode must be one of {MODES}, got {mode!r}")
    if max_kernel_size is not None and max_kernel_size < 1:
        raise TraceError(f"max_kernel_size must be ≥ 1 or None, got {max_kernel_size}")
    exclude = tuple(exclude)
    leaf = tuple(leaf_modules)
    names = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise TraceError(f"exclude names {unknown} are not submodules of the model")
    gm = prepare(model, example_input, leaf)
    return analyze(gm, mode=mode, max_kernel_size=max_kernel_size, exclude=exclude, leaf=leaf)


def analyze(
    gm: fx.GraphModule,
    *,
    mode: str,
    max_kernel_size: int | None,
    exclude: tuple[str, ...],
    leaf: tuple[str | type, ...],
) -> ConvChain:
    """Build the ConvChain of a traced, shape-propagated GraphModule."""
    an = _Analysis(gm, exclude)
    if not an.units:
        unknown = _overriding_modules(gm)
        raise NoConvolutionError(
            f"{gm.__class__.__name__} has no nn.Conv2d to compress"
            + (f" outside the excluded modules {list(exclude)}" if exclude else "")
            + ": depthcompress merges 2-D convolutions"
            + "".join(f"; {c.__name__} ({p}) is {_overriding_note(c)}" for p, c in unknown.items())
        )
    shortcuts = {j.shortcut.conv for j in an.joins.values() if j.shortcut is not None}
    units = _order_units(an, [u for u in an.units if u.conv not in shortcuts])
    index = {u.conv: k for k, u in enumerate(units, start=1)}

    def shape(node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    first_in = an.input_of(units[0])
    positions = [Position(index=0, shape=shape(first_in), out_node=first_in.name)]
    for k, u in enumerate(units, start=1):
        mod = u.module
        out = an.pos(u)
        post_bn = an.outputs[u.conv].post_bn
        act = post_bn.args[0] if post_bn is not None else out
        act = act if an.activation_kind(act) is not None and act is not u.tail else None
        pre = act.args[0] if act is not None else out
        padding = _padding_of(mod)
        positions.append(
            Position(
                index=k,
                shape=shape(out),
                conv=u.conv.target,
                bn=u.bn.target if u.bn is not None else None,
                activation=an.activation_kind(act) if act is not None else None,
                post_bn=post_bn.target if post_bn is not None else None,
                kernel=pair(mod.kernel_size),
                dilation=pair(mod.dilation),
                stride=pair(mod.stride),
                padding=padding,
                groups=mod.groups,
                in_channels=mod.in_channels,
                out_channels=mod.out_channels,
                in_shape=shape(an.input_of(u)),
                mergeable=u.mergeable,
                conv_node=u.conv.name,
                input_node=an.input_of(u).name,
                tail_node=u.tail.name,
                pre_act_node=pre.name,
                act_node=act.name if act is not None else None,
                post_bn_node=post_bn.name if post_bn is not None else None,
                out_node=out.name,
            )
        )
    n = len(units)
    barriers: dict[int, str] = {}

    def bar(p: int, why: str) -> None:
        if 0 < p < n and p not in barriers:
            barriers[p] = why

    residuals: list[Residual] = []
    skip_users: dict[int, set[fx.Node]] = {}
    for join in an.joins.values():
        if join.branch.conv not in index:
            continue
        ks = [index.get(u.conv) for u in join.units]
        if None in ks or ks != list(range(ks[0], ks[0] + len(ks))):
            continue
        s, t = ks[0] - 1, ks[-1]
        sc = join.shortcut
        residuals.append(
            Residual(
                start=s,
                end=t,
                add_node=join.add.name,
                skip_node=join.skip.name,
                shortcut=sc.conv.target if sc else None,
                shortcut_bn=sc.bn.target if sc and sc.bn is not None else None,
                shortcut_node=sc.conv.name if sc else None,
                shortcut_tail=sc.tail.name if sc else None,
                shortcut_padding=_padding_of(sc.module) if sc else (0, 0),
                shortcut_groups=sc.module.groups if sc else 1,
                shortcut_kernel=_effective_kernel(sc.module) if sc else (1, 1),
            )
        )
        skip_users.setdefault(s, set()).add(join.reader)
    residuals.sort(key=lambda r: (r.start, r.end))

    for k in range(1, n + 1):
        u = units[k - 1]
        if not u.mergeable:
            bar(k - 1, f"conv {u.conv.target} cannot merge: {u.why_not}")
            bar(k, f"conv {u.conv.target} cannot merge: {u.why_not}")
        if mode == "reference" and max(pair(u.module.stride)) > 1:
            bar(k + 1, f"reference stride rule: conv {k} ({u.conv.target}) has stride > 1")
        if k < n:
            out = an.pos(u)
            nxt = units[k]
            if an.input_of(nxt) is not out:
                bar(k, _not_read_reason(an, out, nxt, k))
                continue
            allowed = {nxt.conv} | skip_users.get(k, set())
            others = [usr for usr in out.users if usr not in allowed]
            if others:
                bar(
                    k,
                    f"position {k} also feeds {_describe_all(an, others)} besides conv "
                    f"{nxt.conv.target}: a block through it would lose that tensor",
                )

    chain = ConvChain(
        positions=tuple(positions),
        residuals=tuple(residuals),
        barriers=dict(sorted(barriers.items())),
        mode=mode,
        max_kernel_size=max_kernel_size,
        input_shape=_input_shape(gm),
        exclude=exclude,
        leaf_modules=leaf,
    )
    residuals = [_check_fusable(chain, r, an) for r in residuals]
    chain = replace(chain, residuals=tuple(residuals))
    reasons = _invalid_blocks(chain)
    blocks = tuple((i, j) for i in range(n) for j in range(i + 1, n + 1) if (i, j) not in reasons)
    return replace(chain, blocks=blocks, invalid_reasons=reasons)


def _overriding_modules(gm: fx.GraphModule) -> dict[str, type]:
    """Conv and BN subclasses with their own forward that the trace went into, by module path."""
    found: dict[str, type] = {}
    for node in gm.graph.nodes:
        path_cls = _overriding_module(node)
        if path_cls is not None:
            found.setdefault(*path_cls)
    return found


def _overriding_module(node: fx.Node) -> tuple[str, type] | None:
    """The innermost conv or BN subclass with its own forward that ``node`` was traced inside."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in reversed(list(stack.values())):
        if isinstance(cls, type) and overridden_base(cls) is not None:
            return path, cls
    return None


def _overriding_note(cls: type) -> str:
    """Why a conv/BN subclass with its own forward is not recognised, and how to register it."""
    base = overridden_base(cls)
    name = base.__name__ if base is not None else "Conv2d"
    return (
        f"a {name} subclass that overrides forward (not taken for a {name}: if its forward "
        f"computes exactly that, call {how_to_register(cls)})"
    )


def _describe(an: _Analysis, node: fx.Node) -> str:
    """A node as a person reads it: 'a MaxPool2d (features.2)', 'max_pool2d() (max_pool2d)'."""
    inside = _overriding_module(node)
    if inside is not None:
        path, cls = inside
        return f"a {cls.__name__} ({path}), {_overriding_note(cls)}"
    mod = an.module_of(node)
    if mod is not None:
        kind = type(mod).__name__
        return f"{'an' if kind[0] in 'AEIOU' else 'a'} {kind} ({node.target})"
    if node.op == "placeholder":
        return f"the network input '{node.name}'"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}() ({node.name})"
    if node.op == "call_method":
        return f".{node.target}() ({node.name})"
    return f"'{node.name}'"


def _describe_all(an: _Analysis, nodes: Sequence[fx.Node]) -> str:
    words = _words(an, nodes)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _words(an: _Analysis, nodes: Sequence[fx.Node]) -> list[str]:
    """Distinct descriptions of ``nodes`` (the nodes traced inside one module read as one)."""
    return list(dict.fromkeys(_describe(an, n) for n in nodes))


def _not_read_reason(an: _Analysis, out: fx.Node, nxt: _Unit, k: int) -> str:
    """Why conv ``nxt`` does not read position ``k``: the nodes in between, or another source."""
    path: list[fx.Node] = []
    node = an.input_of(nxt)
    while node is not out and len(path) < 8:
        path.append(node)
        node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node is None:
            break
    conv = f"conv {nxt.conv.target}"
    if node is not out:
        return (
            f"{conv} reads {_describe(an, an.input_of(nxt))}, not position {k}: it does not "
            "continue the chain of convs before it"
        )
    path.reverse()
    verb = "lies" if len(_words(an, path)) == 1 else "lie"
    why = f"{_describe_all(an, path)} {verb} between position {k} and {conv}"
    readers = [u for n in [out, *path] for u in n.users if u not in path and u is not nxt.conv]
    if readers:
        why += f" (and {_describe_all(an, readers)} also read{'s' if len(readers) == 1 else ''} it)"
    return why


def _input_shape(gm: fx.GraphModule) -> tuple[int, ...]:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            meta = node.meta.get("tensor_meta")
            return tuple(meta.shape) if meta is not None else ()
    return ()


def _padding_of(mod: nn.Conv2d) -> Pair:
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for k, d in zip(mod.kernel_size, mod.dilation, strict=True))
    return pair(mod.padding)


def _effective_kernel(mod: nn.Conv2d) -> Pair:
    """A conv's kernel size once its dilation is expanded into zeros."""
    return (
        mod.dilation[0] * (mod.kernel_size[0] - 1) + 1,
        mod.dilation[1] * (mod.kernel_size[1] - 1) + 1,
    )


def _check_fusable(chain: ConvChain, r: Residual, an: _Analysis) -> Residual:
    """Whether residual ``r`` can be absorbed into a merged kernel (ALGORITHM.md §3)."""
    branch = chain.positions[r.start + 1 : r.end + 1]
    if not all(p.mergeable for p in branch):
        return replace(r, fusable=False, reason="a conv of its branch cannot merge")
    inside = [b for b in chain.barriers if r.start < b < r.end]
    if inside:
        return replace(r, fusable=False, reason=f"hard boundary {inside[0]} inside its branch")
    geo = chain.geometry(r.start, r.end)
    if r.shortcut is None:
        if geo.stride != (1, 1) or geo.in_channels != geo.out_channels:
            return replace(r, fusable=False, reason="identity skip around a strided branch")
        size, offset = (1, 1), geo.padding
    else:
        mod = an.modules[r.shortcut]
        if pair(mod.stride) != geo.stride:
            return replace(r, fusable=False, reason="shortcut stride differs from the branch")
        size = r.shortcut_kernel
        ps = _padding_of(mod)
        offset = (geo.padding[0] - ps[0], geo.padding[1] - ps[1])
    if not all(0 <= offset[d] <= geo.kernel[d] - size[d] for d in range(2)):
        return replace(r, fusable=False, reason="shortcut taps fall outside the branch kernel")
    return r


def _invalid_blocks(chain: ConvChain) -> dict[tuple[int, int], str]:
    """Reason for every span (i, j) that is not a mergeable block."""
    n = chain.num_positions
    reasons: dict[tuple[int, int], str] = {}
    for i in range(n):
        for j in range(i + 1, n + 1):
            why = _block_reason(chain, i, j)
            if why is not None:
                reasons[(i, j)] = why
    return reasons


def _block_reason(chain: ConvChain, i: int, j: int) -> str | None:
    for r in chain.residuals:
        if i < r.start < j < r.end or r.start < i < r.end < j:
            return f"it cuts residual ({r.start}, {r.end}) partway (blocks must nest or avoid it)"
        if i <= r.start and r.end <= j and (i, j) != (r.start, r.end) and not r.fusable:
            return f"residual ({r.start}, {r.end}) inside it cannot be fused: {r.reason}"
    if j == i + 1:
        return None
    for b in range(i + 1, j):
        if b in chain.barriers:
            return f"position {b} is a hard boundary: {chain.barriers[b]}"
    geo = chain.geometry(i, j)
    limit = chain.max_kernel_size
    if limit is not None and max(geo.kernel) > limit:
        return f"merged kernel {geo.kernel[0]}x{geo.kernel[1]} exceeds max_kernel_size={limit}"
    for d in range(2):
        size = geo.in_shape[2 + d] + 2 * geo.padding[d] - geo.kernel[d]
        if size < 0 or size // geo.stride[d] + 1 != geo.out_shape[2 + d]:
            return "the merged conv would not reproduce the original output size"
    return None


def example_input_for(chain: ConvChain, seed: int = 0) -> torch.Tensor:
    """A deterministic random input of the chain's traced input shape."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(chain.input_shape, generator=gen)


def check_model_matches(chain: ConvChain, other: ConvChain) -> None:
    """Raise if a model traced now does not have the structure ``chain`` was made from."""
    if chain.signature() != other.signature():
        raise DepthCompressError(
            "the model does not match the chain it is used with (different convolutions, "
            "shapes or residuals): trace this model again with depthcompress.trace()"
        )
