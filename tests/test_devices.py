"""One reading of --device for every command: cpu, cuda and cuda:N resolve to an indexed device,
and a device this machine does not have is a clear DeviceError before anything runs. The GPUs
are simulated (monkeypatched torch.cuda), so these run on any machine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from depthcompress import finetune as finetune_module
from depthcompress import pipeline
from depthcompress.backends import TorchBackend, get_backend
from depthcompress.cli import app
from depthcompress.devices import device_name, resolve_device
from depthcompress.errors import BackendError, DepthCompressError, DeviceError
from tests.test_pipeline import settings, small_data, small_model


@pytest.fixture
def gpus(monkeypatch):
    """Make torch see ``n`` GPUs (0 = none) without touching a driver."""

    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        monkeypatch.delenv("LOCAL_RANK", raising=False)

    return see


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_cpu_is_always_there(gpus, name) -> None:
    gpus(0)
    assert resolve_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", torch.device("cuda"), torch.device("cuda", 0)])
def test_cuda_gets_an_index(gpus, name) -> None:
    gpus(1)
    dev = resolve_device(name)
    assert dev == torch.device("cuda", 0) and dev.index == 0


def test_no_device_means_the_gpu_if_there_is_one(gpus) -> None:
    gpus(0)
    assert resolve_device(None) == torch.device("cpu")
    gpus(2)
    assert resolve_device(None) == torch.device("cuda", 0)


def test_cuda_under_torchrun_is_the_local_rank_gpu(gpus, monkeypatch) -> None:
    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device(None) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DeviceError, match=r"LOCAL_RANK=2 .* 2 CUDA devices .*--nproc_per_node"):
        resolve_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(DeviceError, match="LOCAL_RANK='one' is not an integer"):
        resolve_device("cuda")


def test_cuda_without_a_gpu_says_what_to_do(gpus, monkeypatch) -> None:
    gpus(0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert "no CUDA device is visible to torch" in message
    assert "CPU-only build" in message
    assert message.endswith("use --device cpu, or install a CUDA build of torch")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match=r"CUDA 12\.8, CUDA_VISIBLE_DEVICES=''"):
        resolve_device("cuda:0")


def test_a_gpu_index_that_does_not_exist(gpus, monkeypatch) -> None:
    gpus(1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda:3")
    assert str(info.value).startswith(
        "cuda:3 does not exist: this machine has 1 CUDA device (cuda:0)"
    )
    gpus(4)
    with pytest.raises(DeviceError, match=r"has 4 CUDA devices \(cuda:0 to cuda:3\)"):
        resolve_device(torch.device("cuda", 7))


@pytest.mark.parametrize("name", ["gpu0", "cuda:x", "", "cuda:-1", "mps", "meta", 3])
def test_garbage_is_refused(gpus, name) -> None:
    gpus(1)
    with pytest.raises(DeviceError, match=r"use cpu, cuda or cuda:N"):
        resolve_device(name)


def test_a_device_error_is_a_backend_error() -> None:
    assert issubclass(DeviceError, BackendError) and issubclass(DeviceError, DepthCompressError)


def test_device_names_for_records(gpus) -> None:
    gpus(2)
    assert device_name(torch.device("cpu")) == "cpu"
    assert device_name(torch.device("cuda", 1)) == "cuda:1 (Fake GPU)"
    assert device_name(torch.device("cuda", 1), index=False) == "cuda (Fake GPU)"


def test_the_torch_backend_times_on_the_resolved_device(gpus) -> None:
    gpus(1)
    assert TorchBackend(device="cuda").device == "cuda:0"
    assert TorchBackend(device="cuda").info()["device"] == "cuda:0 (Fake GPU)"
    assert get_backend("torch").device == "cpu"  # the torch backend's own default
    with pytest.raises(DeviceError, match="cuda:3 does not exist"):
        get_backend("torch", device="cuda:3")
    with pytest.raises(DeviceError, match="'gpu0' is not a device"):
        get_backend("torch", device="gpu0")


def test_finetune_world_accepts_plain_cuda(gpus, monkeypatch) -> None:
    """``torch.cuda.set_device(torch.device("cuda"))`` used to raise 'Expected a torch.device
    with a specified index'; the world now always gets an indexed device."""
    gpus(1)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    world = finetune_module._world("cuda", distributed=False)
    assert world.device == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)]
    with pytest.raises(DeviceError, match="cuda:3 does not exist"):
        finetune_module._world("cuda:3", distributed=False)


# ---------------------------------------------------------------------------------------------
# compress: the device reaches the latency backend; bad devices write nothing


@pytest.mark.parametrize(
    ("backend", "device", "timing"),
    [
        ("torch", "cuda:0", "cuda:0"),
        ("torch", None, None),
        ("onnxruntime", "cuda", None),
        ("ort", "cuda:0", None),
        ("openvino", "cuda", None),
        ("tensorrt", None, None),
        ("trt", "cuda:0", "cuda:0"),
    ],
)
def test_which_device_the_latency_backend_gets(gpus, backend, device, timing) -> None:
    gpus(1)
    assert replace(settings(), backend=backend, device=device).timing_device() == timing


def test_compress_builds_its_backend_on_the_named_device(gpus, monkeypatch, tmp_path) -> None:
    gpus(1)
    asked = []

    class Stop(Exception):
        pass

    def fake_get_backend(name, **kwargs):
        asked.append((name, kwargs["device"]))
        raise Stop

    monkeypatch.setattr(pipeline, "get_backend", fake_get_backend)
    with pytest.raises(Stop):
        pipeline.compress(
            small_model(),
            small_data(),
            tmp_path / "wd",
            replace(settings(), backend="torch", device="cuda:0"),
        )
    assert asked == [("torch", "cuda:0")]
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize(
    ("backend", "device", "message"),
    [
        ("torch", "cuda:3", "cuda:3 does not exist: this machine has 1 CUDA device"),
        ("onnxruntime", "gpu0", "'gpu0' is not a device"),
    ],
)
def test_bad_devices_are_refused_in_the_settings(gpus, backend, device, message) -> None:
    gpus(1)
    with pytest.raises(DepthCompressError, match=message):
        replace(settings(), backend=backend, device=device)


def test_tensorrt_on_the_cpu_is_refused_before_anything_is_written(gpus, tmp_path) -> None:
    gpus(1)
    with pytest.raises(BackendError, match="tensorrt backend times on a CUDA GPU, not on the CPU"):
        pipeline.compress(
            small_model(),
            small_data(),
            tmp_path / "wd",
            replace(settings(), backend="tensorrt", device="cpu"),
        )
    assert not (tmp_path / "wd").exists()


def test_a_cpu_backend_with_a_gpu_device_times_on_the_cpu_and_says_so(gpus, tmp_path) -> None:
    """onnxruntime + --device cuda: fine-tuning would run on the GPU, the table is timed on the
    CPU, the run says so, and the latency stage records the CPU."""
    import json

    gpus(1)
    said: list[str] = []
    wd = tmp_path / "wd"
    s = replace(settings(), device="cuda")
    pipeline.compress(small_model(), small_data(), wd, s, until="latency", log=said.append)
    assert any(
        "fine-tuning runs on cuda:0, latency is timed on the CPU by onnxruntime" in m for m in said
    )
    assert json.loads((wd / "stages.json").read_text())["latency"]["settings"]["device"] == "cpu"


def test_the_latency_stage_records_its_timing_device(tmp_path: Path) -> None:
    """The latency stage's settings name the device it timed on, so a run on another device is
    refused like any other changed setting."""
    import json

    wd = tmp_path / "wd"
    pipeline.compress(small_model(), small_data(), wd, settings(), until="latency")
    stages = json.loads((wd / "stages.json").read_text())
    assert stages["latency"]["settings"]["device"] == "cpu"
    stages["latency"]["settings"]["device"] = "cuda (Fake GPU)"  # as if timed on a GPU before
    (wd / "stages.json").write_text(json.dumps(stages))
    before = (wd / "latency.csv").read_bytes()
    with pytest.raises(pipeline.WorkdirError, match=r"device: 'cuda \(Fake GPU\)' → 'cpu'"):
        pipeline.compress(small_model(), small_data(), wd, settings())
    assert (wd / "latency.csv").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# the CLI


@pytest.mark.parametrize(
    "args",
    [
        ["latency", "torchvision:resnet18", "-o", "{tmp}/lat.csv", "--backend", "torch",
         "--device", "cuda:3"],
        ["compress", "depthcompress:fashion_mbv2", "--budget", "0.6x", "--workdir", "{tmp}/wd",
         "--device", "cuda:3"],
        ["importance", "depthcompress:fashion_mbv2", "-o", "{tmp}/imp.csv", "--device", "cuda:3"],
        ["train", "depthcompress:fashion_mbv2", "-o", "{tmp}/w.pt", "--device", "cuda:3"],
        ["demo", "--workdir", "{tmp}/demo", "--device", "cuda:3"],
    ],
)  # fmt: skip
def test_every_command_refuses_a_missing_gpu_in_one_line(gpus, tmp_path, args) -> None:
    gpus(1)
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert "error: cuda:3 does not exist: this machine has 1 CUDA device (cuda:0)" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
