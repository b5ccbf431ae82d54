"""Stage 1, the extended importance and stage 2 against brute force, the reference tables and a
transcription of the reference's grid DP (ALGORITHM.md §5–§7, §10.6–§10.8)."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depthcompress import BudgetError, Plan, TableError
from depthcompress.dp import (
    BUDGET_SLACK,
    IMPORTANCE_TIE,
    Budget,
    extended_importance,
    min_latency,
    normalize_importance,
    optimal_boundaries,
    optimal_latency,
    original_latency,
    solve,
    sweep,
)
from depthcompress.tables import (
    ExtendedImportanceTable,
    ImportanceTable,
    LatencyTable,
    OptimalLatencyTable,
)

REFERENCE = Path(__file__).resolve().parent / "data"
"""The published reference tables (Kim et al., ICML 2023), vendored: see data/README.md."""
TIME_CSV = "kim2023_mbv2_w1.0_rtx2080ti_trt_time.csv"
OPT_CSV = "kim2023_mbv2_w1.0_rtx2080ti_trt_opt_time.csv"
MBV2_LINEAR = frozenset(range(2, 51, 3))

SETTINGS = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def reference_path(name: str) -> Path:
    return REFERENCE / name


def mbv2_importance(latency: LatencyTable, seed: int = 0) -> ImportanceTable:
    """A seeded synthetic importance table over MobileNetV2's blocks."""
    return ImportanceTable.synthetic(latency.blocks, MBV2_LINEAR, seed)


# ---------------------------------------------------------------------------------------------
# random small instances and their brute-force answers


def random_instance(
    rng: random.Random, n: int, all_flags: bool, coarse: bool = False
) -> tuple[LatencyTable, ImportanceTable]:
    """A chain 0..n: every single-conv block plus random longer ones; times and scores drawn
    partly (``coarse``: only) from a grid of quarters so that exact ties occur; flags 0 only at
    random linear positions."""
    linear = {p for p in range(1, n + 1) if rng.random() < 0.45}

    def value(lo: float, hi: float) -> float:
        if coarse or rng.random() < 0.5:
            return rng.choice([lo + k * 0.25 for k in range(int((hi - lo) / 0.25) + 1)])
        return rng.uniform(lo, hi)

    blocks = [
        (i, j) for i in range(n) for j in range(i + 1, n + 1) if j == i + 1 or rng.random() < 0.4
    ]
    latency = LatencyTable.from_rows((i, j, value(0.0, 2.0), 0.01) for i, j in blocks)
    rows = []
    for i, j in blocks:
        xs = (0, 1) if i in linear else (1,)
        ys = (0, 1) if j in linear else (1,)
        for x in xs:
            for y in ys:
                keep = all_flags or i == 0 or not (x == 0 and y == 0) or rng.random() < 0.2
                if keep and rng.random() < 0.9:
                    rows.append((i, j, x, y, value(-2.0, 0.5)))
    if not rows:
        rows.append((0, 1, 1, 1, 0.0))
    return latency, ImportanceTable.from_rows(rows)


def all_plans(
    opt: OptimalLatencyTable, ext: ExtendedImportanceTable
) -> list[tuple[float, float, tuple[tuple[int, int, int, int], ...]]]:
    """Every complete endpoint/flag sequence: (Σ T_opt, Σ I, segments), sums left to right."""
    n = opt.num_positions
    t_opt = dict(zip(opt.blocks, opt.time.tolist(), strict=True))
    by_start: dict[tuple[int, int], list[tuple[tuple[int, int, int, int], float]]] = {}
    for key, v in zip(ext.keys, ext.value.tolist(), strict=True):
        by_start.setdefault((key[0], key[2]), []).append((key, v))
    out = []

    def walk(p: int, f: int, lat: float, imp: float, path: tuple) -> None:
        if p == n:
            out.append((lat, imp, path))
            return
        for key, v in by_start.get((p, f), []):
            walk(key[1], key[3], lat + t_opt[key[:2]], imp + v, (*path, key))

    walk(0, 1, 0.0, 0.0, ())
    return out


def brute_choice(plans: list, budget: float) -> tuple[float, float] | None:
    """The answer stage 2 must give: highest importance within the budget; among importances
    within IMPORTANCE_TIE of it the lowest latency, then the highest importance."""
    feasible = [p for p in plans if p[0] <= budget + BUDGET_SLACK]
    if not feasible:
        return None
    best = max(p[1] for p in feasible)
    band = [p for p in feasible if p[1] >= best - IMPORTANCE_TIE]
    fastest = min(p[0] for p in band)
    return fastest, max(p[1] for p in band if p[0] == fastest)


def check_plan(sol, opt: OptimalLatencyTable) -> None:
    """A ⊆ S, L ∈ S, S = union of the segments' breaks, latency = Σ T_opt in order."""
    n = opt.num_positions
    plan = sol.plan
    assert plan.activations <= plan.boundaries
    assert n in plan.boundaries
    assert sol.segments[0].st == 0 and sol.segments[-1].end == n
    for a, b in itertools.pairwise(sol.segments):
        assert (a.end, a.end_act) == (b.st, b.st_act)
    assert plan.activations == {s.end for s in sol.segments if s.end_act}
    assert plan.boundaries == set().union(*(s.breaks for s in sol.segments)) - {0}
    total = 0.0
    for s in sol.segments:
        total += opt.time_of(s.st, s.end)
    assert total == sol.latency


# ---------------------------------------------------------------------------------------------
# stage 1


def test_stage1_reproduces_the_reference_opt_table():
    latency = LatencyTable.read_csv(reference_path(TIME_CSV))
    expected = OptimalLatencyTable.read_csv(reference_path(OPT_CSV))
    got = optimal_latency(latency)
    assert got.blocks == expected.blocks and len(got) == 171
    assert np.abs(got.time - expected.time).max() <= 1e-9
    assert np.abs(got.stdev - expected.stdev).max() <= 1e-12
    assert got.breaks == expected.breaks
    for k, breaks in enumerate(got.breaks):
        total = sum(latency.time_of(a, b) for a, b in itertools.pairwise(breaks))
        assert total == pytest.approx(expected.time[k], abs=1e-9)
    assert (got.ids == expected.ids).all()


ISSUE_TABLE = (
    (0, 1, 1.0),
    (1, 2, 1.0),
    (2, 3, 1.0),
    (3, 4, 1.0),
    (0, 2, 5.0),
    (2, 4, 10.0),
    (0, 4, 10.0),
)
"""Residual (2, 4): (0, 3) and (1, 3) are not blocks, so the fastest tiling of (0, 4), four
single convs, starts with a cut inside no valid prefix block; the reference recursion gives 10."""


def test_stage1_finds_a_tiling_whose_prefix_is_no_block():
    latency = LatencyTable.from_rows((i, j, t, 0.1) for i, j, t in ISSUE_TABLE)
    opt = optimal_latency(latency)
    assert opt.time_of(0, 4) == 4.0
    assert opt.breaks_of(0, 4) == (0, 1, 2, 3, 4)
    assert opt.stdev[opt.index[0, 4]] == pytest.approx(0.4)
    assert opt.time_of(0, 2) == 2.0 and opt.breaks_of(0, 2) == (0, 1, 2)
    assert opt.time_of(2, 4) == 2.0 and opt.breaks_of(2, 4) == (2, 3, 4)
    assert opt.time_of(1, 2) == 1.0 and opt.breaks_of(1, 2) == (1, 2)


def test_stage1_ties_keep_the_unsplit_block_then_the_smallest_last_break():
    rows = [(0, 1, 1.0), (1, 2, 1.0), (2, 3, 1.0), (0, 2, 2.0), (1, 3, 2.0), (0, 3, 3.0)]
    opt = optimal_latency(LatencyTable.from_rows((i, j, t, 0.0) for i, j, t in rows))
    assert opt.breaks_of(0, 2) == (0, 2) and opt.breaks_of(0, 3) == (0, 3)
    rows[-1] = (0, 3, 3.5)
    opt = optimal_latency(LatencyTable.from_rows((i, j, t, 0.0) for i, j, t in rows))
    assert opt.breaks_of(0, 3) == (0, 1, 3)


def tilings(blocks: set[tuple[int, int]], i: int, j: int) -> list[tuple[int, ...]]:
    """Every tiling of (i, j) by valid blocks, as its break points."""
    if i == j:
        return [(j,)]
    return [
        (i, *rest)
        for k in range(i + 1, j + 1)
        if (i, k) in blocks
        for rest in tilings(blocks, k, j)
    ]


@st.composite
def residual_chains(draw) -> LatencyTable:
    """A random chain 0..n with random residuals: a block is valid when it nests with or avoids
    every residual (the V2 rule); single convs always; random positive latencies."""
    n = draw(st.integers(1, 8))
    residuals = draw(
        st.lists(
            st.tuples(st.integers(0, n - 1), st.integers(2, 4)).map(
                lambda r: (r[0], min(n, r[0] + r[1]))
            ),
            max_size=3,
        )
    )
    rows = []
    for i in range(n):
        for j in range(i + 1, n + 1):
            crosses = any(i < a < j < b or a < i < b < j for a, b in residuals)
            if j == i + 1 or (not crosses and draw(st.booleans())):
                t = draw(st.floats(0.01, 5.0, allow_nan=False) | st.sampled_from([0.25, 0.5, 1.0]))
                rows.append((i, j, t, t / 10))
    return LatencyTable.from_rows(rows)


@SETTINGS
@given(latency=residual_chains())
def test_stage1_is_the_fastest_of_all_tilings(latency):
    opt = optimal_latency(latency)
    blocks = set(latency.blocks)
    for (i, j), t_opt, breaks in zip(opt.blocks, opt.time.tolist(), opt.breaks, strict=True):
        sums = []
        for tiling in tilings(blocks, i, j):
            total = 0.0
            for a, b in itertools.pairwise(tiling):
                total += latency.time_of(a, b)
            sums.append(total)
        assert t_opt == pytest.approx(min(sums), rel=1e-12)
        assert breaks in tilings(blocks, i, j)
        assert sum(latency.time_of(a, b) for a, b in itertools.pairwise(breaks)) == pytest.approx(
            t_opt, rel=1e-12
        )


@SETTINGS
@given(n=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_stage1_is_the_fastest_tiling(n, seed):
    latency, _ = random_instance(random.Random(seed), n, all_flags=False)
    opt = optimal_latency(latency)
    blocks = set(latency.blocks)
    for (i, j), t_opt, breaks in zip(opt.blocks, opt.time.tolist(), opt.breaks, strict=True):
        sums = [
            sum(latency.time_of(a, b) for a, b in itertools.pairwise(t))
            for t in tilings(blocks, i, j)
        ]
        assert t_opt == pytest.approx(min(sums), rel=1e-12)
        assert breaks in tilings(blocks, i, j)


# ---------------------------------------------------------------------------------------------
# normalisation and Algorithm 3


def test_normalisation_subtracts_alpha_times_the_single_conv_mean():
    imp = ImportanceTable.from_rows(
        [(0, 1, 1, 1, -1.0), (1, 2, 1, 1, -3.0), (0, 2, 1, 1, -5.0), (1, 2, 0, 1, -0.5)]
    )
    mean = (-1.0 - 3.0 - 0.5) / 3
    normed = normalize_importance(imp, alpha=1.6)
    assert normed.score.tolist() == pytest.approx([v - 1.6 * mean for v in imp.score])
    assert normalize_importance(imp, alpha=0) is imp
    ext = extended_importance(imp, alpha=1.6)
    assert ext.offset == pytest.approx(1.6 * mean) and ext.alpha == 1.6


def test_delta_subtracts_the_control_from_changes_and_single_ignores_it():
    """``control`` (what the entries' fine-tuning gives the unmodified network) is removed from
    every change under ``delta``, so a network far from its optimum does not make every merge
    look like a gain; the paper's normalisation does not read it."""
    rows = [(0, 1, 1, 1, 4.0), (1, 2, 1, 1, 4.0), (0, 2, 1, 1, 3.0)]
    imp = replace(ImportanceTable.from_rows(rows), control=5.0)
    assert normalize_importance(imp, norm="delta").score.tolist() == [0.0, 0.0, -2.0]
    plain = ImportanceTable.from_rows(rows)
    assert (
        normalize_importance(imp, alpha=1.6).score.tolist()
        == normalize_importance(plain, alpha=1.6).score.tolist()
    )
    ext = extended_importance(imp, norm="delta")
    assert ext.offset == 5.0 and ext.value.tolist() == [0.0, 0.0, -2.0]
    latency = LatencyTable.from_rows([(0, 1, 1.0, 0.0), (1, 2, 1.0, 0.0), (0, 2, 1.5, 0.0)])
    assert solve(latency, imp, 2.0, norm="delta").plan.boundaries == frozenset({1, 2})
    assert solve(latency, plain, 2.0, norm="delta").plan.boundaries == frozenset({2})


def test_normalisation_needs_single_conv_rows():
    imp = ImportanceTable.from_rows([(0, 2, 1, 1, -1.0)], source="imp.csv")
    with pytest.raises(TableError, match=r"imp\.csv.*single-conv"):
        normalize_importance(imp, alpha=1.6)
    assert extended_importance(imp, alpha=0).value.tolist() == [-1.0]


def test_extended_importance_chains_through_flag_zero():
    imp = ImportanceTable.from_rows(
        [
            (0, 1, 1, 0, -1.0),
            (1, 2, 0, 1, -1.0),
            (0, 2, 1, 1, -5.0),
            (1, 3, 0, 1, -0.5),
            (0, 3, 1, 1, -9.0),
        ]
    )
    ext = extended_importance(imp, alpha=0)
    got = dict(zip(ext.keys, zip(ext.value.tolist(), ext.breaks, strict=True), strict=True))
    assert got[0, 2, 1, 1] == (-2.0, (0, 1, 2))
    assert got[0, 3, 1, 1] == (-1.5, (0, 1, 3))
    assert got[0, 1, 1, 0] == (-1.0, (0, 1))


def chains(h: dict, ext_keys: set, i: int, j: int, x: int, y: int) -> list[float]:
    """Every value Algorithm 3 may take for (i, j, x, y): the direct score, or a prefix
    (i, k, x, 0) that is itself a row, extended by h(k, j, 0, y); sums left to right."""
    out = [h[i, j, x, y]]
    for k in range(i + 1, j):
        if (i, k, x, 0) in ext_keys and (k, j, 0, y) in h:
            out += [v + h[k, j, 0, y] for v in chains(h, ext_keys, i, k, x, 0)]
    return out


@SETTINGS
@given(n=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), all_flags=st.booleans())
def test_extended_importance_is_the_best_chain(n, seed, all_flags):
    _, imp = random_instance(random.Random(seed), n, all_flags)
    ext = extended_importance(imp, alpha=0.7)
    normed = normalize_importance(imp, alpha=0.7)
    h = dict(zip(normed.keys, normed.score.tolist(), strict=True))
    keys = set(ext.keys)
    for key, value, breaks in zip(ext.keys, ext.value.tolist(), ext.breaks, strict=True):
        assert value == max(chains(h, keys, *key))
        assert breaks[0] == key[0] and breaks[-1] == key[1]


# ---------------------------------------------------------------------------------------------
# stage 2 against brute force


@SETTINGS
@given(
    n=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
    all_flags=st.booleans(),
    coarse=st.booleans(),
    fractions=st.lists(st.floats(-0.1, 1.2), min_size=3, max_size=6),
)
def test_stage2_equals_exhaustive_search(n, seed, all_flags, coarse, fractions):
    rng = random.Random(seed)
    latency, imp = random_instance(rng, n, all_flags, coarse)
    opt = optimal_latency(latency)
    ext = extended_importance(imp, alpha=1.6)
    plans = all_plans(opt, ext)
    if not plans:
        with pytest.raises(TableError, match="no chain of importance rows"):
            solve(opt, ext, 100.0)
        return
    lats = sorted(p[0] for p in plans)
    budgets = [lats[0] + f * (lats[-1] - lats[0]) for f in fractions]
    budgets += [rng.choice(lats), rng.choice(lats), lats[0], math.nextafter(lats[0], -1)]
    for budget in budgets:
        want = brute_choice(plans, budget)
        if want is None:
            with pytest.raises(BudgetError, match=repr(lats[0])):
                solve(opt, ext, budget)
            continue
        sol = solve(latency, imp, budget, alpha=1.6)
        assert (sol.latency, sol.importance) == want
        assert sol.latency <= budget + BUDGET_SLACK and sol.within_budget
        check_plan(sol, opt)
    feasible = [b for b in budgets if b >= lats[0]]
    if feasible:
        swept = sweep(opt, ext, feasible)
        for budget, sol in zip(feasible, swept.solutions, strict=True):
            assert (sol.latency, sol.importance) == brute_choice(plans, budget)
        front = np.array(swept.front)
        assert (np.diff(front[:, 0]) > 0).all() and (np.diff(front[:, 1]) > 0).all()
        assert front[0, 0] == lats[0] == min_latency(opt, ext)


def test_ties_go_to_the_lower_latency():
    latency = LatencyTable.from_rows([(0, 1, 1.0, 0), (1, 2, 1.0, 0), (0, 2, 1.5, 0)])
    imp = ImportanceTable.from_rows(
        [(0, 1, 1, 1, 0.1), (1, 2, 1, 1, 0.2), (0, 2, 1, 1, 0.30000000000000004)]
    )
    sol = solve(latency, imp, 10.0, alpha=0)
    assert sol.latency == 1.5 and sol.plan.boundaries == {2}
    assert 0.1 + 0.2 == 0.30000000000000004
    imp = ImportanceTable.from_rows([(0, 1, 1, 1, 0.1), (1, 2, 1, 1, 0.2), (0, 2, 1, 1, 0.3)])
    assert solve(latency, imp, 10.0, alpha=0).latency == 1.5


def test_budget_below_the_fastest_plan_names_the_minimum():
    latency = LatencyTable.from_rows([(0, 1, 1.25, 0), (1, 2, 1.0, 0), (0, 2, 3.0, 0)])
    imp = ImportanceTable.from_rows([(0, 1, 1, 1, 0.0), (1, 2, 1, 1, 0.0), (0, 2, 1, 1, 0.0)])
    with pytest.raises(BudgetError, match=r"2\.25 ms"):
        solve(latency, imp, 2.2)
    assert solve(latency, imp, 2.25).latency == 2.25
    with pytest.raises(BudgetError, match=r"finite number of ms, got nan$"):
        solve(latency, imp, np.float64(math.nan))
    with pytest.raises(BudgetError, match="at least one budget"):
        sweep(latency, imp, [])
    with pytest.raises(ValueError, match="rounding"):
        solve(latency, imp, 3.0, rounding="round")  # type: ignore[arg-type]


def test_tables_over_different_positions_are_refused():
    latency = LatencyTable.from_rows(
        [(0, 1, 1.0, 0), (1, 2, 1.0, 0), (2, 3, 1.0, 0)], source="lat.csv"
    )
    short = ImportanceTable.from_rows([(0, 1, 1, 1, 0.0), (1, 2, 1, 1, 0.0)], source="imp.csv")
    with pytest.raises(TableError, match=r"imp\.csv.*position 2.*lat\.csv.*0\.\.3"):
        solve(latency, short, 5.0)
    long = ImportanceTable.from_rows([(0, 1, 1, 1, 0.0), (1, 4, 1, 1, 0.0)], source="imp.csv")
    with pytest.raises(TableError, match=r"imp\.csv row 2: span \(1, 4\).*lat\.csv"):
        solve(latency, long, 5.0)
    other = ImportanceTable.from_rows([(0, 1, 1, 1, 0.0), (1, 3, 1, 1, 0.0)], source="imp.csv")
    with pytest.raises(TableError, match=r"imp\.csv row 2: block \(1, 3\) has no row"):
        solve(latency, other, 5.0)


# ---------------------------------------------------------------------------------------------
# the reference's grid DP (rounding="reference")


def reference_optimal_patterns(opt: OptimalLatencyTable, ext: ExtendedImportanceTable, t0, prec):
    """A plain transcription of the reference's ``optimal_patterns`` (utils/dp.py) without its
    early exit: returns (A, S, Σ I, Σ g, Σ T_opt) or None."""
    n = opt.num_positions
    t_opt = dict(zip(opt.blocks, opt.time.tolist(), strict=True))
    imp = dict(zip(ext.keys, ext.value.tolist(), strict=True))
    limit = int(t0 * prec)
    dp = {(t, 0, 1): 0 for t in range(limit)}
    dp_time = {(t, 0, 1): 0 for t in range(limit)}
    back, mpos = {}, {}
    for m in range(1, n + 1):
        for t in range(limit + 1):
            for a in range(2):
                max_imp, opt_time = -math.inf, None
                for i in range(m):
                    for j in range(2):
                        if (i, m) not in t_opt or (i, m, j, a) not in imp:
                            continue
                        g = int(t_opt[i, m] * prec)
                        if (t - g, i, j) not in dp:
                            continue
                        cand = dp[t - g, i, j] + imp[i, m, j, a]
                        cand_time = dp_time[t - g, i, j] + g
                        r_imp, r_cand = round(max_imp, 7), round(cand, 7)
                        if r_imp < r_cand or (r_imp == r_cand and cand_time < opt_time):
                            max_imp, opt_time = cand, cand_time
                            arg = (t - g, i, j)
                            brks = set(opt.breaks_of(i, m))
                            found = brks if i == 0 else brks | mpos[t - g, i, j]
                if max_imp != -math.inf:
                    dp[t, m, a], dp_time[t, m, a] = max_imp, opt_time
                    back[t, m, a], mpos[t, m, a] = arg, found
    ends = [dp.get((limit, n, a), -math.inf) for a in range(2)]
    if max(ends) == -math.inf:
        return None
    a = int(np.argmax(ends))
    t, m = limit, n
    merge, act = {m}, ({m} if a else set())
    ends_at = {m}
    while m > 0:
        merge |= mpos[t, m, a]
        ends_at.add(m)
        if a:
            act.add(m)
        t, m, a = back[t, m, a]
    st_, st_act = 0, 1
    imp_sum, int_sum, flt_sum = 0, 0, 0
    for pos in sorted(ends_at):
        a = int(pos in act)
        imp_sum += imp[st_, pos, st_act, a]
        int_sum += int(t_opt[st_, pos] * prec)
        flt_sum += t_opt[st_, pos]
        st_, st_act = pos, a
    return act, merge - {0}, imp_sum, int_sum, flt_sum


def assert_reference_match(opt, ext, t0, prec):
    want = reference_optimal_patterns(opt, ext, t0, prec)
    if want is None:
        with pytest.raises(BudgetError):
            solve(opt, ext, t0, rounding="reference", prec=prec)
        return
    got = solve(opt, ext, t0, rounding="reference", prec=prec)
    act, merge, imp_sum, int_sum, flt_sum = want
    assert got.plan.activations == act
    assert got.plan.boundaries == merge
    assert (got.importance, got.grid, got.latency) == (imp_sum, (int_sum, int(t0 * prec)), flt_sum)


def test_reference_rounding_ties_go_to_the_smaller_grid_time():
    """Importances equal to 7 decimals tie in the reference; the path with the smaller
    accumulated grid time wins, although 0 → 2 is 4e-9 more important (exact mode takes it)."""
    latency = LatencyTable.from_rows([(0, 1, 0.59, 0), (1, 2, 0.59, 0), (0, 2, 1.1, 0)])
    imp = ImportanceTable.from_rows(
        [(0, 1, 1, 1, 0.1), (1, 2, 1, 1, 0.2), (0, 2, 1, 1, 0.3 + 4e-9)]
    )
    grid = solve(latency, imp, 5.0, alpha=0, rounding="reference", prec=10)
    assert grid.plan == Plan(activations={1, 2}, boundaries={1, 2}) and grid.grid == (10, 50)
    exact = solve(latency, imp, 5.0, alpha=0)
    assert exact.plan == Plan(activations={2}, boundaries={2})
    assert (exact.latency, exact.importance) == (1.1, 0.3 + 4e-9)
    opt, ext = optimal_latency(latency), extended_importance(imp, alpha=0)
    assert_reference_match(opt, ext, 5.0, 10)


@SETTINGS
@given(
    n=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    all_flags=st.booleans(),
    coarse=st.booleans(),
    prec=st.sampled_from([2, 4, 10]),
    fraction=st.floats(0, 1),
)
def test_reference_rounding_matches_the_reference_dp(n, seed, all_flags, coarse, prec, fraction):
    latency, imp = random_instance(random.Random(seed), n, all_flags, coarse)
    opt = optimal_latency(latency)
    ext = extended_importance(imp, alpha=0 if coarse else 1.6)
    plans = all_plans(opt, ext)
    if plans:
        top = max(p[0] for p in plans)
        assert_reference_match(opt, ext, fraction * top * 1.1, prec)


# ---------------------------------------------------------------------------------------------
# the MobileNetV2 structure (L = 50, 171 blocks, 315 extended blocks)


@pytest.fixture(scope="module")
def mbv2() -> tuple[LatencyTable, OptimalLatencyTable, ExtendedImportanceTable]:
    latency = LatencyTable.read_csv(reference_path(TIME_CSV))
    imp = mbv2_importance(latency)
    assert len(imp) == 315 and int(np.sum(imp.end - imp.st == 1)) == 83
    return latency, optimal_latency(latency), extended_importance(imp, alpha=1.6)


@pytest.mark.parametrize("t0", [18.0, 20.0, 22.1, 25.0, 30.0])
def test_mbv2_plans_keep_the_budget_and_pass_the_post_check(mbv2, t0):
    latency, opt, ext = mbv2
    sol = solve(opt, ext, t0)
    assert sol.latency <= t0
    check_plan(sol, opt)
    assert {5, 11, 20, 41} <= sol.plan.boundaries
    bounds, fastest = optimal_boundaries(latency, sol.plan.activations)
    raw = sum(latency.time_of(i, j) for i, j in sol.plan.blocks)
    assert raw == pytest.approx(sol.latency, abs=1e-9)
    assert fastest == pytest.approx(raw, abs=1e-9)
    assert sol.plan.activations <= bounds


def test_mbv2_sweep_answers_every_budget_like_solve(mbv2):
    _, opt, ext = mbv2
    budgets = [6.5, 12.0, 18.0, 25.0, 33.0]
    swept = sweep(opt, ext, budgets)
    for budget, sol in zip(budgets, swept.solutions, strict=True):
        one = solve(opt, ext, budget)
        assert (sol.latency, sol.importance, sol.plan) == (one.latency, one.importance, one.plan)
    assert swept.front[0][0] == pytest.approx(6.4666, abs=1e-4)
    assert min_latency(opt, ext) == swept.front[0][0]
    with pytest.raises(BudgetError, match=r"6\.46"):
        sweep(opt, ext, [5.0, 25.0])


@pytest.mark.parametrize("t0", [18.0, 25.0])
def test_mbv2_reference_rounding_matches_the_reference_dp(mbv2, t0):
    _, opt, ext = mbv2
    assert_reference_match(opt, ext, t0, 20)


def test_mbv2_exact_never_worse_within_the_same_budget(mbv2):
    """The reference grid may overrun T0; the exact answer never does, and among plans that
    fit, no plan the grid finds beats it."""
    _, opt, ext = mbv2
    for t0 in (18.0, 25.0):
        exact = solve(opt, ext, t0)
        grid = solve(opt, ext, t0, rounding="reference")
        assert exact.latency <= t0
        assert grid.grid is not None and grid.grid[0] <= grid.grid[1]
        if grid.latency <= t0:
            assert exact.importance >= grid.importance - IMPORTANCE_TIE


# ---------------------------------------------------------------------------------------------
# budgets: one syntax for solve and compress


def test_budget_syntax_for_one_budget_a_sweep_and_a_list():
    assert Budget.parse("25") == Budget(25.0) and Budget.parse(" 0.7X ") == Budget(0.7, True)
    assert str(Budget.parse("0.7x")) == "0.7x" and str(Budget.parse("12.5")) == "12.5 ms"
    assert Budget.parse_many("18:19:0.5") == (Budget(18.0), Budget(18.5), Budget(19.0))
    fractions = Budget.parse_many("0.5x:0.9x:0.1x")
    assert [b.value for b in fractions] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert all(b.relative for b in fractions)
    assert Budget.parse_many("20,0.6x") == (Budget(20.0), Budget(0.6, True))
    for text, message in [
        ("0.5x:0.9x:0.1", "mixes ms and fractions"),
        ("1:2", "three parts"),
        ("2:1:1", "stops before it starts"),
        ("1:2:0", "'0' must be positive"),
        (",", "is empty"),
        ("soon", "neither a latency in ms"),
    ]:
        with pytest.raises(BudgetError, match=message):
            Budget.parse_many(text)


def test_a_fractional_budget_is_of_the_single_conv_sum():
    latency = LatencyTable.from_rows((i, j, t, 0.0) for i, j, t in ISSUE_TABLE)
    assert original_latency(latency) == 4.0
    assert original_latency(optimal_latency(latency)) == 4.0
    assert Budget.parse("0.75x").resolve(original_latency(latency)) == 3.0
    imp = ImportanceTable.from_rows([(i, j, 1, 1, 0.0) for i, j, _ in ISSUE_TABLE])
    with pytest.raises(BudgetError, match=r"takes 4\.0 ms .*1\.000x of the original chain latency"):
        solve(latency, imp, 3.0)


def test_budget_is_the_same_class_everywhere():
    import depthcompress as dc
    from depthcompress import pipeline

    assert dc.Budget is Budget and pipeline.Budget is Budget
