"""Paired speed-up: the statistics and the stop rule on synthetic timings, and the command's
inputs and refusals on tiny networks (no assertion on a real timing)."""

from __future__ import annotations

import json
import math
from itertools import count
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from depthcompress.backends import Backend, Runner, Timing
from depthcompress.cli import app
from depthcompress.errors import BackendError, DepthCompressError
from depthcompress.speedup import (
    Rule,
    SpeedupResult,
    paired_rounds,
    paired_speedup,
    ratio_stats,
)

runner = CliRunner()

FACTORY = """
import torch.nn as nn

def conv():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))

def conv3():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))

def wider_out():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1))
"""


def test_ratio_stats_median_interval_and_quartiles():
    ratios = list(np.random.default_rng(1).normal(1.5, 0.05, size=41))
    stats = ratio_stats(ratios, seed=3)
    assert stats.median == pytest.approx(float(np.median(ratios)))
    assert stats.low <= stats.median <= stats.high
    assert stats.q1 == pytest.approx(float(np.percentile(ratios, 25)))
    assert stats.q3 == pytest.approx(float(np.percentile(ratios, 75)))
    assert stats.rounds == 41
    assert 0 < stats.half_width < 0.05
    assert ratio_stats(ratios, seed=3) == stats  # seeded


def test_ratio_stats_refuses_too_few_or_bad_ratios():
    for bad in ([1.0], [1.0, math.nan], [1.0, -2.0]):
        with pytest.raises(DepthCompressError):
            ratio_stats(bad)


def sequence(values: list[float]):
    """A fake per-run timer returning ``values`` in a cycle."""
    it = iter(values * 10_000)
    return lambda: next(it)


def test_constant_ratio_stops_at_min_rounds_with_zero_width():
    rule = Rule(min_rounds=6, warmup=0, block=3)
    rounds = paired_rounds(sequence([2.0]), sequence([1.0]), rule, clock=count().__next__)
    assert rounds.stats.rounds == 6
    assert rounds.stats.median == 2.0
    assert rounds.stats.half_width == 0.0
    assert rounds.ratios == (2.0,) * 6


def test_rounds_alternate_order_and_use_the_block_median():
    calls: list[str] = []

    def timer(name: str, values: list[float]):
        it = iter(values * 100)

        def run() -> float:
            calls.append(name)
            return next(it)

        return run

    rule = Rule(min_rounds=2, max_rounds=2, warmup=1, block=3)
    rounds = paired_rounds(timer("a", [9.0, 3.0, 4.0]), timer("b", [1.0, 2.0, 6.0]), rule)
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert rounds.times_a[0] == 4.0  # median of 3, 4, 9 after the warm-up took 9


def test_noisy_timings_stop_at_max_time_and_do_not_converge():
    rng = np.random.default_rng(0)
    noisy = lambda: float(rng.uniform(0.5, 2.0))  # noqa: E731
    clock = iter(range(0, 10_000, 10)).__next__  # every reading 10 s later
    rule = Rule(min_rounds=5, max_time=60.0, target=0.01, warmup=0, block=1)
    rounds = paired_rounds(noisy, noisy, rule, clock=clock)
    assert rounds.stats.rounds < 20
    assert rounds.stats.half_width > rule.target


def test_rule_refuses_bad_settings():
    with pytest.raises(DepthCompressError):
        Rule(min_rounds=1)
    with pytest.raises(DepthCompressError):
        Rule(min_rounds=20, max_rounds=10)


class FakeBackend(Backend):
    """Runners whose timer returns synthetic milliseconds: ``model`` is a list of them."""

    name = "fake"

    def measure(self, model: Any, input_shape: tuple[int, ...]) -> Timing:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "threads": self.threads}

    def prepare(self, model: Any, input_shape: tuple[int, ...]) -> Runner:
        if model == "broken":
            raise BackendError("cannot run\n  on this input")
        source = sequence(model)
        return Runner(lambda: None, lambda call: source(), (input_shape[0], 10))


def test_paired_speedup_result_fields_and_noisy_flag():
    backend = FakeBackend(threads=1)
    good = paired_speedup([3.0], [1.5], backend, (4, 1, 8, 8), Rule(min_rounds=4))
    assert isinstance(good, SpeedupResult)
    assert good.speedup == 2.0 and good.converged and good.rounds == 4
    assert good.latency_a_ms == 3.0 and good.latency_b_ms == 1.5
    assert good.batch == 4 and good.threads == 1 and good.output_shape == (4, 10)
    assert json.loads(json.dumps(good.to_dict()))["input_shape"] == [4, 1, 8, 8]
    rule = Rule(min_rounds=4, max_rounds=12, block=1, warmup=0, target=0.001)
    noisy = paired_speedup([1.0, 3.0, 1.5], [2.0, 1.0], backend, (1, 1, 8, 8), rule)
    assert not noisy.converged
    assert "too noisy" in noisy.message and noisy.rounds == 12


def test_paired_speedup_names_the_network_that_does_not_run():
    backend = FakeBackend(threads=1)
    with pytest.raises(BackendError, match=r"different inputs: A runs on .* but B does not"):
        paired_speedup([1.0], "broken", backend, (1, 1, 8, 8))
    with pytest.raises(BackendError, match=r"^A: cannot run on this input$"):
        paired_speedup("broken", [1.0], backend, (1, 1, 8, 8))


@pytest.fixture
def nets(tmp_path):
    (tmp_path / "nets.py").write_text(FACTORY)
    return tmp_path


def speedup(*args: str):
    return runner.invoke(app, ["speedup", *args])


FAST = ["--threads", "1", "--rounds", "3", "--max-time", "1", "--accept-noisy"]


def test_command_conv_net_against_itself_and_its_merged_file(nets):
    torch.manual_seed(0)
    spec = f"{nets}/nets.py:conv"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1)), nets / "merged.pt")
    out = nets / "result.json"
    args = [spec, str(nets / "merged.pt"), "--input-shape", "1,1,12,12", "--batch", "2"]
    result = speedup(*args, *FAST, "--json", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("speedup", "low", "high", "q1", "q3", "rounds", "converged", "message"):
        assert key in data
    for key in ("latency_a_ms", "latency_b_ms", "threads", "batch", "backend", "machine"):
        assert key in data
    assert math.isfinite(data["speedup"]) and data["speedup"] > 0
    assert data["rounds"] >= 3 and data["threads"] == 1 and data["batch"] == 2
    assert data["input_shape"] == [2, 1, 12, 12] and data["machine"]["cpu"]


def test_command_refuses_different_inputs_outputs_and_bad_files(nets):
    spec = f"{nets}/nets.py:conv"
    shape = ["--input-shape", "1,1,12,12"]
    result = speedup(spec, f"{nets}/nets.py:conv3", *shape, *FAST)
    assert result.exit_code == 2 and "different inputs" in result.output
    result = speedup(spec, f"{nets}/nets.py:wider_out", *shape, *FAST)
    assert result.exit_code == 2 and "outputs of different shapes" in result.output
    (nets / "garbage.onnx").write_bytes(b"not an onnx model")
    result = speedup(str(nets / "garbage.onnx"), spec, *FAST)
    assert result.exit_code == 2
    assert "garbage.onnx" in result.output and "not a loadable ONNX file" in result.output
    result = speedup(str(nets / "missing.onnx"), spec, *FAST)
    assert result.exit_code == 2 and "missing.onnx does not exist" in result.output
    torch.save({"w": torch.zeros(1)}, nets / "state.pt")
    result = speedup(str(nets / "state.pt"), spec, *shape, *FAST)
    assert result.exit_code == 2 and "not a whole network" in result.output


def test_command_exits_with_a_message_when_the_interval_is_not_reached(nets):
    spec = f"{nets}/nets.py:conv"
    args = [spec, spec, "--input-shape", "1,1,12,12", "--threads", "1", "--rounds", "3"]
    result = speedup(*args, "--max-time", "0.2", "--target", "1e-12")
    assert result.exit_code == 3
    assert "too noisy" in result.output and "--accept-noisy" in result.output


def test_ort_above_one_thread_pairs_in_a_child_process_on_one_shared_pool(tmp_path):
    """Two live 2-thread sessions with pools of their own made paired timings bimodal; the pair
    runs in a child process whose sessions share ORT's global pool, and errors still name the
    network."""
    from depthcompress.backends import OnnxRuntimeBackend, to_onnx

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    shape = (2, 3, 8, 8)
    backend = OnnxRuntimeBackend(threads=2)
    assert backend.pairs_in_child and not OnnxRuntimeBackend(threads=1).pairs_in_child
    rule = Rule(min_rounds=3, max_rounds=3, warmup=1, block=1)
    res = paired_speedup(net, to_onnx(net, shape), backend, shape, rule, names=("a", "b"))
    assert res.rounds == 3 and res.threads == 2 and res.output_shape == (2, 4, 8, 8)
    assert res.backend["thread_pool"] == "shared" and res.backend["threads"] == 2
    assert all(r > 0 for r in res.ratios)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(BackendError, match=r"^b: ONNX Runtime cannot load"):
        paired_speedup(net, bad, backend, shape, rule, names=("a", "b"))
    with pytest.raises(BackendError, match=r"^b: ONNX Runtime cannot load"):  # one thread too
        paired_speedup(net, bad, OnnxRuntimeBackend(threads=1), shape, rule, names=("a", "b"))
    with pytest.raises(BackendError, match=r"^b: ONNX file .*missing\.onnx does not exist"):
        paired_speedup(net, tmp_path / "missing.onnx", backend, shape, rule, names=("a", "b"))
