"""Width before depth: the original channel-pruned by Torch-Pruning's ``MetaPruner`` (issue 14).

The pruned network is what the latency table times, the importance table scores and fine-tuning
recovers (distilled from the unpruned original). Torch-Pruning follows the channel dependencies;
depthcompress writes no dependency graph of its own. Channel counts are rounded to what the
backend runs fast: 16 on the CPU backends, 8 on a GPU (odd counts ran up to 11x slower on ORT).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .backends import GPU_BACKENDS, backend_key
from .errors import WidthError

IMPORTANCES = ("l1", "taylor")
INSTALL = "pip install 'depthcompress[width]'"
DEPTH_ONLY = "depth-only compression (without --width) still works on this model"


@dataclass(frozen=True)
class WidthResult:
    """The pruned deep copy and, per convolution, its output channels (before, after)."""

    model: nn.Module
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)

    def kept_json(self) -> dict[str, list[int]]:
        """``kept`` as plain JSON lists."""
        return {name: [a, b] for name, (a, b) in self.kept.items()}


def default_round_to(backend: str, device: str | torch.device | None = None) -> int:
    """Channel multiple the backend runs fast: 8 where it times on a GPU, 16 on the CPU."""
    key = backend_key(backend)
    on_gpu = key == "tensorrt" or (
        key in GPU_BACKENDS and torch.device(device or "cpu").type == "cuda"
    )
    return 8 if on_gpu else 16


def _torch_pruning() -> Any:
    """The ``torch_pruning`` module, or a clear error saying how to install it."""
    try:
        import torch_pruning
    except ImportError:
        raise WidthError(
            f"--width needs Torch-Pruning, which is not installed: {INSTALL}. {DEPTH_ONLY}"
        ) from None
    return torch_pruning


def _importance(tp: Any, kind: str) -> Any:
    """Torch-Pruning's importance criterion called ``kind``."""
    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    raise WidthError(f"width importance must be one of {', '.join(IMPORTANCES)}, got {kind!r}")


def _classifier(model: nn.Module) -> list[nn.Module]:
    """The last ``nn.Linear`` (its outputs are the classes, never pruned)."""
    linears: list[nn.Module] = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def conv_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every ``nn.Conv2d``, by module name."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@contextlib.contextmanager
def _where(model: nn.Module) -> Iterator[list[str]]:
    """Hooks that leave, in the yielded list, where a forward pass failed (in or after a layer)."""
    place: list[str] = []
    state = {"in": "", "done": ""}

    def enter(name: str) -> Any:
        return lambda *_: state.update({"in": name})

    def leave(name: str) -> Any:
        return lambda *_: state.update({"in": "", "done": name})

    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    handles = [m.register_forward_pre_hook(enter(n)) for n, m in leaves]
    handles += [m.register_forward_hook(leave(n)) for n, m in leaves]
    try:
        yield place
    except Exception:
        place.append(f"in layer {state['in']}" if state["in"] else f"after layer {state['done']}")
        raise
    finally:
        for h in handles:
            h.remove()


def _failure(exc: Exception, where: str) -> WidthError:
    """The error for a model Torch-Pruning cannot prune correctly."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return WidthError(
        f"Torch-Pruning cannot prune the channels of this model ({where}: "
        f"{type(exc).__name__}: {first}); {DEPTH_ONLY}"
    )


def _check_forward(model: nn.Module, example_input: torch.Tensor, expected: torch.Size) -> None:
    """Run the pruned network once; a failure or another output shape names the layer."""
    place: list[str] = []
    try:
        with torch.no_grad(), _where(model) as place:
            out = model(example_input)
    except Exception as exc:
        raise _failure(exc, place[0] if place else "its forward pass") from None
    if out.shape != expected:
        raise WidthError(
            f"the channel-pruned model outputs {tuple(out.shape)} instead of {tuple(expected)}; "
            f"{DEPTH_ONLY}"
        )


def prune_width(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    *,
    round_to: int,
    importance: str = "l1",
    ignored: Sequence[nn.Module] | None = None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> WidthResult:
    """Prune ``ratio`` of every layer's channels of a deep copy of ``model`` (``MetaPruner``,
    not global; the last Linear and ``ignored`` kept). Taylor importance reads the cross-entropy
    gradients of ``batches``; L1 needs none and is deterministic."""
    tp = _torch_pruning()
    if not 0 < ratio < 1:
        raise WidthError(f"--width is a fraction of channels to remove, in (0, 1); got {ratio}")
    crit = _importance(tp, importance)
    if importance == "taylor" and not batches:
        raise WidthError("Taylor width importance needs batches of (inputs, labels)")
    net = copy.deepcopy(model).cpu().eval()
    by_id = {id(m): n for n, m in model.named_modules()}
    names = {by_id[id(m)] for m in ignored or () if id(m) in by_id}
    keep = _classifier(net) + [m for n, m in net.named_modules() if n in names]
    before = conv_channels(net)
    with torch.no_grad():
        expected = net(example_input).shape
    try:
        pruner = tp.pruner.MetaPruner(
            net,
            example_input,
            importance=crit,
            pruning_ratio=ratio,
            global_pruning=False,
            ignored_layers=keep,
            round_to=round_to,
        )
        _gradients(net, batches)
        pruner.step()
    except Exception as exc:
        raise _failure(exc, "while Torch-Pruning built or applied its plan") from None
    net.zero_grad(set_to_none=True)
    _check_forward(net, example_input, expected)
    after = conv_channels(net)
    return WidthResult(net, {n: (before[n], after[n]) for n in before})


def _gradients(net: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The gradients a Taylor importance reads: cross-entropy on ``batches`` (eval mode)."""
    net.zero_grad()
    for x, y in batches:
        loss = nn.functional.cross_entropy(net(x), y)
        torch.autograd.backward(loss)
