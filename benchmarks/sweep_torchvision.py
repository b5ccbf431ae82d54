"""Robustness sweep: trace, identity-merge and random-plan-merge every torchvision classifier.

Run: python benchmarks/sweep_torchvision.py [--size 64] [--skip-large]
Random weights and BN statistics; prints L, blocks, hard boundaries, residuals and the merge error
relative to the output scale (identity plan vs the original; a random plan vs its linearized net).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import depthcompress as dc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import random_plan, randomize_bn

LARGE = {
    "vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf",
    "efficientnet_b7", "efficientnet_b6", "efficientnet_v2_l", "convnext_large", "swin_v2_b",
    "swin_b", "maxvit_t",
}  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error relative to the scale of ``a`` (absolute when ``a`` is all zeros)."""
    scale = a.abs().max().item()
    err = (a - b).abs().max().item()
    return err / scale if scale > 0 else err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=64, help="input size for convnets")
    parser.add_argument("--skip-large", action="store_true", help="skip the largest models")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    for name in torchvision.models.list_models(module=torchvision.models):
        if args.skip_large and name in LARGE:
            continue
        start = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = randomize_bn(torchvision.models.get_model(name, weights=None)).eval()
            size = 299 if "inception" in name else args.size
            if name.startswith(("vit", "swin", "maxvit")):
                size = 224
            x = torch.randn(1, 3, size, size)
            chain = dc.trace(model, x)
            ident = dc.Plan.identity(chain)
            merged = dc.merge(dc.linearize(model, chain, ident), chain, ident)
            plan = random_plan(chain, random.Random(0))
            linear = dc.linearize(model, chain, plan).eval()
            merged_plan = dc.merge(linear, chain, plan, verify=False)
            with torch.no_grad():
                e_id = rel(model(x), merged(x))
                e_plan = rel(linear(x), merged_plan(x))
            print(
                f"{name:22s} L={chain.num_positions:4d} blocks={len(chain.blocks):4d} "
                f"boundaries={len(chain.barriers):3d} residuals={len(chain.residuals):3d} "
                f"identity_err={e_id:.1e} plan_err={e_plan:.1e} "
                f"{time.perf_counter() - start:.1f}s",
                flush=True,
            )
        except Exception as exc:
            print(f"{name:22s} FAIL {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
