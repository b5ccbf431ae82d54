#!/usr/bin/env bash
# The GPU check of issue 11, for a machine with one CUDA GPU (about 5-8 minutes on an H200).
# Run from the repository root:   bash benchmarks/gpu_check.sh
#
#  0. install: pip install -e . beside the machine's torch when torch imports, else the README's
#  a. the latency table of torchvision MobileNetV2 (reference mode, stem and head excluded, 171
#     blocks) on the torch backend on the GPU at batch 128
#  b. compress of the demo network (depthcompress:fashion_mbv2, its shipped weights) with
#     --backend torch --device cuda: --until solve, then torchrun --nproc_per_node=1 through
#     fine-tuning, merge, export and evaluation
#  c. predicted vs measured speed-up of three plans solved on table (a), merged, timed on the GPU
#
# Everything goes to ${OUT:-gpu_check_out}; summary.txt holds the figures. Any failure stops the
# script with a non-zero exit. Settings (environment):
#   DEVICE=cuda        the device of every step (DEVICE=cpu SMALL=1 checks the commands on a CPU)
#   SMALL=1            tiny sizes: 64x64 table at batch 2, synthetic data, 1 importance step
#   SKIP_INSTALL=1     use the depthcompress already importable (e.g. PYTHONPATH=src)
#   SYNTHETIC=1        synthetic Fashion-MNIST-shaped data even when the dataset is installed
set -euo pipefail

OUT=${OUT:-gpu_check_out}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TAG=${DEVICE//:/}
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
START=$(date +%s)
say() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }
step() { say ""; say "== $* ($(($(date +%s) - START)) s)"; }
trap 'echo "gpu_check FAILED (line $LINENO, exit $?); logs are in $OUT" >&2' ERR

if [ "$SMALL" = 1 ]; then
    SHAPE=2,3,64,64
    TIMING=(--warmup 1 --reps 3 --min-reps 1 --max-time 0.02)
    BATCH=4
    TRAIN=(--holdout 100 --importance-steps 1 --epochs 1 --finetune-batch-size 32)
    SYNTHETIC=1
    SIZES="600 100"  # train and test images of the synthetic data
    SPEEDUP_TIME=0.05
else
    SHAPE=128,3,224,224
    TIMING=()
    BATCH=128
    TRAIN=(--holdout 5000 --importance-steps 10 --epochs 1 --finetune-batch-size 256)
    SYNTHETIC=${SYNTHETIC:-0}
    SIZES="12000 2000"
    SPEEDUP_TIME=2.0
fi

step "0. install"
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
    say "skipped (SKIP_INSTALL=1)"
elif python -c "import torch" 2>/dev/null; then
    say "pip install -e . beside the machine's torch"
    pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 ||
        pip install --no-deps -e . >>"$OUT/install.log" 2>&1
    python -c "import torchvision, onnx, onnxruntime, typer, rich, numpy" 2>/dev/null ||
        pip install torchvision "onnx>=1.15" "onnxruntime>=1.17" "typer>=0.12" "rich>=13" \
            "numpy>=1.24" >>"$OUT/install.log" 2>&1
else
    say "torch does not import: the README's install"
    pip install torch==2.14.1 torchvision==0.29.1 >"$OUT/install.log" 2>&1
    pip install -e ".[dev]" >>"$OUT/install.log" 2>&1
fi
command -v depthcompress >/dev/null
python - "$DEVICE" <<'EOF' | tee -a "$SUMMARY"
import sys

import torch

from depthcompress.devices import device_name, resolve_device

dev = resolve_device(sys.argv[1])
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {device_name(dev)}")
EOF
if command -v torchrun >/dev/null; then TORCHRUN=(torchrun); else
    TORCHRUN=(python -m torch.distributed.run)
fi

step "a. MobileNetV2 latency table, torch backend on $DEVICE, input $SHAPE"
TABLE=$OUT/mbv2_$TAG.csv
A_START=$(date +%s)
depthcompress latency torchvision:mobilenet_v2 --mode reference \
    --exclude features.0 --exclude features.18 --backend torch --device "$DEVICE" \
    --input-shape "$SHAPE" ${TIMING[@]+"${TIMING[@]}"} --no-progress -o "$TABLE" |
    tee "$OUT/a_latency.log"
python - "$TABLE" "$(($(date +%s) - A_START))" <<'EOF' | tee -a "$SUMMARY"
import sys

from depthcompress.latency import read_latency_table

meta, rows = read_latency_table(sys.argv[1])
singles = sum(r.time for r in rows if r.end == r.st + 1)
print(
    f"{len(rows)} of {meta['blocks']['count']} blocks on {meta['backend']['name']} "
    f"{meta['backend']['device']} at batch {meta['batch']} (step took {sys.argv[2]} s, resumed "
    f"rows included); sum of single-conv T = {singles:.3f} ms"
)
EOF

step "b. compress the demo network with --backend torch --device $DEVICE (torchrun)"
if [ "$SYNTHETIC" != 1 ] && python -c "from depthcompress.data import fashion_mnist as f; f('test')" \
    2>/dev/null; then
    say "data: Fashion-MNIST"
else
    export DEPTHCOMPRESS_FASHION_MNIST=$OUT/fashion-mnist-synthetic
    # shellcheck disable=SC2086
    python - "$DEPTHCOMPRESS_FASHION_MNIST" $SIZES <<'EOF'
"""Fashion-MNIST-shaped IDX files: ten classes, each a fixed random pattern plus noise."""

import gzip
import sys
from pathlib import Path

import numpy as np

root, sizes = Path(sys.argv[1]), [int(v) for v in sys.argv[2:]]
root.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
patterns = rng.integers(0, 256, size=(10, 28, 28))
for (images, labels), n in zip(
    [("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
     ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")], sizes, strict=True
):
    y = np.arange(n) % 10
    x = np.clip(patterns[y] * 0.6 + rng.integers(0, 102, size=(n, 28, 28)), 0, 255)
    for name, data in ((images, x.astype(np.uint8)), (labels, y.astype(np.uint8))):
        head = bytes([0, 0, 8, data.ndim]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
        with gzip.open(root / f"{name}.gz", "wb") as fh:
            fh.write(head + data.tobytes())
EOF
    say "data: synthetic Fashion-MNIST-shaped images (${SIZES/ / train, } test; not installed" \
        "here, or SYNTHETIC=1): its accuracy figures mean nothing"
fi
WEIGHTS=$(python -c "from depthcompress.models import trained_weights as w; print(w())")
# its latency table made apart by 'depthcompress latency', then adopted by compress
depthcompress latency depthcompress:fashion_mbv2 --exclude stem --exclude head --backend torch \
    --device "$DEVICE" --input-shape "$BATCH,1,28,28" --no-progress -o "$OUT/demo_latency.csv" |
    tee "$OUT/b_latency.log"
ARGS=(
    compress depthcompress:fashion_mbv2 --weights "$WEIGHTS" --data fashion-mnist
    --budget 0.6x --workdir "$OUT/compress" --exclude stem --exclude head
    --backend torch --device "$DEVICE" --batch "$BATCH" "${TRAIN[@]}" --no-progress
    --latency-table "$OUT/demo_latency.csv"
)
depthcompress "${ARGS[@]}" --until solve 2>&1 | tee "$OUT/b_until_solve.log"
cmp "$OUT/demo_latency.csv" "$OUT/compress/latency.csv"
say "compress adopted the table of 'depthcompress latency' (--latency-table): no row re-measured"
"${TORCHRUN[@]}" --nproc_per_node=1 --standalone -m depthcompress "${ARGS[@]}" 2>&1 |
    tee "$OUT/b_torchrun.log"
for f in latency.csv importance.csv plan.json finetuned.pt merged.pt merged.onnx evaluation.json \
    report.md; do
    test -s "$OUT/compress/$f" || { echo "missing $OUT/compress/$f" >&2; exit 1; }
done
python - "$OUT/compress" <<'EOF' | tee -a "$SUMMARY"
import json
import sys
from pathlib import Path

wd = Path(sys.argv[1])
ev = json.loads((wd / "evaluation.json").read_text())
dev = json.loads((wd / "stages.json").read_text())["latency"]["settings"]["device"]
o, c = ev["original"], ev["compressed"]
print(
    f"timed on {ev['backend']['name']} {ev['backend']['device']} (latency stage key: {dev}), "
    f"batch {ev['batch']}: {o['latency']:.4f} ms -> {c['latency']:.4f} ms, speed-up "
    f"{ev['speedup']:.2f}x measured vs {ev['predicted_speedup']:.2f}x predicted; accuracy "
    f"{o['accuracy']:.2f} % -> {c['accuracy']:.2f} %; {o['depth']} -> {c['depth']} convolutions"
)
EOF

step "c. predicted vs measured speed-up of three plans on $DEVICE"
python benchmarks/gpu_speedup.py --table "$TABLE" --device "$DEVICE" --max-time "$SPEEDUP_TIME" \
    --out "$OUT/c_speedup.json" | tee "$OUT/c_speedup.log"
cat "$OUT/c_speedup.log" >>"$SUMMARY"

step "done"
say "summary: $SUMMARY"
echo
cat "$SUMMARY"
