"""How much of one budget goes to width: ``compress --width auto`` (issue 14).

Every candidate width ratio r is scored with the recipe of an importance entry, so that width
and depth losses share one scale:

- **width loss**: the held-out accuracy of the Torch-Pruning network at r after the entries'
  short fine-tuning (``FinetuneSettings``: same steps, lr, seed), against the original after
  the same fine-tuning (the importance table's base plus its control);
- **depth loss**: stage 2 on the *original's* calibrated latency table and importance table
  (with ``--prune-layers`` also its configuration tables), normalised ``delta`` (a kept conv
  scores 0, a changed segment its measured drop, so the sum estimates the loss in points), at
  the fraction of the pruned network's whole latency that the budget leaves to depth:
  ``budget × speed-up(r)``.

The candidate with the smallest sum is chosen (a tie: the smaller ratio). The one approximation:
merging saves the same fraction, and costs the same accuracy, on the pruned network as on the
original. Measured against fine-tuned networks in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .dp import optimal_boundaries, optimal_latency, solve
from .errors import BudgetError, DepthCompressError

if TYPE_CHECKING:
    from torch import nn

    from .backends import Backend
    from .calibration import Calibration
    from .data import SplitData
    from .importance import FinetuneSettings
    from .speedup import Rule
    from .tables import ConfigImportanceRow, ImportanceTable, LatencyTable

DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def parse_width(text: str) -> tuple[float, tuple[float, ...]]:
    """``--width``: a fraction (``0.2``), ``auto`` (``DEFAULT_RATIOS``) or ``auto:0,0.2,0.4``;
    returns (ratio, candidates), one of them empty (0.0 / ())."""
    raw = text.strip().lower()
    if raw == "auto":
        return 0.0, DEFAULT_RATIOS
    if raw.startswith("auto:"):
        try:
            ratios = tuple(sorted({float(v) for v in raw[5:].split(",") if v.strip()} | {0.0}))
        except ValueError:
            ratios = ()
        if len(ratios) < 2 or not all(0 <= r < 1 for r in ratios):
            raise DepthCompressError(
                f"--width {text!r}: after 'auto:' give width ratios in [0, 1) separated by "
                "commas, e.g. auto:0.1,0.2,0.4 (0, depth alone, is always a candidate)"
            )
        return 0.0, ratios
    try:
        value = float(raw)
    except ValueError:
        raise DepthCompressError(
            f"--width {text!r} is neither a fraction of channels (e.g. 0.2) nor 'auto' "
            "(or 'auto:0.1,0.2,0.4')"
        ) from None
    return value, ()


@dataclass(frozen=True)
class Measured:
    """What a candidate ratio measured: the pruned network's paired whole speed-up over the
    original (with its 95 % interval) and its held-out accuracy after the entries' recipe."""

    speedup: float
    low: float
    high: float
    accuracy: float


@dataclass(frozen=True)
class Candidate:
    """One width ratio, scored: ``width_loss`` and ``depth_loss`` in accuracy points (higher is
    worse); ``depth_fraction`` is what depth must reach of the pruned network's whole latency;
    ``least_fraction`` the smallest fraction of the *original* this ratio reaches with depth;
    ``depth_loss`` and ``activations`` are None where the budget is out of its reach."""

    ratio: float
    speedup: float
    width_loss: float
    depth_fraction: float
    least_fraction: float
    depth_loss: float | None
    activations: int | None

    @property
    def feasible(self) -> bool:
        """Whether this ratio meets the budget (with depth, or alone)."""
        return self.depth_loss is not None

    @property
    def loss(self) -> float:
        """The estimated loss in points (infinite where infeasible)."""
        return math.inf if self.depth_loss is None else self.width_loss + self.depth_loss


@dataclass(frozen=True)
class WidthSearch:
    """The scored candidates for one budget (a fraction of the original's whole latency) and
    the chosen one."""

    budget_fraction: float
    candidates: tuple[Candidate, ...]

    @property
    def chosen(self) -> Candidate:
        """The feasible candidate of least estimated loss (a tie: the smaller ratio); a
        BudgetError naming the smallest reachable fraction when none is feasible."""
        feasible = [c for c in self.candidates if c.feasible]
        if not feasible:
            best = min(self.candidates, key=lambda c: c.least_fraction)
            least = math.ceil(1000 * best.least_fraction) / 1000
            raise BudgetError(
                f"budget {self.budget_fraction:.3f}x is out of reach of every width candidate: "
                f"the smallest reachable fraction is {least:.3f}x "
                f"(width {best.ratio:g} with depth); raise --budget or add larger ratios"
            )
        return min(feasible, key=lambda c: (round(c.loss, 9), c.ratio))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``width_search.json``."""
        return {
            "budget_fraction": self.budget_fraction,
            "candidates": [
                {**asdict(c), "loss": c.loss if c.feasible else None} for c in self.candidates
            ],
        }


@dataclass(frozen=True)
class DepthTables:
    """The original's tables as the search reads them: the latency table and its calibration,
    the importance table, and with layer pruning the configuration tables (T(i, j, c) as
    measured, and their importance rows)."""

    latency: LatencyTable
    calibration: Calibration
    importance: ImportanceTable
    alpha: float
    config_time: dict[tuple[int, int, int], float] | None = None
    config_rows: tuple[ConfigImportanceRow, ...] = ()

    @cached_property
    def _problem(self) -> tuple[Any, float, float]:
        """Stage 2's input on the calibrated tables (``delta``), its fastest plan's Σ T and the
        whole latency the calibration predicts for the original (computed once per search)."""
        from .calibration import calibrated_config_times, calibrated_table
        from .dp import config_tables, min_latency_configs, original_latency

        table = calibrated_table(self.latency, self.calibration.fit)
        opt = optimal_latency(table)
        whole = self.calibration.predicted_whole(original_latency(table))
        if self.config_time is None:
            _, fastest = optimal_boundaries(table, ())
            return opt, fastest, whole
        times = calibrated_config_times(self.config_time, self.calibration.fit)
        tables = config_tables(
            opt, self.importance, times, self.config_rows, alpha=self.alpha, norm="delta"
        )
        return tables, min_latency_configs(tables), whole

    def least_fraction(self) -> float:
        """The smallest fraction of the original's predicted whole latency any plan reaches."""
        _, fastest, whole = self._problem
        return self.calibration.predicted_whole(fastest) / whole

    def estimate(self, fraction: float) -> tuple[float, int] | None:
        """(loss in points, kept activations) of the stage-2 plan at ``fraction`` of the
        original's whole latency, ``delta`` normalised; None below the fastest plan. Fractions
        are of the calibration's *prediction* for the original, so 1 is exactly the unmodified
        network whatever the fit's residual there; above 1 the budget is the original's."""
        from .dp import solve_configs

        problem, fastest, whole = self._problem
        budget = min(fraction, 1.0) * whole - self.calibration.fit.c
        if budget < fastest * (1 - 1e-9) - 1e-12:
            return None
        if self.config_time is None:
            sol = solve(problem, self.importance, budget, alpha=self.alpha, norm="delta")
        else:
            sol = solve_configs(problem, budget)
        return -sol.importance, len(sol.plan.activations)


def score(
    ratio: float,
    measured: Measured | None,
    base_accuracy: float,
    budget_fraction: float,
    depth: DepthTables,
) -> Candidate:
    """A candidate from its measurement (None for ratio 0: the original itself)."""
    speedup = 1.0 if measured is None else measured.speedup
    tuned = base_accuracy + depth.importance.control  # the original after the same recipe
    width_loss = 0.0 if measured is None else tuned - measured.accuracy
    fraction = budget_fraction * speedup
    estimate = depth.estimate(fraction)
    return Candidate(
        ratio=ratio,
        speedup=speedup,
        width_loss=width_loss,
        depth_fraction=fraction,
        least_fraction=min(1.0, depth.least_fraction()) / speedup,
        depth_loss=None if estimate is None else estimate[0],
        activations=None if estimate is None else estimate[1],
    )


def measure_ratio(
    original: nn.Module,
    ratio: float,
    pruned: nn.Module,
    data: SplitData,
    backend: Backend,
    shape: tuple[int, ...],
    rule: Rule,
    entry: FinetuneSettings,
    *,
    device: str = "cpu",
) -> Measured:
    """Time ``pruned`` (the original at width ``ratio``) against the original in paired rounds,
    and score it after the importance entries' short fine-tuning."""
    from .importance import seeded, tuned_score
    from .speedup import paired_speedup

    name = f"width {ratio:g}"
    res = paired_speedup(original, pruned, backend, shape, rule, names=("original", name))
    why = (
        f"fine-tuning the network channel-pruned to {name} diverged with the importance "
        f"entries' recipe: lower the importance learning rate (now {entry.lr:g}, "
        "--importance-lr) or clip its gradients (--importance-grad-clip)"
    )
    with seeded(entry, entry.seed):
        accuracy, _, _ = tuned_score(copy.deepcopy(pruned), data, entry, entry.seed, device, why)
    return Measured(res.speedup, res.low, res.high, accuracy)
