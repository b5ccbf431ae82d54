"""One accuracy vs measured speed-up plot from the points of several ``pareto.py`` runs of the
same model (e.g. the Torch-Pruning, layer-pruning and ``--width auto`` runs of the demo), one
PNG per timing setting, and the Markdown table beside it.

    python benchmarks/plot_fronts.py runs/pareto-demo8c runs/demo-layers runs/demo-jl \\
        --timings ort:1:64 ort:1:1 --out docs/img/demo

Every run must hold the same original network (its accuracy is compared); the original is
plotted once. Points are loaded from each run's ``points.json``; nothing is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pareto  # the plot and table of the benchmark itself


def merged_points(runs: list[Path]) -> tuple[str, list[dict]]:
    """The model name and the points of ``runs``, the original once; an error if the runs are of
    different models or originals."""
    model, base, points = None, None, []
    for run in runs:
        record = json.loads((run / "points.json").read_text())
        original = next(p for p in record["points"] if p["method"] == "original")
        if model is None:
            model, base = record["model"], original["accuracy"]
            points.append(original)
        elif record["model"] != model or original["accuracy"] != base:
            raise SystemExit(f"{run} holds another model or original than {runs[0]}")
        points += [p for p in record["points"] if p["method"] != "original"]
    return str(model), points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pareto.py --out directories")
    parser.add_argument("--timings", nargs="+", default=["ort:1:64"], help="backend:threads:batch")
    parser.add_argument("--out", type=Path, required=True, help="file stem of the PNGs and table")
    args = parser.parse_args(argv)
    model, points = merged_points(args.runs)
    timings = tuple(pareto.Timing.parse(t) for t in args.timings)
    have = [t for t in timings if all(t.key in p["speedups"] for p in points)]
    missing = sorted({t.key for t in timings} - {t.key for t in have})
    if missing:
        print(f"not every point has {', '.join(missing)}: those plots are left out")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for t in have:
        path = args.out.with_name(f"{args.out.name}-{t.key}.png")
        pareto.plot(points, t, model, path)
        print(path)
    table = args.out.with_name(f"{args.out.name}.md")
    table.write_text(f"## {model}\n\n" + pareto.markdown(points, tuple(have)))
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
