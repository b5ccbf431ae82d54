"""The one reading of a device the user names (``cpu``, ``cuda``, ``cuda:N`` or a torch.device),
checked against the GPUs torch can see, so a bad device fails before anything runs or is written.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import DeviceError

if TYPE_CHECKING:
    import torch

HINT = "use cpu, cuda or cuda:N (e.g. --device cuda:0)"


def resolve_device(
    device: str | torch.device | None, *, local_rank: int | None = None, gpus: int | None = None
) -> torch.device:
    """The torch.device ``device`` names, with an index for CUDA; DeviceError if it is not one.

    ``cuda`` is ``cuda:LOCAL_RANK`` (``local_rank``, else the environment's, under torchrun) and
    the current CUDA device otherwise; ``None`` is that GPU when torch sees one and the CPU when
    not. ``gpus`` (default: the GPUs torch sees) makes the choice testable without a GPU.
    """
    import torch

    count = cuda_count() if gpus is None else gpus
    if device is None:
        if not count:
            return torch.device("cpu")
        return resolve_device("cuda", local_rank=local_rank, gpus=count)
    if isinstance(device, torch.device):
        dev = device
    else:
        if not isinstance(device, str):
            raise DeviceError(f"device must be a string or a torch.device, not {device!r}: {HINT}")
        try:
            dev = torch.device(device.strip().lower())
        except (RuntimeError, ValueError):
            raise DeviceError(f"{device!r} is not a device: {HINT}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DeviceError(f"device {str(dev)!r} is not supported: {HINT}")
    if count == 0:
        raise DeviceError(
            f"{dev} was asked for, but no CUDA device is visible to torch ({_no_cuda_reason(torch)}"
            "); use --device cpu, or "
            + (
                "install a CUDA build of torch"
                if torch.version.cuda is None
                else "check the GPU driver and CUDA_VISIBLE_DEVICES"
            )
        )
    index = dev.index
    if index is None:
        local = os.environ.get("LOCAL_RANK", "") if local_rank is None else str(local_rank)
        if local.strip():
            try:
                index = int(local)
            except ValueError:
                raise DeviceError(f"LOCAL_RANK={local!r} is not an integer") from None
            if not 0 <= index < count:
                raise DeviceError(
                    f"LOCAL_RANK={index} asks for cuda:{index}, but this machine has "
                    f"{_devices(count)}: start at most {count} process(es) per node "
                    "(torchrun --nproc_per_node)"
                )
        else:
            index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    if not 0 <= index < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        note = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise DeviceError(
            f"cuda:{index} does not exist: this machine has {_devices(count)}{note}; "
            "name one of them"
        )
    return torch.device("cuda", index)


def device_name(device: torch.device, *, index: bool = True) -> str:
    """``cpu``, or ``cuda:N (GPU model)``; without ``index`` ``cuda (GPU model)``: what a timing
    depends on, the same on every torchrun rank of a machine with one kind of GPU."""
    import torch

    if device.type != "cuda":
        return device.type
    where = str(device) if index else "cuda"
    return f"{where} ({torch.cuda.get_device_name(device)})"


def cuda_count() -> int:
    """How many CUDA GPUs torch can use here (0 without CUDA)."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _devices(count: int) -> str:
    names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
    return f"{count} CUDA device{'s' if count != 1 else ''} ({names})"


def _no_cuda_reason(torch: Any) -> str:
    """Why torch sees no GPU, as far as can be told without a driver call."""
    version, built = torch.__version__, torch.version.cuda
    if built is None:
        return f"torch {version} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"torch {version} for CUDA {built}, CUDA_VISIBLE_DEVICES={visible!r}"
    return f"torch {version} for CUDA {built} finds no GPU or no driver"
