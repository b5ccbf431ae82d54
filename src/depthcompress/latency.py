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

A table is measured in ``DEFAULT_PASSES`` interleaved passes (pass 1 over every block, then
pass 2...), each row combining its passes as ``Robust`` says (the median by default); rows whose
passes disagree get extra passes, and the sidecar's ``measurement`` records the spread and the
load average, with a warning when the machine was too noisy to trust the table.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
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
from .progress import LOG, Reporter, tell
from .pruning import SEMANTICS, wired_through
from .tables import (
    CONFIG_LATENCY_COLUMNS,
    LATENCY_COLUMNS,
    ConfigLatencyRow,
    LatencyRow,
    read_config_latency_rows,
    read_latency_rows,
    write_config_latency_rows,
    write_latency_rows,
)

Row = LatencyRow | ConfigLatencyRow

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
    "robust",
    "backend",
    "protocol",
    "machine",
)
IGNORED = ("model.name", "machine.hostname")
# what a complete table may differ in and still be kept as it is (its rows are final)
PASS_KEYS = ("passes", "robust")
DEFAULT_PASSES = 3


@dataclass
class LatencyResult:
    """What ``build_latency_table`` did: the sidecar, the rows present, what was new, the
    noisy-machine warning if any, and each row's pass times (ms) when measured in passes."""

    path: Path
    meta: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    measured: int = 0
    skipped: int = 0
    seconds: float = 0.0
    warning: str | None = None
    pass_times: dict[int, list[float]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every block of the chain has a row."""
        return len(self.rows) == self.meta["blocks"]["count"]


@dataclass(frozen=True)
class Timed:
    """One timed module of a table: block ``(st, end)`` in configuration ``config`` (0: the
    unpruned block of the plain table), with the convs of ``pruned`` left out."""

    st: int
    end: int
    config: int = 0
    pruned: frozenset[int] = frozenset()

    @property
    def key(self) -> tuple[int, ...]:
        """What a row of the unit's table names: ``(st, end)``, or ``(st, end, config)``."""
        return (self.st, self.end, self.config) if self.config else (self.st, self.end)


def timed_units(chain: ConvChain, configs: bool = False) -> tuple[Timed, ...]:
    """The modules a table times, in row-id order: every block, or with ``configs`` every
    configuration c ≥ 1 of every block (``pruning.block_configs``; its first subset)."""
    if not configs:
        return tuple(Timed(i, j) for i, j in chain.blocks)
    from .pruning import block_configs

    return tuple(
        Timed(i, j, c, cfg.subsets[0])
        for i, j in chain.blocks
        for c, cfg in enumerate(block_configs(chain, i, j))
        if c
    )


def block_module(
    chain: ConvChain,
    i: int,
    j: int,
    *,
    seed: int = 0,
    config: int = 0,
    pruned: frozenset[int] = frozenset(),
) -> nn.Module:
    """The module timed for block ``(i, j)`` (with the convs of ``pruned`` left out): its merged
    conv + the chain's activation, random weights drawn from ``seed`` without touching torch's
    global random state; the activation alone where the block is no conv at all."""
    act = make_activation(chain.insert_activation)
    if wired_through(chain, i, j, pruned):
        return nn.Sequential(act).eval()
    g = chain.geometry(i, j, pruned)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + i * 1009 + j + config * 7919)
        conv = nn.Conv2d(
            g.in_channels,
            g.out_channels,
            g.kernel,
            stride=g.stride,
            padding=g.padding,
            groups=g.groups,
        )
    return nn.Sequential(conv, act).eval()


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
    passes: int | None = None,
    robust: Robust | None = None,
    configs: bool = False,
) -> dict[str, Any]:
    """The sidecar of a table: model, blocks (with ``configs``: the configurations timed),
    batch, passes, backend, protocol, machine and versions."""
    from ._version import __version__

    units = timed_units(chain, configs)
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
        "blocks": {
            "count": len(units),
            "sha256": json_sha([list(u.key) for u in units]),
            **({"semantics": SEMANTICS} if configs else {}),
        },
        "batch": batch,
        "seed": seed,
        "passes": DEFAULT_PASSES if passes is None else passes,
        "robust": (robust or Robust()).to_dict(),
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


def settings_diff(
    old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()
) -> list[str]:
    """``name: old vs new`` for every setting that differs between two sidecars, except the keys
    in ``ignore`` and ``robust`` in a sidecar written before it existed (format 1 without it)."""
    keys = [k for k in COMPATIBLE_KEYS if k not in ignore and (k != "robust" or k in old)]
    a = {k: old.get(k) for k in keys}
    b = {k: new.get(k) for k in keys}
    return [f"{k}: {plain(x)!r} vs {plain(y)!r}" for k, x, y in nested_diff(a, b, IGNORED)]


RESUME_FIX = "Write to a new file with -o, or pass --force to discard it and start over"


def read_meta(
    path: str | Path,
    fix: str = "pass --force to measure it again from scratch, or write to a new file with -o",
) -> dict[str, Any]:
    """The sidecar of a latency table; TableError (ending in ``fix``) if it is missing or not
    one."""
    return read_sidecar(path, FORMAT, "latency", fix)


def _is_complete(path: Path, meta: dict[str, Any]) -> bool:
    """Whether the table at ``path`` has a row for each of its sidecar's blocks (read only)."""
    try:
        ids = {r.id for r in read_rows(path)}
    except (OSError, TableError):
        return False
    return len(ids) == int(meta.get("blocks", {}).get("count", -1))


def check_meta(path: Path, old: dict[str, Any], new: dict[str, Any], fix: str = RESUME_FIX) -> None:
    """Refuse to add rows measured as ``new`` says to the table at ``path`` measured as ``old``
    says: TableError naming every differing setting (the table's value first), then ``fix``. A
    complete table may differ in its passes (``PASS_KEYS``): its rows are final, kept as they
    are (so tables of older versions, measured in one pass, are still adopted and resumed)."""
    diff = settings_diff(old, new, PASS_KEYS if _is_complete(path, old) else ())
    if diff:
        raise TableError(
            f"{path} was measured with other settings (the table's vs this run's: "
            f"{'; '.join(diff[:6])}): rows measured differently cannot share a table. {fix}"
        )


def is_config_table(path: str | Path) -> bool:
    """Whether the CSV at ``path`` is a configuration latency table (a ``config`` column)."""
    with Path(path).open(newline="") as fh:
        return "config" in next(csv.reader(fh), [])


def read_rows(path: str | Path) -> list[Row]:
    """The rows of a plain or configuration latency table (told apart by its header)."""
    if is_config_table(path):
        return list(read_config_latency_rows(path))
    return list(read_latency_rows(path))


def read_latency_table(path: str | Path) -> tuple[dict[str, Any], list[Row]]:
    """A table's sidecar and its rows sorted by id."""
    meta = read_meta(path)
    return meta, sorted(read_rows(path), key=lambda r: r.id)


def latency_dict(rows: Iterable[LatencyRow]) -> dict[tuple[int, int], float]:
    """``{(st, end): time}`` from table rows."""
    return {(r.st, r.end): r.time for r in rows}


def _check_rows(path: Path, rows: list[Row], units: tuple[Timed, ...]) -> None:
    seen: set[int] = set()
    for r in rows:
        if not 0 <= r.id < len(units) or units[r.id].key != r.key:
            raise TableError(
                f"{path}: row id {r.id} is block {r.key}, which is not entry {r.id} "
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


COMBINE = ("median", "p25", "min")


@dataclass(frozen=True)
class Robust:
    """How a table measured in several passes turns them into one row, and which rows get more.

    ``combine`` is the statistic across a row's passes (``median``, the lower quartile ``p25``
    or ``min``). The median is the default: with two busy loops on 2 cores (load 7–9,
    benchmarks/bench_table_stability.py), two rounds of three 3-pass tables chose the same demo
    plans with the median and ``p25`` all six times and with ``min`` once another, while 1-pass
    tables chose two plans in one round; the median ignores one slow or one lucky pass. A row
    whose relative spread (inter-quartile range of its passes over their median) exceeds
    ``spread_limit`` is measured again, one extra pass at a time, at most ``max_extra`` times.
    ``noisy_spread`` is the table's median spread above which the table is not to be trusted.
    """

    combine: str = "median"
    spread_limit: float = 0.15
    max_extra: int = 4
    noisy_spread: float = 0.10

    def __post_init__(self) -> None:
        if self.combine not in COMBINE:
            raise TableError(
                f"unknown combine {self.combine!r}: choose one of {', '.join(COMBINE)}"
            )
        if self.spread_limit < 0 or self.max_extra < 0 or self.noisy_spread < 0:
            raise TableError(f"invalid {self}: limits and max_extra must be ≥ 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for sidecars."""
        return asdict(self)


def relative_spread(times: list[float]) -> float:
    """Inter-quartile range of a row's pass times over their median (0 for fewer than two):
    a single wild pass among several inflates it less the more passes there are."""
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(times)


def combine_passes(values: list[tuple[float, float]], how: str = "median") -> tuple[float, float]:
    """One (time, stdev) from several passes: the ``how`` statistic of the times (median, p25
    or min), and a stdev that adds the between-pass variance to the mean within-pass variance."""
    times = [t for t, _ in values]
    within = statistics.fmean(sd * sd for _, sd in values)
    if how == "min" or len(times) == 1:
        value = min(times) if how == "min" else times[0]
    elif how == "p25":
        value = statistics.quantiles(times, n=4, method="inclusive")[0]
    else:
        value = statistics.median(times)
    return value, math.sqrt(within + statistics.pvariance(times))


def spread_summary(
    blocks: tuple[tuple[int, ...], ...],
    values: dict[int, dict[int, tuple[float, float]]],
    passes: int,
) -> dict[str, Any]:
    """Median and worst relative spread (after re-measurement) of the rows measured in several
    passes, the worst row, and the rows re-measured (more than ``passes`` passes)."""
    spreads = {k: relative_spread([t for t, _ in v.values()]) for k, v in values.items()}
    spreads = {k: s for k, s in spreads.items() if len(values[k]) > 1}
    if not spreads:
        return {"median": None, "worst": None, "worst_block": None, "remeasured": 0}
    worst = max(spreads, key=lambda k: spreads[k])
    again = [list(blocks[k]) for k, v in sorted(values.items()) if len(v) > passes]
    return {
        "median": statistics.median(spreads.values()),
        "worst": spreads[worst],
        "worst_block": list(blocks[worst]),
        "remeasured": len(again),
        "remeasured_blocks": again,
    }


def noisy_warning(measurement: dict[str, Any], robust: Robust) -> str | None:
    """What to tell the user when the table's spread or the machine's load makes it untrustworthy
    (median spread above ``robust.noisy_spread`` or a load average above the core count)."""
    cores = measurement["cores"]
    load = max(measurement["load_start"][0], measurement["load_end"][0])
    spread = measurement["spread"]["median"]
    reasons = []
    if spread is not None and spread > robust.noisy_spread:
        reasons.append(
            f"the median pass-to-pass spread of a row is {100 * spread:.0f} % "
            f"(limit {100 * robust.noisy_spread:.0f} %)"
        )
    if load > cores:
        reasons.append(f"the load average was {load:.2f} on {cores} cores")
    if not reasons:
        return None
    return (
        f"the machine was too noisy to trust this latency table: {' and '.join(reasons)}. "
        "Close other work and measure again (--force), with more --passes or with --threads 1"
    )


@dataclass
class _Sweep:
    """One build's state: the pass values of each row, the rows done, the progress count."""

    chain: ConvChain
    units: tuple[Timed, ...]
    backend: Backend
    path: Path
    batch: int
    seed: int
    total: int
    progress: Reporter | None
    values: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)
    count: int = 0

    def measure(self, k: int, label: str) -> tuple[tuple[float, float], Timing]:
        """Time unit ``k`` once: (the protocol's statistic, stdev) and the timing."""
        u = self.units[k]
        g = self.chain.geometry(u.st, u.end, u.pruned)
        detail = f"{label}({','.join(map(str, u.key))}) {g.kernel[0]}x{g.kernel[1]}"
        tell(self.progress, self.path.name, self.count, self.total, detail)
        timing = self.backend.measure(
            self.module(u), block_input_shape(self.chain, u.st, u.end, self.batch)
        )
        self.count += 1
        tell(self.progress, self.path.name, self.count, self.total, detail)
        return (timing.statistic(self.backend.protocol.statistic), timing.stdev), timing

    def module(self, u: Timed) -> nn.Module:
        """The module timed for unit ``u`` (a plain block: ``block_module`` called as before)."""
        if not u.config:
            return block_module(self.chain, u.st, u.end, seed=self.seed)
        return block_module(
            self.chain, u.st, u.end, seed=self.seed, config=u.config, pruned=u.pruned
        )


def _settled(times: list[float], passes: int, robust: Robust) -> bool:
    """Whether a row has its passes and either a small spread or all its extra passes."""
    if len(times) < passes:
        return False
    return len(times) >= passes + robust.max_extra or relative_spread(times) <= robust.spread_limit


def build_latency_table(
    chain: ConvChain,
    backend: Backend,
    path: str | Path,
    *,
    batch: int = 1,
    seed: int = 0,
    passes: int | None = None,
    robust: Robust = Robust(),
    model_name: str = "",
    force: bool = False,
    progress: Reporter | None = None,
    on_row: Callable[[Row, Timing], None] | None = None,
    configs: bool = False,
) -> LatencyResult:
    """Measure ``T(i, j)`` for every block of ``chain`` on ``backend`` into the CSV at ``path``.

    Each row is appended and fsynced as soon as it is final. If ``path`` exists, its sidecar
    must record the same settings (model, batch, backend and its version, threads, protocol,
    machine): then finished rows are kept and only missing ones measured; otherwise TableError
    names the differing settings (a complete table is kept whatever its passes). ``force``
    discards an existing table first. When every block is present the file is rewritten sorted
    by ``id`` and the sidecar gets a ``measurement`` record (spread, load, re-measured rows).

    The table is swept ``passes`` times (default ``DEFAULT_PASSES``), pass 1 over all blocks,
    then pass 2..., so that a slow phase of a shared machine spoils one pass of many entries, not
    every pass of a few; each row combines its passes as ``robust`` says and rows with a large
    spread get extra passes.
    Per-pass results are kept (fsynced) in ``LATENCY.csv.passes`` until the table is done.
    ``on_row`` sees each finished row with the timing of its last pass. ``progress`` is told a
    ``Step`` (task: the table's file name, detail: the block) before and after each
    measurement; nothing is drawn. A table too noisy to trust is logged as a warning on
    ``progress.LOG`` and returned in ``LatencyResult.warning``. ``configs`` makes the
    configuration table instead (layer pruning): one row per configuration c ≥ 1 of each block
    (``timed_units``), columns ``CONFIG_LATENCY_COLUMNS``.
    """
    passes = DEFAULT_PASSES if passes is None else passes
    if batch < 1:
        raise TableError(f"batch must be ≥ 1, got {batch}")
    if passes < 1:
        raise TableError(f"passes must be ≥ 1, got {passes}")
    path = Path(path)
    meta = table_meta(
        chain,
        backend,
        batch=batch,
        seed=seed,
        model_name=model_name,
        passes=passes,
        robust=robust,
        configs=configs,
    )
    units = timed_units(chain, configs)
    if force:
        for old in (path, sidecar_path(path), passes_path(path)):
            old.unlink(missing_ok=True)
    done = _existing_rows(path, units, meta)
    if path.exists():
        meta = read_meta(path)
    n = len(units)
    split = passes_path(path) if passes > 1 else None
    sweep = _Sweep(chain, units, backend, path, batch, seed, n * passes, progress)
    if split is not None:
        sweep.values = _read_passes(split, n, passes + robust.max_extra)
    todo = [k for k in range(n) if k not in done]
    result = LatencyResult(path=path, meta=meta, skipped=len(done))
    load_start = os.getloadavg()
    start = time.perf_counter()
    sweep.count = len(done) * passes + sum(len(sweep.values.get(k, {})) for k in todo)
    tell(progress, path.name, sweep.count, sweep.total)
    try:
        with (
            csv_appender(path, CONFIG_LATENCY_COLUMNS if configs else LATENCY_COLUMNS) as append,
            csv_appender(split, PASS_COLUMNS) if split else contextlib.nullcontext() as append_pass,
        ):

            def finish(k: int, value: tuple[float, float], timing: Timing | None) -> None:
                row = _row(k, units[k], value)
                append(row.as_csv())
                done[k] = row
                result.measured += 1
                if on_row is not None and timing is not None:
                    on_row(row, timing)

            def step(k: int, p: int) -> None:
                if k in done or p in sweep.values.get(k, {}):
                    return
                if split is None:
                    value, timing = sweep.measure(k, "")
                    finish(k, value, timing)
                    return
                value, timing = sweep.measure(k, f"pass {p + 1}/{passes} ")
                append_pass([str(k), str(p), repr(value[0]), repr(value[1])])
                got = sweep.values.setdefault(k, {})
                got[p] = value
                if _settled([t for t, _ in got.values()], passes, robust):
                    finish(k, combine_passes(list(got.values()), robust.combine), timing)

            for k in todo:  # passes measured before an interruption, row not yet written
                got = sweep.values.get(k, {})
                if got and _settled([t for t, _ in got.values()], passes, robust):
                    finish(k, combine_passes(list(got.values()), robust.combine), None)
            for p in range(passes):
                for k in todo:
                    step(k, p)
            for p in range(passes, passes + (robust.max_extra if split else 0)):
                again = [k for k in todo if k not in done]
                sweep.total += len(again)
                for k in again:
                    step(k, p)
    finally:
        result.seconds = time.perf_counter() - start
        result.rows = sorted(done.values(), key=lambda r: r.id)
        result.pass_times = {k: [t for t, _ in v.values()] for k, v in sorted(sweep.values.items())}
    if len(done) == n:
        _write_rows(path, result.rows, configs)
        if result.measured:
            _record_measurement(result, sweep, passes, robust, load_start)
        passes_path(path).unlink(missing_ok=True)
    return result


def _row(k: int, unit: Timed, value: tuple[float, float]) -> Row:
    """Row ``k`` of a table timing ``unit`` (a configuration row when the unit has one)."""
    if unit.config:
        return ConfigLatencyRow(k, unit.st, unit.end, unit.config, *value)
    return LatencyRow(k, unit.st, unit.end, *value)


def _write_rows(path: Path, rows: list[Row], configs: bool) -> None:
    """Rewrite a finished table sorted by id with its kind's one writer."""
    if configs:
        write_config_latency_rows(path, [r for r in rows if isinstance(r, ConfigLatencyRow)])
    else:
        write_latency_rows(path, [r for r in rows if isinstance(r, LatencyRow)])


def _existing_rows(path: Path, units: tuple[Timed, ...], meta: dict[str, Any]) -> dict[int, Row]:
    """The rows already at ``path`` (checked against ``meta``), or a new table's sidecar."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        passes_path(path).unlink(missing_ok=True)
        write_json(sidecar_path(path), meta)
        return {}
    old = read_meta(path)
    repair_tail(path)
    rows = read_rows(path)
    check_meta(path, old, meta)
    _check_rows(path, rows, units)
    return {r.id: r for r in rows}


def _record_measurement(
    result: LatencyResult,
    sweep: _Sweep,
    passes: int,
    robust: Robust,
    load_start: tuple[float, float, float],
) -> None:
    """Write the spread and load of a finished table into its sidecar; warn if it is noisy."""
    measurement = {
        "spread": spread_summary(tuple(u.key for u in sweep.units), sweep.values, passes),
        "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()],
        "cores": os.cpu_count() or 1,
        "units": "spread: inter-quartile range of a row's passes / their median; load: 1/5/15 min",
    }
    result.warning = noisy_warning(measurement, robust)
    measurement["warning"] = result.warning
    result.meta = {**result.meta, "measurement": measurement}
    write_json(sidecar_path(result.path), result.meta)
    if result.warning:
        LOG.warning(result.warning)


def plan_latency(rows: Iterable[LatencyRow], blocks: Iterable[tuple[int, int]]) -> float:
    """Σ T over a plan's blocks (what the DP optimises); TableError if a block has no row."""
    table = latency_dict(rows)
    missing = [b for b in blocks if b not in table]
    if missing:
        raise TableError(f"the latency table has no row for blocks {missing[:5]}")
    return sum(table[b] for b in blocks)
