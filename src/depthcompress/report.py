"""Human-readable views of the pipeline's data: tables a person can look at."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import Progress
from rich.table import Table

from .progress import LOG, Step

if TYPE_CHECKING:
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
    drawn on ``console`` (rich's default console when None)."""
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
    where = f"{backend['name']} {backend.get('device', '')}, batch {evaluation['batch']}".strip()
    return [
        (
            f"accuracy ({evaluation['test_set']}, %)",
            _fmt(a["accuracy"], ".2f"),
            _fmt(b["accuracy"], ".2f"),
            _change(a["accuracy"], b["accuracy"], ".2f", " pp"),
        ),
        (
            f"latency ({where}, ms)",
            f"{a['latency']:.4f}",
            f"{b['latency']:.4f}",
            f"{evaluation['speedup']:.2f}× "
            + ("faster" if evaluation["speedup"] >= 1 else "(slower)"),
        ),
        ("depth (convolutions)", str(a["depth"]), str(b["depth"]), f"{b['depth'] - a['depth']:+d}"),
        ("parameters", f"{a['params']:,}", f"{b['params']:,}", f"{b['params'] / a['params']:.2f}×"),
    ]


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


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib is not
    installed (plots are optional: ``pip install depthcompress[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot_front(path: Path, front: list[tuple[float, float]], plan: dict[str, Any]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if front:
        pts = [*front, (max(plan["original_latency"], front[-1][0]), front[-1][1])]
        ax.step(*zip(*pts, strict=True), where="post", color="0.45", label="Pareto front")
    ax.plot(plan["latency"], plan["importance"], "o", color="C3", ms=8, label="chosen plan")
    ax.axvline(plan["budget"], color="C3", ls="--", lw=1, label=f"budget {plan['budget_spec']}")
    ax.axvline(plan["original_latency"], color="0.3", ls=":", lw=1, label="original")
    ax.set_xlabel("latency Σ T_opt of the chain (ms, latency-table units)")
    ax.set_ylabel("summed importance Σ I")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_blocks(path: Path, rows: list[tuple[str, float, float]]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.0))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="before (separate convs)")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="after (merged block)")
    ax.set_xticks(list(xs), [r[0] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("latency-table time (ms)")
    ax.set_title("per-block latency before and after merging", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _read_front(path: Path) -> list[tuple[float, float]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()[1:]
    return [(float(a), float(b)) for a, b in (line.split(",") for line in lines if line)]


def write_report(
    workdir: str | Path, *, chain: ConvChain, latency: LatencyTable, opt: OptimalLatencyTable
) -> Path:
    """Write ``report.md`` (and ``front.png``, ``blocks.png`` when matplotlib is installed) from
    the files of a finished ``compress`` run in ``workdir``."""
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
    pred = evaluation["predicted_speedup"]
    lines += [
        "",
        f"The latency table predicted a chain speed-up of {pred:.2f}× (Σ T of the original "
        f"chain {plan['original_latency']:.4f} ms → Σ T_opt {plan['latency']:.4f} ms); the "
        f"whole network measured {evaluation['speedup']:.2f}×. Latency is the best of two "
        "alternating median measurements of each network.",
        "",
        "## Plan",
        "",
        f"Budget {plan['budget_spec']} = **{plan['budget']:.4f} ms** (table units; the fastest "
        f"plan the tables allow is {plan['fastest_latency']:.4f} ms). Chosen plan: Σ T_opt = "
        f"{plan['latency']:.4f} ms, Σ importance = {plan['importance']:.4f}.",
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
    lines += [
        f"- {chain.num_positions} convolutions of the chain → {len(blocks)} "
        f"(chain positions 0..{chain.num_positions}; stem/head outside the chain are unchanged)",
        "",
    ]
    rows, plot_rows = [], []
    for i, j in blocks:
        g = chain.geometry(i, j)
        before = sum(latency.time_of(k, k + 1) for k in range(i, j))
        after = latency.time_of(i, j)
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
        if j - i > 1:
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
    if _plot_front(wd / "front.png", _read_front(wd / "front.csv"), plan):
        lines += ["![latency vs importance: Pareto front and the chosen plan](front.png)", ""]
    if plot_rows and _plot_blocks(wd / "blocks.png", plot_rows):
        lines += ["![per-block latency before and after merging](blocks.png)", ""]
    tune = stages.get("finetune", {})
    if tune.get("history"):
        cfg = tune["settings"]["finetune"]
        lines += [
            "## Fine-tuning of the linearized network",
            "",
            f"{cfg['epochs']} epoch(s), {cfg['optimizer']}, lr {cfg['lr']:g} (cosine), batch "
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
    path.write_text("\n".join(lines))
    return path
