"""Human-readable views of the pipeline's data: tables a person can look at."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import Progress
from rich.table import Table

from .files import atomic_open
from .progress import LOG, Step

if TYPE_CHECKING:
    from .dp import Sweep
    from .graph import ConvChain
    from .tables import LatencyTable, OptimalLatencyTable


def _pair(p: tuple[int, int]) -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}x{p[1]}"


def chain_table(chain: ConvChain, title: str = "") -> Table:
    """One row per position: module, op, kernel, stride, groups, activation, shape, residual."""
    table = Table(title=title or None, header_style="bold")
    for col in ("pos", "module", "op", "kernel", "stride", "groups", "act", "shape", "residual"):
        table.add_column(col, justify="right" if col in ("pos", "groups") else "left")
    starts: dict[int, list[int]] = {}
    for r in chain.residuals:
        starts.setdefault(r.start, []).append(r.end)
    for p in chain.positions:
        notes = [f"skip→{t}" for t in starts.get(p.index, [])]
        res = chain.residual_ending_at(p.index)
        if res is not None:
            kind = f"via {res.shortcut}" if res.shortcut else "identity"
            notes.append(f"+skip {res.start} ({kind})")
        if p.index in chain.barriers:
            notes.append("[red]boundary[/]")
        if p.index == 0:
            table.add_row("0", "(input)", "", "", "", "", "", _shape(p.shape), " ".join(notes))
            continue
        op = "conv+bn" if p.bn else "conv"
        if p.dilation != (1, 1):
            op += f" d{_pair(p.dilation)}"
        if not p.mergeable:
            op += " [red](fixed)[/]"
        table.add_row(
            str(p.index),
            p.conv or "",
            op,
            _pair(p.kernel),
            _pair(p.stride),
            "dw" if p.groups == p.in_channels and p.groups > 1 else str(p.groups),
            p.activation or "-",
            _shape(p.shape),
            " ".join(notes),
        )
    return table


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape[1:])


def progress_bar(*extra: str, console: Any = None) -> Progress:
    """The progress bar every long stage shows: description, bar, done/total, elapsed, ETA,
    then ``extra`` text columns (format strings over the task, e.g. ``"{task.fields[block]}"``),
    drawn on ``console`` (default: rich's own)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        *(TextColumn(text) for text in extra),
        console=console,
    )


class RichProgress:
    """Draws the ``progress.Step`` events of library calls as rich progress bars, one per task
    (the command line's reporter): ``with RichProgress(console) as reporter: stage(...,
    progress=reporter)``."""

    def __init__(self, console: Any = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = progress_bar("{task.fields[detail]}", console=console)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> Callable[[Step], None] | None:
        if not self.enabled:
            return None
        self.bar.__enter__()
        return self

    def __call__(self, step: Step) -> None:
        task = self.tasks.get(step.task)
        if task is None:
            task = self.tasks[step.task] = self.bar.add_task(
                step.task, total=step.total, completed=step.done, detail=step.detail
            )
        self.bar.update(task, total=step.total, completed=step.done, detail=step.detail)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(None, None, None)


def log_to_console(console: Any, level: int = logging.INFO) -> None:
    """Show the package's log messages (``progress.LOG``) on ``console``, once."""
    from rich.logging import RichHandler

    if not any(isinstance(h, RichHandler) for h in LOG.handlers):
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)
    LOG.setLevel(level)


# ---------------------------------------------------------------------------------------------
# the work directory's report.md (and its plots)


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def _change(before: float | None, after: float | None, spec: str, unit: str = "") -> str:
    if before is None or after is None:
        return "–"
    return f"{after - before:+{spec}}{unit}"


def summary_rows(evaluation: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(quantity, original, compressed, change) rows of the final comparison."""
    a, b = evaluation["original"], evaluation["compressed"]
    backend = evaluation["backend"]
    threads = evaluation.get("threads", backend.get("threads"))
    where = f"{backend['name']} {backend.get('device', '')}".strip()
    where += f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""
    speedup = evaluation["speedup"]
    change = f"{speedup:.2f}× " + ("faster" if speedup >= 1 else "(slower)")
    interval = evaluation.get("speedup_interval")
    if interval:
        change += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    if evaluation.get("speedup_converged") is False:
        change += " (too noisy)"
    return [
        (
            f"accuracy ({evaluation['test_set']}, %)",
            _fmt(a["accuracy"], ".2f"),
            _fmt(b["accuracy"], ".2f"),
            _change(a["accuracy"], b["accuracy"], ".2f", " pp"),
        ),
        (
            f"latency ({where}, batch {evaluation['batch']}, ms)",
            f"{a['latency']:.4f}",
            f"{b['latency']:.4f}",
            change,
        ),
        ("depth (convolutions)", str(a["depth"]), str(b["depth"]), f"{b['depth'] - a['depth']:+d}"),
        ("parameters", f"{a['params']:,}", f"{b['params']:,}", f"{b['params'] / a['params']:.2f}×"),
    ]


def measured_speedup(evaluation: dict[str, Any]) -> str:
    """The measured speed-up as one phrase: ``speed-up 1.52× [1.49, 1.55]`` (95 % interval of
    the paired rounds), or without an interval where the run had none."""
    interval = evaluation.get("speedup_interval")
    span = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else " (no interval)"
    return f"speed-up {evaluation['speedup']:.2f}×{span}"


def noisy_warning(evaluation: dict[str, Any]) -> str | None:
    """Why the measured speed-up is not to be trusted (the machine was too noisy), or None."""
    if evaluation.get("speedup_converged") is not False:
        return None
    message = evaluation["paired"]["message"]
    return f"Warning: {message[0].upper()}{message[1:]}. The speed-up is not trustworthy."


def summary_lines(evaluation: dict[str, Any]) -> list[str]:
    """The lines printed under the summary table: the measured speed-up with its interval next
    to the prediction, a warning when the machine was too noisy, and the timing's settings."""
    whole = evaluation.get("predicted_whole")
    calibrated = f", {whole:.2f}× for the whole network after calibration" if whole else ""
    lines = [
        f"measured {measured_speedup(evaluation)} (95 % interval); the latency table predicted "
        f"{evaluation['predicted_speedup']:.2f}× for the chain{calibrated}"
    ]
    warning = noisy_warning(evaluation)
    lines += width_lines(evaluation, compact=True)
    lines += [*([warning] if warning else []), timing_lines(evaluation)[0]]
    return [*lines, *control_lines(evaluation)]


def control_lines(evaluation: dict[str, Any]) -> list[str]:
    """The control next to the result (held-out accuracies of the original, of the original
    fine-tuned under the recipe at the probed lr, and of the compressed network), and the
    warning when one lost the accuracy; nothing for a run without the lr probe."""
    control = evaluation.get("control")
    if not control:
        return []
    net = control.get("network", "original")  # the network probed: with width, the pruned one
    line = (
        f"Control (held-out split): {net} {_fmt(control['original_holdout_accuracy'], '.2f')} "
        f"%, {net} fine-tuned {control['steps']} steps at the probed lr {control['lr']:g}: "
        f"{_fmt(control['control_holdout_accuracy'], '.2f')} %, compressed after fine-tuning: "
        f"{_fmt(control['compressed_holdout_accuracy'], '.2f')} %"
    )
    return [line, *([control["warning"]] if control.get("warning") else [])]


def control_warning_line(evaluation: dict[str, Any]) -> str | None:
    """The control's warning (the plan or the recipe lost the accuracy), or None."""
    return (evaluation.get("control") or {}).get("warning")


def width_lines(evaluation: dict[str, Any], *, compact: bool = False) -> list[str]:
    """With --width: the measured speed-up split into width (original → pruned, paired) and
    depth (pruned → final), and (``compact``) the kept channels on one line."""
    w = evaluation.get("width")
    if not w:
        return []
    lines = [
        f"of the measured {evaluation['speedup']:.2f}×, width (--width {w['ratio']:g}, "
        f"{w['importance']} importance, channels rounded to {w['round_to']}) gave "
        f"{w['speedup']:.2f}× (original → pruned, paired rounds) and depth "
        f"{w['depth_speedup']:.2f}× (pruned → final)"
    ]
    if compact:
        kept = ", ".join(f"{n} {a}→{b}" for n, (a, b) in w["kept"].items())
        lines.append(f"kept channels: {kept}")
    return lines


def width_section(evaluation: dict[str, Any]) -> list[str]:
    """report.md's width part: the speed-up split and the kept channels per convolution."""
    w = evaluation.get("width")
    if not w:
        return []
    before, after = w["params"]
    lines = ["## Width (channel pruning before depth)", "", *width_lines(evaluation), ""]
    lines += [f"Parameters {before:,} → {after:,} by pruning alone.", ""]
    rows = [(n, str(a), str(b), f"{b / a:.0%}") for n, (a, b) in w["kept"].items()]
    return [*lines, *_md_table(("convolution", "channels", "kept", "share"), rows), ""]


def search_section(workdir: Path) -> list[str]:
    """report.md's part for ``--width auto``: every candidate ratio's estimate and the choice."""
    path = workdir / "width_search.json"
    if not path.exists():
        return []
    search = json.loads(path.read_text())
    rows = []
    for c in search["candidates"]:
        feasible = c["depth_loss"] is not None
        rows.append(
            (
                f"{c['ratio']:g}" + (" (chosen)" if c["ratio"] == search.get("chosen") else ""),
                f"{c['speedup']:.2f}×",
                f"{c['width_loss']:+.2f}",
                f"{c['depth_fraction']:.3f}",
                f"{c['depth_loss']:+.2f}"
                if feasible
                else f"out of reach (≥ {c['least_fraction']:.3f}x)",
                f"{c['loss']:+.2f}" if feasible else "-",
            )
        )
    head = (
        f"`--width auto` scored each width ratio for the budget ({search['budget_fraction']:.3f}x "
        "of the original's whole latency) with the importance entries' short fine-tuning: the "
        "width loss is the pruned network's held-out drop against the original after the same "
        "fine-tuning; depth's is stage 2's summed drop "
        "(delta normalisation) on the original's tables at the fraction of the pruned network "
        "left to reach (budget × width speed-up). Losses in points, lower is better; an estimate "
        "to rank ratios, not the final accuracy (widthsearch.py)."
    )
    header = ("width", "speed-up", "width loss", "depth fraction", "depth loss", "total")
    return ["## Width search", "", head, "", *_md_table(header, rows), ""]


def timing_lines(evaluation: dict[str, Any]) -> list[str]:
    """How the latencies were measured: the method, the threads (the default and how to change
    them), the batch, the CPU model and the runtime's settings."""
    backend, machine = evaluation["backend"], evaluation.get("machine", {})
    threads = evaluation.get("threads", backend.get("threads"))
    default = evaluation.get("threads_default")
    chosen = (
        " (the default: all cores this process may use)"
        if default
        else " (set with --threads)"
        if default is False
        else ""
    )
    settings = ", ".join(
        f"{k} {v}" for k, v in backend.items() if k not in ("name", "version", "device", "threads")
    )
    lines = [
        f"Timing: {backend['name']} {backend.get('version', '')} on {backend.get('device', '')}"
        + (f", {threads} thread{'s' if threads != 1 else ''}{chosen}" if threads else "")
        + f", batch {evaluation['batch']}"
        + (f", CPU {machine['cpu']}" if machine.get("cpu") else "")
        + (f"; runtime settings: {settings}" if settings else "")
        + ". Threads are a deployment choice: time with the thread count you deploy with "
        "(--threads N)."
    ]
    method = evaluation.get("speedup_method", "alternating medians")
    if method == "paired":
        paired = evaluation["paired"]
        lines.append(
            f"Method: {paired['rounds']} paired rounds (original and compressed in alternating "
            f"order, {paired['rule']['block']} runs each per round) in {paired['elapsed_s']:.1f} "
            "s; the speed-up is the median of the per-round ratios with a 95 % bootstrap "
            f"interval (inter-quartile range {paired['q1']:.2f}–{paired['q3']:.2f}); each "
            "network's latency is the median of its per-round times."
        )
    elif "speedup_method" in evaluation:
        lines.append(
            f"Method: {backend['name']} cannot time in paired rounds, so each network's latency "
            "is the best of two alternating median measurements and the speed-up their ratio "
            "(no interval)."
        )
    else:
        lines.append(
            "Method: each network's latency is the best of two alternating median measurements "
            "(an earlier depthcompress; --redo evaluate measures the speed-up in paired rounds)."
        )
    return lines


def summary_table(evaluation: dict[str, Any], title: str = "original vs compressed") -> Table:
    """The final comparison as a rich table for the terminal."""
    table = Table(title=title, header_style="bold")
    for col in ("", "original", "compressed", "change"):
        table.add_column(col, justify="left" if not col else "right")
    for row in summary_rows(evaluation):
        table.add_row(*row)
    return table


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


# ---------------------------------------------------------------------------------------------
# the Pareto front: one CSV layout and one plot for `solve` and `compress`

FRONT_COLUMNS = (
    "budget",
    "latency",
    "importance",
    "num_activations",
    "num_blocks",
    "activations",
    "boundaries",
)
"""``front.csv``, one row per budget of a sweep: the ``budget`` (ms, table units), its plan's
``latency`` (Σ T_opt) and summed ``importance``, the sizes of A and S, and A and S themselves as
comma-separated positions (a quoted field)."""


@dataclass(frozen=True)
class FrontRow:
    """One row of ``front.csv``: the best plan (A, S) for one budget of a sweep."""

    budget: float
    latency: float
    importance: float
    activations: tuple[int, ...]
    boundaries: tuple[int, ...]


def front_rows(sweep: Sweep) -> list[FrontRow]:
    """The rows of ``front.csv`` for a ``dp.Sweep``: one per budget, in the sweep's order."""
    return [
        FrontRow(
            budget=sol.budget,
            latency=sol.latency,
            importance=sol.importance,
            activations=tuple(sorted(sol.plan.activations)),
            boundaries=tuple(sorted(sol.plan.boundaries)),
        )
        for sol in sweep.solutions
    ]


def write_front_csv(path: str | Path, front: Sweep | Sequence[FrontRow]) -> None:
    """Write a sweep's plans (a ``dp.Sweep`` or its ``front_rows``) to ``path`` atomically, in
    the ``FRONT_COLUMNS`` layout; floats are written exactly (``repr``)."""
    rows = front if isinstance(front, Sequence) else front_rows(front)
    with atomic_open(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(FRONT_COLUMNS)
        for row in rows:
            writer.writerow(
                (
                    repr(row.budget),
                    repr(row.latency),
                    repr(row.importance),
                    len(row.activations),
                    len(row.boundaries),
                    ",".join(map(str, row.activations)),
                    ",".join(map(str, row.boundaries)),
                )
            )


def read_front_csv(path: str | Path) -> list[FrontRow]:
    """The rows of a ``front.csv`` (``write_front_csv``); none when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [
            FrontRow(
                budget=float(r["budget"]),
                latency=float(r["latency"]),
                importance=float(r["importance"]),
                activations=_positions(r["activations"]),
                boundaries=_positions(r["boundaries"]),
            )
            for r in csv.DictReader(fh)
        ]


def _positions(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p)


def _figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` made through the object API (no pyplot, so the global backend a
    notebook uses is left alone), or None when matplotlib is not installed (plots are optional:
    ``pip install depthcompress[plot]``)."""
    try:
        import matplotlib  # noqa: F401  (an uninstalled or blocked matplotlib fails here)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(width, height))


def plot_front(
    path: str | Path,
    rows: Sequence[FrontRow],
    *,
    front: Sequence[tuple[float, float]] | None = None,
    plan: dict[str, Any] | None = None,
    title: str = "",
) -> bool:
    """Plot a sweep to ``path`` (PNG): the Pareto front as a step line (``front``, the sweep's
    exact front, or else the rows' plans), the plan per budget, and, given ``plan`` (a
    ``plan.json`` with ``budget_spec`` and ``original_latency``), the chosen plan, its budget
    and the original latency. False when matplotlib is not installed."""
    fig = _figure(7, 4.5)
    if fig is None:
        return False
    ax = fig.subplots()
    points = list(front) if front is not None else sorted({(r.latency, r.importance) for r in rows})
    if points and plan is not None:
        points.append((max(plan["original_latency"], points[-1][0]), points[-1][1]))
    if points:
        ax.step(*zip(*points, strict=True), where="post", color="0.55", label="Pareto front")
    if rows:
        lat = [r.latency for r in rows]
        ax.plot(lat, [r.importance for r in rows], "o", ms=3, color="C0", label="plan per budget")
    if plan is not None:
        ax.plot(plan["latency"], plan["importance"], "o", color="C3", ms=8, label="chosen plan")
        ax.axvline(plan["budget"], color="C3", ls="--", lw=1, label=f"budget {plan['budget_spec']}")
        ax.axvline(plan["original_latency"], color="0.3", ls=":", lw=1, label="original")
    ax.set_xlabel("latency Σ T_opt of the chain (ms, latency-table units)")
    ax.set_ylabel("summed extended importance Σ I")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _plot_blocks(path: Path, rows: list[tuple[str, float, float]]) -> bool:
    fig = _figure(max(6.0, 0.45 * len(rows) + 2), 4.0)
    if fig is None:
        return False
    ax = fig.subplots()
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="before (separate convs)")
    after = "after (merged block; with pruned convs: its configuration)"
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label=after)
    ax.set_xticks(list(xs), [r[0] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("latency-table time (ms)")
    ax.set_title("per-block latency before and after merging", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


@dataclass(frozen=True)
class LatencyPoint:
    """One network on the accuracy-latency plot: measured latency (ms) with its interval
    (``low``, ``high``; equal to ``latency`` when there is none) and test accuracy (%)."""

    label: str
    latency: float
    accuracy: float
    low: float
    high: float


def latency_points(evaluation: dict[str, Any]) -> list[LatencyPoint]:
    """The networks a run measured, from ``evaluation.json``: the original, the compressed one
    (its latency scaled by the speed-up's interval: speed-up / high … speed-up / low) and any
    other evaluated plans in ``evaluation["plans"]`` (label, latency, accuracy, optional
    low/high)."""
    a, b = evaluation["original"], evaluation["compressed"]
    interval = evaluation.get("speedup_interval") or [evaluation["speedup"]] * 2
    scale = b["latency"] * evaluation["speedup"]
    low, high = scale / interval[1], scale / interval[0]
    raw = [
        {"label": "original", "latency": a["latency"], "accuracy": a["accuracy"]},
        {**b, "label": "compressed (chosen plan)", "low": low, "high": high},
        *evaluation.get("plans", []),
    ]
    return [
        LatencyPoint(
            label=r["label"],
            latency=r["latency"],
            accuracy=r["accuracy"],
            low=r.get("low", r["latency"]),
            high=r.get("high", r["latency"]),
        )
        for r in raw
        if r.get("accuracy") is not None
    ]


def plot_accuracy_latency(
    path: str | Path, points: Sequence[LatencyPoint], *, title: str, accuracy: str
) -> bool:
    """Accuracy (``accuracy`` names the set) against measured latency (PNG), the latency
    interval as a horizontal error bar; False without matplotlib or anything to draw."""
    fig = _figure(6, 4.2)
    if fig is None or not points:
        return False
    ax = fig.subplots()
    for k, pt in enumerate(points):
        ax.errorbar(
            pt.latency,
            pt.accuracy,
            xerr=[[pt.latency - pt.low], [pt.high - pt.latency]],
            fmt="o",
            ms=7,
            capsize=4,
            color=f"C{k}",
            label=pt.label,
        )
    ax.set_xlabel("measured latency of the whole network (ms)")
    ax.set_ylabel(f"accuracy ({accuracy}, %)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def speedup_section(evaluation: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """report.md's comparison of the measured speed-up (with its interval) with the latency
    table's prediction for the chain and, when a calibration gave one, for the whole network."""
    whole = evaluation.get("predicted_whole")
    rows = [
        (
            "measured, whole network",
            measured_speedup(evaluation),
            "paired rounds on the backend below"
            if evaluation.get("speedup_method") == "paired"
            else "best of two alternating medians",
        ),
        (
            "predicted by the latency table, chain only",
            f"{evaluation['predicted_speedup']:.2f}×",
            f"Σ T of the {'pruned' if evaluation.get('width') else 'original'} chain "
            f"{plan['original_latency']:.4f} ms → Σ T_opt "
            f"{plan['latency']:.4f} ms (stem, head and per-call overheads not included)",
        ),
        (
            "predicted for the whole network (calibrated)",
            "–" if whole is None else f"{whole:.2f}×",
            "no calibration in this run" if whole is None else "calibrated latency table",
        ),
    ]
    lines = ["## Speed-up", ""]
    lines += _md_table(("", "speed-up", "from"), rows)
    lines.append("")
    warning = noisy_warning(evaluation)
    if warning:
        lines += [f"**{warning}**", ""]
    for line in timing_lines(evaluation):
        lines += [line, ""]
    return lines


def block_config_times(workdir: Path, plan: dict[str, Any]) -> dict[tuple[int, int], float]:
    """T(i, j, c) of each block the plan prunes in (a segment with configuration c ≥ 1 is one
    block), from the run's configuration latency table ``latency_configs.csv``."""
    chosen = {(s["st"], s["end"]): s["config"] for s in plan["segments"] if s.get("config")}
    if not chosen:
        return {}
    from .tables import read_config_latency_rows

    times = {r.key: r.time for r in read_config_latency_rows(workdir / "latency_configs.csv")}
    return {(i, j): times[i, j, c] for (i, j), c in chosen.items()}


def pruning_lines(workdir: Path) -> list[str]:
    """With layer pruning: the configuration tables' sizes and what the importance one cost
    (fine-tunes × steps); nothing for a run without them."""
    from .tables import read_config_importance_rows, read_config_latency_rows

    lat, imp = workdir / "latency_configs.csv", workdir / "importance_configs.csv"
    if not (lat.is_file() and imp.is_file()):
        return []
    rows = read_config_importance_rows(imp)
    steps = sorted({r.steps for r in rows})
    return [
        f"- layer pruning tables: {len(read_config_latency_rows(lat))} configuration latency "
        f"rows (`{lat.name}`), {len(rows)} configuration importance entries (`{imp.name}`) "
        f"from {sum(r.tried for r in rows)} fine-tunes × {'/'.join(map(str, steps)) or 0} steps"
    ]


NORM_WORDS = {
    "single": " (scores normalised as the paper does: h − α·mean of the re-initialised "
    "single-conv scores)",
    "delta": " (scores normalised by delta: a kept conv 0, every change its measured "
    "held-out accuracy change, so Σ importance estimates the loss in points)",
}
"""How ``plan.json``'s ``norm`` reads in the report."""


def write_report(
    workdir: str | Path, *, chain: ConvChain, latency: LatencyTable, opt: OptimalLatencyTable
) -> Path:
    """Write ``report.md`` (and ``front.png``, ``blocks.png``, ``accuracy_latency.png`` when
    matplotlib is installed) from the files of a finished ``compress`` run in ``workdir``."""
    wd = Path(workdir)
    run = json.loads((wd / "run.json").read_text())
    stages = json.loads((wd / "stages.json").read_text())
    plan = json.loads((wd / "plan.json").read_text())
    evaluation = json.loads((wd / "evaluation.json").read_text())
    ident = run["identity"]
    kept = set(plan["activations"])
    bounds = sorted(set(plan["boundaries"]) | {chain.num_positions})
    blocks = list(zip([0, *bounds[:-1]], bounds, strict=True))

    lines = [f"# depthcompress report: {ident['model']}", ""]
    lines += _md_table(("", "original", "compressed", "change"), summary_rows(evaluation))
    lines.append("")
    lines += speedup_section(evaluation, plan)
    control = control_lines(evaluation)
    if control:
        lines += ["## Control", "", control[0], ""]
        lines += [f"**{w}**" for w in control[1:]] + ([""] if control[1:] else [])
    lines += search_section(wd)
    lines += width_section(evaluation)
    title = f"{ident['model']}: accuracy against measured latency"
    points = latency_points(evaluation)
    path = wd / "accuracy_latency.png"
    if plot_accuracy_latency(path, points, title=title, accuracy=evaluation["test_set"]):
        lines += ["![accuracy against measured latency](accuracy_latency.png)", ""]
    requested = plan.get("requested_budget", plan["budget"])
    substituted = (
        f" The budget asked for, {requested:.4f} ms, is below the fastest plan, which was taken "
        "instead (budget_or_fastest, the demo's setting)."
        if requested < plan["budget"] - 1e-12
        else ""
    )
    lines += [
        "## Plan",
        "",
        f"Budget {plan['budget_spec']} = **{plan['budget']:.4f} ms** (table units; the fastest "
        f"plan the tables allow is {plan['fastest_latency']:.4f} ms).{substituted} Chosen plan: "
        f"Σ T_opt = {plan['latency']:.4f} ms, Σ importance = {plan['importance']:.4f}"
        f"{NORM_WORDS.get(plan.get('norm', 'single'), '')}.",
        "",
    ]
    removable = chain.activation_positions
    removed = sorted(set(removable) - kept)
    inserted = sorted(kept - set(removable))
    lines += [
        f"- kept activations ({len(kept)}): {', '.join(map(str, sorted(kept))) or 'none'}",
        f"- removed activations ({len(removed)} of {len(removable)}): "
        f"{', '.join(map(str, removed)) or 'none'}",
    ]
    if inserted:
        lines.append(f"- activations added at linear positions: {', '.join(map(str, inserted))}")
    pruned = frozenset(plan.get("pruned", ()))
    if pruned:
        names = ", ".join(f"{p} ({chain.positions[p].conv})" for p in sorted(pruned))
        lines.append(f"- pruned convolutions, layer pruning ({len(pruned)}): {names}")
    lines += pruning_lines(wd)
    config_time = block_config_times(wd, plan)
    lines += [
        f"- {chain.num_positions} convolutions of the chain → {len(blocks)} "
        f"(chain positions 0..{chain.num_positions}; stem/head outside the chain are unchanged)",
        "",
    ]
    rows, plot_rows = [], []
    for i, j in blocks:
        g = chain.geometry(i, j, pruned)
        before = sum(latency.time_of(k, k + 1) for k in range(i, j))
        after = config_time.get((i, j), latency.time_of(i, j))
        names = [chain.positions[k].conv or "?" for k in range(i + 1, j + 1)]
        convs = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)})"
        groups = "dw" if g.groups == g.in_channels and g.groups > 1 else str(g.groups)
        rows.append(
            (
                f"({i}, {j})",
                convs,
                f"{g.kernel[0]}×{g.kernel[1]}",
                _pair(g.stride),
                groups,
                "yes" if j in kept else "no",
                f"{before:.4f}",
                f"{after:.4f}",
            )
        )
        if j - i > 1 or (i, j) in config_time:
            plot_rows.append((f"({i},{j})", before, after))
    lines += _md_table(
        (
            "block",
            "convs merged",
            "kernel",
            "stride",
            "groups",
            "act. after",
            "T before",
            "T after",
        ),
        rows,
    )
    lines.append("")
    if plot_front(wd / "front.png", read_front_csv(wd / "front.csv"), plan=plan):
        lines += ["![latency vs importance: Pareto front and the chosen plan](front.png)", ""]
    if plot_rows and _plot_blocks(wd / "blocks.png", plot_rows):
        lines += ["![per-block latency before and after merging](blocks.png)", ""]
    tune = stages.get("finetune", {})
    if tune.get("history"):
        cfg = tune["settings"]["finetune"]
        probed = ", chosen by the lr probe" if "lr_probe" in tune["settings"] else ""
        lines += [
            "## Fine-tuning of the linearized network",
            "",
            f"{cfg['epochs']} epoch(s), {cfg['optimizer']}, lr {tune.get('lr', cfg['lr']):g} "
            f"(cosine{probed}), batch "
            f"{cfg['batch_size']}, distillation weight {cfg['distill']:g}; the last epoch is "
            "merged.",
            "",
        ]
        lines += _md_table(
            ("epoch", "train loss", "held-out acc (%)", "seconds"),
            (
                (
                    str(h["epoch"]),
                    f"{h['loss']:.4f}",
                    _fmt(h["accuracy"], ".2f"),
                    f"{h['seconds']:.0f}",
                )
                for h in tune["history"]
            ),
        )
        lines.append("")
    merge = stages.get("merge", {})
    if "error" in merge:
        lines += [
            "## Checks",
            "",
            f"- merged vs fine-tuned linearized network on test images: max error "
            f"{merge['error']:.2e} of the output scale (limit 1e-4)",
            f"- ONNX Runtime vs PyTorch (merged.onnx): {merge['onnx_error']:.2e}",
            "",
        ]
    lines += ["## How this was produced", "", "```"]
    lines += [c["command"] for c in run.get("commands", [])]
    lines += ["```", ""]
    b = evaluation["backend"]
    lines.append(
        f"Backend {b['name']} {b.get('version', '')} on {b.get('device', '')}, "
        f"{b.get('threads', '-')} threads; input {tuple(evaluation['input_shape'])}."
    )
    vers = ", ".join(f"{k} {v}" for k, v in evaluation["versions"].items() if v)
    lines.append(f"Versions: {vers}.")
    m = evaluation.get("machine", {})
    if m:
        lines.append(f"Machine: {', '.join(f'{k} {v}' for k, v in m.items())}.")
    lines += [
        "",
        "Files: `latency.csv`, `opt_latency.csv`, `importance.csv` (tables), `plan.json`, "
        "`front.csv`, `finetuned.pt` (fine-tuned linearized weights), `merged.pt` (loads with "
        "`torch.load(path, weights_only=False)`, no depthcompress needed), `merged.onnx`, "
        "`evaluation.json`, `stages.json` (settings of each stage).",
        "",
    ]
    path = wd / "report.md"
    with atomic_open(path) as fh:
        fh.write("\n".join(lines))
    return path
