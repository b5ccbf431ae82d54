"""benchmarks/pareto.py on a tiny network: every point is written with its measurements, and a
second run recomputes nothing (the run is resumable point by point)."""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.test_pipeline import TINY_RULE, settings, small_data, small_model

BENCH = "torch-pruning is the optional 'bench' extra (pip install -e '.[bench]'); CI skips this"
pytest.importorskip("torch_pruning", reason=BENCH)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pareto = importlib.import_module("pareto")

TIMING = pareto.Timing("onnxruntime", 1, 8)


def tiny_setup(epochs: int = 1) -> pareto.Setup:
    data = small_data()
    s = settings(epochs=epochs)
    return pareto.Setup("tiny:mbv2", small_model().eval(), data, data.holdout, s)


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

    measured: list[str] = []
    real_measure = pareto.measure

    def counted_measure(setup: Any, net: Any, timing: Any, rule: Any, name: str) -> Any:
        measured.append(name)
        return real_measure(setup, net, timing, rule, name)

    monkeypatch.setattr(pareto, "measure", counted_measure)
    retimed = pareto.run(
        tiny_setup(), replace(opts, retime=(TIMING.key,)), tmp_path, log=lambda _: None
    )
    assert len(tunes) == 6 and measured == names  # every point timed again, nothing re-made
    assert [p["accuracy"] for p in retimed] == [p["accuracy"] for p in first]
    assert all(p["retimed"] == [] for p in retimed)

    plot_fronts = importlib.import_module("plot_fronts")
    other = tmp_path / "other"
    other.mkdir()
    record["points"] = [record["points"][0], {**record["points"][1], "method": "layers"}]
    (other / "points.json").write_text(json.dumps(record))
    stem = str(tmp_path / "img" / "front")
    plot_fronts.main([str(tmp_path), str(other), "--timings", "onnxruntime:1:8", "--out", stem])
    merged = (tmp_path / "img" / "front.md").read_text()
    assert merged.count("| original |") == 1 and "| layers | 0.6x |" in merged
    assert (tmp_path / "img" / f"front-{TIMING.key}.png").stat().st_size > 0
    record["points"][0] = {**record["points"][0], "accuracy": 1.0}  # another original
    (other / "points.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="another model or original"):
        plot_fronts.main([str(tmp_path), str(other), "--out", str(tmp_path / "x")])


def test_after_point_prunes_the_merged_network_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Width after depth: half the epochs before pruning the merged network, half after."""
    opts = pareto.Options(
        budgets=("0.6x",), ratios=(), timings=(TIMING,), rule=TINY_RULE, round_to=4,
        importances=(), after=("0.3:0.6x",),
    )  # fmt: skip
    epochs: list[int] = []
    resumed: list[int] = []
    real = pareto.finetune

    def counted(net: Any, data: Any, cfg: Any, **kwargs: Any) -> Any:
        epochs.append(cfg.epochs)
        result = real(net, data, cfg, **kwargs)
        resumed.append(result.resumed_epochs)
        return result

    monkeypatch.setattr(pareto, "finetune", counted)
    first = pareto.run(tiny_setup(epochs=2), opts, tmp_path, log=lambda _: None)
    assert epochs == [2, 1, 1]  # the depth point, then the after point's two halves
    original, depth, after = first
    assert after["name"] == "after-0.3-0.6x" and after["setting"] == "0.3:0.6x"
    assert after["plan"] == depth["plan"] and after["epochs"] == [1, 1]
    assert after["params"] < after["merged_params"]
    assert after["convs"] == depth["convs"] < original["convs"]
    assert any(new < old for old, new in after["kept"].values())
    assert after["speedups"][TIMING.key]["low"] <= after["speedups"][TIMING.key]["high"]
    table = (tmp_path / "pareto.md").read_text()
    assert "| after | 0.3:0.6x |" in table and "*after*" in table

    again = pareto.run(tiny_setup(epochs=2), opts, tmp_path, log=lambda _: None)
    assert epochs == [2, 1, 1] and again == first  # nothing fine-tuned or measured again

    where = tmp_path / "points" / after["name"]  # killed after both fine-tunings, before its record
    (where / "point.json").unlink()
    (where / "net.pt").unlink()
    third = pareto.run(tiny_setup(epochs=2), opts, tmp_path, log=lambda _: None)
    assert epochs[3:] == resumed[3:] == [1, 1]  # both halves resumed from their checkpoints
    assert third[2]["accuracy"] == after["accuracy"] and third[2]["kept"] == after["kept"]


def test_control_is_the_original_fine_tuned_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = pareto.Options(
        budgets=(), ratios=(), timings=(TIMING,), rule=TINY_RULE, round_to=4, control=True
    )
    tuned: list[Any] = []
    real = pareto.finetune

    def counted(net: Any, *args: Any, **kwargs: Any) -> Any:
        tuned.append(net)
        return real(net, *args, **kwargs)

    monkeypatch.setattr(pareto, "finetune", counted)
    setup = tiny_setup()
    points = pareto.run(setup, opts, tmp_path, log=lambda _: None)
    assert [p["name"] for p in points] == ["original", "control"]
    assert len(tuned) == 1 and tuned[0] is not setup.model  # a copy, never the original
    original, control = points
    assert control["convs"] == original["convs"] and control["params"] == original["params"]
