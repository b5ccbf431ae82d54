"""Layer pruning in the pipeline (issue 16, second part): configuration latency and importance
tables, stage 2 over (segment, configuration), ``compress --prune-layers`` end to end, the
fall-back on a chain with no reducible conv, and nothing changed when it is off."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import depthcompress as dc
from depthcompress import latency
from depthcompress.backends import OnnxRuntimeBackend, Protocol, Timing
from depthcompress.data import split_dataset
from depthcompress.finetune import FinetuneConfig
from depthcompress.importance import FinetuneSettings, config_cost, config_entries
from depthcompress.pipeline import STAGES, Budget, CompressSettings, compress
from depthcompress.pruning import block_configs
from depthcompress.tables import (
    ConfigImportanceRow,
    ConfigLatencyRow,
    read_config_importance_rows,
    read_config_latency_rows,
    write_config_importance_rows,
    write_config_latency_rows,
)
from tests.conftest import randomize_bn
from tests.test_layermerge import Small
from tests.test_pipeline import TINY_RULE


def tiny_resnet() -> Small:
    """A stem and two basic blocks with identity shortcuts (L = 5, four reducible convs)."""
    torch.manual_seed(0)
    return randomize_bn(Small([("basic", 1), ("basic", 1)]), 0)


class NoReducible(nn.Module):
    """Convs that all change the channel count: nothing can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def tiny_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(192, 3, 8, 8, generator=gen)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    return split_dataset(TensorDataset(x, y), holdout=48, seed=0, name="tiny3")


def tiny_settings(budget: str = "0.5x", **kw) -> CompressSettings:
    return CompressSettings(
        budget=Budget.parse(budget),
        batch=1,
        threads=1,
        protocol=Protocol(warmup=1, reps=3, min_reps=1, max_time=0.02),
        importance=FinetuneSettings(steps=2, batch_size=16, eval_batch_size=48),
        finetune=FinetuneConfig(epochs=1, lr=0.01, batch_size=16, steps_per_epoch=2),
        speedup_rule=TINY_RULE,
        budget_mode="chain",
        **kw,
    )


def priced_by_kept_convs(monkeypatch) -> None:
    """Latency tables priced by the convs a block keeps (merging gains nothing, a fully pruned
    block costs 0.1): fast, exact, and only pruning makes a network faster."""
    block_module = latency.block_module

    def tagged(chain, i, j, *, seed=0, config=0, pruned=frozenset()):
        module = block_module(chain, i, j, seed=seed, config=config, pruned=pruned)
        kept = (j - i) - len(pruned)
        module.cost = float(kept) if kept else 0.1
        return module

    def measure(self, model, input_shape):
        return Timing.from_samples([model.cost])

    monkeypatch.setattr(latency, "block_module", tagged)
    monkeypatch.setattr(OnnxRuntimeBackend, "measure", measure)


# ---------------------------------------------------------------------------------------------
# tables


def test_configuration_table_round_trips(tmp_path: Path) -> None:
    rows = [ConfigLatencyRow(0, 1, 3, 1, 0.25, 0.01), ConfigLatencyRow(1, 1, 3, 2, 0.1, 0.0)]
    write_config_latency_rows(tmp_path / "lat.csv", rows)
    assert read_config_latency_rows(tmp_path / "lat.csv") == rows
    imp = [
        ConfigImportanceRow(1, 3, 1, 1, 2, -3.5, 0.2, 1.1, 5, 0.5, frozenset({2, 3}), 1),
        ConfigImportanceRow(1, 3, 1, 1, 1, -1.25, 0.1, 1.0, 5, 0.25, frozenset({3}), 2),
    ]
    write_config_importance_rows(tmp_path / "imp.csv", imp)
    assert read_config_importance_rows(tmp_path / "imp.csv") == sorted(imp, key=lambda r: r.key)


def test_configuration_latency_table_is_resumable(tmp_path: Path, monkeypatch) -> None:
    priced_by_kept_convs(monkeypatch)
    chain = dc.trace(tiny_resnet().eval(), torch.randn(1, 3, 8, 8))
    backend = OnnxRuntimeBackend(threads=1)
    path = tmp_path / "latency_configs.csv"
    first = latency.build_latency_table(chain, backend, path, passes=1, configs=True)
    expected = sum(len(block_configs(chain, i, j)) - 1 for i, j in chain.blocks)
    assert len(first.rows) == first.measured == expected > 0
    again = latency.build_latency_table(chain, backend, path, passes=1, configs=True)
    assert again.measured == 0 and again.rows == first.rows
    for row in again.rows:  # an identity configuration prices 0.1, the others their kept convs
        cfg = block_configs(chain, row.st, row.end)[row.config]
        assert (row.time == 0.1) == cfg.identity
    plain = latency.build_latency_table(chain, backend, tmp_path / "latency.csv", passes=1)
    assert [(r.st, r.end) for r in plain.rows] == list(chain.blocks)


def test_configuration_table_of_the_old_semantics_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A configuration table whose sidecar lacks ``semantics: shortcut-alone`` (made when a fully
    pruned branch meant ``x + x``) is refused, not resumed; a fully pruned basic block times the
    activation alone (merge wires it through)."""
    priced_by_kept_convs(monkeypatch)
    chain = dc.trace(tiny_resnet().eval(), torch.randn(1, 3, 8, 8))
    backend = OnnxRuntimeBackend(threads=1)
    path = tmp_path / "latency_configs.csv"
    latency.build_latency_table(chain, backend, path, passes=1, configs=True)
    sidecar = Path(f"{path}.json")
    meta = json.loads(sidecar.read_text())
    assert meta["blocks"].pop("semantics") == "shortcut-alone"
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(dc.TableError, match="semantics"):
        latency.build_latency_table(chain, backend, path, passes=1, configs=True)
    r = next(r for r in chain.residuals if r.shortcut is None)
    module = latency.block_module(chain, r.start, r.end, pruned=frozenset({r.start + 1, r.end}))
    assert not any(isinstance(m, nn.Conv2d) for m in module.modules())


def test_configuration_entries_and_their_cost() -> None:
    chain = dc.trace(tiny_resnet().eval(), torch.randn(1, 3, 8, 8))
    entries = config_entries(chain)
    assert entries and all(e.config >= 1 and subsets for e, subsets in entries)
    n, tunes = config_cost(chain, FinetuneSettings(), 2)
    assert n == len(entries) and n <= tunes <= 2 * n


# ---------------------------------------------------------------------------------------------
# the pipeline


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """``compress --prune-layers`` on the tiny ResNet with a budget only pruning can meet."""
    mp = pytest.MonkeyPatch()
    priced_by_kept_convs(mp)
    mp.setattr(latency, "DEFAULT_PASSES", 1)
    notes: list[str] = []
    wd = tmp_path_factory.mktemp("prune") / "run"
    s = tiny_settings("0.5x", prune_layers=True, budget_or_fastest=True)
    result = compress(tiny_resnet(), tiny_data(), wd, s, log=notes.append)
    mp.undo()
    return wd, result, notes


def test_compress_prune_layers_prunes_and_merges_exactly(pruned_run) -> None:
    wd, result, notes = pruned_run
    assert result.plan.pruned, "a budget of 0.5x with merging worth nothing needs pruning"
    plan = json.loads((wd / "plan.json").read_text())
    assert sorted(plan["pruned"]) == sorted(result.plan.pruned)
    assert any(s.get("config", 0) >= 1 for s in plan["segments"])
    assert any("the plan prunes" in n for n in notes), notes
    merge = json.loads((wd / "stages.json").read_text())["merge"]
    assert merge["error"] <= 1e-4 and merge["onnx_error"] <= 1e-4
    assert (wd / "merged.onnx").is_file() and (wd / "latency_configs.csv").is_file()
    assert read_config_importance_rows(wd / "importance_configs.csv")
    report = (wd / "report.md").read_text()
    assert f"pruned convolutions, layer pruning ({len(result.plan.pruned)})" in report


def test_compress_prune_layers_resumes_without_work(pruned_run, monkeypatch) -> None:
    wd, result, _ = pruned_run

    def no_measure(*args, **kwargs):
        raise AssertionError("a finished run measures nothing again")

    monkeypatch.setattr(OnnxRuntimeBackend, "measure", no_measure)
    monkeypatch.setattr("depthcompress.importance.measure_config_entry", no_measure)
    s = tiny_settings("0.5x", prune_layers=True, budget_or_fastest=True)
    again = compress(tiny_resnet(), tiny_data(), wd, s, until="solve")
    assert again is None
    assert json.loads((wd / "plan.json").read_text())["pruned"] == sorted(result.plan.pruned)


def test_no_reducible_conv_falls_back_to_merging_alone(tmp_path: Path, monkeypatch) -> None:
    priced_by_kept_convs(monkeypatch)
    monkeypatch.setattr(latency, "DEFAULT_PASSES", 1)
    plans = []
    for prune in (False, True):
        notes: list[str] = []
        wd = tmp_path / f"prune{prune}"
        s = tiny_settings("0.9x", prune_layers=prune, budget_or_fastest=True)
        compress(NoReducible(), tiny_data(), wd, s, until="solve", log=notes.append)
        fallback = "no reducible convolution in this chain: merging alone"
        assert (fallback in notes) == prune, notes
        assert not (wd / "latency_configs.csv").exists()
        plan = json.loads((wd / "plan.json").read_text())
        plans.append({k: v for k, v in plan.items() if k != "pruned"})
        assert "pruned" not in plan
    assert plans[0] == plans[1]


def test_prune_layers_off_changes_no_stage_key() -> None:
    off = tiny_settings().stage_settings()
    assert off == replace(tiny_settings(), prune_layers=False).stage_settings()
    assert "prune_layers" not in json.dumps(off)
    on = tiny_settings(prune_layers=True, prune_subsets=3).stage_settings()
    assert on["solve"]["prune_layers"] == {"subsets": 3}
    assert on["solve"]["norm"] == "delta"  # auto: layer pruning normalises by delta
    rest = {k: v for k, v in on["solve"].items() if k not in ("prune_layers", "norm")}
    assert rest == off["solve"]
    assert "norm" not in off["solve"]
    assert STAGES == ("latency", "optimal", "importance", "solve", "finetune", "merge", "evaluate")


def test_cli_compress_takes_prune_flags(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from depthcompress.cli import app

    args = [
        "compress",
        "depthcompress:resnet20",
        "--budget",
        "0.5x",
        "--workdir",
        str(tmp_path / "w"),
    ]
    out = CliRunner().invoke(app, [*args, "--prune-layers", "--prune-subsets", "0"])
    assert out.exit_code != 0 and "prune_subsets must be ≥ 1" in " ".join(out.output.split())
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("seed", range(6))
def test_config_tables_without_configurations_solve_as_today(seed) -> None:
    """Configuration 0 of ``dp.config_tables`` is today's problem: same plan, same front."""
    import random

    from depthcompress.dp import (
        config_tables,
        min_latency,
        optimal_latency,
        solve,
        solve_configs,
        sweep,
        sweep_configs,
    )
    from tests.test_dp import random_instance

    rng = random.Random(seed)
    latency, imp = random_instance(rng, 6, all_flags=seed % 2 == 0)
    opt = optimal_latency(latency)
    try:
        fastest = min_latency(opt, imp)
    except dc.TableError:
        return
    tables = config_tables(opt, imp, {}, [], alpha=1.6)
    budgets = [fastest, (fastest + sum(opt.time.tolist())) / 2]
    assert solve_configs(tables, budgets[1]) == solve(opt, imp, budgets[1], alpha=1.6)
    assert sweep_configs(tables, budgets).front == sweep(opt, imp, budgets, alpha=1.6).front


def test_a_configuration_row_is_normalised_like_todays_rows() -> None:
    from depthcompress.dp import config_tables, optimal_latency
    from depthcompress.tables import ImportanceTable, LatencyTable

    latency = LatencyTable.from_rows([(0, 1, 1.0, 0.0), (1, 2, 1.0, 0.0), (0, 2, 1.5, 0.0)])
    imp = ImportanceTable.from_rows([(0, 1, 1, 1, -1.0), (1, 2, 1, 1, -3.0), (0, 2, 1, 1, -2.0)])
    row = ConfigImportanceRow(1, 2, 1, 1, 1, -0.5, 0.0, 0.0, 1, 0.0, frozenset({2}), 1)
    tables = config_tables(optimal_latency(latency), imp, {(1, 2, 1): 0.1}, [row], alpha=2.0)
    assert tables.importance[1, 2, 1, 1, 1] == pytest.approx(-0.5 + 2.0 * 2.0)
    assert tables.importance[1, 2, 1, 1, 0] == pytest.approx(-3.0 + 2.0 * 2.0)
    assert tables.time[1, 2, 1] == 0.1 and tables.pruned[1, 2, 1] == frozenset({2})
    with pytest.raises(dc.TableError, match="no row in the configuration latency table"):
        config_tables(optimal_latency(latency), imp, {}, [row])


def test_delta_norm_keeps_a_conv_that_single_norm_prunes() -> None:
    """ResNet-20's tables at 10 steps (docs/layermerge.md): a re-initialised single conv scores
    far below pruning it, so the paper's normalisation prunes at any budget; ``delta`` scores a
    kept conv 0 and prunes only when the budget needs it."""
    from depthcompress.dp import config_tables, optimal_latency, solve_configs
    from depthcompress.tables import ImportanceTable, LatencyTable

    latency = LatencyTable.from_rows([(0, 1, 1.0, 0.0), (1, 2, 1.0, 0.0), (0, 2, 1.9, 0.0)])
    imp = ImportanceTable.from_rows([(0, 1, 1, 1, -48.0), (1, 2, 1, 1, -45.0), (0, 2, 1, 1, -9.0)])
    row = ConfigImportanceRow(0, 2, 1, 1, 1, -8.0, 0.0, 0.0, 10, 0.0, frozenset({2}), 1)
    times = {(0, 2, 1): 1.0}
    single = config_tables(optimal_latency(latency), imp, times, [row], alpha=1.6)
    delta = config_tables(optimal_latency(latency), imp, times, [row], alpha=1.6, norm="delta")
    assert solve_configs(single, 5.0).plan.pruned == frozenset({2})
    loose = solve_configs(delta, 5.0)
    assert loose.plan.pruned == frozenset() and loose.plan.boundaries == {1, 2}
    assert loose.importance == 0.0
    assert solve_configs(delta, 1.9).plan.pruned == frozenset({2})  # -8 > the merge's -9


@pytest.mark.parametrize("seed", range(8))
def test_delta_norm_keeps_the_original_until_the_budget_forces(seed) -> None:
    """With every merge losing something, ``delta`` picks the unmodified network whenever the
    budget allows it, whatever the (re-initialised) single-conv scores are."""
    import random

    from depthcompress.dp import optimal_latency, solve
    from depthcompress.tables import ImportanceTable
    from tests.test_dp import random_instance

    rng = random.Random(seed)
    latency, imp = random_instance(rng, 6, all_flags=True)
    scores = zip(imp.keys, imp.score.tolist(), strict=True)
    rows = {key: -abs(s) - 0.01 for key, s in scores}
    rows |= {(k, k + 1, 1, 1): rng.uniform(-50.0, 0.0) for k in range(6)}
    table = ImportanceTable.from_rows((*k, s) for k, s in rows.items())
    opt = optimal_latency(latency)
    original = sum(opt.time_of(k, k + 1) for k in range(6))
    sol = solve(opt, table, original + 1e-9, norm="delta")
    # every segment that removes an activation scores < 0, so 0 means none was removed (convs
    # around a linear position may still merge: that is exact and free in accuracy)
    assert sol.importance == 0.0
    assert solve(opt, table, original + 1e-9, alpha=1.6).importance != 0.0
