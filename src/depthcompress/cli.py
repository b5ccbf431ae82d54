"""The ``depthcompress`` command line. Torch is imported lazily, so table/DP commands start fast."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import DepthCompressError

app = typer.Typer(
    help="Make a trained CNN shallower and faster: latency-aware depth compression "
    "(Kim et al., ICML 2023).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 160)


@app.callback()
def main() -> None:
    """Trace, measure, solve, fine-tune and merge: see each command's --help."""


def fail(exc: DepthCompressError) -> typer.Exit:
    """Print a depthcompress error as one clear line and return the exit to raise."""
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=2)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a shape like 1,3,224,224") from None
    if len(shape) != 4 or min(shape) <= 0:
        raise typer.BadParameter(f"{text!r} must be four positive sizes N,C,H,W")
    return shape


@app.command()
def inspect(
    model: Annotated[
        str, typer.Argument(help="torchvision:NAME (random weights) or path/to/file.py:factory")
    ],
    input_shape: Annotated[
        str, typer.Option("--input-shape", help="example input N,C,H,W")
    ] = "1,3,224,224",
    mode: Annotated[
        str, typer.Option(help="valid-block rule: 'general' or 'reference' (paper's stride rule)")
    ] = "general",
    max_kernel_size: Annotated[
        int, typer.Option(help="largest merged kernel allowed in a block (0 = no limit)")
    ] = 15,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="module name to keep out of the chain (repeatable), e.g. the stem"),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the chain as JSON to this file")
    ] = None,
) -> None:
    """Trace MODEL and print its convolution positions, activations, residuals and block count."""
    from .graph import trace
    from .modelspec import load_model
    from .report import chain_table

    try:
        net = load_model(model)
        import torch

        chain = trace(
            net,
            torch.randn(_parse_shape(input_shape)),
            mode=mode,
            max_kernel_size=max_kernel_size or None,
            exclude=exclude or (),
        )
    except DepthCompressError as exc:
        raise fail(exc) from None
    console.print(chain_table(chain, title=model))
    for pos, why in chain.barriers.items():
        console.print(f"  boundary {pos}: {why}", highlight=False)
    for r in chain.residuals:
        if not r.fusable:
            console.print(f"  residual ({r.start}, {r.end}) stays explicit: {r.reason}")
    console.print(
        f"{chain.num_positions} positions, {len(chain.activation_positions)} removable "
        f"activations, {len(chain.residuals)} residuals, {len(chain.barriers)} hard boundaries, "
        f"[bold]{len(chain.blocks)} mergeable blocks[/] (mode={chain.mode}, "
        f"max kernel={chain.max_kernel_size or 'none'})"
    )
    if json_out is not None:
        json_out.write_text(chain.to_json())
        console.print(f"chain written to {json_out}")
