"""Exceptions raised for the user's mistakes; every one derives from DepthCompressError."""

from __future__ import annotations


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


class WorkdirError(DepthCompressError):
    """The work directory holds results of another model or of other settings."""


class BackendError(DepthCompressError):
    """A latency backend is missing, cannot run here, or cannot run this model."""


class DeviceError(BackendError):
    """A device (``--device``) is not one, or does not exist on this machine."""
