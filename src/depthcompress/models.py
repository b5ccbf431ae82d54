"""Small built-in networks: a MobileNetV2-style CNN for 28×28 grayscale data (Fashion-MNIST), the
project's demo and benchmark model, small enough to train and fine-tune on a laptop CPU."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import ModelSpecError

# (expansion t, output channels c, stride s) per inverted residual block, at width 1.0
FASHION_MBV2_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 16, 1),
    (4, 24, 2),
    (4, 24, 1),
    (4, 32, 2),
    (4, 32, 1),
    (4, 48, 1),
)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (if t > 1), 3×3 depthwise, 1×1 linear projection, and an
    identity skip when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_skip else self.conv(x)


class FashionMBV2(nn.Module):
    """MobileNetV2-style classifier for 1×28×28 inputs: stem, inverted residual blocks, head."""

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 1,
        blocks: Sequence[tuple[int, int, int]] = FASHION_MBV2_BLOCKS,
        head_channels: int = 128,
    ) -> None:
        super().__init__()

        def scaled(c: int) -> int:
            return max(8, round(c * width / 8) * 8)

        cin = scaled(16)
        self.stem = nn.Sequential(*_conv_bn(in_channels, cin, 3, stride=2), nn.ReLU6())
        layers = []
        for t, c, s in blocks:
            layers.append(InvertedResidual(cin, scaled(c), s, t))
            cin = scaled(c)
        self.features = nn.Sequential(*layers)
        head = scaled(head_channels)
        self.head = nn.Sequential(*_conv_bn(cin, head, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def fashion_mbv2(width: float = 1.0, num_classes: int = 10, in_channels: int = 1) -> FashionMBV2:
    """The demo model: a small MobileNetV2 for Fashion-MNIST (stem and head stay outside the
    chain with ``exclude=FASHION_MBV2_EXCLUDE``, like the paper's MobileNetV2 setting)."""
    return FashionMBV2(width=width, num_classes=num_classes, in_channels=in_channels)


FASHION_MBV2_EXCLUDE: tuple[str, ...] = ("stem", "head")

MODELS: dict[str, Callable[[], nn.Module]] = {"fashion_mbv2": fashion_mbv2}


def get_model(name: str) -> nn.Module:
    """Build a built-in model by name (random weights), for ``depthcompress:NAME`` MODELs."""
    if name not in MODELS:
        raise ModelSpecError(f"depthcompress has no built-in model {name!r}; have {sorted(MODELS)}")
    return MODELS[name]()


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def trained_weights(name: str = "fashion_mbv2") -> Path:
    """The trained checkpoint the package ships for a built-in model (a state_dict written by
    ``depthcompress train``; the JSON beside it records the command that reproduces it)."""
    path = WEIGHTS_DIR / f"{name}.pt"
    if not path.exists():
        raise ModelSpecError(
            f"depthcompress ships no trained weights for {name!r} ({path} is missing); train them "
            f"with 'depthcompress train depthcompress:{name} -o {name}.pt'"
        )
    return path
