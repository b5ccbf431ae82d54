"""Plain file helpers shared by the resumable stages: the one atomic write (JSON through it too),
the one locked CSV appender, the sidecar JSON that records how a table was made, repair of a
row cut short by a kill, and content hashes."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import TableError


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing (``"w"`` text, ``"wb"`` bytes); when the
    block ends without an error it is flushed, fsynced and renamed over ``path``, so neither a
    kill nor a power cut leaves half a file; on an error ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        text: dict[str, Any] = {} if "b" in mode else {"newline": ""}
        with tmp.open(mode, **text) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (``atomic_open``)."""
    with atomic_open(path) as fh:
        fh.write(json.dumps(data, indent=1, default=str) + "\n")


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a whole CSV file (header ``columns``, then ``rows``) atomically (``atomic_open``)."""
    with atomic_open(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


@contextlib.contextmanager
def csv_appender(
    path: str | Path, columns: Sequence[str]
) -> Iterator[Callable[[Sequence[object]], None]]:
    """Append CSV rows to ``path`` (the header first when the file is new), each flushed and
    fsynced as it is written; an exclusive lock refuses a second writer of the same file."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            raise TableError(
                f"another depthcompress run is writing {path}: wait for it, or use another -o"
            ) from None
        writer = csv.writer(fh, lineterminator="\n")

        def write(fields: Sequence[object]) -> None:
            writer.writerow(fields)
            fh.flush()
            os.fsync(fh.fileno())

        if new:
            write(list(columns))
        yield write


def sidecar_path(path: str | Path) -> Path:
    """The JSON file that records how a table was computed: ``TABLE.csv.json``."""
    return Path(f"{path}.json")


def read_sidecar(path: str | Path, fmt: str, kind: str, fix: str) -> dict[str, Any]:
    """The sidecar of the table at ``path``, checked to be a ``fmt`` sidecar; TableError (with
    ``fix``, what to do about a missing one) if it is missing, unreadable or of another kind."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        raise TableError(
            f"{path} has no sidecar {side.name}, so how it was computed is unknown: {fix}"
        )
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise TableError(f"{side} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise TableError(f"{side} is not a depthcompress {kind} sidecar ({fmt})")
    return meta


def repair_tail(path: str | Path) -> None:
    """Drop a last line cut short by an interruption (rows are whole lines ending in \\n)."""
    path = Path(path)
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def json_sha(data: Any) -> str:
    """SHA-256 of a JSON-able value (keys sorted), for fingerprints of settings."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def nested_diff(
    old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()
) -> list[tuple[str, Any, Any]]:
    """``(dotted name, old value, new value)`` for every setting that differs between two nested
    dicts (sidecars, stage records), by name; names in ``ignore`` do not count."""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: dict[str, Any], b: dict[str, Any], prefix: str) -> None:
        for key in sorted(set(a) | set(b), key=str):
            va, vb, name = a.get(key), b.get(key), f"{prefix}{key}"
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, name + ".")
            elif va != vb and name not in ignore:
                out.append((name, va, vb))

    walk(old, new, "")
    return out
