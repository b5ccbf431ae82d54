"""The paper's shape on the bundled data (issue 7): accuracy and measured ONNX Runtime CPU
speed-up of the compressed demo network at several budgets, against the original.

    python benchmarks/bench_compress.py                       # tables once, then each budget
    python benchmarks/bench_compress.py --budgets 0.5x 0.6x 0.7x --epochs 5 --distill 0.3

The latency and importance tables are computed once (``compress(..., until="importance")``) in
``runs/bench_compress/tables`` and copied into one work directory per budget, where
``compress`` resumes at the solve stage: every budget sees the same tables. At the end all
networks (original and merged ONNX files) are timed again together, in alternating rounds, and
the median over rounds is reported; the markdown table for docs/benchmarks.md is printed and
saved with the raw numbers in ``runs/bench_compress/results.json``.
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

import depthcompress as dc
from depthcompress.backends import Protocol, get_backend
from depthcompress.data import fashion_mnist, load_split
from depthcompress.finetune import FinetuneConfig
from depthcompress.importance import FinetuneSettings
from depthcompress.models import FASHION_MBV2_EXCLUDE, fashion_mbv2, trained_weights

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


def retime(paths: dict[str, Path | torch.nn.Module], shape: tuple[int, ...], rounds: int) -> dict:
    """Median over alternating rounds of each network's median latency (ms)."""
    runner = get_backend("onnxruntime", protocol=Protocol(warmup=20, reps=200, max_time=2.0))
    samples: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for name, target in paths.items():
            samples[name].append(runner.measure(target, shape).median)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["0.5x", "0.6x", "0.7x"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--distill", type=float, default=0.0)
    parser.add_argument("--importance-steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
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
    if args.control:  # the same extra training for the original: is the gain just more epochs?
        from depthcompress.finetune import evaluate, finetune

        start = time.perf_counter()
        twin = fashion_mbv2()
        twin.load_state_dict(model.state_dict())
        config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=128)
        finetune(twin, split.train, config, progress=True, distributed=False)
        control = {"accuracy": evaluate(twin, test), "seconds": time.perf_counter() - start}
    shape = (args.batch, 1, 28, 28)
    targets: dict[str, Path | torch.nn.Module] = {"original": model.eval()}
    targets.update({r["budget"]: Path(r["workdir"]) / "merged.onnx" for r in results})
    timing = retime(targets, shape, args.rounds)
    original_acc = results[0]["original"]["accuracy"]
    rows = [
        "| network | budget T0 (table ms) | kept act. | convs | params | test acc. (%) | Δ acc. "
        "(pp) | ORT latency (ms) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| original | – | – | {results[0]['original']['depth']} | "
        f"{results[0]['original']['params']:,} | {original_acc:.2f} | – | "
        f"{timing['original']:.3f} | 1.00× |",
    ]
    if control is not None:
        rows.append(
            f"| original + {args.epochs} more epochs (control) | – | – | "
            f"{results[0]['original']['depth']} | {results[0]['original']['params']:,} | "
            f"{control['accuracy']:.2f} | {control['accuracy'] - original_acc:+.2f} | – | – |"
        )
    for r in results:
        r["latency"] = timing[r["budget"]]
        r["speedup"] = timing["original"] / timing[r["budget"]]
        rows.append(
            f"| compressed, {r['budget']} | {r['budget_ms']:.3f} | {r['kept_activations']} | "
            f"{r['depth']} | {r['params']:,} | {r['accuracy']:.2f} | "
            f"{r['accuracy'] - original_acc:+.2f} | {r['latency']:.3f} | {r['speedup']:.2f}× |"
        )
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "table_seconds": table_seconds,
        "control": control,
        "original_latency": timing["original"],
        "results": results,
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print("\n".join(rows))
    print(json.dumps(record["machine"]))


if __name__ == "__main__":
    main()
