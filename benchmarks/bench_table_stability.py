"""Latency tables under load (issue 12, item 2): does the plan chosen from the demo network's
table stay the same from one table run to the next while two busy-loop processes compete for the
cores?

    python benchmarks/bench_table_stability.py                 # 3 new + 3 old tables under load
    python benchmarks/bench_table_stability.py --runs 3 --old 0 --json stability.json

Each run measures the table of ``depthcompress:fashion_mbv2`` (shipped weights, stem and head
excluded, ONNX Runtime on all cores, batch 64, the default timing protocol: the demo's
settings; ``--max-time`` shortens each measurement), solves the plans at ``--budgets`` (0.5x and
0.6x of the original chain latency) with ``dp.solve`` against a fixed synthetic importance
table (only the latency table varies) and prints the kept activations, ending in -1 where the
budget is below the table's fastest plan, which is then taken. New tables (interleaved passes,
re-measured outliers) are also solved with each statistic across passes (median, p25, min) of
the same passes; old ones are one pass, row by row. ``--analyse FOLDER`` solves the tables an
earlier run kept with ``--keep``. Prints plain lines with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_speedup import busy_loops, load

import depthcompress as dc
from depthcompress.backends import Backend, Protocol, cpu_name, get_backend
from depthcompress.dp import min_latency, original_latency, solve
from depthcompress.latency import (
    COMBINE,
    LatencyResult,
    Robust,
    build_latency_table,
    combine_passes,
)
from depthcompress.models import FASHION_MBV2_EXCLUDE, fashion_mbv2, trained_weights
from depthcompress.tables import ImportanceTable, LatencyTable

BATCH = 64


def demo_chain() -> dc.ConvChain:
    """The demo network's chain, traced as ``depthcompress demo`` traces it."""
    net = fashion_mbv2()
    net.load_state_dict(torch.load(trained_weights(), map_location="cpu", weights_only=True))
    return dc.trace(net.eval(), torch.randn(1, 1, 28, 28), exclude=FASHION_MBV2_EXCLUDE)


def kept(table: LatencyTable, importance: ImportanceTable, fraction: float) -> list[int]:
    """The activations the plan at ``fraction`` of the original latency keeps (the fastest
    plan's, marked by a trailing -1, when ``fraction`` is below this table's fastest plan)."""
    budget = fraction * original_latency(table)
    fastest = min_latency(table, importance)
    sol = solve(table, importance, max(budget, fastest * (1 + 1e-9)))
    return sorted(sol.plan.activations) + ([-1] if fastest > budget else [])


def tables_of(result: LatencyResult, chain: dc.ConvChain) -> dict[str, LatencyTable]:
    """The table as written, and (with passes) the same passes combined by each statistic."""
    out = {"written": LatencyTable.from_rows((r.st, r.end, r.time, r.stdev) for r in result.rows)}
    if result.pass_times:
        for how in COMBINE:
            times = [
                combine_passes([(t, 0.0) for t in result.pass_times[k]], how)[0]
                for k in range(len(chain.blocks))
            ]
            rows = zip(chain.blocks, times, strict=True)
            out[how] = LatencyTable.from_rows((*b, t, 0.0) for b, t in rows)
    return out


def run(
    chain: dc.ConvChain,
    backend: Backend,
    passes: int,
    folder: Path,
    label: str,
    budgets: list[float],
) -> dict[str, Any]:
    """One table run: its plans per statistic, spread, load and time."""
    start = time.perf_counter()
    path = folder / f"{label}.csv"
    result = build_latency_table(chain, backend, path, batch=BATCH, passes=passes, force=True)
    plans = plans_of(tables_of(result, chain), chain, budgets)
    measurement = result.meta.get("measurement", {})
    spread = measurement.get("spread", {})
    print(
        f"  {label} ({time.perf_counter() - start:.0f} s): spread median "
        f"{spread.get('median') or 0:.3f} worst {spread.get('worst') or 0:.3f}, "
        f"{spread.get('remeasured', 0)} rows re-measured; load {load()}",
        flush=True,
    )
    return {"plans": plans, "measurement": measurement, "warning": result.warning}


def plans_of(
    tables: dict[str, LatencyTable], chain: dc.ConvChain, budgets: list[float]
) -> dict[str, list[int]]:
    """The kept activations of each table at each budget, printed one line per table."""
    importance = ImportanceTable.synthetic(chain.blocks, chain.linear_positions)
    plans = {}
    for name, table in tables.items():
        fastest = min_latency(table, importance) / original_latency(table)
        for fraction in budgets:
            plans[f"{name} {fraction}x"] = kept(table, importance, fraction)
        got = ", ".join(f"{f}x {plans[f'{name} {f}x']}" for f in budgets)
        print(f"    {name}: fastest plan {fastest:.3f}x; kept {got}", flush=True)
    return plans


def analyse(folder: Path, chain: dc.ConvChain, budgets: list[float]) -> None:
    """Plans of the tables kept in ``folder`` by an earlier run (as written)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.csv")):
        print(f"  {path.stem}:")
        table = {"written": LatencyTable.read_csv(path)}
        runs.setdefault(path.stem.rstrip("0123456789"), []).append(
            {"plans": plans_of(table, chain, budgets)}
        )
    for kind, results in runs.items():
        for key in results[0]["plans"]:
            print(f"{kind}, {key}: {agree(results, key)}")


def agree(runs: list[dict[str, Any]], key: str) -> str:
    """Whether every run chose the same plan with statistic ``key``."""
    plans = [tuple(r["plans"][key]) for r in runs if key in r["plans"]]
    return "same" if len(set(plans)) == 1 else f"DIFFER ({len(set(plans))} plans)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="new tables (interleaved passes)")
    parser.add_argument("--old", type=int, default=3, help="old tables (1 pass, row by row)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes")
    parser.add_argument("--max-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--keep", type=Path, help="keep the tables in this folder")
    parser.add_argument("--budgets", default="0.5,0.6", help="fractions of the original latency")
    parser.add_argument("--analyse", type=Path, help="only solve the tables kept in this folder")
    args = parser.parse_args()
    backend = get_backend("onnxruntime", protocol=Protocol(max_time=args.max_time))
    chain = demo_chain()
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.analyse:
        analyse(args.analyse, chain, budgets)
        return
    print(
        f"{cpu_name()}, {os.cpu_count()} cores, ORT {backend.info().get('threads')} threads, "
        f"batch {BATCH}, {len(chain.blocks)} blocks, {Robust()}; load {load()}",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {"new": [], "old": []}
    with tempfile.TemporaryDirectory() as tmp, busy_loops(args.busy):
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"{args.busy} busy loops; new tables ({args.passes} interleaved passes):")
        for r in range(args.runs):
            results["new"].append(run(chain, backend, args.passes, folder, f"new{r + 1}", budgets))
            if args.json:
                args.json.write_text(json.dumps(results, indent=1) + "\n")
        print("old tables (1 pass, row by row):", flush=True)
        for r in range(args.old):
            results["old"].append(run(chain, backend, 1, folder, f"old{r + 1}", budgets))
    for kind, runs in results.items():
        for key in runs[0]["plans"] if runs else ():
            print(f"{kind}, {key}: {agree(runs, key)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
