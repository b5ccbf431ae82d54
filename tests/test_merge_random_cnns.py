"""Property tests: trace → linearize → merge on random small CNNs (ALGORITHM.md §2–§3, §10.3–4).

A hypothesis strategy draws a layer configuration (convs of random kernel/stride/dilation/groups/
padding, optional BN with random statistics, optional activations in module or functional form,
residuals with identity or 1x1-conv shortcuts in several add spellings, an optional max-pool), and
an fx-traceable ``RandomCNN`` is built from it. For both tracing modes we check that the identity
plan reproduces the model, that random valid plans merge exactly into fewer convs, and that the
input model is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch import nn

import depthcompress as dc


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread avoids OpenMP hand-off costs, which dominate
    (≈15 ms per 4-channel conv with 2 threads on a busy 2-core machine, 60 µs with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REL_TOL = 1e-4
ACT_KINDS = ("relu", "relu6", "hardswish", "leakyrelu", "silu")
ACT_MODULES = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "leakyrelu": nn.LeakyReLU,
    "silu": nn.SiLU,
}
ACT_FUNCTIONS = {
    "relu": F.relu,
    "torch.relu": torch.relu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "leakyrelu": F.leaky_relu,
    "silu": F.silu,
}


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Act:
    kind: str
    form: str  # "module", "module_inplace", "functional", "torch.relu", "method"

    def describe(self) -> str:
        return f"{self.kind}/{self.form}"


@dataclass(frozen=True)
class Layer:
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    bias: bool
    bn: bool
    act: Act | None

    @property
    def effective(self) -> tuple[int, int]:
        return tuple(self.dilation[d] * (self.kernel[d] - 1) + 1 for d in range(2))

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple(
            (size[d] + 2 * self.padding[d] - self.effective[d]) // self.stride[d] + 1
            for d in range(2)
        )

    def describe(self) -> str:
        return (
            f"conv {self.cin}->{self.cout} k{self.kernel} s{self.stride} d{self.dilation} "
            f"p{self.padding} g{self.groups}{' +b' if self.bias else ''}{' bn' if self.bn else ''}"
            f"{' ' + self.act.describe() if self.act else ''}"
        )


@dataclass(frozen=True)
class Res:
    """A residual around ``layers``. ``style``: "resnet" (activation after the add), "mbv2" (no
    activation), "preadd" (the last layer's activation sits before the add: not a residual the
    library can fuse, a hard boundary instead). ``shortcut``: None (identity) or a kernel size."""

    layers: tuple[Layer, ...]
    style: str
    shortcut: int | None
    shortcut_bn: bool
    add_form: str  # "x+y", "y+x", "torch.add(y,x)", "torch.add(x,y)", "y.add(x)", "y+=x"
    post_act: Act | None

    def describe(self) -> str:
        inner = "; ".join(layer.describe() for layer in self.layers)
        sc = "identity" if self.shortcut is None else f"conv{self.shortcut}x{self.shortcut}"
        sc += " bn" if self.shortcut_bn else ""
        act = f" then {self.post_act.describe()}" if self.post_act else ""
        return f"res[{self.style} {sc} {self.add_form}{act}]({inner})"


@dataclass(frozen=True)
class Pool:
    form: str  # "down" (2x2 stride 2), "same" (3x3 stride 1 pad 1), "functional"

    def describe(self) -> str:
        return f"maxpool/{self.form}"


@dataclass(frozen=True)
class Config:
    height: int
    width: int
    items: tuple[Layer | Res | Pool, ...]
    seed: int

    @property
    def num_layers(self) -> int:
        return sum(
            len(it.layers) if isinstance(it, Res) else isinstance(it, Layer) for it in self.items
        )

    def describe(self) -> str:
        return f"input 4x{self.height}x{self.width} seed {self.seed}\n  " + "\n  ".join(
            it.describe() for it in self.items
        )


def config_problem(cfg: Config) -> str | None:
    """Why a configuration cannot be built (None when it can): shapes and channel groups."""
    size, c = (cfg.height, cfg.width), 4
    layers_seen = 0
    for it in cfg.items:
        if isinstance(it, Pool):
            if it.form != "same" and min(size) < 2:
                return "pool on a map smaller than 2"
            size = size if it.form == "same" else (size[0] // 2, size[1] // 2)
            continue
        group = it.layers if isinstance(it, Res) else (it,)
        start_size, start_c = size, c
        for layer in group:
            if layer.cin != c or c % layer.groups or layer.cout % layer.groups:
                return f"channels do not fit at {layer.describe()}"
            if any(size[d] + 2 * layer.padding[d] < layer.effective[d] for d in range(2)):
                return f"kernel larger than the padded map at {layer.describe()}"
            size, c = layer.out_size(size), layer.cout
            layers_seen += 1
        if isinstance(it, Res):
            if size != start_size:
                return "residual branch changes the map size"
            if it.shortcut is None and c != start_c:
                return "identity residual changes the channel count"
    if not 2 <= layers_seen <= 7:
        return f"{layers_seen} layers"
    return None


# ---------------------------------------------------------------------------------------------
# strategies


def acts(draw, allow_none: bool = True) -> Act | None:
    if allow_none and draw(st.integers(0, 2)) == 0:
        return None
    kind = draw(st.sampled_from(ACT_KINDS))
    forms = ["module", "functional"]
    if kind == "relu":
        forms += ["module_inplace", "torch.relu", "method"]
    return Act(kind, draw(st.sampled_from(forms)))


def draw_layer(draw, cin: int, size, *, residual: bool, cout: int | None = None) -> Layer:
    """One conv layer reading ``cin`` channels of a ``size`` map. Inside a residual it runs at
    stride 1 with symmetric "same" padding (odd effective kernel), so the map keeps its size."""
    if cout is None:
        cout = draw(st.sampled_from([4, 8]))
    kinds = ["dense", "grouped"] + (["depthwise", "depthwise"] if cout == cin else [])
    kind = draw(st.sampled_from(kinds))
    groups = {"dense": 1, "grouped": 2, "depthwise": cin}[kind]
    kh = draw(st.integers(1, 5))
    kw = kh if draw(st.integers(0, 3)) else draw(st.integers(1, 5))
    dilation = draw(st.sampled_from([(1, 1), (1, 1), (2, 2), (1, 2)]))
    if residual:
        stride = (1, 1)
        # make every effective kernel odd so "same" padding is symmetric
        kh = kh - 1 if dilation[0] * (kh - 1) % 2 else kh
        kw = kw - 1 if dilation[1] * (kw - 1) % 2 else kw
        padding = (dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2)
    else:
        stride = draw(st.sampled_from([(1, 1), (1, 1), (2, 2), (2, 2), (1, 2), (2, 1)]))
        stride = stride if min(size) >= 6 else (1, 1)
        padding = (
            draw(st.integers(0, kh // 2 * dilation[0])),
            draw(st.integers(0, kw // 2 * dilation[1])),
        )
        # shrink the kernel until it fits the padded map
        dil, ks = list(dilation), [kh, kw]
        for d in range(2):
            while size[d] + 2 * padding[d] < dil[d] * (ks[d] - 1) + 1:
                if dil[d] > 1:
                    dil[d] = 1
                else:
                    ks[d] -= 1
        dilation, (kh, kw) = (dil[0], dil[1]), ks
    return Layer(
        cin=cin,
        cout=cout,
        kernel=(kh, kw),
        stride=stride,
        dilation=dilation,
        padding=padding,
        groups=groups,
        bias=draw(st.booleans()),
        bn=draw(st.integers(0, 2)) > 0,
        act=acts(draw),
    )


@st.composite
def configs(draw) -> Config:
    height, width = draw(st.integers(15, 21)), draw(st.integers(15, 21))
    n_layers = draw(st.integers(2, 7))
    items: list[Layer | Res | Pool] = []
    size, c, count, pooled = (height, width), 4, 0, False
    while count < n_layers:
        left = n_layers - count
        kind = draw(st.sampled_from(["layer", "layer", "res", "res", "pool"]))
        if kind == "pool":
            if pooled or count == 0 or min(size) < 4:
                kind = "layer"
            else:
                pooled = True
                form = draw(st.sampled_from(["down", "same", "functional"]))
                items.append(Pool(form))
                size = size if form == "same" else (size[0] // 2, size[1] // 2)
                continue
        if kind == "layer":
            layer = draw_layer(draw, c, size, residual=False)
            items.append(layer)
            size, c, count = layer.out_size(size), layer.cout, count + 1
            continue
        n = draw(st.integers(1, min(3, left)))
        style = draw(st.sampled_from(["resnet", "resnet", "mbv2", "mbv2", "preadd"]))
        shortcut = None
        if style != "preadd" and draw(st.integers(0, 2)) == 0:
            shortcut = draw(st.sampled_from([1, 1, 1, 3]))
        layers, cur = [], c
        for k in range(n):
            last = k == n - 1
            cout = c if last and shortcut is None else None
            layer = draw_layer(draw, cur, size, residual=True, cout=cout)
            if last and style != "preadd":
                layer = Layer(**{**layer.__dict__, "act": None})
            if last and style == "preadd" and layer.act is None:
                layer = Layer(**{**layer.__dict__, "act": Act("relu", "module")})
            layers.append(layer)
            cur = layer.cout
        post = acts(draw, allow_none=False) if style == "resnet" else None
        items.append(
            Res(
                layers=tuple(layers),
                style=style,
                shortcut=shortcut,
                shortcut_bn=shortcut is not None and draw(st.integers(0, 2)) > 0,
                add_form=draw(
                    st.sampled_from(
                        ["x+y", "y+x", "torch.add(y,x)", "torch.add(x,y)", "y.add(x)", "y+=x"]
                    )
                ),
                post_act=post,
            )
        )
        c, count = cur, count + n
    return Config(height, width, tuple(items), draw(st.integers(0, 2**20)))


# ---------------------------------------------------------------------------------------------
# the model


class RandomCNN(nn.Module):
    """fx-traceable CNN built from a Config; forward follows the (static) item list."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.convs = nn.ModuleDict()
        self.bns = nn.ModuleDict()
        self.acts = nn.ModuleDict()
        self.pools = nn.ModuleDict()
        gen = torch.Generator().manual_seed(cfg.seed)
        n = 0
        for idx, it in enumerate(cfg.items):
            if isinstance(it, Pool):
                if it.form != "functional":
                    stride = 2 if it.form == "down" else 1
                    k = 2 if it.form == "down" else 3
                    self.pools[f"p{idx}"] = nn.MaxPool2d(k, stride, padding=k // 2 * (stride == 1))
                continue
            for layer in it.layers if isinstance(it, Res) else (it,):
                self._add_layer(f"l{n}", layer, gen)
                n += 1
            if isinstance(it, Res):
                if it.shortcut is not None:
                    k = it.shortcut
                    sc = Layer(
                        it.layers[0].cin, it.layers[-1].cout, (k, k), (1, 1), (1, 1),
                        (k // 2, k // 2), 1, False, it.shortcut_bn, None,
                    )  # fmt: skip
                    self._add_layer(f"sc{idx}", sc, gen)
                if it.post_act is not None:
                    self._add_act(f"post{idx}", it.post_act)

    def _add_layer(self, name: str, layer: Layer, gen: torch.Generator) -> None:
        conv = nn.Conv2d(
            layer.cin,
            layer.cout,
            layer.kernel,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias,
        )
        with torch.no_grad():
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (1.5 / fan_in) ** 0.5)
            if layer.bias:
                conv.bias.copy_(torch.randn(layer.cout, generator=gen) * 0.2)
        self.convs[name] = conv
        if layer.bn:
            bn = nn.BatchNorm2d(layer.cout, eps=[1e-5, 1e-3, 0.1][len(self.bns) % 3])
            c = layer.cout
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.3)
                bn.weight.copy_(torch.rand(c, generator=gen) * 1.0 + 0.5)
                bn.bias.copy_(torch.randn(c, generator=gen) * 0.3)
            self.bns[name] = bn
        if layer.act is not None:
            self._add_act(name, layer.act)

    def _add_act(self, name: str, act: Act) -> None:
        if act.form.startswith("module"):
            cls = ACT_MODULES[act.kind]
            self.acts[name] = cls(inplace=True) if act.form == "module_inplace" else cls()

    def _act(self, name: str, act: Act | None, x: torch.Tensor) -> torch.Tensor:
        if act is None:
            return x
        if act.form.startswith("module"):
            return self.acts[name](x)
        if act.form == "torch.relu":
            return torch.relu(x)
        if act.form == "method":
            return x.relu()
        return ACT_FUNCTIONS[act.kind](x)

    def _layer(self, name: str, layer: Layer, x: torch.Tensor, act: bool = True) -> torch.Tensor:
        x = self.convs[name](x)
        if layer.bn:
            x = self.bns[name](x)
        return self._act(name, layer.act, x) if act else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 0
        for idx, it in enumerate(self.cfg.items):
            if isinstance(it, Pool):
                x = F.max_pool2d(x, 2) if it.form == "functional" else self.pools[f"p{idx}"](x)
                continue
            if isinstance(it, Layer):
                x = self._layer(f"l{n}", it, x)
                n += 1
                continue
            skip, y = x, x
            for layer in it.layers:
                y = self._layer(f"l{n}", layer, y)
                n += 1
            if it.shortcut is not None:
                skip = self.convs[f"sc{idx}"](skip)
                if it.shortcut_bn:
                    skip = self.bns[f"sc{idx}"](skip)
            if it.add_form == "x+y":
                x = skip + y
            elif it.add_form == "y+x":
                x = y + skip
            elif it.add_form == "torch.add(y,x)":
                x = torch.add(y, skip)
            elif it.add_form == "torch.add(x,y)":
                x = torch.add(skip, y)
            elif it.add_form == "y.add(x)":
                x = y.add(skip)
            else:
                y += skip
                x = y
            x = self._act(f"post{idx}", it.post_act, x)
        return x


def build(cfg: Config) -> tuple[RandomCNN, torch.Tensor]:
    model = RandomCNN(cfg).eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return model, torch.randn(2, 4, cfg.height, cfg.width, generator=gen)


# ---------------------------------------------------------------------------------------------
# what the configuration says the chain must look like


def expected_structure(cfg: Config, mode: str) -> tuple[set[int], set[int], list[tuple[int, int]]]:
    """(activation positions A0, hard boundaries, residual intervals) implied by ``cfg``."""
    acts_at: set[int] = set()
    barriers: set[int] = set()
    residuals: list[tuple[int, int]] = []
    pos = 0
    layers: list[Layer] = []
    for it in cfg.items:
        if isinstance(it, Pool):
            barriers.add(pos)
            continue
        group = it.layers if isinstance(it, Res) else (it,)
        start = pos
        for layer in group:
            pos += 1
            layers.append(layer)
            if layer.act is not None:
                acts_at.add(pos)
        if isinstance(it, Res):
            if it.style == "preadd":  # add after the activation: fan-out at start, add at end
                barriers.update({start, pos})
            else:
                residuals.append((start, pos))
                if it.post_act is not None:
                    acts_at.add(pos)
    n = pos
    if mode == "reference":
        barriers.update(k + 1 for k, layer in enumerate(layers, start=1) if max(layer.stride) > 1)
    return acts_at, {b for b in barriers if 0 < b < n}, residuals


def with_activations(cfg: Config, keep: frozenset[int], kind: str) -> Config:
    """``cfg`` with activations only at the positions in ``keep``: existing ones stay, missing ones
    are inserted as ``kind`` modules (after the add at a residual end): the function a plan with
    every position a boundary must linearize to (ALGORITHM.md §1, §8.1)."""
    items: list[Layer | Res | Pool] = []
    pos = 0

    def act_at(p: int, act: Act | None) -> Act | None:
        if p not in keep:
            return None
        return act if act is not None else Act(kind, "module")

    for it in cfg.items:
        if isinstance(it, Pool):
            items.append(it)
            continue
        if isinstance(it, Layer):
            pos += 1
            items.append(replace(it, act=act_at(pos, it.act)))
            continue
        layers, post = [], it.post_act
        for n, layer in enumerate(it.layers):
            pos += 1
            if n == len(it.layers) - 1 and it.style != "preadd":
                layers.append(layer)  # its activation slot is after the add
                post = act_at(pos, it.post_act)
            else:
                layers.append(replace(layer, act=act_at(pos, layer.act)))
        items.append(replace(it, layers=tuple(layers), post_act=post))
    return replace(cfg, items=tuple(items))


# ---------------------------------------------------------------------------------------------
# checks


def rel_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    assert expected.shape == actual.shape, (tuple(expected.shape), tuple(actual.shape))
    err = (expected - actual).abs().max().item()
    scale = expected.abs().max().item()
    return err / scale if scale > 0 else err * 1e6


def conv_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], training: bool) -> None:
    assert model.training is training
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} of the input model changed"


def draw_plan(data, chain) -> dc.Plan:
    """Walk from 0 through random valid blocks; keep a random subset of the boundaries as A."""
    valid = set(chain.blocks)
    cur, ends = 0, []
    while cur < chain.num_positions:
        choices = [j for j in range(cur + 1, chain.num_positions + 1) if (cur, j) in valid]
        cur = data.draw(st.sampled_from(choices), label=f"block end from {cur}")
        ends.append(cur)
    keep = data.draw(st.lists(st.booleans(), min_size=len(ends), max_size=len(ends)), label="A")
    return dc.Plan(
        activations=frozenset(e for e, k in zip(ends, keep, strict=True) if k),
        boundaries=frozenset(ends),
    )


def fused_in_block(chain, plan: dc.Plan, i: int, j: int) -> list:
    """Residuals absorbed into the merged kernel of block ``(i, j)`` under ``plan``."""
    return [
        r
        for r in chain.residuals
        if r.fusable
        and i <= r.start < r.end <= j
        and not any(r.start < b < r.end for b in plan.boundaries)
    ]


def assert_blocks_match_geometry(model: nn.Module, merged: nn.Module, chain, plan) -> None:
    """Each block's merged conv has the geometry the chain reports (what latency tables time)."""
    for i, j in plan.blocks:
        conv = merged.get_submodule(f"depthcompress_block_{i}_{j}")
        geo = chain.geometry(i, j)
        effective = tuple(conv.dilation[d] * (conv.kernel_size[d] - 1) + 1 for d in range(2))
        got = (conv.in_channels, conv.out_channels, effective, tuple(conv.stride))
        assert got == (geo.in_channels, geo.out_channels, geo.kernel, geo.stride), (i, j)
        assert tuple(conv.padding) == geo.padding, (i, j)
        shortcut_groups = {
            model.get_submodule(r.shortcut).groups
            for r in fused_in_block(chain, plan, i, j)
            if r.shortcut is not None
        }
        if shortcut_groups - {geo.groups}:
            # Known bug (test_geometry_groups_ignore_an_absorbed_conv_shortcut): geometry() only
            # looks at the chain's convs; an absorbed shortcut of other grouping densifies the
            # merged conv. Check what merge() does, and keep every other block strict.
            event("block absorbs a shortcut of other grouping")
            assert conv.groups == 1, (i, j, conv.groups)
        else:
            assert conv.groups == geo.groups, (i, j, conv.groups, geo.groups)


def expected_conv_count(chain, plan: dc.Plan) -> int:
    """|S| chain convs, plus the shortcut convs of residuals that stay explicit adds."""
    kept_shortcuts = sum(
        1
        for r in chain.residuals
        if r.shortcut is not None
        and not (r.fusable and not any(r.start < b < r.end for b in plan.boundaries))
    )
    return len(plan.boundaries) + kept_shortcuts


@settings(
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(cfg=configs(), data=st.data())
def test_random_cnn_identity_and_random_plans_merge_exactly(cfg, data):
    problem = config_problem(cfg)
    event("valid config" if problem is None else "invalid config")
    assume(problem is None)
    note(cfg.describe())
    event(f"{cfg.num_layers} layers")
    for it in cfg.items:
        if isinstance(it, Res):
            event(f"residual: {it.style}, {len(it.layers)} layers, shortcut {it.shortcut}")
            if it.shortcut is not None and it.shortcut_bn and len(it.layers) > 1:
                event("multi-layer residual with a conv+BN shortcut")
        elif isinstance(it, Pool):
            event("max-pool")
    model, x = build(cfg)
    with torch.no_grad():
        original = model(x)
    before = state_of(model)
    text = repr(model)  # catches e.g. an in-place flag flipped on the user's activations
    n_original = conv_count(model)

    for mode in ("general", "reference"):
        chain = dc.trace(model, x, mode=mode)
        assert_untouched(model, before, training=False)
        note(
            f"{mode}: L={chain.num_positions} barriers={dict(chain.barriers)} blocks={chain.blocks}"
        )
        res = [(r.start, r.end, r.shortcut, r.fusable) for r in chain.residuals]
        note(f"{mode}: residuals={res}")

        # the chain is the one the configuration describes
        acts_at, barriers, residuals = expected_structure(cfg, mode)
        assert chain.num_positions == cfg.num_layers
        assert set(chain.activation_positions) == acts_at
        assert set(chain.barriers) == barriers
        assert [(r.start, r.end) for r in chain.residuals] == residuals

        # (a) identity plan: linearized and merged both reproduce the model
        ident = dc.Plan.identity(chain)
        linear = dc.linearize(model, chain, ident)
        assert not linear.training
        merged = dc.merge(linear, chain, ident)
        with torch.no_grad():
            assert rel_error(original, linear(x)) <= REL_TOL
            out = merged(x)
        assert out.shape == original.shape  # (c)
        assert rel_error(original, out) <= REL_TOL
        assert conv_count(merged) == expected_conv_count(chain, ident)
        assert_blocks_match_geometry(model, merged, chain, ident)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
        assert_untouched(model, before, training=False)

        # activation semantics against an independent model: no merging (S = all positions),
        # a random A; removed activations vanish and missing ones are inserted
        keep = data.draw(st.sets(st.sampled_from(range(1, chain.num_positions + 1))), label="A")
        plan = dc.Plan(activations=frozenset(keep), boundaries=ident.boundaries)
        note(f"{mode} activation plan: {sorted(keep)} (insert {chain.insert_activation})")
        reference = RandomCNN(with_activations(cfg, frozenset(keep), chain.insert_activation))
        reference.load_state_dict(model.state_dict())
        linear = dc.linearize(model, chain, plan)
        merged = dc.merge(linear, chain, plan)
        with torch.no_grad():
            expected = reference.eval()(x)
            assert rel_error(expected, linear(x)) <= REL_TOL
            assert rel_error(expected, merged(x)) <= REL_TOL

        # (b) random valid plans, sometimes with the model in training mode
        for k in range(data.draw(st.integers(1, 3), label="plans")):
            plan = draw_plan(data, chain)
            plan.validate(chain)
            note(f"{mode} plan {k}: {plan.to_dict()}")
            training = data.draw(st.integers(0, 3), label="train mode") == 0
            model.train(training)
            linear = dc.linearize(model, chain, plan)
            assert linear.training is training
            assert_untouched(model, before, training)
            if training:  # one fine-tuning step: merge must use the trained weights
                event("fine-tuned before merging")
                opt = torch.optim.SGD(linear.parameters(), lr=0.05)
                linear(x).square().mean().backward()
                assert all(p.grad is not None for p in linear.parameters())
                opt.step()
                assert_untouched(model, before, training)
            merged = dc.merge(linear, chain, plan)
            assert linear.training is training and not merged.training
            assert_untouched(model, before, training)
            model.eval()
            linear.eval()
            with torch.no_grad():
                expected = linear(x)
                out = merged(x)
            assert out.shape == original.shape  # (c)
            assert rel_error(expected, out) <= REL_TOL
            if any(j - i > 1 for i, j in plan.blocks):
                event("plan merges convs")
                assert conv_count(merged) < n_original
            assert conv_count(merged) == expected_conv_count(chain, plan)
            assert_blocks_match_geometry(model, merged, chain, plan)
            assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
    assert repr(model) == text


def test_generator_builds_the_advertised_variety():
    """The strategy is not degenerate: a fixed sample holds every feature the tests rely on."""
    seen: set[str] = set()

    @settings(derandomize=True, deadline=None, max_examples=60, database=None)
    @given(configs())
    def collect(cfg):
        if config_problem(cfg) is not None:
            seen.add("invalid")
            return
        seen.add("valid")
        for it in cfg.items:
            if isinstance(it, Pool):
                seen.add("pool")
            elif isinstance(it, Res):
                seen.add(f"res:{it.style}")
                seen.add("shortcut" if it.shortcut is not None else "identity")
                seen.add(f"add:{it.add_form}")
            for layer in (
                it.layers if isinstance(it, Res) else (it,) if isinstance(it, Layer) else ()
            ):
                seen.add(f"groups:{'dw' if layer.groups == layer.cin > 2 else layer.groups}")
                seen.add(f"stride:{layer.stride[0]}")
                seen.add(f"dilation:{layer.dilation}")
                if layer.kernel[0] % 2 == 0:
                    seen.add("even kernel")
                if layer.kernel[0] != layer.kernel[1]:
                    seen.add("non-square kernel")
                if layer.act is not None:
                    seen.add(f"act:{layer.act.form}")
        if cfg.height % 2 != cfg.width % 2:
            seen.add("odd/even sizes")

    collect()
    wanted = {
        "valid", "pool", "res:resnet", "res:mbv2", "res:preadd", "shortcut", "identity",
        "add:x+y", "add:y+x", "add:torch.add(y,x)", "add:torch.add(x,y)", "groups:1",
        "groups:2", "groups:dw", "stride:2", "dilation:(2, 2)", "even kernel",
        "non-square kernel", "act:module", "act:functional", "act:torch.relu", "odd/even sizes",
    }  # fmt: skip
    assert wanted <= seen, wanted - seen
    assert "invalid" not in seen


# ---------------------------------------------------------------------------------------------
# hand-written residual shapes the generator does not draw, every valid plan enumerated


def _cb(cin: int, cout: int, k, *, p=None, s=1, d=1, g=1) -> nn.Sequential:
    k2 = (k, k) if isinstance(k, int) else k
    p = tuple(d * (kk - 1) // 2 for kk in k2) if p is None else p
    return nn.Sequential(nn.Conv2d(cin, cout, k2, s, p, d, g), nn.BatchNorm2d(cout))


class OffCentreDown(nn.Module):
    """4x4 stride-2 pad-2 branch with a 1x1 stride-2 shortcut: on odd inputs the shortcut tap
    sits off the branch kernel's centre (offset P − p_s = 2 in a 4x4 kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _cb(4, 4, 3)
        self.b = _cb(4, 8, 4, p=2, s=2)
        self.c = _cb(8, 8, 1)
        self.sc = _cb(4, 8, 1, s=2)
        self.d = _cb(8, 8, 3, g=8)

    def forward(self, x):
        x = F.relu(self.a(x))
        y = self.c(F.relu(self.b(x)))
        x = F.relu(y + self.sc(x))
        return self.d(x)


class NestedResiduals(nn.Module):
    """An inner residual (optionally with a 1x1 shortcut) inside an outer identity residual."""

    def __init__(self, inner_conv: bool) -> None:
        super().__init__()
        self.a = _cb(4, 4, 3)
        self.b = _cb(4, 8, 1)
        self.c = _cb(8, 8, 3, g=8)
        self.c2 = _cb(8, 8, (3, 1), d=2)
        self.d = _cb(8, 4, 1)
        self.e = _cb(4, 4, 3)
        self.sc = _cb(8, 8, 1) if inner_conv else None

    def forward(self, x):
        x = F.relu(self.a(x))
        outer = x
        y = F.relu(self.b(x))
        inner = y if self.sc is None else self.sc(y)
        y = F.relu(self.c2(F.relu(self.c(y))) + inner)
        x = F.relu(self.d(y) + outer)
        return self.e(x)


class SharedSkip(nn.Module):
    """Two residuals leaving the same position: (1, 2) nested in (1, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.e = _cb(4, 4, 3), _cb(4, 4, 3), _cb(4, 4, 5), _cb(4, 4, 3)

    def forward(self, x):
        x = F.relu(self.a(x))
        y = F.relu(self.b(x) + x)
        z = self.c(y) + x
        return self.e(F.relu(z))


class UnevenBranch(nn.Module):
    """A shape-preserving branch of even kernels: k_a unpadded, then k_b padded (k_a+k_b−2)/2."""

    def __init__(self, ka: int, kb: int) -> None:
        super().__init__()
        self.a = _cb(4, 4, 3)
        self.b = _cb(4, 4, ka, p=0)
        self.c = _cb(4, 4, kb, p=(ka + kb - 2) // 2)
        self.e = _cb(4, 4, 3)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.relu(x + self.c(F.relu(self.b(x))))
        return self.e(x)


class PoolThenResidual(nn.Module):
    """Adjacent residuals from the chain input, a max-pool, then a residual from the pool."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _cb(4, 4, 3), _cb(4, 4, (1, 5))
        self.c, self.d, self.e = _cb(4, 8, 3, s=2), _cb(8, 8, 3), _cb(8, 8, 3, d=2)

    def forward(self, x):
        x = self.a(x) + x
        x = F.relu(self.b(x) + x)
        x = F.max_pool2d(F.relu(self.c(x)), 2)
        return x + self.e(F.relu(self.d(x)))


def every_plan(chain) -> list[frozenset[int]]:
    """Every boundary set S that tiles 0..L with valid blocks."""
    valid, out = set(chain.blocks), []

    def walk(cur: int, ends: tuple[int, ...]) -> None:
        if cur == chain.num_positions:
            out.append(frozenset(ends))
        for j in range(cur + 1, chain.num_positions + 1):
            if (cur, j) in valid:
                walk(j, (*ends, j))

    walk(0, ())
    return out


ZOO = {
    "off_centre_down": (OffCentreDown, (), (15, 17)),
    "nested_identity": (NestedResiduals, (False,), (15, 16)),
    "nested_conv": (NestedResiduals, (True,), (16, 15)),
    "shared_skip": (SharedSkip, (), (15, 15)),
    "uneven_2_2": (UnevenBranch, (2, 2), (16, 15)),
    "uneven_4_2": (UnevenBranch, (4, 2), (15, 16)),
    "uneven_2_4": (UnevenBranch, (2, 4), (15, 15)),
    "pool_then_residual": (PoolThenResidual, (), (17, 16)),
}
ZOO_RESIDUALS = {
    "off_centre_down": [(1, 3)],
    "nested_identity": [(1, 5), (2, 4)],
    "nested_conv": [(1, 5), (2, 4)],
    "shared_skip": [(1, 2), (1, 3)],
    "uneven_2_2": [(1, 3)],
    "uneven_4_2": [(1, 3)],
    "uneven_2_4": [(1, 3)],
    "pool_then_residual": [(0, 1), (1, 2), (3, 5)],
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_residual_zoo_every_plan_merges_exactly(name):
    cls, args, (h, w) = ZOO[name]
    torch.manual_seed(0)
    model = cls(*args).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.3)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    x = torch.randn(2, 4, h, w, generator=gen)
    with torch.no_grad():
        original = model(x)
    before = state_of(model)
    for mode in ("general", "reference"):
        chain = dc.trace(model, x, mode=mode)
        assert [(r.start, r.end) for r in chain.residuals] == ZOO_RESIDUALS[name]
        ident = dc.Plan.identity(chain)
        merged = dc.merge(dc.linearize(model, chain, ident), chain, ident)
        with torch.no_grad():
            assert rel_error(original, merged(x)) <= REL_TOL
        plans = every_plan(chain)
        assert any(len(s) < chain.num_positions for s in plans)
        for n, bounds in enumerate(plans):
            ordered = sorted(bounds)
            for acts_kept in (bounds, frozenset(), frozenset(ordered[n % 2 :: 2])):
                plan = dc.Plan(activations=acts_kept, boundaries=bounds)
                linear = dc.linearize(model, chain, plan).eval()
                merged = dc.merge(linear, chain, plan)
                with torch.no_grad():
                    out = merged(x)
                    assert out.shape == original.shape
                    assert rel_error(linear(x), out) <= REL_TOL, plan.to_dict()
                assert conv_count(merged) == expected_conv_count(chain, plan), plan.to_dict()
                assert_blocks_match_geometry(model, merged, chain, plan)
                assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
    assert_untouched(model, before, training=False)


# ---------------------------------------------------------------------------------------------
# regressions for bugs the tests above found (fixed)


def test_geometry_groups_ignore_an_absorbed_conv_shortcut():
    class DepthwiseWithShortcut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.b = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.sc = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(x)) + self.sc(x)

    model = DepthwiseWithShortcut().eval()
    chain = dc.trace(model, torch.randn(1, 4, 9, 9))
    plan = dc.Plan(activations=frozenset(), boundaries=frozenset({2}))
    merged = dc.merge(dc.linearize(model, chain, plan), chain, plan)
    conv = merged.get_submodule("depthcompress_block_0_2")
    assert conv.groups == 1  # the merged conv is dense (it must be: the shortcut is dense) ...
    assert chain.geometry(0, 2).groups == conv.groups  # ... and geometry() says so too


def test_float64_model_linearizes_and_merges():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
    ).double()
    model.eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    chain = dc.trace(model, x)  # tracing with the user's float64 input works
    plan = dc.Plan(activations=frozenset(), boundaries=frozenset({2}))
    linear = dc.linearize(model, chain, plan)
    merged = dc.merge(linear, chain, plan)
    with torch.no_grad():
        assert rel_error(linear(x), merged(x)) <= 1e-10


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_identity_plan_keeps_a_same_padded_even_kernel_conv():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 2, padding="same")
    ).eval()
    x = torch.randn(1, 4, 9, 9)
    chain = dc.trace(model, x)
    assert 1 in chain.barriers  # correctly recognised as a conv that cannot merge
    ident = dc.Plan.identity(chain)
    linear = dc.linearize(model, chain, ident)
    with torch.no_grad():
        assert linear(x).shape == model(x).shape
