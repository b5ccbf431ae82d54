"""What a fully pruned residual branch should mean (issue 16): test accuracy of ResNet-20 (the
shipped CIFAR-10 weights, no fine-tuning) with one non-strided basic block's branch replaced by
identity convs (``x + x``, today's pruned semantics) or dropped (``x``, the shortcut alone).

    python benchmarks/bench_pruned_residual.py

2,000 CIFAR-10 test images (every fifth), 1 thread, about a minute.
"""

import types

import torch

from depthcompress.data import cifar10, fetch
from depthcompress.models import resnet20, trained_weights

torch.set_num_threads(1)
test = cifar10("test")
idx = torch.arange(0, 10000, 5)  # 2000 images
x, y = fetch(test, idx)


def acc(m: torch.nn.Module) -> float:
    """Top-1 accuracy (%) on the 2,000 images."""
    with torch.no_grad():
        return (m(x).argmax(1) == y).float().mean().item() * 100


def fresh() -> torch.nn.Module:
    """ResNet-20 with the shipped weights, in eval mode."""
    m = resnet20()
    m.load_state_dict(torch.load(trained_weights("resnet20"), weights_only=True))
    return m.eval()


print("original", round(acc(fresh()), 2))
for stage, b in [
    ("layer1", 1),
    ("layer1", 2),
    ("layer2", 1),
    ("layer2", 2),
    ("layer3", 1),
    ("layer3", 2),
]:
    row = []
    for mode in ("double", "drop"):
        m = fresh()
        blk = getattr(m, stage)[b]
        if mode == "double":
            blk.forward = types.MethodType(lambda self, t: self.relu(t + t), blk)
        else:
            blk.forward = types.MethodType(lambda self, t: self.relu(t), blk)
        row.append(round(acc(m), 2))
    print(stage, b, "x+x:", row[0], " x:", row[1])
