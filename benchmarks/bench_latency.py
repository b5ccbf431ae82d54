"""Latency tables on a real backend (issue 5): table build time and run-to-run spread, whole-network
speed-ups of merged MobileNetV2, and how additive block latencies are.

    python benchmarks/bench_latency.py table --builds 3        # MBV2 224², batch 1, ORT CPU
    python benchmarks/bench_latency.py whole                   # original vs merged, ORT + torch
    python benchmarks/bench_latency.py additivity --table T.csv

Prints plain tables; docs/benchmarks.md records the numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import depthcompress as dc
from depthcompress.backends import STATISTICS, Backend, Protocol, Timing, get_backend, to_onnx
from depthcompress.latency import (
    LatencyRow,
    build_latency_table,
    latency_dict,
    read_latency_table,
)

EXCLUDE = ["features.0", "features.18"]


def load() -> str:
    """The 1/5/15-minute load averages, to judge how noisy a measurement was."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def mbv2_chain(size: int = 224) -> tuple[nn.Module, dc.ConvChain]:
    """torchvision MobileNetV2 (random weights) and its reference-mode chain (L=50, 171 blocks)."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    chain = dc.trace(model, torch.randn(1, 3, size, size), mode="reference", exclude=EXCLUDE)
    return model, chain


def protocol_from(args: argparse.Namespace) -> Protocol:
    return Protocol(
        warmup=args.warmup,
        reps=args.reps,
        min_reps=args.min_reps,
        max_time=args.max_time,
        statistic=args.statistic,
    )


def spread(tables: list[dict[tuple[int, int], float]]) -> dict[str, float]:
    """Per-entry relative spread across builds: (max − min) / median, and pairwise |a−b|/mean."""
    keys = sorted(tables[0])
    per_entry = []
    for k in keys:
        vals = [t[k] for t in tables]
        per_entry.append((max(vals) - min(vals)) / statistics.median(vals))
    pairwise = []
    for a in range(len(tables)):
        for b in range(a + 1, len(tables)):
            diffs = [
                abs(tables[a][k] - tables[b][k]) / ((tables[a][k] + tables[b][k]) / 2) for k in keys
            ]
            pairwise.append(statistics.median(diffs))
    per_entry.sort()
    return {
        "median_range": statistics.median(per_entry),
        "p90_range": per_entry[int(0.9 * (len(per_entry) - 1))],
        "max_range": per_entry[-1],
        "median_pairwise": statistics.median(pairwise),
    }


def cmd_table(args: argparse.Namespace) -> None:
    """Build the MBV2 table ``--builds`` times; print time per build and the spread of ``time``
    and, from the same runs, of the other statistics a table could store."""
    _, chain = mbv2_chain(args.size)
    backend = get_backend(args.backend, threads=args.threads, protocol=protocol_from(args))
    out = Path(args.out or tempfile.mkdtemp(prefix="dc-latency-"))
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, list[dict[tuple[int, int], float]]] = {k: [] for k in STATISTICS}
    seconds = []
    print(
        f"backend {backend.info()} protocol {backend.protocol.to_dict()} batch {args.batch} "
        f"passes {args.passes}"
    )
    for b in range(args.builds):
        path = out / f"mbv2_{args.backend}_b{args.batch}_{b}.csv"
        for k in STATISTICS:
            stats[k].append({})

        def keep(row: LatencyRow, timing: Timing) -> None:
            for k in STATISTICS:
                stats[k][-1][(row.st, row.end)] = timing.statistic(k)

        before = load()
        start = time.perf_counter()
        result = build_latency_table(
            chain,
            backend,
            path,
            batch=args.batch,
            passes=args.passes,
            force=True,
            model_name="mbv2",
            on_row=keep,
        )
        seconds.append(time.perf_counter() - start)
        table = latency_dict(result.rows)
        stats[backend.protocol.statistic][-1] = table  # the stored time (median of passes)
        singles = sum(t for (i, j), t in table.items() if j == i + 1)
        print(
            f"build {b}: {seconds[-1]:.1f} s, {len(result.rows)} rows, Σ single-conv T = "
            f"{singles:.3f} ms, load before {before} after {load()} -> {path}"
        )
    if args.builds > 1:
        for k in STATISTICS:
            s = spread(stats[k])
            mark = " (stored as time)" if k == backend.protocol.statistic else ""
            if args.passes > 1 and not mark:
                mark = " (last pass only)"
            print(
                f"spread of {k:6s} over {args.builds} builds: median pairwise |a−b|/mean "
                f"{100 * s['median_pairwise']:.1f} %; per entry (max−min)/median: median "
                f"{100 * s['median_range']:.1f} %, p90 {100 * s['p90_range']:.1f} %, max "
                f"{100 * s['max_range']:.1f} %{mark}"
            )
    print(f"time per build: {', '.join(f'{v:.1f}' for v in seconds)} s")


def optimal_blocks(
    chain: dc.ConvChain, table: dict[tuple[int, int], float], required: set[int]
) -> list[tuple[int, int]]:
    """Fastest block cover of 0..L whose ends include ``required`` (stage 1 of the DP, A = ∅)."""
    n = chain.num_positions
    best: dict[int, tuple[float, int]] = {0: (0.0, -1)}
    for j in range(1, n + 1):
        options = [
            (best[i][0] + table[(i, j)], i)
            for (i, jj) in chain.blocks
            if jj == j and i in best and not any(i < r < j for r in required)
        ]
        if options:
            best[j] = min(options)
    blocks, j = [], n
    while j > 0:
        i = best[j][1]
        blocks.append((i, j))
        j = i
    return blocks[::-1]


def random_plan(chain: dc.ConvChain, rng: random.Random, max_convs: int = 4) -> dc.Plan:
    """A random valid plan: random valid blocks of at most ``max_convs`` convs, A ⊆ S random."""
    valid = set(chain.blocks)
    cur, ends = 0, set()
    while cur < chain.num_positions:
        top = min(chain.num_positions, cur + max_convs)
        cur = rng.choice([j for j in range(cur + 1, top + 1) if (cur, j) in valid])
        ends.add(cur)
    return dc.Plan(
        activations=frozenset(p for p in ends if rng.random() < 0.6), boundaries=frozenset(ends)
    )


def plans(chain: dc.ConvChain, table: dict[tuple[int, int], float] | None) -> dict[str, dc.Plan]:
    """Identity, all-merged (one block per barrier interval, A = ∅), latency-optimal A = ∅ merge
    (when a table is given) and two random plans."""
    n = chain.num_positions
    required = set(chain.barriers) | {n}
    out = {
        "identity (BN folded)": dc.Plan.identity(chain),
        "all merged, A=∅": dc.Plan(activations=frozenset(), boundaries=frozenset(required)),
    }
    if table is not None:
        ends = {j for _, j in optimal_blocks(chain, table, required)}
        out["T-optimal merge, A=∅"] = dc.Plan(activations=frozenset(), boundaries=frozenset(ends))
    rng = random.Random(0)
    for k in range(2):
        out[f"random plan {k}"] = random_plan(chain, rng)
    return out


def merged(model: nn.Module, chain: dc.ConvChain, plan: dc.Plan) -> nn.Module:
    return dc.merge(dc.linearize(model, chain, plan), chain, plan).eval()


def measure_rounds(
    backend: Backend, models: dict[str, object], shape: tuple[int, ...], rounds: int
) -> dict[str, list[float]]:
    """Median latency of each model in ``rounds`` interleaved rounds (drift hits all alike)."""
    out: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            out[name].append(backend.measure(m, shape).median)
    return out


def fmt(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:8.3f} ms (rounds {min(values):.3f}–{max(values):.3f})"


def cmd_whole(args: argparse.Namespace) -> None:
    """Original vs merged MobileNetV2, end to end, on ORT and torch CPU."""
    model, chain = mbv2_chain(args.size)
    table = latency_dict(read_latency_table(args.table)[1]) if args.table else None
    shape = (args.batch, 3, args.size, args.size)
    nets: dict[str, nn.Module] = {"original": model}
    for name, plan in plans(chain, table).items():
        if name.startswith("random"):
            continue
        nets[name] = merged(model, chain, plan)
        print(f"{name}: {len(plan.blocks)} blocks, {len(plan.activations)} activations kept")
    proto = protocol_from(args)
    for backend_name in args.backends:
        backend = get_backend(backend_name, threads=args.threads, protocol=proto)
        inputs: dict[str, object] = dict(nets)
        if backend_name != "torch":
            inputs = {k: to_onnx(m, shape) for k, m in nets.items()}
        print(f"-- {backend_name} {backend.info()['version']}, load {load()}")
        res = measure_rounds(backend, inputs, shape, args.rounds)
        orig, base = res["original"], res["identity (BN folded)"]
        for name, vals in res.items():
            # speed-ups per round: a drift of the machine's speed hits both sides of a ratio
            vs_orig = [o / v for o, v in zip(orig, vals, strict=True)]
            vs_base = [o / v for o, v in zip(base, vals, strict=True)]
            print(
                f"{name:24s} {fmt(vals)}  speed-up vs original {statistics.median(vs_orig):5.2f}× "
                f"({min(vs_orig):.2f}–{max(vs_orig):.2f}), vs BN-folded "
                f"{statistics.median(vs_base):5.2f}× ({min(vs_base):.2f}–{max(vs_base):.2f})"
            )
        print(f"   load after {load()}")


def cmd_additivity(args: argparse.Namespace) -> None:
    """Σ T(blocks of a plan) against the measured latency of the merged network."""
    meta, rows = read_latency_table(args.table)
    table = latency_dict(rows)
    model, chain = mbv2_chain(args.size)
    body = model.features[1:18]
    body_shape = (args.batch, *chain.positions[0].shape[1:])
    body_chain = dc.trace(body, torch.randn(1, *body_shape[1:]), mode="reference")
    if body_chain.blocks != chain.blocks:
        raise SystemExit("the body's chain differs from the full model's chain")
    if meta["batch"] != args.batch:
        raise SystemExit(f"the table is for batch {meta['batch']}, not {args.batch}")
    backend = get_backend(
        meta["backend"]["name"],
        threads=meta["backend"].get("threads"),
        protocol=protocol_from(args),
    )
    full_shape = (args.batch, 3, args.size, args.size)
    the_plans = plans(chain, table)
    bodies, fulls = {}, {}
    for name, plan in the_plans.items():
        bodies[name] = to_onnx(merged(body, body_chain, plan), body_shape)
        fulls[name] = to_onnx(merged(model, chain, plan), full_shape)
    print(f"{meta['backend']['name']} {meta['backend']['version']}, load {load()}")
    res_body = measure_rounds(backend, bodies, body_shape, args.rounds)
    res_full = measure_rounds(backend, fulls, full_shape, args.rounds)
    print(
        f"{'plan':24s} {'blocks':>6s} {'Σ T (ms)':>9s} {'body (ms)':>10s} {'ΣT/body':>8s} "
        f"{'whole (ms)':>10s} {'ΣT/whole':>8s}"
    )
    excess = []
    for name, plan in the_plans.items():
        total = sum(table[b] for b in plan.blocks)
        b = statistics.median(res_body[name])
        w = statistics.median(res_full[name])
        excess.append((len(plan.blocks), total - b))
        print(
            f"{name:24s} {len(plan.blocks):6d} {total:9.3f} {b:10.3f} {total / b:8.2f} "
            f"{w:10.3f} {total / w:8.2f}"
        )
    # least-squares fit of Σ T − body = c · blocks: a fixed cost per separately timed block
    c = sum(n * d for n, d in excess) / sum(n * n for n, _ in excess)
    print(f"Σ T − body ≈ {1000 * c:.1f} µs × blocks (least squares); load after {load()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("table", "whole", "additivity"):
        p = sub.add_parser(name)
        p.add_argument("--size", type=int, default=224)
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--warmup", type=int, default=10)
        p.add_argument("--reps", type=int, default=100)
        p.add_argument("--min-reps", type=int, default=10)
        p.add_argument("--max-time", type=float, default=1.0)
        p.add_argument("--statistic", default="median", choices=STATISTICS)
        if name == "table":
            p.add_argument("--backend", default="onnxruntime")
            p.add_argument("--builds", type=int, default=3)
            p.add_argument("--passes", type=int, default=1)
            p.add_argument("--out", default=None, help="folder for the CSVs (default: a temp dir)")
        else:
            p.add_argument("--rounds", type=int, default=5)
            p.add_argument("--table", default=None, help="a latency CSV of the same chain")
        if name == "whole":
            p.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    args = parser.parse_args(argv)
    if args.cmd == "additivity" and not args.table:
        parser.error("additivity needs --table")
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    {"table": cmd_table, "whole": cmd_whole, "additivity": cmd_additivity}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
