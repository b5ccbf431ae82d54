"""A network trained elsewhere, compressed with and without the lr probe (issue 13, item 4).

    python benchmarks/foreign_net.py --epochs 10 --out runs/foreign_net

Trains a VGG-style CIFAR-10 network in a converted model's layer order (Conv → ReLU → BN) with
Adam, as another framework would (``OUT/foreign.pt``, reused when there), then runs ``compress``
on it twice with the same settings: with the lr probe (``OUT/probe/``) and without it, at the
configured lr (``OUT/no_probe/``, adopting the first run's latency and importance tables). It
prints, for both, the fine-tuning lr, the control and the accuracies. Both work directories
resume, so a killed run continues where it stopped. ``--subset`` and the small settings make a
quick check (``--subset 2000 --holdout 500 --test-subset 500 --epochs 1 --width 8``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

import depthcompress as dc
from depthcompress.backends import Protocol
from depthcompress.data import SplitData, batches, cifar10, split_dataset
from depthcompress.defaults import FINETUNE_LR
from depthcompress.dp import Budget
from depthcompress.finetune import FinetuneConfig, evaluate
from depthcompress.importance import FinetuneSettings
from depthcompress.lrprobe import ProbeSettings
from depthcompress.pipeline import CompressSettings
from depthcompress.speedup import Rule


class PostBnVgg(nn.Module):
    """VGG-style, Conv → ReLU → BN (BN after the activation), max-pooling between stages."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            for _ in range(2):
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(out)]
                channels = out
            if stage < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def take(data: Dataset, n: int | None) -> Dataset:
    """The first ``n`` examples of a seeded permutation (all with None)."""
    if n is None:
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    return Subset(data, order[:n].sort().values.tolist())


def train_with_adam(net: nn.Module, data: SplitData, epochs: int, lr: float) -> None:
    """The other framework's recipe: Adam, constant lr, batch 128, no distillation."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    n = len(data.train)  # type: ignore[arg-type]
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(n, generator=gen)
        for x, y in batches(data.train, order, 128, 0):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"adam epoch {epoch + 1}/{epochs}: held-out {evaluate(net, data.holdout):.2f} %")
    net.eval()


def settings(args: argparse.Namespace, probe: bool) -> CompressSettings:
    """The same compress settings for both runs, with or without the probe."""
    return CompressSettings(
        budget=Budget.parse(args.budget),
        threads=1,
        batch=args.batch,
        protocol=Protocol(),
        importance=FinetuneSettings(steps=args.importance_steps, lr=0.05),
        finetune=FinetuneConfig(
            epochs=args.ft_epochs, lr=args.lr, batch_size=128, distill=args.distill
        ),
        speedup_rule=Rule(max_time=args.max_time),
        budget_mode="chain",
        budget_or_fastest=True,
        lr_probe=ProbeSettings(steps=args.probe_steps) if probe else None,
    )


def summary(name: str, result: Any) -> dict[str, Any]:
    """One run's figures."""
    ev, stages = result.evaluation, json.loads((result.workdir / "stages.json").read_text())
    tune = stages["finetune"]
    control = ev.get("control") or {}
    return {
        "run": name,
        "lr": tune.get("lr", tune["settings"]["finetune"]["lr"]),
        "original test %": ev["original"]["accuracy"],
        "compressed test %": ev["compressed"]["accuracy"],
        "compressed held-out %": tune["history"][-1]["accuracy"],
        "control held-out %": control.get("control_holdout_accuracy"),
        "speed-up": result.speedup,
        "warning": control.get("warning"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/foreign_net"))
    p.add_argument("--epochs", type=int, default=10, help="Adam training epochs")
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--subset", type=int, default=None, help="training examples (default all)")
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--budget", default="0.7x")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=FINETUNE_LR, help="fine-tuning lr (probe's top)")
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--distill", type=float, default=0.3)
    p.add_argument("--importance-steps", type=int, default=25)
    p.add_argument("--probe-steps", type=int, default=150)
    p.add_argument("--max-time", type=float, default=30.0, help="seconds of paired timing")
    args = p.parse_args()
    torch.set_num_threads(1)
    train, held = (
        take(cifar10("train"), args.subset),
        take(cifar10("train", augment=False), args.subset),
    )
    data = split_dataset(train, holdout=args.holdout, eval_dataset=held, name="cifar10:train")
    test = take(cifar10("test"), args.test_subset)
    torch.manual_seed(0)
    net, weights = PostBnVgg(args.width), args.out / "foreign.pt"
    if weights.exists():
        net.load_state_dict(torch.load(weights, weights_only=True))
    else:
        train_with_adam(net, data, args.epochs, args.adam_lr)
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), weights)
    net.eval()
    rows = []
    for name, probe in (("probe", True), ("no_probe", False)):
        wd, tables = args.out / name, args.out / "probe"
        adopt: dict[str, Any] = {}
        if name == "no_probe":
            adopt = {
                "latency_from": tables / "latency.csv",
                "importance_from": tables / "importance.csv",
            }
        result = dc.compress(
            net, data, wd, settings(args, probe), test_data=test, model_name="foreign_vgg", **adopt
        )
        rows.append(summary(name, result))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
