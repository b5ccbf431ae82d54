"""Why 2-thread paired timings on ONNX Runtime run in a child process (issue 12): the demo
network against itself in paired rounds, its two sides timed five ways, each in a fresh process.

    python benchmarks/bench_ort_pools.py                  # 2 threads, batch 64, 30 rounds each
    python benchmarks/bench_ort_pools.py --batch 1 --threads 2

- ``sessions``: two sessions, each with a pool of its own (what pairing did before b61950c);
- ``same``: one session timed as both sides;
- ``no-spin``: two sessions with their workers' spinning off;
- ``pause``: two sessions, 10 ms of sleep before each side's block;
- ``global``: two sessions on ORT's process-wide pool (what ``paired_speedup`` does now).

A fair measurement reads 1.00 with a narrow interval. Prints one line per way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

WAYS = ("sessions", "same", "no-spin", "pause", "global")


def one(way: str, threads: int, batch: int, rounds: int) -> str:
    """The paired rounds of one way, in this process (which must be fresh for ``global``)."""
    import onnxruntime as ort
    import torch

    from depthcompress.backends import _random_input, to_onnx
    from depthcompress.models import fashion_mbv2, trained_weights
    from depthcompress.speedup import Rule, paired_rounds

    torch.set_num_threads(1)
    shape = (batch, 1, 28, 28)
    net = fashion_mbv2()
    net.load_state_dict(torch.load(trained_weights(), map_location="cpu", weights_only=True))
    onnx = to_onnx(net.eval(), shape)
    if way == "global":
        ort.set_global_thread_pool_sizes(threads, 1)

    def session() -> Callable[[], float]:
        opts = ort.SessionOptions()
        if way == "global":
            opts.use_per_session_threads = False
        else:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        if way == "no-spin":
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        sess = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: _random_input(shape)}
        runs = [0]

        def run() -> float:
            if way == "pause" and runs[0] % Rule().block == 0:
                time.sleep(0.01)
            runs[0] += 1
            start = time.perf_counter()
            sess.run(None, feed)
            return (time.perf_counter() - start) * 1e3

        return run

    a = session()
    b = a if way == "same" else session()
    r = paired_rounds(a, b, Rule(min_rounds=rounds, max_rounds=rounds, max_time=120))
    s = r.stats
    return (
        f"{way:>8}: {s.median:.3f}x [{s.low:.3f}, {s.high:.3f}] quartiles [{s.q1:.3f}, "
        f"{s.q3:.3f}]; A {statistics.median(r.times_a):.3f} ms, B "
        f"{statistics.median(r.times_b):.3f} ms; load {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--way", choices=WAYS, help="run one way in this process (internal)")
    args = parser.parse_args()
    if args.way:
        print(one(args.way, args.threads, args.batch, args.rounds), flush=True)
        return
    print(f"ORT {args.threads} threads, batch {args.batch}, {args.rounds} paired rounds per way")
    for way in WAYS:  # a fresh process each: ORT's global pool is made once per process
        flags = ["--threads", str(args.threads), "--batch", str(args.batch)]
        cmd = [sys.executable, __file__, "--way", way, "--rounds", str(args.rounds), *flags]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
