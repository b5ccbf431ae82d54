"""Human-readable views of the pipeline's data: tables a person can look at."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.progress import Progress
from rich.table import Table

if TYPE_CHECKING:
    from .graph import ConvChain


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


def progress_bar(*extra: str) -> Progress:
    """The progress bar every long stage shows: description, bar, done/total, elapsed, ETA,
    then ``extra`` text columns (format strings over the task, e.g. ``"{task.fields[block]}"``)."""
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
    )
