"""The lr probe, width and layer pruning together in one ``compress`` (issues 13, 14, 16): a
refused run moves nothing, ``--redo`` moves what is derived from the stage it names, width and
layer pruning merge exactly, an unreachable budget is refused before importance, and the probe
runs on the network that is fine-tuned."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import depthcompress as dc
from depthcompress import importance as importance_module
from depthcompress import latency, pipeline
from depthcompress.backends import OnnxRuntimeBackend
from depthcompress.errors import BudgetError, WorkdirError
from depthcompress.lrprobe import ProbeSettings
from depthcompress.merging import check_close
from depthcompress.pipeline import REDO_FILES, Workdir, compress
from depthcompress.pruning import block_configs
from depthcompress.speedup import Rule
from depthcompress.tables import read_config_latency_rows
from depthcompress.width import prune_width
from tests.conftest import randomize_bn
from tests.test_layermerge import Small
from tests.test_pipeline import snapshot
from tests.test_prune_layers import priced_by_kept_convs, tiny_data, tiny_resnet, tiny_settings

pytest.importorskip("torch_pruning", reason="torch-pruning is the [width] extra (in [dev])")

RULE = Rule(min_rounds=2, max_rounds=2, block=1, warmup=0, max_time=1.0)
PROBE = ProbeSettings(steps=2, candidates=2)


def wide_resnet() -> Small:
    """The tiny ResNet at 16 channels: width 0.25 keeps 12 in every conv, so the basic blocks'
    convs stay reducible after channel pruning."""
    torch.manual_seed(0)
    return randomize_bn(Small([("basic", 1), ("basic", 1)], c=16), 0)


def joint_settings(budget: str = "0.05x", **kw) -> pipeline.CompressSettings:
    """Width 0.25, layer pruning and the lr probe at once (whole budget, the fastest plan)."""
    base = dict(
        budget_mode="whole",
        calibration_rule=RULE,
        calibration_plans=2,
        width=0.25,
        width_round_to=4,
        prune_layers=True,
        lr_probe=PROBE,
        budget_or_fastest=True,
    )
    return replace(tiny_settings(budget), **{**base, **kw})


def priced(mp: pytest.MonkeyPatch) -> None:
    """Blocks priced by the convs they keep (``priced_by_kept_convs``); whole networks (the
    calibration's) timed for real."""
    real = OnnxRuntimeBackend.measure
    priced_by_kept_convs(mp)
    fake = OnnxRuntimeBackend.measure

    def measure(self, model, input_shape):
        return (fake if hasattr(model, "cost") else real)(self, model, input_shape)

    mp.setattr(OnnxRuntimeBackend, "measure", measure)
    mp.setattr(latency, "DEFAULT_PASSES", 1)


def no_importance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any importance entry (plain or configuration) fails the test."""

    def measure(*args, **kwargs):
        raise AssertionError("an unreachable budget must be refused before any importance entry")

    monkeypatch.setattr(importance_module, "measure_entry", measure)
    monkeypatch.setattr(importance_module, "measure_config_entry", measure)


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory) -> tuple[Path, pipeline.CompressResult]:
    """``compress`` with width, layer pruning and the probe on the tiny ResNet; latency tables
    priced by the convs a block keeps, so the fastest plan prunes."""
    mp = pytest.MonkeyPatch()
    priced(mp)
    wd = tmp_path_factory.mktemp("joint") / "run"
    result = compress(wide_resnet(), tiny_data(), wd, joint_settings())
    mp.undo()
    return wd, result


def test_width_and_layer_pruning_merge_exactly_and_export(joint_run) -> None:
    import onnxruntime as ort

    wd, result = joint_run
    assert result.plan.pruned, "the fastest plan of tables priced by kept convs prunes"
    pruned = prune_width(wide_resnet().eval(), torch.randn(1, 3, 8, 8), 0.25, round_to=4).model
    chain = dc.trace(pruned, torch.randn(1, 3, 8, 8))
    assert (wd / "chain.json").read_text() == chain.to_json()
    for row in read_config_latency_rows(wd / "latency_configs.csv"):  # of the pruned chain
        assert 1 <= row.config < len(block_configs(chain, row.st, row.end))
    lin = pipeline.linearize(pruned, chain, result.plan)
    lin.load_state_dict(torch.load(wd / "finetuned.pt", weights_only=True))
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))  # ONNX: batch 1
    with torch.no_grad():
        expected = lin.eval()(x)
        check_close(expected, result.merged(x), "merged", "linearized")
    session = ort.InferenceSession(str(wd / "merged.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    check_close(expected, torch.from_numpy(out), "onnx", "linearized")


def test_the_calibration_times_pruned_plans_too(joint_run) -> None:
    """With layer pruning the calibration's plans come from the configuration DP, so its fit
    sees plans that prune (merging alone gains nothing on these tables)."""
    wd, _ = joint_run
    points = json.loads((wd / "calibration.json").read_text())["points"]
    assert points[0]["label"] == "original" and not points[0]["pruned"]
    assert any(p["pruned"] for p in points[1:]), points


def test_the_probe_runs_on_the_width_pruned_network(joint_run) -> None:
    wd, result = joint_run
    probe = json.loads((wd / "lr_probe.json").read_text())
    assert probe["network"] == "width-pruned"
    assert probe["settings"]["width"]["ratio"] == 0.25
    assert result.evaluation["control"]["network"] == "width-pruned"
    assert "Control (held-out split): width-pruned" in (wd / "report.md").read_text()


def copy_of(wd: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(wd, target)
    return target


@pytest.mark.parametrize(
    ("change", "stage"),
    [
        ({"width": 0.5}, "latency"),
        ({"lr_probe": replace(PROBE, steps=3)}, "finetune"),
        ({"prune_subsets": 1}, "solve"),
    ],
)
def test_a_refused_change_moves_nothing(joint_run, tmp_path, monkeypatch, change, stage) -> None:
    wd = copy_of(joint_run[0], tmp_path)
    before = snapshot(wd)
    monkeypatch.setattr(pipeline, "paired_speedup", None)  # no stage may time anything
    monkeypatch.setattr(pipeline, "probe_lr", None)
    with pytest.raises(WorkdirError, match=f"Pass --redo {stage} ") as err:
        compress(wide_resnet(), tiny_data(), wd, joint_settings(**change))
    assert snapshot(wd) == before
    if "width" in change:
        assert "a new width takes --redo latency" in " ".join(str(err.value).split())


def test_redo_importance_moves_the_configuration_importance_table(joint_run, tmp_path) -> None:
    wd = copy_of(joint_run[0], tmp_path)
    before = snapshot(wd)
    mp = pytest.MonkeyPatch()
    priced(mp)
    compress(wide_resnet(), tiny_data(), wd, joint_settings(), redo="importance", until="solve")
    mp.undo()
    moved = wd / "previous" / "1"
    assert (moved / "importance_configs.csv").read_bytes() == before["importance_configs.csv"]
    assert (moved / "importance.csv").is_file() and (moved / "plan.json").is_file()
    assert not (moved / "latency_configs.csv").exists()  # the latency side is kept
    assert (wd / "latency_configs.csv").read_bytes() == before["latency_configs.csv"]
    assert (wd / "importance_configs.csv").is_file()


def test_a_new_width_is_taken_with_redo_latency(joint_run, tmp_path) -> None:
    wd = copy_of(joint_run[0], tmp_path)
    before = snapshot(wd)
    mp = pytest.MonkeyPatch()
    priced(mp)
    s = joint_settings(width=0.5)
    compress(wide_resnet(), tiny_data(), wd, s, redo="latency", until="solve")
    mp.undo()
    moved = wd / "previous" / "1"
    for name in ("width.json", "calibration.json", "latency.csv", "latency_configs.csv"):
        assert (moved / name).read_bytes() == before[name], name
    assert json.loads((wd / "width.json").read_text())["ratio"] == 0.5
    solve = json.loads((wd / "stages.json").read_text())["solve"]
    assert solve["settings"]["width"]["ratio"] == 0.5


def test_redo_latency_moves_every_file_derived_from_the_latency_settings(tmp_path) -> None:
    assert {"width.json", "calibration.json", "latency_configs.csv"} <= set(REDO_FILES["latency"])
    assert "importance_configs.csv" in REDO_FILES["importance"]
    assert "lr_probe.json" not in {f for files in REDO_FILES.values() for f in files}
    wd = Workdir(tmp_path)
    names = [f for files in REDO_FILES.values() for f in files if "." in f] + ["lr_probe.json"]
    for name in names:
        wd.file(name).write_text(name)
    moved = wd.redo("latency")
    assert moved is not None
    assert sorted(p.name for p in moved.iterdir()) == sorted(set(names) - {"lr_probe.json"})
    assert wd.file("lr_probe.json").is_file()


def test_an_unreachable_budget_with_layer_pruning_is_refused_before_importance(
    tmp_path, monkeypatch
) -> None:
    priced_by_kept_convs(monkeypatch)  # merging gains nothing; only pruning is faster
    monkeypatch.setattr(latency, "DEFAULT_PASSES", 1)
    no_importance(monkeypatch)
    wd = tmp_path / "wd"
    with pytest.raises(BudgetError, match=r"raise --budget to at least (0\.\d{3})x") as err:
        compress(tiny_resnet(), tiny_data(), wd, tiny_settings("0.01x", prune_layers=True))
    assert "no importance entry was computed" in str(err.value)
    assert not (wd / "importance.csv").exists() and not (wd / "importance_configs.csv").exists()


def test_an_unreachable_joint_budget_names_the_fraction_of_the_original(
    tmp_path, monkeypatch
) -> None:
    no_importance(monkeypatch)
    s = joint_settings("0.001x", budget_or_fastest=False, lr_probe=None)
    fraction = r"x of the measured original .*: raise --budget to at least 0\.\d{3}x"
    with pytest.raises(BudgetError, match=fraction + r".*computed\. With --width 0\.25"):
        compress(wide_resnet(), tiny_data(), tmp_path / "wd", s)


def test_a_width_search_with_layer_pruning_estimates_depth_from_the_configuration_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--width auto --prune-layers``: the search reads the original's configuration tables
    (its estimate may prune convs), and the final run prunes layers on the chosen width."""
    from depthcompress.widthsearch import Measured

    priced(monkeypatch)
    monkeypatch.setattr(
        pipeline, "measure_ratio", lambda *a, **k: Measured(1.2, 1.1, 1.3, -1000.0)
    )  # width 0.25 ruinous: depth alone, with layer pruning, is chosen
    wd = tmp_path / "run"
    s = joint_settings("0.5x", width=0.0, width_search=(0.0, 0.25), lr_probe=None)
    result = compress(wide_resnet(), tiny_data(), wd, s)
    search = json.loads((wd / "width_search.json").read_text())
    assert search["chosen"] == 0 and result.evaluation.get("width") is None
    sub = wd / pipeline.SEARCH_DIR
    for name in ("latency_configs.csv", "importance_configs.csv"):  # taken over, not measured
        assert (wd / name).read_text() == (sub / name).read_text()
    plan = json.loads((wd / "plan.json").read_text())
    assert plan["norm"] == "delta" and plan["pruned"]  # the budget forces pruning here
    depth = search["candidates"][0]
    assert depth["depth_loss"] is not None and depth["depth_fraction"] == 0.5
