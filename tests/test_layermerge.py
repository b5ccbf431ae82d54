"""Layer pruning inside merged blocks (LayerMerge, docs/layermerge.md): reducible convs, block
configurations, pruned plans, exact merging of pruned networks, stage 2 with configurations."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import depthcompress as dc
from depthcompress import PlanError
from depthcompress.dp import (
    BUDGET_SLACK,
    IMPORTANCE_TIE,
    ConfigTables,
    extended_importance,
    optimal_latency,
    solve,
    solve_configs,
)
from depthcompress.linearization import fused_residuals
from depthcompress.models import cifar_mbv2, resnet20
from depthcompress.pruning import block_configs, misfit_shortcuts, reducible
from tests.conftest import randomize_bn
from tests.test_dp import random_instance
from tests.test_merge_random_cnns import build, config_problem, configs, draw_plan

SETTINGS = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def resnet_chain():
    return dc.trace(resnet20().eval(), torch.randn(1, 3, 32, 32))


@pytest.fixture(scope="module")
def mbv2_chain():
    return dc.trace(cifar_mbv2().eval(), torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# reducible convs and configurations


def test_mbv2_depthwise_convs_are_reducible_expand_and_project_are_not(mbv2_chain):
    red = reducible(mbv2_chain)
    for p in mbv2_chain.positions[1:]:
        depthwise = p.groups == p.in_channels > 1
        if depthwise and p.stride == (1, 1):
            assert p.index in red, p.conv
        if p.kernel == (1, 1):
            assert p.in_channels != p.out_channels and p.index not in red, p.conv
    assert red and all(mbv2_chain.positions[k].groups > 1 for k in red)


def test_resnet20_convs_of_unstrided_blocks_are_reducible(resnet_chain):
    red = reducible(resnet_chain)
    for r in resnet_chain.residuals:
        geo = resnet_chain.geometry(r.start, r.end)
        branch = set(range(r.start + 1, r.end + 1))
        if geo.stride == (1, 1) and geo.in_channels == geo.out_channels:
            assert branch <= red
        else:  # the strided first conv of a down-sampling block changes the shape
            assert r.start + 1 not in red
    assert 1 not in red  # the stem: 3 channels in, 16 out


def test_configurations_of_a_basic_block(resnet_chain):
    r = resnet_chain.residuals[0]
    configs = block_configs(resnet_chain, r.start, r.end)
    a, b = r.start + 1, r.end
    assert [(c.kernel, c.identity, c.subsets) for c in configs] == [
        ((5, 5), False, (frozenset(),)),
        ((3, 3), False, (frozenset({a}), frozenset({b}))),
        ((1, 1), True, (frozenset({a, b}),)),
    ]
    geo = resnet_chain.geometry(r.start, r.end, frozenset({a, b}))
    assert geo.kernel == (1, 1) and geo.padding == (0, 0) and geo.groups == geo.in_channels


def test_configurations_of_an_inverted_residual(mbv2_chain):
    r = next(r for r in mbv2_chain.residuals if r.end - r.start == 3)
    configs = block_configs(mbv2_chain, r.start, r.end)
    assert [(c.kernel, c.groups) for c in configs] == [((3, 3), 1), ((1, 1), 1)]
    assert configs[1].subsets == (frozenset({r.start + 2}),)


class DepthwiseChain(nn.Module):
    """Two depthwise 3x3 convs and a channel-keeping 1x1: pruning the 1x1 keeps it depthwise."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.b = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_pruning_a_dense_conv_makes_a_block_depthwise():
    chain = dc.trace(DepthwiseChain(), torch.randn(1, 4, 8, 8))
    configs = {(c.kernel, c.depthwise): c for c in block_configs(chain, 0, 3)}
    assert configs[(5, 5), True].subsets == (frozenset({3}),)
    assert configs[(5, 5), False].subsets == (frozenset(),)
    assert configs[(3, 3), True].subsets == (frozenset({1, 3}), frozenset({2, 3}))
    assert configs[(1, 1), False].subsets == (frozenset({1, 2}),)
    assert configs[(1, 1), True].identity
    with pytest.raises(PlanError, match="exceed the limit"):
        block_configs(chain, 0, 3, limit=4)


class WideShortcut(nn.Module):
    """Two 3x3 convs with a 3x3 conv shortcut: pruning both would leave the shortcut outside the
    (1x1) branch kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.short = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(torch.relu(self.a(x))) + self.short(x))


def test_a_conv_shortcut_must_fit_the_pruned_branch():
    chain = dc.trace(WideShortcut(), torch.randn(1, 4, 8, 8))
    assert chain.residuals[0].shortcut_kernel == (3, 3)
    configs = block_configs(chain, 0, 2)
    assert [c.kernel for c in configs] == [(5, 5), (3, 3)]
    assert frozenset({1, 2}) not in {s for c in configs for s in c.subsets}
    with pytest.raises(PlanError, match=r"shrinks the branch of residual \(0, 2\)"):
        dc.Plan(activations={2}, boundaries={2}, pruned={1, 2}).validate(chain)
    split = dc.Plan(activations={1, 2}, boundaries={1, 2}, pruned={1, 2})
    dc.merge(dc.linearize(WideShortcut().eval(), chain, split), chain, split)
    plan = dc.Plan(activations={2}, boundaries={2}, pruned={2})
    dc.merge(dc.linearize(WideShortcut().eval(), chain, plan), chain, plan)


# ---------------------------------------------------------------------------------------------
# plans


def test_plan_json_round_trip_and_old_plans():
    plan = dc.Plan(activations={3}, boundaries={1, 3}, pruned={2})
    assert dc.Plan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["pruned"] == [2]
    old = dc.Plan.from_json('{"activations": [3], "boundaries": [1, 3]}')
    assert old.pruned == frozenset() and "pruned" not in old.to_dict()
    with pytest.raises(PlanError, match="integer positions"):
        dc.Plan(activations=(), boundaries={1}, pruned={"2"})


def test_plan_validation_refuses_irreducible_and_missing_positions(resnet_chain):
    base = dc.Plan.identity(resnet_chain)
    dc.Plan(base.activations, base.boundaries, pruned={2, 3}).validate(resnet_chain)
    with pytest.raises(PlanError, match=r"pruned positions \[1\] are not reducible"):
        dc.Plan(base.activations, base.boundaries, pruned={1}).validate(resnet_chain)
    with pytest.raises(PlanError, match="do not exist"):
        dc.Plan(base.activations, base.boundaries, pruned={99}).validate(resnet_chain)


# ---------------------------------------------------------------------------------------------
# linearize and merge


class Basic(nn.Module):
    """A ResNet basic block (identity or 1x1 projection shortcut) after a 3x3 stem."""

    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        out = c * stride
        self.conv1 = nn.Conv2d(c, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.short = (
            nn.Identity()
            if stride == 1
            else nn.Sequential(nn.Conv2d(c, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.short(x))


class Inverted(nn.Module):
    """A MobileNetV2 inverted residual (expand, depthwise 3x3, project; skip when shapes match)."""

    def __init__(self, c: int, stride: int, expand: int = 2) -> None:
        super().__init__()
        h = c * expand
        out = c * stride
        self.skip = stride == 1
        self.body = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU6(),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU6(),
            nn.Conv2d(h, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y + x if self.skip else y


class Small(nn.Module):
    """A stem, then basic/inverted blocks, then a pooled linear head."""

    def __init__(self, kinds: list[tuple[str, int]], c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        blocks = []
        for kind, stride in kinds:
            blocks.append(Basic(c, stride) if kind == "basic" else Inverted(c, stride))
            c *= stride
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


BLOCKS = st.lists(
    st.tuples(st.sampled_from(["basic", "inverted"]), st.sampled_from([1, 1, 2])),
    min_size=1,
    max_size=3,
)


@settings(SETTINGS, max_examples=60)
@given(kinds=BLOCKS, seed=st.integers(0, 1000), data=st.data())
def test_pruned_merge_equals_the_linearized_network(kinds, seed, data):
    torch.manual_seed(seed)
    model = randomize_bn(Small(kinds), seed).eval()
    chain = dc.trace(model, torch.randn(2, 3, 12, 12))
    plan = draw_pruned_plan(data, chain)
    linear = dc.linearize(model, chain, plan)
    merged = dc.merge(linear, chain, plan)  # raises MergeError beyond 1e-4 of the output scale
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        dc.merging.check_close(linear(x), merged(x), "merged", "linearized")
    assert_blocks_are_their_configurations(merged, chain, plan)
    fused = fused_residuals(chain, plan)
    identity = [
        (i, j)
        for i, j in plan.blocks
        if set(range(i + 1, j + 1)) <= plan.pruned
        and not any(i <= r.start and r.end <= j and r.shortcut for r in fused)
    ]
    shortcuts = [r for r in chain.residuals if r.shortcut and r not in fused]
    convs = sum(isinstance(m, nn.Conv2d) for m in merged.modules())
    assert convs == len(plan.blocks) - len(identity) + len(shortcuts)


def assert_blocks_are_their_configurations(merged: nn.Module, chain, plan: dc.Plan) -> None:
    """Each merged conv has the shape ``geometry(i, j, pruned)`` reports: what the latency table
    will time for that configuration."""
    fused = fused_residuals(chain, plan)
    for i, j in plan.blocks:
        name = f"depthcompress_block_{i}_{j}"
        if not hasattr(merged, name):
            assert set(range(i + 1, j + 1)) <= plan.pruned, (i, j)  # the identity, wired through
            continue
        conv = merged.get_submodule(name)
        geo = chain.geometry(i, j, plan.pruned)
        effective = tuple(conv.dilation[d] * (conv.kernel_size[d] - 1) + 1 for d in range(2))
        got = (conv.in_channels, conv.out_channels, effective, tuple(conv.stride))
        assert got == (geo.in_channels, geo.out_channels, geo.kernel, geo.stride), (i, j)
        assert tuple(conv.padding) == geo.padding, (i, j)
        if not any(r.shortcut and i <= r.start and r.end <= j for r in fused):
            assert conv.groups == geo.groups, (i, j, conv.groups, geo.groups)


def draw_pruned_plan(data, chain) -> dc.Plan:
    """A random valid plan with a random subset of the reducible convs pruned (shortcuts that
    would no longer fit are avoided by dropping the subset)."""
    plan = draw_plan(data, chain)
    red = sorted(reducible(chain))
    pruned = data.draw(st.sets(st.sampled_from(red)) if red else st.just(set()), label="pruned")
    if misfit_shortcuts(chain, frozenset(pruned), plan.boundaries):
        pruned = set()
    return dc.Plan(plan.activations, plan.boundaries, pruned=frozenset(pruned))


@settings(SETTINGS, max_examples=40, suppress_health_check=list(HealthCheck))
@given(cfg=configs(), data=st.data())
def test_pruned_random_cnns_merge_exactly(cfg, data):
    """The random CNNs of test_merge_random_cnns (dilation, groups, post-activation BNs, conv
    shortcuts, pools) with random pruned plans: merge equals linearize."""
    assume(config_problem(cfg) is None)
    model, x = build(cfg)
    chain = dc.trace(model, x)
    plan = draw_pruned_plan(data, chain)
    linear = dc.linearize(model, chain, plan)
    merged = dc.merge(linear, chain, plan)
    with torch.no_grad():
        dc.merging.check_close(linear(x), merged(x), "merged", "linearized")
    assert_blocks_are_their_configurations(merged, chain, plan)


def test_a_fully_pruned_identity_residual_is_its_shortcut_alone():
    """Pruning every conv of a residual branch leaves the shortcut alone, ``x``, and the
    activation after the add stays: block output ``relu(x)``; fused, no conv is left."""
    model = randomize_bn(Small([("basic", 1)])).eval()
    chain = dc.trace(model, torch.randn(1, 3, 8, 8))
    base = dc.Plan.identity(chain)
    r = chain.residuals[0]
    pruned = frozenset(range(r.start + 1, r.end + 1))
    for bounds in (base.boundaries, base.boundaries - set(range(r.start + 1, r.end))):
        plan = dc.Plan(base.activations & bounds, bounds, pruned=pruned)
        linear = dc.linearize(model, chain, plan)
        x = torch.randn(1, 3, 8, 8)
        with torch.no_grad():
            stem = model.stem(x)
            want = model.head(torch.relu(stem).mean((2, 3)))
            dc.merging.check_close(want, linear(x), "linearized", "relu(x)", tol=1e-6)
            merged = dc.merge(linear, chain, plan)
            dc.merging.check_close(want, merged(x), "merged", "relu(x)")
        convs = [m for m in merged.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == len([m for m in model.modules() if isinstance(m, nn.Conv2d)]) - 2


class PostBN(nn.Module):
    """Conv → ReLU → BN twice, then a 1x1: BNs after the activation (``Position.post_bn``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.bn_b(torch.relu(self.b(self.bn_a(torch.relu(self.a(x)))))))


def test_a_pruned_position_loses_its_post_activation_bn_and_keeps_its_activation():
    model = randomize_bn(PostBN()).eval()
    x = torch.randn(1, 4, 8, 8)
    chain = dc.trace(model, x)
    assert chain.positions[1].post_bn == "bn_a"
    unmerged = dc.Plan(activations={1, 2}, boundaries={1, 2, 3}, pruned={1})
    linear = dc.linearize(model, chain, unmerged)
    with torch.no_grad():
        want = model.c(model.bn_b(torch.relu(model.b(torch.relu(x)))))
        dc.merging.check_close(want, linear(x), "linearized", "by hand", tol=1e-6)
    for plan in (
        unmerged,
        dc.Plan(activations=(), boundaries={3}, pruned={1}),
        dc.Plan(activations={2}, boundaries={2, 3}, pruned={2}),
        dc.Plan(activations=(), boundaries={3}, pruned={1, 2, 3}),
    ):
        merged = dc.merge(dc.linearize(model, chain, plan), chain, plan)  # checked
    assert not any(isinstance(m, nn.Conv2d) for m in merged.modules())  # all pruned: identity


def test_pruning_the_first_conv_of_a_block_moves_its_padding_to_the_next(resnet_chain):
    model = randomize_bn(resnet20()).eval()
    r = resnet_chain.residuals[1]
    base = dc.Plan.identity(resnet_chain)
    inside = set(range(r.start - 1, r.end))  # one block over two residuals
    bounds = base.boundaries - inside | {r.start - 2}
    plan = dc.Plan(base.activations & bounds, bounds, pruned={r.start - 1, r.start + 1})
    merged = dc.merge(dc.linearize(model, resnet_chain, plan), resnet_chain, plan)  # checked
    block = merged.get_submodule(f"depthcompress_block_{r.start - 2}_{r.end}")
    assert block.kernel_size == (5, 5) and block.padding == (2, 2)  # two kept 3x3 convs


# ---------------------------------------------------------------------------------------------
# stage 2 with configurations


def as_config_tables(opt, ext) -> ConfigTables:
    return ConfigTables(
        time={(i, j, 0): t for (i, j), t in zip(opt.blocks, opt.time.tolist(), strict=True)},
        importance={(*k, 0): v for k, v in zip(ext.keys, ext.value.tolist(), strict=True)},
        breaks={(i, j, 0): opt.breaks_of(i, j) for i, j in opt.blocks},
    )


@SETTINGS
@given(n=st.integers(1, 9), seed=st.integers(0, 2**32 - 1), fraction=st.floats(0.0, 1.2))
def test_one_configuration_per_segment_is_todays_solve(n, seed, fraction):
    rng = random.Random(seed)
    latency, imp = random_instance(rng, n, all_flags=rng.random() < 0.5, coarse=True)
    opt, ext = optimal_latency(latency), extended_importance(imp, alpha=1.6)
    tables = as_config_tables(opt, ext)
    try:
        fastest = dc.dp.min_latency(opt, ext)
    except dc.TableError:
        return
    budget = fastest + fraction * (sum(opt.time.tolist()) - fastest)
    want = solve(opt, ext, budget)
    got = solve_configs(tables, budget)
    assert got == want


def config_instance(rng: random.Random, n: int) -> ConfigTables:
    """Random segments with 1–3 configurations each, coarse values so that ties occur."""
    time, importance, pruned = {}, {}, {}
    for i in range(n):
        for j in range(i + 1, n + 1):
            if j > i + 1 and rng.random() < 0.5:
                continue
            for c in range(rng.randint(1, 3)):
                time[i, j, c] = rng.choice([0.25 * k for k in range(9)])
                pruned[i, j, c] = frozenset(rng.sample(range(i + 1, j + 1), min(c, j - i)))
                for x, y in itertools.product((0, 1), (0, 1)):
                    if ((x or i > 0) and rng.random() < 0.7) or (x, y) == (1, 1):
                        importance[i, j, x, y, c] = rng.choice([-0.5 * k for k in range(5)])
    return ConfigTables(time=time, importance=importance, pruned=pruned)


def every_plan(tables: ConfigTables) -> list[tuple[float, float]]:
    n = tables.num_positions
    out = []

    def walk(p: int, f: int, lat: float, imp: float) -> None:
        if p == n:
            out.append((lat, imp))
            return
        for (i, j, x, y, c), v in tables.importance.items():
            if (i, x) == (p, f):
                walk(j, y, lat + tables.time[i, j, c], imp + v)

    walk(0, 1, 0.0, 0.0)
    return out


@SETTINGS
@given(n=st.integers(1, 5), seed=st.integers(0, 2**32 - 1), fraction=st.floats(-0.1, 1.1))
def test_stage2_with_configurations_equals_brute_force(n, seed, fraction):
    rng = random.Random(seed)
    tables = config_instance(rng, n)
    plans = every_plan(tables)
    lats = [p[0] for p in plans]
    budget = min(lats) + fraction * (max(lats) - min(lats))
    feasible = [p for p in plans if p[0] <= budget + BUDGET_SLACK]
    if not feasible:
        with pytest.raises(dc.BudgetError, match="no plan fits"):
            solve_configs(tables, budget)
        return
    sol = solve_configs(tables, budget)
    best = max(p[1] for p in feasible)
    fastest = min(p[0] for p in feasible if p[1] >= best - IMPORTANCE_TIE)
    assert sol.latency <= budget + BUDGET_SLACK
    assert sol.importance >= best - IMPORTANCE_TIE and sol.latency == fastest
    chosen = set().union(*(tables.pruned[s.st, s.end, s.config] for s in sol.segments))
    assert sol.plan.pruned == chosen


def test_configuration_tables_without_a_path_to_the_end_are_refused():
    tables = ConfigTables(time={(0, 1, 0): 1.0, (1, 2, 0): 1.0}, importance={(0, 1, 1, 0, 0): 0.0})
    with pytest.raises(dc.TableError, match="no chain of importance rows"):
        solve_configs(tables, 5.0)
    tables = ConfigTables(time={(0, 1, 0): 1.0}, importance={(0, 1, 1, 1, 1): 0.0})
    with pytest.raises(dc.TableError, match="configuration 1 has no latency"):
        solve_configs(tables, 5.0)
