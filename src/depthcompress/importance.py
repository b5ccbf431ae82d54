"""Importance tables (ALGORITHM.md §6): for every extended block ``(st, end, st_act, end_act)``,
fine-tune the network with the activations inside the span removed and score it on a held-out
split of the training data, relative to the unmodified network.

Each entry is an independent job: a table is written row by row (resumable), can be split into
disjoint shards and merged, and entries can run in local worker processes or as Ray tasks. On a
GPU, entries run one after another in this process, or one worker process per GPU
(``execution_plan``), never several processes on one GPU.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import math
import os
import pickle
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._version import __version__
from .data import SplitData, batches, tensor_bytes
from .errors import DepthCompressError, DivergedError, TableError, plain
from .files import (
    atomic_open,
    csv_appender,
    json_sha,
    nested_diff,
    read_sidecar,
    repair_tail,
    sidecar_path,
    write_json,
)
from .finetune import torch_threads
from .graph import ConvChain, symbolic_trace
from .linearization import linearize
from .plan import Plan
from .progress import LOG, Reporter, tell
from .pruning import SEMANTICS
from .tables import (
    CONFIG_IMPORTANCE_COLUMNS,
    ConfigImportanceRow,
    read_config_importance_rows,
    write_config_importance_rows,
)

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from .finetune import FinetuneConfig

FORMAT = "depthcompress-importance/1"
SCORE = "val_acc"
KEY_COLUMNS = ("st", "end", "st_act", "end_act")
# val_acc and val_loss are differences to the unmodified network (% points, nats); train_loss is
# the mean fine-tuning loss, steps its length, seconds the entry's wall time
COLUMNS = (*KEY_COLUMNS, SCORE, "val_loss", "train_loss", "steps", "seconds")
EXECUTORS = ("local", "ray")

# Defaults chosen by benchmarks/bench_importance.py on Fashion-MNIST (docs/benchmarks.md).
DEFAULT_STEPS = 100
DEFAULT_LR = 0.05
DEFAULT_BATCH_SIZE = 128
DEFAULT_HOLDOUT = 10000


class Entry(NamedTuple):
    """One extended block: convs ``st+1..end`` with the activations strictly inside removed, and
    flags for an activation at ``st`` and at ``end``."""

    st: int
    end: int
    st_act: int
    end_act: int


@dataclass(frozen=True)
class FinetuneSettings:
    """How each entry is fine-tuned and scored (recorded beside the table; ``steps=0`` is the
    zero-shot estimate: no fine-tuning, no re-initialisation). ``threads`` is fixed per entry,
    whatever the executor, because CPU results depend on it in the last bits. ``amp`` runs
    fine-tuning and scoring under autocast (``"bf16"``, or ``"fp16"`` on CUDA only)."""

    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-5
    eval_batch_size: int = 1000
    reinit_single: bool = True
    exclude_zeros: bool = True
    channels_last: bool = True
    loader_workers: int = 0
    threads: int = 1
    amp: str | None = None
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise DepthCompressError("steps must be ≥ 0 and batch sizes ≥ 1")
        if not self.lr > 0:
            raise DepthCompressError(f"lr must be positive, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise DepthCompressError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.threads < 1:
            raise DepthCompressError(f"threads must be ≥ 1, got {self.threads}")
        if self.loader_workers < 0:
            raise DepthCompressError(f"loader_workers must be ≥ 0, got {self.loader_workers}")
        if self.amp is not None and self.amp not in ("bf16", "fp16"):
            raise DepthCompressError(f"amp must be 'bf16', 'fp16' or None (off), got {self.amp!r}")

    @property
    def zero_shot(self) -> bool:
        """Whether entries are scored without fine-tuning."""
        return self.steps == 0

    def config(self, seed: int) -> FinetuneConfig:
        """The ``Trainer`` config of one entry: one epoch of ``steps`` SGD steps (Nesterov,
        cosine decay to 0) on batches drawn by ``seed``."""
        from .finetune import FinetuneConfig

        return FinetuneConfig(
            epochs=1,
            steps_per_epoch=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            seed=seed,
            num_workers=self.loader_workers,
            channels_last=self.channels_last,
            amp=self.amp,  # type: ignore[arg-type]
            grad_clip=self.grad_clip,
            threads=self.threads,
        )


@dataclass
class _Job:
    """Everything one entry needs, pickled once per worker."""

    net: nn.Module
    chain: ConvChain
    data: SplitData
    settings: FinetuneSettings
    base: tuple[float, float]
    device: str


# ---------------------------------------------------------------------------------------------
# entries and their networks


def enumerate_entries(chain: ConvChain, *, exclude_zeros: bool = True) -> list[Entry]:
    """Every extended block the DP needs, sorted by (st, end, st_act, end_act).

    Flags may be 0 only at linear positions; a span from 0 has flag 1 at 0. With
    ``exclude_zeros`` (the reference) a span gets ``st_act=0`` only if ``st`` is linear and then
    ``end_act=1``, else ``end_act=0`` only if ``end`` is linear.
    """
    linear = set(chain.linear_positions)
    entries = []
    for st, end in chain.blocks:
        if exclude_zeros:
            if st == 0:
                flags = [(1, 1)]
            elif st in linear:
                flags = [(0, 1), (1, 1)]
            elif end in linear:
                flags = [(1, 0), (1, 1)]
            else:
                flags = [(1, 1)]
        else:
            xs = (0, 1) if st in linear else (1,)
            ys = (0, 1) if end in linear else (1,)
            flags = [(x, y) for x in xs for y in ys]
        entries += [Entry(st, end, x, y) for x, y in flags]
    return sorted(entries)


def entry_activations(chain: ConvChain, entry: Entry) -> frozenset[int]:
    """The kept activations of an entry's network: A0 minus the span's interior, plus ``st``
    and ``end`` as flagged."""
    st, end, st_act, end_act = entry
    keep = set(chain.activation_positions) - set(range(st + 1, end))
    keep.discard(st)
    keep.discard(end)
    if st_act and st >= 1:
        keep.add(st)
    if end_act:
        keep.add(end)
    return frozenset(keep)


def entry_plan(chain: ConvChain, entry: Entry) -> Plan:
    """The plan an entry is measured with: the coarsest valid cover keeping its activations."""
    return Plan.for_activations(chain, entry_activations(chain, entry))


def entry_network(
    model: nn.Module, chain: ConvChain, entry: Entry, *, reinit_single: bool = True
) -> fx.GraphModule:
    """The trainable network of an entry; for a single-conv span (nothing removed) its conv and
    BN are re-initialised, as the reference does, so the entry measures how much that conv
    matters. Re-initialisation draws from torch's global RNG."""
    net = linearize(model, chain, entry_plan(chain, entry))
    if reinit_single and entry.end == entry.st + 1:
        pos = chain.positions[entry.end]
        for name in (pos.conv, pos.bn):
            if name is not None:
                net.get_submodule(name).reset_parameters()
    return net


def portable_model(model: nn.Module, chain: ConvChain) -> fx.GraphModule:
    """An eval-mode fx copy of ``model`` made of torch modules only, so worker processes and Ray
    tasks can unpickle it without importing the user's model code."""
    return symbolic_trace(copy.deepcopy(model).eval(), chain.leaf_modules)


def entry_seed(seed: int, entry: Entry) -> int:
    """A seed for one entry, derived from the global seed and the entry alone (so any shard,
    worker or order gives the same result)."""
    text = f"{seed}:{entry.st}:{entry.end}:{entry.st_act}:{entry.end_act}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") % (2**63)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with 1 ≤ K ≤ N."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise DepthCompressError(f"shard {text!r} must look like K/N, e.g. 2/4") from None
    if not 1 <= k <= n:
        raise DepthCompressError(f"shard {text!r}: need 1 ≤ K ≤ N")
    return k, n


def shard_entries(entries: Sequence[Entry], shard: tuple[int, int] | None) -> list[Entry]:
    """The K-th of N disjoint parts: entries whose index in the sorted list is K-1 mod N."""
    if shard is None:
        return list(entries)
    k, n = shard
    return [e for idx, e in enumerate(entries) if idx % n == k - 1]


# ---------------------------------------------------------------------------------------------
# fine-tuning and scoring


def _prepare(net: nn.Module, settings: FinetuneSettings, device: str) -> nn.Module:
    net = net.to(device)
    if settings.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def _inputs(x: torch.Tensor, settings: FinetuneSettings, device: str) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.to(memory_format=torch.channels_last) if settings.channels_last else x


def score_entry(
    net: nn.Module, dataset: Dataset, settings: FinetuneSettings, device: str = "cpu"
) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``net`` (eval mode) on ``dataset``: the
    score of an entry's network (and of the unmodified one) on the held-out split."""
    from .finetune import autocast

    net = _prepare(net, settings, device).eval()
    order = torch.arange(len(dataset))  # type: ignore[arg-type]
    correct, loss, count = 0, 0.0, 0
    dev = torch.device(device)
    pin = dev.type == "cuda"
    size, workers = settings.eval_batch_size, settings.loader_workers
    with torch.no_grad():
        for x, y in batches(dataset, order, size, workers, pin_memory=pin):
            with autocast(settings.amp, dev):
                logits = net(_inputs(x, settings, device)).float()
            y = y.to(device, non_blocking=True)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            count += len(y)
    if count == 0:
        raise DepthCompressError("the held-out split is empty")
    return 100.0 * correct / count, loss / count


def tune_entry(
    net: nn.Module, dataset: Dataset, settings: FinetuneSettings, seed: int, device: str = "cpu"
) -> float:
    """Fine-tune an entry's ``net`` in place with the ``Trainer`` (``settings.config(seed)``), in
    this process alone; returns the mean training loss."""
    from .finetune import Trainer

    trainer = Trainer(net, dataset, settings.config(seed), device=device, distributed=False)
    return trainer.run().train_loss


@contextlib.contextmanager
def seeded(settings: FinetuneSettings, seed: int) -> Iterator[None]:
    """Torch's random state forked and seeded by ``seed``, ``settings.threads`` CPU threads: what
    an entry's network is built and fine-tuned under, so entries do not depend on each other."""
    with torch.random.fork_rng(devices=[]), torch_threads(settings.threads):
        torch.manual_seed(seed)
        yield


def tuned_score(
    net: nn.Module,
    data: SplitData,
    settings: FinetuneSettings,
    seed: int,
    device: str,
    diverged: str,
) -> tuple[float, float, float]:
    """``net`` fine-tuned in place with the entries' recipe (none without steps) and scored on
    the held-out split: (accuracy %, loss, mean training loss or NaN). A divergence raises
    ``DivergedError(diverged)``, which says what was being fine-tuned and what to change."""
    train_loss = math.nan
    if settings.steps:
        try:
            train_loss = tune_entry(net, data.train, settings, seed, device)
        except DivergedError:
            raise DivergedError(diverged) from None
    acc, loss = score_entry(net, data.holdout, settings, device)
    return acc, loss, train_loss


CONTROL = "control"
"""The sidecar key of ``control_score``."""


def control_score(
    net: nn.Module,
    data: SplitData,
    settings: FinetuneSettings,
    base: tuple[float, float],
    device: str = "cpu",
) -> dict[str, float]:
    """The unmodified network after the entries' fine-tuning, relative to ``base`` (held-out
    accuracy and loss): what that fine-tuning alone gives every entry. A network far from its
    optimum (a channel-pruned one) gains points from it whatever is merged; the ``delta``
    normalisation subtracts it. Zero without fine-tuning."""
    if settings.zero_shot:
        return {SCORE: 0.0, "val_loss": 0.0}
    why = _diverged_control(settings)
    with seeded(settings, settings.seed):
        acc, loss, _ = tuned_score(copy.deepcopy(net), data, settings, settings.seed, device, why)
    return {SCORE: round(acc - base[0], 10), "val_loss": round(loss - base[1], 10)}


def describe_entry(chain: ConvChain, entry: Entry) -> str:
    """An entry in words: its block, and which activations its network removes."""
    removed = sorted(set(chain.activation_positions) - entry_activations(chain, entry))
    removed = [p for p in removed if entry.st <= p <= entry.end]
    single = entry.end == entry.st + 1
    convs = f"conv {entry.end} alone" if single else f"convs {entry.st + 1}..{entry.end} merged"
    acts = ", ".join(map(str, removed))
    acts = f"activation(s) at {acts} removed" if removed else "no activation removed"
    flags = ", ".join(f"{k}={v}" for k, v in entry._asdict().items())
    return f"entry ({flags}): {convs}, {acts}"


def _diverged(chain: ConvChain, entry: Entry, settings: FinetuneSettings) -> str:
    clip = f"now {settings.grad_clip:g}" if settings.grad_clip else "now off"
    return (
        f"fine-tuning importance {describe_entry(chain, entry)} diverged: its training loss "
        "became NaN or infinite. Lower the importance learning rate (now "
        f"{settings.lr:g}: --lr of 'depthcompress importance', --importance-lr of 'compress') "
        f"or clip its gradients ({clip}: --grad-clip of 'importance', --importance-grad-clip of "
        "'compress'), then write a new table: another --output, or compress --redo importance "
        "(the rows already computed used the old settings)"
    )


def _diverged_control(settings: FinetuneSettings) -> str:
    return (
        "the importance entries' fine-tuning diverged on the unmodified network itself (the "
        "control every entry is compared with): its training loss became NaN or infinite. "
        f"Lower the importance learning rate (now {settings.lr:g}: --lr of 'depthcompress "
        "importance', --importance-lr of 'compress') or clip its gradients (--grad-clip, "
        "--importance-grad-clip)"
    )


def measure_entry(job: _Job, entry: Entry) -> dict[str, Any]:
    """Build, fine-tune and score one entry; returns its table row."""
    start = time.perf_counter()
    s = job.settings
    seed = entry_seed(s.seed, entry)
    with seeded(s, seed):
        net = entry_network(
            job.net, job.chain, entry, reinit_single=s.reinit_single and s.steps > 0
        )
        why = _diverged(job.chain, entry, s)
        acc, loss, train_loss = tuned_score(net, job.data, s, seed, job.device, why)
    return {
        **entry._asdict(),
        SCORE: round(acc - job.base[0], 10),
        "val_loss": round(loss - job.base[1], 10),
        "train_loss": train_loss,
        "steps": s.steps,
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------
# table files


def weights_sha(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _versions() -> dict[str, str]:
    return {"depthcompress": __version__, "torch": torch.__version__}


# sidecar keys that must agree for rows to belong to one table
COMPATIBLE_KEYS = ("format", "score", "model", "data", "settings", "entries", "base", "versions")


def table_meta(
    model: nn.Module,
    chain: ConvChain,
    data: SplitData,
    settings: FinetuneSettings,
    base: tuple[float, float],
    entries: Sequence[Entry],
    *,
    shard: tuple[int, int] | None,
    model_name: str,
) -> dict[str, Any]:
    """The sidecar of a table: what it was computed from, with which settings."""
    return {
        "format": FORMAT,
        "score": SCORE,
        "model": {
            "name": model_name,
            "weights_sha256": weights_sha(model),
            "chain_sha256": json_sha([chain.signature(), list(chain.barriers), chain.mode]),
            "num_positions": chain.num_positions,
            "mode": chain.mode,
            "exclude": list(chain.exclude),
        },
        "data": {k: v for k, v in data.info.items() if k != "root"},
        "data_root": data.info.get("root"),
        "settings": asdict(settings),
        "entries": {"count": len(entries), "sha256": json_sha([list(e) for e in entries])},
        "base": {SCORE: base[0], "val_loss": base[1]},
        "versions": _versions(),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _mismatch(a: dict[str, Any], b: dict[str, Any], keys: Iterable[str]) -> str:
    """``name: a vs b`` for the settings (first six) that differ between two sidecars under
    ``keys``, the model's name aside; empty when they agree."""
    keys = tuple(keys)
    diff = nested_diff(
        {k: a.get(k) for k in keys}, {k: b.get(k) for k in keys}, ignore=("model.name",)
    )
    return "; ".join(f"{name}: {plain(x)!r} vs {plain(y)!r}" for name, x, y in diff[:6])


def _read_meta(path: Path) -> dict[str, Any]:
    return read_sidecar(
        path, FORMAT, "importance", "delete it to start over, or restore the sidecar"
    )


def _format(row: dict[str, Any]) -> list[str]:
    out = []
    for col in COLUMNS:
        v = row[col]
        if col == "seconds":
            out.append(f"{v:.3f}")
        elif isinstance(v, float):
            out.append(repr(v))
        else:
            out.append(str(int(v)))
    return out


def _parse(raw: dict[str, str], where: str) -> dict[str, Any]:
    try:
        row: dict[str, Any] = {c: int(raw[c]) for c in (*KEY_COLUMNS, "steps")}
        row.update({c: float(raw[c]) for c in COLUMNS if c not in row})
    except (KeyError, TypeError, ValueError) as exc:
        raise TableError(f"{where}: malformed row {raw}: {exc}") from None
    return row


def read_table(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A table's sidecar and its rows (typed), in file order."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"importance table {path} does not exist")
    meta = _read_meta(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            return meta, []
        if tuple(reader.fieldnames) != COLUMNS:
            raise TableError(f"{path}: expected columns {','.join(COLUMNS)}")
        rows = [_parse(raw, f"{path}:{n + 2}") for n, raw in enumerate(reader)]
    return meta, rows


def _key(row: dict[str, Any]) -> Entry:
    return Entry(*(int(row[c]) for c in KEY_COLUMNS))


def write_table(path: str | Path, meta: dict[str, Any], rows: Iterable[dict[str, Any]]) -> None:
    """Write a whole table (sorted by entry) and its sidecar, atomically."""
    with atomic_open(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in sorted(rows, key=_key):
            writer.writerow(_format(row))
        write_json(sidecar_path(path), meta)  # before the table it describes is replaced


# ---------------------------------------------------------------------------------------------
# executors


@dataclass(frozen=True)
class ExecutionPlan:
    """Where local entries run: one worker process per item of ``devices`` (worker w on
    ``devices[w]``), or, with a single device, one after another in this process. ``note`` says
    how and why the plan differs from what was asked (None when it does not)."""

    devices: tuple[str, ...]
    note: str | None = None

    @property
    def workers(self) -> int:
        """Worker processes (1: entries run in this process)."""
        return len(self.devices)


def execution_plan(
    device: str,
    workers: int,
    *,
    cuda_count: int,
    cpu_count: int,
    threads: int = 1,
    loader_workers: int = 0,
) -> ExecutionPlan:
    """Decide how ``workers`` local workers run entries on ``device``: on the CPU, ``workers``
    processes, fewer when processes × (threads + loader processes) would exceed the cores (the
    threads stay: they are a setting of the table, as they change CPU results); on one GPU
    (``cuda:N``, or ``cuda`` with one GPU), every entry in this process, one after another,
    because processes sharing a GPU only compete for its memory and time; with ``cuda`` and k
    GPUs, min(workers, k) processes, worker w on ``cuda:w``."""
    from .devices import resolve_device

    if workers < 1:
        raise DepthCompressError(f"workers must be ≥ 1, got {workers}")
    dev = resolve_device(device, local_rank=0, gpus=cuda_count)
    if dev.type == "cpu":
        return _cpu_plan(workers, cpu_count, threads, loader_workers)
    spread = dev.type == "cuda" and torch.device(device).index is None and cuda_count > 1
    if not spread:
        note = None
        if workers > 1:
            note = (
                f"--workers {workers}: the importance entries run one after another on {dev} in "
                "this process, since processes sharing one GPU would only compete for its "
                "memory and time"
            )
            if dev.type == "cuda" and cuda_count > 1:
                note += f"; pass --device cuda to run one worker on each of the {cuda_count} GPUs"
        return ExecutionPlan((str(dev),), note)
    n = min(workers, cuda_count)
    note = None
    if workers > cuda_count:
        note = (
            f"--workers {workers}: this machine has {cuda_count} GPUs, so {n} worker processes "
            "run the importance entries, one per GPU"
        )
    return ExecutionPlan(tuple(f"cuda:{w}" for w in range(n)), note)


def _cpu_plan(workers: int, cpu_count: int, threads: int, loader_workers: int) -> ExecutionPlan:
    """At most ``cpu_count // (threads + loader_workers)`` CPU workers (at least one), so that
    workers × threads never exceed the cores: oversubscribed threads collapse under load."""
    per_worker = threads + loader_workers
    fit = max(1, min(workers, cpu_count // per_worker))
    load = f"({threads} thread(s) + {loader_workers} loader process(es))"
    note = None
    if fit < workers:
        note = (
            f"{workers} importance worker(s) × {load} = {workers * per_worker} would exceed the "
            f"{cpu_count} CPU cores and slow each other down, so {fit} worker(s) run the entries"
        )
    elif per_worker > cpu_count:
        note = (
            f"one importance worker's {load} = {per_worker} exceed the {cpu_count} CPU cores, so "
            "entries run slowly; the threads stay (they are a setting of the table): lower "
            "--train-threads for a new table"
        )
    return ExecutionPlan(("cpu",) * fit, note)


def _run_local(job: _Job, todo: list[Entry]) -> Iterator[dict[str, Any]]:
    for entry in todo:
        yield measure_entry(job, entry)


_WORKER_JOB: _Job | None = None


def _worker_init(payload: bytes, devices: Any) -> None:
    """Unpickle the job once per worker process and take this worker's device from the queue."""
    global _WORKER_JOB
    job = pickle.loads(payload)
    job.device = devices.get()
    _WORKER_JOB = job


def _worker_measure(entry: Entry) -> dict[str, Any]:
    assert _WORKER_JOB is not None
    return measure_entry(_WORKER_JOB, entry)


def _run_processes(
    job: _Job, todo: list[Entry], devices: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """Run entries in one spawned process per item of ``devices``, worker w on ``devices[w]``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    payload = pickle.dumps(job)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    for device in devices:
        queue.put(device)
    init = (payload, queue)
    with ProcessPoolExecutor(len(devices), ctx, initializer=_worker_init, initargs=init) as pool:
        futures = [pool.submit(_worker_measure, e) for e in todo]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BrokenProcessPool:
            raise DepthCompressError(
                "a worker process died (its traceback is above): the model or data may not "
                "load in a fresh process, or memory ran out; finished rows are kept, rerun with "
                "--workers 1 to see the error in place"
            ) from None
        finally:
            for fut in futures:
                fut.cancel()


_RAY_JOBS: dict[str, _Job] = {}


def _ray_measure(token: str, payload: bytes, entry: Entry) -> dict[str, Any]:
    """Ray task body: unpickle the job once per worker process, then measure one entry."""
    if token not in _RAY_JOBS:
        _RAY_JOBS.clear()
        _RAY_JOBS[token] = pickle.loads(payload)
    return measure_entry(_RAY_JOBS[token], entry)


def _run_ray(job: _Job, todo: list[Entry], address: str | None) -> Iterator[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise DepthCompressError(
            "--executor ray needs Ray: pip install 'depthcompress[ray]' (or pip install ray)"
        ) from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    try:
        # a task on a GPU gets one of its own: Ray makes it the task's only visible device
        gpus = 1 if torch.device(job.device).type == "cuda" else 0
        if gpus:
            job = _Job(job.net, job.chain, job.data, job.settings, job.base, "cuda")
        payload = pickle.dumps(job)
        token = hashlib.sha256(payload).hexdigest()
        ref = ray.put(payload)
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(_ray_measure)
        pending = [task.remote(token, ref, e) for e in todo]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        finally:
            for p in pending:
                ray.cancel(p)
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# the table


@dataclass
class TableResult:
    """What ``importance_table`` did: the table's sidecar, all its rows, and how many were new."""

    path: Path
    meta: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    computed: int = 0
    skipped: int = 0


def importance_table(
    model: nn.Module,
    chain: ConvChain,
    data: SplitData,
    path: str | Path,
    *,
    settings: FinetuneSettings | None = None,
    shard: tuple[int, int] | str | None = None,
    executor: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    device: str = "cpu",
    progress: Reporter | None = None,
    model_name: str | None = None,
    entries: Sequence[Entry] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TableResult:
    """Measure every entry of ``chain`` (or of one shard) and write the table at ``path``.

    Rows are appended as they finish, under a lock that refuses a second run on the same file;
    an existing table with a matching sidecar is resumed (finished rows are skipped), a
    mismatching one is refused. ``entries`` restricts the run to a subset of the enumeration
    (for benchmarks); ``on_row`` sees each new row; ``progress`` gets a ``progress.Step`` of the
    task ``"importance"`` per row. Local workers follow ``execution_plan`` (on a GPU: never two
    processes on one device); its note, if any, goes to ``log`` (``progress.LOG`` without it).
    """
    settings = settings or FinetuneSettings()
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if executor not in EXECUTORS:
        raise DepthCompressError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    plan = _local_plan(device, workers, settings)
    if plan.note is not None and executor == "local":
        (log or LOG.warning)(plan.note)
    device = plan.devices[0]
    path = Path(path)
    all_entries = enumerate_entries(chain, exclude_zeros=settings.exclude_zeros)
    mine = _my_entries(all_entries, shard, entries)
    net = portable_model(model, chain)
    if path.exists():
        meta, done = _resume_table(path, model, chain, data, settings, all_entries, shard)
    else:
        with torch_threads(settings.threads):
            base = score_entry(copy.deepcopy(net), data.holdout, settings, device)
        name = model_name or type(model).__name__
        meta = table_meta(
            model, chain, data, settings, base, all_entries, shard=shard, model_name=name
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(sidecar_path(path), meta)
        done = {}

    todo = [e for e in mine if e not in done]
    base = (meta["base"][SCORE], meta["base"]["val_loss"])
    job = _Job(net, chain, data, settings, base, device)
    result = TableResult(path=path, meta=meta, skipped=len(mine) - len(todo))
    with csv_appender(path, COLUMNS) as append:
        if executor == "ray":
            rows = _run_ray(job, todo, ray_address)
        elif plan.workers > 1 and len(todo) > 1:
            rows = _run_processes(job, todo, plan.devices[: len(todo)])
        else:
            rows = _run_local(job, todo)
        tell(progress, "importance", result.skipped, len(mine), path.name)
        for row in rows:
            append(_format(row))
            done[_key(row)] = row
            result.computed += 1
            detail = f"{path.name}: entry {tuple(_key(row))}"
            tell(progress, "importance", result.skipped + result.computed, len(mine), detail)
            if on_row is not None:
                on_row(row)
    mine_set = set(mine)
    if CONTROL not in meta:  # after the rows; older tables gain it on their next run
        meta[CONTROL] = control_score(net, data, settings, base, device)
        write_json(sidecar_path(path), meta)
    if all(e in done for e in mine):
        write_table(path, meta, done.values())
    result.rows = sorted((r for k, r in done.items() if k in mine_set), key=_key)
    return result


def _local_plan(device: str, workers: int, settings: FinetuneSettings) -> ExecutionPlan:
    """``execution_plan`` on this machine, its first device checked for ``settings.amp``."""
    from .devices import cuda_count
    from .finetune import check_amp

    plan = execution_plan(
        device,
        workers,
        cuda_count=cuda_count(),
        cpu_count=os.cpu_count() or 1,
        threads=settings.threads,
        loader_workers=settings.loader_workers,
    )
    check_amp(settings.amp, plan.devices[0])
    return plan


def _my_entries(
    all_entries: list[Entry], shard: tuple[int, int] | None, entries: Sequence[Entry] | None
) -> list[Entry]:
    """The entries this run measures: its shard, restricted to ``entries`` when given."""
    if entries is None:
        return shard_entries(all_entries, shard)
    unknown = sorted(set(entries) - set(all_entries))
    if unknown:
        raise DepthCompressError(f"entries {unknown[:3]} are not entries of this chain")
    wanted = set(entries)
    return [e for e in shard_entries(all_entries, shard) if e in wanted]


def _resume_table(
    path: Path,
    model: nn.Module,
    chain: ConvChain,
    data: SplitData,
    settings: FinetuneSettings,
    all_entries: list[Entry],
    shard: tuple[int, int] | None,
) -> tuple[dict[str, Any], dict[Entry, dict[str, Any]]]:
    """The sidecar and finished rows of an existing table, after checking that it was computed
    from the same model, data and settings (``TableError`` if not)."""
    old_meta = _read_meta(path)
    repair_tail(path)
    _, rows = read_table(path)
    base = (old_meta["base"][SCORE], old_meta["base"]["val_loss"])
    meta = table_meta(model, chain, data, settings, base, all_entries, shard=shard, model_name="")
    diff = _mismatch(old_meta, meta, (*COMPATIBLE_KEYS, "shard"))
    if diff:
        raise TableError(
            f"{path} was computed with other settings ({diff}): "
            "resume with the same model, data and flags, or write to a new file"
        )
    return old_meta, {_key(r): r for r in rows}


def merge_tables(
    parts: Sequence[str | Path], out: str | Path, *, allow_missing: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Join shard tables into one: refuses parts computed differently, rows present in two
    parts, and (unless ``allow_missing``) a result missing entries. Writes ``out`` sorted."""
    if not parts:
        raise TableError("no tables to merge")
    metas, rows_by = [], {}
    origin: dict[Entry, Path] = {}
    for part in parts:
        part = Path(part)
        meta, rows = read_table(part)
        if metas:
            diff = _mismatch(metas[0], meta, COMPATIBLE_KEYS)
            if diff:
                raise TableError(f"{part} is not compatible with {parts[0]}: {diff}")
        metas.append(meta)
        for row in rows:
            key = _key(row)
            if key in origin:
                raise TableError(
                    f"entry {tuple(key)} is in both {origin[key]} and {part}: parts overlap"
                )
            origin[key] = part
            rows_by[key] = row
    merged = dict(metas[0])
    total = merged["entries"]["count"]
    if len(rows_by) < total and not allow_missing:
        raise TableError(
            f"the parts hold {len(rows_by)} of {total} entries: run the missing shards (or pass "
            "--allow-missing to write an incomplete table)"
        )
    merged.update(shard=None, merged_from=[str(p) for p in parts])
    write_table(out, merged, rows_by.values())
    return merged, sorted(rows_by.values(), key=_key)


# ---------------------------------------------------------------------------------------------
# layer pruning: importance per block configuration (docs/layermerge.md)

DEFAULT_SUBSETS = 2
"""Pruned subsets measured per configuration (fewest pruned first); the best one is kept."""


class ConfigEntry(NamedTuple):
    """Configuration ``config`` ≥ 1 (``pruning.block_configs`` order) of extended block
    ``(st, end, st_act, end_act)``."""

    st: int
    end: int
    st_act: int
    end_act: int
    config: int


def config_entries(
    chain: ConvChain, *, exclude_zeros: bool = True
) -> list[tuple[ConfigEntry, tuple[frozenset[int], ...]]]:
    """Every configuration entry with the pruned subsets that reach it (fewest pruned first):
    today's extended blocks × each block's configurations c ≥ 1, sorted."""
    from .pruning import block_configs

    configs = {b: block_configs(chain, *b) for b in chain.blocks}
    out = [
        (ConfigEntry(*e, c), cfg.subsets)
        for e in enumerate_entries(chain, exclude_zeros=exclude_zeros)
        for c, cfg in enumerate(configs[e.st, e.end])
        if c
    ]
    return sorted(out)


def config_entry_network(
    model: nn.Module, chain: ConvChain, entry: ConfigEntry, pruned: frozenset[int]
) -> fx.GraphModule | None:
    """The trainable network of a configuration entry: the entry's network with ``pruned``
    convs as identities; None where a conv shortcut fused by its cover would no longer fit."""
    from .pruning import misfit_shortcuts

    plan = entry_plan(chain, Entry(*entry[:4]))
    if misfit_shortcuts(chain, pruned, plan.boundaries | {0}):
        return None
    return linearize(model, chain, Plan(plan.activations, plan.boundaries, pruned))


def _config_seed(seed: int, entry: ConfigEntry, pruned: frozenset[int]) -> int:
    """A seed for one subset of a configuration entry, from the global seed and it alone."""
    text = f"{seed}:{':'.join(map(str, entry))}:{sorted(pruned)}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") % (2**63)


def _measure_subset(
    job: _Job, entry: ConfigEntry, pruned: frozenset[int]
) -> tuple[float, float, float] | None:
    """Fine-tune and score one pruned subset: (Δ accuracy, Δ loss, train loss), or None."""
    s = job.settings
    seed = _config_seed(s.seed, entry, pruned)
    with seeded(s, seed):
        net = config_entry_network(job.net, job.chain, entry, pruned)
        if net is None:
            return None
        why = _diverged(job.chain, Entry(*entry[:4]), s)
        acc, loss, train_loss = tuned_score(net, job.data, s, seed, job.device, why)
    return round(acc - job.base[0], 10), round(loss - job.base[1], 10), train_loss


def measure_config_entry(
    job: _Job, entry: ConfigEntry, subsets: Sequence[frozenset[int]]
) -> ConfigImportanceRow | None:
    """The best-scoring of ``subsets`` (ties: the first, i.e. fewest pruned) as the entry's row;
    None when no subset can be merged under the entry's cover."""
    start = time.perf_counter()
    best: tuple[tuple[float, float, float], frozenset[int]] | None = None
    tried = 0
    for pruned in subsets:
        got = _measure_subset(job, entry, pruned)
        if got is None:
            continue
        tried += 1
        if best is None or got[0] > best[0][0]:
            best = (got, pruned)
    if best is None:
        return None
    (acc, loss, train_loss), pruned = best
    seconds = time.perf_counter() - start
    return ConfigImportanceRow(
        *entry, acc, loss, train_loss, job.settings.steps, seconds, pruned, tried
    )


@dataclass
class ConfigTableResult:
    """What ``config_importance_table`` did: its sidecar, rows, entries new and fine-tunes run."""

    path: Path
    meta: dict[str, Any]
    rows: list[ConfigImportanceRow] = field(default_factory=list)
    computed: int = 0
    skipped: int = 0
    finetunes: int = 0
    seconds: float = 0.0


def config_cost(chain: ConvChain, settings: FinetuneSettings, subsets: int) -> tuple[int, int]:
    """(entries, fine-tunes) of a configuration importance table: what it costs to make."""
    entries = config_entries(chain, exclude_zeros=settings.exclude_zeros)
    return len(entries), sum(min(subsets, len(s)) for _, s in entries)


def config_importance_table(
    model: nn.Module,
    chain: ConvChain,
    data: SplitData,
    path: str | Path,
    *,
    settings: FinetuneSettings | None = None,
    subsets: int = DEFAULT_SUBSETS,
    device: str = "cpu",
    progress: Reporter | None = None,
    model_name: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ConfigTableResult:
    """Measure I(i, j, x, y, c) for every configuration entry (at most ``subsets`` pruned subsets
    each, the best kept with its subset) into the CSV at ``path``, one process, row by row;
    an existing table with a matching sidecar is resumed, a mismatching one refused."""
    settings = settings or FinetuneSettings()
    if subsets < 1:
        raise DepthCompressError(f"subsets must be ≥ 1, got {subsets}")
    path = Path(path)
    entries = config_entries(chain, exclude_zeros=settings.exclude_zeros)
    net = portable_model(model, chain)
    name = model_name or type(model).__name__
    meta, done = _config_resume(
        path, model, chain, data, settings, (entries, subsets), device, name
    )
    base = (meta["base"][SCORE], meta["base"]["val_loss"])
    job = _Job(net, chain, data, settings, base, device)
    todo = [(e, s[:subsets]) for e, s in entries if e not in done]
    result = ConfigTableResult(path=path, meta=meta, skipped=len(entries) - len(todo))
    n, tunes = config_cost(chain, settings, subsets)
    (log or LOG.info)(
        f"configuration importance: {n} entries, {tunes} fine-tunes of {settings.steps} steps "
        f"({len(todo)} entries to compute)"
    )
    start = time.perf_counter()
    with csv_appender(path, CONFIG_IMPORTANCE_COLUMNS) as append:
        tell(progress, "importance", result.skipped, len(entries), path.name)
        for entry, tries in todo:
            row = measure_config_entry(job, entry, tries)
            result.finetunes += len(tries)
            if row is not None:
                append(row.as_csv())
                done[entry] = row
            result.computed += 1
            count = result.skipped + result.computed
            tell(progress, "importance", count, len(entries), f"{path.name}: {tuple(entry)}")
    result.seconds = time.perf_counter() - start
    write_config_importance_rows(path, done.values())
    result.rows = sorted(done.values(), key=lambda r: r.key)
    return result


def _config_resume(
    path: Path,
    model: nn.Module,
    chain: ConvChain,
    data: SplitData,
    settings: FinetuneSettings,
    measured: tuple[list[tuple[ConfigEntry, tuple[frozenset[int], ...]]], int],
    device: str,
    model_name: str,
) -> tuple[dict[str, Any], dict[ConfigEntry, ConfigImportanceRow]]:
    """The sidecar and finished rows of the table at ``path`` (checked), or a new sidecar."""
    entries, subsets = measured
    keys = [e for e, _ in entries]
    if path.exists():
        old = _read_meta(path)
        repair_tail(path)
        base = (old["base"][SCORE], old["base"]["val_loss"])
        meta = table_meta(model, chain, data, settings, base, keys, shard=None, model_name="")
        meta["configs"] = {"subsets": subsets, "semantics": SEMANTICS}
        diff = _mismatch(old, meta, (*COMPATIBLE_KEYS, "configs"))
        if diff:
            raise TableError(
                f"{path} was computed with other settings ({diff}): "
                "resume with the same model, data and flags, or write to a new file"
            )
        rows = read_config_importance_rows(path)
        return old, {ConfigEntry(*r.key): r for r in rows}
    with torch_threads(settings.threads):
        base = score_entry(portable_model(model, chain), data.holdout, settings, device)
    meta = table_meta(model, chain, data, settings, base, keys, shard=None, model_name=model_name)
    meta["configs"] = {"subsets": subsets, "semantics": SEMANTICS}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(sidecar_path(path), meta)
    return meta, {}
