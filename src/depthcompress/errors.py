"""Exceptions raised for the user's mistakes; every one derives from DepthCompressError."""

from __future__ import annotations

from typing import Any


class DepthCompressError(Exception):
    """Base class of every error that depthcompress raises for bad input."""


class TraceError(DepthCompressError):
    """The model could not be traced into convolution positions."""


class NoConvolutionError(TraceError):
    """The traced model holds no Conv2d that depthcompress can compress."""


class PlanError(DepthCompressError):
    """A plan (activations A, boundaries S) does not fit the chain it is used with."""


class MergeError(DepthCompressError):
    """A linearized network could not be merged, or the merge failed its numerical check."""


class ModelSpecError(DepthCompressError):
    """A MODEL argument (``torchvision:NAME`` or ``file.py:factory``) could not be loaded."""


class TableError(DepthCompressError):
    """A latency or importance table is malformed or inconsistent."""


class BudgetError(DepthCompressError):
    """A latency budget cannot be met by any plan."""


class ExportError(DepthCompressError):
    """An exported file does not reproduce the network it came from."""


class DataError(DepthCompressError):
    """Training data is missing, malformed, or too small for the requested split."""


class FinetuneError(DepthCompressError):
    """Fine-tuning was asked for with bad settings, or cannot resume from its checkpoint."""


class DivergedError(FinetuneError):
    """The training loss became NaN or infinite: the learning rate is too high for the network
    (or gradients need clipping)."""


class WorkdirError(DepthCompressError):
    """The work directory holds results of another model or of other settings."""


class WidthError(DepthCompressError):
    """Channel pruning (``--width``) cannot run: Torch-Pruning is missing or cannot handle the
    model; depth-only compression still works."""


class BackendError(DepthCompressError):
    """A latency backend is missing, cannot run here, or cannot run this model."""


class ModelLoadError(BackendError):
    """A backend cannot load the model at all (a missing or broken file), whatever its input."""


def plain(value: Any) -> Any:
    """``value`` with numpy and torch scalars as Python numbers (inside lists, tuples, sets and
    dicts too), so a message shows ``-1.0`` and never ``np.float64(-1.0)``."""
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(plain(v) for v in value))
    if isinstance(value, list | tuple | set | frozenset):
        return type(value)(plain(v) for v in value)
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        return value.item()
    return value


class DeviceError(BackendError):
    """A device (``--device``) is not one, or does not exist on this machine."""
