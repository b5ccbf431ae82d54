"""Cost and quality of importance tables on the bundled data (issue 6).

Stages (each caches its results under runs/bench_importance/):

    python benchmarks/bench_importance.py train    # the demo model, trained on Fashion-MNIST
    python benchmarks/bench_importance.py sweep    # steps / lr on a subset of entries: defaults
    python benchmarks/bench_importance.py tables   # full, fewer-steps and zero-shot tables (CLI)
    python benchmarks/bench_importance.py report   # markdown for docs/benchmarks.md

The model is ``depthcompress:fashion_mbv2`` with stem and head outside the chain; it is trained
on the Fashion-MNIST training set minus the held-out split that scores importance (10 000
examples, seed 0), so the held-out examples are unseen by both training and fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import depthcompress as dc
from depthcompress.data import fashion_mnist, load_split
from depthcompress.importance import (
    FinetuneSettings,
    enumerate_entries,
    importance_table,
    read_table,
    score_entry,
    tune_entry,
)
from depthcompress.models import FASHION_MBV2_EXCLUDE, fashion_mbv2

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench_importance"
WEIGHTS = RUNS / "fashion_mbv2.pt"
HOLDOUT, HOLDOUT_SEED = 10000, 0
MODEL_ARGS = ["depthcompress:fashion_mbv2", "--exclude", "stem", "--exclude", "head"]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def machine() -> dict[str, object]:
    """CPU model, cores, load and versions, for the record."""
    model = "unknown"
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            model = line.split(":", 1)[1].strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def chain_of(model: torch.nn.Module) -> dc.ConvChain:
    return dc.trace(model, torch.randn(1, 1, 28, 28), exclude=FASHION_MBV2_EXCLUDE)


def train(args: argparse.Namespace) -> None:
    """Train the demo model on train-minus-holdout; record held-out and test accuracy."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    split = load_split("fashion-mnist", holdout=HOLDOUT, seed=HOLDOUT_SEED)
    model = fashion_mbv2()
    steps = args.epochs * len(split.train) // 128
    settings = FinetuneSettings(steps=steps, lr=0.1, batch_size=128, weight_decay=4e-5)
    start = time.perf_counter()
    loss = tune_entry(model, split.train, settings, seed=0)
    seconds = time.perf_counter() - start
    held = score_entry(model, split.holdout, settings)
    test = score_entry(model, fashion_mnist("test"), settings)
    RUNS.mkdir(parents=True, exist_ok=True)
    model = model.to(memory_format=torch.contiguous_format)
    torch.save(model.state_dict(), WEIGHTS)
    info = {
        "epochs": args.epochs,
        "steps": steps,
        "train_loss": loss,
        "seconds": seconds,
        "holdout_acc": held[0],
        "test_acc": test[0],
        "machine": machine(),
    }
    (RUNS / "train.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


def trained() -> torch.nn.Module:
    model = fashion_mbv2()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model


def sweep(args: argparse.Namespace) -> None:
    """Scores of a subset of entries for several step counts and learning rates."""
    torch.set_num_threads(1)
    model = trained()
    chain = chain_of(model)
    entries = enumerate_entries(chain)[:: args.every]
    split = load_split("fashion-mnist", holdout=HOLDOUT, seed=HOLDOUT_SEED)
    out = RUNS / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    configs = [(s, 0.05) for s in args.steps] + [(args.lr_steps, lr) for lr in args.lrs or ()]
    for steps, lr in configs:
        path = out / f"steps{steps}_lr{lr}.csv"
        start = time.perf_counter()
        importance_table(
            model,
            chain,
            split,
            path,
            settings=FinetuneSettings(steps=steps, lr=lr),
            entries=entries,
            workers=args.workers,
            model_name="depthcompress:fashion_mbv2",
        )
        print(f"steps={steps} lr={lr}: {time.perf_counter() - start:.0f} s", flush=True)


def run_cli(name: str, extra: list[str], workers: int) -> dict[str, object]:
    """Run ``depthcompress importance`` for the benchmark model; returns wall time and rows."""
    path = RUNS / "tables" / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        "depthcompress",
        "importance",
        *MODEL_ARGS,
        "--weights",
        str(WEIGHTS),
        "--data",
        "fashion-mnist",
        "--workers",
        str(workers),
        "-o",
        str(path),
        *extra,
    ]
    print(" ".join(cmd), flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    _, rows = read_table(path)
    info = {
        "command": " ".join(cmd),
        "wall_s": wall,
        "rows": len(rows),
        "load_before": load_before,
        "machine": machine(),
    }
    if not (RUNS / "tables" / f"{name}.time.json").exists():
        (RUNS / "tables" / f"{name}.time.json").write_text(json.dumps(info, indent=1))
    return info


def tables(args: argparse.Namespace) -> None:
    """The full default table, a fewer-steps table and a zero-shot table, through the CLI."""
    for name, extra in (
        ("zero_shot", ["--zero-shot"]),
        (f"steps{args.few}", ["--steps", str(args.few)]),
        ("full", []),
    ):
        run_cli(name, extra, args.workers)


def _scores(path: Path) -> dict[tuple[int, ...], float]:
    _, rows = read_table(path)
    return {(r["st"], r["end"], r["st_act"], r["end_act"]): r["val_acc"] for r in rows}


def _corr(a: dict, b: dict, multi_only: bool = False) -> tuple[float, int]:
    keys = sorted(k for k in set(a) & set(b) if not multi_only or k[1] - k[0] > 1)
    if len(keys) < 3:
        return math.nan, len(keys)
    return spearman([a[k] for k in keys], [b[k] for k in keys]), len(keys)


def report(args: argparse.Namespace) -> None:
    """Print the numbers of docs/benchmarks.md from the cached runs."""
    lines = []
    info = json.loads((RUNS / "train.json").read_text())
    lines.append(
        f"model: {info['epochs']} epoch(s), {info['seconds']:.0f} s; held-out "
        f"{info['holdout_acc']:.2f} %, test {info['test_acc']:.2f} %"
    )
    sw = RUNS / "sweep"
    if sw.is_dir():
        runs = {p.stem: _scores(p) for p in sorted(sw.glob("*.csv"))}
        ref = f"steps{max(args.steps)}_lr0.05"
        lines.append(f"\nsweep vs {ref}:")
        for name, sc in runs.items():
            meta, rows = read_table(sw / f"{name}.csv")
            mean = np.mean([r["val_acc"] for r in rows])
            secs = np.mean([r["seconds"] for r in rows])
            rho, n = _corr(sc, runs[ref])
            rho_m, n_m = _corr(sc, runs[ref], multi_only=True)
            lines.append(
                f"| {name} | {n} | {mean:.2f} | {secs:.1f} | {rho:.3f} | {rho_m:.3f} ({n_m}) |"
            )
    tb = RUNS / "tables"
    if (tb / "full.csv").is_file():
        full = _scores(tb / "full.csv")
        lines.append("\ntables:")
        for p in sorted(tb.glob("*.csv")):
            meta, rows = read_table(p)
            t = json.loads((tb / f"{p.stem}.time.json").read_text())
            rho, n = _corr(_scores(p), full)
            rho_m, n_m = _corr(_scores(p), full, multi_only=True)
            per = np.mean([r["seconds"] for r in rows])
            lines.append(
                f"| {p.stem} | {len(rows)} | {t['wall_s']:.0f} | {t['wall_s'] / len(rows):.1f} "
                f"| {per:.1f} | {rho:.3f} | {rho_m:.3f} | base {meta['base']['val_acc']:.2f} |"
            )
            lines.append(f"  `{t['command']}`  {t['machine']}")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("train")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    for name in ("sweep", "report"):
        p = sub.add_parser(name)
        p.add_argument("--every", type=int, default=6, help="sweep every k-th entry")
        p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200, 400])
        p.add_argument("--lrs", type=float, nargs="*", default=[0.01, 0.2])
        p.add_argument("--lr-steps", type=int, default=200)
        p.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("tables")
    p.add_argument("--few", type=int, default=25)
    p.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    {"train": train, "sweep": sweep, "tables": tables, "report": report}[args.stage](args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
