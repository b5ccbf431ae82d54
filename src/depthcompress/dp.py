"""The two-stage dynamic programme (ALGORITHM.md §5–§7, §11): pure functions over the tables of
``depthcompress.tables``.

* Stage 1, ``optimal_latency``: ``T_opt(i, j)``, the fastest of all tilings of each block by
  valid blocks (a shortest path; ties keep the unsplit block, then the smallest last split
  point, which reproduces the reference's tables).
* ``normalize_importance`` and ``extended_importance``: ``h̃ = h − α·mean(single-conv h)`` and the
  paper's Algorithm 3.
* Stage 2, ``solve``: choose segment endpoints and flags maximising ``Σ I`` subject to
  ``Σ T_opt ≤ T0``. The default ``rounding="exact"`` needs no time grid: every state ``(j, y)``
  keeps the Pareto set of (latency, importance) of its partial plans, which is exact, and the
  budget is checked on the real float sum, so the plan never exceeds it. ``rounding="reference"``
  reproduces the reference's floor grid (``⌊prec·T⌋``), overruns included.
* ``sweep``: one Pareto DP for the largest budget answers every smaller one.
* ``solve_configs``: stage 2 over (segment, configuration) for layer pruning (LayerMerge,
  docs/layermerge.md): the same exact Pareto DP on ``T(i, j, c)`` and ``I(i, j, x, y, c)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np

from .errors import BudgetError, DepthCompressError, PlanError, TableError, plain
from .plan import Plan
from .tables import (
    ConfigImportanceRow,
    ExtendedImportanceTable,
    ImportanceTable,
    LatencyTable,
    OptimalLatencyTable,
)

DEFAULT_ALPHA = 1.6
"""α of the normalisation: the paper's MobileNetV2-1.0 value (1.2 for MBV2-1.4, 1.4 for VGG19)."""
NORMS = ("single", "delta")
"""How scores are normalised (docs/layermerge.md, "Normalisation"): ``single`` is the paper's
``h − α·mean(single-conv h)`` with single convs scored re-initialised; ``delta`` scores a kept
single conv 0 (nothing changed) and every other segment by its raw ``h``, so the unmodified
network is the most important plan and only the budget makes the DP remove anything."""
DEFAULT_PREC = 20.0
"""Grid of ``rounding="reference"``: steps per ms (the reference's MBV2 value; 10 for VGG)."""
BUDGET_SLACK = 1e-12
"""A plan is within budget when its float ``Σ T_opt ≤ T0 + BUDGET_SLACK`` (ms): absorbs only the
float noise of summing the same times in another order."""
IMPORTANCE_TIE = 1e-9
"""Plans whose summed importance is within this of the best are ties: the fastest one wins."""

MAX_GRID = 10_000_000
"""Largest grid ``⌊prec·T0⌋`` that ``rounding="reference"`` accepts (memory: 8 bytes a step)."""

Rounding = Literal["exact", "reference"]
ROUNDINGS: tuple[str, ...] = ("exact", "reference")


# ---------------------------------------------------------------------------------------------
# budgets


@dataclass(frozen=True)
class Budget:
    """A latency budget: ``value`` ms of Σ T_opt (table units), or with ``relative`` a fraction of
    the original chain's latency (Σ of the single-conv entries of the latency table)."""

    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str | float) -> Budget:
        """``"12.5"`` → 12.5 ms; ``"0.7x"`` → 70 % of the original chain latency."""
        raw = str(text).strip().lower()
        relative = raw.endswith("x")
        try:
            value = float(raw[:-1] if relative else raw)
        except ValueError:
            raise BudgetError(
                f"budget {str(text)!r} is neither a latency in ms (e.g. 12.5) nor a fraction of "
                "the original chain latency (e.g. 0.7x)"
            ) from None
        if not (value > 0 and math.isfinite(value)):
            raise BudgetError(f"budget {str(text)!r} must be positive and finite")
        return cls(value, relative)

    @classmethod
    def parse_many(cls, text: str) -> tuple[Budget, ...]:
        """One budget, a sweep ``START:STOP:STEP`` (stop included; ``18:30:0.5`` in ms or
        ``0.5x:0.9x:0.1x`` in fractions, all three parts alike) or a comma list ``20,0.7x``."""
        raw = str(text).strip()
        if ":" not in raw:
            items = [cls.parse(v) for v in raw.split(",") if v.strip()]
            if not items:
                raise BudgetError(f"budget {raw!r} is empty: give one, e.g. 25 or 0.7x")
            return tuple(items)
        parts = raw.split(":")
        if len(parts) != 3:
            raise BudgetError(
                f"budget sweep {raw!r} needs three parts START:STOP:STEP (18:30:0.5 or "
                "0.5x:0.9x:0.1x)"
            )
        start, stop, step = (cls.parse(v) for v in parts)
        if not start.relative == stop.relative == step.relative:
            raise BudgetError(
                f"budget sweep {raw!r} mixes ms and fractions: write all three parts in ms "
                "(18:30:0.5) or all three as fractions (0.5x:0.9x:0.1x)"
            )
        if stop.value < start.value:
            raise BudgetError(f"budget sweep {raw!r} stops before it starts")
        count = math.floor((stop.value - start.value) / step.value + 1e-9) + 1
        return tuple(
            cls(round(start.value + k * step.value, 10), start.relative) for k in range(count)
        )

    def resolve(self, original_ms: float) -> float:
        """The budget T0 in ms, given the original chain's latency in table units."""
        return self.value * original_ms if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.relative else f"{self.value:g} ms"


def original_latency(latency: LatencyTable | OptimalLatencyTable) -> float:
    """The original chain's latency Σ T(k−1, k) over the single-conv blocks: what ``0.7x`` of a
    budget is a fraction of."""
    return float(sum(latency.time_of(k - 1, k) for k in range(1, latency.num_positions + 1)))


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Segment:
    """One stage-2 segment ``(st, end)`` with flags for an activation at ``st`` and ``end``: its
    convs are merged per ``breaks`` (stage 1) and every activation strictly inside is removed."""

    st: int
    end: int
    st_act: int
    end_act: int
    t_opt: float
    importance: float
    breaks: tuple[int, ...]
    config: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (``config`` only when a pruning configuration was chosen)."""
        out: dict[str, Any] = {
            "st": self.st,
            "end": self.end,
            "st_act": self.st_act,
            "end_act": self.end_act,
            "t_opt": self.t_opt,
            "importance": self.importance,
            "breaks": list(self.breaks),
        }
        if self.config:
            out["config"] = self.config
        return out


@dataclass(frozen=True)
class Solution:
    """A stage-2 answer: the plan (A, S), its ``latency`` (float ``Σ T_opt``, table units), its
    summed extended ``importance``, the ``budget`` it was solved for, and its segments. With
    ``rounding="reference"``, ``grid`` is ``(Σ ⌊prec·T_opt⌋, ⌊prec·T0⌋)``."""

    plan: Plan
    latency: float
    importance: float
    budget: float
    segments: tuple[Segment, ...]
    rounding: str = "exact"
    grid: tuple[int, int] | None = None

    @property
    def within_budget(self) -> bool:
        """Whether ``latency ≤ budget`` (up to ``BUDGET_SLACK``); always true for "exact"."""
        return self.latency <= self.budget + BUDGET_SLACK

    def to_dict(self) -> dict[str, Any]:
        """The plan.json content: activations, boundaries, latency, importance, budget, and the
        per-segment breakdown."""
        out: dict[str, Any] = {
            **self.plan.to_dict(),
            "latency": self.latency,
            "importance": self.importance,
            "budget": self.budget,
            "rounding": self.rounding,
            "segments": [s.to_dict() for s in self.segments],
        }
        if self.grid is not None:
            out["grid"] = {"time": self.grid[0], "budget": self.grid[1]}
        return out


@dataclass(frozen=True)
class Sweep:
    """Many budgets solved at once: ``solutions[k]`` answers ``budgets[k]``, and ``front`` holds
    every Pareto-optimal ``(latency, importance)`` pair up to the largest budget, by latency
    (exact, whatever the rounding; with ``rounding="reference"`` each solution is a grid DP)."""

    budgets: tuple[float, ...]
    solutions: tuple[Solution, ...]
    front: tuple[tuple[float, float], ...]


# ---------------------------------------------------------------------------------------------
# stage 1 and the importance tables


def optimal_latency(latency: LatencyTable) -> OptimalLatencyTable:
    """Stage 1 (§5): ``T_opt(i, j)``, the exact minimum over every tiling of ``[i, j]`` by valid
    blocks (a shortest path from each start ``i``), and its break points, for stage 2's costs.

    Ties keep the unsplit block, then the smallest last break point: on tables where every
    tiling's prefixes are valid blocks (the paper's MobileNetV2 and VGG) this is the reference's
    recursion bit for bit; elsewhere it also finds tilings that cut inside a residual first.
    """
    ending: dict[int, list[tuple[int, float, float]]] = {}
    for (i, j), t, d in zip(
        latency.blocks, latency.time.tolist(), latency.stdev.tolist(), strict=True
    ):
        ending.setdefault(j, []).append((i, t, d))
    for into in ending.values():
        into.sort()
    wanted: dict[int, set[int]] = {}
    for i, j in latency.blocks:
        wanted.setdefault(i, set()).add(j)
    found: dict[tuple[int, int], tuple[float, float, tuple[int, ...]]] = {}
    for i, ends in wanted.items():
        best: dict[int, tuple[float, float, int]] = {i: (0.0, 0.0, i)}
        for p in range(i + 1, max(ends) + 1):
            for a, t, d in ending.get(p, ()):
                head = best.get(a) if a >= i else None
                if head is not None:
                    cand = head[0] + t
                    if p not in best or cand < best[p][0]:
                        best[p] = (cand, head[1] + d, a)
        for j in ends:
            breaks, p = [j], j
            while p != i:
                p = best[p][2]
                breaks.append(p)
            found[i, j] = (best[j][0], best[j][1], tuple(reversed(breaks)))
    blocks = latency.blocks
    return OptimalLatencyTable(
        st=latency.st,
        end=latency.end,
        time=np.asarray([found[b][0] for b in blocks]),
        stdev=np.asarray([found[b][1] for b in blocks]),
        breaks=tuple(found[b][2] for b in blocks),
        ids=latency.ids,
        source=latency.source,
        lines=latency.lines,
    )


def normalize_importance(
    importance: ImportanceTable, alpha: float = DEFAULT_ALPHA, norm: str = "single"
) -> ImportanceTable:
    """``h − α·mean(single-conv h)`` (§6): a per-segment bonus, so few segments aren't favoured;
    with ``norm="delta"`` instead single-conv rows score 0 and the others ``h − control``: each
    change's drop against the unmodified network after the same fine-tuning."""
    _check_norm(norm)
    if norm == "delta":
        single = importance.end - importance.st == 1
        score = np.where(single, 0.0, importance.score - _offset(importance, alpha, norm))
    elif alpha == 0:
        return importance
    else:
        offset = _offset(importance, alpha, norm)
        if math.isnan(offset):
            raise TableError(
                f"{importance.source}: alpha={alpha} subtracts α × the mean score of the "
                "single-conv rows (end = st + 1), but the table has none; add them or use "
                "alpha 0"
            )
        score = importance.score - offset
    return ImportanceTable(
        st=importance.st,
        end=importance.end,
        st_act=importance.st_act,
        end_act=importance.end_act,
        score=score,
        score_name=importance.score_name,
        source=importance.source,
        lines=importance.lines,
        control=importance.control,
    )


def resolve_norm(norm: str | None, prune_layers: bool) -> str:
    """The normalisation a run uses: ``norm`` when given, else ``delta`` with layer pruning
    (the paper's ``single`` makes pruning score above keeping; docs/layermerge.md) and
    ``single`` without it (the paper's method, unchanged)."""
    if norm is None or norm == "auto":
        return "delta" if prune_layers else "single"
    _check_norm(norm)
    return norm


def _offset(importance: ImportanceTable, alpha: float, norm: str) -> float:
    """What normalisation subtracts from a raw score (a single conv's under ``delta`` aside):
    ``α·μ`` (``single``), the control (``delta``)."""
    if norm == "delta":
        return importance.control
    return alpha * importance.single_mean() if alpha else 0.0


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise DepthCompressError(f"norm must be one of {NORMS}, got {norm!r}")


def extended_importance(
    importance: ImportanceTable, alpha: float = DEFAULT_ALPHA, norm: str = "single"
) -> ExtendedImportanceTable:
    """Normalise, then Algorithm 3 (§6): a segment may score as a chain split at flag-0 points."""
    normed = normalize_importance(importance, alpha, norm)
    h = dict(zip(normed.keys, normed.score.tolist(), strict=True))
    ext: dict[tuple[int, int, int, int], float] = {}
    brk: dict[tuple[int, int, int, int], tuple[int, ...]] = {}
    for key in sorted(normed.keys):
        i, j, x, y = key
        best, arg = h[key], j
        for k in range(i + 1, j):
            head = ext.get((i, k, x, 0))
            if head is not None and (k, j, 0, y) in h:
                cand = head + h[k, j, 0, y]
                if cand > best:
                    best, arg = cand, k
        ext[key] = best
        brk[key] = (i, j) if arg == j else (*brk[i, arg, x, 0], j)
    offset = _offset(importance, alpha, norm)
    return ExtendedImportanceTable(
        st=normed.st,
        end=normed.end,
        st_act=normed.st_act,
        end_act=normed.end_act,
        value=np.asarray([ext[k] for k in normed.keys]),
        breaks=tuple(brk[k] for k in normed.keys),
        alpha=float(alpha) if norm == "single" else 0.0,
        offset=float(offset),
        source=normed.source,
        lines=normed.lines,
    )


# ---------------------------------------------------------------------------------------------
# stage 2: the problem as transitions between states (position, flag)


@dataclass(frozen=True)
class _Problem:
    """Stage 2's graph: state ``s = 2·p + flag``; ``incoming[s]`` lists the extended rows ending
    in ``s`` as ``(source state, T_opt, I, row)``, sorted by (st, st_act)."""

    opt: OptimalLatencyTable
    ext: ExtendedImportanceTable
    num_positions: int
    t_opt: tuple[float, ...]
    incoming: tuple[tuple[tuple[int, float, float, int], ...], ...]


def _problem(
    latency: LatencyTable | OptimalLatencyTable,
    importance: ImportanceTable | ExtendedImportanceTable,
    alpha: float,
    norm: str = "single",
) -> _Problem:
    opt = optimal_latency(latency) if isinstance(latency, LatencyTable) else latency
    ext = (
        extended_importance(importance, alpha, norm)
        if isinstance(importance, ImportanceTable)
        else importance
    )
    n = opt.num_positions
    index = opt.index
    times = opt.time.tolist()
    t_opt = []
    for k, (i, j, _, _) in enumerate(ext.keys):
        if j > n:
            raise TableError(
                f"{ext.where(k)}: span ({i}, {j}) reaches position {j}, but the latency table "
                f"{opt.source} has positions 0..{n}: the two tables describe different chains"
            )
        row = index.get((i, j))
        if row is None:
            raise TableError(
                f"{ext.where(k)}: block ({i}, {j}) has no row in the latency table {opt.source}: "
                "the two tables describe different chains (or the latency table is incomplete)"
            )
        t_opt.append(times[row])
    if ext.num_positions < n:
        raise TableError(
            f"{ext.source}: the importance rows reach position {ext.num_positions} at most, but "
            f"the latency table {opt.source} has positions 0..{n}: the two tables are over "
            "different positions (no segment ends at the last position)"
        )
    incoming: list[list[tuple[int, float, float, int]]] = [[] for _ in range(2 * n + 2)]
    order = sorted(range(len(ext)), key=lambda k: (ext.keys[k][0], ext.keys[k][2]))
    values = ext.value.tolist()
    for k in order:
        i, j, x, y = ext.keys[k]
        incoming[2 * j + y].append((2 * i + x, t_opt[k], values[k], k))
    problem = _Problem(opt, ext, n, tuple(t_opt), tuple(tuple(s) for s in incoming))
    if math.isinf(_fastest(problem)):
        raise TableError(
            f"{ext.source}: no chain of importance rows leads from position 0 (flag 1) to the "
            f"last position {n}: a segment ending with flag y at p needs a row starting at p "
            "with st_act = y"
        )
    return problem


def _fastest(problem: _Problem) -> float:
    """The smallest float ``Σ T_opt`` of any complete plan (inf if there is none)."""
    return _shortest(problem.incoming)


def _shortest(incoming: Sequence[Sequence[tuple[int, float, float, int]]]) -> float:
    """The smallest float time from state 1 (position 0, flag 1) to either state of L."""
    best = [math.inf] * len(incoming)
    best[1] = 0.0
    for s in range(2, len(best)):
        for src, t, _, _ in incoming[s]:
            cand = best[src] + t
            if cand < best[s]:
                best[s] = cand
    return min(best[-2], best[-1])


def _solution(problem: _Problem, rows: Sequence[int], budget: float, **extra: Any) -> Solution:
    """Assemble a Solution from its extended rows, in chain order."""
    ext, opt = problem.ext, problem.opt
    latency, importance = 0.0, 0.0
    segments: list[Segment] = []
    kept: set[int] = set()
    bounds: set[int] = set()
    for k in rows:
        i, j, x, y = ext.keys[k]
        t, v = problem.t_opt[k], float(ext.value[k])
        latency += t
        importance += v
        breaks = opt.breaks_of(i, j)
        segments.append(Segment(i, j, x, y, t, v, breaks))
        bounds.update(breaks)
        if y:
            kept.add(j)
    bounds.discard(0)
    return Solution(
        plan=Plan(activations=frozenset(kept), boundaries=frozenset(bounds)),
        latency=latency,
        importance=importance,
        budget=float(budget),
        segments=tuple(segments),
        **extra,
    )


def _check_budget(budget: float) -> float:
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise BudgetError(f"the budget must be a number of ms, got {plain(budget)!r}") from None
    if not math.isfinite(value):
        raise BudgetError(f"the budget must be a finite number of ms, got {value}")
    return value


def _check_rounding(rounding: str, prec: float) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    if rounding == "reference" and not prec > 0:
        raise ValueError(f"prec must be a positive number of grid steps per ms, got {prec}")


def _too_tight(problem: _Problem, budget: float, note: str = "") -> BudgetError:
    fastest = _fastest(problem)
    original = original_latency(problem.opt)
    share = (
        f"; {math.ceil(1000 * fastest / original) / 1000:.3f}x of the original chain latency "
        f"Σ T(k-1,k) = {original:.4f} ms"
        if original > 0
        else ""
    )
    return BudgetError(
        f"no plan fits the budget {budget:g} ms{note}: the fastest plan these tables allow "
        f"takes {float(fastest)!r} ms (Σ T_opt over its segments{share}); use a budget of at "
        "least that"
    )


# ---------------------------------------------------------------------------------------------
# stage 2, exact: Pareto sets of (latency, importance) per state


@dataclass(frozen=True)
class _Front:
    """The Pareto set of one state: latency ascending, importance strictly ascending, and for
    each point the state and index it extends and the extended row that does so."""

    lat: np.ndarray
    imp: np.ndarray
    src: np.ndarray
    idx: np.ndarray
    row: np.ndarray


def _pareto(lat: np.ndarray, imp: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points, by latency; exact ties keep the first candidate."""
    order = np.lexsort((-imp, lat))
    ranked = imp[order]
    keep = np.empty(len(order), dtype=bool)
    keep[0] = True
    np.greater(ranked[1:], np.maximum.accumulate(ranked)[:-1], out=keep[1:])
    return order[keep]


def _pareto_dp(
    incoming: Sequence[Sequence[tuple[int, float, float, int]]], cap: float
) -> list[_Front | None]:
    """Pareto sets of every state, partial plans slower than ``cap`` dropped (times are ≥ 0)."""
    n_states = len(incoming)
    fronts: list[_Front | None] = [None] * n_states
    zero = np.zeros(1)
    none = np.full(1, -1)
    fronts[1] = _Front(zero, zero, none, none, none)
    for s in range(2, n_states):
        lats, imps, srcs, idxs, rows = [], [], [], [], []
        for src, t, v, row in incoming[s]:
            base = fronts[src]
            if base is None:
                continue
            lat = base.lat + t
            m = int(np.searchsorted(lat, cap, side="right"))
            if m == 0:
                continue
            lats.append(lat[:m])
            imps.append(base.imp[:m] + v)
            srcs.append(np.full(m, src))
            idxs.append(np.arange(m))
            rows.append(np.full(m, row))
        if not lats:
            continue
        lat, imp = np.concatenate(lats), np.concatenate(imps)
        keep = _pareto(lat, imp)
        fronts[s] = _Front(
            lat[keep],
            imp[keep],
            np.concatenate(srcs)[keep],
            np.concatenate(idxs)[keep],
            np.concatenate(rows)[keep],
        )
    return fronts


def _final_front(fronts: list[_Front | None]) -> _Front | None:
    """The complete plans' Pareto set (flag 0 at L first, so it wins exact ties)."""
    last = len(fronts) - 2
    ends = [(s, f) for s in (last, last + 1) if (f := fronts[s]) is not None]
    if not ends:
        return None
    lat = np.concatenate([f.lat for _, f in ends])
    imp = np.concatenate([f.imp for _, f in ends])
    src = np.concatenate([np.full(len(f.lat), s) for s, f in ends])
    idx = np.concatenate([np.arange(len(f.lat)) for _, f in ends])
    keep = _pareto(lat, imp)
    return _Front(lat[keep], imp[keep], src[keep], idx[keep], np.full(len(keep), -1))


def _pick(final: _Front | None, budget: float) -> int | None:
    """The best point within ``budget``: highest importance, the fastest among ties."""
    if final is None:
        return None
    m = int(np.searchsorted(final.lat, budget + BUDGET_SLACK, side="right"))
    if m == 0:
        return None
    best = final.imp[m - 1]
    return int(np.searchsorted(final.imp[:m], best - IMPORTANCE_TIE, side="left"))


def _rows_of(fronts: list[_Front | None], final: _Front, k: int) -> list[int]:
    """Walk the back-pointers from point k of the final front to position 0."""
    rows = []
    s, i = int(final.src[k]), int(final.idx[k])
    while s != 1:
        f = fronts[s]
        assert f is not None
        rows.append(int(f.row[i]))
        s, i = int(f.src[i]), int(f.idx[i])
    return rows[::-1]


# ---------------------------------------------------------------------------------------------
# stage 2, reference: the floor grid of utils/dp.py: optimal_patterns


def _round7(x: np.ndarray) -> np.ndarray:
    """Python's ``round(v, 7)`` elementwise (numpy's differs only next to a half step)."""
    out = np.round(x, 7)
    with np.errstate(invalid="ignore"):
        scaled = x * 1e7
        near = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-4
    for k in np.flatnonzero(near):
        out[k] = round(float(x[k]), 7)
    return out


def _reference_dp(problem: _Problem, budget: float, prec: float) -> Solution:
    """The reference's grid DP: ``g = ⌊prec·T_opt⌋``, ``B = ⌊prec·T0⌋``, base case ``t < B``;
    on a tie after rounding to 7 decimals the smaller accumulated grid time, then the first
    candidate (st ascending, then st_act); ``y = 0`` at L wins an exact tie."""
    limit = int(budget * prec)
    grid = [int(t * prec) for t in problem.t_opt]
    n_states = 2 * problem.num_positions + 2
    if limit < 0:
        raise _too_tight(problem, budget, f" (reference rounding: ⌊{prec:g}·T0⌋ = {limit})")
    if limit > MAX_GRID:
        raise BudgetError(
            f"reference rounding would need a grid of {limit} steps (prec {prec:g} × budget "
            f"{budget:g}); lower prec or use rounding='exact', which needs no grid"
        )
    width = limit + 1
    value: list[np.ndarray | None] = [None] * n_states
    used: list[np.ndarray | None] = [None] * n_states
    arg: list[np.ndarray | None] = [None] * n_states
    base = np.zeros(width)
    base[limit] = -np.inf
    value[1], used[1] = base, np.zeros(width, np.int64)
    for s in range(2, n_states):
        best = np.full(width, -np.inf)
        rbest = best.copy()
        tbest = np.zeros(width, np.int64)
        who = np.full(width, -1, np.int64)
        for src, _, v, row in problem.incoming[s]:
            g = grid[row]
            sv, su = value[src], used[src]
            if sv is None or su is None or g > limit:
                continue
            cand = np.full(width, -np.inf)
            cand[g:] = sv[: width - g] + v
            ctime = np.zeros(width, np.int64)
            ctime[g:] = su[: width - g] + g
            rc = _round7(cand)
            win = (rbest < rc) | ((rbest == rc) & (ctime < tbest))
            win &= cand > -np.inf
            best[win], rbest[win], tbest[win], who[win] = cand[win], rc[win], ctime[win], row
        if (who >= 0).any():
            value[s], used[s], arg[s] = best, tbest, who
    ends = [
        -np.inf if (final := value[s]) is None else final[limit]
        for s in (n_states - 2, n_states - 1)
    ]
    if max(ends) == -np.inf:
        raise _too_tight(problem, budget, f" (reference rounding, prec {prec:g}, grid B = {limit})")
    s = n_states - 2 + int(np.argmax(ends))
    t, rows = limit, []
    while s != 1:
        who_s = arg[s]
        assert who_s is not None
        row = int(who_s[t])
        rows.append(row)
        t -= grid[row]
        s = 2 * problem.ext.keys[row][0] + problem.ext.keys[row][2]
    rows.reverse()
    return _solution(
        problem, rows, budget, rounding="reference", grid=(sum(grid[r] for r in rows), limit)
    )


# ---------------------------------------------------------------------------------------------
# public stage 2


def solve(
    latency: LatencyTable | OptimalLatencyTable,
    importance: ImportanceTable | ExtendedImportanceTable,
    budget: float,
    *,
    alpha: float = DEFAULT_ALPHA,
    rounding: Rounding = "exact",
    prec: float = DEFAULT_PREC,
    norm: str = "single",
) -> Solution:
    """The plan maximising ``Σ I`` with ``Σ T_opt ≤ budget`` (§7); raw tables get §5/§6 first."""
    value = _check_budget(budget)
    _check_rounding(rounding, prec)
    problem = _problem(latency, importance, alpha, norm)
    if rounding == "reference":
        return _reference_dp(problem, value, prec)
    fronts = _pareto_dp(problem.incoming, value + BUDGET_SLACK)
    final = _final_front(fronts)
    k = _pick(final, value)
    if final is None or k is None:
        raise _too_tight(problem, value)
    return _solution(problem, _rows_of(fronts, final, k), value)


def sweep(
    latency: LatencyTable | OptimalLatencyTable,
    importance: ImportanceTable | ExtendedImportanceTable,
    budgets: Iterable[float],
    *,
    alpha: float = DEFAULT_ALPHA,
    rounding: Rounding = "exact",
    prec: float = DEFAULT_PREC,
    norm: str = "single",
) -> Sweep:
    """The best plan per budget and the Pareto front, from one exact DP for the largest budget."""
    values = tuple(_check_budget(b) for b in budgets)
    if not values:
        raise BudgetError("a sweep needs at least one budget")
    _check_rounding(rounding, prec)
    problem = _problem(latency, importance, alpha, norm)
    fronts = _pareto_dp(problem.incoming, max(values) + BUDGET_SLACK)
    final = _final_front(fronts)
    front = () if final is None else tuple(zip(final.lat.tolist(), final.imp.tolist(), strict=True))
    if rounding == "reference":
        sols = tuple(_reference_dp(problem, b, prec) for b in values)
        return Sweep(budgets=values, solutions=sols, front=front)
    picks = [_pick(final, b) for b in values]
    if final is None or None in picks:
        raise _too_tight(problem, min(values), " (the smallest of the sweep)")
    sols = tuple(
        _solution(problem, _rows_of(fronts, final, k), b)
        for b, k in zip(values, cast("list[int]", picks), strict=True)
    )
    return Sweep(budgets=values, solutions=sols, front=front)


def min_latency(
    latency: LatencyTable | OptimalLatencyTable,
    importance: ImportanceTable | ExtendedImportanceTable,
) -> float:
    """The smallest ``Σ T_opt`` any plan allowed by the tables reaches: the tightest budget."""
    return _fastest(_problem(latency, importance, 0.0))


def optimal_boundaries(
    latency: LatencyTable, activations: Iterable[int]
) -> tuple[frozenset[int], float]:
    """The fastest S for a given A, and its ``Σ T``: the reference's post-check of stage 2 (§7)."""
    keep = set(activations)
    n = latency.num_positions
    time = dict(zip(latency.blocks, latency.time.tolist(), strict=True))
    best: dict[int, float] = {0: 0.0}
    back: dict[int, int] = {}
    last = 0
    for m in range(1, n + 1):
        for i in range(last, m):
            if (i, m) in time and i in best:
                cand = best[i] + time[i, m]
                if cand < best.get(m, math.inf):
                    best[m], back[m] = cand, i
        if m in keep:
            last = m
    if n not in best:
        raise PlanError(
            f"no tiling of 0..{n} by valid blocks keeps the activations {sorted(plain(keep))}"
        )
    bounds, m = set(), n
    while m > 0:
        bounds.add(m)
        m = back[m]
    return frozenset(bounds), best[n]


# ---------------------------------------------------------------------------------------------
# stage 2 with layer pruning: a configuration per segment


ConfigKey = tuple[int, int, int]
"""``(i, j, c)``: configuration ``c`` of segment ``(i, j)``."""


@dataclass(frozen=True)
class ConfigTables:
    """Stage 2's input with layer pruning: ``time[i, j, c]`` = T(i, j, c), ``importance[i, j, x,
    y, c]`` = I (flags ``x``, ``y`` as in the extended importance table), and per ``(i, j, c)``
    the block boundaries inside the segment (default: one block) and the positions it prunes."""

    time: Mapping[ConfigKey, float]
    importance: Mapping[tuple[int, int, int, int, int], float]
    breaks: Mapping[ConfigKey, tuple[int, ...]] = field(default_factory=dict)
    pruned: Mapping[ConfigKey, frozenset[int]] = field(default_factory=dict)

    @property
    def num_positions(self) -> int:
        """L: the last position any segment reaches."""
        return max((j for _, j, _ in self.time), default=0)


def _config_incoming(
    tables: ConfigTables,
) -> tuple[list[tuple[int, int, int, int, int]], list[list[tuple[int, float, float, int]]]]:
    """The importance keys in DP order (st, st_act, c) and the transitions into each state."""
    n = tables.num_positions
    keys = sorted(tables.importance, key=lambda k: (k[0], k[2], k[4]))
    incoming: list[list[tuple[int, float, float, int]]] = [[] for _ in range(2 * n + 2)]
    for row, (i, j, x, y, c) in enumerate(keys):
        if (i, j, c) not in tables.time:
            raise TableError(
                f"importance of segment ({i}, {j}) configuration {c} has no latency T({i}, {j}, "
                f"{c}): the two tables describe different configurations"
            )
        value = float(tables.importance[i, j, x, y, c])
        incoming[2 * j + y].append((2 * i + x, float(tables.time[i, j, c]), value, row))
    return keys, incoming


def _config_solution(
    tables: ConfigTables,
    keys: Sequence[tuple[int, int, int, int, int]],
    rows: Sequence[int],
    budget: float,
) -> Solution:
    """Assemble a Solution (plan with its pruned positions) from the chosen rows."""
    latency, importance = 0.0, 0.0
    segments: list[Segment] = []
    kept: set[int] = set()
    bounds: set[int] = set()
    pruned: set[int] = set()
    for r in rows:
        i, j, x, y, c = keys[r]
        t, v = float(tables.time[i, j, c]), float(tables.importance[keys[r]])
        latency += t
        importance += v
        breaks = tuple(tables.breaks.get((i, j, c), (i, j)))
        segments.append(Segment(i, j, x, y, t, v, breaks, config=c))
        bounds.update(breaks)
        pruned.update(tables.pruned.get((i, j, c), frozenset()))
        if y:
            kept.add(j)
    bounds.discard(0)
    plan = Plan(activations=frozenset(kept), boundaries=frozenset(bounds), pruned=frozenset(pruned))
    return Solution(
        plan=plan,
        latency=latency,
        importance=importance,
        budget=float(budget),
        segments=tuple(segments),
    )


def solve_configs(tables: ConfigTables, budget: float) -> Solution:
    """The plan maximising ``Σ I(i, j, x, y, c)`` with ``Σ T(i, j, c) ≤ budget``: per segment a
    configuration, by the exact Pareto DP of ``solve`` (same budget check, same tie rules); with
    one configuration per segment it is ``solve`` on ``T_opt`` and the extended importance."""
    value = _check_budget(budget)
    keys, incoming = _config_incoming(tables)
    if math.isinf(_shortest(incoming)):
        raise TableError(
            "no chain of importance rows leads from position 0 (flag 1) to the last position "
            f"{tables.num_positions}: a segment ending with flag y at p needs a row starting at "
            "p with st_act = y"
        )
    fronts = _pareto_dp(incoming, value + BUDGET_SLACK)
    final = _final_front(fronts)
    k = _pick(final, value)
    if final is None or k is None:
        fastest = _shortest(incoming)
        raise BudgetError(
            f"no plan fits the budget {value:g} ms: the fastest plan these tables allow takes "
            f"{fastest!r} ms (Σ T over its segments); use a budget of at least that"
        )
    return _config_solution(tables, keys, _rows_of(fronts, final, k), value)


def config_tables(
    opt: OptimalLatencyTable,
    importance: ImportanceTable,
    config_time: Mapping[ConfigKey, float],
    config_rows: Iterable[ConfigImportanceRow],
    alpha: float = DEFAULT_ALPHA,
    norm: str = "single",
) -> ConfigTables:
    """Stage 2's input with layer pruning: configuration 0 is today's problem (``T_opt`` with
    its breaks, the extended importance), and each configuration row (i, j, x, y, c ≥ 1) is a
    single-block segment with ``T(i, j, c)`` and its score normalised as today's rows are
    (minus α × the mean single-conv score of the plain table, or raw with ``norm="delta"``),
    pruning its best subset."""
    ext = extended_importance(importance, alpha, norm)
    offset = ext.offset  # what normalisation subtracted from every raw score
    time: dict[ConfigKey, float] = {}
    values: dict[tuple[int, int, int, int, int], float] = {}
    breaks: dict[ConfigKey, tuple[int, ...]] = {}
    pruned: dict[ConfigKey, frozenset[int]] = {}
    for (i, j, x, y), value in zip(ext.keys, ext.value.tolist(), strict=True):
        time[i, j, 0] = opt.time_of(i, j)
        breaks[i, j, 0] = opt.breaks_of(i, j)
        values[i, j, x, y, 0] = value
    for row in config_rows:
        i, j, _, _, c = row.key
        values[row.key] = row.val_acc - offset
        time[i, j, c] = float(config_time[i, j, c]) if (i, j, c) in config_time else math.nan
        pruned[i, j, c] = row.pruned
    missing = [k for k, t in time.items() if math.isnan(t)]
    if missing:
        raise TableError(
            f"configuration importance rows {missing[:3]} have no row in the configuration "
            "latency table: the two tables describe different chains or configurations"
        )
    return ConfigTables(time=time, importance=values, breaks=breaks, pruned=pruned)


def min_latency_configs(tables: ConfigTables) -> float:
    """The smallest ``Σ T`` any plan of ``tables`` reaches: the tightest budget."""
    return _shortest(_config_incoming(tables)[1])


def sweep_configs(tables: ConfigTables, budgets: Iterable[float]) -> Sweep:
    """``sweep`` with layer pruning: the best plan per budget and the Pareto front, from one
    exact DP over (segment, configuration) for the largest budget."""
    values = tuple(_check_budget(b) for b in budgets)
    if not values:
        raise BudgetError("a sweep needs at least one budget")
    keys, incoming = _config_incoming(tables)
    fronts = _pareto_dp(incoming, max(values) + BUDGET_SLACK)
    final = _final_front(fronts)
    front = () if final is None else tuple(zip(final.lat.tolist(), final.imp.tolist(), strict=True))
    picks = [_pick(final, b) for b in values]
    if final is None or None in picks:
        raise BudgetError(
            f"no plan fits the budget {min(values):g} ms (the smallest of the sweep): the "
            f"fastest plan these tables allow takes {_shortest(incoming)!r} ms"
        )
    sols = tuple(
        _config_solution(tables, keys, _rows_of(fronts, final, k), b)
        for b, k in zip(values, cast("list[int]", picks), strict=True)
    )
    return Sweep(budgets=values, solutions=sols, front=front)
