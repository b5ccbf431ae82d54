"""Fine-tune a linearized network before merging it (ALGORITHM.md §8.2): SGD (Nesterov) or AdamW
with per-iteration cosine decay to 0, optional knowledge distillation from the original network,
a checkpoint every epoch (and every two minutes within long epochs) that a rerun resumes from,
and DistributedDataParallel when launched by ``torchrun`` (gloo on CPU, nccl on GPU, rank r on
``cuda:LOCAL_RANK``) with no change to the calling code. On CUDA it trains in channels_last with
pinned-memory batches by default, and optionally under automatic mixed precision (bf16, or fp16
with a gradient scaler).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import batches
from .devices import cuda_count, resolve_device
from .errors import DivergedError, FinetuneError, plain
from .files import atomic_open
from .graph import param_place
from .linearization import META_KEY
from .progress import Reporter, tell

if TYPE_CHECKING:
    from torch.utils.data import Dataset

FORMAT = "depthcompress-finetune/1"
LAST = "last.pt"
BEST = "best.pt"
OPTIMIZERS = ("sgd", "adamw")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# config fields that may change between a run and its resumption: they do not change the result
RESUMABLE_CHANGES = ("num_workers",)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How to fine-tune (defaults follow ALGORITHM.md §8.2). ``batch_size`` is the global batch:
    under ``torchrun`` each of the N processes takes ``batch_size / N`` examples per step, so one
    config gives the same schedule on any number of processes. ``steps_per_epoch=None`` makes an
    epoch one pass over the data (last short batch dropped); a larger value draws more passes.
    ``distill`` weighs the teacher's soft labels against the true ones (0 = no distillation).
    ``num_workers`` (DataLoader processes for datasets not held in memory) and ``channels_last``
    left at None follow the device: 4 workers (at most the cores) and channels_last on CUDA, none
    and off on the CPU. ``amp`` runs forward passes under autocast: ``"bf16"`` (CUDA or CPU) or
    ``"fp16"`` (CUDA only, with a gradient scaler). ``threads`` is torch's CPU threads during the
    run (None: as they are): 1 by default, because more threads collapse when another process
    competes for the cores, and it is a setting because it changes CPU results in the last bits."""

    epochs: int
    lr: float
    batch_size: int
    steps_per_epoch: int | None = None
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-5
    distill: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    num_workers: int | None = None
    channels_last: bool | None = None
    amp: Literal["bf16", "fp16"] | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be ≥ 1, got {self.epochs}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            problems.append(f"steps_per_epoch must be ≥ 1 or None, got {self.steps_per_epoch}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be ≥ 0, got {self.weight_decay}")
        if not 0.0 <= self.distill <= 1.0:
            problems.append(f"distill must be in [0, 1], got {self.distill}")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.num_workers is not None and self.num_workers < 0:
            problems.append(f"num_workers must be ≥ 0 or None, got {self.num_workers}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            problems.append(f"amp must be 'bf16', 'fp16' or None (off), got {self.amp!r}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be ≥ 1 or None, got {self.threads}")
        if problems:
            raise FinetuneError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as stored in checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """Read a config from its plain-data form; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FinetuneError(f"unknown fine-tuning settings {unknown}")
        return cls(**data)

    def for_device(self, device: torch.device) -> FinetuneConfig:
        """This config with the device-dependent defaults (``num_workers``, ``channels_last``)
        filled in, as it runs and as checkpoints record it; refuses an ``amp`` the device lacks."""
        check_amp(self.amp, device)
        cuda = device.type == "cuda"
        return replace(
            self,
            num_workers=loader_workers(self.num_workers, device),
            channels_last=cuda if self.channels_last is None else self.channels_last,
        )


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader processes for ``device``: the requested count, else min(4, cores) on CUDA (to
    keep the GPU fed) and 0 on the CPU (workers would take cores from training)."""
    if requested is not None:
        return requested
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def check_amp(amp: str | None, device: str | torch.device) -> None:
    """Refuse an autocast precision the device cannot run: fp16 needs CUDA, bf16 a GPU that has
    it (bf16 on the CPU is allowed: correct everywhere, fast only with AVX512-BF16/AMX)."""
    if amp is None:
        return
    if amp not in AMP_DTYPES:
        raise FinetuneError(f"amp must be 'bf16', 'fp16' or None (off), got {amp!r}")
    kind = torch.device(device).type
    if amp == "fp16" and kind != "cuda":
        raise FinetuneError(
            f"--amp fp16 needs a CUDA device (autocast in float16 is GPU-only), but training runs "
            f"on {kind}: use --amp bf16 on the CPU, or pass --device cuda"
        )
    if amp == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise FinetuneError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch CPU threads (None: as they are), then restore the count."""
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def autocast(amp: str | None, device: torch.device) -> AbstractContextManager[Any]:
    """Autocast to ``amp``'s dtype on ``device`` (a no-op context when ``amp`` is None)."""
    if amp is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


@dataclass(frozen=True)
class StepCheckpoints:
    """When ``last.pt`` is also written within an epoch, so that an interruption loses little:
    after ``seconds`` of training since the last checkpoint and/or every ``steps`` optimizer
    steps (None: not by that rule). It does not change the result, so it is no setting."""

    seconds: float | None = 120.0
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.seconds is not None and not self.seconds > 0:
            raise FinetuneError(f"checkpoint seconds must be positive or None, got {self.seconds}")
        if self.steps is not None and self.steps < 1:
            raise FinetuneError(f"checkpoint steps must be ≥ 1 or None, got {self.steps}")

    def due(self, step: int, since: float) -> bool:
        """Whether a checkpoint is due after ``step`` steps of an epoch, ``since`` seconds after
        the last one."""
        by_steps = self.steps is not None and step % self.steps == 0
        return by_steps or (self.seconds is not None and since >= self.seconds)


@dataclass(frozen=True)
class EpochStats:
    """One finished epoch: mean training loss over all processes, held-out top-1 accuracy (%)
    when held-out data was given, wall seconds (training and evaluation), and the learning rate
    after its last step."""

    epoch: int
    loss: float
    accuracy: float | None
    seconds: float
    lr: float


@dataclass
class FinetuneResult:
    """What ``finetune`` did: the trained model (the one passed in, now in eval mode), the
    per-epoch history (including epochs restored from a checkpoint), and where checkpoints are."""

    model: nn.Module
    history: list[EpochStats] = field(default_factory=list)
    resumed_epochs: int = 0
    best_accuracy: float | None = None
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None

    @property
    def train_loss(self) -> float:
        """Mean training loss of the last epoch."""
        return self.history[-1].loss if self.history else math.nan


# ---------------------------------------------------------------------------------------------
# losses and evaluation


def training_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    distill: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``distill·CE(softmax(teacher), student) + (1−distill)·CE(labels, student)`` at temperature
    1 (ALGORITHM.md §8.2); with ``distill=0`` just the (label-smoothed) cross-entropy."""
    hard = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if distill == 0.0:
        return hard
    if teacher_logits is None:
        raise FinetuneError(f"distill={distill} needs the teacher's logits")
    soft = F.cross_entropy(logits, teacher_logits.detach().softmax(dim=1))
    return distill * soft + (1.0 - distill) * hard


def _to_input(x: torch.Tensor, device: torch.device, channels_last: bool | None) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.to(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _correct_count(
    model: nn.Module,
    data: Dataset,
    indices: torch.Tensor,
    batch_size: int,
    device: torch.device,
    channels_last: bool | None,
    num_workers: int,
    amp: str | None = None,
) -> tuple[int, int]:
    """Top-1 hits and examples of ``model`` (already in eval mode) on ``data[indices]``."""
    correct, count = 0, 0
    pin = device.type == "cuda"
    with torch.no_grad():
        for x, y in batches(data, indices, batch_size, num_workers, pin_memory=pin):
            with autocast(amp, device):
                logits = model(_to_input(x, device, channels_last))
            correct += int((logits.argmax(1) == y.to(device, non_blocking=True)).sum())
            count += len(y)
    return correct, count


def evaluate(
    model: nn.Module,
    data: Dataset,
    batch_size: int = 256,
    *,
    channels_last: bool = False,
    num_workers: int = 0,
    amp: str | None = None,
) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode on ``data``, on the model's device (under
    autocast with ``amp``); the model's train/eval mode is restored afterwards."""
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        raise FinetuneError("cannot evaluate on an empty dataset")
    device = param_place(model).get("device", torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        check_amp(amp, device)
        correct, count = _correct_count(
            model, data, torch.arange(n), batch_size, device, channels_last, num_workers, amp
        )
    finally:
        model.train(was_training)
    return 100.0 * correct / count


# ---------------------------------------------------------------------------------------------
# processes


@dataclass(frozen=True)
class _World:
    """This process's place among the training processes (1 of 1 without torchrun)."""

    rank: int
    size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise FinetuneError(f"environment variable {name}={value!r} is not an integer") from None


def _world(device: str | torch.device | None, distributed: bool) -> _World:
    """Join the process group ``torchrun`` set up (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), or
    use the one already initialised, or run alone (always, when not ``distributed``); pick the
    device (``devices.resolve_device``: ``cuda:LOCAL_RANK`` for ``cuda`` or by default when CUDA
    is there) and the backend to match (nccl for CUDA, gloo for CPU)."""
    local_rank = _env_int("LOCAL_RANK", 0) if distributed else 0
    dev = resolve_device(device, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not distributed:
        return _World(0, 1, dev)
    if dist.is_available() and dist.is_initialized():
        return _World(dist.get_rank(), dist.get_world_size(), dev)
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return _World(0, 1, dev)
    if not dist.is_available():
        raise FinetuneError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise FinetuneError(
            f"WORLD_SIZE={size} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun "
            "(python -m torch.distributed.run --nproc_per_node=N script.py)"
        )
    dist.init_process_group(backend=process_group_backend(dev))
    return _World(dist.get_rank(), dist.get_world_size(), dev)


def process_group_backend(device: torch.device) -> str:
    """The torch.distributed backend for ``device``: nccl on CUDA, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def end_distributed() -> None:
    """Wait for every process, then close the process group ``finetune`` joined, if any. Call it
    when the distributed part of a run is over: a process that exits with the group still open
    can abort (gloo: "terminate called without an active exception") while others still work."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _all_sum(world: _World, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    if world.distributed:
        dist.all_reduce(t)
    return t.tolist()


def _sync_buffers(world: _World, model: nn.Module) -> None:
    """Make every process hold the same buffers: BN statistics averaged, the rest (batch
    counters) taken from rank 0, so checkpoints and returned models agree on all ranks."""
    if not world.distributed:
        return
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(world.size)
            else:
                dist.broadcast(buf, 0)


# ---------------------------------------------------------------------------------------------
# random state


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


def _seed(seed: int, device: torch.device) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    random.seed(seed)


@contextmanager
def _private_rng(device: torch.device) -> Iterator[None]:
    """Run a block on torch's and Python's global RNGs, then restore their previous states, so
    fine-tuning neither depends on nor disturbs the caller's random streams."""
    saved = _rng_state(device)
    try:
        yield
    finally:
        _set_rng_state(saved, device)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _network_meta(model: nn.Module) -> dict[str, Any] | None:
    """The plan a linearized network was built for (None for other modules)."""
    meta = getattr(model, "meta", None)
    return meta.get(META_KEY) if isinstance(meta, dict) else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A fine-tuning checkpoint (``last.pt`` or ``best.pt``) as a dict, tensors on the CPU;
    ``["model"]`` is the state dict to load into ``linearize(model, chain, plan)``."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FinetuneError(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        raise FinetuneError(
            f"{path} is not a readable checkpoint ({exc}); delete it to start over"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise FinetuneError(f"{path} is not a depthcompress fine-tuning checkpoint ({FORMAT})")
    return ckpt


def _config_mismatch(saved: dict[str, Any], config: FinetuneConfig) -> list[str]:
    now = config.to_dict()
    keys = sorted((set(saved) | set(now)) - set(RESUMABLE_CHANGES))
    return [
        f"{k}: {plain(saved.get(k))!r} in the checkpoint, {plain(now.get(k))!r} now"
        for k in keys
        if saved.get(k) != now.get(k)
    ]


def _check_resumable(
    ckpt: dict[str, Any], path: Path, config: FinetuneConfig, model: nn.Module
) -> None:
    """Refuse a checkpoint written with other settings or for another network."""
    fix = f"use another checkpoint directory, or delete {path} to start over"
    diff = _config_mismatch(ckpt.get("config", {}), config)
    if diff:
        raise FinetuneError(
            f"{path} was written with other fine-tuning settings ({'; '.join(diff)}): resume "
            f"with the same settings, {fix}"
        )
    saved, now = ckpt.get("network"), _network_meta(model)
    if saved is not None and now is not None and saved != now:
        raise FinetuneError(f"{path} was written for another linearized network (plan): {fix}")


# ---------------------------------------------------------------------------------------------
# training


def _cosine(total: int) -> Callable[[int], float]:
    """Per-iteration cosine decay from 1 to 0 over ``total`` steps, no warm-up."""
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


@dataclass(frozen=True)
class _Epochs:
    """The shape of every epoch on this process: its sampler, its share of the global batch,
    the optimizer steps per epoch, and how many shuffles of its data they draw."""

    sampler: Any
    local_batch: int
    steps: int
    passes: int

    def order(self, epoch: int) -> torch.Tensor:
        """This process's example indices for one epoch: ``passes`` shuffles of its share of the
        data (``DistributedSampler.set_epoch(epoch·passes + p)``), cut to ``steps`` batches."""
        order = []
        for p in range(self.passes):
            self.sampler.set_epoch(epoch * self.passes + p)
            order.append(torch.as_tensor(list(iter(self.sampler)), dtype=torch.long))
        return torch.cat(order)[: self.steps * self.local_batch]


def _plan_epochs(data: Dataset, config: FinetuneConfig, world: _World) -> _Epochs:
    """Split the global batch between the processes and size the epochs; refuses a batch the
    processes cannot share evenly, and data smaller than one batch without ``steps_per_epoch``."""
    if config.batch_size % world.size:
        raise FinetuneError(
            f"batch_size {config.batch_size} must be divisible by the {world.size} processes "
            "(it is the global batch, split evenly between them)"
        )
    local_batch = config.batch_size // world.size
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(
        data, num_replicas=world.size, rank=world.rank, shuffle=True, seed=config.seed
    )
    full = len(sampler) // local_batch
    if full == 0 and config.steps_per_epoch is None:
        raise FinetuneError(
            f"the training data holds {len(sampler.dataset)} examples, fewer than one batch of "
            f"{config.batch_size}: lower batch_size, or set steps_per_epoch"
        )
    steps = config.steps_per_epoch or full
    passes = math.ceil(steps * local_batch / len(sampler))
    return _Epochs(sampler, local_batch, steps, passes)


def _check_inputs(
    train_data: Dataset,
    holdout_data: Dataset | None,
    config: FinetuneConfig,
    teacher: nn.Module | None,
) -> None:
    """Refuse a distillation without a teacher and empty training or held-out data."""
    if config.distill > 0 and teacher is None:
        raise FinetuneError(
            f"distill={config.distill} needs a teacher: pass teacher=<the original network>, "
            "or set distill=0"
        )
    if len(train_data) == 0:  # type: ignore[arg-type]
        raise FinetuneError("the training data is empty")
    if holdout_data is not None and len(holdout_data) == 0:  # type: ignore[arg-type]
        raise FinetuneError("the held-out data is empty: pass holdout_data=None to skip scoring")


@dataclass
class TrainState:
    """What a run changes as it goes: the model (and its DDP wrapper ``net``, the model itself
    when alone), optimizer, schedule and fp16 gradient scaler, the epochs finished (``epoch``,
    of which ``resumed_epochs`` came from a checkpoint), their history and the best held-out
    accuracy; within an unfinished epoch, its ``step``s done and this process's ``loss_sum``
    over them. ``last.pt`` holds all of it, with every process's RNG state; ``saved_at`` is
    when it was last written (``time.perf_counter``)."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    epoch: int = 0
    resumed_epochs: int = 0
    history: list[EpochStats] = field(default_factory=list)
    best_accuracy: float | None = None
    step: int = 0
    loss_sum: float = 0.0
    saved_at: float = field(default_factory=time.perf_counter)


class Trainer:
    """One fine-tuning (or training) run: ``Trainer(model, data, config, ...).run()``. The
    config is ``FinetuneConfig`` (device defaults filled in), the changing state a
    ``TrainState``; each method does one job: set up or resume, one epoch, evaluate, checkpoint.
    It serves ``depthcompress train``, the pipeline's fine-tuning and each importance entry.
    Arguments as ``finetune``'s."""

    model: nn.Module
    train_data: Dataset
    holdout_data: Dataset | None
    teacher: nn.Module | None
    config: FinetuneConfig
    world: _World
    epochs: _Epochs
    last: Path | None
    best: Path | None
    progress: Reporter | None
    on_epoch_end: Callable[[EpochStats], None] | None
    every: StepCheckpoints

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        config: FinetuneConfig,
        *,
        teacher: nn.Module | None = None,
        checkpoint_dir: str | Path | None = None,
        holdout_data: Dataset | None = None,
        progress: Reporter | None = None,
        device: str | torch.device | None = None,
        distributed: bool = True,
        on_epoch_end: Callable[[EpochStats], None] | None = None,
        checkpoint_every: StepCheckpoints | None = None,
    ) -> None:
        _check_inputs(train_data, holdout_data, config, teacher)
        self.world = _world(device, distributed)
        self.config = config.for_device(self.world.device)
        self.epochs = _plan_epochs(train_data, self.config, self.world)
        self.model, self.train_data, self.holdout_data = model, train_data, holdout_data
        self.teacher = teacher if config.distill > 0 else None
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.last = folder / LAST if folder is not None else None
        self.best = folder / BEST if folder is not None else None
        self.progress = progress if self.world.main else None
        self.on_epoch_end = on_epoch_end
        self.every = checkpoint_every or StepCheckpoints()

    def run(self) -> FinetuneResult:
        """Train the remaining epochs on private RNG streams and return the model in eval mode;
        the teacher's train/eval modes are restored afterwards."""
        if self.last is not None and self.world.main:
            self.last.parent.mkdir(parents=True, exist_ok=True)
        teacher_modes = {m: m.training for m in self.teacher.modules()} if self.teacher else {}
        with _private_rng(self.world.device), torch_threads(self.config.threads):
            try:
                state = self.setup()
                while state.epoch < self.config.epochs:
                    self.finish_epoch(state, self.train_epoch(state))
            finally:
                for mod, mode in teacher_modes.items():
                    mod.training = mode
        self.model.eval()
        best = self.best if self.best is not None and self.best.exists() else None
        return FinetuneResult(
            model=self.model,
            history=state.history,
            resumed_epochs=state.resumed_epochs,
            best_accuracy=state.best_accuracy,
            last_checkpoint=self.last,
            best_checkpoint=best,
        )

    def setup(self) -> TrainState:
        """Place the model (and teacher) on the device, build the optimizer, schedule and scaler,
        then resume from ``last.pt`` if there is one, else seed this process's RNG."""
        config, device = self.config, self.world.device
        self.model.to(device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.teacher is not None:
            self.teacher.to(device).eval()
            if config.channels_last:
                self.teacher.to(memory_format=torch.channels_last)
        optimizer = _optimizer(self.model, config)
        total = config.epochs * self.epochs.steps
        state = TrainState(
            model=self.model,
            net=self.model,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total)),
            scaler=torch.amp.GradScaler(device.type) if config.amp == "fp16" else None,
        )
        if self.last is not None and self.last.exists():
            self.resume(state, self.last)
        else:
            _seed(config.seed + self.world.rank, device)
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            state.net = DistributedDataParallel(self.model, device_ids=ids)
        return state

    def resume(self, state: TrainState, last: Path) -> None:
        """Load ``last`` (checked to match this config and network) into ``state`` and restore
        this process's RNG, or reseed it when the checkpoint came from another process count."""
        ckpt = load_checkpoint(last)
        _check_resumable(ckpt, last, self.config, self.model)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise FinetuneError(
                f"{last} holds weights of another network ({str(exc).splitlines()[0]}): "
                f"use another checkpoint directory, or delete {last} to start over"
            ) from None
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
        if state.scaler is not None and ckpt.get("scaler"):
            state.scaler.load_state_dict(ckpt["scaler"])
        state.epoch = state.resumed_epochs = int(ckpt["epoch"])
        state.history = [EpochStats(**h) for h in ckpt["history"]]
        state.best_accuracy = ckpt.get("best_accuracy")
        rng, world = ckpt.get("rng") or [], self.world
        sums = [float(v) for v in ckpt.get("loss_sums") or [0.0]]
        state.step = int(ckpt.get("step", 0))
        if ckpt.get("world_size") == world.size and world.rank < len(rng):
            _set_rng_state(rng[world.rank], world.device)
            state.loss_sum = sums[world.rank] if world.rank < len(sums) else 0.0
        else:  # another process count: each process takes the mean share of the epoch's loss
            _seed(self.config.seed + 1000003 * state.epoch + world.rank, world.device)
            state.loss_sum = sum(sums) / len(sums)

    def train_epoch(self, state: TrainState) -> EpochStats:
        """One epoch of ``steps`` optimizer steps (from ``state.step`` on, after a mid-epoch
        resume), then BN sync and held-out evaluation; raises ``DivergedError`` when the mean
        loss is not finite."""
        began = time.perf_counter()
        config, device, steps = self.config, self.world.device, self.epochs.steps
        epoch, first = state.epoch + 1, state.step
        state.net.train()
        self._report(epoch, first, None)
        total = torch.tensor(state.loss_sum, dtype=torch.float64, device=device)
        order = self.epochs.order(state.epoch)[first * self.epochs.local_batch :]
        workers, pin = config.num_workers or 0, device.type == "cuda"
        loader = batches(self.train_data, order, self.epochs.local_batch, workers, pin_memory=pin)
        for step, (x, y) in enumerate(loader, start=first):
            total += self._step(state, x, y)
            state.step = step + 1
            if state.step < steps and self._checkpoint_due(state):
                state.loss_sum = float(total)
                self.checkpoint(state, improved=False)
            if self.progress is not None and (step % 10 == 9 or step + 1 == steps):
                self._report(epoch, step + 1, float(total) / (step + 1))
        state.step, state.loss_sum = 0, 0.0
        loss_sum, count = _all_sum(self.world, [float(total), float(steps)])
        mean_loss = loss_sum / count
        if not math.isfinite(mean_loss):
            raise DivergedError(
                f"the training loss became {mean_loss} in epoch {epoch}: lower the learning "
                f"rate (now {config.lr:g}; --lr) or clip gradients (grad_clip, --grad-clip); "
                "the last checkpoint, if any, is from before this epoch"
            )
        _sync_buffers(self.world, self.model)
        accuracy = self.evaluate()
        self._report(epoch, steps, mean_loss, accuracy)
        return EpochStats(
            epoch=epoch,
            loss=mean_loss,
            accuracy=accuracy,
            seconds=time.perf_counter() - began,
            lr=float(state.optimizer.param_groups[0]["lr"]),
        )

    def _checkpoint_due(self, state: TrainState) -> bool:
        """Whether to write a mid-epoch ``last.pt`` now (``StepCheckpoints``); every process
        takes rank 0's decision, as they all join the checkpoint."""
        if self.last is None:
            return False
        due = self.every.due(state.step, time.perf_counter() - state.saved_at)
        if self.world.distributed and self.every.seconds is not None:
            flag = torch.tensor([float(due and self.world.main)], device=self.world.device)
            dist.all_reduce(flag)
            due = bool(flag.item() > 0)
        return due

    def _step(self, state: TrainState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns its loss (detached). With a scaler (fp16) the
        loss is scaled for backward and overflowing steps are skipped, as ``GradScaler`` does."""
        config, device = self.config, self.world.device
        x = _to_input(x, device, config.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(config.amp, device):
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
            loss = training_loss(
                state.net(x),
                y,
                teacher_logits,
                distill=config.distill,
                label_smoothing=config.label_smoothing,
            )
        state.optimizer.zero_grad(set_to_none=True)
        scaler, params = state.scaler, self.model.parameters()
        if scaler is None:
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            state.optimizer.step()
        else:
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(state.optimizer)
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(state.optimizer)
            scaler.update()
        state.scheduler.step()
        return loss.detach()

    def evaluate(self) -> float | None:
        """Held-out top-1 accuracy (%), each process scoring every N-th example; None without
        held-out data."""
        data, world, config = self.holdout_data, self.world, self.config
        if data is None:
            return None
        self.model.eval()
        correct, count = _correct_count(
            self.model,
            data,
            torch.arange(world.rank, len(data), world.size),  # type: ignore[arg-type]
            config.batch_size,
            world.device,
            config.channels_last,
            config.num_workers or 0,
            config.amp,
        )
        self.model.train()
        correct_all, count_all = _all_sum(world, [float(correct), float(count)])
        return 100.0 * correct_all / count_all

    def finish_epoch(self, state: TrainState, stats: EpochStats) -> None:
        """Record an epoch: history, best accuracy, checkpoints, then ``on_epoch_end``."""
        state.history.append(stats)
        state.epoch = stats.epoch
        improved = stats.accuracy is not None and (
            state.best_accuracy is None or stats.accuracy > state.best_accuracy
        )
        if improved:
            state.best_accuracy = stats.accuracy
        if self.last is not None:
            self.checkpoint(state, improved)
        if self.on_epoch_end is not None:
            self.on_epoch_end(stats)

    def checkpoint(self, state: TrainState, improved: bool) -> None:
        """Rank 0 writes ``last.pt`` (everything needed to resume, every process's RNG state and
        the fp16 gradient scaler included) and, when ``improved``, ``best.pt`` (weights); every
        process waits for it."""
        world = self.world
        mine = (_rng_state(world.device), state.loss_sum)
        each: list[Any] = [mine]
        if world.distributed:
            each = [None] * world.size
            dist.all_gather_object(each, mine)
        if world.main and self.last is not None:
            common = {
                "format": FORMAT,
                "epoch": state.epoch,
                "config": self.config.to_dict(),
                "network": _network_meta(self.model),
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            }
            writes: list[tuple[Path, dict[str, Any]]] = []
            if improved and self.best is not None:
                writes.append((self.best, {**common, "accuracy": state.best_accuracy}))
            resume = {
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                "rng": [r for r, _ in each],
                "loss_sums": [loss for _, loss in each],
                "step": state.step,
                "world_size": world.size,
                "history": [asdict(h) for h in state.history],
                "best_accuracy": state.best_accuracy,
            }
            writes.append((self.last, {**common, **resume}))
            for path, data in writes:
                with atomic_open(path, "wb") as fh:
                    torch.save(data, fh)
        if world.distributed:
            dist.barrier()
        state.saved_at = time.perf_counter()

    def _report(
        self, epoch: int, step: int, loss: float | None, accuracy: float | None = None
    ) -> None:
        """Tell the reporter how far the run is: steps over all epochs, the running loss."""
        if self.progress is None:
            return
        detail = f"epoch {epoch}/{self.config.epochs}"
        if loss is not None:
            detail += f" loss {loss:.4f}"
        if accuracy is not None:
            detail += f" acc {accuracy:.2f}%"
        steps = self.epochs.steps
        tell(
            self.progress,
            "fine-tuning",
            (epoch - 1) * steps + step,
            self.config.epochs * steps,
            detail,
        )


def finetune(
    model: nn.Module,
    train_data: Dataset,
    config: FinetuneConfig,
    *,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None,
    holdout_data: Dataset | None = None,
    progress: Reporter | None = None,
    device: str | torch.device | None = None,
    distributed: bool = True,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    checkpoint_every: StepCheckpoints | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` **in place** (it is the pipeline's own linearized copy) and return it in
    eval mode, with its history: ``Trainer(...).run()`` in one call.

    ``teacher`` (the original network, needed when ``config.distill > 0``) is moved to the device
    and run in eval mode; its train/eval mode is restored afterwards. With ``checkpoint_dir``,
    ``last.pt`` is written atomically after every epoch (and ``best.pt`` on the best held-out
    accuracy) and within epochs as ``checkpoint_every`` says (by default every 120 s), and an
    existing ``last.pt`` with the same settings is resumed from, mid-epoch checkpoints at the same
    step with the same batches and RNG (bit-identical on the CPU with in-memory data; random
    transforms in DataLoader workers are not replayed). Under ``torchrun`` the model runs in
    DistributedDataParallel, each process reads its share of every batch, and only rank 0 writes
    checkpoints and reports ``progress`` (``progress.Step``s of the task ``"fine-tuning"``).
    ``device`` defaults to CUDA (``cuda:LOCAL_RANK``) when available, else the CPU.
    ``distributed=False`` trains in this process alone even under ``torchrun`` (for many small
    independent runs, as importance tables do). ``on_epoch_end`` sees each epoch's stats on every
    process, after its checkpoint is on disk.
    """
    trainer = Trainer(
        model,
        train_data,
        config,
        teacher=teacher,
        checkpoint_dir=checkpoint_dir,
        holdout_data=holdout_data,
        progress=progress,
        device=device,
        distributed=distributed,
        on_epoch_end=on_epoch_end,
        checkpoint_every=checkpoint_every,
    )
    return trainer.run()


__all__ = [
    "BEST",
    "LAST",
    "EpochStats",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "StepCheckpoints",
    "TrainState",
    "Trainer",
    "autocast",
    "check_amp",
    "cuda_count",
    "evaluate",
    "finetune",
    "load_checkpoint",
    "loader_workers",
    "process_group_backend",
    "torch_threads",
    "training_loss",
]
