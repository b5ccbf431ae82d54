"""The paper's shape on the bundled data (issue 7): accuracy and measured ONNX Runtime CPU
speed-up of the compressed demo network at several budgets, against the original.

    python benchmarks/bench_compress.py --epochs 8 --distill 0.3 \
        --budgets 0.45x 0.5x 0.55x 0.6x 0.7x

The latency and importance tables are computed once (``compress(..., until="importance")``) in
``runs/bench_compress/tables`` and copied into one work directory per budget, where
``compress`` resumes at the solve stage: every budget sees the same tables. At the end each
merged ONNX file is timed against the original again with ``speedup.paired_speedup`` (the
measurement ``compress`` and ``depthcompress speedup`` use: alternating paired rounds, the
median per-round ratio with its 95 % bootstrap interval), with 2 threads and with 1; a figure
whose interval missed the target is marked "noisy". The markdown table for docs/benchmarks.md
is printed with the load average and saved with the raw numbers in
``runs/bench_compress/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from bench_importance import machine  # same record of the machine (run from benchmarks/)
from bench_speedup import load  # the load average, beside every timing

import depthcompress as dc
from depthcompress.backends import get_backend
from depthcompress.data import fashion_mnist, load_split
from depthcompress.finetune import FinetuneConfig
from depthcompress.importance import FinetuneSettings
from depthcompress.models import FASHION_MBV2_EXCLUDE, fashion_mbv2, trained_weights
from depthcompress.speedup import Rule, paired_speedup

ROOT = Path(__file__).resolve().parents[1]
TABLE_FILES = (
    "run.json",
    "latency.csv",
    "latency.csv.json",
    "opt_latency.csv",
    "importance.csv",
    "importance.csv.json",
)


def settings(args: argparse.Namespace, budget: str) -> dc.CompressSettings:
    return dc.CompressSettings(
        budget=dc.Budget.parse(budget),
        batch=args.batch,
        exclude=FASHION_MBV2_EXCLUDE,
        importance=FinetuneSettings(steps=args.importance_steps),
        workers=args.workers,
        finetune=FinetuneConfig(
            epochs=args.epochs, lr=args.lr, batch_size=128, distill=args.distill
        ),
    )


def seed_workdir(tables: Path, workdir: Path) -> None:
    """Give a budget's work directory the shared tables (and their finished-stage records)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in TABLE_FILES:
        if not (workdir / name).exists():
            shutil.copy2(tables / name, workdir / name)
    stages_path = workdir / "stages.json"
    if not stages_path.exists():
        stages = json.loads((tables / "stages.json").read_text())
        keep = {k: v for k, v in stages.items() if k in ("latency", "optimal", "importance")}
        stages_path.write_text(json.dumps(keep, indent=1) + "\n")


def retime(
    targets: dict[str, Path | torch.nn.Module], shape: tuple[int, ...], threads: int, rule: Rule
) -> dict[str, dict[str, object]]:
    """Each compressed network against the original in paired rounds on ONNX Runtime with
    ``threads`` threads: per network its median latency (ms), the speed-up with its 95 %
    interval and whether the interval reached ``rule.target`` (the original: its median latency
    over all pairings, speed-up 1)."""
    backend = get_backend("onnxruntime", threads=threads)
    original = targets["original"]
    out: dict[str, dict[str, object]] = {}
    originals = []
    for name, target in targets.items():
        if name == "original":
            continue
        res = paired_speedup(original, target, backend, shape, rule, names=("original", name))
        print(f"{name}, {threads} thread(s): {res.message}; load {load()}")
        originals.append(res.latency_a_ms)
        out[name] = {
            "latency": res.latency_b_ms,
            "original_latency": res.latency_a_ms,
            "speedup": res.speedup,
            "low": res.low,
            "high": res.high,
            "converged": res.converged,
            "paired": res.to_dict(),
        }
    out["original"] = {
        "latency": statistics.median(originals),
        "speedup": 1.0,
        "low": 1.0,
        "high": 1.0,
        "converged": True,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["0.5x", "0.6x", "0.7x"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--distill", type=float, default=0.0)
    parser.add_argument("--importance-steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10, help="paired rounds, at least")
    parser.add_argument(
        "--max-time", type=float, default=60.0, help="seconds of paired rounds per network"
    )
    parser.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fine-tune the original for the same epochs (is the gain just training?)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_compress")
    args = parser.parse_args()

    model = fashion_mbv2()
    model.load_state_dict(torch.load(trained_weights(), weights_only=True))
    split = load_split("fashion-mnist", holdout=10000, seed=0)
    test = fashion_mnist("test")
    name = "depthcompress:fashion_mbv2"
    tables = args.out / "tables"
    start = time.perf_counter()
    dc.compress(
        model, split, tables, settings(args, args.budgets[0]), test_data=test,
        model_name=name, until="importance", log=print,
    )  # fmt: skip
    table_seconds = time.perf_counter() - start
    results = []
    for budget in args.budgets:
        wd = args.out / f"budget-{budget}"
        seed_workdir(tables, wd)
        start = time.perf_counter()
        res = dc.compress(
            model, split, wd, settings(args, budget), test_data=test, model_name=name, log=print
        )
        assert res is not None
        plan = json.loads((wd / "plan.json").read_text())
        results.append(
            {
                "budget": budget,
                "budget_ms": res.budget_ms,
                "plan_latency": plan["latency"],
                "original_chain_latency": plan["original_latency"],
                "kept_activations": len(res.plan.activations),
                "accuracy": res.compressed.accuracy,
                "depth": res.compressed.depth,
                "params": res.compressed.params,
                "pipeline_speedup": res.speedup,
                "seconds": time.perf_counter() - start,
                "workdir": str(wd),
                "original": res.original.__dict__,
            }
        )
    control = None
    control_path = args.out / f"control-{args.epochs}ep-lr{args.lr:g}.json"
    if args.control and control_path.exists():
        control = json.loads(control_path.read_text())
    elif args.control:  # the same extra training for the original: is the gain just epochs?
        from depthcompress.finetune import evaluate, finetune

        start = time.perf_counter()
        twin = fashion_mbv2()
        twin.load_state_dict(model.state_dict())
        config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=128)
        finetune(twin, split.train, config, distributed=False)
        control = {"accuracy": evaluate(twin, test), "seconds": time.perf_counter() - start}
        control_path.write_text(json.dumps(control) + "\n")
    shape = (args.batch, 1, 28, 28)
    targets: dict[str, Path | torch.nn.Module] = {"original": model.eval()}
    targets.update({r["budget"]: Path(r["workdir"]) / "merged.onnx" for r in results})
    rule = Rule(min_rounds=args.rounds, max_time=args.max_time)
    timing = {t: retime(targets, shape, t, rule) for t in (2, 1)}
    original_acc = results[0]["original"]["accuracy"]
    orig = results[0]["original"]

    def speed(name: str, t: int) -> str:
        v = timing[t][name]
        noisy = "" if v["converged"] else " noisy"
        return f"{v['latency']:.3f} | {v['speedup']:.2f}× [{v['low']:.2f}, {v['high']:.2f}]{noisy}"

    rows = [
        "| network | budget T0 (table ms) | kept act. | convs | params | test acc. (%) | Δ acc. "
        "(pp) | ORT 2 threads: ms | speed-up [95 % interval] | ORT 1 thread: ms | speed-up "
        "[95 % interval] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| original | – | – | {orig['depth']} | {orig['params']:,} | {original_acc:.2f} | – | "
        f"{speed('original', 2)} | {speed('original', 1)} |",
    ]
    if control is not None:
        rows.append(
            f"| original + {args.epochs} more epochs (control) | – | – | {orig['depth']} | "
            f"{orig['params']:,} | {control['accuracy']:.2f} | "
            f"{control['accuracy'] - original_acc:+.2f} | – | – | – | – |"
        )
    for r in results:
        r["timing"] = {t: timing[t][r["budget"]] for t in (2, 1)}
        rows.append(
            f"| compressed, {r['budget']} | {r['budget_ms']:.3f} | {r['kept_activations']} | "
            f"{r['depth']} | {r['params']:,} | {r['accuracy']:.2f} | "
            f"{r['accuracy'] - original_acc:+.2f} | {speed(r['budget'], 2)} | "
            f"{speed(r['budget'], 1)} |"
        )
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "table_seconds": table_seconds,
        "control": control,
        "original_timing": {t: timing[t]["original"] for t in (2, 1)},
        "results": results,
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print("\n".join(rows))
    print(f"load average at the end: {load()} (a shared machine: see the per-network lines)")
    print(json.dumps(record["machine"]))


if __name__ == "__main__":
    main()
