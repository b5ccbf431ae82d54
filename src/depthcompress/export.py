"""Export a merged network: a PyTorch file that loads without depthcompress, and ONNX checked
against PyTorch with ONNX Runtime. Nothing is written if a check fails."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import ExportError
from .files import atomic_open
from .merging import check_close


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and fsynced (``files.atomic_open``)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def save_torch(module: nn.Module, path: str | Path, example_input: torch.Tensor) -> Path:
    """Pickle the whole module (``torch.load(path, weights_only=False)`` needs no depthcompress)
    after checking that the reloaded copy gives the same, finite outputs."""
    import io

    path = Path(path)
    module = module.eval()
    buf = io.BytesIO()
    torch.save(module, buf)
    reloaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    with torch.no_grad():
        check_close(
            module(example_input),
            reloaded(example_input),
            "reloaded file",
            "network",
            error=ExportError,
            outcome=f"{path} was not written",
        )
    _write(path, buf.getvalue())
    return path


def export_onnx(
    module: nn.Module, path: str | Path, example_input: torch.Tensor, *, tol: float = 1e-4
) -> float:
    """Write ``module`` as ONNX (fixed input shape) after checking ONNX Runtime's output against
    PyTorch's on ``example_input`` (both finite); returns the error relative to the output scale."""
    from .backends import to_onnx

    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "checking the ONNX export needs onnxruntime: pip install 'depthcompress[ort]'"
        ) from None
    path = Path(path)
    module = module.eval()
    data = to_onnx(module, tuple(example_input.shape))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = example_input.detach().cpu().float()
    (actual,) = session.run(None, {name: x.numpy()})[:1]
    with torch.no_grad():
        expected = module.cpu()(x)
    err = check_close(
        expected,
        torch.from_numpy(actual),
        "ONNX Runtime export",
        "PyTorch network",
        tol,
        error=ExportError,
        outcome=f"{path} was not written",
    )
    _write(path, data)
    return err
