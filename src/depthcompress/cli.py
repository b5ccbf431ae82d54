"""The ``depthcompress`` command line. Torch is imported lazily, so table/DP commands start fast."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from .defaults import FINETUNE_LR, NO_REDUCIBLE
from .errors import BudgetError, DepthCompressError

app = typer.Typer(
    help="Make a trained CNN shallower and faster: latency-aware depth compression "
    "(Kim et al., ICML 2023).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# not a terminal (a log, a pipe, CI): tables 160 wide, and lines never wrapped, so that paths and
# the summary stay whole for grep
console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=not sys.stdout.isatty())


@app.callback()
def main() -> None:
    """Trace, measure, solve, fine-tune and merge: see each command's --help."""


# The chain options every command that traces a model takes.
ModeOption = Annotated[
    str, typer.Option(help="valid-block rule: 'general' or 'reference' (paper's stride rule)")
]
MaxKernelOption = Annotated[
    int, typer.Option(help="largest merged kernel allowed in a block (0 = no limit)")
]
ExcludeOption = Annotated[
    list[str] | None,
    typer.Option(help="module name to keep out of the chain (repeatable), e.g. the stem"),
]
# the model and data options of the commands that train (train, importance, compress)
ModelArgument = Annotated[
    str,
    typer.Argument(
        help="depthcompress:NAME (fashion_mbv2, cifar_mbv2, resnet20), torchvision:NAME or "
        "path/to/file.py:factory"
    ),
]
DataOption = Annotated[
    str,
    typer.Option(
        help="'fashion-mnist', 'cifar10' (the shared JPEG archive, extracted once into the "
        "cache) or an ImageFolder directory (train/ is used, val/ or test/ tests)"
    ),
]
WeightsOption = Annotated[
    Path | None, typer.Option(help="trained weights: a state_dict saved with torch.save")
]
HoldoutOption = Annotated[
    int, typer.Option(help="training examples held out (never trained on) to score importance")
]
HoldoutSeedOption = Annotated[int, typer.Option(help="seed choosing the held-out examples")]
NormOption = Annotated[
    str,
    typer.Option(
        help="how stage 2 normalises scores: 'single' (the paper: h - alpha * mean of the "
        "re-initialised single-conv scores), 'delta' (a kept conv scores 0, the rest their "
        "raw h: the original network is the best plan until the budget forces a change), "
        "'auto' (delta with --prune-layers, else single; docs/layermerge.md)"
    ),
]
# every command that runs torch on a device takes it in one form (devices.resolve_device)
DeviceOption = Annotated[
    str | None,
    typer.Option(help="cpu, cuda (the current or LOCAL_RANK GPU) or cuda:N; default: GPU if any"),
]
ImageSizeOption = Annotated[
    int | None, typer.Option(help="ImageFolder: resize + crop to this size (default: as they are)")
]
GradClipOption = Annotated[
    float | None,
    typer.Option(help="clip the gradient norm to this value (a cure for a NaN loss; default off)"),
]
AmpOption = Annotated[
    str | None,
    typer.Option(
        help="automatic mixed precision of fine-tuning: bf16 (CUDA, or CPU where it is fast) or "
        "fp16 (CUDA only, with gradient scaling); default off (float32)"
    ),
]
# training threads (torch, per process) apart from --threads, the timing (deployment) threads
TrainThreadsOption = Annotated[
    int,
    typer.Option(
        help="torch CPU threads of each training process (default 1: more collapse when "
        "another process competes for the cores; a setting, as it changes CPU results in the "
        "last bits)"
    ),
]
TimingThreadsOption = Annotated[
    int | None,
    typer.Option(
        help="CPU threads of the latency backend: the deployment's (default: all cores); "
        "training threads are --train-threads"
    ),
]
DemoThreadsOption = Annotated[
    int | None,
    typer.Option(
        help="CPU threads of the latency backend (default 1: stable on a shared machine, where "
        "2-thread timings are bimodal; 0 or less: all cores)"
    ),
]
LoaderWorkersOption = Annotated[
    int | None,
    typer.Option(
        help="DataLoader processes reading an ImageFolder during fine-tuning (default: "
        "min(4, cores) on CUDA, 0 on the CPU)"
    ),
]


def fail(exc: DepthCompressError) -> typer.Exit:
    """Print a depthcompress error as one clear line and return the exit to raise."""
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    return typer.Exit(code=2)


def _interrupted(where: str) -> typer.Exit:
    """Say where an interrupted resumable command stands; exit 130 (the shell's Ctrl-C code)."""
    console.print(
        f"[bold yellow]interrupted:[/] {where}; run the same command again to resume",
        highlight=False,
    )
    return typer.Exit(code=130)


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
    mode: ModeOption = "general",
    max_kernel_size: MaxKernelOption = 15,
    exclude: ExcludeOption = None,
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


def _load_model_with_weights(spec: str, weights: Path | None):  # returns an nn.Module
    """MODEL as ``depthcompress:NAME`` (built-in) or anything ``inspect`` takes, then weights."""
    from .errors import ModelSpecError

    if spec.startswith("depthcompress:"):
        from .models import get_model

        net = get_model(spec.partition(":")[2])
    else:
        from .modelspec import load_model

        net = load_model(spec)
    if weights is not None:
        import torch

        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            net.load_state_dict(state)
        except Exception as exc:
            raise ModelSpecError(
                f"loading weights {weights} into {spec} failed: {type(exc).__name__}: {exc}"
            ) from None
    return net


def _command_line() -> str:
    """The command that is running, for records a person can re-run."""
    import shlex

    return " ".join(shlex.quote(a) for a in ["depthcompress", *sys.argv[1:]])


@app.command("train")
def train_cmd(
    model: ModelArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="trained weights (state_dict)")],
    data: DataOption = "fashion-mnist",
    epochs: Annotated[int, typer.Option(help="passes over the training data")] = 10,
    lr: Annotated[float, typer.Option(help="peak learning rate (cosine decay to 0)")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="global batch size")] = 128,
    optimizer: Annotated[str, typer.Option(help="'sgd' (Nesterov) or 'adamw'")] = "sgd",
    weight_decay: Annotated[float, typer.Option(help="weight decay")] = 4e-5,
    grad_clip: GradClipOption = None,
    holdout: HoldoutOption = 10000,
    holdout_seed: HoldoutSeedOption = 0,
    seed: Annotated[int, typer.Option(help="seed of the initialisation and batch order")] = 0,
    image_size: ImageSizeOption = None,
    channels: Annotated[int, typer.Option(help="ImageFolder: 3 (RGB) or 1 (grayscale)")] = 3,
    device: DeviceOption = None,
    amp: AmpOption = None,
    loader_workers: LoaderWorkersOption = None,
    train_threads: TrainThreadsOption = 1,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train MODEL from scratch on DATA (minus the held-out split); resumable, torchrun-ready.

    Checkpoints go to OUTPUT.ckpt/ after every epoch, so an interrupted run resumes where it
    stopped. The weights and a JSON record (command, accuracy, versions) are written at the end.
    """
    import json
    import os
    import time

    import torch

    from .data import load_split, load_test
    from .devices import resolve_device
    from .finetune import FinetuneConfig, end_distributed, evaluate, finetune
    from .report import RichProgress

    checkpoints = output.with_name(output.name + ".ckpt")
    try:
        resolve_device(device)  # a device that is not there fails before the data loads
        torch.manual_seed(seed)  # the initialisation
        net = _load_model_with_weights(model, None)
        split = load_split(
            data, holdout=holdout, seed=holdout_seed, image_size=image_size, channels=channels
        )
        test = load_test(data, image_size=image_size, channels=channels)
        config = FinetuneConfig(
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            optimizer=optimizer,  # type: ignore[arg-type]
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            seed=seed,
            amp=amp,  # type: ignore[arg-type]
            num_workers=loader_workers,
            threads=train_threads,
        )
        start = time.perf_counter()
        main_rank = int(os.environ.get("RANK", "0") or 0) == 0  # under torchrun rank 0 draws
        with RichProgress(console, enabled=progress and main_rank) as reporter:
            result = finetune(
                net,
                split.train,
                config,
                checkpoint_dir=checkpoints,
                holdout_data=split.holdout,
                progress=reporter,
                device=device,
            )
        seconds = time.perf_counter() - start
        end_distributed()
        if not main_rank:  # under torchrun only rank 0 writes
            return
        held = result.history[-1].accuracy
        test_acc = evaluate(net, test, amp=amp) if test is not None else None
    except DepthCompressError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        raise _train_interrupted(checkpoints, epochs) from None
    net = net.cpu().to(memory_format=torch.contiguous_format)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), output)
    record = {
        "command": _command_line(),
        "model": model,
        "data": split.info,
        "config": config.to_dict(),
        "holdout_accuracy": held,
        "test_accuracy": test_acc,
        "seconds": round(seconds, 1),
        "resumed_epochs": result.resumed_epochs,
        "epochs_run": len(result.history) - result.resumed_epochs,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    output.with_name(output.name + ".json").write_text(json.dumps(record, indent=1) + "\n")
    test_text = f", test {test_acc:.2f} %" if test_acc is not None else ""
    ran, resumed = len(result.history) - result.resumed_epochs, result.resumed_epochs
    done = f"{ran} epoch(s) in {seconds:.0f} s"
    if resumed:
        done += f" after resuming from epoch {resumed} ({len(result.history)} epochs in all)"
    console.print(
        f"trained {model} for {done}: held-out {held:.2f} %{test_text}; weights in {output} "
        f"(record in {output}.json)",
        highlight=False,
    )


def _train_interrupted(checkpoints: Path, epochs: int) -> typer.Exit:
    """Say where an interrupted ``train`` stands and how to resume; the exit to raise (130)."""
    from .errors import FinetuneError
    from .finetune import LAST, load_checkpoint

    last = checkpoints / LAST
    try:
        ckpt = load_checkpoint(last) if last.is_file() else {}
        done, step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
    except (FinetuneError, KeyError, TypeError, ValueError):
        done, step = 0, 0
    if step:
        text = (
            f"in epoch {done + 1} of {epochs}; its first {step} steps are saved in {last}; run "
            "the same command to resume from there"
        )
    elif not done:
        text = "before the first epoch finished; nothing was saved; run the same command to start"
    elif done < epochs:
        text = (
            f"in epoch {done + 1} of {epochs}; the last finished epoch ({done}) is saved in "
            f"{last}; run the same command to resume"
        )
    else:
        text = f"after the last epoch (saved in {last}); run the same command to finish"
    console.print(f"[bold yellow]interrupted[/] {text}", highlight=False)
    return typer.Exit(code=130)


@app.command("importance")
def importance_cmd(
    model: ModelArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="importance table (CSV)")],
    data: DataOption = "fashion-mnist",
    weights: WeightsOption = None,
    steps: Annotated[
        int, typer.Option(help="fine-tuning steps per entry (fewer = cheaper estimate)")
    ] = 100,
    lr: Annotated[float, typer.Option(help="peak learning rate (cosine decay to 0)")] = 0.05,
    grad_clip: GradClipOption = None,
    batch_size: Annotated[int, typer.Option(help="fine-tuning batch size")] = 128,
    holdout: HoldoutOption = 10000,
    holdout_seed: HoldoutSeedOption = 0,
    seed: Annotated[int, typer.Option(help="seed of re-initialisation and batch order")] = 0,
    zero_shot: Annotated[
        bool, typer.Option(help="score without fine-tuning (accuracy drop only; fast)")
    ] = False,
    shard: Annotated[
        str | None, typer.Option(help="K/N: compute only the K-th of N disjoint parts")
    ] = None,
    executor: Annotated[str, typer.Option(help="'local' or 'ray'")] = "local",
    workers: Annotated[
        int,
        typer.Option(
            help="local worker processes of --train-threads each (fewer when workers × threads "
            "would exceed the cores)"
        ),
    ] = 1,
    train_threads: TrainThreadsOption = 1,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster, e.g. 'auto' or ray://HOST:10001 (default: a new local one)"
        ),
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="example input N,C,H,W (default: data's)")
    ] = None,
    image_size: ImageSizeOption = None,
    mode: ModeOption = "general",
    max_kernel_size: MaxKernelOption = 15,
    exclude: ExcludeOption = None,
    all_flags: Annotated[
        bool, typer.Option(help="measure every flag combination, not the reference's subset")
    ] = False,
    device: Annotated[
        str,
        typer.Option(
            help="fine-tuning device: cpu, cuda (current or LOCAL_RANK GPU), cuda:N; on a GPU "
            "the entries run one after another (--device cuda with --workers k: one worker "
            "per GPU)"
        ),
    ] = "cpu",
    amp: AmpOption = None,
    loader_workers: Annotated[
        int,
        typer.Option(
            help="DataLoader processes per entry reading an ImageFolder (started anew for each "
            "entry, so worth it only for long entries)"
        ),
    ] = 0,
    download: Annotated[
        bool, typer.Option(help="download Fashion-MNIST with torchvision if it is not installed")
    ] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    prune_layers: Annotated[
        bool,
        typer.Option(
            help="also score every layer-pruning configuration of every entry into "
            "OUTPUT_configs.csv beside the table (one process; not with --shard or ray)"
        ),
    ] = False,
    prune_subsets: PruneSubsetsOption = 2,
) -> None:
    """Measure the importance table: fine-tune and score the network once per extended block."""
    import time

    from .data import load_split, sample_shape
    from .devices import resolve_device
    from .graph import trace
    from .importance import (
        FinetuneSettings,
        config_importance_table,
        importance_table,
        parse_shard,
    )
    from .report import RichProgress

    if prune_layers and (shard or executor != "local"):
        raise typer.BadParameter(
            "--prune-layers makes its configuration table in one local process: "
            "without --shard and --executor ray"
        )
    try:
        device = str(resolve_device(device))
        net = _load_model_with_weights(model, weights)
        channels = _parse_shape(input_shape)[1] if input_shape else 3
        split = load_split(
            data,
            holdout=holdout,
            seed=holdout_seed,
            image_size=image_size,
            channels=channels,
            download=download,
        )
        import torch

        shape = _parse_shape(input_shape) if input_shape else (1, *sample_shape(split.holdout))
        chain = trace(
            net,
            torch.randn(shape),
            mode=mode,
            max_kernel_size=max_kernel_size or None,
            exclude=exclude or (),
        )
        settings = FinetuneSettings(
            steps=0 if zero_shot else steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            exclude_zeros=not all_flags,
            amp=amp,
            loader_workers=loader_workers,
            grad_clip=grad_clip,
            threads=train_threads,
        )
        start = time.perf_counter()
        with RichProgress(console, enabled=progress) as reporter:
            result = importance_table(
                net,
                chain,
                split,
                output,
                settings=settings,
                shard=parse_shard(shard) if shard else None,
                executor=executor,
                workers=workers,
                ray_address=ray_address,
                device=device,
                progress=reporter,
                model_name=model,
                log=_note,
            )
    except DepthCompressError as exc:
        raise fail(exc) from None
    base = result.meta["base"]["val_acc"]
    console.print(
        f"{len(result.rows)} rows in {output} ({result.computed} computed, {result.skipped} "
        f"already there) in {time.perf_counter() - start:.1f} s; unmodified network: "
        f"{base:.2f} % on {holdout} held-out training examples (sidecar {output}.json)"
    )
    if prune_layers and _reducible_or_say(chain):
        job = functools.partial(
            config_importance_table, net, chain, split, configs_path(output), settings=settings
        )
        _config_importance(job, prune_subsets, device, model, progress)


def _note(message: str) -> None:
    """A library message, printed as a note."""
    console.print(f"note: {message}", highlight=False, markup=False)


def _config_importance(
    job: Callable[..., Any], subsets: int, device: str, model: str, progress: bool
) -> None:
    """Compute or resume a configuration importance table and say what it holds and cost."""
    import time

    from .report import RichProgress

    start = time.perf_counter()
    try:
        with RichProgress(console, enabled=progress) as reporter:
            result = job(
                subsets=subsets, device=device, progress=reporter, model_name=model, log=_note
            )
    except DepthCompressError as exc:
        raise fail(exc) from None
    console.print(
        f"{len(result.rows)} configuration rows (layer pruning) in {result.path} "
        f"({result.computed} computed with {result.finetunes} fine-tunes, {result.skipped} "
        f"already there) in {time.perf_counter() - start:.1f} s",
        highlight=False,
    )


@app.command("importance-merge")
def importance_merge_cmd(
    parts: Annotated[list[Path], typer.Argument(help="shard tables written with --shard K/N")],
    output: Annotated[Path, typer.Option("--output", "-o", help="merged table (CSV)")],
    allow_missing: Annotated[
        bool, typer.Option(help="write the table even if some entries are in no part")
    ] = False,
) -> None:
    """Join importance tables of disjoint shards; refuses overlapping or incompatible parts."""
    from .importance import merge_tables

    try:
        meta, rows = merge_tables(parts, output, allow_missing=allow_missing)
    except DepthCompressError as exc:
        raise fail(exc) from None
    console.print(
        f"{len(rows)} of {meta['entries']['count']} entries from {len(parts)} parts "
        f"written to {output}"
    )


def _trace_for_cli(
    model: str, input_shape: tuple[int, ...], mode: str, max_kernel_size: int, exclude: list[str]
):  # returns (nn.Module, ConvChain)
    """Load MODEL like ``importance`` does and trace it with the ``inspect`` flags."""
    import torch

    from .graph import trace

    net = _load_model_with_weights(model, None)
    chain = trace(
        net,
        torch.randn(input_shape),
        mode=mode,
        max_kernel_size=max_kernel_size or None,
        exclude=exclude,
    )
    return net, chain


@app.command("latency")
def latency_cmd(
    model: Annotated[
        str,
        typer.Argument(
            help="torchvision:NAME, depthcompress:NAME or path/to/file.py:factory; with --whole "
            "also path/to/model.onnx"
        ),
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="latency table to write or resume (CSV)")
    ] = None,
    whole: Annotated[
        bool, typer.Option("--whole", help="time the whole network instead of building a table")
    ] = False,
    backend: Annotated[
        str, typer.Option(help="onnxruntime (default), torch, openvino or tensorrt")
    ] = "onnxruntime",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: all cores of this machine)")
    ] = None,
    batch: Annotated[
        int | None, typer.Option(help="batch size (default: N of --input-shape)")
    ] = None,
    warmup: Annotated[int, typer.Option(help="untimed runs before timing")] = 10,
    reps: Annotated[int, typer.Option(help="timed runs (at most)")] = 100,
    min_reps: Annotated[int, typer.Option(help="timed runs (at least)")] = 10,
    max_time: Annotated[
        float, typer.Option(help="seconds per measurement after which timing stops (≥ min-reps)")
    ] = 1.0,
    statistic: Annotated[
        str,
        typer.Option(help="table 'time': median, mean, min, p10 or p25 of the timed runs"),
    ] = "median",
    passes: Annotated[
        int,
        typer.Option(
            help="sweep the table this many times, pass 1 over all blocks, then pass 2...; each "
            "row is the median of its passes"
        ),
    ] = 3,
    extra_passes: Annotated[
        int,
        typer.Option(
            help="passes added, one at a time, to rows whose pass-to-pass spread exceeds 15 %"
        ),
    ] = 4,
    seed: Annotated[int, typer.Option(help="seed of the random block weights")] = 0,
    device: Annotated[
        str | None,
        typer.Option(
            help="where torch/tensorrt time: cpu, cuda (current or LOCAL_RANK GPU) or cuda:N "
            "(default: cpu for torch, the GPU for tensorrt; onnxruntime and openvino: cpu only)"
        ),
    ] = None,
    precision: Annotated[str, typer.Option(help="openvino: f32, bf16 or f16")] = "f32",
    fp16: Annotated[bool, typer.Option(help="tensorrt: build fp16 engines")] = False,
    force: Annotated[
        bool, typer.Option(help="discard an existing table at -o and start over")
    ] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    input_shape: Annotated[
        str, typer.Option("--input-shape", help="example input N,C,H,W")
    ] = "1,3,224,224",
    mode: ModeOption = "general",
    max_kernel_size: MaxKernelOption = 15,
    exclude: ExcludeOption = None,
    prune_layers: Annotated[
        bool,
        typer.Option(
            help="also time every layer-pruning configuration T(i, j, c) of every block into "
            "OUTPUT_configs.csv beside the table (same backend, threads, batch, protocol)"
        ),
    ] = False,
) -> None:
    """Measure the latency table T(i, j) of MODEL's blocks (resumable), or with --whole the
    end-to-end latency of a network, on a real backend."""
    from .backends import Protocol, get_backend

    shape = _parse_shape(input_shape)
    shape = (batch or shape[0], *shape[1:])
    if not whole and output is None:
        raise typer.BadParameter("a table needs -o LATENCY.csv (or pass --whole)")
    try:
        runner = get_backend(
            backend,
            threads=threads,
            protocol=Protocol(
                warmup=warmup,
                reps=reps,
                min_reps=min_reps,
                max_time=max_time,
                statistic=statistic,
            ),
            device=device,
            precision=precision,
            fp16=fp16,
        )
        if whole:
            _latency_whole(model, runner, shape)
        else:
            _latency_table(
                model,
                runner,
                output,
                shape,
                (mode, max_kernel_size, exclude),
                seed,
                passes,
                extra_passes,
                force,
                progress,
                prune_layers,
            )
    except DepthCompressError as exc:
        raise fail(exc) from None


def _latency_whole(model: str, runner, shape: tuple[int, ...]) -> None:  # runner: Backend
    """Print the end-to-end latency of a module or an ONNX file."""
    target = Path(model) if model.endswith(".onnx") else _load_model_with_weights(model, None)
    timing = runner.measure(target, shape)
    info = runner.info()
    console.print(
        f"{model}: [bold]{timing.median:.3f} ms[/] median (mean {timing.mean:.3f}, stdev "
        f"{timing.stdev:.3f}, {timing.reps} runs) on {info['name']} {info['version']} "
        f"{info['device']}, {info.get('threads', '-')} threads, "
        + (f"{info['precision']}, " if "precision" in info else "")
        + f"input {shape}",
        highlight=False,
    )


def _latency_table(
    model: str,
    runner,  # Backend
    output: Path,
    shape: tuple[int, ...],
    chain_flags: tuple[str, int, list[str] | None],
    seed: int,
    passes: int,
    extra_passes: int,
    force: bool,
    progress: bool,
    prune_layers: bool = False,
) -> None:
    """Build or resume the latency table of MODEL at ``output`` (with ``prune_layers`` also its
    configuration table); a table measured on a machine too noisy to trust is followed by the
    library's warning."""
    from .latency import Robust, build_latency_table
    from .report import log_to_console

    mode, max_kernel_size, exclude = chain_flags
    _, chain = _trace_for_cli(model, (1, *shape[1:]), mode, max_kernel_size, exclude or [])
    log_to_console(console)
    build = functools.partial(
        build_latency_table,
        chain,
        runner,
        batch=shape[0],
        seed=seed,
        passes=passes,
        robust=Robust(max_extra=extra_passes),
        model_name=model,
        force=force,
    )
    result = _measured(build, output, progress)
    singles = sum(r.time for r in result.rows if r.end == r.st + 1)
    console.print(
        f"{len(result.rows)} of {len(chain.blocks)} blocks in {output} ({result.measured} "
        f"measured in {result.seconds:.1f} s, {result.skipped} already there); Σ single-conv "
        f"T = {singles:.3f} ms (batch {shape[0]}); settings in {output}.json",
        highlight=False,
    )
    _print_measurement(result.meta.get("measurement"))
    if prune_layers:  # with no reducible conv: an empty table, so solve says merging alone
        _reducible_or_say(chain)
        path = configs_path(output)
        result = _measured(functools.partial(build, configs=True), path, progress)
        console.print(
            f"{len(result.rows)} configurations (layer pruning) in {path} ({result.measured} "
            f"measured in {result.seconds:.1f} s, {result.skipped} already there)",
            highlight=False,
        )
        _print_measurement(result.meta.get("measurement"))


def _measured(build: Callable[..., Any], output: Path, progress: bool) -> Any:
    """``build(output, progress=...)`` under a progress bar; Ctrl-C says what was kept."""
    from .report import RichProgress

    try:
        with RichProgress(console, enabled=progress) as reporter:
            return build(output, progress=reporter)
    except KeyboardInterrupt:
        raise _interrupted(f"the rows measured so far are in {output}") from None


def configs_path(table: Path) -> Path:
    """Where a table's configuration table (layer pruning) lies by default: NAME_configs.csv."""
    return table.with_name(f"{table.stem}_configs{table.suffix}")


def _reducible_or_say(chain) -> bool:  # chain: ConvChain
    """Whether layer pruning can remove a conv of ``chain``; if not, say so (merging alone)."""
    from .pruning import reducible

    if reducible(chain):
        return True
    console.print(NO_REDUCIBLE, highlight=False)
    return False


def _print_measurement(measurement: dict | None) -> None:
    """The spread of a table's passes and the load it was measured under (sidecar's record)."""
    if not measurement:
        return
    spread = measurement["spread"]
    text = (
        f"pass-to-pass spread median {100 * spread['median']:.1f} %, worst "
        f"{100 * spread['worst']:.1f} % {tuple(spread['worst_block'])}, "
        f"{spread['remeasured']} rows re-measured; "
        if spread["median"] is not None
        else ""
    )
    start, end = measurement["load_start"][0], measurement["load_end"][0]
    console.print(
        f"{text}load average {start:.2f} → {end:.2f} on {measurement['cores']} cores",
        highlight=False,
    )


# ---------------------------------------------------------------------------------------------
# the two-stage DP over tables (issue 4): numpy only, no torch


def _parse_budgets(text: str) -> tuple:  # tuple[dp.Budget, ...]
    """``--budget`` of solve: the syntax of ``dp.Budget.parse_many`` (ms or fractions ``0.7x``)."""
    from .dp import Budget

    try:
        return Budget.parse_many(text)
    except BudgetError as exc:
        raise typer.BadParameter(
            f"{exc} (a sweep is 18:30:0.5 or 0.5x:0.9x:0.1x, a list 18,20,25 or 0.6x,0.7x)",
            param_hint="'--budget'",
        ) from None


def _positions(values: frozenset[int]) -> str:
    return " ".join(str(p) for p in sorted(values)) or "-"


def _print_solution(sol, score: str, norm_label: str) -> None:  # sol: dp.Solution
    from rich.table import Table

    table = Table(title="segments (stage 2)", header_style="bold")
    for col in ("segment", "flags", "T_opt (ms)", "importance", "merged blocks (breaks)"):
        table.add_column(
            col, justify="left" if col in ("segment", "merged blocks (breaks)") else "right"
        )
    for s in sol.segments:
        table.add_row(
            f"{s.st}→{s.end}",
            f"{s.st_act}→{s.end_act}",
            f"{s.t_opt:.4f}",
            f"{s.importance:+.4f}",
            ",".join(map(str, s.breaks)),
        )
    console.print(table)
    plan = sol.plan
    console.print(f"kept activations A ({len(plan.activations)}): {_positions(plan.activations)}")
    console.print(
        f"boundaries S ({len(plan.boundaries)} merged blocks): {_positions(plan.boundaries)}"
    )
    sign = "≤" if sol.within_budget else "[bold red]>[/]"
    console.print(
        f"latency Σ T_opt = {sol.latency:.4f} ms {sign} budget {sol.budget:g} ms "
        f"({100 * sol.latency / sol.budget:.1f} % used); importance Σ I = {sol.importance:.4f} "
        f"(score {score}, {norm_label})",
        highlight=False,
    )
    if sol.grid is not None:
        console.print(
            f"reference rounding: Σ ⌊prec·T_opt⌋ = {sol.grid[0]} ≤ ⌊prec·T0⌋ = {sol.grid[1]}"
            + ("" if sol.within_budget else "; the real latency exceeds the budget"),
            highlight=False,
        )


def _norm_label(norm: str, alpha: float) -> str:
    """How the scores were normalised, in a few words."""
    return f"alpha {alpha:g}" if norm == "single" else f"norm {norm}"


def _config_problem(
    lat,  # LatencyTable | OptimalLatencyTable
    imp,  # ImportanceTable | ExtendedImportanceTable
    paths: tuple[Path, Path | None],
    importance: Path,
    how: tuple[str, str, float, str],
):  # returns dp.ConfigTables | None
    """Stage 2's input with layer pruning, from the plain and the configuration tables; None
    (merging alone, said) when the configuration latency table has no row."""
    from .dp import ConfigTables, config_tables, optimal_latency
    from .tables import (
        DEFAULT_SCORE,
        ImportanceTable,
        LatencyTable,
        read_config_importance_rows,
        read_config_latency_rows,
    )

    score, rounding, alpha, norm = how
    if rounding != "exact" or score != DEFAULT_SCORE or not isinstance(imp, ImportanceTable):
        raise typer.BadParameter(
            f"--prune-layers solves exactly on {DEFAULT_SCORE} of a raw importance table: "
            "not with --rounding reference, another --score or an extended table"
        )
    lat_path, imp_path = paths[0], paths[1] or configs_path(importance)
    times = read_config_latency_rows(_config_file(lat_path, "latency"))
    if not times:  # what latency --prune-layers writes on a chain with no reducible conv
        console.print(NO_REDUCIBLE, highlight=False)
        return None
    rows = read_config_importance_rows(_config_file(imp_path, "importance"))
    opt = optimal_latency(lat) if isinstance(lat, LatencyTable) else lat
    tables: ConfigTables = config_tables(
        opt, imp, {r.key: r.time for r in times}, rows, alpha=alpha, norm=norm
    )
    console.print(
        f"layer pruning: {len(times)} configuration times from {lat_path}, {len(rows)} "
        f"configuration scores from {imp_path}",
        highlight=False,
    )
    return tables


def _config_file(path: Path, command: str) -> Path:
    """``path`` if it is a file; else say which command writes it."""
    if not path.is_file():
        raise typer.BadParameter(
            f"no configuration table {path}: `depthcompress {command} --prune-layers` writes it"
        )
    return path


def _print_pruned(pruned: frozenset[int]) -> None:
    """Which positions' convolutions a plan prunes."""
    console.print(f"pruned convolutions P ({len(pruned)}): {_positions(pruned)}")


@app.command("opt-time")
def opt_time_cmd(
    latency: Annotated[Path, typer.Argument(help="latency table id,st,end,time,stdev (CSV)")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="optimal latency table to write (CSV)")
    ],
) -> None:
    """Stage 1: write T_opt and its break points for every block (reference opt_time layout)."""
    from .dp import optimal_latency
    from .tables import LatencyTable

    try:
        table = LatencyTable.read_csv(latency)
        opt = optimal_latency(table)
    except DepthCompressError as exc:
        raise fail(exc) from None
    opt.write_csv(output)
    split = sum(len(b) > 2 for b in opt.breaks)
    console.print(
        f"{len(opt)} blocks over positions 0..{opt.num_positions}, {split} of them faster split "
        f"into smaller blocks (see the breaks column): written to {output}",
        highlight=False,
    )


@app.command("solve")
def solve_cmd(
    latency: Annotated[
        Path,
        typer.Option(
            help="latency table id,st,end,time,stdev; an optimal one (with breaks) is used as is"
        ),
    ],
    importance: Annotated[
        Path,
        typer.Option(
            help="importance table st,end,st_act,end_act,SCORE; its rows are the candidate "
            "segments (an extended table with imp,breaks is used as is)"
        ),
    ],
    budget: Annotated[
        str,
        typer.Option(
            help="latency budget T0 as in compress: ms of Σ T_opt (table units) such as 25, "
            "or a fraction of the original chain latency Σ T(k-1,k) such as 0.7x; a sweep "
            "START:STOP:STEP with the stop included, all in ms (18:30:0.5) or all fractions "
            "(0.5x:0.9x:0.1x); or a comma list (18,20,25 or 0.6x,0.7x)"
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="plan.json for one budget; for a sweep, the front as CSV (and a PNG beside it)",
        ),
    ] = None,
    alpha: Annotated[
        float,
        typer.Option(
            help="normalisation h - alpha * mean(single-conv h); 1.6 is the paper's "
            "MobileNetV2-1.0 value (1.2 for MBV2-1.4, 1.4 for VGG19)"
        ),
    ] = 1.6,
    norm: NormOption = "auto",
    score: Annotated[
        str,
        typer.Option(
            help="importance column: the score difference to the unmodified network "
            "(e.g. held-out accuracy change in % points)"
        ),
    ] = "val_acc",
    rounding: Annotated[
        str,
        typer.Option(
            help="'exact' (never exceeds the budget) or 'reference' (the paper code's floor "
            "grid, to reproduce its published plans; may exceed the budget)"
        ),
    ] = "exact",
    prec: Annotated[
        float, typer.Option(help="grid steps per ms for --rounding reference (MBV2: 20, VGG: 10)")
    ] = 20.0,
    prune_layers: Annotated[
        bool,
        typer.Option(
            help="also prune convolutions (LayerMerge): a configuration per segment from the "
            "configuration tables of latency/importance --prune-layers"
        ),
    ] = False,
    latency_configs: Annotated[
        Path | None,
        typer.Option(
            help="--prune-layers: configuration latency table (default: LATENCY_configs.csv)"
        ),
    ] = None,
    importance_configs: Annotated[
        Path | None,
        typer.Option(
            help="--prune-layers: configuration importance table (default: IMPORTANCE_configs.csv)"
        ),
    ] = None,
) -> None:
    """Stage 2: the most important plan (A, S) within the latency budget, or a sweep's front."""
    from .dp import (
        DEFAULT_PREC,
        ROUNDINGS,
        original_latency,
        resolve_norm,
        solve,
        solve_configs,
        sweep,
        sweep_configs,
    )
    from .tables import ExtendedImportanceTable, read_importance, read_latency

    if rounding not in ROUNDINGS:
        raise typer.BadParameter(f"--rounding must be one of {', '.join(ROUNDINGS)}")
    if not prec > 0:
        raise typer.BadParameter(f"--prec must be positive (default {DEFAULT_PREC:g})")
    specs = _parse_budgets(budget)
    is_sweep = len(specs) > 1 or ":" in budget or "," in budget
    if is_sweep and output is not None and output.suffix.lower() == ".json":
        raise typer.BadParameter(
            "a sweep writes its front as CSV (and a PNG beside it): give -o front.csv"
        )
    try:
        lat = read_latency(latency)
        imp = read_importance(importance, score)
        if isinstance(imp, ExtendedImportanceTable):
            console.print(
                f"{importance} is an extended importance table (imp, breaks): used as is, "
                "without --alpha and --score"
            )
        original = original_latency(lat)
        budgets = [b.resolve(original) for b in specs]
        if any(b.relative for b in specs):
            console.print(
                f"fractions are of the original chain latency Σ T(k-1,k) = {original:.4f} ms",
                highlight=False,
            )
        configs = None
        if prune_layers:
            paths = (latency_configs or configs_path(latency), importance_configs)
            how = (score, rounding, alpha, resolve_norm(norm, True))
            configs = _config_problem(lat, imp, paths, importance, how)
        chosen = resolve_norm(norm, configs is not None)  # merging alone: as without the flag
        if configs is not None:
            sol = solve_configs(configs, budgets[0]) if not is_sweep else None
            result = sweep_configs(configs, budgets) if is_sweep else None
        elif not is_sweep:
            sol = solve(
                lat, imp, budgets[0], alpha=alpha, rounding=rounding, prec=prec, norm=chosen
            )
        else:
            result = sweep(
                lat, imp, budgets, alpha=alpha, rounding=rounding, prec=prec, norm=chosen
            )
    except DepthCompressError as exc:
        raise fail(exc) from None
    if not is_sweep:
        import json

        _print_solution(sol, score, _norm_label(chosen, alpha))
        if configs is not None:
            _print_pruned(sol.plan.pruned)
        if output is not None:
            data = {**sol.to_dict(), "budget_spec": str(specs[0]), "original_latency": original}
            output.write_text(json.dumps(data, indent=1) + "\n")
            console.print(f"plan written to {output}")
        return
    from rich.table import Table

    table = Table(title=f"budget sweep ({rounding})", header_style="bold")
    pruning = ("pruned",) if configs is not None else ()
    for col in ("budget (ms)", "latency", "importance", "|A|", "blocks", *pruning):
        table.add_column(col, justify="right")
    for spec, sol in zip(specs, result.solutions, strict=True):
        table.add_row(
            f"{spec} = {sol.budget:.4f}" if spec.relative else f"{sol.budget:g}",
            f"{sol.latency:.4f}",
            f"{sol.importance:.4f}",
            str(len(sol.plan.activations)),
            str(len(sol.plan.boundaries)),
            *([_positions(sol.plan.pruned)] if pruning else []),
        )
    console.print(table)
    console.print(f"{len(result.front)} Pareto-optimal plans up to {max(budgets):g} ms")
    if output is None:
        return
    from .report import front_rows, plot_front, write_front_csv

    rows = front_rows(result)
    write_front_csv(output, rows)
    console.print(f"front written to {output}")
    png = output.with_suffix(".png")
    title = f"{latency.name} × {importance.name} ({_norm_label(chosen, alpha)}, {rounding})"
    if plot_front(png, rows, front=result.front, title=title):
        console.print(f"plot written to {png}")
    else:
        console.print(
            "note: matplotlib is not installed, so no plot was drawn; "
            "pip install depthcompress[plot] adds it",
            markup=False,
        )


# ---------------------------------------------------------------------------------------------
# the whole job (issue 7)


def _run_compress(
    net,  # nn.Module
    model_name: str,
    data: str,
    workdir: Path,
    settings,  # pipeline.CompressSettings
    *,
    holdout: int,
    holdout_seed: int,
    input_shape: str | None,
    image_size: int | None,
    redo: str | None,
    progress: bool,
    download: bool = False,
    until: str | None = None,
    channels: int = 3,
    importance_from: Path | None = None,
    latency_from: Path | None = None,
) -> None:
    """Load the data, run ``pipeline.compress`` and print the summary table."""
    import torch

    from .data import load_split, load_test
    from .pipeline import compress
    from .report import (
        RichProgress,
        control_warning_line,
        noisy_warning,
        summary_lines,
        summary_table,
    )

    channels = _parse_shape(input_shape)[1] if input_shape else channels
    split = load_split(
        data,
        holdout=holdout,
        seed=holdout_seed,
        image_size=image_size,
        channels=channels,
        download=download,
    )
    test = load_test(data, image_size=image_size, channels=channels, download=download)
    example = torch.randn(_parse_shape(input_shape)) if input_shape else None
    try:
        with RichProgress(console, enabled=progress) as reporter:
            result = compress(
                net,
                split,
                workdir,
                settings,
                example_input=example,
                test_data=test,
                model_name=model_name,
                redo=redo,
                progress=reporter,
                log=lambda m: console.print(m, highlight=False, markup=False),
                command=_command_line(),
                until=until,
                importance_from=importance_from,
                latency_from=latency_from,
            )
    except KeyboardInterrupt:
        raise _interrupted(f"everything finished so far is in {workdir}") from None
    if result is None:
        if until is not None:
            console.print(f"stopped after the {until} stage; its files are in {workdir}")
        return
    console.print(f"compressed {model_name}:", highlight=False)
    console.print(summary_table(result.evaluation))
    warnings = (noisy_warning(result.evaluation), control_warning_line(result.evaluation))
    for line in summary_lines(result.evaluation):
        style = "bold yellow" if line in warnings else ""
        console.print(line, style=style, highlight=False, markup=False)
    console.print(
        f"plan: {len(result.plan.activations)} activations kept, "
        f"{result.original.depth} → {result.compressed.depth} convolutions; "
        f"stages run now: {', '.join(result.ran) or 'none (all finished before)'}",
        highlight=False,
    )
    console.print(f"report: [bold]{workdir / 'report.md'}[/]", highlight=False)


def _compress_settings(**kw):  # returns pipeline.CompressSettings
    """Build the pipeline's settings from CLI values, turning bad values into one error."""
    from .backends import Protocol
    from .finetune import FinetuneConfig
    from .importance import FinetuneSettings
    from .pipeline import Budget, CompressSettings
    from .widthsearch import parse_width

    width, width_search = parse_width(str(kw.get("width", "0")))
    return CompressSettings(
        budget=Budget.parse(kw["budget"]),
        backend=kw["backend"],
        threads=kw["threads"],
        batch=kw["batch"],
        protocol=Protocol(),
        mode=kw["mode"],
        max_kernel_size=kw["max_kernel_size"] or None,
        exclude=tuple(kw["exclude"] or ()),
        importance=FinetuneSettings(
            steps=kw["importance_steps"],
            lr=kw["importance_lr"],
            seed=kw["seed"],
            amp=kw.get("importance_amp", kw["amp"]),
            grad_clip=kw.get("importance_grad_clip"),
            threads=kw.get("train_threads", 1),
        ),
        workers=kw["workers"],
        alpha=kw["alpha"],
        norm=kw.get("norm", "auto"),
        finetune=FinetuneConfig(
            epochs=kw["epochs"],
            lr=kw["lr"],
            batch_size=kw["finetune_batch_size"],
            optimizer=kw["optimizer"],
            distill=kw["distill"],
            grad_clip=kw.get("grad_clip"),
            seed=kw["seed"],
            amp=kw["amp"],
            num_workers=kw["loader_workers"],
            threads=kw.get("train_threads", 1),
        ),
        device=kw["device"],
        seed=kw["seed"],
        budget_mode=kw.get("budget_mode", "whole"),
        budget_or_fastest=kw.get("budget_or_fastest", False),
        lr_probe=_probe_settings(kw),
        width=width,
        width_search=width_search,
        width_importance=kw.get("width_importance", "l1"),
        prune_layers=kw.get("prune_layers", False),
        prune_subsets=kw.get("prune_subsets", 2),
    )


def _probe_settings(kw):  # returns lrprobe.ProbeSettings | None
    """The lr probe's settings from CLI values; None with --no-lr-probe."""
    from .lrprobe import ProbeSettings

    if not kw.get("lr_probe", True):
        return None
    return ProbeSettings(steps=kw.get("probe_steps", 150), tolerance=kw.get("probe_tolerance", 1.0))


LrProbeOption = Annotated[
    bool,
    typer.Option(
        help="before fine-tuning, fine-tune the original network a few steps at --lr, --lr/4, "
        "--lr/16, --lr/64 and use the largest that keeps its held-out accuracy (the control, "
        "reported next to the result); --no-lr-probe uses --lr as given"
    ),
]


PruneLayersOption = Annotated[
    bool,
    typer.Option(
        help="also prune convolutions inside merged blocks (LayerMerge): configuration latency "
        "and importance tables, and a plan that picks a configuration per segment"
    ),
]
PruneSubsetsOption = Annotated[
    int,
    typer.Option(help="--prune-layers: pruned subsets fine-tuned per configuration (best kept)"),
]


BudgetOption = Annotated[
    str,
    typer.Option(
        help="latency budget: a fraction of the original network's latency such as 0.6x, or ms "
        "(what it is of: --budget-mode)"
    ),
]
BudgetModeOption = Annotated[
    str,
    typer.Option(
        help="whole: the budget is of the whole network's latency measured on the backend "
        "(calibrated); chain: of the latency table's Σ T over the chain (no calibration)"
    ),
]
WorkdirOption = Annotated[
    Path, typer.Option(help="folder for every stage's files; a re-run resumes from it")
]
RedoOption = Annotated[
    str | None,
    typer.Option(
        help="redo this stage and the later ones (latency, optimal, importance, solve, "
        "finetune, merge, evaluate); their old files move to WORKDIR/previous/N/"
    ),
]


@app.command("compress")
def compress_cmd(
    model: ModelArgument,
    budget: BudgetOption,
    workdir: WorkdirOption,
    budget_mode: BudgetModeOption = "whole",
    data: DataOption = "fashion-mnist",
    weights: WeightsOption = None,
    backend: Annotated[
        str, typer.Option(help="latency backend: onnxruntime, torch, openvino or tensorrt")
    ] = "onnxruntime",
    batch: Annotated[
        int, typer.Option(help="batch size of every latency measurement and of the ONNX file")
    ] = 1,
    threads: TimingThreadsOption = None,
    train_threads: TrainThreadsOption = 1,
    epochs: Annotated[int, typer.Option(help="fine-tuning epochs of the linearized network")] = 3,
    lr: Annotated[
        float,
        typer.Option(help="fine-tuning peak learning rate (cosine); the lr probe's largest"),
    ] = FINETUNE_LR,
    lr_probe: LrProbeOption = True,
    probe_steps: Annotated[
        int, typer.Option(help="lr probe: fine-tuning steps per candidate (at most one epoch)")
    ] = 150,
    probe_tolerance: Annotated[
        float,
        typer.Option(help="lr probe: held-out accuracy points the original may lose at an lr"),
    ] = 1.0,
    grad_clip: GradClipOption = None,
    prune_layers: PruneLayersOption = False,
    prune_subsets: PruneSubsetsOption = 2,
    optimizer: Annotated[str, typer.Option(help="fine-tuning optimizer: sgd or adamw")] = "sgd",
    distill: Annotated[
        float, typer.Option(help="knowledge-distillation weight (0 = off; the paper uses 0.3)")
    ] = 0.0,
    finetune_batch_size: Annotated[int, typer.Option(help="fine-tuning batch size")] = 128,
    importance_steps: Annotated[
        int, typer.Option(help="fine-tuning steps per importance entry (0 = zero-shot)")
    ] = 100,
    importance_lr: Annotated[float, typer.Option(help="importance fine-tuning lr")] = 0.05,
    importance_grad_clip: Annotated[
        float | None, typer.Option(help="importance fine-tuning gradient-norm clip (default off)")
    ] = None,
    importance_table: Annotated[
        Path | None,
        typer.Option(
            help="adopt an importance table made by 'depthcompress importance' (shards, Ray) "
            "with the same model, data and settings; only missing rows are computed"
        ),
    ] = None,
    latency_table: Annotated[
        Path | None,
        typer.Option(
            help="adopt a latency table made by 'depthcompress latency' for the same model, "
            "batch, backend, device and chain flags; only missing rows are measured"
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            help="importance worker processes (fewer when workers × --train-threads > cores)"
        ),
    ] = 1,
    alpha: Annotated[float, typer.Option(help="importance normalisation alpha (§6)")] = 1.6,
    norm: NormOption = "auto",
    holdout: HoldoutOption = 10000,
    holdout_seed: HoldoutSeedOption = 0,
    seed: Annotated[int, typer.Option(help="seed of every random choice")] = 0,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="example input N,C,H,W (default: data's)")
    ] = None,
    image_size: ImageSizeOption = None,
    channels: Annotated[int, typer.Option(help="ImageFolder: 3 (RGB) or 1 (grayscale)")] = 3,
    mode: ModeOption = "general",
    max_kernel_size: MaxKernelOption = 15,
    exclude: ExcludeOption = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="cpu, cuda (the current or LOCAL_RANK GPU) or cuda:N (default: GPU if any): "
            "where fine-tuning runs and where --backend torch/tensorrt time (torch default: "
            "cpu); onnxruntime and openvino always time on the CPU"
        ),
    ] = None,
    amp: Annotated[
        str | None,
        typer.Option(
            help="automatic mixed precision of importance and final fine-tuning: bf16 (CUDA, or "
            "CPU where it is fast) or fp16 (CUDA only: needs --device cuda); default off"
        ),
    ] = None,
    loader_workers: LoaderWorkersOption = None,
    redo: RedoOption = None,
    until: Annotated[
        str | None,
        typer.Option(help="stop after this stage, e.g. 'solve' before fine-tuning under torchrun"),
    ] = None,
    download: Annotated[
        bool, typer.Option(help="download Fashion-MNIST with torchvision if it is not installed")
    ] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    width: Annotated[
        str,
        typer.Option(
            help="also prune this fraction of every layer's channels (Torch-Pruning, "
            "pip install 'depthcompress[width]') before depth compression, under the same "
            "--budget of the original's whole latency; 0 = depth only; auto = choose the "
            "fraction among 0, 0.1, ..., 0.5 (auto:0.1,0.3: among 0, 0.1 and 0.3) by the "
            "estimated loss of width and depth together (WORKDIR/width_search.json)"
        ),
    ] = "0",
    width_importance: Annotated[
        str, typer.Option(help="which channels --width keeps: l1 (weight magnitude) or taylor")
    ] = "l1",
) -> None:
    """Compress MODEL end to end: latency and importance tables, DP, fine-tune, merge, export.

    Every stage writes its files to --workdir; running the same command again resumes at the
    first unfinished stage. Ends with a summary table and WORKDIR/report.md. To fine-tune on
    several processes or GPUs, run it once with --until solve, then again under torchrun.
    """
    try:
        settings = _compress_settings(**locals())
        net = _load_model_with_weights(model, weights)
        _run_compress(
            net,
            model,
            data,
            workdir,
            settings,
            holdout=holdout,
            holdout_seed=holdout_seed,
            input_shape=input_shape,
            image_size=image_size,
            redo=redo,
            progress=progress,
            download=download,
            until=until,
            channels=channels,
            importance_from=importance_table,
            latency_from=latency_table,
        )
    except DepthCompressError as exc:
        raise fail(exc) from None


@app.command("demo")
def demo_cmd(
    workdir: WorkdirOption = Path("runs/demo"),
    budget: BudgetOption = "0.5x",
    budget_mode: BudgetModeOption = "chain",
    epochs: Annotated[int, typer.Option(help="fine-tuning epochs")] = 8,
    distill: Annotated[float, typer.Option(help="knowledge-distillation weight")] = 0.3,
    importance_steps: Annotated[int, typer.Option(help="steps per importance entry")] = 25,
    workers: Annotated[
        int | None, typer.Option(help="importance worker processes (default: CPU cores, ≤ 4)")
    ] = None,
    amp: Annotated[
        str | None,
        typer.Option(
            help="automatic mixed precision of the final fine-tuning (on the GPU if any): bf16 "
            "or fp16 (GPU only); the importance stage runs on the CPU in float32; default off"
        ),
    ] = None,
    device: DeviceOption = None,
    threads: DemoThreadsOption = 1,
    train_threads: TrainThreadsOption = 1,
    redo: RedoOption = None,
    lr_probe: LrProbeOption = True,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Compress the built-in demo: a MobileNetV2-style network trained on Fashion-MNIST.

    Uses the checkpoint the package ships (made by 'depthcompress train'; the command is in
    weights/fashion_mbv2.pt.json), ONNX Runtime on this CPU at batch 64, and ends with the
    summary table and the report's path (about 10 minutes on 2 cores). The defaults are those
    of the benchmark in docs/benchmarks.md (8 epochs, distillation 0.3), with a cheaper
    importance table (25 fine-tuning steps per entry instead of 100). Its budget is of the
    latency table's chain (--budget-mode chain) so that its documented plan is reproducible;
    compress's default is the calibrated whole network. Where a table timed on a busy machine
    puts the budget below the fastest plan, the demo takes the fastest plan and says so.
    """
    import os

    from .models import FASHION_MBV2_EXCLUDE, trained_weights

    try:
        weights = trained_weights("fashion_mbv2")
        net = _load_model_with_weights("depthcompress:fashion_mbv2", weights)
        settings = _compress_settings(
            budget=budget,
            budget_mode=budget_mode,
            budget_or_fastest=True,
            backend="onnxruntime",
            threads=threads if threads is not None and threads > 0 else None,
            train_threads=train_threads,
            batch=64,
            mode="general",
            max_kernel_size=15,
            exclude=list(FASHION_MBV2_EXCLUDE),
            importance_steps=importance_steps,
            importance_lr=0.05,
            workers=workers or max(1, min(4, os.cpu_count() or 1)),
            alpha=1.6,
            epochs=epochs,
            lr=FINETUNE_LR,
            finetune_batch_size=128,
            optimizer="sgd",
            distill=distill,
            device=device,
            seed=0,
            amp=amp,
            importance_amp=None,
            loader_workers=None,
            lr_probe=lr_probe,
        )
        _run_compress(
            net,
            "depthcompress:fashion_mbv2",
            "fashion-mnist",
            workdir,
            settings,
            holdout=10000,
            holdout_seed=0,
            input_shape=None,
            image_size=None,
            redo=redo,
            progress=progress,
        )
    except DepthCompressError as exc:
        raise fail(exc) from None


SpeedupModelArgument = Annotated[
    str,
    typer.Argument(
        help="depthcompress:NAME, torchvision:NAME or file.py:factory (with its --weights), a "
        "merged.pt or an .onnx file"
    ),
]


@app.command("speedup")
def speedup_cmd(
    a: SpeedupModelArgument,
    b: SpeedupModelArgument,
    weights_a: Annotated[Path | None, typer.Option(help="state_dict of A (a MODEL spec)")] = None,
    weights_b: Annotated[Path | None, typer.Option(help="state_dict of B (a MODEL spec)")] = None,
    backend: Annotated[str, typer.Option(help="onnxruntime (default), torch or openvino")] = (
        "onnxruntime"
    ),
    device: Annotated[
        str | None, typer.Option(help="torch: cpu (default), cuda or cuda:N; others: cpu only")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: all cores of this machine)")
    ] = None,
    batch: Annotated[
        int | None, typer.Option(help="batch size (default: N of --input-shape)")
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape",
            help="input N,C,H,W (default: that of an .onnx argument, else 1,3,224,224)",
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(help="paired rounds (at least)")] = 10,
    max_time: Annotated[
        float, typer.Option(help="seconds of rounds after which timing stops (≥ --rounds)")
    ] = 60.0,
    target: Annotated[
        float, typer.Option(help="stop once the 95 % interval is within ± this fraction")
    ] = 0.02,
    accept_noisy: Annotated[
        bool,
        typer.Option(help="report the speed-up even if the interval did not reach --target"),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the result as JSON to this file")
    ] = None,
) -> None:
    """Speed-up of B over A (A's latency / B's): paired rounds A, B, B, A, ... on one backend,
    the median of per-round ratios with a bootstrap 95 % interval."""
    from .backends import get_backend
    from .files import write_json
    from .speedup import Rule, paired_speedup

    try:
        nets = (_speedup_network(a, weights_a), _speedup_network(b, weights_b))
        shape = _speedup_shape(input_shape, (a, b), batch)
        runner = get_backend(backend, threads=threads, device=device)
        console.print(
            f"timing {a} against {b} on {backend}, {runner.threads} threads, input {shape} "
            f"(at least {rounds} rounds, at most {max_time:g} s)",
            highlight=False,
        )
        rule = Rule(
            min_rounds=rounds, max_rounds=max(rounds, 1000), max_time=max_time, target=target
        )
        result = paired_speedup(*nets, runner, shape, rule, names=(a, b))
    except DepthCompressError as exc:
        raise fail(exc) from None
    if json_out is not None:
        write_json(json_out, result.to_dict())
    console.print(
        f"{a}: {result.latency_a_ms:.3f} ms, {b}: {result.latency_b_ms:.3f} ms (medians); "
        f"inter-quartile range of the ratios {result.q1:.3f}–{result.q3:.3f}; "
        f"{result.backend['name']} {result.backend.get('version', '')}, "
        f"{result.threads} threads, batch {result.batch}, {result.machine['cpu']}",
        highlight=False,
    )
    if not result.converged:
        console.print(f"[bold yellow]{escape(result.message)}[/]", highlight=False)
        if not accept_noisy:
            console.print("pass --accept-noisy to take this number anyway", highlight=False)
            raise typer.Exit(code=3)
        return
    console.print(f"[bold]{escape(result.message)}[/]", highlight=False)


def _speedup_shape(text: str | None, specs: tuple[str, str], batch: int | None) -> tuple[int, ...]:
    """--input-shape, else the fixed input of the first .onnx argument, else 1,3,224,224; with
    --batch as N."""
    from .speedup import onnx_input_shape

    shape: tuple[int, ...] | None = _parse_shape(text) if text else None
    for spec in specs:
        if shape is None and spec.endswith(".onnx"):
            shape = onnx_input_shape(Path(spec))
    shape = shape or (1, 3, 224, 224)
    return (batch or shape[0], *shape[1:])


def _speedup_network(spec: str, weights: Path | None):  # returns nn.Module | Path
    """An .onnx path, a whole pickled module (merged.pt), or a MODEL spec with its weights."""
    from .errors import ModelSpecError

    if spec.endswith((".onnx", ".pt", ".pth")) and weights is None:
        path = Path(spec)
        if not path.is_file():
            raise ModelSpecError(f"{spec} does not exist")
        if spec.endswith(".onnx"):
            return path
        import torch

        try:
            net = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ModelSpecError(f"{spec} does not load: {type(exc).__name__}: {exc}") from None
        if not isinstance(net, torch.nn.Module):
            raise ModelSpecError(
                f"{spec} holds a {type(net).__name__}, not a whole network; for a state_dict "
                "pass the MODEL it belongs to with --weights-a/--weights-b"
            )
        return net
    return _load_model_with_weights(spec, weights)
