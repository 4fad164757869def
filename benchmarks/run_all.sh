#!/usr/bin/env bash
# Every benchmark, in the order they depend on each other. Each writes benchmarks/results/<name>.{json,md}.
# A full pass takes about 2 hours on a 2-core CPU. Runs land under $RUNS (default /tmp/edgetl-bench-runs).
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-/tmp/edgetl-bench-runs}
CLOTHING=../../shared/datasets/clothing-small
mkdir -p "$RUNS"

[ -d "$RUNS/lite0" ] || python train_accuracy.py clothing --out "$RUNS/lite0"
# Two more seeds: one seed's test top-1 moves by about a point, so the target is judged on the mean.
for seed in 1 2; do
  [ -d "$RUNS/lite0_seed$seed" ] || python train_accuracy.py clothing --set seed=$seed --tag seed$seed --out "$RUNS/lite0_seed$seed"
done
python seed_summary.py clothing
[ -d "$RUNS/fmnist" ] || python train_accuracy.py fashion-mnist --out "$RUNS/fmnist"
python export_int8.py "$RUNS/lite0" --label efficientnet_lite0
python int8_variants.py "$RUNS/lite0"
python openvino_int8_variants.py "$RUNS/lite0"
edgetl bench "$RUNS/lite0" --data "$CLOTHING" --out results/bench_efficientnet_lite0_clothing \
  --targets torch-cpu,torch-cpu-compile,ort-cpu,openvino-cpu,torch-cuda,ort-cuda,openvino-gpu
python feature_cache.py
python train_throughput.py
[ -d "$RUNS/lite2" ] || edgetl train "$CLOTHING" --backbone efficientnet_lite2 --epochs-finetune 2 --out "$RUNS/lite2"
python export_int8.py "$RUNS/lite2" --label efficientnet_lite2
# Issue 17 (needs the extras: pip install -e ".[litert,executorch]"): every format side by side on the test split.
python edge_formats.py "$RUNS/lite0" --label lite0
[ -d "$RUNS/lite2-head" ] || edgetl train "$CLOTHING" --backbone efficientnet_lite2 --recipe head --out "$RUNS/lite2-head"
python edge_formats.py "$RUNS/lite2-head" --label lite2-head
python executorch_relu6.py "$RUNS/lite0" "$RUNS/lite0-edge" --label lite0
python cpu_peak.py
