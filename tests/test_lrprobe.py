"""The lr probe and the control: a network trained elsewhere (Adam, BN after ReLU) is not wrecked
by a large fine-tuning lr, the probe's outcome is a resumable file of ``compress``, and the
warning names the plan or the recipe."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from depthcompress import pipeline
from depthcompress.data import SplitData, split_dataset
from depthcompress.finetune import FinetuneConfig, evaluate
from depthcompress.lrprobe import (
    ProbeResult,
    ProbeSettings,
    ProbeTrial,
    control_record,
    control_warning,
    probe_lr,
    probe_steps,
)
from depthcompress.report import control_lines, summary_lines
from tests.test_pipeline import settings, small_data, small_model


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Single-threaded CPU kernels make runs bitwise reproducible."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


class PostBnVgg(nn.Module):
    """A VGG-style net in a converted model's order, Conv → ReLU → BN, as frameworks other than
    torchvision often produce it."""

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for out in (width, width, 2 * width, 2 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(out)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def textures(n: int, seed: int = 0) -> TensorDataset:
    """1×12×12 heavy noise over one of four textures: a small conv net learns it to about 96 %."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    i = torch.arange(12)
    rows, cols = (i[:, None] % 2).float(), (i[None, :] % 2).float()
    base = torch.stack(
        [rows.expand(12, 12), cols.expand(12, 12), (rows + cols) % 2, torch.full((12, 12), 0.5)]
    )
    x = base[y].unsqueeze(1) * 2.0 - 1.0 + torch.randn(n, 1, 12, 12, generator=gen) * 2.5
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def foreign() -> tuple[PostBnVgg, SplitData]:
    """The foreign network, trained with Adam (another recipe than ours), and its data."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net, data = PostBnVgg(), split_dataset(textures(640), holdout=160, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = data.train[:]
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), data


RECIPE = FinetuneConfig(epochs=3, lr=0.5, batch_size=32, distill=0.3, seed=0)


def test_candidates_and_steps() -> None:
    assert ProbeSettings().lrs(0.02) == [0.02, 0.005, 0.00125, 0.0003125]
    assert probe_steps(10_000, RECIPE, ProbeSettings(steps=150)) == 150
    assert probe_steps(200, RECIPE, ProbeSettings(steps=150)) == 6  # one epoch at most


def test_a_large_lr_is_rejected_for_a_network_trained_with_adam(foreign) -> None:
    net, data = foreign
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = probe_lr(net, data, RECIPE, ProbeSettings(steps=12))
    assert result.original_accuracy == evaluate(net, data.holdout)
    assert result.original_accuracy > 80  # the foreign network learned its task
    first = result.trials[0]
    assert first.lr == 0.5
    assert first.accuracy is None or first.accuracy < result.original_accuracy - 1.0
    assert result.accepted and result.lr < 0.5
    assert result.control_accuracy >= result.original_accuracy - 1.0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"the probe modified the original ({k})"
    again = probe_lr(net, data, RECIPE, ProbeSettings(steps=12))
    assert again == result  # deterministic
    assert ProbeResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_a_gentle_lr_is_kept_after_one_trial(foreign) -> None:
    net, data = foreign
    result = probe_lr(net, data, FinetuneConfig(epochs=1, lr=1e-4, batch_size=32), ProbeSettings())
    assert result.accepted and result.lr == 1e-4 and len(result.trials) == 1


def probe(accuracies: list[float | None], accepted: bool = True) -> ProbeResult:
    trials = tuple(
        ProbeTrial(lr=0.1 / 4**k, loss=math.nan if a is None else 0.5, accuracy=a)
        for k, a in enumerate(accuracies)
    )
    return ProbeResult(
        original_accuracy=76.6,
        trials=trials,
        lr=trials[-1].lr,
        accepted=accepted,
        steps=150,
        tolerance=1.0,
    )


def test_the_warning_blames_the_plan_when_the_control_kept_its_accuracy() -> None:
    result, s = probe([None, 76.2]), ProbeSettings()
    assert control_warning(result, 74.0, s, "0.6x") is None  # within warn_drop (5 points)
    warning = control_warning(result, 57.2, s, "0.6x")
    assert warning is not None
    assert "plan for budget 0.6x lost the accuracy, not the recipe" in warning
    assert "--budget" in warning and "--epochs" in warning and "76.20 %" in warning


def test_the_warning_blames_the_recipe_when_the_control_lost_accuracy() -> None:
    result = probe([None, 50.2, 60.0, 70.0], accepted=False)
    warning = control_warning(result, 70.0, ProbeSettings(), "0.6x")
    assert warning is not None
    assert "recipe is the problem" in warning and "--lr" in warning and "--optimizer" in warning


def test_the_summary_shows_the_control_next_to_the_result() -> None:
    evaluation = {"control": control_record(probe([76.2]), 57.2, ProbeSettings(), "0.6x")}
    lines = control_lines(evaluation)
    assert "original 76.60 %" in lines[0] and "76.20 %" in lines[0] and "57.20 %" in lines[0]
    assert "lost the accuracy" in lines[1]
    assert control_lines({}) == []


def test_compress_probes_once_and_reports_the_control(tmp_path: Path, monkeypatch) -> None:
    s = replace(settings(), lr_probe=ProbeSettings(steps=3, candidates=2))
    wd = tmp_path / "run"
    result = pipeline.compress(small_model(), small_data(), wd, s)
    assert result is not None
    saved = json.loads((wd / "lr_probe.json").read_text())
    assert saved["settings"]["lr_probe"]["steps"] == 3
    assert saved["lr"] in (0.01, 0.0025)
    stages = json.loads((wd / "stages.json").read_text())
    assert stages["finetune"]["lr"] == saved["lr"]
    assert stages["finetune"]["settings"]["lr_probe"]["steps"] == 3
    control = result.evaluation["control"]
    assert control["control_holdout_accuracy"] == saved["control_accuracy"]
    assert control["compressed_holdout_accuracy"] == stages["finetune"]["history"][-1]["accuracy"]
    assert any(
        line.startswith("Control (held-out split)") for line in summary_lines(result.evaluation)
    )
    assert "## Control" in (wd / "report.md").read_text()

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran again")

    monkeypatch.setattr(pipeline, "probe_lr", no_probe)
    again = pipeline.compress(small_model(), small_data(), wd, s)
    assert again is not None and again.ran == []


def test_cli_probe_options_reach_the_settings() -> None:
    from depthcompress.cli import _compress_settings

    kw = dict(
        budget="0.5x", backend="onnxruntime", threads=None, batch=1, mode="general",
        max_kernel_size=15, exclude=[], importance_steps=1, importance_lr=0.05, workers=1,
        alpha=1.6, epochs=1, lr=0.3, finetune_batch_size=8, optimizer="sgd", distill=0.0,
        device=None, seed=0, amp=None, loader_workers=None,
    )  # fmt: skip
    on = _compress_settings(**kw, probe_steps=40, probe_tolerance=0.5)
    assert on.lr_probe == ProbeSettings(steps=40, tolerance=0.5)
    assert on.stage_settings()["finetune"]["lr_probe"]["steps"] == 40
    off = _compress_settings(**kw, lr_probe=False)
    assert off.lr_probe is None and off.finetune.lr == 0.3
    keys = off.stage_settings()
    assert "lr_probe" not in keys["finetune"] and keys["probe"] == {}  # as before the probe
