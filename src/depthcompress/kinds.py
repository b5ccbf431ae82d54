"""The layer kinds the tracer recognises: activations, pass-throughs, convolutions, batch norms.

This is the place to extend depthcompress for your own layers. A registered class is recognised
together with its subclasses, as long as a subclass keeps the forward of the class registered
(``isinstance`` plus an inherited ``forward``); a subclass that overrides ``forward`` computes
something else (timm's ``Conv2dSame`` pads first, ``StdConv2d`` standardizes its weight), so it
is never taken for the base op: it is traced through like any other module, and a convolution
of that kind then stands between positions as a hard boundary whose reason says how to register
it. Register such a class yourself only if its forward computes exactly what its attributes
describe (the merge is checked numerically either way)::

    import depthcompress as dc
    dc.register_activation(MyAct, kind="relu")    # a module class, a function or a method name
    dc.register_passthrough(MyDropPath)           # identity in eval mode (dropout, drop path)
    dc.register_conv(MyConv2d)                    # an nn.Conv2d subclass with its own forward
    dc.register_batchnorm(MyFrozenBN)             # running_mean/var, weight, bias, eps

Each ``register_*`` returns a ``Registration`` that undoes it: call ``.remove()`` or use it as a
context manager (``with dc.register_conv(MyConv2d): chain = dc.trace(...)``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DepthCompressError

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")

_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardswish,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.PReLU,
    nn.Hardtanh,
)
_ACTIVATION_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu_: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leakyrelu",
    F.hardswish: "hardswish",
    F.silu: "silu",
    F.gelu: "gelu",
    F.elu: "elu",
    F.celu: "celu",
    F.selu: "selu",
    F.mish: "mish",
    F.hardtanh: "hardtanh",
}
_PASSTHROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _stochastic_depth() -> tuple[Any, ...]:
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:
        return ()
    return (stochastic_depth,)


@dataclass
class _Registry:
    """Every recognised kind. Kinds without a value are dicts to ``True`` (not sets), so that one
    ``Registration`` undoes an entry of any table."""

    activation_modules: dict[type, str] = field(
        default_factory=lambda: {c: c.__name__.lower() for c in _ACTIVATION_MODULES}
    )
    activation_functions: dict[Any, str] = field(
        default_factory=lambda: dict(_ACTIVATION_FUNCTIONS)
    )
    activation_methods: dict[str, str] = field(
        default_factory=lambda: {"relu": "relu", "relu_": "relu"}
    )
    activation_factories: dict[str, type] = field(
        default_factory=lambda: {c.__name__.lower(): c for c in _ACTIVATION_MODULES}
    )
    passthrough_modules: dict[type, bool] = field(
        default_factory=lambda: dict.fromkeys(_PASSTHROUGH_MODULES, True)
    )
    passthrough_functions: dict[Any, bool] = field(
        default_factory=lambda: dict.fromkeys(_stochastic_depth(), True)
    )
    convs: dict[type, bool] = field(default_factory=lambda: {nn.Conv2d: True})
    batchnorms: dict[type, bool] = field(
        default_factory=lambda: {nn.BatchNorm2d: True, nn.SyncBatchNorm: True}
    )


_REGISTRY = _Registry()


@dataclass
class Registration:
    """One registration; ``remove()`` (or leaving its ``with`` block) restores what it replaced."""

    table: dict[Any, Any]
    key: Any
    had: bool
    previous: Any = None
    undo: list[Registration] = field(default_factory=list)
    removed: bool = False

    def remove(self) -> None:
        """Undo the registration (and the ones made along with it); a second call does nothing."""
        if self.removed:
            return
        self.removed = True
        for other in reversed(self.undo):
            other.remove()
        if self.had:
            self.table[self.key] = self.previous
        else:
            self.table.pop(self.key, None)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _set(table: dict[Any, Any], key: Any, value: Any) -> Registration:
    had = key in table
    reg = Registration(table, key, had, table.get(key))
    table[key] = value
    return reg


def _module_class(cls: object, what: str, base: type = nn.Module) -> type:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise DepthCompressError(f"{what} takes a subclass of {base.__name__}, got {cls!r}")
    return cls


def register_activation(
    target: type | Callable[..., Any] | str, kind: str | None = None
) -> Registration:
    """Recognise ``target`` (a module class, a function, or a tensor method name) as an activation
    of ``kind``; a new kind (default: the class name in lower case) is inserted as ``target()``."""
    if isinstance(target, str):
        return _set(_REGISTRY.activation_methods, target, kind or target)
    if not isinstance(target, type):
        if not callable(target):
            raise DepthCompressError(
                f"register_activation takes a class, function or name, got {target!r}"
            )
        return _set(_REGISTRY.activation_functions, target, kind or target.__name__.lower())
    cls = _module_class(target, "register_activation")
    name = kind or cls.__name__.lower()
    reg = _set(_REGISTRY.activation_modules, cls, name)
    if name not in _REGISTRY.activation_factories:
        reg.undo.append(_set(_REGISTRY.activation_factories, name, cls))
    return reg


def register_passthrough(target: type | Callable[..., Any]) -> Registration:
    """Recognise ``target`` (a module class or a function) as identity-like in eval mode (dropout,
    drop path): skips and conv tails pass through it."""
    if isinstance(target, type):
        return _set(
            _REGISTRY.passthrough_modules, _module_class(target, "register_passthrough"), True
        )
    if not callable(target):
        raise DepthCompressError(f"register_passthrough takes a class or function, got {target!r}")
    return _set(_REGISTRY.passthrough_functions, target, True)


def register_conv(cls: type) -> Registration:
    """Recognise an ``nn.Conv2d`` subclass whose own forward computes exactly the convolution its
    attributes describe (weight, bias, stride, padding, dilation, groups, padding_mode)."""
    return _set(_REGISTRY.convs, _module_class(cls, "register_conv", nn.Conv2d), True)


def register_batchnorm(cls: type) -> Registration:
    """Recognise a batch norm class: in eval mode a per-channel affine of its ``running_mean``,
    ``running_var``, ``weight``, ``bias`` and ``eps`` that folds into an adjacent conv."""
    return _set(_REGISTRY.batchnorms, _module_class(cls, "register_batchnorm"), True)


@contextmanager
def registry_restored() -> Iterator[None]:
    """Everything registered inside the block is forgotten when it ends (tests, notebooks)."""
    saved = {name: dict(table) for name, table in vars(_REGISTRY).items()}
    try:
        yield
    finally:
        for name, table in saved.items():
            live = getattr(_REGISTRY, name)
            live.clear()
            live.update(table)


# ---------------------------------------------------------------------------------------------
# queries (used by graph, linearization, latency and merging)


def _registered_base(table: dict[type, Any], cls: type) -> type | None:
    """The nearest registered class among ``cls`` and its bases."""
    for base in cls.__mro__:
        if base in table:
            return base
    return None


def _lookup(table: dict[type, Any], mod: object) -> Any:
    """The entry of ``mod``'s nearest registered class, if ``mod`` keeps that class's forward."""
    cls = type(mod)
    base = _registered_base(table, cls)
    if base is None or getattr(cls, "forward", None) is not base.forward:
        return None
    return table[base]


def overridden_base(cls: type) -> type | None:
    """The registered conv or BN class whose forward ``cls`` overrides, so is not taken for."""
    for table in (_REGISTRY.convs, _REGISTRY.batchnorms):
        base = _registered_base(table, cls)
        if base is not None and getattr(cls, "forward", None) is not base.forward:
            return base
    return None


def how_to_register(cls: type) -> str:
    """The call that makes ``cls`` (a conv or BN subclass with its own forward) recognised."""
    base = overridden_base(cls)
    fn = (
        "register_batchnorm"
        if base is not None and base in _REGISTRY.batchnorms
        else "register_conv"
    )
    return f"depthcompress.{fn}({cls.__name__})"


def activation_module_kind(mod: object) -> str | None:
    """The activation kind of a module, or None."""
    return _lookup(_REGISTRY.activation_modules, mod)


def activation_function_kind(target: Any) -> str | None:
    """The activation kind of an fx ``call_function`` target, or None."""
    try:
        return _REGISTRY.activation_functions.get(target)
    except TypeError:  # an unhashable target
        return None


def activation_method_kind(name: Any) -> str | None:
    """The activation kind of an fx ``call_method`` target (``x.relu()``), or None."""
    return _REGISTRY.activation_methods.get(name) if isinstance(name, str) else None


def is_passthrough_module(mod: object) -> bool:
    """An identity-like module (identity, dropout, registered drop path)."""
    return bool(_lookup(_REGISTRY.passthrough_modules, mod))


def is_passthrough_function(target: Any) -> bool:
    """An identity-like function (``torchvision.ops.stochastic_depth``, registered ones)."""
    try:
        return target in _REGISTRY.passthrough_functions
    except TypeError:
        return False


def is_conv(mod: object) -> bool:
    """A convolution the chain can own: a registered class, or a subclass keeping its forward."""
    return bool(_lookup(_REGISTRY.convs, mod))


def is_batchnorm_kind(mod: object) -> bool:
    """A batch norm module (registered class, or a subclass keeping its forward)."""
    return bool(_lookup(_REGISTRY.batchnorms, mod))


def is_batchnorm(mod: object) -> bool:
    """A batch norm with running statistics: in eval mode a per-channel affine that folds exactly
    into an adjacent conv."""
    return (
        is_batchnorm_kind(mod)
        and getattr(mod, "running_mean", None) is not None
        and getattr(mod, "running_var", None) is not None
    )


def is_known_module(mod: object) -> bool:
    """A module of a recognised kind: the tracer keeps it as one node instead of tracing in."""
    return (
        activation_module_kind(mod) is not None
        or is_passthrough_module(mod)
        or is_conv(mod)
        or is_batchnorm_kind(mod)
    )


def make_activation(kind: str) -> nn.Module:
    """A fresh activation module of ``kind`` (default parameters) for inserted activations."""
    return _REGISTRY.activation_factories.get(kind, nn.ReLU)()


__all__ = [
    "ADD_FUNCTIONS",
    "ADD_METHODS",
    "Registration",
    "activation_function_kind",
    "activation_method_kind",
    "activation_module_kind",
    "how_to_register",
    "is_batchnorm",
    "is_conv",
    "is_known_module",
    "is_passthrough_function",
    "is_passthrough_module",
    "make_activation",
    "overridden_base",
    "register_activation",
    "register_batchnorm",
    "register_conv",
    "register_passthrough",
    "registry_restored",
]
