"""The opt-time and solve commands: reference layouts, plan.json, sweeps with CSV and PNG, clear
errors, and a start-up without torch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from depthcompress.cli import app
from depthcompress.dp import extended_importance
from depthcompress.tables import ImportanceTable, LatencyTable, OptimalLatencyTable

from .test_dp import ISSUE_TABLE, mbv2_importance

runner = CliRunner()
REFERENCE = Path(__file__).resolve().parent / "data"
"""The published reference tables (Kim et al., ICML 2023), vendored: see data/README.md."""
TIME_CSV = "kim2023_mbv2_w1.0_rtx2080ti_trt_time.csv"
OPT_CSV = "kim2023_mbv2_w1.0_rtx2080ti_trt_opt_time.csv"


@pytest.fixture
def tables(tmp_path: Path) -> tuple[Path, Path]:
    """The reference MobileNetV2 latency table and a seeded synthetic importance table."""
    latency = REFERENCE / TIME_CSV
    importance = tmp_path / "importance.csv"
    mbv2_importance(LatencyTable.read_csv(latency)).write_csv(importance)
    return latency, importance


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def test_opt_time_writes_the_reference_table(tables, tmp_path):
    out = tmp_path / "opt.csv"
    result = invoke("opt-time", tables[0], "-o", out)
    assert result.exit_code == 0, result.output
    assert "171 blocks" in result.output
    got = OptimalLatencyTable.read_csv(out)
    want = OptimalLatencyTable.read_csv(REFERENCE / OPT_CSV)
    assert got.breaks == want.breaks
    assert abs(got.time - want.time).max() <= 1e-9
    assert out.read_text().splitlines()[0] == "id,st,end,time,stdev,breaks"


def test_opt_time_finds_the_tiling_that_cuts_inside_a_residual(tmp_path):
    latency = tmp_path / "latency.csv"
    LatencyTable.from_rows((i, j, t, 0.1) for i, j, t in ISSUE_TABLE).write_csv(latency)
    out = tmp_path / "opt.csv"
    result = invoke("opt-time", latency, "-o", out)
    assert result.exit_code == 0, result.output
    got = OptimalLatencyTable.read_csv(out)
    assert got.time_of(0, 4) == 4.0 and got.breaks_of(0, 4) == (0, 1, 2, 3, 4)
    assert "3 of them faster split" in result.output


def test_solve_writes_plan_json_and_a_summary(tables, tmp_path):
    out = tmp_path / "plan.json"
    result = invoke(
        "solve", "--latency", tables[0], "--importance", tables[1], "--budget", "25", "-o", out
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert {"activations", "boundaries", "latency", "importance", "budget"} <= set(plan)
    assert plan["budget"] == 25 and plan["latency"] <= 25
    assert set(plan["activations"]) <= set(plan["boundaries"]) and 50 in plan["boundaries"]
    assert "kept activations A" in result.output and "merged blocks" in result.output
    assert f"{plan['latency']:.4f} ms ≤ budget 25 ms" in result.output


def test_solve_accepts_an_optimal_latency_table_and_reference_rounding(tables, tmp_path):
    out = tmp_path / "plan.json"
    args = ["solve", "--latency", REFERENCE / OPT_CSV, "--importance", tables[1]]
    result = invoke(*args, "--budget", "25", "--rounding", "reference", "-o", out)
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["rounding"] == "reference" and plan["grid"]["budget"] == 500
    assert "reference rounding" in result.output
    exact = invoke(*args, "--budget", "25", "-o", tmp_path / "exact.json")
    assert exact.exit_code == 0, exact.output
    result = invoke(*args, "--budget", "25", "--rounding", "floor")
    assert result.exit_code != 0 and "--rounding" in result.output


def test_solve_accepts_an_extended_importance_table(tables, tmp_path):
    ext = tmp_path / "ext.csv"
    extended_importance(ImportanceTable.read_csv(tables[1]), alpha=1.6).write_csv(ext)
    plans = []
    for imp in (tables[1], ext):
        out = tmp_path / f"{imp.stem}.json"
        result = invoke(
            "solve", "--latency", tables[0], "--importance", imp, "--budget", "22", "-o", out
        )
        assert result.exit_code == 0, result.output
        plans.append(json.loads(out.read_text()))
    assert "extended importance table" in result.output
    assert plans[0] == plans[1]


def test_sweep_writes_the_front_as_csv_and_png(tables, tmp_path):
    out = tmp_path / "front.csv"
    result = invoke(
        "solve",
        "--latency",
        tables[0],
        "--importance",
        tables[1],
        "--budget",
        "18:30:0.5",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["budget"]) for r in rows] == [18 + 0.5 * k for k in range(25)]
    assert all(float(r["latency"]) <= float(r["budget"]) for r in rows)
    imps = [float(r["importance"]) for r in rows]
    assert imps == sorted(imps)
    png = tmp_path / "front.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Pareto-optimal plans" in result.output


def test_sweep_without_matplotlib_still_writes_the_csv(tables, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "front.csv"
    result = invoke(
        "solve", "--latency", tables[0], "--importance", tables[1], "--budget", "20,25", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and not (tmp_path / "front.png").exists()
    assert "pip install depthcompress[plot]" in result.output


def test_budget_below_the_fastest_plan_is_a_clear_error(tables):
    result = invoke("solve", "--latency", tables[0], "--importance", tables[1], "--budget", "5")
    assert result.exit_code == 2
    assert "no plan fits the budget 5 ms" in result.output
    assert "6.46" in result.output


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("fast", "'fast' is neither a latency in ms"),
        ("30:18:1", "'30:18:1' stops before it starts"),
        ("18:30:0", "'0' must be positive"),
        ("18:30", "needs three parts START:STOP:STEP"),
        ("0.5x:0.9x:0.1", "mixes ms and fractions"),
        ("-0.7x", "'-0.7x' must be positive"),
        ("nan", "'nan' must be positive and finite"),
    ],
)
def test_bad_budgets_are_refused(tables, budget, message):
    result = invoke("solve", "--latency", tables[0], "--importance", tables[1], "--budget", budget)
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())
    assert message in text and "--budget" in text
    assert "0.5x:0.9x:0.1x" in text


def test_solve_takes_a_fraction_of_the_original_latency_like_compress(tables, tmp_path):
    original = LatencyTable.read_csv(tables[0])
    total = sum(original.time_of(k - 1, k) for k in range(1, 51))
    out = tmp_path / "plan.json"
    result = invoke(
        "solve", "--latency", tables[0], "--importance", tables[1], "--budget", "0.7x", "-o", out
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["budget"] == pytest.approx(0.7 * total, rel=1e-12)
    assert plan["budget_spec"] == "0.7x" and plan["original_latency"] == pytest.approx(total)
    assert plan["latency"] <= plan["budget"]
    ms = invoke("solve", "--latency", tables[0], "--importance", tables[1], "--budget", "0.7x")
    assert ms.exit_code == 0
    same = invoke(
        "solve", "--latency", tables[0], "--importance", tables[1], "--budget", repr(0.7 * total)
    )
    assert ms.output.split("\n")[1:] == same.output.split("\n")
    tight = invoke("solve", "--latency", tables[0], "--importance", tables[1], "--budget", "0.1x")
    assert tight.exit_code == 2
    assert "0.193x of the original chain latency" in " ".join(tight.output.split())


def test_fractional_sweep_resolves_every_budget(tables, tmp_path):
    original = LatencyTable.read_csv(tables[0])
    total = sum(original.time_of(k - 1, k) for k in range(1, 51))
    out = tmp_path / "front.csv"
    result = invoke(
        "solve",
        "--latency",
        tables[0],
        "--importance",
        tables[1],
        "--budget",
        "0.5x:0.9x:0.1x",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    budgets = [float(r["budget"]) for r in rows]
    assert budgets == pytest.approx([f * total for f in (0.5, 0.6, 0.7, 0.8, 0.9)], rel=1e-12)
    assert all(float(r["latency"]) <= float(r["budget"]) for r in rows)
    assert "0.7x = " in result.output
    listed = invoke(
        "solve", "--latency", tables[0], "--importance", tables[1], "--budget", "0.6x,20"
    )
    assert listed.exit_code == 0, listed.output


def test_malformed_table_error_names_file_and_line(tables, tmp_path):
    bad = tmp_path / "bad.csv"
    lines = tables[1].read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",nan"
    bad.write_text("\n".join(lines) + "\n")
    result = invoke("solve", "--latency", tables[0], "--importance", bad, "--budget", "25")
    assert result.exit_code == 2
    assert f"{bad}:4: val_acc is nan" in result.output.replace("\n", "")
    result = invoke(
        "solve", "--latency", tables[0], "--importance", tables[1], "--budget", "25", "--score", "x"
    )
    assert result.exit_code == 2 and "missing column(s) x" in result.output


def test_solve_starts_without_torch(tables, tmp_path):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from depthcompress.cli import app\n"
        f"r = CliRunner().invoke(app, ['solve', '--latency', {str(tables[0])!r}, "
        f"'--importance', {str(tables[1])!r}, '--budget', '25'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules, 'solve imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_front_csv_reads_back_and_plots_without_touching_the_backend(tables, tmp_path, monkeypatch):
    """One front.csv layout for solve and compress, read back exactly; the plot goes through
    matplotlib's Figure API, so a notebook's backend is left as it was."""
    from depthcompress.dp import sweep
    from depthcompress.report import (
        FRONT_COLUMNS,
        front_rows,
        plot_front,
        read_front_csv,
        write_front_csv,
    )
    from depthcompress.tables import read_importance, read_latency

    mpl = pytest.importorskip("matplotlib")
    result = sweep(read_latency(tables[0]), read_importance(tables[1], "val_acc"), [20.0, 25.0])
    out = tmp_path / "front.csv"
    write_front_csv(out, result)
    assert out.read_text().splitlines()[0] == ",".join(FRONT_COLUMNS)
    rows = read_front_csv(out)
    assert rows == front_rows(result)
    assert rows[1].activations == tuple(sorted(result.solutions[1].plan.activations))
    monkeypatch.setitem(mpl.rcParams, "backend", "svg")
    plan = {**result.solutions[0].to_dict(), "budget_spec": "20", "original_latency": 30.0}
    assert plot_front(tmp_path / "front.png", rows, plan=plan)
    assert plot_front(tmp_path / "sweep.png", rows, front=result.front, title="t")
    assert mpl.rcParams["backend"] == "svg"
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
