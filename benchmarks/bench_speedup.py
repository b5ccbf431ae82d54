"""Paired speed-ups under load (issue 12, item 1): the demo network against itself and against a
merged version of it, on ONNX Runtime CPU, 1 thread, batch 64, first on the machine as it is
("quiet"), then with two busy-loop processes competing for the cores ("loaded").

    python benchmarks/bench_speedup.py                      # both phases, about 5 minutes
    python benchmarks/bench_speedup.py --max-time 30 --json speedup.json
    python benchmarks/bench_speedup.py --threads 2 --batch 1   # a 2-thread pair: child process

Targets: A against itself within 1.00 ± 0.05; the merged network's loaded speed-up within 10 %
of its quiet value. A plain back-to-back measurement (each network timed once, one after the
other) is printed beside each paired one for contrast. Prints plain lines; docs/benchmarks.md
records the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import depthcompress as dc
from depthcompress.backends import Backend, Protocol, cpu_name, get_backend, to_onnx
from depthcompress.models import FASHION_MBV2_EXCLUDE, fashion_mbv2, trained_weights
from depthcompress.speedup import Rule, SpeedupResult, paired_speedup


def load() -> str:
    """The 1/5/15-minute load averages, to judge how noisy a measurement was."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# the activations the demo's 0.5x plan keeps (docs/benchmarks.md, issue 7): 6 of the 11 removed
DEMO_ACTIVATIONS = (1, 5, 11, 14, 17)


def demo_pair(shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """ONNX bytes of the trained demo network and of its merge under the demo's 0.5x plan
    (identity weights: fine-tuning changes the weights, not the speed)."""
    net = fashion_mbv2()
    net.load_state_dict(torch.load(trained_weights(), map_location="cpu", weights_only=True))
    net.eval()
    chain = dc.trace(net, torch.randn(1, 1, 28, 28), exclude=FASHION_MBV2_EXCLUDE)
    plan = dc.Plan.for_activations(chain, DEMO_ACTIVATIONS)
    merged = dc.merge(dc.linearize(net, chain, plan), chain, plan)
    print(f"plan: kept {sorted(plan.activations)}, boundaries {sorted(plan.boundaries)}")
    return to_onnx(net, shape), to_onnx(merged, shape)


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` Python processes spinning on a core each while the block runs; killed after."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(2.0)  # let them reach full speed
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def plain_ratio(backend: Backend, a: bytes, b: bytes, shape: tuple[int, ...]) -> float:
    """The unpaired way: each network timed once (1 s), one after the other."""
    return backend.measure(a, shape).median / backend.measure(b, shape).median


def case(
    backend: Backend, a: bytes, b: bytes, shape: tuple[int, ...], rule: Rule, label: str
) -> SpeedupResult:
    """One paired measurement, printed with the plain ratio and the load beside it."""
    plain = plain_ratio(backend, a, b, shape)
    res = paired_speedup(a, b, backend, shape, rule, names=("original", label))
    print(
        f"  {label:>8}: {res.speedup:.3f}x [{res.low:.3f}, {res.high:.3f}] IQR "
        f"[{res.q1:.3f}, {res.q3:.3f}] {res.rounds} rounds {res.elapsed_s:.0f} s "
        f"converged={res.converged}; A {res.latency_a_ms:.2f} ms, B {res.latency_b_ms:.2f} ms; "
        f"plain back-to-back {plain:.3f}x; load {load()}",
        flush=True,
    )
    return res


def phase(
    backend: Backend, nets: tuple[bytes, bytes], shape: tuple[int, ...], rule: Rule
) -> dict[str, SpeedupResult]:
    """Self (A vs A) and merged (A vs merged) speed-ups."""
    original, merged = nets
    return {
        "self": case(backend, original, original, shape, rule, "self"),
        "merged": case(backend, original, merged, shape, rule, "merged"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-time", type=float, default=60.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=20, help="paired rounds (at least)")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes when loaded")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--json", type=Path, help="write every result here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = (args.batch, 1, 28, 28)
    backend = get_backend("onnxruntime", threads=args.threads, protocol=Protocol(max_time=1.0))
    rule = Rule(min_rounds=args.rounds, max_time=args.max_time, target=0.02)
    print(
        f"{cpu_name()}, {os.cpu_count()} cores, ORT {args.threads} thread(s), batch "
        f"{args.batch}; load {load()}"
    )
    nets = demo_pair(shape)
    print("quiet (the machine as it is, no busy loops):", flush=True)
    quiet = phase(backend, nets, shape, rule)
    print(f"loaded ({args.busy} busy loops):", flush=True)
    with busy_loops(args.busy):
        loaded = phase(backend, nets, shape, rule)
    drift = loaded["merged"].speedup / quiet["merged"].speedup - 1
    worst_self = max(abs(r["self"].speedup - 1) for r in (quiet, loaded))
    print(
        f"A vs A: worst |ratio - 1| = {worst_self:.3f} (target ≤ 0.05: "
        f"{'met' if worst_self <= 0.05 else 'MISSED'}); merged loaded vs quiet: {drift:+.1%} "
        f"(target within ±10 %: {'met' if abs(drift) <= 0.10 else 'MISSED'})"
    )
    if args.json:
        out = {
            name: {k: r.to_dict() for k, r in results.items()}
            for name, results in (("quiet", quiet), ("loaded", loaded))
        }
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
