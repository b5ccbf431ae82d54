"""depthcompress: latency-aware CNN depth compression by two-stage dynamic programming.

Trace a CNN into convolution positions (``trace``), choose which activations to keep and which
convolutions to merge (``Plan``), fine-tune the ``linearize``-d network, then ``merge`` it
exactly into a shallower one. ``compress`` runs the whole job (tables, DP, fine-tuning, merge,
export, report) in one resumable call. Your own layer kinds (activations, drop paths, conv and
batch norm subclasses) are registered with the ``register_*`` functions (see ``kinds``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BackendError,
    BudgetError,
    DataError,
    DepthCompressError,
    DeviceError,
    ExportError,
    FinetuneError,
    MergeError,
    ModelSpecError,
    NoConvolutionError,
    PlanError,
    TableError,
    TraceError,
    WorkdirError,
)
from .plan import Plan

if TYPE_CHECKING:
    from .graph import BlockGeometry, ConvChain, Position, Residual, trace
    from .kinds import (
        Registration,
        register_activation,
        register_batchnorm,
        register_conv,
        register_passthrough,
        registry_restored,
    )
    from .linearization import linearize
    from .merging import merge
    from .pipeline import Budget, CompressResult, CompressSettings, compress

from ._version import __version__ as __version__

_LAZY = {
    "trace": "graph",
    "ConvChain": "graph",
    "Position": "graph",
    "Residual": "graph",
    "BlockGeometry": "graph",
    "Registration": "kinds",
    "register_activation": "kinds",
    "register_batchnorm": "kinds",
    "register_conv": "kinds",
    "register_passthrough": "kinds",
    "registry_restored": "kinds",
    "linearize": "linearization",
    "merge": "merging",
    "compress": "pipeline",
    "Budget": "pipeline",
    "CompressSettings": "pipeline",
    "CompressResult": "pipeline",
}


def __getattr__(name: str) -> Any:
    """Torch-backed names load on first use, so table and DP tools start without torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'depthcompress' has no attribute {name!r}")


__all__ = [
    "BackendError",
    "BlockGeometry",
    "Budget",
    "BudgetError",
    "CompressResult",
    "CompressSettings",
    "ConvChain",
    "DataError",
    "DepthCompressError",
    "DeviceError",
    "ExportError",
    "FinetuneError",
    "MergeError",
    "ModelSpecError",
    "NoConvolutionError",
    "Plan",
    "PlanError",
    "Position",
    "Registration",
    "Residual",
    "TableError",
    "TraceError",
    "WorkdirError",
    "compress",
    "linearize",
    "merge",
    "register_activation",
    "register_batchnorm",
    "register_conv",
    "register_passthrough",
    "registry_restored",
    "trace",
]
