"""``compress --width auto`` (issue 14): the width ratio chosen by the estimated loss of width
and depth together, the original's tables measured once, the final run resumable."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from depthcompress import pipeline
from depthcompress.errors import BudgetError, DepthCompressError
from depthcompress.pipeline import compress
from depthcompress.widthsearch import (
    DEFAULT_RATIOS,
    Candidate,
    Measured,
    WidthSearch,
    parse_width,
)
from tests.test_pipeline import small_data, small_model
from tests.test_width import width_settings

pytest.importorskip("torch_pruning", reason="torch-pruning is the [width] extra (in [dev])")


def test_parse_width_takes_a_fraction_auto_or_a_list() -> None:
    assert parse_width("0.2") == (0.2, ())
    assert parse_width("0") == (0.0, ())
    assert parse_width(" AUTO ") == (0.0, DEFAULT_RATIOS)
    assert parse_width("auto:0.4,0.1") == (0.0, (0.0, 0.1, 0.4))
    for bad in ("auto:", "auto:x", "auto:1.5", "wide"):
        with pytest.raises(DepthCompressError, match="--width"):
            parse_width(bad)


def cand(ratio: float, width: float, depth: float | None, least: float = 0.4) -> Candidate:
    return Candidate(ratio, 1 + ratio, width, 0.5, least, depth, None if depth is None else 3)


def test_the_least_estimated_loss_wins_ties_go_to_less_width() -> None:
    search = WidthSearch(0.5, (cand(0, 0, 3.0), cand(0.2, 1.0, 1.0), cand(0.4, 2.0, None)))
    assert search.chosen.ratio == 0.2 and search.chosen.loss == 2.0
    tie = WidthSearch(0.5, (cand(0, 0, 2.0), cand(0.2, 1.0, 1.0)))
    assert tie.chosen.ratio == 0
    record = search.to_dict()
    assert [c["loss"] for c in record["candidates"]] == [3.0, 2.0, None]


def test_no_feasible_ratio_names_the_smallest_reachable_fraction() -> None:
    search = WidthSearch(0.1, (cand(0, 0, None, 0.61), cand(0.3, 1, None, 0.4123)))
    with pytest.raises(BudgetError, match=r"at least|0\.413x \(width 0\.3"):
        search.chosen  # noqa: B018


def test_settings_refuse_width_and_a_search_together_or_without_zero() -> None:
    base = width_settings(width=0.0)
    with pytest.raises(DepthCompressError, match="not both"):
        replace(base, width=0.2, width_search=(0.0, 0.2))
    with pytest.raises(DepthCompressError, match="0 \\(depth alone\\)"):
        replace(base, width_search=(0.2, 0.4))
    with pytest.raises(DepthCompressError, match="budget_mode 'whole'"):
        replace(base, width_search=(0.0, 0.2), budget_mode="chain")


def search_settings(budget: str = "0.9x") -> pipeline.CompressSettings:
    return replace(width_settings(budget, width=0.0), width_search=(0.0, 0.5))


def forced(monkeypatch: pytest.MonkeyPatch, accuracy: float, calls: list[float]) -> None:
    """Candidates measured as a 2x faster network at ``accuracy`` (the search's only timing)."""

    def measure(original, ratio, *args, **kwargs) -> Measured:
        calls.append(ratio)
        return Measured(2.0, 1.9, 2.1, accuracy)

    monkeypatch.setattr(pipeline, "measure_ratio", measure)


def test_a_ruinous_width_leaves_depth_alone_on_the_searchs_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []
    forced(monkeypatch, -1000.0, calls)  # width 0.5 would lose everything
    wd = tmp_path / "run"
    result = compress(small_model(), small_data(), wd, search_settings())
    assert calls == [0.5] and result.evaluation.get("width") is None
    search = json.loads((wd / "width_search.json").read_text())
    assert search["chosen"] == 0 and [c["ratio"] for c in search["candidates"]] == [0, 0.5]
    assert search["candidates"][1]["speedup"] == 2.0
    sub = wd / pipeline.SEARCH_DIR
    for name in ("latency.csv", "importance.csv", "calibration.json"):  # adopted, not measured
        assert (wd / name).read_text() == (sub / name).read_text()
    assert "## Width search" in (wd / "report.md").read_text()

    monkeypatch.setattr(pipeline, "measure_ratio", None)  # a resume measures nothing again
    again = compress(small_model(), small_data(), wd, search_settings())
    assert again.ran == [] and again.plan == result.plan


def test_a_free_width_is_chosen_and_the_final_run_prunes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []
    forced(monkeypatch, 1000.0, calls)  # width 0.5 loses nothing and is 2x faster
    wd = tmp_path / "run"
    steps: list = []
    result = compress(small_model(), small_data(), wd, search_settings(), progress=steps.append)
    assert calls == [0.5]
    searched = [(s.done, s.total) for s in steps if s.task == "width search"]
    assert searched == [(0, 2), (1, 2), (2, 2)]
    assert json.loads((wd / "width.json").read_text())["ratio"] == 0.5
    assert result.evaluation["width"]["ratio"] == 0.5
    search = json.loads((wd / "width_search.json").read_text())
    chosen = next(c for c in search["candidates"] if c["ratio"] == 0.5)
    assert search["chosen"] == 0.5 and chosen["depth_fraction"] == pytest.approx(1.8)


def test_width_loss_is_against_the_original_after_the_same_fine_tuning() -> None:
    """The importance table's control (the original after the entries' recipe) is the reference
    of the width loss, as it is of every depth entry under ``delta``."""
    from types import SimpleNamespace

    from depthcompress.widthsearch import score

    depth = SimpleNamespace(
        importance=SimpleNamespace(control=1.5),
        estimate=lambda fraction: (0.25, 4) if fraction < 1 else (0.0, 9),
        least_fraction=lambda: 0.6,
    )
    c = score(0.3, Measured(1.6, 1.5, 1.7, 88.0), 90.0, 0.5, depth)
    assert c.width_loss == pytest.approx(90.0 + 1.5 - 88.0)
    assert c.depth_fraction == pytest.approx(0.8) and c.depth_loss == 0.25
    assert c.least_fraction == pytest.approx(0.6 / 1.6) and c.loss == pytest.approx(3.75)
    alone = score(0.0, None, 90.0, 0.5, depth)
    assert alone.width_loss == 0 and alone.speedup == 1 and alone.activations == 4


def test_pareto_auto_points_share_the_original_tables_and_show_the_chosen_width(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/pareto.py --auto: compress --width auto per budget, adopting OUT/tables."""
    import importlib
    import sys

    from tests.test_pipeline import TINY_RULE, settings
    from tests.test_width import RULE

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    pareto = importlib.import_module("pareto")
    forced(monkeypatch, 1000.0, [])
    data = small_data()
    tiny = replace(settings(epochs=1), calibration_rule=RULE, calibration_plans=2)
    setup = pareto.Setup("tiny:mbv2", small_model().eval(), data, data.holdout, tiny)
    timing = pareto.Timing("onnxruntime", 1, 8)
    opts = pareto.Options(
        budgets=(), ratios=(), timings=(timing,), rule=TINY_RULE, round_to=4, importances=(),
        auto=("0.9x",), auto_ratios=(0.0, 0.5),
    )  # fmt: skip
    record = pareto.run(setup, opts, tmp_path, log=lambda _: None)
    auto = record[-1]
    assert auto["name"] == "auto-0.9x" and auto["width"] == 0.5
    assert [c["ratio"] for c in auto["search"]] == [0, 0.5]
    search = tmp_path / "points" / "auto-0.9x" / "compress" / pipeline.SEARCH_DIR
    for name in ("latency.csv", "importance.csv"):
        assert (search / name).read_text() == (tmp_path / "tables" / name).read_text()
    assert "| auto | 0.9x → width 0.5 |" in (tmp_path / "pareto.md").read_text()


def test_a_model_torch_pruning_cannot_handle_leaves_depth_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The width error (naming the layer) is said and recorded; depth alone still runs."""
    from depthcompress.errors import WidthError

    def refuse(*args, **kwargs) -> Measured:
        raise WidthError("Torch-Pruning cannot prune the channels of this model (in layer b)")

    monkeypatch.setattr(pipeline, "measure_ratio", refuse)
    notes: list[str] = []
    wd = tmp_path / "run"
    result = compress(small_model(), small_data(), wd, search_settings(), log=notes.append)
    search = json.loads((wd / "width_search.json").read_text())
    assert search["chosen"] == 0 and [c["ratio"] for c in search["candidates"]] == [0]
    assert "in layer b" in search["width_error"] and result.evaluation.get("width") is None
    assert any("in layer b" in n and "depth alone" in n for n in notes)


def test_the_cli_takes_width_auto_and_refuses_a_bad_width_clearly(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from depthcompress.cli import app

    out = CliRunner().invoke(app, ["compress", "--help"], env={"COLUMNS": "200"}).output
    assert "auto = choose the fraction" in " ".join(out.split())
    wd = str(tmp_path / "wd")
    args = ["depthcompress:fashion_mbv2", "--budget", "0.5x", "--width", "wide", "--workdir", wd]
    bad = CliRunner().invoke(app, ["compress", *args])
    assert bad.exit_code != 0 and "neither a fraction of channels" in bad.output
    assert "Traceback" not in bad.output
