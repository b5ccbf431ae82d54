"""Plain file helpers shared by the resumable stages: atomic JSON writes, the sidecar JSON that
records how a table was made, repair of a row cut short by a kill, and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import TableError


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file (fsynced) and a rename, so neither a kill nor a power
    cut leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(json.dumps(data, indent=1, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
