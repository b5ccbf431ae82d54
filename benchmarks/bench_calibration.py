"""A budget in real latency (issue 12, item 3): predicted vs measured whole-network speed-up of
a network on ONNX Runtime CPU after calibrating its latency table.

    python benchmarks/bench_calibration.py --workdir /tmp/bench_calib --json calib.json
    python benchmarks/bench_calibration.py --model resnet20 --workdir /tmp/bench_calib_r20

``--model``: the demo network ``fashion_mbv2`` (default; 1×28×28, stem and head excluded) or a
CIFAR-10 network of the benchmark issue (``resnet20``, ``cifar_mbv2``; 3×32×32). Shipped weights
are loaded where the package has them, else the network keeps its seeded random initialisation:
only latencies are compared, and they do not depend on the weights. Batch 64, general mode, kernels
≤ 15 (``--max-kernel-size``), 1 thread by default. The latency table is built (or resumed) in
``--workdir``; the calibration times 3 plans and the original whole (seeded synthetic importance
table, seed 0: only latencies matter); then for each budget (a fraction of the measured whole
original; the demo's fastest plan is about 0.69x of it, so 0.65x and 0.5x have no plan) a plan is
solved on the calibrated table with another synthetic table (seed 1, so the plans are not the
calibration's), merged with the original weights and timed against the original in paired rounds.
Target: |predicted / measured − 1| ≤ 10 % at every budget. The chain prediction (Σ T of the raw
table) is printed beside it for contrast.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from depthcompress import linearize, merge, trace
from depthcompress.backends import Protocol, get_backend
from depthcompress.calibration import (
    calibrate,
    calibrated_config_times,
    calibrated_table,
    plan_time,
    synthetic_config_tables,
)
from depthcompress.dp import (
    Budget,
    min_latency_configs,
    optimal_boundaries,
    optimal_latency,
    original_latency,
    solve,
    solve_configs,
)
from depthcompress.errors import BudgetError, ModelSpecError
from depthcompress.latency import build_latency_table
from depthcompress.models import (
    CIFAR_MBV2_EXCLUDE,
    FASHION_MBV2_EXCLUDE,
    get_model,
    trained_weights,
)
from depthcompress.speedup import Rule, paired_speedup
from depthcompress.tables import ImportanceTable, LatencyTable, read_config_latency_rows

NETWORKS = {  # name: (input shape at batch 64, modules kept out of the chain)
    "fashion_mbv2": ((64, 1, 28, 28), FASHION_MBV2_EXCLUDE),
    "cifar_mbv2": ((64, 3, 32, 32), CIFAR_MBV2_EXCLUDE),
    "resnet20": ((64, 3, 32, 32), ()),
}


def load() -> str:
    """The 1/5/15-minute load averages, to judge how noisy a measurement was."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_calibration"))
    parser.add_argument("--budgets", default="0.9,0.8,0.7", help="fractions of the whole")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-time", type=float, default=20.0, help="seconds per paired timing")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--model", choices=sorted(NETWORKS), default="fashion_mbv2")
    parser.add_argument("--max-kernel-size", type=int, default=15, help="largest merged kernel")
    parser.add_argument(
        "--prune-layers",
        action="store_true",
        help="layer pruning: the configuration latency table too; calibration and budgets over "
        "(segment, configuration) plans",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape, exclude = NETWORKS[args.model]
    model = get_model(args.model)
    try:
        weights = trained_weights(args.model)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        print(f"{args.model}: shipped weights {weights.name}")
    except ModelSpecError:
        print(f"{args.model}: no shipped weights, seeded random initialisation (timing only)")
    model.eval()
    chain = trace(
        model,
        torch.randn(1, *shape[1:]),
        exclude=exclude,
        max_kernel_size=args.max_kernel_size,
    )
    backend = get_backend("onnxruntime", threads=args.threads, protocol=Protocol())
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / "latency.csv"
    build_latency_table(chain, backend, path, batch=shape[0], seed=0, model_name=args.model)
    table = LatencyTable.read_csv(path)
    config_time = None
    if args.prune_layers:
        path = args.workdir / "latency_configs.csv"
        build_latency_table(
            chain, backend, path, batch=shape[0], seed=0, model_name=args.model, configs=True
        )
        config_time = {r.key: r.time for r in read_config_latency_rows(path)}
        print(f"{len(config_time)} configuration latencies (layer pruning)", flush=True)
    rule = Rule(max_time=args.max_time)
    print(f"load {load()}: calibrating ({len(chain.blocks)} blocks)", flush=True)
    cal = calibrate(
        model, chain, table, backend, shape, rule, count=3, seed=0, config_time=config_time
    )
    fit = cal.fit
    print(
        f"fit {fit.model}: c={fit.c:.4f} a={fit.a:.4f} o={fit.o:.4f} rms={fit.rms:.4f} ms; "
        f"original whole {cal.original_whole_ms:.3f} ms",
        flush=True,
    )
    for p in cal.points:
        print(
            f"  point {p.label:26s} ΣT={p.sum_t:7.3f} blocks={p.n_blocks:3d} "
            f"whole={p.whole_ms:7.3f} ms  ×{p.speedup:.3f} [{p.low:.3f}, {p.high:.3f}]"
        )
    calibrated = calibrated_table(table, fit)
    opt = optimal_latency(calibrated)
    _, fastest = optimal_boundaries(calibrated, ())
    configs = None
    if config_time is not None:  # calibrated like the table: T' = a·T + o
        times = calibrated_config_times(config_time, fit)
        configs = synthetic_config_tables(chain, calibrated, times, seed=1)
        fastest = min_latency_configs(configs)
    print(f"smallest whole-network budget any plan meets: {cal.least_fraction(fastest):.3f}x")
    raw_original = original_latency(table)
    importance = ImportanceTable.synthetic(chain.blocks, chain.linear_positions, seed=1)
    rows = []
    for fraction in (float(f) for f in args.budgets.split(",")):
        budget = Budget(fraction, relative=True)
        try:
            if configs is not None:
                sol = solve_configs(configs, cal.table_budget(budget))
            else:
                sol = solve(opt, importance, cal.table_budget(budget))
        except BudgetError as exc:
            print(f"budget {fraction:g}x: no plan ({exc})", flush=True)
            continue
        predicted = cal.original_whole_ms / cal.predicted_whole(sol.latency)
        chain_pred = raw_original / plan_time(table, sol.plan, config_time, chain)
        merged = merge(linearize(model, chain, sol.plan), chain, sol.plan)
        res = paired_speedup(model, merged, backend, shape, rule, names=("original", "merged"))
        error = predicted / res.speedup - 1
        row = {
            "budget": f"{fraction:g}x",
            "blocks": len(sol.plan.blocks),
            "pruned": sorted(sol.plan.pruned),
            "predicted": predicted,
            "chain_predicted": chain_pred,
            "measured": res.speedup,
            "low": res.low,
            "high": res.high,
            "error": error,
            "converged": res.converged,
            "load": load(),
        }
        rows.append(row)
        print(
            f"budget {row['budget']:5s} predicted {predicted:.3f}× (chain {chain_pred:.3f}×) "
            f"measured {res.speedup:.3f}× [{res.low:.3f}, {res.high:.3f}] error {error:+.1%} "
            f"load {row['load']}",
            flush=True,
        )
    ok = bool(rows) and all(abs(r["error"]) <= 0.10 for r in rows)
    print(
        "target (|error| ≤ 10 % at every budget):",
        "met" if ok else "NOT met" if rows else "not measured (no budget had a plan)",
    )
    if args.json is not None:
        out = {
            "model": args.model,
            "calibration": cal.to_dict(),
            "rows": rows,
            "threads": args.threads,
        }
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
