"""Speed of the two-stage DP (issue 4) on the paper's MobileNetV2-1.0 latency table.

    python benchmarks/bench_solver.py [--repeats 30]

Latency: ``../shared/reference/kim2023_mbv2_w1.0_rtx2080ti_trt_time.csv`` (L = 50, 171 blocks).
Importance: a seeded synthetic table (seed 0) with the reference's enumeration (315 extended
blocks): a span's score drops with its length plus noise. Each timing is the median (and best)
of ``--repeats`` runs of ``time.perf_counter``; the tables are read once, outside the timings.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from depthcompress.dp import extended_importance, optimal_latency, solve, sweep
from depthcompress.tables import ImportanceTable, LatencyTable

ROOT = Path(__file__).resolve().parents[1]
LATENCY_CSV = ROOT.parent / "shared" / "reference" / "kim2023_mbv2_w1.0_rtx2080ti_trt_time.csv"
LINEAR = frozenset(range(2, 51, 3))
BUDGET = 25.0
SWEEP = [18.0 + 0.5 * k for k in range(25)]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, best) wall time of fn in ms, after one warm-up call."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs), min(runs)


def cli_seconds(latency: Path, importance: Path, repeats: int = 3) -> float | None:
    """Best wall time of ``depthcompress solve`` as a fresh process (start-up included)."""
    exe = shutil.which("depthcompress")
    if exe is None:
        return None
    cmd = [exe, "solve", "--latency", str(latency), "--importance", str(importance)]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([*cmd, "--budget", str(BUDGET)], check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    r = args.repeats

    latency = LatencyTable.read_csv(LATENCY_CSV)
    importance = ImportanceTable.synthetic(latency.blocks, LINEAR)
    opt = optimal_latency(latency)
    ext = extended_importance(importance)

    jobs: list[tuple[str, Callable[[], object], int]] = [
        ("stage 1 (T_opt, 171 blocks)", lambda: optimal_latency(latency), r),
        ("extended importance (315 rows)", lambda: extended_importance(importance), r),
        ("stage 2 exact, T0 = 25", lambda: solve(opt, ext, BUDGET), r),
        (
            "**full solve, T0 = 25** (stage 1 + ext. importance + stage 2)",
            lambda: solve(latency, importance, BUDGET),
            r,
        ),
        (
            "**sweep, 25 budgets 18:30:0.5** (all stages, one DP)",
            lambda: sweep(latency, importance, SWEEP),
            r,
        ),
        (
            "25 separate full solves (for comparison)",
            lambda: [solve(latency, importance, b) for b in SWEEP],
            max(3, r // 10),
        ),
        (
            "reference floor grid, prec = 20, T0 = 25 (all stages)",
            lambda: solve(latency, importance, BUDGET, rounding="reference", prec=20),
            r,
        ),
    ]
    rows = [(name, timed(fn, n)) for name, fn, n in jobs]

    print("| step | median (ms) | best (ms) |\n|---|---:|---:|")
    for name, (median, best) in rows:
        print(f"| {name} | {median:.1f} | {best:.1f} |")

    exact = solve(latency, importance, BUDGET)
    grid = solve(latency, importance, BUDGET, rounding="reference", prec=20)
    front = sweep(latency, importance, SWEEP).front
    print()
    print(f"| plan for T0 = {BUDGET:g} | Σ T_opt (ms) | Σ I | segments | Σ ⌊20·T_opt⌋ |")
    print("|---|---:|---:|---:|---:|")
    print(f"| exact | {exact.latency:.4f} | {exact.importance:.4f} | {len(exact.segments)} | – |")
    assert grid.grid is not None
    print(
        f"| reference grid (prec 20) | {grid.latency:.4f} | {grid.importance:.4f} | "
        f"{len(grid.segments)} | {grid.grid[0]} ≤ {grid.grid[1]} |"
    )
    print(f"\nPareto front up to {max(SWEEP):g} ms: {len(front)} plans")

    with tempfile.TemporaryDirectory() as tmp:
        imp_csv = Path(tmp) / "importance.csv"
        importance.write_csv(imp_csv)
        seconds = cli_seconds(LATENCY_CSV, imp_csv)
    if seconds is not None:
        print(
            f"`depthcompress solve --budget 25` as a new process: {seconds:.2f} s wall (best of 3)"
        )


if __name__ == "__main__":
    main()
