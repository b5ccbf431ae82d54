"""The latency table calibrated against whole-network timings, so a budget means the whole network.

Σ T over a plan's blocks misses what lies outside the chain (stem, head, pooling) and what a
backend does across block borders (per-call overheads, fusions). A few solved plans spread over
the front are merged with the original weights and timed whole against the original network in
paired rounds (``speedup.paired_speedup``); a least-squares fit then gives

    whole_ms ≈ c + Σ_blocks (a · T(block) + o)

as one of two two-parameter models, whichever leaves the smaller residuals: ``scale`` (o = 0)
or ``overhead`` (a = 1, a per-merged-conv overhead o). ``c`` is the part outside the chain. The
DP then runs on the calibrated table T' = a·T + o (stage 1 recomputed, so the per-block term is
exact for every tiling), and a whole-network target W becomes the table budget W − c.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .dp import (
    Budget,
    ConfigTables,
    Solution,
    config_tables,
    min_latency_configs,
    optimal_boundaries,
    optimal_latency,
    sweep,
    sweep_configs,
)
from .errors import DepthCompressError
from .plan import Plan
from .pruning import block_configs, config_of
from .tables import ConfigImportanceRow, ImportanceTable, LatencyTable

if TYPE_CHECKING:
    from torch import nn

    from .backends import Backend
    from .graph import ConvChain
    from .speedup import Rule, SpeedupResult

MODELS = ("scale", "overhead")
"""The calibration models ``fit_whole`` chooses between."""

ConfigTimes = Mapping[tuple[int, int, int], float]
"""T(i, j, c) of the configuration latency table (layer pruning), keyed by (i, j, c)."""


@dataclass(frozen=True)
class Fit:
    """``whole_ms ≈ c + Σ_blocks (a·T + o)``: ``model`` names which of a (``scale``) or o
    (``overhead``) was fitted, the other held at 1 or 0; residuals are measured − fitted (ms)."""

    model: str
    c: float
    a: float
    o: float
    residuals: tuple[float, ...]

    @property
    def rms(self) -> float:
        """Root mean square of the residuals (ms)."""
        return float(np.sqrt(np.mean(np.square(self.residuals)))) if self.residuals else 0.0

    def block_time(self, t: np.ndarray) -> np.ndarray:
        """The calibrated latency of blocks of table latency ``t``: a·t + o."""
        return self.a * np.asarray(t, dtype=float) + self.o

    def predict(self, sum_t: float, n_blocks: int) -> float:
        """The whole network's latency for a plan of ``n_blocks`` blocks summing to ``sum_t``."""
        return self.c + self.a * sum_t + self.o * n_blocks


def _least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """The least-squares coefficients, or None when the design does not determine them."""
    coef, _, rank, _ = np.linalg.lstsq(design, target, rcond=None)
    return coef if rank == design.shape[1] else None


def _line(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Intercept and slope of ``y ≈ c + s·x`` by least squares, with ``c`` ≥ 0 (a negative free
    intercept is fitted again through 0); None when the points do not determine them."""
    coef = _least_squares(np.column_stack([np.ones_like(x), x]), y)
    if coef is None or coef[0] >= 0:
        return coef
    slope = _least_squares(x[:, None], y)
    return None if slope is None else np.asarray([0.0, slope[0]])


def _model_fit(model: str, x: np.ndarray, n: np.ndarray, y: np.ndarray) -> Fit | None:
    """One model fitted to the points, or None when the points cannot determine it or it would
    give a block a non-positive calibrated latency's slope (a ≤ 0). The part outside the chain
    cannot take negative time: where the free fit puts c below 0 (noisy timings), it is fitted
    again with c = 0, or a budget below every plan would pass for a reachable one."""
    if model == "scale":
        coef = _line(x, y)
        if coef is None or coef[1] <= 0:
            return None
        c, a, o = float(coef[0]), float(coef[1]), 0.0
    else:
        coef = _line(n, y - x)
        if coef is None:
            return None
        c, a, o = float(coef[0]), 1.0, float(coef[1])
    fitted = c + a * x + o * n
    return Fit(model, c, a, o, tuple(float(r) for r in y - fitted))


def fit_whole(sum_t: Sequence[float], n_blocks: Sequence[int], whole_ms: Sequence[float]) -> Fit:
    """Fit ``whole_ms`` of plans against their table latency ``sum_t`` and block count: the model
    of ``MODELS`` with the smaller residuals; a constant offset (a = 1, o = 0) when neither can be
    determined (e.g. every plan has the same Σ T)."""
    x, n, y = (np.asarray(v, dtype=float) for v in (sum_t, n_blocks, whole_ms))
    if not len(x) == len(n) == len(y) or len(x) == 0:
        raise DepthCompressError("a calibration needs one Σ T, block count and timing per plan")
    fits = [f for f in (_model_fit(m, x, n, y) for m in MODELS) if f is not None]
    if fits:
        return min(fits, key=lambda f: f.rms)
    c = float(np.mean(y - x))
    return Fit("offset", c, 1.0, 0.0, tuple(float(r) for r in y - x - c))


def calibrated_table(latency: LatencyTable, fit: Fit) -> LatencyTable:
    """The latency table in whole-network terms, T' = a·T + o per block, floored at zero."""
    time = np.maximum(fit.block_time(latency.time), 0.0)
    return replace(
        latency, time=time, stdev=fit.a * latency.stdev, source=f"{latency.source} (calibrated)"
    )


def calibrated_config_times(
    config_time: ConfigTimes, fit: Fit
) -> dict[tuple[int, int, int], float]:
    """T(i, j, c) of the configuration table on the calibrated scale, like ``calibrated_table``:
    each configuration is one block, T' = a·T + o (never below 0)."""
    keys = list(config_time)
    times = np.maximum(fit.block_time(np.asarray([config_time[k] for k in keys], float)), 0.0)
    return dict(zip(keys, times.tolist(), strict=True))


def plan_time(
    latency: LatencyTable,
    plan: Plan,
    config_time: ConfigTimes | None = None,
    chain: ConvChain | None = None,
) -> float:
    """Σ T over the plan's blocks; a block with pruned convs costs its configuration's
    T(i, j, c), so a plan that prunes needs ``config_time`` and the ``chain``."""
    if not plan.pruned:
        return float(sum(latency.time_of(i, j) for i, j in plan.blocks))
    if config_time is None or chain is None:
        raise DepthCompressError(
            "a plan that prunes convolutions is priced from the configuration latency table: "
            "pass config_time and chain"
        )
    total = 0.0
    for i, j in plan.blocks:
        inside = frozenset(p for p in plan.pruned if i < p <= j)
        c = config_of(chain, i, j, inside)
        total += config_time[i, j, c] if c else latency.time_of(i, j)
    return float(total)


@dataclass(frozen=True)
class Point:
    """One timed plan: its Σ T (table units), blocks, the whole network's latency (ms) and the
    paired speed-up over the original with its interval (1 for the original itself)."""

    label: str
    activations: tuple[int, ...]
    boundaries: tuple[int, ...]
    sum_t: float
    n_blocks: int
    whole_ms: float
    speedup: float
    low: float
    high: float
    pruned: tuple[int, ...] = field(default=())


@dataclass(frozen=True)
class Calibration:
    """The fit, the points it was made from and the measured whole original latency; converts a
    budget into a whole-network target and a table budget in calibrated units (T')."""

    fit: Fit
    points: tuple[Point, ...]
    original_whole_ms: float

    def whole_target(self, budget: Budget) -> float:
        """The whole network's target latency (ms): a fraction of the measured original, or ms."""
        return budget.value * self.original_whole_ms if budget.relative else budget.value

    def table_budget(self, budget: Budget) -> float:
        """The DP's budget on the calibrated table: the whole-network target less c."""
        return self.whole_target(budget) - self.fit.c

    def predicted_whole(self, table_latency: float) -> float:
        """The whole network's predicted latency (ms) of a plan of calibrated Σ T' = latency."""
        return self.fit.c + table_latency

    def least_fraction(self, fastest_table: float) -> float:
        """The smallest whole-network fraction any plan reaches (fastest calibrated Σ T')."""
        return self.predicted_whole(fastest_table) / self.original_whole_ms

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``calibration.json``."""
        return {
            "fit": {**asdict(self.fit), "rms": self.fit.rms},
            "original_whole_ms": self.original_whole_ms,
            "points": [asdict(p) for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Read back ``to_dict``'s form."""
        fit = {k: v for k, v in data["fit"].items() if k != "rms"}
        fit["residuals"] = tuple(fit["residuals"])
        points = tuple(
            Point(
                **{
                    **p,
                    "activations": tuple(p["activations"]),
                    "boundaries": tuple(p["boundaries"]),
                    "pruned": tuple(p.get("pruned", ())),
                }
            )
            for p in data["points"]
        )
        return cls(Fit(**fit), points, float(data["original_whole_ms"]))


def from_points(points: Sequence[Point]) -> Calibration:
    """The calibration fitted to ``points``; the first is the original network."""
    fit = fit_whole(
        [p.sum_t for p in points], [p.n_blocks for p in points], [p.whole_ms for p in points]
    )
    return Calibration(fit, tuple(points), points[0].whole_ms)


def calibration_plans(
    latency: LatencyTable,
    blocks: Sequence[tuple[int, int]],
    linear: Sequence[int],
    count: int,
    seed: int = 0,
) -> list[tuple[str, Plan]]:
    """``count`` distinct plans spread over the front, fastest first: the DP on a seeded synthetic
    importance table at budgets evenly spaced from the fastest tiling to the original chain
    (only their latencies matter). Fewer when plans coincide."""
    n = latency.num_positions
    original = sum(latency.time_of(k - 1, k) for k in range(1, n + 1))
    _, fastest = optimal_boundaries(latency, ())
    if fastest >= original * (1 - 1e-9) or count < 1:
        return []
    steps, budgets = _spread(fastest, original, count)
    importance = ImportanceTable.synthetic(blocks, linear, seed=seed)
    return _distinct(steps, sweep(latency, importance, budgets).solutions, n)


def _spread(fastest: float, original: float, count: int) -> tuple[list[float], list[float]]:
    """``count`` fractions of the span from the fastest plan to the original, and their budgets."""
    steps = [k / count for k in range(count)]
    return steps, [fastest + (original - fastest) * f for f in steps]


def _distinct(
    steps: Sequence[float], solutions: Sequence[Solution], n: int
) -> list[tuple[str, Plan]]:
    """The solutions' plans, labelled by their step, without repeats or the original itself."""
    out: list[tuple[str, Plan]] = []
    for f, sol in zip(steps, solutions, strict=True):
        changed = len(sol.plan.blocks) < n or sol.plan.pruned
        if changed and sol.plan not in (p for _, p in out):
            out.append((f"fastest + {f:.2f} of the span" if f else "fastest", sol.plan))
    return out


def synthetic_config_tables(
    chain: ConvChain, latency: LatencyTable, config_time: ConfigTimes, seed: int = 0
) -> ConfigTables:
    """Stage 2's input with layer pruning on seeded synthetic scores (``ImportanceTable.synthetic``
    for the segments; a configuration scores below its block's unpruned score, more so the more
    it prunes): plans over the configuration front where only latencies matter."""
    importance = ImportanceTable.synthetic(chain.blocks, chain.linear_positions, seed=seed)
    rng = np.random.default_rng(seed + 1)
    rows = []
    configs = {(i, j): block_configs(chain, i, j) for i, j, _ in config_time}
    for (i, j, x, y), score in zip(importance.keys, importance.score.tolist(), strict=True):
        for c, config in enumerate(configs.get((i, j), [])[1:], start=1):
            if (i, j, c) in config_time:
                drop = abs(rng.normal(0.5, 0.3)) * len(config.subsets[0])
                pruned = config.subsets[0]
                rows.append(ConfigImportanceRow(i, j, x, y, c, score - drop, 0, 0, 0, 0, pruned, 1))
    return config_tables(optimal_latency(latency), importance, config_time, rows, alpha=0.0)


def config_calibration_plans(
    chain: ConvChain, latency: LatencyTable, config_time: ConfigTimes, count: int, seed: int = 0
) -> list[tuple[str, Plan]]:
    """``calibration_plans`` with layer pruning: ``count`` distinct plans spread from the fastest
    plan the configurations allow to the original, solved over (segment, configuration) on
    synthetic scores, so the fit also sees pruned blocks and plans below merging's fastest."""
    n = latency.num_positions
    original = sum(latency.time_of(k - 1, k) for k in range(1, n + 1))
    tables = synthetic_config_tables(chain, latency, config_time, seed)
    fastest = min_latency_configs(tables)
    if fastest >= original * (1 - 1e-9) or count < 1:
        return []
    steps, budgets = _spread(fastest, original, count)
    return _distinct(steps, sweep_configs(tables, budgets).solutions, n)


def _point(
    label: str,
    plan: Plan,
    latency: LatencyTable,
    base_ms: float,
    result: SpeedupResult | None,
    config_time: ConfigTimes | None = None,
    chain: ConvChain | None = None,
) -> Point:
    """A plan's point: whole latency = the original's over the paired speed-up (none: 1)."""
    speedup, low, high = (result.speedup, result.low, result.high) if result else (1.0, 1.0, 1.0)
    return Point(
        label=label,
        activations=tuple(sorted(plan.activations)),
        boundaries=tuple(sorted(plan.boundaries)),
        sum_t=plan_time(latency, plan, config_time, chain),
        n_blocks=len(plan.blocks),
        whole_ms=base_ms / speedup,
        speedup=speedup,
        low=low,
        high=high,
        pruned=tuple(sorted(plan.pruned)),
    )


def measure_points(
    original: nn.Module,
    chain: ConvChain,
    latency: LatencyTable,
    plans: Sequence[tuple[str, Plan]],
    backend: Backend,
    input_shape: tuple[int, ...],
    rule: Rule,
    config_time: ConfigTimes | None = None,
) -> list[Point]:
    """Time each plan's merged network (original weights) against the original in paired rounds;
    the original's point comes first, its latency the median of its side of every pair (plans
    that prune convs are priced from ``config_time``)."""
    from .linearization import linearize
    from .merging import merge
    from .speedup import paired_speedup

    results = []
    for label, plan in plans:
        merged = merge(linearize(original, chain, plan), chain, plan)
        result = paired_speedup(
            original, merged, backend, input_shape, rule, names=("original", label)
        )
        results.append((label, plan, result))
    if results:
        base = float(np.median([r.latency_a_ms for _, _, r in results]))
    else:
        base = backend.measure(original, input_shape).median
    first = _point("original", Plan.identity(chain), latency, base, None)
    rest = [_point(label, p, latency, base, r, config_time, chain) for label, p, r in results]
    return [first, *rest]


def calibrate(
    original: nn.Module,
    chain: ConvChain,
    latency: LatencyTable,
    backend: Backend,
    input_shape: tuple[int, ...],
    rule: Rule,
    count: int = 3,
    seed: int = 0,
    config_time: ConfigTimes | None = None,
) -> Calibration:
    """Time ``count`` plans over the front and the original whole, and fit the table to them;
    with ``config_time`` (layer pruning) the plans may prune convs, and span their front."""
    if config_time:
        plans = config_calibration_plans(chain, latency, config_time, count, seed)
    else:
        plans = calibration_plans(latency, chain.blocks, chain.linear_positions, count, seed)
    points = measure_points(
        original, chain, latency, plans, backend, input_shape, rule, config_time
    )
    return from_points(points)
