"""Latency tables ``T(i, j)`` (ALGORITHM.md §4): time the merged conv of every block of a chain on
a backend, appending each row as soon as it is measured so that an interrupted run resumes.

The timed module of block ``(i, j)`` is ``Conv2d(in, out, K, stride, padding, groups)`` from
``chain.geometry(i, j)`` followed by one activation, on a random input of the original shape at
position ``i``. Like the reference, the activation is always included, even where a plan removes
it; it is the chain's own kind (``chain.insert_activation``, e.g. ReLU6 for MobileNetV2) rather
than a plain ReLU, so the table prices the conv + activation pair a merged network would run.
``time`` is the median of the timed runs in ms by default (robust to outliers; the reference used
the mean of GPU runs; ``Protocol.statistic`` may pick another) and ``stdev`` their population
standard deviation in ms.
"""

from __future__ import annotations

import contextlib
import csv
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import Backend, Timing, machine_info, package_version
from .errors import TableError, plain
from .files import (
    csv_appender,
    json_sha,
    nested_diff,
    read_sidecar,
    repair_tail,
    sidecar_path,
    write_json,
)
from .graph import ConvChain
from .kinds import make_activation
from .progress import Reporter, tell
from .tables import LATENCY_COLUMNS, LatencyRow, read_latency_rows, write_latency_rows

PASS_COLUMNS = ("id", "pass", "time", "stdev")
FORMAT = "depthcompress-latency-1"
# sidecar keys that must agree for rows to belong to one table (model.name and the machine's
# hostname may differ: a table can be resumed from another shell or container of one machine)
COMPATIBLE_KEYS = (
    "format",
    "model",
    "blocks",
    "batch",
    "seed",
    "passes",
    "backend",
    "protocol",
    "machine",
)
IGNORED = ("model.name", "machine.hostname")


@dataclass
class LatencyResult:
    """What ``build_latency_table`` did: the sidecar, the rows present, and what was new."""

    path: Path
    meta: dict[str, Any]
    rows: list[LatencyRow] = field(default_factory=list)
    measured: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Whether every block of the chain has a row."""
        return len(self.rows) == self.meta["blocks"]["count"]


def block_module(chain: ConvChain, i: int, j: int, *, seed: int = 0) -> nn.Module:
    """The module timed for block ``(i, j)``: its merged conv + the chain's activation, random
    weights drawn from ``seed`` without touching torch's global random state."""
    g = chain.geometry(i, j)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + i * 1009 + j)
        conv = nn.Conv2d(
            g.in_channels,
            g.out_channels,
            g.kernel,
            stride=g.stride,
            padding=g.padding,
            groups=g.groups,
        )
    return nn.Sequential(conv, make_activation(chain.insert_activation)).eval()


def block_input_shape(chain: ConvChain, i: int, j: int, batch: int) -> tuple[int, ...]:
    """Input shape of block ``(i, j)``: the original map at position ``i`` with batch ``batch``."""
    return (batch, *chain.geometry(i, j).in_shape[1:])


def passes_path(path: str | Path) -> Path:
    """Per-pass results of a table measured in several passes: ``LATENCY.csv.passes``."""
    return Path(f"{path}.passes")


def chain_sha(chain: ConvChain) -> str:
    """Fingerprint of everything that fixes the blocks' geometry."""
    return json_sha([chain.signature(), sorted(chain.barriers), chain.mode, list(chain.blocks)])


def table_meta(
    chain: ConvChain,
    backend: Backend,
    *,
    batch: int,
    seed: int,
    model_name: str,
    passes: int = 1,
) -> dict[str, Any]:
    """The sidecar of a table: model, blocks, batch, backend, protocol, machine and versions."""
    from ._version import __version__

    return {
        "format": FORMAT,
        "model": {
            "name": model_name,
            "chain_sha256": chain_sha(chain),
            "num_positions": chain.num_positions,
            "mode": chain.mode,
            "exclude": list(chain.exclude),
            "max_kernel_size": chain.max_kernel_size,
            "input_shape": list(chain.input_shape[1:]),
            "activation": chain.insert_activation,
        },
        "blocks": {"count": len(chain.blocks), "sha256": json_sha([list(b) for b in chain.blocks])},
        "batch": batch,
        "seed": seed,
        "passes": passes,
        "backend": backend.info(),
        "protocol": backend.protocol.to_dict(),
        "machine": machine_info(),
        "versions": {
            "depthcompress": __version__,
            "torch": torch.__version__,
            "onnxruntime": package_version("onnxruntime"),
            "python": platform.python_version(),
        },
        "units": {
            "time": f"ms, {backend.protocol.statistic} of the timed runs",
            "stdev": "ms, population stdev of the timed runs",
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``name: old vs new`` for every setting that differs between two sidecars."""
    a = {k: old.get(k) for k in COMPATIBLE_KEYS}
    b = {k: new.get(k) for k in COMPATIBLE_KEYS}
    return [f"{k}: {plain(x)!r} vs {plain(y)!r}" for k, x, y in nested_diff(a, b, IGNORED)]


RESUME_FIX = "Write to a new file with -o, or pass --force to discard it and start over"


def read_meta(
    path: str | Path,
    fix: str = "pass --force to measure it again from scratch, or write to a new file with -o",
) -> dict[str, Any]:
    """The sidecar of a latency table; TableError (ending in ``fix``) if it is missing or not
    one."""
    return read_sidecar(path, FORMAT, "latency", fix)


def check_meta(path: Path, old: dict[str, Any], new: dict[str, Any], fix: str = RESUME_FIX) -> None:
    """Refuse to add rows measured as ``new`` says to the table at ``path`` measured as ``old``
    says: TableError naming every differing setting (the table's value first), then ``fix``."""
    diff = settings_diff(old, new)
    if diff:
        raise TableError(
            f"{path} was measured with other settings (the table's vs this run's: "
            f"{'; '.join(diff[:6])}): rows measured differently cannot share a table. {fix}"
        )


def read_latency_table(path: str | Path) -> tuple[dict[str, Any], list[LatencyRow]]:
    """A table's sidecar and its rows sorted by id."""
    meta = read_meta(path)
    return meta, sorted(read_latency_rows(path), key=lambda r: r.id)


def latency_dict(rows: Iterable[LatencyRow]) -> dict[tuple[int, int], float]:
    """``{(st, end): time}`` from table rows."""
    return {(r.st, r.end): r.time for r in rows}


def _check_rows(path: Path, rows: list[LatencyRow], blocks: tuple[tuple[int, int], ...]) -> None:
    seen: set[int] = set()
    for r in rows:
        if not 0 <= r.id < len(blocks) or blocks[r.id] != (r.st, r.end):
            raise TableError(
                f"{path}: row id {r.id} is block ({r.st}, {r.end}), which is not block {r.id} "
                "of this chain: the file belongs to another model"
            )
        if r.id in seen:
            raise TableError(f"{path}: block id {r.id} appears twice")
        seen.add(r.id)


def _read_passes(path: Path, blocks: int, passes: int) -> dict[int, dict[int, tuple[float, float]]]:
    """``{id: {pass: (time, stdev)}}`` from a passes file (a cut-off last line is dropped)."""
    out: dict[int, dict[int, tuple[float, float]]] = {}
    if not path.is_file():
        return out
    repair_tail(path)
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is not None and tuple(header) != PASS_COLUMNS:
            raise TableError(f"{path}: expected the header {','.join(PASS_COLUMNS)}")
        for n, raw in enumerate(reader, start=2):
            try:
                k, p, t, sd = int(raw[0]), int(raw[1]), float(raw[2]), float(raw[3])
            except (ValueError, IndexError):
                raise TableError(f"{path}:{n}: malformed line {raw}") from None
            if not (0 <= k < blocks and 0 <= p < passes):
                raise TableError(f"{path}:{n}: block {k} pass {p} is out of range")
            out.setdefault(k, {})[p] = (t, sd)
    return out


def combine_passes(values: list[tuple[float, float]]) -> tuple[float, float]:
    """One (time, stdev) from several passes: the median time, and a stdev that adds the
    between-pass variance to the mean within-pass variance."""
    times = [t for t, _ in values]
    within = statistics.fmean(sd * sd for _, sd in values)
    return statistics.median(times), math.sqrt(within + statistics.pvariance(times))


def build_latency_table(
    chain: ConvChain,
    backend: Backend,
    path: str | Path,
    *,
    batch: int = 1,
    seed: int = 0,
    passes: int = 1,
    model_name: str = "",
    force: bool = False,
    progress: Reporter | None = None,
    on_row: Callable[[LatencyRow, Timing], None] | None = None,
) -> LatencyResult:
    """Measure ``T(i, j)`` for every block of ``chain`` on ``backend`` into the CSV at ``path``.

    Each row is appended and fsynced as soon as it is measured. If ``path`` exists, its sidecar
    must record the same settings (model, batch, backend and its version, threads, protocol,
    machine): then finished rows are kept and only missing ones measured; otherwise TableError
    names the differing settings. ``force`` discards an existing table first. When every block
    is present the file is rewritten sorted by ``id``.

    With ``passes`` > 1 the whole table is swept that many times and each row is the median over
    the passes, so that a slow phase of a shared machine spoils one pass of an entry, not the
    entry; per-pass results are kept (fsynced) in ``LATENCY.csv.passes`` until the table is done.
    ``on_row`` sees each finished row with the timing of its last pass. ``progress`` is told a
    ``Step`` (task: the table's file name, detail: the block) before and after each
    measurement; nothing is drawn.
    """
    if batch < 1:
        raise TableError(f"batch must be ≥ 1, got {batch}")
    if passes < 1:
        raise TableError(f"passes must be ≥ 1, got {passes}")
    path = Path(path)
    meta = table_meta(chain, backend, batch=batch, seed=seed, model_name=model_name, passes=passes)
    if force:
        for p in (path, sidecar_path(path), passes_path(path)):
            p.unlink(missing_ok=True)
    done: dict[int, LatencyRow] = {}
    if path.exists():
        old = read_meta(path)
        check_meta(path, old, meta)
        repair_tail(path)
        rows = read_latency_rows(path)
        _check_rows(path, rows, chain.blocks)
        done = {r.id: r for r in rows}
        meta = old
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        passes_path(path).unlink(missing_ok=True)
        write_json(sidecar_path(path), meta)

    n = len(chain.blocks)
    stat = backend.protocol.statistic
    todo = [k for k in range(n) if k not in done]
    partial = _read_passes(passes_path(path), n, passes) if passes > 1 else {}
    partial = {k: v for k, v in partial.items() if k not in done}
    result = LatencyResult(path=path, meta=meta, skipped=len(done))
    start = time.perf_counter()
    count, total = len(done) * passes + sum(len(v) for v in partial.values()), n * passes
    tell(progress, path.name, count, total)
    split = passes_path(path) if passes > 1 else None
    try:
        with (
            csv_appender(path, LATENCY_COLUMNS) as append,
            csv_appender(split, PASS_COLUMNS) if split else contextlib.nullcontext() as append_pass,
        ):

            def finish(k: int, value: tuple[float, float], timing: Timing | None) -> None:
                row = LatencyRow(k, *chain.blocks[k], *value)
                append(row.as_csv())
                done[k] = row
                result.measured += 1
                if on_row is not None and timing is not None:
                    on_row(row, timing)

            for k in todo:  # all passes measured before an interruption, row not yet written
                if len(partial.get(k, {})) == passes:
                    finish(k, combine_passes(list(partial[k].values())), None)
            for p in range(passes):
                for k in todo:
                    if k in done or p in partial.get(k, {}):
                        continue
                    i, j = chain.blocks[k]
                    g = chain.geometry(i, j)
                    label = f"pass {p + 1}/{passes} " if split else ""
                    detail = f"{label}({i},{j}) {g.kernel[0]}x{g.kernel[1]}"
                    tell(progress, path.name, count, total, detail)
                    timing = backend.measure(
                        block_module(chain, i, j, seed=seed), block_input_shape(chain, i, j, batch)
                    )
                    value = (timing.statistic(stat), timing.stdev)
                    count += 1
                    tell(progress, path.name, count, total, detail)
                    if split is None:
                        finish(k, value, timing)
                        continue
                    append_pass([str(k), str(p), repr(value[0]), repr(value[1])])
                    partial.setdefault(k, {})[p] = value
                    if len(partial[k]) == passes:
                        finish(k, combine_passes(list(partial[k].values())), timing)
    finally:
        result.seconds = time.perf_counter() - start
        result.rows = sorted(done.values(), key=lambda r: r.id)
    if len(done) == n:
        write_latency_rows(path, sorted(done.values(), key=lambda r: r.id))
        passes_path(path).unlink(missing_ok=True)
    return result


def plan_latency(rows: Iterable[LatencyRow], blocks: Iterable[tuple[int, int]]) -> float:
    """Σ T over a plan's blocks (what the DP optimises); TableError if a block has no row."""
    table = latency_dict(rows)
    missing = [b for b in blocks if b not in table]
    if missing:
        raise TableError(f"the latency table has no row for blocks {missing[:5]}")
    return sum(table[b] for b in blocks)
