"""Width before depth (issue 14): channel pruning through Torch-Pruning, then depth compression
of the pruned network under one budget of the original's whole latency."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import depthcompress as dc
from depthcompress import pipeline
from depthcompress.errors import BudgetError, WidthError
from depthcompress.merging import check_close
from depthcompress.models import resnet20
from depthcompress.pipeline import compress
from depthcompress.speedup import Rule
from depthcompress.width import default_round_to, prune_width
from tests.test_pipeline import TINY_RULE, settings, small_data, small_model

pytest.importorskip("torch_pruning", reason="torch-pruning is the [width] extra (in [dev])")

RULE = Rule(min_rounds=2, max_rounds=2, block=1, warmup=0, max_time=1.0)


class ChannelView(nn.Module):
    """Reshapes channels into groups: Torch-Pruning prunes ``a`` and the view then fails."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        b, _, h, w = x.shape
        x = self.b(x.view(b, 16, 2, h, w).mean(2))
        return self.fc(x.mean((2, 3)))


def width_settings(budget: str = "0.9x", width: float = 0.25) -> pipeline.CompressSettings:
    return replace(
        settings(budget, epochs=1),
        budget_mode="whole",
        calibration_rule=RULE,
        calibration_plans=2,
        speedup_rule=TINY_RULE,
        width=width,
        width_round_to=4,
        budget_or_fastest=False,
    )


@pytest.mark.parametrize(
    ("model", "shape"), [(small_model(), (2, 1, 28, 28)), (resnet20(), (2, 3, 32, 32))]
)
def test_pruning_keeps_shapes_rounds_channels_and_the_users_model(model, shape) -> None:
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    result = prune_width(model, x[:1], 0.25, round_to=4)
    assert result.model(x).shape == model(x).shape
    assert any(b < a for a, b in result.kept.values())
    assert all(b % 4 == 0 for _, b in result.kept.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = prune_width(model, x[:1], 0.25, round_to=4)  # L1 is deterministic
    assert again.kept == result.kept


def test_round_to_follows_the_backend() -> None:
    assert default_round_to("onnxruntime") == 16
    assert default_round_to("torch", "cpu") == 16
    assert default_round_to("torch", "cuda") == 8
    assert default_round_to("tensorrt") == 8


def test_a_model_torch_pruning_cannot_handle_names_the_layer() -> None:
    with pytest.raises(WidthError, match=r"after layer a: .*depth-only compression"):
        prune_width(ChannelView(), torch.randn(1, 3, 8, 8), 0.25, round_to=4)


def test_missing_torch_pruning_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(WidthError, match=r"pip install 'depthcompress\[width\]'"):
        prune_width(small_model(), torch.randn(1, 1, 28, 28), 0.25, round_to=4)


def test_width_needs_the_whole_budget() -> None:
    with pytest.raises(dc.DepthCompressError, match="budget_mode 'whole'"):
        replace(settings(), width=0.25)


@pytest.fixture(scope="module")
def width_run(tmp_path_factory) -> tuple[Path, pipeline.CompressResult]:
    wd = tmp_path_factory.mktemp("width") / "run"
    return wd, compress(small_model(), small_data(), wd, width_settings())


def test_compress_with_width_merges_exactly_and_exports(width_run) -> None:
    import onnxruntime as ort

    wd, result = width_run
    record = json.loads((wd / "width.json").read_text())
    assert record["ratio"] == 0.25 and record["round_to"] == 4
    assert record["kept"]["features.1.conv.0"][1] < record["kept"]["features.1.conv.0"][0]
    pruned = prune_width(small_model(), torch.randn(1, 1, 28, 28), 0.25, round_to=4).model
    chain = dc.trace(pruned, torch.randn(1, 1, 28, 28), exclude=("stem", "head"))
    assert (wd / "chain.json").read_text() == chain.to_json()
    lin = pipeline.linearize(pruned, chain, result.plan)
    lin.load_state_dict(torch.load(wd / "finetuned.pt", weights_only=True))
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = lin.eval()(x)
        check_close(expected, result.merged(x), "merged", "linearized")
    session = ort.InferenceSession(str(wd / "merged.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    check_close(expected, torch.from_numpy(out), "onnx", "linearized")
    split = result.evaluation["width"]
    assert split["speedup"] * split["depth_speedup"] == pytest.approx(result.speedup)
    report = (wd / "report.md").read_text()
    assert (
        "## Width" in report
        and "Σ T of the pruned chain" in report
        and "| features.1.conv.0 | 16 |" in report
    )
    plan = json.loads((wd / "plan.json").read_text())
    cal = json.loads((wd / "calibration.json").read_text())
    pruned_whole = cal["points"][0]["whole_ms"]
    assert plan["original_whole_ms"] == pytest.approx(pruned_whole * record["speedup"])


def test_resume_does_not_redo_the_width_stage(width_run, monkeypatch) -> None:
    wd, first = width_run
    before = (wd / "width.json").read_bytes()
    monkeypatch.setattr(pipeline, "paired_speedup", None)  # any timing would fail
    monkeypatch.setattr(pipeline.EvaluateStage, "run", None)
    again = compress(small_model(), small_data(), wd, width_settings())
    assert again.ran == [] and again.plan == first.plan
    assert (wd / "width.json").read_bytes() == before


def test_an_unreachable_budget_suggests_a_larger_width(tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match=r"at least .*x.* a larger --width"):
        compress(small_model(), small_data(), tmp_path / "wd", width_settings("0.01x"))


def test_compress_help_offers_width() -> None:
    from typer.testing import CliRunner

    from depthcompress.cli import app

    out = CliRunner().invoke(app, ["compress", "--help"], env={"COLUMNS": "80"}).output
    assert "--width" in out and "--width-importance" in out and "depth only" in out


def test_pareto_joint_points_are_made_and_plotted(tmp_path: Path) -> None:
    """benchmarks/pareto.py's third method: compress with width and budget, on the same front."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    pareto = importlib.import_module("pareto")
    data = small_data()
    tiny = replace(settings(epochs=1), calibration_rule=RULE)
    setup = pareto.Setup("tiny:mbv2", small_model().eval(), data, data.holdout, tiny)
    timing = pareto.Timing("onnxruntime", 1, 8)
    opts = pareto.Options(
        budgets=("0.8x",), ratios=(), timings=(timing,), rule=TINY_RULE, round_to=4,
        importances=(), joint=("0.25:0.9x",),
    )  # fmt: skip
    record = pareto.run(setup, opts, tmp_path, log=lambda _: None)
    joint = record[-1]
    assert joint["name"] == "joint-0.25-0.9x" and joint["method"] == "joint"
    assert joint["width"] == 0.25  # the plan (and so the parameter count) depends on timing
    pruned = json.loads(
        (tmp_path / "points" / "joint-0.25-0.9x" / "compress" / "width.json").read_text()
    )
    assert pruned["params"][1] < pruned["params"][0]
    assert "| joint | 0.25:0.9x |" in (tmp_path / "pareto.md").read_text()
    assert (tmp_path / f"mbv2-{timing.key}.png").stat().st_size > 0


def test_taylor_importance_reads_gradients_of_given_batches() -> None:
    from depthcompress.data import fetch

    model, x = small_model().eval(), torch.randn(1, 1, 28, 28)
    with pytest.raises(WidthError, match="needs batches"):
        prune_width(model, x, 0.5, round_to=4, importance="taylor")
    batch = fetch(small_data().holdout, torch.arange(32))
    first = prune_width(model, x, 0.5, round_to=4, importance="taylor", batches=[batch])
    again = prune_width(model, x, 0.5, round_to=4, importance="taylor", batches=[batch])
    assert first.kept == again.kept and all(p.grad is None for p in model.parameters())
