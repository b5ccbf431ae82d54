"""Predicted vs measured speed-up of plans solved on a latency table (part (c) of gpu_check.sh).

Run: python benchmarks/gpu_speedup.py --table LAT.csv --device cuda --out speedup.json
For each budget (a fraction of the original chain latency in table units) it solves a plan on
the table and a seeded synthetic importance table (no trained network is needed to test the
latency model), merges the linearized network with the original weights, and times the original
and the merged network end to end on the torch backend, on the table's device and batch. The
table's prediction is Σ single-conv T / Σ T_opt of the plan; the measurement includes the parts
outside the chain (stem, head, pooling), as the issue's 1.59× vs 1.67× comparison did.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from depthcompress import linearize, merge, trace
from depthcompress.backends import Protocol, TorchBackend
from depthcompress.dp import optimal_latency, solve
from depthcompress.errors import BudgetError
from depthcompress.latency import chain_sha, read_meta
from depthcompress.modelspec import load_model
from depthcompress.tables import ImportanceTable, LatencyTable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table", type=Path, required=True, help="latency table (CSV + sidecar)")
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--mode", default="reference")
    parser.add_argument("--exclude", nargs="*", default=["features.0", "features.18"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budgets", default="0.8,0.6,0.5", help="fractions of the original")
    parser.add_argument("--max-time", type=float, default=2.0, help="seconds per timing")
    parser.add_argument("--out", type=Path, required=True, help="JSON with every figure")
    args = parser.parse_args()

    meta = read_meta(args.table)
    batch, shape = meta["batch"], tuple(meta["model"]["input_shape"])
    torch.manual_seed(0)
    model = load_model(args.model).eval()
    chain = trace(
        model,
        torch.randn(1, *shape),
        mode=args.mode,
        exclude=args.exclude,
        max_kernel_size=meta["model"]["max_kernel_size"],
    )
    if chain_sha(chain) != meta["model"]["chain_sha256"]:
        print(f"error: {args.table} is not a table of {args.model} in this chain", file=sys.stderr)
        return 1
    table = LatencyTable.read_csv(args.table)
    opt = optimal_latency(table)
    importance = ImportanceTable.synthetic(chain.blocks, chain.linear_positions, seed=0)
    original_ms = sum(table.time_of(k, k + 1) for k in range(chain.num_positions))
    runner = TorchBackend(device=args.device, protocol=Protocol(max_time=args.max_time))
    x_shape = (batch, *shape)
    rows = []
    for fraction in (float(f) for f in args.budgets.split(",")):
        try:
            sol = solve(opt, importance, fraction * original_ms)
        except BudgetError as exc:
            print(f"budget {fraction:g}x: no plan ({exc})", flush=True)
            continue
        start = time.perf_counter()
        merged = merge(linearize(model, chain, sol.plan), chain, sol.plan)
        merge_s = time.perf_counter() - start
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(2):  # alternated, the faster median of each counts (as compress does)
            for net, samples in zip((model, merged), times, strict=True):
                samples.append(runner.measure(net, x_shape).median)
        before, after = min(times[0]), min(times[1])
        row = {
            "budget": f"{fraction:g}x",
            "kept_activations": len(sol.plan.activations),
            "blocks": len(sol.plan.boundaries),
            "table_ms": sol.latency,
            "predicted_speedup": original_ms / sol.latency,
            "original_ms": before,
            "merged_ms": after,
            "measured_speedup": before / after,
            "merge_seconds": merge_s,
        }
        rows.append(row)
        print(
            f"budget {row['budget']:>5}: predicted {row['predicted_speedup']:.3f}x, measured "
            f"{row['measured_speedup']:.3f}x (original {before:.3f} ms, merged {after:.3f} ms, "
            f"{row['kept_activations']} activations kept, {row['blocks']} blocks)",
            flush=True,
        )
    result = {
        "model": args.model,
        "table": str(args.table),
        "table_backend": meta["backend"],
        "batch": batch,
        "input_shape": list(shape),
        "original_chain_ms": original_ms,
        "timing": runner.info(),
        "plans": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
