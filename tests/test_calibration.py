"""The calibration of the latency table against whole-network timings: the fit, the budget
conversion, and the calibrate stage on a tiny network with a tiny timing rule."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from depthcompress.calibration import (
    Calibration,
    Point,
    calibrated_table,
    calibration_plans,
    fit_whole,
    from_points,
)
from depthcompress.dp import Budget, optimal_latency
from depthcompress.errors import BudgetError
from depthcompress.pipeline import compress
from depthcompress.speedup import Rule
from depthcompress.tables import LatencyTable
from tests.test_pipeline import settings, small_data, small_model

SUM_T = [10.0, 7.0, 5.0, 3.5]
BLOCKS = [8, 6, 4, 3]


def test_scale_model_is_recovered_exactly() -> None:
    whole = [2.0 + 0.7 * t for t in SUM_T]
    fit = fit_whole(SUM_T, [8, 7, 7, 3], whole)
    assert fit.model == "scale"
    assert (fit.c, fit.a, fit.o) == pytest.approx((2.0, 0.7, 0.0))
    assert fit.rms == pytest.approx(0.0, abs=1e-9)


def test_overhead_model_is_recovered_exactly() -> None:
    whole = [1.5 + t + 0.25 * n for t, n in zip(SUM_T, BLOCKS, strict=True)]
    fit = fit_whole(SUM_T, BLOCKS, whole)
    assert fit.model == "overhead"
    assert (fit.c, fit.a, fit.o) == pytest.approx((1.5, 1.0, 0.25))
    assert fit.predict(4.0, 2) == pytest.approx(1.5 + 4.0 + 0.5)


def test_residuals_are_measured_minus_fitted() -> None:
    whole = np.array([2.0 + 0.7 * t for t in SUM_T]) + np.array([0.1, -0.1, 0.1, -0.1])
    fit = fit_whole(SUM_T, [8, 7, 7, 3], whole)
    fitted = [fit.predict(t, n) for t, n in zip(SUM_T, [8, 7, 7, 3], strict=True)]
    assert np.allclose(fit.residuals, whole - fitted)


def test_undetermined_points_give_a_constant_offset() -> None:
    fit = fit_whole([5.0, 5.0], [3, 3], [7.0, 7.5])
    assert fit.model == "offset" and (fit.c, fit.a, fit.o) == pytest.approx((2.25, 1.0, 0.0))


def points(c: float, a: float, o: float) -> list[Point]:
    return [
        Point(f"p{k}", (), (), t, n, c + a * t + o * n, 1.0, 1.0, 1.0)
        for k, (t, n) in enumerate(zip(SUM_T, BLOCKS, strict=True))
    ]


def test_budget_conversion() -> None:
    cal = from_points(points(2.0, 1.0, 0.25))  # the original: 2 + 10 + 2 = 14 ms whole
    assert cal.original_whole_ms == pytest.approx(14.0)
    assert cal.whole_target(Budget.parse("0.5x")) == pytest.approx(7.0)
    assert cal.table_budget(Budget.parse("0.5x")) == pytest.approx(5.0)
    assert cal.table_budget(Budget.parse("9")) == pytest.approx(7.0)  # ms of the whole network
    assert cal.predicted_whole(5.0) == pytest.approx(7.0)
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal


def test_calibrated_table_adds_the_overhead_to_every_block() -> None:
    table = LatencyTable.from_rows([(0, 1, 1.0, 0.0), (1, 2, 1.0, 0.0), (0, 2, 1.5, 0.0)])
    fit = fit_whole(SUM_T, BLOCKS, [1.5 + t + 0.25 * n for t, n in zip(SUM_T, BLOCKS, strict=True)])
    cal = calibrated_table(table, fit)
    assert cal.time.tolist() == pytest.approx([1.25, 1.25, 1.75])
    assert optimal_latency(cal).time_of(0, 2) == pytest.approx(1.75)


def test_plans_spread_over_the_front() -> None:
    rows = [(k, k + 1, 1.0, 0.0) for k in range(4)]
    rows += [(k, k + 2, 1.2, 0.0) for k in range(3)] + [(0, 4, 1.5, 0.0)]
    table = LatencyTable.from_rows(rows)
    blocks = [(int(i), int(j)) for i, j in table.blocks]
    plans = calibration_plans(table, blocks, [], 3)
    assert plans[0][0] == "fastest"
    assert len(plans[0][1].blocks) == 1  # the fastest: everything in one block
    assert len({p for _, p in plans}) == len(plans)


def whole_settings(budget: str) -> object:
    rule = Rule(min_rounds=2, max_rounds=2, block=1, warmup=0, max_time=1.0)
    return replace(
        settings(budget), budget_mode="whole", calibration_rule=rule, calibration_plans=2
    )


def test_the_stage_calibrates_and_the_plan_stays_under_the_whole_target(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    compress(small_model(), small_data(), wd, whole_settings("0.95x"), until="solve")
    data = json.loads((wd / "calibration.json").read_text())
    assert len(data["points"]) >= 2 and data["points"][0]["label"] == "original"
    plan = json.loads((wd / "plan.json").read_text())
    assert plan["budget_mode"] == "whole"
    assert plan["whole_target_ms"] == pytest.approx(0.95 * plan["original_whole_ms"])
    assert plan["predicted_whole_latency"] <= plan["whole_target_ms"] + 1e-9
    assert plan["predicted_whole_speedup"] == pytest.approx(
        plan["original_whole_ms"] / plan["predicted_whole_latency"]
    )
    before = (wd / "calibration.json").read_bytes()
    compress(small_model(), small_data(), wd, whole_settings("0.95x"), until="solve")
    assert (wd / "calibration.json").read_bytes() == before  # reused, not measured again


def test_an_unreachable_whole_budget_is_refused_before_importance(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    with pytest.raises(BudgetError, match=r"whole network .* raise --budget to at least"):
        compress(small_model(), small_data(), wd, whole_settings("0.01x"))
    assert not (wd / "importance.csv").exists()
    assert (wd / "calibration.json").exists()


def test_chain_mode_keeps_the_old_solve_key() -> None:
    chain = settings().stage_settings()
    whole = replace(settings(), budget_mode="whole").stage_settings()
    assert "budget_mode" not in chain["solve"] and "calibration" not in chain["solve"]
    assert whole["solve"]["budget_mode"] == "whole"


def test_with_layer_pruning_the_plans_prune_and_are_priced_by_configuration() -> None:
    """With the configuration times the calibration plans span pruned plans too (here merging
    alone gains nothing), each priced by the configurations it uses."""
    import torch

    from depthcompress import trace
    from depthcompress.calibration import config_calibration_plans, plan_time
    from depthcompress.errors import DepthCompressError
    from depthcompress.pruning import block_configs
    from tests.test_prune_layers import tiny_resnet

    chain = trace(tiny_resnet().eval(), torch.randn(1, 3, 8, 8))
    latency = LatencyTable.from_rows((i, j, float(j - i), 0.0) for i, j in chain.blocks)
    kept: dict[tuple[int, int, int], int] = {}
    for i, j in chain.blocks:
        for c, config in enumerate(block_configs(chain, i, j)[1:], start=1):
            kept[i, j, c] = (j - i) - len(config.subsets[0])
    config_time = {k: float(n) or 0.1 for k, n in kept.items()}
    plans = config_calibration_plans(chain, latency, config_time, 3)
    assert plans and any(plan.pruned for _, plan in plans)
    for _, plan in plans:
        expected = 0.0
        for i, j in plan.blocks:
            n = (j - i) - sum(i < p <= j for p in plan.pruned)
            expected += float(n) or 0.1
        assert plan_time(latency, plan, config_time, chain) == pytest.approx(expected)
    pruning = next(plan for _, plan in plans if plan.pruned)
    with pytest.raises(DepthCompressError, match="configuration latency table"):
        plan_time(latency, pruning)


def test_a_fit_never_gives_the_part_outside_the_chain_negative_time() -> None:
    """Noisy points whose free fit has an intercept below 0 are fitted again through 0: a
    negative c would make a budget below every plan look reachable."""
    from depthcompress.calibration import fit_whole

    sum_t, blocks = [10.0, 8.0, 6.0], [10, 8, 6]
    whole = [10.5, 7.9, 5.0]  # steeper than 1 per ms: the free scale fit puts c at -3.25
    fit = fit_whole(sum_t, blocks, whole)
    assert fit.c == 0.0 and fit.a > 0  # calibrated blocks are clamped at 0 ms besides
    clean = fit_whole(sum_t, blocks, [12.0, 10.0, 8.0])  # c = 2 where the data say so
    assert clean.c == pytest.approx(2.0) and clean.a == pytest.approx(1.0)
