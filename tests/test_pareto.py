"""benchmarks/pareto.py on a tiny network: every point is written with its measurements, and a
second run recomputes nothing (the run is resumable point by point)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_pipeline import TINY_RULE, settings, small_data, small_model

BENCH = "torch-pruning is the optional 'bench' extra (pip install -e '.[bench]'); CI skips this"
pytest.importorskip("torch_pruning", reason=BENCH)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pareto = importlib.import_module("pareto")

TIMING = pareto.Timing("onnxruntime", 1, 8)


def tiny_setup() -> pareto.Setup:
    data = small_data()
    return pareto.Setup("tiny:mbv2", small_model().eval(), data, data.holdout, settings(epochs=1))


def test_points_written_and_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = pareto.Options(
        budgets=("0.6x", "0.8x"), ratios=(0.2, 0.4), timings=(TIMING,), rule=TINY_RULE, round_to=4
    )
    tunes: list[int] = []
    real = pareto.finetune

    def counted(*args: Any, **kwargs: Any) -> Any:
        tunes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pareto, "finetune", counted)
    first = pareto.run(tiny_setup(), opts, tmp_path, log=lambda _: None)
    assert len(tunes) == 2 + 2 * 2  # two budgets, two ratios per importance; not the original
    record = json.loads((tmp_path / "points.json").read_text())
    names = [p["name"] for p in record["points"]]
    assert names == [
        "original", "depthcompress-0.6x", "depthcompress-0.8x",
        "tp-l1-0.2", "tp-l1-0.4", "tp-taylor-0.2", "tp-taylor-0.4",
    ]  # fmt: skip
    for p in record["points"]:
        s = p["speedups"][TIMING.key]
        assert s["low"] <= s["speedup"] <= s["high"]
        assert 0 <= p["accuracy"] <= 100 and p["params"] > 0 and p["convs"] > 0
    assert record["points"][1]["convs"] < record["points"][0]["convs"]
    assert record["points"][4]["params"] < record["points"][0]["params"]
    table = (tmp_path / "pareto.md").read_text()
    assert all(f"| {p['method']} | {p['setting']} |" in table for p in record["points"])
    assert (tmp_path / f"mbv2-{TIMING.key}.png").stat().st_size > 0

    again = pareto.run(tiny_setup(), opts, tmp_path, log=lambda _: None)
    assert len(tunes) == 6  # nothing fine-tuned again
    assert again == first  # nothing re-measured either
