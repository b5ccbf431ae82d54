"""The DP's input tables as plain data (ALGORITHM.md §4–§6), read and written in the reference
implementation's CSV layout so that tables made by either tool work with both.

* ``LatencyTable``: ``T(i, j)`` and its stdev per valid block, ``id,st,end,time,stdev``.
* ``OptimalLatencyTable``: ``T_opt(i, j)`` and its break points (stage 1),
  ``id,st,end,time,stdev,breaks`` with ``breaks`` a quoted comma list such as ``"0,1,2,4"``.
* ``ImportanceTable``: raw score ``h(i, j, x, y)`` per extended block,
  ``st,end,st_act,end_act,<score>``; the score column (default ``val_acc``) must hold the
  difference to the unmodified network (§6), not an absolute accuracy.
* ``ExtendedImportanceTable``: ``I(i, j, x, y)`` after normalisation and Algorithm 3,
  ``id,st,end,st_act,end_act,imp,breaks``.

Columns may come in any order and extra columns are ignored. A malformed or inconsistent file
raises ``TableError`` naming the file, the line and the fix. numpy only: no torch.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

import numpy as np

from .errors import TableError, plain
from .files import sidecar_path
from .files import write_csv as write_rows

DEFAULT_SCORE = "val_acc"
LATENCY_COLUMNS = ("id", "st", "end", "time", "stdev")
OPT_LATENCY_COLUMNS = (*LATENCY_COLUMNS, "breaks")
IMPORTANCE_KEYS = ("st", "end", "st_act", "end_act")
EXT_IMPORTANCE_COLUMNS = ("id", *IMPORTANCE_KEYS, "imp", "breaks")
CONFIG_LATENCY_COLUMNS = ("id", "st", "end", "config", "time", "stdev")
CONFIG_IMPORTANCE_COLUMNS = (
    *IMPORTANCE_KEYS,
    "config",
    DEFAULT_SCORE,
    "val_loss",
    "train_loss",
    "steps",
    "seconds",
    "pruned",
    "tried",
)

Block = tuple[int, int]
_T = TypeVar("_T")
ExtBlock = tuple[int, int, int, int]


@dataclass(frozen=True)
class LatencyRow:
    """One latency-table row: block ``(st, end)`` is row ``id`` of ``chain.blocks``; ms."""

    id: int
    st: int
    end: int
    time: float
    stdev: float

    @property
    def key(self) -> tuple[int, int]:
        """``(st, end)``."""
        return (self.st, self.end)

    def as_csv(self) -> list[str]:
        """The row as CSV fields (floats in shortest round-trip form)."""
        return [str(self.id), str(self.st), str(self.end), repr(self.time), repr(self.stdev)]


# ---------------------------------------------------------------------------------------------
# shared validation


def _frozen(values: Sequence[float] | Sequence[int] | np.ndarray, dtype: type) -> np.ndarray:
    arr: np.ndarray = np.array(values, dtype=dtype)
    arr.setflags(write=False)
    return arr


def _locator(source: str, lines: Sequence[int] | None) -> Callable[[int], str]:
    """``where(k)`` names row k: ``file:line`` for a file, ``source row k+1`` otherwise."""
    if lines is not None:
        return lambda k: f"{source}:{lines[k]}"
    return lambda k: f"{source} row {k + 1}"


def _check_spans(st: np.ndarray, end: np.ndarray, where: Callable[[int], str]) -> None:
    for k in np.flatnonzero((st < 0) | (end <= st)):
        raise TableError(
            f"{where(int(k))}: span st={st[k]}, end={end[k]} refers to positions that do not "
            "exist: positions are 0..L and a block (st, end) needs 0 ≤ st < end"
        )


def _check_values(
    values: np.ndarray, column: str, where: Callable[[int], str], *, nonnegative: bool
) -> None:
    for k in np.flatnonzero(~np.isfinite(values)):
        raise TableError(
            f"{where(int(k))}: {column} is {plain(values[k])}; every row needs a finite {column} "
            "(re-measure this entry or remove the row)"
        )
    if nonnegative:
        for k in np.flatnonzero(values < 0):
            raise TableError(
                f"{where(int(k))}: {column} is negative ({float(values[k]):g}); times are "
                "durations in ms and must be ≥ 0"
            )


def _check_unique(keys: Sequence[tuple[int, ...]], what: str, where: Callable[[int], str]) -> None:
    first: dict[tuple[int, ...], int] = {}
    for k, key in enumerate(keys):
        if key in first:
            shown = key[0] if len(key) == 1 else key
            raise TableError(
                f"{where(k)}: {what} {shown} is listed twice (first at {where(first[key])}); "
                "keep one row per entry"
            )
        first[key] = k


def _check_chain(st: np.ndarray, end: np.ndarray, source: str) -> None:
    """Every position 1..L has its single-conv block: catches truncated or partial tables."""
    have = set(zip(st.tolist(), end.tolist(), strict=True))
    n = int(end.max())
    missing = [p for p in range(1, n + 1) if (p - 1, p) not in have]
    if missing:
        shown = ", ".join(f"({p - 1}, {p})" for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise TableError(
            f"{source}: no row for the single-conv block(s) {shown}{more}: every position 1..{n} "
            "needs its own block; is the table incomplete (an interrupted measurement)?"
        )


def _check_breaks(
    breaks: Sequence[tuple[int, ...]],
    st: np.ndarray,
    end: np.ndarray,
    where: Callable[[int], str],
) -> None:
    for k, b in enumerate(breaks):
        ok = len(b) >= 2 and b[0] == st[k] and b[-1] == end[k]
        ok = ok and all(x < y for x, y in pairwise(b))
        if not ok:
            raise TableError(
                f"{where(k)}: breaks {','.join(map(str, b))} must run from st={st[k]} to "
                f'end={end[k]} in increasing order (e.g. "{st[k]},{end[k]}")'
            )


def _check_flags(
    st: np.ndarray, st_act: np.ndarray, end_act: np.ndarray, where: Callable[[int], str]
) -> None:
    for name, flags in (("st_act", st_act), ("end_act", end_act)):
        for k in np.flatnonzero((flags != 0) & (flags != 1)):
            raise TableError(f"{where(int(k))}: {name} is {flags[k]}; flags are 0 or 1")
    for k in np.flatnonzero((st == 0) & (st_act == 0)):
        raise TableError(
            f"{where(int(k))}: st_act is 0 at position 0; the chain input always counts as "
            "activated (ALGORITHM.md §7), so rows from position 0 need st_act=1"
        )


# ---------------------------------------------------------------------------------------------
# CSV parsing


class _Csv:
    """The rows of one CSV file with their line numbers, parsed field by field with errors that
    name the file and line."""

    def __init__(
        self, path: str | Path, kind: str, layout: Sequence[str], *, partial: bool = False
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        if not self.path.is_file():
            raise TableError(f"{kind} table {self.path} does not exist")
        with self.path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames
            if not header and partial:  # a table whose first row is still being measured
                self.columns, self.rows = tuple(layout), []
                return
            if not header:
                raise TableError(
                    f"{self.path}: the file is empty; a {kind} table starts with the header "
                    f"{','.join(layout)}"
                )
            reader.fieldnames = [h.strip() for h in header]
            self.columns = tuple(reader.fieldnames)
            self.rows = [(reader.line_num, raw) for raw in reader]
        if not self.rows and not partial:
            raise TableError(f"{self.path}: the {kind} table has a header but no rows")

    def require(self, columns: Sequence[str], layout: Sequence[str], hint: str = "") -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise TableError(
                f"{self.path}:1: missing column(s) {', '.join(missing)}; a {self.kind} table "
                f"needs the columns {','.join(layout)}{hint}"
            )

    @property
    def lines(self) -> list[int]:
        return [line for line, _ in self.rows]

    def _field(self, line: int, raw: dict[str | None, str | None], column: str) -> str:
        value = raw.get(column)
        if value is None:
            raise TableError(
                f"{self.path}:{line}: no value for column {column}: the row has fewer fields "
                "than the header"
            )
        return value.strip()

    def _parse(self, column: str, parse: Callable[[str], _T], expected: str) -> list[_T]:
        """``parse`` of every row's ``column``; TableError naming the line and ``expected``."""
        out = []
        for line, raw in self.rows:
            text = self._field(line, raw, column)
            try:
                out.append(parse(text))
            except ValueError:
                empty = " (an empty field: a missing value)" if not text else ""
                raise TableError(
                    f"{self.path}:{line}: {column} is {text!r}, {expected}{empty}"
                ) from None
        return out

    def ints(self, column: str) -> list[int]:
        return self._parse(column, int, "not an integer position/flag")

    def floats(self, column: str) -> list[float]:
        return self._parse(column, float, "not a number")

    def breaks(self, column: str = "breaks") -> list[tuple[int, ...]]:
        return self._parse(
            column,
            lambda text: tuple(int(v) for v in text.split(",")),
            'not a comma list of positions such as "0,1,2,4"',
        )


def _read_latency_csv(path: str | Path, *, partial: bool) -> tuple[list[LatencyRow], list[int]]:
    """The one reader of a latency CSV: its rows in file order and their line numbers."""
    f = _Csv(path, "latency", LATENCY_COLUMNS, partial=partial)
    f.require(LATENCY_COLUMNS, LATENCY_COLUMNS)
    columns = (f.ints("id"), f.ints("st"), f.ints("end"), f.floats("time"), f.floats("stdev"))
    return [LatencyRow(*values) for values in zip(*columns, strict=True)], f.lines


def read_latency_rows(path: str | Path) -> list[LatencyRow]:
    """Rows of a latency CSV in file order, also of a table still being measured (no rows, or
    not every block yet): what a resumed measurement keeps."""
    return _read_latency_csv(path, partial=True)[0]


def write_latency_rows(path: str | Path, rows: Iterable[LatencyRow]) -> None:
    """The one writer of a latency CSV: ``rows`` in the given order, atomically."""
    write_rows(path, LATENCY_COLUMNS, (row.as_csv() for row in rows))


@dataclass(frozen=True)
class ConfigLatencyRow:
    """One row of a configuration latency table (layer pruning): configuration ``config`` ≥ 1
    of block ``(st, end)`` (``pruning.block_configs`` order) is timed unit ``id``; ms."""

    id: int
    st: int
    end: int
    config: int
    time: float
    stdev: float

    @property
    def key(self) -> tuple[int, int, int]:
        """``(st, end, config)``."""
        return (self.st, self.end, self.config)

    def as_csv(self) -> list[str]:
        """The row as CSV fields (floats in shortest round-trip form)."""
        ints = (self.id, self.st, self.end, self.config)
        return [*map(str, ints), repr(self.time), repr(self.stdev)]


def read_config_latency_rows(path: str | Path) -> list[ConfigLatencyRow]:
    """The one reader of a configuration latency CSV: its rows in file order (also of a table
    still being measured)."""
    f = _Csv(path, "configuration latency", CONFIG_LATENCY_COLUMNS, partial=True)
    f.require(CONFIG_LATENCY_COLUMNS, CONFIG_LATENCY_COLUMNS)
    ints = [f.ints(c) for c in ("id", "st", "end", "config")]
    columns = (*ints, f.floats("time"), f.floats("stdev"))
    return [ConfigLatencyRow(*values) for values in zip(*columns, strict=True)]


def write_config_latency_rows(path: str | Path, rows: Iterable[ConfigLatencyRow]) -> None:
    """The one writer of a configuration latency CSV: ``rows`` in the given order, atomically."""
    write_rows(path, CONFIG_LATENCY_COLUMNS, (row.as_csv() for row in rows))


@dataclass(frozen=True)
class ConfigImportanceRow:
    """One row of a configuration importance table: the best of ``tried`` pruned subsets giving
    configuration ``config`` of extended block ``(st, end, st_act, end_act)`` is ``pruned``, its
    score ``val_acc`` (difference to the unmodified network, as in the importance table)."""

    st: int
    end: int
    st_act: int
    end_act: int
    config: int
    val_acc: float
    val_loss: float
    train_loss: float
    steps: int
    seconds: float
    pruned: frozenset[int]
    tried: int

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """``(st, end, st_act, end_act, config)``."""
        return (self.st, self.end, self.st_act, self.end_act, self.config)

    def as_csv(self) -> list[str]:
        """The row as CSV fields; ``pruned`` as a ``;`` list of positions."""
        pruned = ";".join(str(p) for p in sorted(self.pruned))
        head = [str(v) for v in self.key]
        tail = [str(self.steps), f"{self.seconds:.3f}", pruned, str(self.tried)]
        return [*head, repr(self.val_acc), repr(self.val_loss), repr(self.train_loss), *tail]


def _subset(text: str) -> frozenset[int]:
    return frozenset(int(v) for v in text.split(";") if v)


def read_config_importance_rows(path: str | Path) -> list[ConfigImportanceRow]:
    """The one reader of a configuration importance CSV: its rows in file order (also of a table
    still being computed)."""
    f = _Csv(path, "configuration importance", CONFIG_IMPORTANCE_COLUMNS, partial=True)
    f.require(CONFIG_IMPORTANCE_COLUMNS, CONFIG_IMPORTANCE_COLUMNS)
    keys = [f.ints(c) for c in (*IMPORTANCE_KEYS, "config")]
    scores = [f.floats(c) for c in (DEFAULT_SCORE, "val_loss", "train_loss")]
    pruned = f._parse("pruned", _subset, 'not a ";" list of positions such as "3;5"')
    columns = (*keys, *scores, f.ints("steps"), f.floats("seconds"), pruned, f.ints("tried"))
    return [ConfigImportanceRow(*values) for values in zip(*columns, strict=True)]


def write_config_importance_rows(path: str | Path, rows: Iterable[ConfigImportanceRow]) -> None:
    """The one writer of a configuration importance CSV: ``rows`` sorted by key, atomically."""
    ordered = sorted(rows, key=lambda r: r.key)
    write_rows(path, CONFIG_IMPORTANCE_COLUMNS, (row.as_csv() for row in ordered))


def _num(x: float) -> str:
    return repr(float(x))


def _join(positions: Iterable[int]) -> str:
    return ",".join(str(int(p)) for p in positions)


# ---------------------------------------------------------------------------------------------
# the tables


class _Rows:
    """What every table shares: read-only numpy columns checked on construction, the row count,
    the last position and where each row came from."""

    st: np.ndarray
    end: np.ndarray
    source: str
    lines: tuple[int, ...] | None

    def __len__(self) -> int:
        return len(self.st)

    @property
    def num_positions(self) -> int:
        """The last position any row reaches (for a latency table, L: positions are 0..L)."""
        return int(self.end.max())

    def where(self, k: int) -> str:
        """``file:line`` (or ``source row n``) of row k, for error messages."""
        return _locator(self.source, self.lines)(k)

    def _freeze(
        self,
        kind: str,
        ints: Sequence[str],
        floats: Sequence[str],
        breaks: Iterable[Iterable[int]] | None = None,
    ) -> Callable[[int], str]:
        """Make the named columns read-only arrays (and ``breaks``, given, tuples); TableError if
        the table has no rows or not one break list per row. Returns ``where``."""
        for name in ints:
            object.__setattr__(self, name, _frozen(getattr(self, name), np.int64))
        for name in floats:
            object.__setattr__(self, name, _frozen(getattr(self, name), np.float64))
        if len(self.st) == 0:
            raise TableError(f"{self.source}: the {kind} table has no rows")
        if breaks is not None:
            lists = tuple(tuple(int(p) for p in b) for b in breaks)
            object.__setattr__(self, "breaks", lists)
            if len(lists) != len(self.st):
                raise TableError(f"{self.source}: {len(lists)} break lists for {len(self)} rows")
        _check_spans(self.st, self.end, self.where)
        return self.where


class _BlockRows(_Rows):
    """Row accessors shared by the latency and optimal-latency tables (one row per block)."""

    time: np.ndarray
    stdev: np.ndarray
    ids: np.ndarray

    def _check_times(self) -> None:
        _check_values(self.time, "time", self.where, nonnegative=True)
        _check_values(self.stdev, "stdev", self.where, nonnegative=True)

    def _check_blocks(self) -> None:
        """One row per block and per id, and every single-conv block present."""
        _check_unique(self.blocks, "block (st, end)", self.where)
        _check_unique([(int(i),) for i in self.ids], "id", self.where)
        _check_chain(self.st, self.end, self.source)

    @cached_property
    def blocks(self) -> tuple[Block, ...]:
        """The valid blocks ``(st, end)`` in row order."""
        return tuple(zip(self.st.tolist(), self.end.tolist(), strict=True))

    @cached_property
    def index(self) -> dict[Block, int]:
        """Row of each block."""
        return {b: k for k, b in enumerate(self.blocks)}

    def time_of(self, st: int, end: int) -> float:
        """The table's time for block ``(st, end)`` in ms; KeyError if the block is not valid."""
        return float(self.time[self.index[(st, end)]])


@dataclass(frozen=True, eq=False)
class LatencyTable(_BlockRows):
    """``T(i, j)`` (ms, with its stdev) for every valid block ``(i, j)``: convs ``i+1..j`` merged
    into one. The set of rows is the set of valid blocks."""

    st: np.ndarray
    end: np.ndarray
    time: np.ndarray
    stdev: np.ndarray
    ids: np.ndarray
    source: str = "<latency rows>"
    lines: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self._freeze("latency", ("st", "end", "ids"), ("time", "stdev"))
        self._check_times()
        self._check_blocks()

    @classmethod
    def from_rows(
        cls, rows: Iterable[tuple[int, int, float, float]], source: str = "<latency rows>"
    ) -> LatencyTable:
        """Build from ``(st, end, time, stdev)`` rows; ids are the row numbers."""
        data = list(rows)
        return cls(
            st=np.asarray([r[0] for r in data]),
            end=np.asarray([r[1] for r in data]),
            time=np.asarray([r[2] for r in data]),
            stdev=np.asarray([r[3] for r in data]),
            ids=np.asarray(list(range(len(data)))),
            source=source,
        )

    @classmethod
    def read_csv(cls, path: str | Path) -> LatencyTable:
        """Read ``id,st,end,time,stdev`` (the reference's ``time_*.csv``)."""
        rows, lines = _read_latency_csv(path, partial=False)
        return cls(
            st=np.asarray([r.st for r in rows]),
            end=np.asarray([r.end for r in rows]),
            time=np.asarray([r.time for r in rows]),
            stdev=np.asarray([r.stdev for r in rows]),
            ids=np.asarray([r.id for r in rows]),
            source=str(Path(path)),
            lines=tuple(lines),
        )

    def rows(self) -> list[LatencyRow]:
        """The table's rows in row order."""
        columns = (self.ids.tolist(), self.st.tolist(), self.end.tolist())
        times = (self.time.tolist(), self.stdev.tolist())
        return [LatencyRow(*values) for values in zip(*columns, *times, strict=True)]

    def write_csv(self, path: str | Path) -> None:
        """Write ``id,st,end,time,stdev`` in row order, floats in round-trip form."""
        write_latency_rows(path, self.rows())


@dataclass(frozen=True, eq=False)
class OptimalLatencyTable(_BlockRows):
    """``T_opt(i, j)``: the fastest tiling of ``(i, j)`` by valid blocks (stage 1, §5), with the
    tiling's boundaries ``breaks`` from ``i`` to ``j`` inclusive and its summed stdev."""

    st: np.ndarray
    end: np.ndarray
    time: np.ndarray
    stdev: np.ndarray
    breaks: tuple[tuple[int, ...], ...]
    ids: np.ndarray
    source: str = "<optimal latency rows>"
    lines: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        where = self._freeze(
            "optimal latency", ("st", "end", "ids"), ("time", "stdev"), breaks=self.breaks
        )
        self._check_times()
        _check_breaks(self.breaks, self.st, self.end, where)
        self._check_blocks()

    @classmethod
    def read_csv(cls, path: str | Path) -> OptimalLatencyTable:
        """Read ``id,st,end,time,stdev,breaks`` (the reference's ``opt_time_*.csv``)."""
        f = _Csv(path, "optimal latency", OPT_LATENCY_COLUMNS)
        f.require(OPT_LATENCY_COLUMNS, OPT_LATENCY_COLUMNS)
        return cls(
            st=np.asarray(f.ints("st")),
            end=np.asarray(f.ints("end")),
            time=np.asarray(f.floats("time")),
            stdev=np.asarray(f.floats("stdev")),
            breaks=tuple(f.breaks()),
            ids=np.asarray(f.ints("id")),
            source=str(f.path),
            lines=tuple(f.lines),
        )

    def write_csv(self, path: str | Path) -> None:
        """Write ``id,st,end,time,stdev,breaks`` in row order (breaks quoted)."""
        cols = (self.ids, self.st, self.end)
        rows = (
            [
                *(str(int(c[k])) for c in cols),
                _num(self.time[k]),
                _num(self.stdev[k]),
                _join(self.breaks[k]),
            ]
            for k in range(len(self))
        )
        write_rows(path, OPT_LATENCY_COLUMNS, rows)

    def breaks_of(self, st: int, end: int) -> tuple[int, ...]:
        """The boundaries of the fastest tiling of ``(st, end)``, ``st`` and ``end`` included."""
        return self.breaks[self.index[(st, end)]]


class _ExtBlockRows(_Rows):
    """Row accessors shared by the importance and extended-importance tables (one row per
    extended block)."""

    st_act: np.ndarray
    end_act: np.ndarray

    @cached_property
    def keys(self) -> tuple[ExtBlock, ...]:
        """``(st, end, st_act, end_act)`` per row, in row order."""
        return tuple(
            zip(
                self.st.tolist(),
                self.end.tolist(),
                self.st_act.tolist(),
                self.end_act.tolist(),
                strict=True,
            )
        )

    def _check_keys(self) -> None:
        _check_unique(self.keys, "extended block (st, end, st_act, end_act)", self.where)


def _control(path: Path, score: str) -> float:
    """The ``control`` score in the sidecar beside an importance table (0 where there is none:
    tables written before it, or by hand)."""
    try:
        return float(json.loads(sidecar_path(path).read_text())["control"][score])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


@dataclass(frozen=True, eq=False)
class ImportanceTable(_ExtBlockRows):
    """Raw importance ``h(i, j, x, y)`` per extended block (§6): the score of the network with
    the activations strictly inside ``(i, j)`` removed and flags ``x``/``y`` for an activation at
    ``i``/``j``, as a difference to the unmodified network. Its rows are the DP's candidate
    segments: flag 0 exists only where a row has it. ``control`` is what the entries'
    fine-tuning alone gives the unmodified network (from the sidecar; ``delta`` subtracts it)."""

    st: np.ndarray
    end: np.ndarray
    st_act: np.ndarray
    end_act: np.ndarray
    score: np.ndarray
    score_name: str = DEFAULT_SCORE
    source: str = "<importance rows>"
    lines: tuple[int, ...] | None = None
    control: float = 0.0

    def __post_init__(self) -> None:
        where = self._freeze("importance", IMPORTANCE_KEYS, ("score",))
        _check_flags(self.st, self.st_act, self.end_act, where)
        _check_values(self.score, self.score_name, where, nonnegative=False)
        self._check_keys()

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[tuple[int, int, int, int, float]],
        score_name: str = DEFAULT_SCORE,
        source: str = "<importance rows>",
    ) -> ImportanceTable:
        """Build from ``(st, end, st_act, end_act, score)`` rows."""
        data = list(rows)
        return cls(
            st=np.asarray([r[0] for r in data]),
            end=np.asarray([r[1] for r in data]),
            st_act=np.asarray([r[2] for r in data]),
            end_act=np.asarray([r[3] for r in data]),
            score=np.asarray([r[4] for r in data]),
            score_name=score_name,
            source=source,
        )

    @classmethod
    def synthetic(
        cls, blocks: Iterable[tuple[int, int]], linear: Iterable[int], seed: int = 0
    ) -> ImportanceTable:
        """A seeded synthetic table with the reference's enumeration (exclude_zeros) over
        ``blocks``, ``linear`` being the positions without an activation: drops grow with the
        span, plus noise. For solver tests and benchmarks without a trained network."""
        rng = np.random.default_rng(seed)
        lin = frozenset(linear)
        rows = []
        for i, j in blocks:
            if i == 0:
                flags = [(1, 1)]
            elif i in lin:
                flags = [(0, 1), (1, 1)]
            elif j in lin:
                flags = [(1, 0), (1, 1)]
            else:
                flags = [(1, 1)]
            for x, y in flags:
                drop = abs(rng.normal(0.3, 0.3)) * (j - i) ** 0.8 + 0.2 * rng.random() * (1 - y)
                rows.append((i, j, x, y, -drop))
        return cls.from_rows(rows, source="<synthetic importance>")

    @classmethod
    def read_csv(cls, path: str | Path, score: str = DEFAULT_SCORE) -> ImportanceTable:
        """Read ``st,end,st_act,end_act,<score>``; other columns (``id``, losses) are ignored."""
        layout = (*IMPORTANCE_KEYS, score)
        f = _Csv(path, "importance", layout)
        hint = ""
        if score not in f.columns:
            others = [c for c in f.columns if c not in IMPORTANCE_KEYS and c != "id"]
            hint = f" (pick the score column with --score; this file has: {', '.join(others)})"
        f.require(layout, layout, hint)
        return cls(
            st=np.asarray(f.ints("st")),
            end=np.asarray(f.ints("end")),
            st_act=np.asarray(f.ints("st_act")),
            end_act=np.asarray(f.ints("end_act")),
            score=np.asarray(f.floats(score)),
            score_name=score,
            source=str(f.path),
            lines=tuple(f.lines),
            control=_control(Path(path), score),
        )

    def write_csv(self, path: str | Path) -> None:
        """Write ``st,end,st_act,end_act,<score>`` in row order."""
        rows = ([*map(str, self.keys[k]), _num(self.score[k])] for k in range(len(self)))
        write_rows(path, (*IMPORTANCE_KEYS, self.score_name), rows)

    def single_mean(self) -> float:
        """Mean score over the single-conv rows (``end = st + 1``); NaN if there are none."""
        single = self.end - self.st == 1
        return float(np.mean(self.score[single])) if single.any() else math.nan


@dataclass(frozen=True, eq=False)
class ExtendedImportanceTable(_ExtBlockRows):
    """``I(i, j, x, y)`` (§6): the normalised score ``h − α·μ`` or, if better, a chain of such
    scores split at positions with flag 0 (``breaks`` lists ``i``, the split points and ``j``).
    ``alpha`` and ``offset`` (α·μ, or the control with ``delta``) record what normalisation
    subtracted from every raw score (NaN when read from a file)."""

    st: np.ndarray
    end: np.ndarray
    st_act: np.ndarray
    end_act: np.ndarray
    value: np.ndarray
    breaks: tuple[tuple[int, ...], ...]
    alpha: float = math.nan
    offset: float = math.nan
    source: str = "<extended importance rows>"
    lines: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        where = self._freeze("extended importance", IMPORTANCE_KEYS, ("value",), breaks=self.breaks)
        _check_flags(self.st, self.st_act, self.end_act, where)
        _check_values(self.value, "imp", where, nonnegative=False)
        _check_breaks(self.breaks, self.st, self.end, where)
        self._check_keys()

    @classmethod
    def read_csv(cls, path: str | Path) -> ExtendedImportanceTable:
        """Read ``[id,]st,end,st_act,end_act,imp,breaks`` (the reference's ``ext_importance_*``)."""
        f = _Csv(path, "extended importance", EXT_IMPORTANCE_COLUMNS)
        f.require((*IMPORTANCE_KEYS, "imp", "breaks"), EXT_IMPORTANCE_COLUMNS)
        return cls(
            st=np.asarray(f.ints("st")),
            end=np.asarray(f.ints("end")),
            st_act=np.asarray(f.ints("st_act")),
            end_act=np.asarray(f.ints("end_act")),
            value=np.asarray(f.floats("imp")),
            breaks=tuple(f.breaks()),
            source=str(f.path),
            lines=tuple(f.lines),
        )

    def write_csv(self, path: str | Path) -> None:
        """Write ``id,st,end,st_act,end_act,imp,breaks`` in row order."""
        rows = (
            [str(k), *map(str, self.keys[k]), _num(self.value[k]), _join(self.breaks[k])]
            for k in range(len(self))
        )
        write_rows(path, EXT_IMPORTANCE_COLUMNS, rows)


def _header(path: str | Path) -> tuple[str, ...]:
    p = Path(path)
    if not p.is_file():
        return ()
    with p.open(newline="", encoding="utf-8-sig") as fh:
        return tuple(h.strip() for h in next(csv.reader(fh), []))


def read_latency(path: str | Path) -> LatencyTable | OptimalLatencyTable:
    """A latency table, or an optimal one (used as is) if the file has a ``breaks`` column."""
    if "breaks" in _header(path):
        return OptimalLatencyTable.read_csv(path)
    return LatencyTable.read_csv(path)


def read_importance(
    path: str | Path, score: str = DEFAULT_SCORE
) -> ImportanceTable | ExtendedImportanceTable:
    """A raw importance table, or an extended one if it has ``imp,breaks`` but no ``score``."""
    header = _header(path)
    if score not in header and {"imp", "breaks"} <= set(header):
        return ExtendedImportanceTable.read_csv(path)
    return ImportanceTable.read_csv(path, score)
