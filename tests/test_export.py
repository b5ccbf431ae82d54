"""Export: a PyTorch file that loads without depthcompress; ONNX that matches PyTorch."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

import depthcompress as dc
from depthcompress.export import ExportError, export_onnx, save_torch
from depthcompress.graph import symbolic_trace
from tests.conftest import randomize_bn
from tests.test_graph import Functional


@pytest.fixture
def merged():
    model = randomize_bn(Functional()).eval()
    x = torch.randn(2, 3, 16, 16)
    chain = dc.trace(model, x)
    plan = dc.Plan.for_activations(chain, {3, 5})
    return dc.merge(dc.linearize(model, chain, plan), chain, plan), x


def test_torch_file_loads_without_depthcompress(tmp_path, merged):
    module, x = merged
    path = save_torch(module, tmp_path / "merged.pt", x)
    torch.save(x, tmp_path / "x.pt")
    torch.save(module(x).detach(), tmp_path / "y.pt")
    code = (
        "import sys; sys.modules['depthcompress'] = None\n"
        "import torch\n"
        f"m = torch.load({str(path)!r}, weights_only=False)\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); y = torch.load({str(tmp_path / 'y.pt')!r})\n"
        "assert (m(x) - y).abs().max() <= 1e-5 * y.abs().max(), 'outputs differ'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_traced_and_merged_modules_pickle_through_public_fx_only(merged):
    """No type annotations (torch 2.11 cannot pickle the string ones ``from __future__ import
    annotations`` gives) and fx's default tracer, so unpickling needs neither us nor user code."""
    module, x = merged
    traced = symbolic_trace(randomize_bn(Functional()).eval())
    for gm in (traced, module):
        assert all(node.type is None for node in gm.graph.nodes)
        data = pickle.dumps(gm)
        assert b"depthcompress.graph" not in data  # our tracer class is not referenced
        again = pickle.loads(data)
        assert torch.equal(again(x), gm(x))


def test_onnx_export_matches_pytorch(tmp_path, merged):
    pytest.importorskip("onnxruntime")
    module, x = merged
    err = export_onnx(module, tmp_path / "merged.onnx", x)
    assert err <= 1e-4
    assert (tmp_path / "merged.onnx").stat().st_size > 0


def test_onnx_mismatch_writes_nothing(tmp_path, merged, monkeypatch):
    pytest.importorskip("onnxruntime")
    module, x = merged
    import depthcompress.backends as backends
    from tests.test_graph import Functional as Other

    other = randomize_bn(Other(), seed=9).eval()
    original = backends.to_onnx
    monkeypatch.setattr(backends, "to_onnx", lambda m, shape: original(other, shape))
    with pytest.raises(ExportError, match="was not written"):
        export_onnx(module, tmp_path / "bad.onnx", x)
    assert not (tmp_path / "bad.onnx").exists()


class Poisoned(torch.nn.Module):
    """A network whose output holds one non-finite value."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        mask = torch.zeros_like(y)
        mask[..., 0, 0] = 1.0
        return torch.where(mask > 0, torch.full_like(y, self.value), y)


def test_torch_file_of_a_network_giving_nan_is_not_written(tmp_path):
    with pytest.raises(ExportError, match="the network produced non-finite values") as info:
        save_torch(Poisoned(float("nan")), tmp_path / "nan.pt", torch.randn(2, 3, 8, 8))
    assert "nan.pt was not written" in str(info.value)
    assert not (tmp_path / "nan.pt").exists()


def test_onnx_export_of_a_network_giving_inf_is_not_written(tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(ExportError, match="PyTorch network produced non-finite values"):
        export_onnx(Poisoned(float("inf")), tmp_path / "inf.onnx", torch.randn(2, 3, 8, 8))
    assert not (tmp_path / "inf.onnx").exists()
