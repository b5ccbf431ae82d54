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

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import nn
from torch.fx import GraphModule

from .backends import (
    GPU_BACKENDS,
    Backend,
    Protocol,
    backend_key,
    get_backend,
    machine_info,
    package_version,
)
from .calibration import Calibration, calibrate, calibrated_config_times, calibrated_table
from .data import SplitData, fetch, fingerprint, num_classes
from .defaults import FINETUNE_LR, NO_REDUCIBLE
from .devices import device_name, resolve_device
from .dp import (
    NORMS,
    Budget,
    ConfigTables,
    config_tables,
    min_latency_configs,
    optimal_boundaries,
    optimal_latency,
    original_latency,
    resolve_norm,
    solve_configs,
    sweep_configs,
)
from .errors import BudgetError, DepthCompressError, TableError, WidthError, WorkdirError, plain
from .files import json_sha, nested_diff, sidecar_path, write_json
from .finetune import FinetuneConfig, end_distributed, evaluate, finetune
from .graph import ConvChain, trace
from .importance import (
    DEFAULT_SUBSETS,
    SCORE,
    FinetuneSettings,
    config_importance_table,
    importance_table,
    weights_sha,
)
from .latency import build_latency_table, chain_sha, check_meta, read_meta, table_meta
from .linearization import linearize
from .lrprobe import ProbeResult, ProbeSettings, control_record, control_warning, probe_lr
from .merging import check_close, merge
from .plan import Plan
from .progress import LOG, Reporter, tell
from .speedup import Rule, SpeedupResult, paired_speedup
from .tables import (
    ConfigImportanceRow,
    ConfigLatencyRow,
    ImportanceTable,
    LatencyTable,
    OptimalLatencyTable,
    read_config_importance_rows,
    read_config_latency_rows,
)
from .width import WidthResult
from .widthsearch import DepthTables, Measured, WidthSearch, measure_ratio, score

MANIFEST = "stages.json"
RUN = "run.json"

EVALUATE_RULE = Rule(max_time=60.0)
"""The evaluate stage's default paired-timing rule: rounds until the 95 % interval is within
±2 % or 60 s of rounds are spent (``CompressSettings.speedup_rule`` overrides it)."""


# ---------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True, kw_only=True)
class CompressSettings:
    """Everything ``compress`` needs besides the model and the data. ``batch`` is the batch size
    the latency table, the end-to-end timing and the ONNX file use: pick the deployment's.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``; default: the GPU if there is one) is where
    fine-tuning runs, and where the torch and tensorrt backends time (torch: the CPU when
    ``device`` is None). ONNX Runtime and OpenVINO always time on the CPU, whatever ``device``.

    ``speedup_rule`` bounds the evaluate stage's paired timing (``speedup.Rule``); it is recorded
    in ``evaluation.json`` but is no stage setting, so changing it refuses no finished run.

    ``budget_mode`` says what the budget is of: ``"whole"`` (default) the whole network's
    latency on the backend (``0.6x`` = 60 % of the measured original; ms = whole-network ms),
    through the calibration (``calibration.py``: ``calibration_plans`` plans timed whole in
    paired rounds under ``calibration_rule``); ``"chain"`` Σ T of the latency table (the meaning
    before calibration existed: no whole network is timed before fine-tuning).
    ``budget_or_fastest`` takes the fastest plan (with a note) where the budget is below it,
    instead of refusing the run: the demo's setting.

    ``lr_probe`` (None: off, the configured lr is used) probes the fine-tuning lr first on the
    network that is fine-tuned (the original, or with width the pruned one; ``lrprobe``): the
    largest of lr, lr/4, ... that keeps its held-out accuracy.
    ``width`` > 0 channel-prunes that fraction of every layer's channels first (``width.py``,
    Torch-Pruning, ``width_importance`` "l1" or "taylor"); the depth stages then work on the
    pruned network, distilled from the unpruned original, and the budget stays a fraction of
    the unpruned original's whole latency (budget_mode "whole" only). Kept channels are
    multiples of ``width_round_to`` (default: 16 on the CPU backends, 8 on a GPU).
    ``width_search`` (candidate ratios, 0 among them; ``width`` then 0) chooses the ratio itself
    (``widthsearch.py``, ``--width auto``): the original's tables in ``WORKDIR/width-search``,
    every candidate scored into ``width_search.json``, then the run with the chosen ratio.

    ``prune_layers`` adds layer pruning inside merged blocks (LayerMerge, docs/layermerge.md):
    configuration tables beside the latency and importance tables (``prune_subsets`` pruned
    subsets measured per configuration) and stage 2 over (segment, configuration).
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
    norm: str | None = None
    finetune: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(epochs=3, lr=FINETUNE_LR, batch_size=128)
    )
    device: str | torch.device | None = None
    seed: int = 0
    speedup_rule: Rule = field(default_factory=lambda: EVALUATE_RULE)
    budget_mode: str = "whole"
    calibration_rule: Rule = field(default_factory=lambda: Rule(max_time=10.0))
    calibration_plans: int = 3
    budget_or_fastest: bool = False
    lr_probe: ProbeSettings | None = None
    width: float = 0.0
    width_search: tuple[float, ...] = ()
    width_importance: str = "l1"
    width_round_to: int | None = None
    prune_layers: bool = False
    prune_subsets: int = DEFAULT_SUBSETS

    def __post_init__(self) -> None:
        problems = []
        if self.prune_subsets < 1:
            problems.append(f"prune_subsets must be ≥ 1, got {self.prune_subsets}")
        if self.batch < 1:
            problems.append(f"batch must be ≥ 1, got {self.batch}")
        if self.workers < 1:
            problems.append(f"workers must be ≥ 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be ≥ 1, got {self.threads}")
        if self.budget_mode not in ("whole", "chain"):
            problems.append(f"budget_mode must be 'whole' or 'chain', got {self.budget_mode!r}")
        if self.calibration_plans < 1:
            problems.append(f"calibration_plans must be ≥ 1, got {self.calibration_plans}")
        if self.norm not in (None, "auto", *NORMS):
            problems.append(f"norm must be one of auto, {', '.join(NORMS)}; got {self.norm!r}")
        if self.mode not in ("general", "reference"):
            problems.append(f"mode must be 'general' or 'reference', got {self.mode!r}")
        problems += self._width_problems()
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

    def _width_problems(self) -> list[str]:
        """What is wrong with the width settings (none when they are fine)."""
        from .width import IMPORTANCES

        problems = []
        if not 0 <= self.width < 1:
            problems.append(f"width is a fraction of channels in [0, 1), got {self.width}")
        if self.width_importance not in IMPORTANCES:
            problems.append(f"width_importance must be one of {IMPORTANCES}")
        if self.width_round_to is not None and self.width_round_to < 1:
            problems.append(f"width_round_to must be ≥ 1, got {self.width_round_to}")
        if (self.width > 0 or self.width_search) and self.budget_mode != "whole":
            problems.append("width needs budget_mode 'whole' (the original's whole latency)")
        if self.width_search:
            if self.width > 0:
                problems.append("give width or width_search (the candidates), not both")
            if 0.0 not in self.width_search or not all(0 <= r < 1 for r in self.width_search):
                problems.append(
                    f"width_search holds ratios in [0, 1) and 0 (depth alone), got "
                    f"{self.width_search}"
                )
        return problems

    def importance_norm(self) -> str:
        """The score normalisation stage 2 uses (``dp.resolve_norm``)."""
        return resolve_norm(self.norm, self.prune_layers)

    def width_settings(self) -> dict[str, Any]:
        """What decides the width stage's pruned network (empty when ``width`` is 0)."""
        if self.width <= 0:
            return {}
        return {
            "ratio": self.width,
            "importance": self.width_importance,
            "round_to": self.channel_round_to(),
        }

    def channel_round_to(self) -> int:
        """The multiple kept channel counts are rounded to: ``width_round_to``, or what the
        backend runs fast (``width.default_round_to``)."""
        from .width import default_round_to

        return self.width_round_to or default_round_to(self.backend, self.timing_device())

    def timing_backend(self) -> Backend:
        """The latency backend of these settings (threads, protocol, timing device), checked."""
        return get_backend(
            self.backend,
            threads=self.threads,
            protocol=self.protocol,
            device=self.timing_device(),
        )

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
        width = self.width_settings()
        if width:  # absent without width: older work directories resume
            lat, imp = {**lat, "width": width}, {**imp, "width": width}
        budget = {"value": self.budget.value, "relative": self.budget.relative}
        calibrate = {
            **lat,
            "rule": asdict(self.calibration_rule),
            "plans": self.calibration_plans,
        }
        solve = {**lat, **imp, "budget": budget, "alpha": self.alpha}
        if self.budget_mode == "whole":  # absent in "chain" mode: older work directories resume
            solve = {**solve, "budget_mode": "whole", "calibration": calibrate}
        if self.importance_norm() != "single":  # absent for the paper's: older ones resume
            solve = {**solve, "norm": self.importance_norm()}
        if self.prune_layers:  # absent when off: older work directories resume
            solve = {**solve, "prune_layers": {"subsets": self.prune_subsets}}
        tune = {**solve, "finetune": self.finetune.to_dict()}
        probe: dict[str, Any] = {}
        if self.lr_probe is not None:  # absent when off: older work directories resume
            probe = {"finetune": self.finetune.to_dict(), "lr_probe": asdict(self.lr_probe)}
            probe["finetune"].pop("epochs")
            if width:  # the probed network is the width-pruned one
                probe["width"] = width
            tune = {**tune, "lr_probe": probe["lr_probe"]}
        return {
            "width": {**lat, "rule": asdict(self.calibration_rule)} if width else {},
            "latency": lat,
            "optimal": lat,
            "calibrate": calibrate,
            "probe": probe,
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
        """Measured end-to-end speed-up of the merged network over the original (the paired
        median ratio of ``evaluation.json``; the latency ratio for older work directories)."""
        return float(
            self.evaluation.get("speedup", self.original.latency / self.compressed.latency)
        )


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
                + _width_hint(diff)
            )
        return True

    def finish(self, stage: str, settings: dict[str, Any], **info: Any) -> None:
        manifest = self.manifest()
        manifest[stage] = {"settings": _normalised(settings), **info}
        write_json(self.file(MANIFEST), manifest)

    def new_previous(self) -> Path:
        """A new, empty ``previous/N/`` folder for files set aside (the first free N)."""
        k = 1
        while self.file(f"previous/{k}").exists():
            k += 1
        target = self.file(f"previous/{k}")
        target.mkdir(parents=True)
        return target

    def redo(self, stage: str) -> Path | None:
        """Move ``stage``'s and every later stage's files (with those of the unrecorded stages
        that are ``part_of`` them) to ``previous/N/``; returns that folder (None when there was
        nothing to move)."""
        if stage not in STAGES:
            raise WorkdirError(f"--redo must name one of the stages {', '.join(STAGES)}")
        later = STAGES[STAGES.index(stage) :]
        manifest = self.manifest()
        present = [self.file(f) for s in later for f in REDO_FILES[s] if self.file(f).exists()]
        if not present and not any(s in manifest for s in later):
            return None
        target = self.new_previous()
        for p in present:
            shutil.move(str(p), str(target / p.name))
        if any(s in manifest for s in later):
            write_json(target / MANIFEST, {s: manifest[s] for s in later if s in manifest})
            write_json(self.file(MANIFEST), {s: v for s, v in manifest.items() if s not in later})
        return target


def _width_hint(diff: list[str]) -> str:
    """What a refusal adds when the width changed: width has no stage name of its own."""
    if not any(d.startswith("width") for d in diff):
        return ""
    return (
        ". The width (--width) is chosen before the latency table, which times the pruned "
        "network: a new width takes --redo latency"
    )


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
# the pipeline: a typed context and one class per stage


Log = Callable[[str], None]
_T = TypeVar("_T")


def _need(value: _T | None, name: str) -> _T:
    """A context field a stage reads; an error in the stage list when no earlier stage filled it."""
    if value is None:
        raise RuntimeError(f"RunContext.{name} is read before a stage filled it")
    return value


@dataclass(kw_only=True)
class RunContext:
    """Everything one ``compress`` call's stages share: its inputs, then each stage's results
    (None until the stage that fills them has run or loaded its files)."""

    wd: Workdir
    settings: CompressSettings
    chain: ConvChain
    original: nn.Module
    data: SplitData
    test: Any
    test_kind: str
    shape: tuple[int, ...]
    model_name: str
    runner: Backend
    device: torch.device
    stage_settings: dict[str, dict[str, Any]]
    rank: int = 0
    world: int = 1
    command: str = ""
    say: Log = LOG.info
    progress: Reporter | None = None
    importance_from: Path | None = None
    latency_from: Path | None = None
    ran: list[str] = field(default_factory=list)
    # filled by the stages, in order
    network: nn.Module | None = None
    pruning: bool = False  # layer pruning on and the (width-pruned) chain has a reducible conv
    width: dict[str, Any] | None = None
    latency: LatencyTable | None = None
    original_ms: float | None = None
    opt: OptimalLatencyTable | None = None
    calibration: Calibration | None = None
    importance: ImportanceTable | None = None
    config_time: dict[tuple[int, int, int], float] | None = None
    config_rows: list[ConfigImportanceRow] | None = None
    budget_ms: float | None = None
    fastest_ms: float | None = None
    plan_data: dict[str, Any] | None = None
    plan: Plan | None = None
    probe: ProbeResult | None = None
    lin: GraphModule | None = None
    tuned_accuracy: float | None = None
    merged: nn.Module | None = None
    evaluation: dict[str, Any] | None = None

    def result(self) -> CompressResult:
        """The finished run as ``compress`` returns it."""
        evaluation = _need(self.evaluation, "evaluation")
        return CompressResult(
            workdir=self.wd.path,
            merged=_need(self.merged, "merged"),
            plan=_need(self.plan, "plan"),
            budget_ms=_need(self.budget_ms, "budget_ms"),
            original=NetworkStats(**evaluation["original"]),
            compressed=NetworkStats(**evaluation["compressed"]),
            evaluation=evaluation,
            files=_files(self.wd),
            ran=self.ran,
        )


class Stage(ABC):
    """One step of ``compress``. It writes ``files`` (relative to the work directory), reads the
    context fields named in ``reads``, and is keyed in ``stages.json`` by ``settings``: ``run``
    computes and writes its files, ``load`` fills the context from them when it finished before.

    ``recorded`` False: never in ``stages.json`` (nor a ``--until``/``--redo`` name), always
    run; ``part_of`` names the recorded stage whose ``--redo`` moves its files too (None: they
    are reused while their own settings hold). ``torchrun``: may run under torchrun.
    ``main_only``: only rank 0 goes on to it. ``run_fills``: ``run`` leaves its results on the
    context itself, so ``load`` is not called after it (otherwise the files just written are
    read back, as a later run would).
    """

    name: ClassVar[str]
    files: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()
    recorded: ClassVar[bool] = True
    part_of: ClassVar[str | None] = None
    torchrun: ClassVar[bool] = False
    main_only: ClassVar[bool] = False
    run_fills: ClassVar[bool] = False

    def settings(self, ctx: RunContext) -> dict[str, Any]:
        """The settings that decide this stage's result (those of the stages it reads included)."""
        return ctx.stage_settings.get(self.name, {})

    def message(self, ctx: RunContext) -> str:
        """What the stage does, said when it starts."""
        return self.name

    def check(self, ctx: RunContext) -> None:
        """Refusals due before anything of this stage is moved or written (none by default)."""
        return None

    @abstractmethod
    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        """Compute and write the stage's files; returns what ``stages.json`` records besides the
        settings, or None when this process records nothing (a non-main torchrun rank)."""

    @abstractmethod
    def load(self, ctx: RunContext) -> None:
        """Fill the context from the stage's files."""


class WidthStage(Stage):
    """Width before depth: with ``settings.width`` > 0, the original channel-pruned by
    Torch-Pruning becomes the network (and chain) every later stage works on; ``width.json``
    holds the kept channels and the paired speed-up of the pruned network over the original.
    Not recorded: a resume prunes again (deterministic) and checks the recorded channels and
    weights, and the later stages' settings name the width, so a new width is refused until
    ``--redo latency``, which moves ``width.json`` too. It also decides ``ctx.pruning`` on the
    chain the later stages see."""

    name = "width"
    files = ("width.json",)
    recorded = False
    part_of = "latency"
    run_fills = True

    def run(self, ctx: RunContext) -> dict[str, Any]:
        ctx.network = ctx.original
        if ctx.settings.width > 0:
            self._narrow(ctx)
        ctx.pruning = ctx.settings.prune_layers and _reducible_or_say(ctx.chain, ctx.say)
        return {}

    def load(self, ctx: RunContext) -> None:
        self.run(ctx)

    def _narrow(self, ctx: RunContext) -> None:
        """Prune the original's channels (or check the recorded pruning): the network and
        chain the later stages work on."""
        s = ctx.settings
        pruned = self._prune(ctx)
        record = _kept_json(ctx, "width.json", self.settings(ctx))
        if record is None:
            record = self._measure(ctx, pruned)
        elif record["kept"] != pruned.kept_json() or record["weights"] != weights_sha(pruned.model):
            raise WorkdirError(
                f"pruning the original again did not give the network recorded in "
                f"{ctx.wd.file('width.json')} (another Torch-Pruning or torch?): use another "
                "--workdir, or pass --redo latency (which moves width.json too)"
            )
        example = torch.randn(1, *ctx.shape[1:], generator=torch.Generator().manual_seed(s.seed))
        ctx.network, ctx.width = pruned.model, record
        ctx.chain = trace(
            pruned.model,
            example,
            mode=s.mode,
            max_kernel_size=s.max_kernel_size,
            exclude=s.exclude,
        )

    @staticmethod
    def _prune(ctx: RunContext) -> WidthResult:
        """The pruned network, from the original's weights (Taylor: its held-out gradients)."""
        return prune_original(ctx.original, ctx.settings.width, ctx.data, ctx.settings, ctx.shape)

    def _measure(self, ctx: RunContext, pruned: WidthResult) -> dict[str, Any]:
        """Time the pruned network against the original in paired rounds; write width.json."""
        if ctx.world > 1:
            raise WorkdirError("under torchrun compress only fine-tunes: run once without it")
        res = paired_speedup(
            ctx.original,
            pruned.model,
            ctx.runner,
            ctx.shape,
            ctx.settings.calibration_rule,
            names=("original", "pruned"),
        )
        ctx.say(f"width {ctx.settings.width:g}: {res.message}")
        record = {
            "settings": self.settings(ctx),
            **ctx.settings.width_settings(),
            "kept": pruned.kept_json(),
            "weights": weights_sha(pruned.model),
            "params": [_params(ctx.original), _params(pruned.model)],
            "original_ms": res.latency_a_ms,
            "pruned_ms": res.latency_b_ms,
            "speedup": res.speedup,
            "interval": [res.low, res.high],
            "converged": res.converged,
        }
        write_json(ctx.wd.file("width.json"), record)
        return _normalised(record)


def prune_original(
    original: nn.Module,
    ratio: float,
    data: SplitData,
    settings: CompressSettings,
    shape: tuple[int, ...],
) -> WidthResult:
    """``original`` channel-pruned by ``ratio`` as the width stage and the width search prune it:
    ``settings``' importance and rounding, a seeded example input, Taylor importance from the
    gradients of up to 64 held-out examples."""
    from .width import prune_width

    holdout = data.holdout
    batch = fetch(holdout, torch.arange(min(64, len(holdout))))
    example = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(settings.seed))
    return prune_width(
        original,
        example,
        ratio,
        round_to=settings.channel_round_to(),
        importance=settings.width_importance,
        batches=[batch] if settings.width_importance == "taylor" else [],
    )


def _params(net: nn.Module) -> int:
    """The network's parameter count."""
    return sum(p.numel() for p in net.parameters())


class LatencyStage(Stage):
    """The latency table T(i, j) (resumable row by row); the original chain's latency."""

    name = "latency"
    files = ("latency.csv", "latency.csv.json", "latency.csv.passes")

    def message(self, ctx: RunContext) -> str:
        return (
            f"latency table of {len(ctx.chain.blocks)} blocks on {ctx.runner.name} "
            f"({ctx.runner.device})"
        )

    def run(self, ctx: RunContext) -> dict[str, Any]:
        s, path = ctx.settings, ctx.wd.file("latency.csv")
        with _adopting(ctx, ctx.latency_from, path, "--latency-table", "latency"):
            build_latency_table(
                ctx.chain,
                ctx.runner,
                path,
                batch=s.batch,
                seed=s.seed,
                model_name=ctx.model_name,
                progress=ctx.progress,
            )
        return {}

    def load(self, ctx: RunContext) -> None:
        ctx.latency = LatencyTable.read_csv(ctx.wd.file("latency.csv"))
        n = ctx.chain.num_positions
        ctx.original_ms = sum(ctx.latency.time_of(k, k + 1) for k in range(n))


class OptimalStage(Stage):
    """Stage 1: T_opt and its break points for every block; refuses a budget below the fastest
    tiling of the chain before any importance entry is fine-tuned."""

    name = "optimal"
    files = ("opt_latency.csv",)
    reads = ("latency", "original_ms")

    def message(self, ctx: RunContext) -> str:
        return "optimal latency table (stage 1)"

    def run(self, ctx: RunContext) -> dict[str, Any]:
        optimal_latency(_need(ctx.latency, "latency")).write_csv(ctx.wd.file("opt_latency.csv"))
        return {}

    def load(self, ctx: RunContext) -> None:
        ctx.opt = OptimalLatencyTable.read_csv(ctx.wd.file("opt_latency.csv"))
        _, fastest = optimal_boundaries(_need(ctx.latency, "latency"), ())
        budget_ms = ctx.settings.budget.resolve(_need(ctx.original_ms, "original_ms"))
        chain_mode = ctx.settings.budget_mode == "chain"  # "whole": checked once calibrated
        if chain_mode and not ctx.pruning and budget_ms < fastest * (1 - 1e-9) - 1e-12:
            _below_fastest(
                ctx, _unreachable(ctx, budget_ms, fastest, "no importance entry was computed")
            )


def _kept_json(
    ctx: RunContext, name: str, settings: dict[str, Any], other: str = ""
) -> dict[str, Any] | None:
    """An unrecorded stage's JSON ``name`` if made with ``settings``; one made with others is
    moved to ``previous/N/`` (None), and refused under torchrun."""
    path = ctx.wd.file(name)
    if not path.exists():
        return None
    data = _read_json(path)
    if data.get("settings") == _normalised(settings):
        return data
    if ctx.world > 1:
        raise WorkdirError(f"{path} was made with other settings: run once without torchrun")
    target = ctx.wd.new_previous()
    shutil.move(str(path), str(target / path.name))
    ctx.say(f"moved {path.name}, made with other settings{other}, to {target}")
    return None


class CalibrateStage(Stage):
    """With ``budget_mode="whole"``: the latency table calibrated against whole-network timings
    of a few plans (``calibration.json``, reused while its settings and table hold), the budget
    converted to the calibrated table, and refused here, before any importance entry, when no
    plan meets it. Not recorded: it decides nothing the solve stage's settings do not name;
    ``--redo latency`` moves it."""

    name = "calibrate"
    files = ("calibration.json",)
    reads = ("latency", "opt", "original_ms", "network")
    recorded = False
    part_of = "latency"
    run_fills = True

    def settings(self, ctx: RunContext) -> dict[str, Any]:
        table = _need(ctx.latency, "latency")
        out = {**super().settings(ctx), "table_sha256": json_sha(table.time.tolist())}
        if ctx.pruning:  # its plans prune convs too; absent without: older calibrations resume
            times = sorted(_need(ctx.config_time, "config_time").items())
            out["configs_sha256"] = json_sha([[*k, t] for k, t in times])
        return out

    def run(self, ctx: RunContext) -> dict[str, Any]:
        if ctx.settings.budget_mode != "whole":
            return {}
        cal = self._kept(ctx) or self._measure(ctx)
        latency = calibrated_table(_need(ctx.latency, "latency"), cal.fit)
        ctx.calibration, ctx.opt = cal, optimal_latency(latency)
        ctx.original_ms = original_latency(latency)
        _, fastest = optimal_boundaries(latency, ())
        budget = cal.table_budget(ctx.settings.budget)
        ctx.say(_calibration_line(ctx, cal, budget))
        if ctx.pruning:
            _refuse_unreachable_configs(ctx)
        elif budget < fastest * (1 - 1e-9) - 1e-12:
            _below_fastest(ctx, _refusal(ctx, budget, fastest, "no importance entry was computed"))
        return {}

    def load(self, ctx: RunContext) -> None:
        self.run(ctx)

    def _kept(self, ctx: RunContext) -> Calibration | None:
        """The calibration in the work directory if made with these settings, else None."""
        data = _kept_json(ctx, "calibration.json", self.settings(ctx), " or another table")
        return Calibration.from_dict(data) if data is not None else None

    def _measure(self, ctx: RunContext) -> Calibration:
        """Time the plans whole and fit; write ``calibration.json``."""
        s = ctx.settings
        if ctx.world > 1:
            raise WorkdirError(
                "under torchrun compress only fine-tunes, but the latency table is not "
                "calibrated yet: run the same command once without torchrun and --until solve"
            )
        ctx.say(
            f"calibrate the latency table: {s.calibration_plans} plan(s) and the original "
            f"timed whole on {ctx.runner.name}, paired with the original"
        )
        cal = calibrate(
            _need(ctx.network, "network"),
            ctx.chain,
            _need(ctx.latency, "latency"),
            ctx.runner,
            ctx.shape,
            s.calibration_rule,
            count=s.calibration_plans,
            seed=s.seed,
            config_time=ctx.config_time if ctx.pruning else None,
        )
        if ctx.width is not None:  # the budget is of the unpruned original
            cal = replace(cal, original_whole_ms=cal.original_whole_ms * ctx.width["speedup"])
        meaning = (
            "budget_mode 'whole': a budget of r x is r × original_whole_ms of the whole network "
            "(ms budgets are whole-network ms); the DP solves on T' = a·T + o per block (stage 1 "
            "recomputed) with the budget less c, and predicts whole = c + Σ T'_opt"
            + (
                "; with width, the points time the pruned network and original_whole_ms is its "
                "whole latency × width.json's paired speed-up (the unpruned original's)"
                if ctx.width is not None
                else ""
            )
        )
        data = {"settings": self.settings(ctx), **cal.to_dict(), "meaning": meaning}
        write_json(ctx.wd.file("calibration.json"), data)
        return cal


def _set_aside(ctx: RunContext, names: tuple[str, ...], why: str) -> None:
    """Move the work directory's files ``names`` to ``previous/N/`` and say so."""
    present = [ctx.wd.file(n) for n in names if ctx.wd.file(n).exists()]
    if not present:
        return
    target = ctx.wd.new_previous()
    for p in present:
        shutil.move(str(p), str(target / p.name))
    ctx.say(f"moved {', '.join(p.name for p in present)} ({why}) to {target}")


def _built_afresh_if_refused(
    ctx: RunContext, files: tuple[str, ...], build: Callable[[], _T]
) -> _T:
    """``build()`` a table that resumes through its sidecar; when the sidecar refuses it (made
    with other settings), set its ``files`` aside and build it afresh."""
    try:
        return build()
    except TableError as exc:
        _set_aside(ctx, files, f"made with other settings: {exc}")
        return build()


class LatencyConfigStage(Stage):
    """With layer pruning: T(i, j, c) for every configuration c ≥ 1 of every block
    (``latency_configs.csv``, resumable row by row). Not recorded: the table's sidecar guards
    its settings (a table made with others is moved to ``previous/N/``), the solve stage's
    settings name ``prune_layers``, and ``--redo latency`` moves it. A budget below the fastest
    plan the configurations allow is refused here, before any importance entry."""

    name = "latency_configs"
    files = ("latency_configs.csv", "latency_configs.csv.json", "latency_configs.csv.passes")
    recorded = False
    part_of = "latency"
    run_fills = True

    def run(self, ctx: RunContext) -> dict[str, Any]:
        if not ctx.pruning or ctx.world > 1:  # under torchrun: made by the run before
            self.load(ctx)
            return {}
        s, path = ctx.settings, ctx.wd.file(self.files[0])
        ctx.say(f"configuration latency table on {ctx.runner.name} (layer pruning)")
        build = functools.partial(
            build_latency_table,
            ctx.chain,
            ctx.runner,
            path,
            batch=s.batch,
            seed=s.seed,
            model_name=ctx.model_name,
            progress=ctx.progress,
            configs=True,
        )
        result = _built_afresh_if_refused(ctx, self.files, build)
        ctx.config_time = {r.key: r.time for r in result.rows if isinstance(r, ConfigLatencyRow)}
        if s.budget_mode != "whole":  # "whole": the calibrate stage refuses, once calibrated
            _refuse_unreachable_configs(ctx)
        return {}

    def load(self, ctx: RunContext) -> None:
        if ctx.pruning:
            rows = read_config_latency_rows(ctx.wd.file(self.files[0]))
            ctx.config_time = {r.key: r.time for r in rows}


class ImportanceConfigStage(Stage):
    """With layer pruning: I(i, j, x, y, c) for every configuration entry, the best of
    ``prune_subsets`` pruned subsets each (``importance_configs.csv``, resumable row by row; one
    process). Not recorded, like ``LatencyConfigStage``; ``--redo importance`` moves it."""

    name = "importance_configs"
    files = ("importance_configs.csv", "importance_configs.csv.json")
    recorded = False
    part_of = "importance"
    run_fills = True

    def run(self, ctx: RunContext) -> dict[str, Any]:
        if not ctx.pruning or ctx.world > 1:  # under torchrun: made by the run before
            self.load(ctx)
            return {}
        s, path = ctx.settings, ctx.wd.file(self.files[0])
        build = functools.partial(
            config_importance_table,
            _need(ctx.network, "network"),
            ctx.chain,
            ctx.data,
            path,
            subsets=s.prune_subsets,
            **_importance_kwargs(ctx),
        )
        result = _built_afresh_if_refused(ctx, self.files, build)
        if result.computed:
            ctx.say(
                f"configuration importance: {result.computed} entries computed with "
                f"{result.finetunes} fine-tunes in {result.seconds:.1f} s"
            )
        ctx.config_rows = result.rows
        return {}

    def load(self, ctx: RunContext) -> None:
        if ctx.pruning:
            ctx.config_rows = read_config_importance_rows(ctx.wd.file(self.files[0]))


def _importance_kwargs(ctx: RunContext) -> dict[str, Any]:
    """What both importance tables take from the run: settings, device, progress, name, log."""
    s = ctx.settings
    return {
        "settings": s.importance,
        "device": str(ctx.device) if s.device is not None else "cpu",
        "progress": ctx.progress,
        "model_name": ctx.model_name,
        "log": ctx.say,
    }


def _config_times(ctx: RunContext) -> dict[tuple[int, int, int], float]:
    """T(i, j, c) of the configuration table, calibrated like the latency table in "whole"
    mode."""
    times = dict(_need(ctx.config_time, "config_time"))
    return calibrated_config_times(times, ctx.calibration.fit) if ctx.calibration else times


def _config_problem(ctx: RunContext) -> ConfigTables:
    """Stage 2's input with layer pruning: today's tables as configuration 0 and the
    configuration tables (calibrated like the latency table in "whole" mode)."""
    return config_tables(
        _need(ctx.opt, "opt"),
        _need(ctx.importance, "importance"),
        _config_times(ctx),
        _need(ctx.config_rows, "config_rows"),
        alpha=ctx.settings.alpha,
        norm=ctx.settings.importance_norm(),
    )


def _fastest_with_configs(ctx: RunContext) -> float:
    """The fastest tiling of the chain by T_opt segments and configuration blocks, activation
    flags ignored: a lower bound of stage 2's fastest plan, known before any importance entry."""
    opt = _need(ctx.opt, "opt")
    edges = {(i, j): opt.time_of(i, j) for i, j in opt.index}
    for (i, j, _), t in _config_times(ctx).items():
        edges[i, j] = min(t, edges.get((i, j), math.inf))
    best = [0.0] + [math.inf] * opt.num_positions
    for (i, j), t in sorted(edges.items(), key=lambda e: e[0][1]):
        best[j] = min(best[j], best[i] + t)
    return best[-1]


def _refuse_unreachable_configs(ctx: RunContext) -> None:
    """With layer pruning, refuse a budget below the fastest plan the configurations allow,
    naming the smallest reachable fraction of the original (checked before importance)."""
    budget, fastest = _table_budget(ctx), _fastest_with_configs(ctx)
    if budget < fastest * (1 - 1e-9) - 1e-12:
        _below_fastest(ctx, _refusal(ctx, budget, fastest, "no importance entry was computed"))


def _pruned_line(ctx: RunContext, plan: Plan) -> str:
    """The convolutions a plan prunes, in words."""
    if not plan.pruned:
        return "layer pruning: the plan prunes no convolution"
    names = ", ".join(f"{p} ({ctx.chain.positions[p].conv})" for p in sorted(plan.pruned))
    return f"layer pruning: the plan prunes {len(plan.pruned)} convolution(s): {names}"


class ImportanceStage(Stage):
    """The importance table I(i, j) (resumable row by row)."""

    name = "importance"
    files = ("importance.csv", "importance.csv.json")
    reads = ("network",)

    def message(self, ctx: RunContext) -> str:
        return f"importance table ({ctx.settings.workers} worker(s))"

    def run(self, ctx: RunContext) -> dict[str, Any]:
        s, path = ctx.settings, ctx.wd.file("importance.csv")
        with _adopting(ctx, ctx.importance_from, path, "--importance-table", "importance"):
            importance_table(
                _need(ctx.network, "network"),
                ctx.chain,
                ctx.data,
                path,
                workers=s.workers,
                **_importance_kwargs(ctx),
            )
        return {}

    def load(self, ctx: RunContext) -> None:
        ctx.importance = ImportanceTable.read_csv(ctx.wd.file("importance.csv"))


class SolveStage(Stage):
    """Stage 2: the plan within the budget, and the sweep of budgets the report plots."""

    name = "solve"
    files = ("plan.json", "front.csv")
    reads = ("opt", "importance", "original_ms")

    def message(self, ctx: RunContext) -> str:
        return f"solve (stage 2) for budget {ctx.settings.budget} = {ctx.budget_ms:.4f} ms"

    def check(self, ctx: RunContext) -> None:
        from .dp import min_latency

        if ctx.pruning:
            fastest = min_latency_configs(_config_problem(ctx))
        else:
            fastest = min_latency(_need(ctx.opt, "opt"), _need(ctx.importance, "importance"))
        budget_ms = _table_budget(ctx)
        if budget_ms < fastest - 1e-12:  # checked before anything is moved or written
            _below_fastest(ctx, _refusal(ctx, budget_ms, fastest, "nothing else was changed"))
            budget_ms = fastest
        ctx.budget_ms, ctx.fastest_ms = budget_ms, fastest

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from .dp import solve, sweep
        from .report import write_front_csv

        s, original_ms = ctx.settings, _need(ctx.original_ms, "original_ms")
        opt, importance = _need(ctx.opt, "opt"), _need(ctx.importance, "importance")
        budget_ms, fastest = _need(ctx.budget_ms, "budget_ms"), _need(ctx.fastest_ms, "fastest_ms")
        budgets = sorted({*_grid(fastest, original_ms), budget_ms})
        if ctx.pruning:
            tables = _config_problem(ctx)
            sol, swept = solve_configs(tables, budget_ms), sweep_configs(tables, budgets)
            ctx.say(_pruned_line(ctx, sol.plan))
        else:
            norm = resolve_norm(s.norm, False)  # merging alone, also as --prune-layers' fallback
            sol = solve(opt, importance, budget_ms, alpha=s.alpha, norm=norm)
            swept = sweep(opt, importance, budgets, alpha=s.alpha, norm=norm)
        write_front_csv(ctx.wd.file("front.csv"), swept)
        write_json(
            ctx.wd.file("plan.json"),
            {
                **sol.to_dict(),
                "budget_spec": str(s.budget),
                "norm": resolve_norm(s.norm, ctx.pruning),
                "requested_budget": _table_budget(ctx),
                "original_latency": original_ms,
                "fastest_latency": fastest,
                **_whole_prediction(ctx, sol.latency),
            },
        )
        return {}

    def load(self, ctx: RunContext) -> None:
        ctx.plan_data = _read_json(ctx.wd.file("plan.json"))
        ctx.plan = Plan.from_dict(ctx.plan_data)
        ctx.plan.validate(ctx.chain)


class ProbeStage(Stage):
    """With ``lr_probe``: the fine-tuning lr probed on ``ctx.network`` (``lr_probe.json``, reused
    while its settings hold). With width that is the width-pruned network, distilled from the
    original: the network depth compression fine-tunes, so the control (it after the probe)
    separates the depth plan's loss from the recipe's; the record names it. Not recorded: the
    fine-tuning stage's settings name it, and ``--redo`` leaves it (it does not depend on the
    plan)."""

    name = "probe"
    files = ("lr_probe.json",)
    reads = ("network",)
    recorded = False
    torchrun = True
    run_fills = True

    def run(self, ctx: RunContext) -> dict[str, Any]:
        probe = ctx.settings.lr_probe
        if probe is None:
            return {}
        data = _kept_json(ctx, "lr_probe.json", self.settings(ctx))
        if data is None:
            if ctx.world > 1:
                raise WorkdirError(
                    "under torchrun compress only fine-tunes, but the lr probe has not run: run "
                    "the same command once without torchrun and --until solve"
                )
            data = self._measure(ctx, probe)
        ctx.probe = ProbeResult.from_dict(data)
        ctx.say(_probe_line(ctx.probe))
        return {}

    def load(self, ctx: RunContext) -> None:
        self.run(ctx)

    def _measure(self, ctx: RunContext, probe: ProbeSettings) -> dict[str, Any]:
        """Probe the candidate learning rates; write ``lr_probe.json``."""
        cfg, network = ctx.settings.finetune, _probed_name(ctx)
        ctx.say(
            f"lr probe: the {network} network fine-tuned for up to {probe.steps} steps at lr "
            f"{', '.join(f'{lr:g}' for lr in probe.lrs(cfg.lr))} until one keeps its held-out "
            f"accuracy within {probe.tolerance:g} points"
        )
        result = probe_lr(
            _need(ctx.network, "network"),
            ctx.data,
            cfg,
            probe,
            device=ctx.device,
            progress=ctx.progress,
            teacher=ctx.original,
            network=network,
        )
        data = {"settings": self.settings(ctx), **result.to_dict()}
        write_json(ctx.wd.file("lr_probe.json"), data)
        return data


def _probed_name(ctx: RunContext) -> str:
    """The network the probe fine-tunes, in words: the original, or the width-pruned one."""
    return "original" if ctx.width is None else "width-pruned"


def _probe_line(probe: ProbeResult) -> str:
    """The probe's outcome in one line."""
    tried = ", ".join(
        f"{t.lr:g} → {'diverged' if t.accuracy is None else f'{t.accuracy:.2f} %'}"
        for t in probe.trials
    )
    verdict = "" if probe.accepted else " (none kept it: the smallest is used)"
    return (
        f"lr probe: {probe.network} {probe.original_accuracy:.2f} % held-out; after {probe.steps} "
        f"steps at lr {tried}; fine-tuning uses lr {probe.lr:g}{verdict}"
    )


class FinetuneStage(Stage):
    """Fine-tune the linearized network (resumable per epoch; DDP under torchrun, after which
    the other ranks stop)."""

    name = "finetune"
    files = ("finetune", "finetuned.pt")
    reads = ("plan", "network")
    torchrun = True
    run_fills = True

    def message(self, ctx: RunContext) -> str:
        cfg = _tuning_config(ctx)
        return (
            f"fine-tune the linearized network: {cfg.epochs} epoch(s), {cfg.optimizer}, "
            f"lr {cfg.lr:g}" + (f", distillation {cfg.distill:g}" if cfg.distill else "")
        )

    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        cfg = _tuning_config(ctx)
        result = finetune(
            linearize(_need(ctx.network, "network"), ctx.chain, _need(ctx.plan, "plan")),
            ctx.data.train,
            cfg,
            teacher=copy.deepcopy(ctx.original) if cfg.distill > 0 else None,
            checkpoint_dir=ctx.wd.file("finetune"),
            holdout_data=ctx.data.holdout,
            progress=ctx.progress,
            device=ctx.device,
            distributed=ctx.world > 1,
        )
        if ctx.world > 1:
            end_distributed()
        if ctx.rank != 0:
            return None
        lin = result.model.cpu().to(memory_format=torch.contiguous_format)
        torch.save(lin.state_dict(), ctx.wd.file("finetuned.pt"))
        ctx.lin = cast(GraphModule, lin.eval())  # finetune returns the network it was given
        ctx.tuned_accuracy = result.history[-1].accuracy
        _warn_control(ctx)
        return {
            "history": [asdict(h) for h in result.history],
            "best_accuracy": result.best_accuracy,
            "lr": cfg.lr,
        }

    def load(self, ctx: RunContext) -> None:
        lin = linearize(_need(ctx.network, "network"), ctx.chain, _need(ctx.plan, "plan"))
        path = ctx.wd.file("finetuned.pt")
        lin.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        ctx.lin = lin.eval()
        history = ctx.wd.manifest().get("finetune", {}).get("history") or [{}]
        ctx.tuned_accuracy = history[-1].get("accuracy")


def _tuning_config(ctx: RunContext) -> FinetuneConfig:
    """The final fine-tuning's config: the settings' with the probed lr when there is one."""
    cfg = ctx.settings.finetune
    return cfg if ctx.probe is None else replace(cfg, lr=ctx.probe.lr)


def _warn_control(ctx: RunContext) -> None:
    """Warn through ``progress.LOG`` when the fine-tuned network falls far below the control."""
    probe, settings = ctx.probe, ctx.settings.lr_probe
    if probe is None or settings is None:
        return
    warning = control_warning(probe, ctx.tuned_accuracy, settings, str(ctx.settings.budget))
    if warning is not None:
        LOG.warning(warning)


class MergeStage(Stage):
    """Merge, check against the fine-tuned linearized network on real inputs, export."""

    name = "merge"
    files = ("merged.pt", "merged.onnx")
    reads = ("lin", "plan")
    torchrun = True
    main_only = True
    run_fills = True

    def message(self, ctx: RunContext) -> str:
        return "merge, verify and export"

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from .export import export_onnx, save_torch

        err = self._merge(ctx)
        merged = _need(ctx.merged, "merged")
        x = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(ctx.settings.seed))
        save_torch(merged, ctx.wd.file("merged.pt"), x)
        onnx_err = export_onnx(merged, ctx.wd.file("merged.onnx"), x)
        return {"error": err, "onnx_error": onnx_err}

    def load(self, ctx: RunContext) -> None:
        self._merge(ctx)

    @staticmethod
    def _merge(ctx: RunContext) -> float:
        """Merge the fine-tuned linearized network into ``ctx.merged``; the largest relative
        difference of the two on real inputs (a ``MergeError`` above the limit)."""
        lin = _need(ctx.lin, "lin")
        ctx.merged = merge(lin, ctx.chain, _need(ctx.plan, "plan"), verify=True)
        real, _ = fetch(ctx.test, torch.arange(min(8, len(ctx.test))))
        with torch.no_grad():
            return check_close(
                lin(real), ctx.merged(real), "merged network", "fine-tuned linearized one"
            )


class EvaluateStage(Stage):
    """Accuracy of both networks and the merged one's end-to-end speed-up, measured in paired
    rounds on the run's backend, threads and batch."""

    name = "evaluate"
    files = ("evaluation.json",)
    reads = ("merged", "original_ms", "plan_data")
    torchrun = True
    main_only = True

    def settings(self, ctx: RunContext) -> dict[str, Any]:
        test_set = {
            "kind": ctx.test_kind,
            "size": len(ctx.test),
            "fingerprint": fingerprint(ctx.test),
        }
        return {**super().settings(ctx), "test_set": test_set}

    def message(self, ctx: RunContext) -> str:
        return "evaluate accuracy and end-to-end latency of both networks"

    def run(self, ctx: RunContext) -> dict[str, Any]:
        nets = (ctx.original, _need(ctx.merged, "merged"))
        timing = _time_networks(ctx, nets)
        before, after = (
            NetworkStats(
                accuracy=evaluate(net, ctx.test),
                latency=ms,
                depth=conv_depth(net),
                params=sum(p.numel() for p in net.parameters()),
            )
            for net, ms in zip(nets, timing.latencies, strict=True)
        )
        original_ms = _need(ctx.original_ms, "original_ms")
        plan_data = _need(ctx.plan_data, "plan_data")
        evaluation = {
            "original": asdict(before),
            "compressed": asdict(after),
            **timing.record(),
            "predicted_speedup": original_ms / plan_data["latency"],
            "predicted_whole": plan_data.get("predicted_whole_speedup"),
            **_width_split(ctx, timing.speedup),
            "test_set": ctx.test_kind,
            "backend": ctx.runner.info(),
            "threads": ctx.runner.threads,
            "threads_default": ctx.settings.threads is None,
            "batch": ctx.settings.batch,
            "input_shape": list(ctx.shape),
            "machine": machine_info(),
            "versions": versions(),
        }
        probe, probing = ctx.probe, ctx.settings.lr_probe
        if probe is not None and probing is not None:
            budget = str(ctx.settings.budget)
            evaluation["control"] = control_record(probe, ctx.tuned_accuracy, probing, budget)
        write_json(ctx.wd.file("evaluation.json"), evaluation)
        return {}

    def load(self, ctx: RunContext) -> None:
        ctx.evaluation = _read_json(ctx.wd.file("evaluation.json"))


def _width_split(ctx: RunContext, speedup: float) -> dict[str, Any]:
    """With width, how much of the measured speed-up came from width (original → pruned, paired
    in the width stage) and how much from depth (pruned → final: the rest)."""
    if ctx.width is None:
        return {}
    w = ctx.width
    keys = ("ratio", "importance", "round_to", "kept", "params", "interval", "converged")
    return {
        "width": {
            **{k: w[k] for k in keys},
            "speedup": w["speedup"],
            "depth_speedup": speedup / w["speedup"],
        }
    }


@dataclass(frozen=True)
class NetworkTiming:
    """The evaluate stage's timing of (original, merged): each network's latency (ms), the
    speed-up, and the paired result behind them (None where the backend cannot pair)."""

    latencies: tuple[float, float]
    speedup: float
    paired: SpeedupResult | None

    def record(self) -> dict[str, Any]:
        """The fields ``evaluation.json`` keeps about the speed-up."""
        paired = self.paired
        return {
            "speedup": self.speedup,
            "speedup_method": "paired" if paired else "alternating medians",
            "speedup_interval": [paired.low, paired.high] if paired else None,
            "speedup_converged": paired.converged if paired else None,
            "paired": paired.to_dict() if paired else None,
        }


def _time_networks(ctx: RunContext, nets: tuple[nn.Module, nn.Module]) -> NetworkTiming:
    """Paired rounds of the original and the merged network on the run's backend
    (``speedup.paired_speedup``); a backend that cannot prepare a model (tensorrt) falls back to
    the smaller of two medians taken in alternation. A noisy result is kept and said."""
    if type(ctx.runner).prepare is Backend.prepare:
        ctx.say(f"note: {ctx.runner.name} cannot time in paired rounds; alternating medians used")
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(2):
            for net, samples in zip(nets, times, strict=True):
                samples.append(ctx.runner.measure(net, ctx.shape).median)
        before, after = min(times[0]), min(times[1])
        return NetworkTiming((before, after), before / after, None)
    res = paired_speedup(
        *nets,
        ctx.runner,
        ctx.shape,
        ctx.settings.speedup_rule,
        names=("original", "compressed"),
        reporter=ctx.progress,
    )
    ctx.say(res.message if res.converged else f"warning: {res.message}")
    return NetworkTiming((res.latency_a_ms, res.latency_b_ms), res.speedup, res)


class ReportStage(Stage):
    """``report.md`` and its plots, redone from the work directory's files on every run."""

    name = "report"
    files = ("report.md", "front.png", "blocks.png", "accuracy_latency.png")
    reads = ("latency", "opt", "evaluation")
    recorded = False
    torchrun = True
    main_only = True
    run_fills = True

    def run(self, ctx: RunContext) -> None:
        self.load(ctx)

    def load(self, ctx: RunContext) -> None:
        from .report import write_report

        latency, opt = _need(ctx.latency, "latency"), _need(ctx.opt, "opt")
        write_report(ctx.wd.path, chain=ctx.chain, latency=latency, opt=opt)


PIPELINE: tuple[Stage, ...] = (
    WidthStage(),
    LatencyStage(),
    OptimalStage(),
    LatencyConfigStage(),
    CalibrateStage(),
    ImportanceStage(),
    ImportanceConfigStage(),
    SolveStage(),
    ProbeStage(),
    FinetuneStage(),
    MergeStage(),
    EvaluateStage(),
    ReportStage(),
)
"""The stages ``compress`` runs, in order; adding a stage is adding its class here."""

STAGES = tuple(s.name for s in PIPELINE if s.recorded)
"""The stages ``stages.json`` records, the names ``--until`` and ``--redo`` take."""

STAGE_FILES: dict[str, tuple[str, ...]] = {s.name: s.files for s in PIPELINE if s.recorded}
"""The files each recorded stage writes, relative to the work directory."""

REDO_FILES: dict[str, tuple[str, ...]] = {
    name: files + tuple(f for s in PIPELINE if s.part_of == name for f in s.files)
    for name, files in STAGE_FILES.items()
}
"""The files ``--redo`` moves per recorded stage: its own and those of the unrecorded stages
that are ``part_of`` it (the width, calibration and configuration tables)."""


def _files(wd: Workdir) -> dict[str, Path]:
    names = [f for s in PIPELINE for f in s.files] + [RUN, MANIFEST]
    return {name: wd.file(name) for name in names if wd.file(name).exists()}


def _run_stages(ctx: RunContext, redo: str | None, until: str | None) -> CompressResult | None:
    """Load or run each stage of ``PIPELINE`` in order; None when ``until`` stops the run (after
    that stage and the unrecorded ones that follow it) or on a non-main torchrun rank. Every
    finished stage's settings are checked first, so a refused run moves and computes nothing."""
    _check_finished(ctx, redo, until)
    stopping = False
    for stage in PIPELINE:
        if (stopping and stage.recorded) or (stage.main_only and ctx.rank != 0):
            return None
        missing = [f for f in stage.reads if getattr(ctx, f) is None]
        if missing:
            raise RuntimeError(f"the {stage.name} stage reads {missing}, which no stage filled")
        stage.check(ctx)
        if redo is not None and _redone(stage, redo):
            _move_for_redo(ctx, redo)
            redo = None
        if _must_run(ctx, stage):
            info = stage.run(ctx)
            if info is None and stage.recorded:
                return None
            if stage.recorded:
                ctx.wd.finish(stage.name, stage.settings(ctx), **(info or {}))
                ctx.ran.append(stage.name)
            if not stage.run_fills:
                stage.load(ctx)
        else:
            stage.load(ctx)
        stopping = stopping or stage.name == until
    return None if stopping else ctx.result()


def _check_finished(ctx: RunContext, redo: str | None, until: str | None) -> None:
    """Refuse, before any stage runs, a finished recorded stage (before ``redo``, up to
    ``until``) whose settings differ: unrecorded stages then never move or recompute files for
    a run that is refused later."""
    for stage in PIPELINE:
        if not stage.recorded:
            continue
        if stage.name == redo:
            return
        ctx.wd.done(stage.name, stage.settings(ctx))
        if stage.name == until:
            return


def _redone(stage: Stage, redo: str) -> bool:
    """Whether ``stage`` belongs to what ``--redo redo`` moves (it or a later recorded stage)."""
    group = stage.name if stage.recorded else stage.part_of
    return group is not None and STAGES.index(group) >= STAGES.index(redo)


def _move_for_redo(ctx: RunContext, redo: str) -> None:
    """Move the ``redo`` stage's and later files aside: only at the first stage they belong
    to, once every earlier stage and the budget have been checked, so a refused run moves
    nothing."""
    moved = ctx.wd.redo(redo)
    if moved is not None:
        ctx.say(f"moved the {redo} stage and later ones to {moved}")


def _must_run(ctx: RunContext, stage: Stage) -> bool:
    """Whether ``stage`` must run; if so, announce it (the first stage to run records the
    command and the chain). Under torchrun only fine-tuning and later stages may run."""
    if not stage.recorded:
        return True
    if ctx.wd.done(stage.name, stage.settings(ctx)):
        return False
    if ctx.world > 1 and not stage.torchrun:
        raise WorkdirError(
            f"under torchrun ({ctx.world} processes) compress only fine-tunes, but the "
            f"{stage.name} stage has not run yet: run the same command once without torchrun and "
            "with --until solve, then launch it again with torchrun"
        )
    if ctx.rank == 0:
        if not ctx.ran:
            ctx.wd.record_command(ctx.command)
            ctx.wd.file("chain.json").write_text(ctx.chain.to_json())
        number = f"[{STAGES.index(stage.name) + 1}/{len(STAGES)}]"
        ctx.say(f"{number} {stage.message(ctx)}")
    return True


@contextlib.contextmanager
def _adopting(
    ctx: RunContext, source: Path | None, path: Path, flag: str, kind: str
) -> Iterator[None]:
    """Copy an adopted table ``source`` (and its sidecar) to ``path`` unless a table is there;
    the block then resumes it through the table's own sidecar check. A table it refuses leaves
    no copy behind, and the error says how to redo the ``kind`` stage."""
    copies: list[Path] = []
    if source is not None and not path.exists():
        for src, dst in ((source, path), (sidecar_path(source), sidecar_path(path))):
            if not src.is_file():
                raise TableError(f"{flag}: {src} does not exist")
            shutil.copy2(src, dst)
            copies.append(dst)
        ctx.say(f"adopted the {kind} table {source}")
    try:
        yield
    except TableError as exc:
        for copied in copies:
            copied.unlink(missing_ok=True)
        raise TableError(f"{exc} (with compress: pass --redo {kind})") from None


def _unreachable(ctx: RunContext, budget_ms: float, fastest: float, kept: str) -> BudgetError:
    """The error for a budget below the fastest plan: the smallest feasible fraction, or why
    nothing can be merged profitably when the fastest plan is the original network."""
    original_ms, budget = _need(ctx.original_ms, "original_ms"), ctx.settings.budget
    head = (
        f"budget {budget} = {budget_ms:.4f} ms is below the fastest plan the tables allow, "
        f"{fastest:.4f} ms ({fastest / original_ms:.3f}x of the original {original_ms:.4f} ms)"
    )
    tail = f". The tables are kept; {kept}"
    if fastest < original_ms * (1 - 1e-9):
        least = math.ceil(1000 * fastest / original_ms) / 1000
        return BudgetError(f"{head}: raise --budget to at least {least:.3f}x{tail}")
    return BudgetError(
        f"{head}: nothing can be merged profitably, because {_why_no_gain(ctx)}, so the "
        f"original network is the fastest plan and no budget below 1x can be met{tail}"
    )


def _below_fastest(ctx: RunContext, refusal: BudgetError) -> None:
    """A budget below the fastest plan: refused, or with ``budget_or_fastest`` (the demo's
    setting, so that a table timed on a busy machine cannot stop it) the fastest plan instead,
    said in the run's log."""
    if not ctx.settings.budget_or_fastest:
        raise refusal
    ctx.say(f"note: {refusal}; budget_or_fastest is set, so the fastest plan is used instead")


def _table_budget(ctx: RunContext) -> float:
    """The budget in the units of ``ctx.opt``: through the calibration in "whole" mode."""
    if ctx.calibration is not None:
        return ctx.calibration.table_budget(ctx.settings.budget)
    return ctx.settings.budget.resolve(_need(ctx.original_ms, "original_ms"))


def _refusal(ctx: RunContext, budget_ms: float, fastest: float, kept: str) -> BudgetError:
    """A budget below the fastest plan, in whole-network terms when calibrated; with width, the
    fraction is of the unpruned original and a larger --width is suggested."""
    error = _depth_refusal(ctx, budget_ms, fastest, kept)
    if ctx.width is None:
        return error
    return BudgetError(
        f"{error}. With --width {ctx.settings.width:g} the pruned network alone runs at "
        f"{1 / ctx.width['speedup']:.3f}x of the original: a larger --width reaches further"
    )


def _depth_refusal(ctx: RunContext, budget_ms: float, fastest: float, kept: str) -> BudgetError:
    """A budget below the fastest plan, said in whole-network terms when calibrated."""
    cal = ctx.calibration
    if cal is None or fastest >= _need(ctx.original_ms, "original_ms") * (1 - 1e-9):
        return _unreachable(ctx, budget_ms, fastest, kept)
    least = math.ceil(1000 * cal.least_fraction(fastest)) / 1000
    return BudgetError(
        f"budget {ctx.settings.budget} = {cal.whole_target(ctx.settings.budget):.4f} ms of the "
        f"whole network is below the fastest plan, predicted at "
        f"{cal.predicted_whole(fastest):.4f} ms ({cal.least_fraction(fastest):.3f}x of the "
        f"measured original {cal.original_whole_ms:.4f} ms): raise --budget to at least "
        f"{least:.3f}x. The tables are kept; {kept}"
    )


def _whole_prediction(ctx: RunContext, table_latency: float) -> dict[str, Any]:
    """What plan.json records of the budget's meaning and the whole-network prediction."""
    cal = ctx.calibration
    if cal is None:
        return {"budget_mode": ctx.settings.budget_mode}
    whole = cal.predicted_whole(table_latency)
    return {
        "budget_mode": "whole",
        "whole_target_ms": cal.whole_target(ctx.settings.budget),
        "original_whole_ms": cal.original_whole_ms,
        "predicted_whole_latency": whole,
        "predicted_whole_speedup": cal.original_whole_ms / whole,
    }


def _calibration_line(ctx: RunContext, cal: Calibration, table_budget: float) -> str:
    """The calibration in one line: the fit, its residuals, and what the budget became."""
    fit = cal.fit
    form = f"{fit.a:.3f}·ΣT" if fit.model == "scale" else f"ΣT + {fit.o:.4f}·blocks"
    return (
        f"calibration ({fit.model}): whole ≈ {fit.c:.4f} + {form} ms, rms residual "
        f"{fit.rms:.4f} ms over {len(cal.points)} networks; budget {ctx.settings.budget} = "
        f"{cal.whole_target(ctx.settings.budget):.4f} ms whole = {table_budget:.4f} ms of the "
        "calibrated table"
    )


def _why_no_gain(ctx: RunContext) -> str:
    """Why no plan is faster than the original chain, in words."""
    chain = ctx.chain
    if len(chain.blocks) > chain.num_positions:
        return (
            f"every merged block is as slow as or slower than its convolutions run one by "
            f"one on {ctx.runner.name} at batch {ctx.settings.batch} (try another --backend "
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
    progress: Reporter | None = None,
    log: Log | None = None,
    command: str | None = None,
    until: str | None = None,
    importance_from: str | Path | None = None,
    latency_from: str | Path | None = None,
) -> CompressResult | None:
    """Compress ``model`` to meet ``settings.budget`` on ``settings.backend``, writing every
    stage to ``workdir`` and resuming what an earlier run left there. ``model`` is not modified.
    It draws nothing: long stages report to ``progress`` (a ``progress.Reporter``, e.g. the
    CLI's ``report.RichProgress``), messages go to ``log`` (default: the ``progress.LOG`` logger).

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
    if settings.width_search:
        return _compress_searching_width(
            model,
            data,
            Path(workdir),
            settings,
            example_input=example_input,
            test_data=test_data,
            model_name=model_name,
            redo=redo,
            progress=progress,
            log=log,
            command=command,
            until=until,
            importance_from=importance_from,
            latency_from=latency_from,
        )
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    progress = progress if rank == 0 else None
    say: Log = log or LOG.info
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
    name = model_name or type(model).__name__
    identity = {
        "model": name,
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
    runner = settings.timing_backend()
    if device.type == "cuda" and runner.device == "cpu":
        how = "--device cuda" if runner.name in GPU_BACKENDS else "--backend torch or tensorrt"
        say(
            f"note: fine-tuning runs on {device}, latency is timed on the CPU by "
            f"{runner.name} ({how} times on the GPU)"
        )
    if latency_from is not None and settings.width <= 0:  # with width: the latency stage checks
        _check_adopted_latency(Path(latency_from), chain, runner, settings, name)
    wd.claim(identity)
    timing = device_name(torch.device(runner.device), index=False)
    ctx = RunContext(
        wd=wd,
        settings=settings,
        chain=chain,
        original=original,
        data=data,
        test=test_data if test_data is not None else data.holdout,
        test_kind="test" if test_data is not None else "held-out split",
        shape=shape,
        model_name=name,
        runner=runner,
        device=device,
        stage_settings=settings.stage_settings(timing),
        rank=rank,
        world=world,
        command=command or " ".join(sys.argv),
        say=say,
        progress=progress,
        importance_from=Path(importance_from) if importance_from is not None else None,
        latency_from=Path(latency_from) if latency_from is not None else None,
    )
    return _run_stages(ctx, redo, until)


SEARCH_DIR = "width-search"
"""The depth-only run inside a ``--width auto`` work directory: the original's tables."""


def stage_files(*names: str) -> tuple[str, ...]:
    """The files the stages called ``names`` write, relative to the work directory."""
    return tuple(f for s in PIPELINE if s.name in names for f in s.files)


SEARCH_KEPT = stage_files("calibrate", "latency_configs", "importance_configs")
"""The search run's files that a width-0 final run takes over (the latency and importance
tables are adopted through ``latency_from``/``importance_from``)."""


def _compress_searching_width(
    model: nn.Module,
    data: SplitData,
    workdir: Path,
    settings: CompressSettings,
    **kw: Any,
) -> CompressResult | None:
    """``--width auto``: the original's tables in ``WORKDIR/width-search`` (a depth-only run up
    to the importance table; a budget beyond depth alone is not refused there), every candidate
    scored into ``width_search.json``, then the run with the chosen ratio in ``WORKDIR``, solved
    with the ``delta`` normalisation the estimate assumed (unless ``norm`` says otherwise). Tables
    given (``latency_from``, ``importance_from``) are the original's, adopted by the search run;
    with ratio 0 the final run adopts the search's tables and calibration, measuring nothing
    again."""
    say: Log = kw["log"] or LOG.info
    depth = replace(settings, width_search=(), budget_or_fastest=True)
    own = {k: kw[k] for k in ("example_input", "test_data", "model_name", "progress", "log")}
    sub = workdir / SEARCH_DIR
    say(f"width search: the original's tables first, in {sub}")
    compress(
        model,
        data,
        sub,
        depth,
        **own,
        command=kw["command"],
        until="importance",
        importance_from=kw["importance_from"],
        latency_from=kw["latency_from"],
    )
    search = _width_search(model, data, workdir, settings, kw["example_input"], say, kw["progress"])
    chosen = search.chosen
    say(
        f"width search: width {chosen.ratio:g} chosen for budget {settings.budget} "
        f"(estimated loss {chosen.loss:.2f} points: width {chosen.width_loss:.2f}, depth "
        f"{chosen.depth_loss or 0.0:.2f}); every candidate in "
        f"{workdir / 'width_search.json'}"
    )
    norm = "delta" if settings.norm in (None, "auto") else settings.norm  # what was estimated
    final = replace(settings, width=chosen.ratio, width_search=(), norm=norm)
    adopted: dict[str, Any] = {}  # tables given are the original's: the search used them
    if chosen.ratio == 0:
        adopted = {"latency_from": sub / "latency.csv", "importance_from": sub / "importance.csv"}
        workdir.mkdir(parents=True, exist_ok=True)
        for name in SEARCH_KEPT:  # unrecorded stages' files: reused while their settings hold
            if (sub / name).exists() and not (workdir / name).exists():
                shutil.copy2(sub / name, workdir / name)
    return compress(
        model,
        data,
        workdir,
        final,
        **own,
        command=kw["command"],
        redo=kw["redo"],
        until=kw["until"],
        **adopted,
    )


def _width_search(
    model: nn.Module,
    data: SplitData,
    workdir: Path,
    settings: CompressSettings,
    example_input: torch.Tensor | None,
    say: Log,
    progress: Reporter | None = None,
) -> WidthSearch:
    """Score every candidate of ``settings.width_search`` on the search run's tables (a step of
    the task ``width search`` per candidate to ``progress``); the measurements are kept in
    ``width_search.json`` as they finish, reused while its settings hold."""
    sub = workdir / SEARCH_DIR
    configs = sub / "latency_configs.csv", sub / "importance_configs.csv"
    pruning = settings.prune_layers and all(f.is_file() for f in configs)  # else: it fell back
    depth = DepthTables(
        LatencyTable.read_csv(sub / "latency.csv"),
        Calibration.from_dict(_read_json(sub / "calibration.json")),
        ImportanceTable.read_csv(sub / "importance.csv"),
        settings.alpha,
        {r.key: r.time for r in read_config_latency_rows(configs[0])} if pruning else None,
        tuple(read_config_importance_rows(configs[1])) if pruning else (),
    )
    cal = depth.calibration
    base = float(_read_json(sidecar_path(sub / "importance.csv"))["base"][SCORE])
    original = copy.deepcopy(model).cpu().eval()
    sample, _ = fetch(data.holdout, torch.tensor([0]))
    example = (example_input if example_input is not None else sample)[:1].detach().cpu()
    shape = (settings.batch, *example.shape[1:])
    backend = settings.timing_backend()
    key = _normalised(
        {
            "weights": weights_sha(original),
            "latency": settings.stage_settings()["latency"],
            "importance": asdict(settings.importance),
            "width": {
                "importance": settings.width_importance,
                "round_to": settings.channel_round_to(),
            },
            "rule": asdict(settings.calibration_rule),
            "base": base,
        }
    )
    path = workdir / "width_search.json"
    old = _read_json(path) if path.exists() else {}
    measured: dict[str, Any] = old.get("measured", {}) if old.get("settings") == key else {}
    fraction = cal.whole_target(settings.budget) / cal.original_whole_ms
    candidates = []
    tuned = base + depth.importance.control
    width_error: str | None = None
    ratios = sorted(settings.width_search)
    for k, ratio in enumerate(ratios):
        name = f"{ratio:g}"
        tell(progress, "width search", k, len(ratios), f"width {name}")
        if ratio > 0 and name not in measured and width_error is None:
            try:
                pruned = prune_original(original, ratio, data, settings, shape).model
                m = measure_ratio(
                    original,
                    ratio,
                    pruned,
                    data,
                    backend,
                    shape,
                    settings.calibration_rule,
                    settings.importance,
                    device=str(resolve_device(settings.device or "cpu")),
                )
            except WidthError as exc:  # Torch-Pruning cannot handle the model: depth alone
                width_error = str(exc)
                say(f"width search: {exc}; only width 0 (depth alone) is a candidate")
                continue
            measured[name] = asdict(m)
            write_json(path, {"settings": key, "measured": measured})
            say(
                f"width search: width {ratio:g} runs {m.speedup:.2f}× faster, "
                f"{m.accuracy:.2f} % held-out after {settings.importance.steps} steps "
                f"(the original after the same steps: {tuned:.2f} %)"
            )
        if ratio == 0 or name in measured:
            m_ratio = Measured(**measured[name]) if ratio > 0 else None
            candidates.append(score(ratio, m_ratio, base, fraction, depth))
    tell(progress, "width search", len(ratios), len(ratios))
    search = WidthSearch(fraction, tuple(candidates))
    record = {"settings": key, "measured": measured, **search.to_dict()}
    if width_error is not None:
        record["width_error"] = width_error
    try:
        record["chosen"] = search.chosen.ratio
    finally:
        write_json(path, record)
    return search


def _reducible_or_say(chain: ConvChain, say: Log) -> bool:
    """Whether ``chain`` has a convolution layer pruning may remove; if not, say so."""
    from .pruning import reducible

    if reducible(chain):
        return True
    say(NO_REDUCIBLE)
    return False


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


def versions() -> dict[str, str | None]:
    """Versions of the software that produced a result."""
    from ._version import __version__

    return {
        "depthcompress": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onnx": package_version("onnx"),
        "onnxruntime": package_version("onnxruntime"),
        "numpy": package_version("numpy"),
    }
