"""The whole job in one resumable call: trace → latency table → optimal latency → importance table
→ solve → fine-tune the linearized network → merge → verify → export → evaluate → report.

Every stage writes its own file(s) in the work directory and the next stage reads them back, so a
re-run resumes at the first stage that has not finished (and the latency and importance stages
resume at their first missing row). ``stages.json`` records, for each finished stage, the settings
that produced it; a re-run with different settings for a finished stage is refused (nothing is
overwritten) unless ``redo`` names that stage, which moves it and every later stage's files to
``previous/N/`` first.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import (
    GPU_BACKENDS,
    Backend,
    Protocol,
    backend_key,
    get_backend,
    machine_info,
    package_version,
)
from .data import SplitData, fetch, fingerprint, num_classes
from .defaults import FINETUNE_LR
from .devices import device_name, resolve_device
from .dp import Budget
from .errors import BudgetError, DepthCompressError, TableError, WorkdirError, plain
from .files import nested_diff, sidecar_path, write_json
from .finetune import FinetuneConfig, end_distributed, evaluate, finetune
from .graph import ConvChain, trace
from .importance import FinetuneSettings, importance_table, weights_sha
from .latency import build_latency_table, chain_sha, check_meta, read_meta, table_meta
from .linearization import linearize
from .merging import check_close, merge
from .plan import Plan

STAGES = ("latency", "optimal", "importance", "solve", "finetune", "merge", "evaluate")
MANIFEST = "stages.json"
RUN = "run.json"

# the files each stage writes, relative to the work directory (report files are always redone)
STAGE_FILES: dict[str, tuple[str, ...]] = {
    "latency": ("latency.csv", "latency.csv.json", "latency.csv.passes"),
    "optimal": ("opt_latency.csv",),
    "importance": ("importance.csv", "importance.csv.json"),
    "solve": ("plan.json", "front.csv"),
    "finetune": ("finetune", "finetuned.pt"),
    "merge": ("merged.pt", "merged.onnx"),
    "evaluate": ("evaluation.json",),
}


# ---------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True, kw_only=True)
class CompressSettings:
    """Everything ``compress`` needs besides the model and the data. ``batch`` is the batch size
    the latency table, the end-to-end timing and the ONNX file use: pick the deployment's.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``; default: the GPU if there is one) is where
    fine-tuning runs, and where the torch and tensorrt backends time (torch: the CPU when
    ``device`` is None). ONNX Runtime and OpenVINO always time on the CPU, whatever ``device``.
    """

    budget: Budget
    backend: str = "onnxruntime"
    threads: int | None = None
    batch: int = 1
    protocol: Protocol = field(default_factory=Protocol)
    mode: str = "general"
    max_kernel_size: int | None = 15
    exclude: tuple[str, ...] = ()
    importance: FinetuneSettings = field(default_factory=FinetuneSettings)
    workers: int = 1
    alpha: float = 1.6
    finetune: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(epochs=3, lr=FINETUNE_LR, batch_size=128)
    )
    device: str | torch.device | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.batch < 1:
            problems.append(f"batch must be ≥ 1, got {self.batch}")
        if self.workers < 1:
            problems.append(f"workers must be ≥ 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be ≥ 1, got {self.threads}")
        if self.mode not in ("general", "reference"):
            problems.append(f"mode must be 'general' or 'reference', got {self.mode!r}")
        try:
            backend_key(self.backend)
            resolve_device(self.device)
        except DepthCompressError as exc:
            problems.append(str(exc))
        if problems:
            raise DepthCompressError("; ".join(problems))
        self._check_amp()

    def _check_amp(self) -> None:
        """Refuse an ``amp`` the stages' devices cannot run before anything starts: importance
        runs on ``device`` (the CPU by default), fine-tuning on it or on the default GPU."""
        from .devices import cuda_count
        from .finetune import check_amp

        tune_device = self.device or ("cuda" if cuda_count() else "cpu")
        check_amp(self.importance.amp, self.device or "cpu")
        check_amp(self.finetune.amp, tune_device)

    def timing_device(self) -> str | torch.device | None:
        """The device handed to the latency backend: ``device`` for torch and tensorrt, None
        (the CPU) for the CPU backends, whose ``device`` only moves fine-tuning."""
        return self.device if backend_key(self.backend) in GPU_BACKENDS else None

    def stage_settings(self, timing_device: str = "cpu") -> dict[str, dict[str, Any]]:
        """Per stage, the settings that decide its result (later stages include earlier ones);
        ``timing_device`` is what the latency backend times on (``cpu``, ``cuda (GPU model)``)."""
        lat = {
            "backend": self.backend,
            "device": timing_device,
            "threads": self.threads,
            "batch": self.batch,
            "protocol": asdict(self.protocol),
            "seed": self.seed,
        }
        imp = {"importance": asdict(self.importance)}
        budget = {"value": self.budget.value, "relative": self.budget.relative}
        solve = {**lat, **imp, "budget": budget, "alpha": self.alpha}
        tune = {**solve, "finetune": self.finetune.to_dict()}
        return {
            "latency": lat,
            "optimal": lat,
            "importance": imp,
            "solve": solve,
            "finetune": tune,
            "merge": tune,
            "evaluate": tune,
        }


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class NetworkStats:
    """One network as the summary compares it: test accuracy (%), end-to-end latency (ms) on the
    backend at the settings' batch, depth (convolutions executed) and parameter count."""

    accuracy: float | None
    latency: float
    depth: int
    params: int


@dataclass
class CompressResult:
    """What ``compress`` produced: the merged network, the plan, both networks' statistics and
    where every file is."""

    workdir: Path
    merged: nn.Module
    plan: Plan
    budget_ms: float
    original: NetworkStats
    compressed: NetworkStats
    evaluation: dict[str, Any]
    files: dict[str, Path]
    ran: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """Measured end-to-end speed-up of the merged network over the original."""
        return self.original.latency / self.compressed.latency


# ---------------------------------------------------------------------------------------------
# the work directory


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkdirError(
            f"{path} is unreadable ({exc}): restore it, or start over in another --workdir"
        ) from None


def _normalised(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{name}: {plain(a)!r} → {plain(b)!r}" for name, a, b in nested_diff(old, new)]


class Workdir:
    """The work directory: identity of the run (``run.json``), finished stages
    (``stages.json``), and archiving of stages to redo."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise WorkdirError(f"--workdir {self.path} is a file, not a directory")

    def file(self, name: str) -> Path:
        return self.path / name

    def claim(self, identity: dict[str, Any]) -> None:
        """Start or resume a run of this model and data; refuse another model's directory."""
        identity = _normalised(identity)
        run = self.file(RUN)
        if run.exists():
            old = _read_json(run)
            diff = _diff(old.get("identity", {}), identity)
            if diff:
                raise WorkdirError(
                    f"{self.path} holds a run of a different model or data ("
                    + "; ".join(diff[:4])
                    + "): nothing was changed there. Use a new --workdir for this model"
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(run, {"identity": identity, "commands": []})

    def record_command(self, command: str) -> None:
        run = _read_json(self.file(RUN))
        run.setdefault("commands", []).append(
            {"command": command, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        )
        write_json(self.file(RUN), run)

    def manifest(self) -> dict[str, Any]:
        path = self.file(MANIFEST)
        return _read_json(path) if path.exists() else {}

    def done(self, stage: str, settings: dict[str, Any]) -> bool:
        """Whether ``stage`` finished with these settings; refuses finished stages whose
        settings differ (the caller redoes them only when asked)."""
        entry = self.manifest().get(stage)
        if entry is None:
            return False
        diff = _diff(entry["settings"], _normalised(settings))
        if diff:
            raise WorkdirError(
                f"the {stage} stage in {self.path} was computed with other settings ("
                + "; ".join(diff[:4])
                + f"). Pass --redo {stage} to move it and the later stages to "
                f"{self.path / 'previous'}/ and compute them again, or use another --workdir"
            )
        return True

    def finish(self, stage: str, settings: dict[str, Any], **info: Any) -> None:
        manifest = self.manifest()
        manifest[stage] = {"settings": _normalised(settings), **info}
        write_json(self.file(MANIFEST), manifest)

    def redo(self, stage: str) -> Path | None:
        """Move ``stage``'s and every later stage's files to ``previous/N/``; returns that
        folder (None when there was nothing to move)."""
        if stage not in STAGES:
            raise WorkdirError(f"--redo must name one of the stages {', '.join(STAGES)}")
        later = STAGES[STAGES.index(stage) :]
        manifest = self.manifest()
        present = [self.file(f) for s in later for f in STAGE_FILES[s] if self.file(f).exists()]
        if not present and not any(s in manifest for s in later):
            return None
        k = 1
        while self.file(f"previous/{k}").exists():
            k += 1
        target = self.file(f"previous/{k}")
        target.mkdir(parents=True)
        for p in present:
            shutil.move(str(p), str(target / p.name))
        if any(s in manifest for s in later):
            write_json(target / MANIFEST, {s: manifest[s] for s in later if s in manifest})
            write_json(self.file(MANIFEST), {s: v for s, v in manifest.items() if s not in later})
        return target


# ---------------------------------------------------------------------------------------------
# checks before anything runs


def check_classes(model: nn.Module, example: torch.Tensor, classes: int) -> None:
    """Refuse a model whose output does not have one score per class of the data."""
    try:
        with torch.no_grad():
            out = copy.deepcopy(model).eval()(example[:1])
    except Exception as exc:
        raise DepthCompressError(
            f"the model fails on an input of shape {tuple(example[:1].shape)} taken from the "
            f"data ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): check "
            "the data's channels and image size against the model (--channels, --image-size, "
            "--input-shape)"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DepthCompressError(
            f"the model's output is {shape}, not (batch, classes) scores: compress needs a "
            "classifier returning one tensor of logits"
        )
    if out.shape[1] != classes:
        raise DepthCompressError(
            f"the model outputs {out.shape[1]} class scores but the data has {classes} classes: "
            f"build the model for {classes} classes (e.g. num_classes={classes}) and load "
            "weights trained on this data"
        )


def conv_depth(model: nn.Module) -> int:
    """How many convolutions a forward pass runs (from a trace: modules called, not owned)."""
    from .graph import symbolic_trace

    gm = symbolic_trace(copy.deepcopy(model).eval())
    mods = dict(gm.named_modules())
    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(mods.get(n.target), nn.Conv2d)
    )


# ---------------------------------------------------------------------------------------------
# the pipeline


Log = Callable[[str], None]


def _files(wd: Workdir) -> dict[str, Path]:
    names = [f for files in STAGE_FILES.values() for f in files] + ["report.md", RUN, MANIFEST]
    return {name: wd.file(name) for name in names if wd.file(name).exists()}


def compress(
    model: nn.Module,
    data: SplitData,
    workdir: str | Path,
    settings: CompressSettings,
    *,
    example_input: torch.Tensor | None = None,
    test_data: Any = None,
    model_name: str = "",
    redo: str | None = None,
    progress: bool = True,
    log: Log | None = None,
    command: str | None = None,
    until: str | None = None,
    importance_from: str | Path | None = None,
    latency_from: str | Path | None = None,
) -> CompressResult | None:
    """Compress ``model`` to meet ``settings.budget`` on ``settings.backend``, writing every
    stage to ``workdir`` and resuming what an earlier run left there. ``model`` is not modified.

    ``data`` is the fine-tuning data and its held-out split (importance is scored on the
    held-out part); ``test_data`` (default: the held-out split) scores the final accuracy of
    both networks. ``example_input`` (default: one example of the data) fixes the input shape.

    ``importance_from`` adopts an importance table computed elsewhere (``depthcompress
    importance`` with shards or Ray, same model, data and settings): it is copied into the work
    directory and resumed, so only its missing rows are computed. ``latency_from`` adopts a
    latency table made by ``depthcompress latency`` the same way; one of another chain, batch,
    backend, device or machine is refused before anything is written.

    ``until`` stops after that stage (returns None), e.g. to compute the tables on one machine
    and fine-tune elsewhere. Under ``torchrun`` (``WORLD_SIZE`` > 1) only the fine-tuning stage
    runs, in DistributedDataParallel over all processes: the earlier stages must be finished
    (run once without torchrun and ``until="solve"``); rank 0 then merges, exports, evaluates
    and reports, and the other ranks return None after fine-tuning.
    """
    for flag, value in (("--until", until), ("--redo", redo)):
        if value is not None and value not in STAGES:
            raise WorkdirError(f"{flag} must name one of the stages {', '.join(STAGES)}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    progress = progress and rank == 0
    say: Log = log or (lambda _m: None)
    wd = Workdir(workdir)
    sample, _ = fetch(data.holdout, torch.tensor([0]))
    if example_input is None:
        example_input = sample
    elif tuple(example_input.shape[1:]) != tuple(sample.shape[1:]):
        raise DepthCompressError(
            f"the example input's shape {tuple(example_input.shape[1:])} (--input-shape) differs "
            f"from the data's examples {tuple(sample.shape[1:])}: tables and timings would be "
            "made at another size than fine-tuning uses; give the data's shape or resize the data"
        )
    example_input = example_input[:1].detach().cpu()
    shape = (settings.batch, *example_input.shape[1:])
    original = copy.deepcopy(model).cpu().eval()

    classes = num_classes(data.train)
    check_classes(original, example_input, classes)
    chain = trace(
        original,
        example_input,
        mode=settings.mode,
        max_kernel_size=settings.max_kernel_size,
        exclude=settings.exclude,
    )
    if len(chain.blocks) == chain.num_positions:
        say("note: no two convolutions of this chain can merge; only activations can be removed")
    identity = {
        "model": model_name or type(model).__name__,
        "weights": weights_sha(original),
        "chain": chain_sha(chain),
        "input_shape": list(example_input.shape[1:]),
        "data": {k: v for k, v in data.info.items() if k != "root"},
        "classes": classes,
        "mode": settings.mode,
        "max_kernel_size": settings.max_kernel_size,
        "exclude": list(settings.exclude),
    }
    if world > 1 and redo is not None:
        raise WorkdirError("--redo cannot be used under torchrun: redo without torchrun first")
    if world > 1 and not wd.file(RUN).exists():
        raise WorkdirError(
            f"under torchrun compress only fine-tunes, and {wd.path} holds no run yet: run the "
            "same command once without torchrun and with --until solve first"
        )
    device = resolve_device(settings.device)
    runner = get_backend(
        settings.backend,
        threads=settings.threads,
        protocol=settings.protocol,
        device=settings.timing_device(),
    )
    if device.type == "cuda" and runner.device == "cpu":
        how = "--device cuda" if runner.name in GPU_BACKENDS else "--backend torch or tensorrt"
        say(
            f"note: fine-tuning runs on {device}, latency is timed on the CPU by "
            f"{runner.name} ({how} times on the GPU)"
        )
    if latency_from is not None:
        _check_adopted_latency(Path(latency_from), chain, runner, settings, identity["model"])
    wd.claim(identity)
    run = _Run(
        wd=wd,
        settings=settings,
        chain=chain,
        original=original,
        data=data,
        test_data=test_data,
        shape=shape,
        model_name=identity["model"],
        say=say,
        progress=progress,
        rank=rank,
        world=world,
        command=command or " ".join(sys.argv),
        runner=runner,
        device=device,
        redo=redo,
        importance_from=Path(importance_from) if importance_from is not None else None,
        latency_from=Path(latency_from) if latency_from is not None else None,
    )
    steps = (
        run.latency_stage,
        run.optimal_stage,
        run.importance_stage,
        run.solve_stage,
        run.finetune_stage,
        run.merge_stage,
        run.evaluate_stage,
    )
    for name, step in zip(STAGES, steps, strict=True):
        if not step() or until == name:
            return None
    return run.result()


@dataclass
class _Run:
    """One ``compress`` call: the stages in order, each skipped when ``stages.json`` says it
    finished with the same settings, each leaving its result on ``self`` for the next."""

    wd: Workdir
    settings: CompressSettings
    chain: ConvChain
    original: nn.Module
    data: SplitData
    test_data: Any
    shape: tuple[int, ...]
    model_name: str
    say: Log
    progress: bool
    rank: int
    world: int
    command: str
    runner: Backend
    device: torch.device
    redo: str | None = None
    importance_from: Path | None = None
    latency_from: Path | None = None
    ran: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        timing = device_name(torch.device(self.runner.device), index=False)
        self.stage = self.settings.stage_settings(timing)
        self.test = self.test_data if self.test_data is not None else self.data.holdout
        self.stage["evaluate"] = {
            **self.stage["evaluate"],
            "test_set": {
                "kind": "test" if self.test_data is not None else "held-out split",
                "size": len(self.test),
                "fingerprint": fingerprint(self.test),
            },
        }

    def todo(self, name: str, message: str) -> bool:
        """Whether stage ``name`` must run; if so, announce it (the first stage to run records
        the command and the chain). Under torchrun only fine-tuning and later stages may run.
        The stage named by ``redo`` (and every later one) is moved aside only now, when every
        earlier stage has been checked, so a refused run moves nothing."""
        if self.redo == name:
            moved = self.wd.redo(name)
            self.redo = None
            if moved is not None:
                self.say(f"moved the {name} stage and later ones to {moved}")
        elif self.wd.done(name, self.stage[name]):
            return False
        if self.world > 1 and STAGES.index(name) < STAGES.index("finetune"):
            raise WorkdirError(
                f"under torchrun ({self.world} processes) compress only fine-tunes, but the "
                f"{name} stage has not run yet: run the same command once without torchrun and "
                "with --until solve, then launch it again with torchrun"
            )
        if self.rank == 0:
            if not self.ran:
                self.wd.record_command(self.command)
                self.wd.file("chain.json").write_text(self.chain.to_json())
            self.say(message)
        return True

    def finished(self, name: str, **info: Any) -> None:
        self.wd.finish(name, self.stage[name], **info)
        self.ran.append(name)

    def latency_stage(self) -> bool:
        """The latency table T(i, j) (resumable row by row)."""
        from .tables import LatencyTable

        path = self.wd.file("latency.csv")
        message = (
            f"[1/7] latency table of {len(self.chain.blocks)} blocks on {self.runner.name} "
            f"({self.runner.device})"
        )
        if self.todo("latency", message):
            adopted = self._adopt(self.latency_from, path, "--latency-table", "latency")
            try:
                build_latency_table(
                    self.chain,
                    self.runner,
                    path,
                    batch=self.settings.batch,
                    seed=self.settings.seed,
                    model_name=self.model_name,
                    progress=self.progress,
                )
            except TableError as exc:
                for p in adopted:  # a refused table leaves no copy behind
                    p.unlink(missing_ok=True)
                raise TableError(f"{exc} (with compress: pass --redo latency)") from None
            self.finished("latency")
        self.latency = LatencyTable.read_csv(path)
        n = self.chain.num_positions
        self.original_ms = sum(self.latency.time_of(k, k + 1) for k in range(n))
        return True

    def optimal_stage(self) -> bool:
        """Stage 1: T_opt and its break points for every block."""
        from .dp import optimal_latency
        from .tables import OptimalLatencyTable

        path = self.wd.file("opt_latency.csv")
        if self.todo("optimal", "[2/7] optimal latency table (stage 1)"):
            optimal_latency(self.latency).write_csv(path)
            self.finished("optimal")
        self.opt = OptimalLatencyTable.read_csv(path)
        self._check_reachable()
        return True

    def _check_reachable(self) -> None:
        """Refuse a budget below the fastest tiling of the chain by valid blocks, known from the
        latency table alone, before any importance entry is fine-tuned."""
        from .dp import optimal_boundaries

        _, fastest = optimal_boundaries(self.latency, ())
        budget_ms = self.settings.budget.resolve(self.original_ms)
        if budget_ms < fastest * (1 - 1e-9) - 1e-12:
            raise self._unreachable(budget_ms, fastest, "no importance entry was computed")

    def _unreachable(self, budget_ms: float, fastest: float, kept: str) -> BudgetError:
        """The error for a budget below the fastest plan: the smallest feasible fraction, or why
        nothing can be merged profitably when the fastest plan is the original network."""
        original_ms, budget = self.original_ms, self.settings.budget
        head = (
            f"budget {budget} = {budget_ms:.4f} ms is below the fastest plan the tables allow, "
            f"{fastest:.4f} ms ({fastest / original_ms:.3f}x of the original {original_ms:.4f} ms)"
        )
        tail = f". The tables are kept; {kept}"
        if fastest < original_ms * (1 - 1e-9):
            least = math.ceil(1000 * fastest / original_ms) / 1000
            return BudgetError(f"{head}: raise --budget to at least {least:.3f}x{tail}")
        return BudgetError(
            f"{head}: nothing can be merged profitably, because {self._why_no_gain()}, so the "
            f"original network is the fastest plan and no budget below 1x can be met{tail}"
        )

    def _why_no_gain(self) -> str:
        """Why no plan is faster than the original chain, in words."""
        chain = self.chain
        if len(chain.blocks) > chain.num_positions:
            return (
                f"every merged block is as slow as or slower than its convolutions run one by "
                f"one on {self.runner.name} at batch {self.settings.batch} (try another --backend "
                "or --batch)"
            )
        other = (
            "merged kernels larger than --max-kernel-size or residuals that cannot be fused; see "
            "depthcompress inspect"
        )
        barriers = list(chain.barriers.items())
        if not barriers:
            return f"no two consecutive convolutions form a valid block ({other})"
        shown = "; ".join(f"position {p}: {why}" for p, why in barriers[:3])
        more = f"; and {len(barriers) - 3} more" if len(barriers) > 3 else ""
        if len(barriers) >= chain.num_positions - 1:
            return (
                "no two consecutive convolutions can merge: every position between them is a "
                f"hard boundary ({shown}{more}; see depthcompress inspect)"
            )
        return (
            f"no two consecutive convolutions form a valid block: hard boundaries ({shown}{more}) "
            f"and, elsewhere, {other}"
        )

    def importance_stage(self) -> bool:
        """The importance table I(i, j) (resumable row by row)."""
        from .tables import ImportanceTable

        path = self.wd.file("importance.csv")
        message = f"[3/7] importance table ({self.settings.workers} worker(s))"
        if self.todo("importance", message):
            adopted = self._adopt(self.importance_from, path, "--importance-table", "importance")
            try:
                importance_table(
                    self.original,
                    self.chain,
                    self.data,
                    path,
                    settings=self.settings.importance,
                    workers=self.settings.workers,
                    device=str(self.device) if self.settings.device is not None else "cpu",
                    progress=self.progress,
                    model_name=self.model_name,
                    log=self.say,
                )
            except TableError as exc:
                for p in adopted:  # a refused table leaves no copy behind
                    p.unlink(missing_ok=True)
                raise TableError(f"{exc} (with compress: pass --redo importance)") from None
            self.finished("importance")
        self.importance = ImportanceTable.read_csv(path)
        return True

    def _adopt(self, source: Path | None, path: Path, flag: str, kind: str) -> list[Path]:
        """Copy an adopted table ``source`` (and its sidecar) to ``path`` unless a table is
        there; the stage then resumes it through the table's own sidecar check."""
        if source is None or path.exists():
            return []
        copies = []
        for src, dst in ((source, path), (sidecar_path(source), sidecar_path(path))):
            if not src.is_file():
                raise TableError(f"{flag}: {src} does not exist")
            shutil.copy2(src, dst)
            copies.append(dst)
        self.say(f"adopted the {kind} table {source}")
        return copies

    def solve_stage(self) -> bool:
        """Stage 2: the plan within the budget, and the Pareto front for the report."""
        from .dp import min_latency, solve, sweep

        s, original_ms = self.settings, self.original_ms
        budget_ms = s.budget.resolve(original_ms)
        path = self.wd.file("plan.json")
        message = f"[4/7] solve (stage 2) for budget {s.budget} = {budget_ms:.4f} ms"
        fastest = min_latency(self.opt, self.importance)
        if budget_ms < fastest - 1e-12:  # checked before anything is moved or written
            raise self._unreachable(budget_ms, fastest, "nothing else was changed")
        if self.todo("solve", message):
            sol = solve(self.opt, self.importance, budget_ms, alpha=s.alpha)
            budgets = sorted({*_grid(fastest, original_ms), budget_ms})
            _write_front(
                self.wd.file("front.csv"), sweep(self.opt, self.importance, budgets, alpha=s.alpha)
            )
            write_json(
                path,
                {
                    **sol.to_dict(),
                    "budget_spec": str(s.budget),
                    "original_latency": original_ms,
                    "fastest_latency": fastest,
                },
            )
            self.finished("solve")
        self.budget_ms = budget_ms
        self.plan_data = _read_json(path)
        self.plan = Plan.from_dict(self.plan_data)
        self.plan.validate(self.chain)
        return True

    def finetune_stage(self) -> bool:
        """Fine-tune the linearized network (resumable per epoch; DDP under torchrun). False on
        the non-main torchrun ranks, which stop here."""
        cfg = self.settings.finetune
        lin = linearize(self.original, self.chain, self.plan)
        path = self.wd.file("finetuned.pt")
        message = (
            f"[5/7] fine-tune the linearized network: {cfg.epochs} epoch(s), {cfg.optimizer}, "
            f"lr {cfg.lr:g}" + (f", distillation {cfg.distill:g}" if cfg.distill else "")
        )
        if self.todo("finetune", message):
            result = finetune(
                lin,
                self.data.train,
                cfg,
                teacher=copy.deepcopy(self.original) if cfg.distill > 0 else None,
                checkpoint_dir=self.wd.file("finetune"),
                holdout_data=self.data.holdout,
                progress=self.progress,
                device=self.device,
                distributed=self.world > 1,
            )
            if self.world > 1:
                end_distributed()
            if self.rank != 0:
                return False
            lin = result.model.cpu().to(memory_format=torch.contiguous_format)
            torch.save(lin.state_dict(), path)
            self.finished(
                "finetune",
                history=[asdict(h) for h in result.history],
                best_accuracy=result.best_accuracy,
            )
        else:
            lin.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.lin = lin.eval()
        return self.rank == 0

    def merge_stage(self) -> bool:
        """Merge, check against the fine-tuned linearized network on real inputs, export."""
        todo = self.todo("merge", "[6/7] merge, verify and export")
        self.merged = merge(self.lin, self.chain, self.plan, verify=True)
        real, _ = fetch(self.test, torch.arange(min(8, len(self.test))))
        with torch.no_grad():
            err = check_close(
                self.lin(real), self.merged(real), "merged network", "fine-tuned linearized one"
            )
        if todo:
            from .export import export_onnx, save_torch

            x = torch.randn(self.shape, generator=torch.Generator().manual_seed(self.settings.seed))
            save_torch(self.merged, self.wd.file("merged.pt"), x)
            onnx_err = export_onnx(self.merged, self.wd.file("merged.onnx"), x)
            self.finished("merge", error=err, onnx_error=onnx_err)
        return True

    def evaluate_stage(self) -> bool:
        """Accuracy and end-to-end latency of both networks; then the report."""
        path = self.wd.file("evaluation.json")
        message = "[7/7] evaluate accuracy and end-to-end latency of both networks"
        if self.todo("evaluate", message):
            nets = (self.original, self.merged)
            # each network timed twice in alternation; the faster of its two medians counts, so
            # a slow phase of a shared machine does not decide the speed-up alone
            times: tuple[list[float], list[float]] = ([], [])
            for _ in range(2):
                for net, samples in zip(nets, times, strict=True):
                    samples.append(self.runner.measure(net, self.shape).median)
            before, after = (
                NetworkStats(
                    accuracy=evaluate(net, self.test),
                    latency=min(samples),
                    depth=conv_depth(net),
                    params=sum(p.numel() for p in net.parameters()),
                )
                for net, samples in zip(nets, times, strict=True)
            )
            evaluation = {
                "original": asdict(before),
                "compressed": asdict(after),
                "speedup": before.latency / after.latency,
                "predicted_speedup": self.original_ms / self.plan_data["latency"],
                "test_set": "test" if self.test_data is not None else "held-out split",
                "backend": self.runner.info(),
                "batch": self.settings.batch,
                "input_shape": list(self.shape),
                "machine": machine_info(),
                "versions": versions(),
            }
            write_json(path, evaluation)
            self.finished("evaluate")
        self.evaluation = _read_json(path)
        from .report import write_report

        write_report(self.wd.path, chain=self.chain, latency=self.latency, opt=self.opt)
        return True

    def result(self) -> CompressResult:
        return CompressResult(
            workdir=self.wd.path,
            merged=self.merged,
            plan=self.plan,
            budget_ms=self.budget_ms,
            original=NetworkStats(**self.evaluation["original"]),
            compressed=NetworkStats(**self.evaluation["compressed"]),
            evaluation=self.evaluation,
            files=_files(self.wd),
            ran=self.ran,
        )


def _check_adopted_latency(
    source: Path, chain: ConvChain, runner: Backend, settings: CompressSettings, model_name: str
) -> None:
    """Refuse an adopted latency table of another chain or settings before anything is
    written (the latency stage checks its copy the same way when it resumes it)."""
    if not source.is_file():
        raise TableError(f"--latency-table: {source} does not exist")
    fix = (
        "Adopt a table that 'depthcompress latency' made for this model with compress's "
        "settings (--batch, --backend, --device, --threads, --mode, --exclude, "
        "--max-kernel-size, --seed, the default timing flags), or leave --latency-table out; "
        "nothing was written"
    )
    meta = table_meta(
        chain, runner, batch=settings.batch, seed=settings.seed, model_name=model_name
    )
    try:
        check_meta(source, read_meta(source, fix), meta, fix)
    except TableError as exc:
        raise TableError(f"--latency-table: {exc}") from None


def _grid(fastest: float, original: float, n: int = 40) -> list[float]:
    """Budgets from the fastest plan to the original latency, for the report's front."""
    top = max(original, fastest) * 1.0001
    return [fastest + (top - fastest) * k / (n - 1) for k in range(n)]


def _write_front(path: Path, front: Any) -> None:  # front: dp.Sweep
    lines = ["latency,importance"] + [f"{lat!r},{imp!r}" for lat, imp in front.front]
    path.write_text("\n".join(lines) + "\n")


def versions() -> dict[str, str | None]:
    """Versions of the software that produced a result."""
    from . import __version__

    return {
        "depthcompress": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onnx": package_version("onnx"),
        "onnxruntime": package_version("onnxruntime"),
        "numpy": package_version("numpy"),
    }
