"""Latency backends and tables: CSV layout, resume after interruption, refusal of mismatched
settings, clear errors for missing backends. Deterministic checks only (no timing thresholds)."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import types

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import depthcompress as dc
from depthcompress.backends import (
    BackendError,
    Protocol,
    Timing,
    get_backend,
    time_calls,
    to_onnx,
)
from depthcompress.cli import app
from depthcompress.errors import TableError
from depthcompress.latency import (
    Robust,
    block_input_shape,
    block_module,
    build_latency_table,
    check_meta,
    combine_passes,
    noisy_warning,
    passes_path,
    plan_latency,
    read_latency_table,
    relative_spread,
    sidecar_path,
    table_meta,
)
from depthcompress.progress import Step
from depthcompress.tables import LATENCY_COLUMNS as COLUMNS

FAST = Protocol(warmup=1, reps=3, min_reps=1, max_time=0.05)
NO_EXTRA = Robust(max_extra=0)  # no re-measured rows: deterministic counts of measurements
SHAPE = (1, 3, 16, 16)
INSTALLED = [
    name
    for name, module in (
        ("onnxruntime", "onnxruntime"),
        ("torch", "torch"),
        ("openvino", "openvino"),
    )
    if importlib.util.find_spec(module) is not None
]

FACTORY = """
import torch.nn as nn

def tiny():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(),
        nn.Conv2d(8, 16, 1), nn.ReLU6(),
        nn.Conv2d(16, 8, 3, stride=2, padding=1),
    )
"""


def tiny() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU6(),
        nn.Conv2d(8, 16, 1),
        nn.ReLU6(),
        nn.Conv2d(16, 8, 3, stride=2, padding=1),
    )


@pytest.fixture(scope="module")
def chain() -> dc.ConvChain:
    return dc.trace(tiny(), torch.randn(SHAPE))


def csv_rows(path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def check_complete(path, chain: dc.ConvChain) -> None:
    """Reference layout: header, one row per block, sorted by id, id = index in chain.blocks."""
    lines = csv_rows(path)
    assert tuple(lines[0]) == COLUMNS
    body = lines[1:]
    assert [int(r[0]) for r in body] == list(range(len(chain.blocks)))
    assert [(int(r[1]), int(r[2])) for r in body] == list(chain.blocks)
    assert all(float(r[3]) > 0 and float(r[4]) >= 0 for r in body)


@pytest.mark.parametrize("name", INSTALLED)
def test_every_installed_backend_builds_a_table_in_the_reference_layout(name, chain, tmp_path):
    backend = get_backend(name, threads=1, protocol=FAST)
    path = tmp_path / "lat.csv"
    result = build_latency_table(chain, backend, path, model_name="tiny")
    assert result.complete and result.measured == len(chain.blocks) == 10
    check_complete(path, chain)
    meta, rows = read_latency_table(path)
    assert meta["backend"]["name"] == name and meta["backend"]["threads"] == 1
    assert meta["batch"] == 1 and meta["protocol"] == FAST.to_dict()
    assert meta["machine"]["cores"] == os.cpu_count()
    assert [(r.st, r.end) for r in rows] == list(chain.blocks)
    singles = [(k - 1, k) for k in range(1, chain.num_positions + 1)]
    assert plan_latency(rows, singles) > 0


def test_build_reports_steps_and_draws_nothing(chain, tmp_path, capsys):
    steps: list[Step] = []
    build_latency_table(
        chain,
        get_backend("torch", protocol=FAST),
        tmp_path / "t.csv",
        passes=1,
        progress=steps.append,
    )
    n = len(chain.blocks)
    assert steps[0] == Step("t.csv", 0, n) and steps[-1].done == n
    assert {s.task for s in steps} == {"t.csv"} and all(s.total == n for s in steps)
    assert [s.detail for s in steps[1:3]] == ["(0,1) 3x3"] * 2
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("name", INSTALLED)
def test_every_installed_backend_times_a_whole_network(name):
    timing = get_backend(name, threads=1, protocol=FAST).measure(tiny().eval(), SHAPE)
    assert isinstance(timing, Timing)
    assert timing.median > 0 and timing.stdev >= 0 and 1 <= timing.reps <= 3


def test_block_module_is_the_merged_conv_plus_the_chains_activation(chain):
    for i, j in chain.blocks:
        g = chain.geometry(i, j)
        conv, act = block_module(chain, i, j)
        assert isinstance(act, nn.ReLU6)
        assert (conv.in_channels, conv.out_channels) == (g.in_channels, g.out_channels)
        assert (conv.kernel_size, conv.stride, conv.padding) == (g.kernel, g.stride, g.padding)
        assert conv.groups == g.groups
        shape = block_input_shape(chain, i, j, batch=4)
        assert shape == (4, *g.in_shape[1:])
        assert tuple(block_module(chain, i, j)(torch.randn(shape)).shape[1:]) == g.out_shape[1:]
    a = block_module(chain, 0, 2, seed=3)[0].weight
    assert torch.equal(a, block_module(chain, 0, 2, seed=3)[0].weight)


def test_interrupted_table_resumes_without_duplicate_or_lost_rows(chain, tmp_path):
    backend = get_backend("torch", threads=1, protocol=FAST)
    path = tmp_path / "lat.csv"
    seen = []

    def stop_after_four(row, timing):
        seen.append(row)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_latency_table(chain, backend, path, on_row=stop_after_four)
    lines = csv_rows(path)
    assert len(lines) == 1 + 4 and sidecar_path(path).is_file()
    with path.open("a") as fh:  # a kill in the middle of writing a row
        fh.write("7,2,3,0.01")
    result = build_latency_table(chain, backend, path)
    assert (result.skipped, result.measured) == (4, len(chain.blocks) - 4)
    check_complete(path, chain)
    kept = {tuple(r) for r in lines[1:]}
    assert kept <= {tuple(r) for r in csv_rows(path)[1:]}  # earlier rows kept as they were


def test_killed_cli_run_resumes(tmp_path):
    factory = tmp_path / "m.py"
    factory.write_text(FACTORY)
    path = tmp_path / "lat.csv"
    args = ["latency", f"{factory}:tiny", "-o", str(path), "--input-shape", "1,3,16,16"]
    slow = ["--warmup", "0", "--reps", "3000", "--min-reps", "3000", "--threads", "1"]
    code = "import sys; from depthcompress.cli import app; sys.argv = ['dc', *sys.argv[1:]]; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, *slow, "--no-progress"])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and len(path.read_text().splitlines()) >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = csv_rows(path)
    assert 3 <= len(before) < 11  # killed partway
    result = CliRunner().invoke(app, [*args, *slow, "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = csv_rows(path)
    assert len(lines) == 11
    assert [int(r[0]) for r in lines[1:]] == list(range(10))
    assert {tuple(r) for r in before[1:]} <= {tuple(r) for r in lines[1:]}


def test_passes_resume_mid_pass_and_combine_into_one_row_per_block(chain, tmp_path):
    backend = get_backend("torch", threads=1, protocol=FAST)
    path = tmp_path / "lat.csv"
    count = []

    def stop(row, timing):
        count.append(row)
        if len(count) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_latency_table(chain, backend, path, passes=2, robust=NO_EXTRA, on_row=stop)
    assert len(csv_rows(path)) == 1 + 2  # rows appear once both passes of a block are done
    split = passes_path(path)
    assert len(csv_rows(split)) == 1 + len(chain.blocks) + 2
    with pytest.raises(TableError, match="passes: 2 vs 3"):
        build_latency_table(chain, backend, path, passes=3)
    result = build_latency_table(chain, backend, path, passes=2, robust=NO_EXTRA)
    assert (result.skipped, result.measured) == (2, len(chain.blocks) - 2)
    check_complete(path, chain)
    assert not split.exists()


def test_combine_passes_and_statistics():
    t, sd = combine_passes([(1.0, 0.0), (3.0, 0.0), (2.0, 0.0)])
    assert t == 2.0 and sd == pytest.approx((2 / 3) ** 0.5)
    timing = Timing.from_samples([float(v) for v in range(1, 102)])
    assert (timing.median, timing.statistic("min"), timing.statistic("p10")) == (51.0, 1.0, 11.0)
    assert timing.statistic("mean") == timing.mean == 51.0
    with pytest.raises(BackendError, match="unknown statistic"):
        Protocol(statistic="p99")


def test_the_table_stores_the_protocols_statistic(chain, tmp_path):
    protocol = Protocol(warmup=0, reps=5, min_reps=5, max_time=1, statistic="min")
    seen = {}
    build_latency_table(
        chain,
        get_backend("torch", threads=1, protocol=protocol),
        tmp_path / "lat.csv",
        passes=1,
        on_row=lambda row, timing: seen.__setitem__(row.id, (row, timing)),
    )
    assert all(row.time == min(timing.samples) for row, timing in seen.values())
    assert read_latency_table(tmp_path / "lat.csv")[0]["units"]["time"].startswith("ms, min")


def test_mismatched_settings_are_refused_and_force_starts_over(chain, tmp_path):
    path = tmp_path / "lat.csv"
    build_latency_table(chain, get_backend("torch", threads=1, protocol=FAST), path)
    with pytest.raises(TableError, match=r"batch: 1 vs 2.*-o.*--force"):
        build_latency_table(chain, get_backend("torch", threads=1, protocol=FAST), path, batch=2)
    with pytest.raises(TableError, match=r"backend\.threads: 1 vs 2"):
        build_latency_table(chain, get_backend("torch", threads=2, protocol=FAST), path)
    other = dc.trace(tiny(), torch.randn(1, 3, 32, 32))
    with pytest.raises(TableError, match=r"model\.chain_sha256"):
        build_latency_table(other, get_backend("torch", threads=1, protocol=FAST), path)
    result = build_latency_table(
        chain,
        get_backend("torch", threads=1, protocol=FAST),
        path,
        batch=2,
        force=True,
    )
    assert result.measured == len(chain.blocks) and result.meta["batch"] == 2
    assert json.loads(sidecar_path(path).read_text())["batch"] == 2


def test_a_table_without_sidecar_or_with_foreign_rows_is_refused(chain, tmp_path):
    path = tmp_path / "lat.csv"
    path.write_text("id,st,end,time,stdev\n")
    with pytest.raises(TableError, match="no sidecar"):
        build_latency_table(chain, get_backend("torch", protocol=FAST), path)
    backend = get_backend("torch", threads=1, protocol=FAST)
    build_latency_table(chain, backend, path, force=True)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "0,1,3,0.1,0.0"]) + "\n")
    with pytest.raises(TableError, match="another model"):
        build_latency_table(chain, backend, path)


@pytest.mark.parametrize(
    ("name", "module", "extra"),
    [("onnxruntime", "onnxruntime", "ort"), ("openvino", "openvino", "openvino")],
)
def test_missing_backend_names_the_extra(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(BackendError, match=rf"pip install 'depthcompress\[{extra}\]'"):
        get_backend(name)


def test_missing_onnx_exporter_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendError, match=r"depthcompress\[onnx\]"):
        to_onnx(tiny().eval(), SHAPE)
    if "onnxruntime" in INSTALLED:
        with pytest.raises(BackendError, match=r"depthcompress\[onnx\]"):
            get_backend("onnxruntime")


def test_tensorrt_needs_the_package_and_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match=r"depthcompress\[tensorrt\]"):
        get_backend("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="no CUDA device is visible to torch"):
        get_backend("tensorrt", fp16=True)
    with pytest.raises(BackendError, match="no CUDA device is visible to torch"):
        get_backend("torch", device="cuda")
    with pytest.raises(BackendError, match="tensorrt backend times on a CUDA GPU, not on the CPU"):
        get_backend("tensorrt", device="cpu")


def test_bad_backend_arguments_are_clear():
    with pytest.raises(BackendError, match="unknown backend"):
        get_backend("tflite")
    with pytest.raises(BackendError, match="times on the CPU; --device cuda is for the torch"):
        get_backend("onnxruntime", device="cuda")
    with pytest.raises(BackendError, match="invalid timing protocol"):
        Protocol(reps=0)
    with pytest.raises(BackendError, match="torch modules, not ONNX"):
        get_backend("torch").measure(b"onnx", SHAPE)


def test_protocol_bounds_the_number_of_timed_runs():
    calls = []
    timing = time_calls(lambda: calls.append(1), Protocol(warmup=2, reps=5, max_time=10))
    assert timing.reps == 5 and len(calls) == 7
    timing = time_calls(
        lambda: time.sleep(0.002), Protocol(warmup=0, reps=1000, min_reps=3, max_time=0.001)
    )
    assert timing.reps == 3 and timing.median >= 2.0


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_cli_table_and_whole_network_on_onnx(tmp_path):
    factory = tmp_path / "m.py"
    factory.write_text(FACTORY)
    path = tmp_path / "lat.csv"
    fast = ["--warmup", "1", "--reps", "3", "--min-reps", "1", "--max-time", "0.05"]
    common = [f"{factory}:tiny", "--input-shape", "1,3,16,16", *fast, "--no-progress"]
    runner = CliRunner()
    result = runner.invoke(app, ["latency", *common, "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert "10 of 10 blocks" in result.output
    assert tuple(csv_rows(path)[0]) == COLUMNS and len(csv_rows(path)) == 11
    again = runner.invoke(app, ["latency", *common, "-o", str(path)])
    assert again.exit_code == 0 and "0 measured" in again.output
    refused = runner.invoke(app, ["latency", *common, "-o", str(path), "--batch", "4"])
    assert refused.exit_code == 2 and "batch: 1 vs 4" in refused.output
    whole = runner.invoke(app, ["latency", "--whole", *common])
    assert whole.exit_code == 0 and "ms median" in whole.output
    onnx = tmp_path / "tiny.onnx"
    onnx.write_bytes(to_onnx(tiny().eval(), SHAPE))
    whole = runner.invoke(app, ["latency", "--whole", str(onnx), "--input-shape", "1,3,16,16"])
    assert whole.exit_code == 0 and "onnxruntime" in whole.output
    missing = runner.invoke(app, ["latency", *common])
    assert missing.exit_code != 0


class FakeBackend(dc.backends.Backend):
    """Records which block each measurement was (by its seeded weights) and returns ``times``
    of that block in order, falling back to 1 ms; no timing at all."""

    name = "fake"

    def __init__(self, chain: dc.ConvChain, times: dict[int, list[float]] | None = None) -> None:
        super().__init__(threads=1, protocol=FAST)
        self.keys = {
            block_module(chain, i, j)[0].weight.sum().item(): k
            for k, (i, j) in enumerate(chain.blocks)
        }
        self.times = {k: list(v) for k, v in (times or {}).items()}
        self.calls: list[int] = []

    def measure(self, model, input_shape):
        k = self.keys[model[0].weight.sum().item()]
        self.calls.append(k)
        queue = self.times.get(k, [])
        value = queue.pop(0) if queue else 1.0
        return Timing.from_samples([value])

    def info(self):
        return {"name": "fake", "version": "0", "device": "cpu", "threads": 1}


@pytest.fixture
def quiet(monkeypatch):
    """A machine with no load, so that the noisy-machine warning depends on the spread only."""
    monkeypatch.setattr("depthcompress.latency.os.getloadavg", lambda: (0.0, 0.0, 0.0))


def test_passes_are_interleaved_over_the_blocks(chain, tmp_path, quiet):
    backend = FakeBackend(chain)
    n = len(chain.blocks)
    result = build_latency_table(chain, backend, tmp_path / "lat.csv", passes=3)
    assert backend.calls == list(range(n)) * 3  # pass 1 over all blocks, then pass 2, pass 3
    assert result.complete and result.pass_times == {k: [1.0] * 3 for k in range(n)}
    check_complete(tmp_path / "lat.csv", chain)


def test_robust_statistic_and_spread():
    values = [(1.0, 0.0), (9.0, 0.0), (2.0, 0.0)]
    assert combine_passes(values)[0] == combine_passes(values, "median")[0] == 2.0
    assert combine_passes(values, "p25")[0] == 1.5 and combine_passes(values, "min")[0] == 1.0
    assert combine_passes([(4.0, 0.5)], "p25") == (4.0, 0.5)
    assert relative_spread([2.0]) == 0.0 and relative_spread([1.0, 1.0, 1.0]) == 0.0
    assert relative_spread([1.0, 1.0, 10.0]) == pytest.approx(4.5)
    assert relative_spread([1.0, 1.0, 10.0, 1.0, 1.0]) == 0.0  # extra passes outvote a wild one
    with pytest.raises(TableError, match="unknown combine"):
        Robust(combine="mean")


def test_an_outlier_row_is_measured_again_until_its_spread_is_small(chain, tmp_path, quiet):
    backend = FakeBackend(chain, {3: [1.0, 20.0, 1.0]})  # one wild pass of block 3
    path = tmp_path / "lat.csv"
    result = build_latency_table(chain, backend, path, passes=3)
    n = len(chain.blocks)
    assert backend.calls[: 3 * n] == list(range(n)) * 3
    assert backend.calls[3 * n :] == [3, 3]  # spread 9.5, then 0.5 after a fourth: a fifth
    assert result.pass_times[3] == [1.0, 20.0, 1.0, 1.0, 1.0]
    assert {r.id: r.time for r in result.rows}[3] == 1.0
    spread = read_latency_table(path)[0]["measurement"]["spread"]
    assert spread["remeasured"] == 1 and spread["remeasured_blocks"] == [list(chain.blocks[3])]
    assert spread["worst"] == 0.0  # the wild pass is outvoted once the row has five
    assert result.warning is None


def test_re_measurement_is_bounded(chain, tmp_path, quiet):
    wild = [1.0, 5.0, 9.0, 13.0, 17.0, 21.0, 25.0, 29.0]
    backend = FakeBackend(chain, {0: wild})
    result = build_latency_table(chain, backend, tmp_path / "lat.csv", passes=3, robust=Robust())
    assert backend.calls.count(0) == 3 + Robust().max_extra
    assert result.rows[0].time == statistics.median(wild[:7])


def test_the_sidecar_records_spread_and_load_and_warns_when_noisy(chain, tmp_path, caplog):
    n = len(chain.blocks)
    noisy = FakeBackend(chain, {k: [1.0, 1.5, 2.0] * 3 for k in range(n)})
    path = tmp_path / "lat.csv"
    with caplog.at_level(logging.WARNING, logger="depthcompress"):
        result = build_latency_table(chain, noisy, path, passes=3)
    m = read_latency_table(path)[0]["measurement"]
    assert set(m) >= {"spread", "load_start", "load_end", "cores", "warning"}
    assert len(m["load_start"]) == len(m["load_end"]) == 3 and m["cores"] == os.cpu_count()
    assert m["spread"]["median"] == pytest.approx(0.5) and m["spread"]["remeasured"] == n
    assert result.warning and "too noisy" in result.warning and "--threads 1" in result.warning
    assert m["warning"] == result.warning and result.warning in caplog.text
    loaded = {**m, "spread": {"median": 0.0}, "load_start": [9.0] * 3, "load_end": [0.5] * 3}
    warning = noisy_warning(loaded, Robust())
    assert warning and f"load average was 9.00 on {os.cpu_count()} cores" in warning
    calm = {**m, "spread": {"median": 0.01}, "load_start": [0.0] * 3, "load_end": [0.0] * 3}
    assert noisy_warning(calm, Robust()) is None


def test_old_sidecars_still_load_and_resume(chain, tmp_path, quiet):
    path = tmp_path / "lat.csv"
    build_latency_table(chain, FakeBackend(chain), path, passes=1)
    meta = json.loads(sidecar_path(path).read_text())
    del meta["robust"], meta["measurement"]  # as written before interleaved passes
    sidecar_path(path).write_text(json.dumps(meta))
    again = build_latency_table(chain, FakeBackend(chain), path)  # complete: kept as it is
    assert again.measured == 0 and again.complete
    check_meta(path, meta, table_meta(chain, FakeBackend(chain), batch=1, seed=0, model_name=""))
    path.write_text("\n".join(path.read_text().splitlines()[:4]) + "\n")  # an unfinished one
    with pytest.raises(TableError, match=r"passes: 1 vs 3.*--force"):
        build_latency_table(chain, FakeBackend(chain), path)
    resumed = build_latency_table(chain, FakeBackend(chain), path, passes=1)
    assert (resumed.skipped, resumed.measured) == (3, len(chain.blocks) - 3)


def test_cli_prints_the_spread_and_the_noisy_warning(tmp_path, monkeypatch):
    monkeypatch.setattr("depthcompress.latency.os.getloadavg", lambda: (64.0, 64.0, 64.0))
    factory = tmp_path / "m.py"
    factory.write_text(FACTORY)
    fast = ["--warmup", "0", "--reps", "1", "--min-reps", "1", "--max-time", "0.01"]
    args = [f"{factory}:tiny", "--input-shape", "1,3,16,16", "--backend", "torch", *fast]
    result = CliRunner().invoke(
        app, ["latency", *args, "--passes", "2", "-o", str(tmp_path / "l.csv"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "pass-to-pass spread" in result.output and "load average" in result.output
    assert "too noisy" in result.output
