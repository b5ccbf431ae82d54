"""End to end: ``compress`` runs every stage, resumes after interruptions, refuses bad input
without losing work, and exports a merged network whose ONNX outputs match PyTorch."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import depthcompress as dc
from depthcompress import importance as importance_module
from depthcompress import pipeline
from depthcompress import report as dc_report
from depthcompress.backends import OnnxRuntimeBackend, Protocol, get_backend
from depthcompress.cli import app
from depthcompress.data import split_dataset
from depthcompress.errors import BudgetError, DepthCompressError, TraceError
from depthcompress.files import sidecar_path
from depthcompress.finetune import FinetuneConfig
from depthcompress.importance import FinetuneSettings, read_table
from depthcompress.latency import build_latency_table
from depthcompress.models import FashionMBV2
from depthcompress.pipeline import Budget, CompressSettings, WorkdirError, compress
from depthcompress.speedup import Rule
from tests.conftest import randomize_bn, rel_err

BLOCKS = ((1, 8, 1), (2, 8, 1), (2, 16, 2))
TINY_RULE = Rule(min_rounds=3, max_rounds=4, max_time=1.0, block=1, warmup=1, resamples=100)
"""A paired timing of a few milliseconds: tests check what is recorded, not the figure."""
NOISY_RULE = Rule(min_rounds=2, max_rounds=2, max_time=0.01, target=1e-12, block=1, warmup=0)
"""A paired timing that cannot reach its target: the machine counts as too noisy."""


def small_model(seed: int = 0) -> FashionMBV2:
    """A three-block MobileNetV2-style network (L = 8 positions outside stem and head)."""
    torch.manual_seed(seed)
    return randomize_bn(FashionMBV2(blocks=BLOCKS, head_channels=32), seed)


def small_data(classes: int = 10):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(320, 1, 28, 28, generator=gen)
    y = (x[:, 0, :14].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :14].mean((1, 2)) > 0).long()
    y[: classes - 4] = torch.arange(4, classes)  # every class present
    return split_dataset(TensorDataset(x, y), holdout=64, seed=0, name=f"synthetic{classes}")


def settings(budget: str = "0.7x", epochs: int = 2) -> CompressSettings:
    return CompressSettings(
        budget=Budget.parse(budget),
        batch=2,
        threads=1,
        protocol=Protocol(warmup=1, reps=3, min_reps=1, max_time=0.02),
        exclude=("stem", "head"),
        importance=FinetuneSettings(steps=2, batch_size=32, eval_batch_size=64),
        finetune=FinetuneConfig(epochs=epochs, lr=0.01, batch_size=32, steps_per_epoch=3),
        speedup_rule=TINY_RULE,
        budget_mode="chain",  # budgets of the table's Σ T; "whole" is in test_calibration.py
    )


class Interrupt(Exception):
    """Stands in for Ctrl-C (a KeyboardInterrupt would stop pytest itself)."""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, pipeline.CompressResult, list[dict]]:
    """A workdir run to the end through two simulated interruptions: one in the importance
    table (after two rows) and one in fine-tuning (after the first epoch)."""
    wd = tmp_path_factory.mktemp("e2e") / "run"
    model, data = small_model(), small_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mp = pytest.MonkeyPatch()

    calls = {"n": 0}
    measure = importance_module.measure_entry

    def flaky_measure(job, entry):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt
        return measure(job, entry)

    mp.setattr(importance_module, "measure_entry", flaky_measure)
    with pytest.raises(Interrupt):
        compress(model, data, wd, settings())
    mp.undo()
    stages = json.loads((wd / "stages.json").read_text())
    assert set(stages) == {"latency", "optimal"}
    _, partial = read_table(wd / "importance.csv")
    assert len(partial) == 2

    tune = pipeline.finetune

    def interrupted_finetune(*args, **kwargs):
        def stop(stats):
            raise Interrupt

        return tune(*args, **kwargs, on_epoch_end=stop)

    mp.setattr(pipeline, "finetune", interrupted_finetune)
    with pytest.raises(Interrupt):
        compress(model, data, wd, settings())
    mp.undo()
    assert (wd / "finetune" / "last.pt").exists()
    assert not (wd / "finetuned.pt").exists()

    result = compress(model, data, wd, settings())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"compress modified the user's model ({k})"
    return wd, result, partial


def test_every_stage_writes_its_file(finished) -> None:
    wd, result, _ = finished
    for name in (
        "run.json",
        "chain.json",
        "stages.json",
        "latency.csv",
        "opt_latency.csv",
        "importance.csv",
        "plan.json",
        "front.csv",
        "finetuned.pt",
        "merged.pt",
        "merged.onnx",
        "evaluation.json",
        "report.md",
    ):
        assert (wd / name).is_file(), name
    assert set(json.loads((wd / "stages.json").read_text())) == set(pipeline.STAGES)
    report = (wd / "report.md").read_text()
    assert "kept activations" in report and "| latency (onnxruntime" in report
    assert result.ran == ["finetune", "merge", "evaluate"]


def test_resumed_runs_keep_what_was_computed(finished) -> None:
    wd, _, partial = finished
    _, rows = read_table(wd / "importance.csv")
    by_key = {importance_module._key(r): r for r in rows}
    for row in partial:  # the two rows measured before the interruption were not redone
        assert by_key[importance_module._key(row)] == row
    history = json.loads((wd / "stages.json").read_text())["finetune"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_a_finished_run_recomputes_nothing(finished) -> None:
    wd, first, _ = finished
    again = compress(small_model(), small_data(), wd, settings())
    assert again.ran == []
    assert again.plan == first.plan


def test_merged_files_match_the_finetuned_network(finished) -> None:
    wd, result, _ = finished
    import onnxruntime as ort

    merged = torch.load(wd / "merged.pt", weights_only=False)
    plan = dc.Plan.load(wd / "plan.json")
    model = small_model()
    ch = dc.trace(model, torch.randn(1, 1, 28, 28), exclude=("stem", "head"))
    lin = dc.linearize(model, ch, plan)
    lin.load_state_dict(torch.load(wd / "finetuned.pt", weights_only=True))
    lin.eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = lin(x)
        assert rel_err(expected, merged(x)) <= 1e-4
    session = ort.InferenceSession(str(wd / "merged.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert rel_err(expected, torch.from_numpy(out)) <= 1e-4
    assert result.compressed.depth < result.original.depth


def test_evaluation_records_the_paired_speedup(finished) -> None:
    wd, result, _ = finished
    evaluation = json.loads((wd / "evaluation.json").read_text())
    paired = evaluation["paired"]
    assert evaluation["speedup_method"] == "paired"
    assert paired["names"] == ["original", "compressed"]
    assert paired["rule"]["max_rounds"] == TINY_RULE.max_rounds
    assert paired["threads"] == evaluation["threads"] == 1 and paired["batch"] == 2
    assert paired["machine"]["cpu"] and paired["backend"]["name"] == "onnxruntime"
    assert evaluation["speedup"] == paired["speedup"] == result.speedup
    assert evaluation["speedup_interval"] == [paired["low"], paired["high"]]
    assert paired["low"] <= paired["speedup"] <= paired["high"]
    assert evaluation["original"]["latency"] == paired["latency_a_ms"]
    assert evaluation["compressed"]["latency"] == paired["latency_b_ms"]


def test_report_shows_the_measured_speedup_next_to_the_prediction(finished) -> None:
    wd, _, _ = finished
    evaluation = json.loads((wd / "evaluation.json").read_text())
    report = (wd / "report.md").read_text()
    low, high = evaluation["speedup_interval"]
    measured = f"speed-up {evaluation['speedup']:.2f}× [{low:.2f}, {high:.2f}]"
    assert f"| measured, whole network | {measured} |" in report
    predicted = (
        f"| predicted by the latency table, chain only | {evaluation['predicted_speedup']:.2f}×"
    )
    assert predicted in report
    assert "1 thread (set with --threads)" in report and evaluation["machine"]["cpu"] in report
    assert "paired rounds" in report


def test_accuracy_latency_plot_is_linked(finished) -> None:
    pytest.importorskip("matplotlib")
    wd, _, _ = finished
    assert (wd / "accuracy_latency.png").stat().st_size > 0
    assert "(accuracy_latency.png)" in (wd / "report.md").read_text()


def test_a_too_noisy_machine_is_reported_not_crashed(finished, tmp_path: Path) -> None:
    wd = copy_of(finished, tmp_path)
    noisy = replace(settings(), speedup_rule=NOISY_RULE)
    said: list[str] = []
    result = compress(small_model(), small_data(), wd, noisy, redo="evaluate", log=said.append)
    assert result is not None and result.ran == ["evaluate"]
    evaluation = json.loads((wd / "evaluation.json").read_text())
    assert evaluation["speedup_converged"] is False and not evaluation["paired"]["converged"]
    assert any("too noisy" in line for line in said)
    report = (wd / "report.md").read_text()
    assert "too noisy" in report and "not trustworthy" in report
    rows = dict((r[0], r[3]) for r in dc_report.summary_rows(evaluation))
    assert any("(too noisy)" in change for change in rows.values())
    lines = dc_report.summary_lines(evaluation)
    assert any("not trustworthy" in line for line in lines)


class Unprepared(pipeline.Backend):
    """ONNX Runtime as a backend without ``prepare`` (like tensorrt) would time it."""

    def __init__(self, inner: pipeline.Backend) -> None:
        super().__init__(threads=inner.threads, protocol=inner.protocol)
        self.inner = inner
        self.name = inner.name

    def measure(self, model, input_shape):
        return self.inner.measure(model, input_shape)

    def info(self) -> dict:
        return self.inner.info()


def test_a_backend_without_paired_rounds_falls_back(finished, tmp_path, monkeypatch) -> None:
    wd = copy_of(finished, tmp_path)
    monkeypatch.setattr(pipeline, "get_backend", lambda *a, **k: Unprepared(get_backend(*a, **k)))
    result = compress(small_model(), small_data(), wd, settings(), redo="evaluate")
    assert result is not None
    evaluation = json.loads((wd / "evaluation.json").read_text())
    assert evaluation["speedup_method"] == "alternating medians" and evaluation["paired"] is None
    assert result.speedup == pytest.approx(result.original.latency / result.compressed.latency)
    report = (wd / "report.md").read_text()
    assert "cannot time in paired rounds" in report and "(no interval)" in report


def test_summary_numbers_are_consistent(finished) -> None:
    _, result, _ = finished
    plan = json.loads((result.workdir / "plan.json").read_text())
    assert plan["latency"] <= plan["budget"] + 1e-9
    assert plan["budget"] == pytest.approx(0.7 * plan["original_latency"])


# ---------------------------------------------------------------------------------------------
# settings changes and bad input


def copy_of(finished, tmp_path: Path) -> Path:
    wd = tmp_path / "run"
    shutil.copytree(finished[0], wd)
    return wd


def snapshot(wd: Path) -> dict[str, bytes]:
    return {str(p.relative_to(wd)): p.read_bytes() for p in sorted(wd.rglob("*")) if p.is_file()}


def test_other_budget_is_refused_then_redone_on_request(finished, tmp_path: Path) -> None:
    wd = copy_of(finished, tmp_path)
    before = snapshot(wd)
    with pytest.raises(WorkdirError, match="--redo solve"):
        compress(small_model(), small_data(), wd, settings("0.9x"))
    assert snapshot(wd) == before
    result = compress(small_model(), small_data(), wd, settings("0.9x"), redo="solve")
    assert result.ran == ["solve", "finetune", "merge", "evaluate"]
    assert (wd / "previous" / "1" / "plan.json").read_bytes() == before["plan.json"]
    assert (wd / "latency.csv").read_bytes() == before["latency.csv"]


def test_budget_below_the_minimum_changes_nothing(finished, tmp_path: Path) -> None:
    wd = copy_of(finished, tmp_path)
    before = snapshot(wd)
    with pytest.raises(BudgetError, match=r"raise --budget to at least"):
        compress(small_model(), small_data(), wd, settings("0.01x"), redo="solve")
    assert snapshot(wd) == before  # --redo moves nothing when the run is refused


def test_redo_of_a_later_stage_keeps_earlier_settings_checked(finished, tmp_path: Path) -> None:
    wd = copy_of(finished, tmp_path)
    before = snapshot(wd)
    other = replace(settings(), batch=4)  # changes the latency stage, which --redo does not name
    with pytest.raises(WorkdirError, match="--redo latency"):
        compress(small_model(), small_data(), wd, other, redo="importance")
    assert snapshot(wd) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch": 0}, "batch must be ≥ 1"),
        ({"workers": 0}, "workers must be ≥ 1"),
        ({"device": "cpuu"}, "'cpuu' is not a device: use cpu, cuda or cuda:N"),
        ({"mode": "fast"}, "mode must be"),
    ],
)
def test_bad_settings_are_refused_up_front(change: dict, message: str) -> None:
    with pytest.raises(DepthCompressError, match=message):
        replace(settings(), **change)


def test_bad_backend_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(DepthCompressError, match="nope"):
        compress(small_model(), small_data(), tmp_path / "wd", replace(settings(), backend="nope"))
    assert not (tmp_path / "wd").exists()


def test_input_that_does_not_fit_the_model(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 28, 28, generator=gen), torch.arange(40) % 10
    data = split_dataset(TensorDataset(x, y), holdout=8, seed=0)
    with pytest.raises(DepthCompressError, match=r"fails on an input of shape \(1, 3, 28, 28\)"):
        compress(small_model(), data, tmp_path / "wd", settings())
    assert not (tmp_path / "wd").exists()


def test_workdir_of_another_model_is_refused(finished, tmp_path: Path) -> None:
    wd = copy_of(finished, tmp_path)
    before = snapshot(wd)
    with pytest.raises(WorkdirError, match="different model"):
        compress(small_model(seed=1), small_data(), wd, settings())
    assert snapshot(wd) == before


def test_wrong_number_of_classes(tmp_path: Path) -> None:
    with pytest.raises(DepthCompressError, match="10 class scores but the data has 6 classes"):
        compress(small_model(), small_data(classes=6), tmp_path / "wd", settings())
    assert not (tmp_path / "wd").exists()


def timed_by_span(monkeypatch, cost) -> None:
    """Latency tables priced by ``cost(i, j)`` instead of a clock: fast and exact."""
    from depthcompress import backends, latency
    from depthcompress.backends import Timing

    block_module = latency.block_module

    def tagged(chain, i, j, *, seed=0):
        module = block_module(chain, i, j, seed=seed)
        module.span = (i, j)
        return module

    def measure(self, model, input_shape):
        return Timing.from_samples([float(cost(*model.span))])

    monkeypatch.setattr(latency, "block_module", tagged)
    monkeypatch.setattr(backends.OnnxRuntimeBackend, "measure", measure)


def no_importance(monkeypatch) -> None:
    def measure(job, entry):
        raise AssertionError("an unreachable budget must be refused before any importance entry")

    monkeypatch.setattr(importance_module, "measure_entry", measure)


def test_unreachable_budget_is_refused_before_the_importance_stage(tmp_path, monkeypatch) -> None:
    timed_by_span(monkeypatch, lambda i, j: 1.0)  # a merged block costs what one conv does
    no_importance(monkeypatch)
    wd = tmp_path / "wd"
    with pytest.raises(BudgetError, match=r"raise --budget to at least 0\.\d{3}x") as err:
        compress(small_model(), small_data(), wd, settings("0.01x"))
    assert "no importance entry was computed" in str(err.value)
    assert set(json.loads((wd / "stages.json").read_text())) == {"latency", "optimal"}
    assert not (wd / "importance.csv").exists()


def test_budget_or_fastest_takes_the_fastest_plan_and_says_so(tmp_path, monkeypatch) -> None:
    """The demo's setting: a budget below the fastest plan runs the fastest plan, with a note,
    instead of being refused."""
    timed_by_span(monkeypatch, lambda i, j: 1.0)
    notes: list[str] = []
    wd = tmp_path / "wd"
    s = replace(settings("0.01x"), budget_or_fastest=True)
    compress(small_model(), small_data(), wd, s, until="solve", log=notes.append)
    plan = json.loads((wd / "plan.json").read_text())
    assert plan["latency"] == pytest.approx(plan["fastest_latency"])
    assert any("the fastest plan is used instead" in n for n in notes), notes
    assert plan["requested_budget"] < plan["budget"]


def test_no_profitable_merge_says_why(tmp_path, monkeypatch) -> None:
    """The fastest plan is the original network: the message says so and why, rather than
    asking for a budget of at least 1.001x."""
    timed_by_span(monkeypatch, lambda i, j: float(j - i))  # merging gains nothing
    no_importance(monkeypatch)
    with pytest.raises(BudgetError) as err:
        compress(small_model(), small_data(), tmp_path / "a", settings("0.9x"))
    message = " ".join(str(err.value).split())
    assert "nothing can be merged profitably" in message, message
    assert "every merged block is as slow as or slower than its convolutions" in message
    assert "at least" not in message

    timed_by_span(monkeypatch, lambda i, j: 1.0)
    pooled = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    plain = replace(settings("0.9x"), exclude=())
    with pytest.raises(BudgetError) as err:
        compress(pooled, small_data(), tmp_path / "b", plain)
    message = " ".join(str(err.value).split())
    assert "nothing can be merged profitably" in message, message
    assert "every position between them is a hard boundary (position 1: " in message, message
    assert "position 2: " in message and "at least" not in message


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y.relu()
        return self.fc(y.mean((2, 3)))


def test_untraceable_model(tmp_path: Path) -> None:
    with pytest.raises(TraceError):
        compress(Branchy(), small_data(), tmp_path / "wd", settings())
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize(
    ("text", "value", "relative"), [("0.7x", 0.7, True), ("12.5", 12.5, False), (" 2X ", 2, True)]
)
def test_budget_parsing(text: str, value: float, relative: bool) -> None:
    b = Budget.parse(text)
    assert (b.value, b.relative) == (value, relative)
    assert b.resolve(10.0) == pytest.approx(value * 10 if relative else value)


@pytest.mark.parametrize("text", ["fast", "-0.5x", "0", "nanx", ""])
def test_bad_budgets(text: str) -> None:
    with pytest.raises(BudgetError, match="budget"):
        Budget.parse(text)


def test_redo_needs_a_stage_name(finished, tmp_path: Path) -> None:
    wd = copy_of(finished, tmp_path)
    with pytest.raises(WorkdirError, match="--redo must name one of"):
        compress(small_model(), small_data(), wd, settings(), redo="everything")


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_missing_data_dir(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "depthcompress:fashion_mbv2",
            "--data",
            str(tmp_path / "nowhere"),
            "--budget",
            "0.7x",
            "--workdir",
            str(tmp_path / "wd"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "nowhere" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "wd").exists()


def test_cli_bad_budget(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["compress", "depthcompress:fashion_mbv2", "--budget", "soon", "--workdir", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "'soon' is neither a latency in ms" in result.output


@pytest.mark.parametrize("command", ["compress", "demo", "train"])
def test_cli_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DEPTHCOMPRESS_SLOW"), reason="set DEPTHCOMPRESS_SLOW=1")
def test_demo_end_to_end(tmp_path: Path) -> None:
    """The README's demo on the real data, shortened (1 epoch, 5 steps per importance entry)."""
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--workdir",
            str(tmp_path / "demo"),
            "--epochs",
            "1",
            "--importance-steps",
            "5",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "demo" / "evaluation.json").read_text())
    assert evaluation["compressed"]["depth"] < evaluation["original"]["depth"]
    assert evaluation["compressed"]["accuracy"] > 80


# ---------------------------------------------------------------------------------------------
# --until and torchrun

TORCHRUN_SCRIPT = """
import sys
from pathlib import Path

import torch

sys.path.insert(0, {root!r})
from tests.test_pipeline import settings, small_data, small_model
from depthcompress.pipeline import compress

torch.set_num_threads(1)
result = compress(small_model(), small_data(), Path(sys.argv[1]), settings())
print("RESULT", None if result is None else round(result.speedup, 3))
"""


def test_until_then_torchrun_finetunes_on_two_processes(tmp_path: Path, monkeypatch) -> None:
    wd = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(WorkdirError, match=r"only fine-tunes.*--until"):
        compress(small_model(), small_data(), wd, settings())
    assert not (wd / "stages.json").exists()
    monkeypatch.delenv("WORLD_SIZE")

    assert compress(small_model(), small_data(), wd, settings(), until="solve") is None
    assert set(json.loads((wd / "stages.json").read_text())) == {
        "latency",
        "optimal",
        "importance",
        "solve",
    }
    script = tmp_path / "run_compress.py"
    script.write_text(TORCHRUN_SCRIPT.format(root=str(Path(__file__).resolve().parents[1])))
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    proc = subprocess.run(
        [*cmd, str(script), str(wd)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("RESULT None") == 1  # rank 1 stops after fine-tuning
    ckpt = torch.load(wd / "finetune" / "last.pt", weights_only=False)
    assert ckpt["world_size"] == 2
    assert (wd / "merged.onnx").exists() and (wd / "report.md").exists()
    final = compress(small_model(), small_data(), wd, settings())
    assert final.ran == []


def test_merge_mismatch_aborts_before_export(finished, tmp_path: Path, monkeypatch) -> None:
    """A merged network that does not reproduce the fine-tuned one is never saved."""
    wd = copy_of(finished, tmp_path)
    real_merge = pipeline.merge

    def bad_merge(*args, **kwargs):
        net = real_merge(*args, **kwargs)
        conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            conv.weight.mul_(1.5)
        return net

    monkeypatch.setattr(pipeline, "merge", bad_merge)
    with pytest.raises(dc.MergeError, match="merged network"):
        compress(small_model(), small_data(), wd, settings(), redo="merge")
    assert not (wd / "merged.pt").exists() and not (wd / "merged.onnx").exists()
    assert (wd / "previous" / "1" / "merged.onnx").exists()  # the earlier export is kept aside


MODEL_FILE = """
from depthcompress.models import FashionMBV2


def build():
    return FashionMBV2(blocks={blocks!r}, head_channels=32, num_classes=3, in_channels=3)
"""


def test_cli_train_then_compress_an_image_folder(tmp_path: Path, monkeypatch) -> None:
    """The user's path: a model file, an ImageFolder (train/ and val/), depthcompress train,
    then depthcompress compress, twice (the second run resumes and recomputes nothing)."""
    from tests.test_data import make_image_folder

    monkeypatch.setattr(pipeline, "EVALUATE_RULE", TINY_RULE)

    data = tmp_path / "images"
    make_image_folder(data / "train", classes=3, per_class=24, size=16)
    make_image_folder(data / "val", classes=3, per_class=4, size=16)
    (tmp_path / "net.py").write_text(MODEL_FILE.format(blocks=BLOCKS))
    model = f"{tmp_path / 'net.py'}:build"
    weights = tmp_path / "net.pt"
    runner = CliRunner()
    common = ["--data", str(data), "--holdout", "12", "--no-progress"]
    result = runner.invoke(
        app, ["train", model, "-o", str(weights), "--epochs", "1", "--batch-size", "16", *common]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(Path(f"{weights}.json").read_text())
    assert weights.is_file() and record["test_accuracy"] is not None
    args = [
        "compress",
        model,
        "--weights",
        str(weights),
        "--budget",
        "1.2x",  # above any plan: the test must not depend on this machine's timing
        "--workdir",
        str(tmp_path / "wd"),
        "--exclude",
        "stem",
        "--exclude",
        "head",
        "--epochs",
        "1",
        "--finetune-batch-size",
        "16",
        "--importance-steps",
        "1",
        "--threads",
        "1",
        *common,
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    text = " ".join(first.output.split())  # whatever the terminal's width
    assert "original vs compressed" in text and "report: " in text
    assert (tmp_path / "wd" / "report.md").is_file()
    evaluation = json.loads((tmp_path / "wd" / "evaluation.json").read_text())
    assert evaluation["test_set"] == "test"  # the val/ folder
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "none (all finished before)" in " ".join(again.output.split())


def test_cli_train_interrupted_then_resumed_counts_its_epochs(tmp_path, monkeypatch) -> None:
    """Ctrl-C in epoch 2 says where the run stands and exits 130; the resumed run reports the
    one epoch it ran and the two in all."""
    from depthcompress import finetune as finetune_module
    from tests.test_data import make_image_folder

    make_image_folder(tmp_path / "images", classes=3, per_class=8, size=16)
    (tmp_path / "net.py").write_text(MODEL_FILE.format(blocks=BLOCKS))
    weights = tmp_path / "net.pt"
    args = [
        "train",
        f"{tmp_path / 'net.py'}:build",
        "-o",
        str(weights),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--data",
        str(tmp_path / "images"),
        "--holdout",
        "8",
        "--grad-clip",
        "5",
        "--no-progress",
    ]
    epoch, calls = finetune_module.Trainer.train_epoch, []

    def ctrl_c_in_epoch_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return epoch(*a, **kw)

    monkeypatch.setattr(finetune_module.Trainer, "train_epoch", ctrl_c_in_epoch_2)
    runner = CliRunner()
    stopped = runner.invoke(app, args)
    assert stopped.exit_code == 130, stopped.output
    text = " ".join(stopped.output.split())
    last = weights.with_name("net.pt.ckpt") / "last.pt"
    assert f"interrupted in epoch 2 of 2; the last finished epoch (1) is saved in {last}" in text
    assert "run the same command to resume" in text and not weights.exists()
    monkeypatch.setattr(finetune_module.Trainer, "train_epoch", epoch)
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    text = " ".join(resumed.output.split())
    assert "for 1 epoch(s) in" in text and "after resuming from epoch 1 (2 epochs in all)" in text
    record = json.loads(Path(f"{weights}.json").read_text())
    assert (record["epochs_run"], record["resumed_epochs"]) == (1, 1)
    assert record["config"]["grad_clip"] == 5.0


def test_cli_grad_clip_options_reach_the_settings() -> None:
    from depthcompress.cli import _compress_settings

    kw = dict(
        budget="0.5x", backend="onnxruntime", threads=None, batch=1, mode="general",
        max_kernel_size=15, exclude=[], importance_steps=1, importance_lr=0.05, workers=1,
        alpha=1.6, epochs=1, lr=0.02, finetune_batch_size=8, optimizer="sgd", distill=0.0,
        device=None, seed=0, amp=None, loader_workers=None,
    )  # fmt: skip
    s = _compress_settings(**kw, grad_clip=2.0, importance_grad_clip=0.5)
    assert (s.finetune.grad_clip, s.importance.grad_clip) == (2.0, 0.5)
    assert _compress_settings(**kw).importance.grad_clip is None


def test_adopting_an_importance_table_computes_no_row(finished, tmp_path, monkeypatch) -> None:
    source = finished[0] / "importance.csv"

    def no_measure(job, entry):
        raise AssertionError("an adopted complete table must not be recomputed")

    monkeypatch.setattr(importance_module, "measure_entry", no_measure)
    wd = tmp_path / "run"
    compress(
        small_model(), small_data(), wd, settings(), until="importance", importance_from=source
    )
    assert (wd / "importance.csv").read_bytes() == source.read_bytes()


def test_adopting_a_table_of_other_settings_is_refused(finished, tmp_path) -> None:
    other = replace(settings(), importance=FinetuneSettings(steps=3, batch_size=32))
    wd = tmp_path / "run"
    with pytest.raises(dc.TableError, match="--redo importance"):
        compress(
            small_model(),
            small_data(),
            wd,
            other,
            importance_from=finished[0] / "importance.csv",
        )
    assert not (wd / "importance.csv").exists() and not (wd / "importance.csv.json").exists()


def made_elsewhere(tmp_path: Path, s: CompressSettings, model: nn.Module | None = None) -> Path:
    """A latency table made outside compress (as ``depthcompress latency`` makes it) for the
    chain compress traces and the settings ``s``."""
    chain = dc.trace(
        model or small_model(),
        torch.randn(1, 1, 28, 28),
        mode=s.mode,
        max_kernel_size=s.max_kernel_size,
        exclude=s.exclude,
    )
    path = tmp_path / "elsewhere" / "lat.csv"
    runner = get_backend(s.backend, threads=s.threads, protocol=s.protocol)
    build_latency_table(chain, runner, path, batch=s.batch, seed=s.seed)
    return path


def test_adopting_a_latency_table_measures_only_missing_rows(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("depthcompress.latency.DEFAULT_PASSES", 1)  # one measurement per row
    source = made_elsewhere(tmp_path, settings())
    header, *rows = source.read_text().splitlines()
    measured = []
    real = OnnxRuntimeBackend.measure

    def counting(self, model, shape):
        measured.append(shape)
        return real(self, model, shape)

    monkeypatch.setattr(OnnxRuntimeBackend, "measure", counting)
    wd = tmp_path / "run"
    compress(small_model(), small_data(), wd, settings(), until="latency", latency_from=source)
    assert measured == []  # a complete table: nothing measured, the file taken as it is
    assert (wd / "latency.csv").read_bytes() == source.read_bytes()
    assert "latency" in json.loads((wd / "stages.json").read_text())

    partial = tmp_path / "partial" / "lat.csv"
    partial.parent.mkdir()
    partial.write_text("\n".join([header, *rows[:3]]) + "\n")
    shutil.copy(sidecar_path(source), sidecar_path(partial))
    wd = tmp_path / "run2"
    compress(small_model(), small_data(), wd, settings(), until="latency", latency_from=partial)
    assert len(measured) == len(rows) - 3
    assert (wd / "latency.csv").read_text().splitlines()[1:4] == rows[:3]  # adopted rows kept


@pytest.mark.parametrize(
    ("other", "model", "mismatch"),
    [
        ({"batch": 4}, None, r"batch: 2 vs 4"),
        ({"threads": 2}, None, r"backend\.threads: 1 vs 2"),
        ({}, FashionMBV2(blocks=BLOCKS[:2], head_channels=32), r"model\.chain_sha256"),
    ],
)
def test_adopting_a_latency_table_of_another_chain_or_settings_is_refused(
    tmp_path, other, model, mismatch
) -> None:
    source = made_elsewhere(tmp_path, settings(), model)
    before = source.read_bytes()
    wd = tmp_path / "run"
    with pytest.raises(dc.TableError, match=rf"--latency-table.*{mismatch}.*nothing was written"):
        compress(small_model(), small_data(), wd, replace(settings(), **other), latency_from=source)
    assert not wd.exists()  # refused before the work directory is even made
    assert source.read_bytes() == before


def test_an_adopted_latency_table_is_refused_in_an_existing_workdir_too(tmp_path) -> None:
    source = made_elsewhere(tmp_path, replace(settings(), batch=4))
    wd = tmp_path / "run"
    compress(small_model(), small_data(), wd, settings(), until="latency")
    before = {p.name: p.read_bytes() for p in wd.iterdir() if p.is_file()}
    with pytest.raises(dc.TableError, match="batch: 4 vs 2"):
        compress(small_model(), small_data(), wd, settings(), latency_from=source)
    assert {p.name: p.read_bytes() for p in wd.iterdir() if p.is_file()} == before


def test_cli_latency_table_that_does_not_exist(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "depthcompress:fashion_mbv2",
            "--data",
            str(tmp_path / "nowhere"),
            "--budget",
            "0.7x",
            "--workdir",
            str(tmp_path / "wd"),
            "--latency-table",
            str(tmp_path / "missing.csv"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not (tmp_path / "wd").exists()


def test_example_input_of_another_size(tmp_path: Path) -> None:
    with pytest.raises(DepthCompressError, match=r"differs from the data's examples \(1, 28, 28\)"):
        compress(
            small_model(),
            small_data(),
            tmp_path / "wd",
            settings(),
            example_input=torch.randn(1, 1, 32, 32),
        )
    assert not (tmp_path / "wd").exists()


def test_stages_declare_what_they_read_and_keep_todays_names() -> None:
    """The recorded stages keep their names and files (existing work directories resume), and
    every field a stage reads is declared on ``RunContext``."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(pipeline.RunContext)}
    assert pipeline.STAGES == (
        "latency",
        "optimal",
        "importance",
        "solve",
        "finetune",
        "merge",
        "evaluate",
    )
    assert pipeline.STAGE_FILES["solve"] == ("plan.json", "front.csv")
    for stage in pipeline.PIPELINE:
        assert set(stage.reads) <= fields, stage.name


def test_messages_go_to_the_package_log_without_a_callback(tmp_path, caplog) -> None:
    """Without a ``log`` callback the stages' messages go to the ``depthcompress`` logger."""
    with caplog.at_level("INFO", logger="depthcompress"):
        result = compress(small_model(), small_data(), tmp_path / "r", settings(), until="optimal")
    assert result is None
    assert "[1/7] latency table of" in caplog.text
    assert "[2/7] optimal latency table (stage 1)" in caplog.text
