"""Load a model from a MODEL argument: ``torchvision:NAME`` or ``path/to/file.py:factory``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModelSpecError


def load_model(spec: str) -> nn.Module:
    """Build the model named by ``spec``; torchvision models get random weights (no download)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ModelSpecError(
            f"MODEL {spec!r} must be 'torchvision:NAME' or 'path/to/file.py:factory'"
        )
    if source == "torchvision":
        return _torchvision(name)
    return _factory(Path(source), name)


def _torchvision(name: str) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [m for m in available if name.lower()[:4] in m][:8]
        raise ModelSpecError(
            f"torchvision has no classification model {name!r}"
            + (f"; did you mean one of {close}?" if close else "")
        )
    return torchvision.models.get_model(name, weights=None)


def _callables(module: Any, path: Path) -> str:
    """The functions and classes ``module`` defines itself (not the ones it imports), as a hint
    of what to write after the colon."""
    own = sorted(
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and callable(v)
        and getattr(v, "__module__", None) == module.__name__
    )
    if not own:
        return "it defines no function or class: add one that returns the model"
    return f"it defines {', '.join(own)}: name one of them, e.g. {path}:{own[0]}"


def _factory(path: Path, name: str) -> nn.Module:
    if not path.is_file():
        raise ModelSpecError(f"model file {path} does not exist")
    module_name = f"_depthcompress_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"{path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelSpecError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise ModelSpecError(f"{path} defines no callable {name!r}; {_callables(module, path)}")
    try:
        model = factory()
    except Exception as exc:
        raise ModelSpecError(f"{path}:{name}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{path}:{name}() returned {type(model).__name__}, not an nn.Module")
    return model
