"""Small built-in networks: a MobileNetV2-style CNN for 28×28 grayscale data (Fashion-MNIST), the
project's demo and benchmark model, small enough to train and fine-tune on a laptop CPU; and two
CIFAR-10 networks for 32×32 colour images, the CIFAR MobileNetV2 and ResNet-20."""

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


class SmallMBV2(nn.Module):
    """MobileNetV2-style classifier for small inputs: a 3×3 stem, inverted residual blocks given
    as ``(expansion t, output channels c, stride s)``, a 1×1 head, global pooling and a linear
    classifier. Channels are scaled by ``width`` and rounded to multiples of 8."""

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 1,
        blocks: Sequence[tuple[int, int, int]] = FASHION_MBV2_BLOCKS,
        head_channels: int = 128,
        stem_channels: int = 16,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()

        def scaled(c: int) -> int:
            return max(8, round(c * width / 8) * 8)

        cin = scaled(stem_channels)
        self.stem = nn.Sequential(*_conv_bn(in_channels, cin, 3, stride=stem_stride), nn.ReLU6())
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


class FashionMBV2(SmallMBV2):
    """The demo network's class: ``SmallMBV2`` with its Fashion-MNIST defaults (1×28×28 inputs,
    a stride-2 stem of 16 channels, six inverted residual blocks, a 128-channel head)."""


def fashion_mbv2(width: float = 1.0, num_classes: int = 10, in_channels: int = 1) -> FashionMBV2:
    """The demo model: a small MobileNetV2 for Fashion-MNIST (stem and head stay outside the
    chain with ``exclude=FASHION_MBV2_EXCLUDE``, like the paper's MobileNetV2 setting)."""
    return FashionMBV2(width=width, num_classes=num_classes, in_channels=in_channels)


# MobileNetV2's (t, c, n, s) stages for 32×32 inputs: ImageNet's, with stride 1 in the second
# stage (and in the stem), so 32×32 inputs end at 4×4 after the three remaining stride-2 stages
CIFAR_MBV2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def expand_stages(stages: Sequence[tuple[int, int, int, int]]) -> tuple[tuple[int, int, int], ...]:
    """Per-block ``(t, c, s)`` from MobileNetV2's ``(t, c, n, s)`` stages (stride on the first)."""
    return tuple((t, c, s if k == 0 else 1) for t, c, n, s in stages for k in range(n))


def cifar_mbv2(width: float = 1.0, num_classes: int = 10) -> SmallMBV2:
    """MobileNetV2 for 3×32×32 inputs (CIFAR-10): ImageNet's blocks, a stride-1 stem of 32 channels
    and stride 1 in the 24-channel stage, a 1280-channel head (all scaled by ``width``); stem and
    head stay outside the chain with ``exclude=CIFAR_MBV2_EXCLUDE`` (the paper's L = 50)."""
    return SmallMBV2(
        width=width,
        num_classes=num_classes,
        in_channels=3,
        blocks=expand_stages(CIFAR_MBV2_STAGES),
        head_channels=1280,
        stem_channels=32,
        stem_stride=1,
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv + BN, ReLU after the first and after the residual add;
    the shortcut is a 1×1 conv + BN where the shape changes, else ``nn.Identity()``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, §4.2): a 3×3 stem, three stages of ``depth`` basic
    blocks at 16/32/64 channels (stride 2 entering stages 2 and 3), global pooling, linear."""

    def __init__(
        self, depth: int = 3, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, widths[0], 3), nn.ReLU())
        cin = widths[0]
        stages = []
        for k, c in enumerate(widths):
            blocks = [
                BasicBlock(cin if b == 0 else c, c, 2 if k and b == 0 else 1) for b in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for 3×32×32 inputs (CIFAR-10): 19 convs in the chain (3 stages × 3 basic blocks
    and the stem), 1×1 projection shortcuts where the stride is 2, identities elsewhere. Trained
    weights ship (``trained_weights("resnet20")``: 85.9 % CIFAR-10 test accuracy after 30 epochs;
    the JSON beside them holds the command)."""
    return CifarResNet(depth=3, num_classes=num_classes)


FASHION_MBV2_EXCLUDE: tuple[str, ...] = ("stem", "head")
CIFAR_MBV2_EXCLUDE: tuple[str, ...] = ("stem", "head")

MODELS: dict[str, Callable[[], nn.Module]] = {
    "fashion_mbv2": fashion_mbv2,
    "cifar_mbv2": cifar_mbv2,
    "resnet20": resnet20,
}


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
