"""Layer pruning outside ``compress`` (issue 16, third part): ``--prune-layers`` in the latency,
importance and solve commands, the fall-back on a chain with no reducible conv, the report's
pruned-block latency from the configuration table, and the pareto benchmark's ``layers`` method.
Latency tables are priced by the convs a block keeps, so plans never depend on timing."""

from __future__ import annotations

import importlib
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from depthcompress import latency
from depthcompress.cli import app
from depthcompress.defaults import NO_REDUCIBLE
from depthcompress.tables import (
    ConfigImportanceRow,
    ConfigLatencyRow,
    ImportanceTable,
    LatencyTable,
    read_config_importance_rows,
    read_config_latency_rows,
    write_config_importance_rows,
    write_config_latency_rows,
)
from tests import test_prune_layers
from tests.test_pipeline import TINY_RULE
from tests.test_prune_layers import (
    priced_by_kept_convs,
    tiny_data,
    tiny_resnet,
    tiny_settings,
)

pruned_run = test_prune_layers.pruned_run  # the module-scoped compress --prune-layers run

NETS = """
from tests.test_prune_layers import NoReducible, tiny_resnet

def resnet():
    return tiny_resnet()

def plain():
    return NoReducible()
"""


def invoke(*args: str) -> str:
    """Run ``depthcompress ARGS`` in-process; the output with its lines joined."""
    out = CliRunner().invoke(app, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return " ".join(out.output.split())


@pytest.fixture
def nets(tmp_path: Path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


@pytest.fixture
def priced(monkeypatch: pytest.MonkeyPatch) -> None:
    priced_by_kept_convs(monkeypatch)


PRUNE = "--prune-layers"
LATENCY = ("--input-shape", "1,3,8,8", "--threads", "1", "--passes", "1", "--no-progress")


# ---------------------------------------------------------------------------------------------
# latency, importance, solve


def test_latency_prune_layers_writes_the_configuration_table(nets, priced, tmp_path) -> None:
    out = invoke("latency", f"{nets}:resnet", "-o", tmp_path / "lat.csv", *LATENCY, PRUNE)
    rows = read_config_latency_rows(tmp_path / "lat_configs.csv")
    assert rows and f"{len(rows)} configurations (layer pruning)" in out
    assert {r.time for r in rows} >= {0.1}  # an identity configuration, priced 0.1
    plain = json.loads((tmp_path / "lat.csv.json").read_text())
    configs = json.loads((tmp_path / "lat_configs.csv.json").read_text())
    for key in ("batch", "backend", "protocol"):
        assert configs[key] == plain[key]


def test_latency_without_reducible_conv_falls_back(nets, priced, tmp_path) -> None:
    out = invoke("latency", f"{nets}:plain", "-o", tmp_path / "lat.csv", *LATENCY, PRUNE)
    assert NO_REDUCIBLE in out
    assert read_config_latency_rows(tmp_path / "lat_configs.csv") == []  # solve reads it so
    assert LatencyTable.read_csv(tmp_path / "lat.csv").num_positions == 3


def test_importance_prune_layers_writes_the_configuration_table(
    nets, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr("depthcompress.data.load_split", lambda *a, **k: tiny_data())
    args = ("importance", f"{nets}:resnet", "-o", tmp_path / "imp.csv", "--steps", "1")
    args += ("--batch-size", "16", "--no-progress", "--prune-layers", "--prune-subsets", "1")
    out = invoke(*args)
    rows = read_config_importance_rows(tmp_path / "imp_configs.csv")
    assert rows and all(r.tried == 1 and r.pruned for r in rows)
    assert f"{len(rows)} configuration rows (layer pruning)" in out
    assert ImportanceTable.read_csv(tmp_path / "imp.csv")
    refused = CliRunner().invoke(app, [str(a) for a in (*args, "--shard", "1/2")])
    assert refused.exit_code != 0 and "one local process" in " ".join(refused.output.split())


def test_importance_without_reducible_conv_falls_back(nets, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("depthcompress.data.load_split", lambda *a, **k: tiny_data())
    args = ("importance", f"{nets}:plain", "-o", tmp_path / "imp.csv", "--steps", "1")
    out = invoke(*args, "--batch-size", "16", "--no-progress", "--prune-layers")
    assert NO_REDUCIBLE in out and not (tmp_path / "imp_configs.csv").exists()


def write_tables(where: Path, *, configs: bool = True) -> tuple[Path, Path]:
    """Two convs: merging them (1.5 ms) beats 2 ms, pruning conv 2 (1.1 ms) beats both."""
    lat, imp = where / "lat.csv", where / "imp.csv"
    LatencyTable.from_rows([(0, 1, 1.0, 0.0), (1, 2, 1.0, 0.0), (0, 2, 1.5, 0.0)]).write_csv(lat)
    rows = [(0, 1, 1, 1, -1.0), (1, 2, 1, 1, -3.0), (0, 2, 1, 1, -2.0)]
    ImportanceTable.from_rows(rows).write_csv(imp)
    times = [ConfigLatencyRow(0, 1, 2, 1, 0.1, 0.0)] if configs else []
    write_config_latency_rows(where / "lat_configs.csv", times)
    row = ConfigImportanceRow(1, 2, 1, 1, 1, -0.5, 0.0, 0.0, 1, 0.0, frozenset({2}), 1)
    write_config_importance_rows(where / "imp_configs.csv", [row] if configs else [])
    return lat, imp


def test_solve_prune_layers_prunes_within_the_budget(tmp_path) -> None:
    lat, imp = write_tables(tmp_path)
    out = invoke("solve", "--latency", lat, "--importance", imp, "--budget", "0.6x", PRUNE)
    assert "pruned convolutions P (1): 2" in out and "1 configuration times" in out
    sweep = ("--budget", "0.6x,0.9x", "-o", tmp_path / "front.csv", "--prune-layers")
    assert "front written" in invoke("solve", "--latency", lat, "--importance", imp, *sweep)
    plain = CliRunner().invoke(app, ["solve", "--latency", str(lat), "--importance", str(imp)])
    assert plain.exit_code != 0  # --budget is required; and without pruning 0.6x is too tight:
    tight = CliRunner().invoke(
        app, ["solve", "--latency", str(lat), "--importance", str(imp), "--budget", "0.6x"]
    )
    assert tight.exit_code != 0 and "fastest plan" in " ".join(tight.output.split())


def test_solve_prune_layers_falls_back_and_names_missing_tables(tmp_path) -> None:
    lat, imp = write_tables(tmp_path, configs=False)
    base = ("solve", "--latency", lat, "--importance", imp, "--budget", "0.8x")
    out = invoke(*base, "--prune-layers")
    assert NO_REDUCIBLE in out and "pruned convolutions" not in out
    assert out.replace(f"{NO_REDUCIBLE} ", "") == invoke(*base)  # today's answer, word for word
    missing = CliRunner().invoke(
        app, [str(a) for a in (*base, "--prune-layers", "--latency-configs", tmp_path / "x.csv")]
    )
    assert missing.exit_code != 0 and "latency --prune-layers" in " ".join(missing.output.split())


# ---------------------------------------------------------------------------------------------
# the report


def test_report_prices_pruned_blocks_from_the_configuration_table(pruned_run) -> None:
    wd, _, _ = pruned_run
    plan = json.loads((wd / "plan.json").read_text())
    times = {r.key: r.time for r in read_config_latency_rows(wd / "latency_configs.csv")}
    plain = LatencyTable.read_csv(wd / "latency.csv")
    chosen = [(s["st"], s["end"], s["config"]) for s in plan["segments"] if s.get("config")]
    assert chosen
    report = (wd / "report.md").read_text()
    assert plan["norm"] == "delta" and "normalised by delta" in report
    for i, j, c in chosen:
        row = re.search(rf"^\| \({i}, {j}\) \|.*$", report, re.M)
        assert row is not None, report
        after = row.group(0).strip("|").split("|")[-1].strip()
        assert after == f"{times[i, j, c]:.4f}" != f"{plain.time_of(i, j):.4f}"
    imp = read_config_importance_rows(wd / "importance_configs.csv")
    tunes = sum(r.tried for r in imp)
    assert f"{len(times)} configuration latency rows" in report
    assert f"{len(imp)} configuration importance entries" in report
    assert f"from {tunes} fine-tunes × 2 steps" in report


# ---------------------------------------------------------------------------------------------
# the benchmark


def test_pareto_layers_points_share_the_tables(tmp_path, monkeypatch) -> None:
    priced_by_kept_convs(monkeypatch)
    monkeypatch.setattr(latency, "DEFAULT_PASSES", 1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    pareto = importlib.import_module("pareto")
    data = tiny_data()
    s = replace(tiny_settings(), finetune=replace(tiny_settings().finetune, steps_per_epoch=1))
    setup = pareto.Setup("tiny:resnet", tiny_resnet().eval(), data, data.holdout, s)
    timing = pareto.Timing("onnxruntime", 1, 2)
    opts = pareto.Options(
        budgets=("0.9x",), ratios=(), timings=(timing,), rule=TINY_RULE, importances=(),
        layer_budgets=("0.5x",),
    )  # fmt: skip
    record = pareto.run(setup, opts, tmp_path, log=lambda _: None)
    assert [p["name"] for p in record] == ["original", "depthcompress-0.9x", "layers-delta-0.5x"]
    layers = record[-1]
    assert layers["method"] == "layers" and layers["pruned"]  # merging alone gains nothing here
    assert layers["pruned"] == sorted(layers["plan"]["pruned"])
    assert (tmp_path / "tables" / "importance_configs.csv").is_file()
    assert "| layers | 0.5x |" in (tmp_path / "pareto.md").read_text()
    assert (tmp_path / f"resnet-{timing.key}.png").stat().st_size > 0

    def no_work(*args, **kwargs):
        raise AssertionError("a finished benchmark computes nothing again")

    monkeypatch.setattr(pareto, "finetune", no_work)
    monkeypatch.setattr("depthcompress.importance.measure_config_entry", no_work)
    assert pareto.run(setup, opts, tmp_path, log=lambda _: None) == record
