#!/usr/bin/env bash
# edgetl on a CUDA machine: GPU training (time, images/s, accuracy), `edgetl bench` with the CUDA targets beside the
# CPU ones, and the tests whose code paths change when a CUDA device is present (device auto, bf16 autocast, pinned
# memory, NCCL). CI has no GPU, so this is run by hand where one is lent:
#
#     benchmarks/gpu_check.sh DATA OUT     # DATA: clothing-small's train/validation/test (or a copy of it)
#
# Writes OUT/log.txt, OUT/bench/ (bench.json/md/png) and copies of the train_accuracy results. Each step is guarded by
# a timeout so that one that hangs still leaves the others' results.
set -uo pipefail
DATA=${1:?usage: gpu_check.sh DATA OUT}
OUT=${2:?usage: gpu_check.sh DATA OUT}
PY=${PYTHON:-python3}
RUNS=${RUNS:-/tmp/edgetl-gpu-runs}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY -c "import torch, torchvision, timm, onnxruntime as ort, edgetl.hostinfo as h, json
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())
print('torchvision', torchvision.__version__, 'timm', timm.__version__, 'onnxruntime', ort.__version__, ort.get_available_providers())
print(json.dumps(h.host_record()))"

SEED=${SEED:-0}
step "training on the GPU: default options (precision auto: fp32 on CUDA), seed $SEED"
timeout "${TRAIN_TIMEOUT:-300}" $PY benchmarks/train_accuracy.py clothing --data "$DATA" --out "$RUNS/gpu-auto" \
    --tag "gpu-auto-seed$SEED" --set seed="$SEED"
cp benchmarks/results/train_accuracy_clothing_gpu-auto-seed"$SEED".* "$OUT/" 2>/dev/null

step "stage-2 images/s on the GPU: bf16 autocast against fp32 (all blocks, 3 epochs, no early stop)"
for precision in bf16 fp32; do
    timeout 120 $PY -m edgetl train "$DATA" --recipe finetune --unfreeze all --epochs-head 3 --epochs-finetune 3 \
        --patience 0 --precision "$precision" --out "$RUNS/speed-$precision" >/dev/null 2>&1
    $PY -c "import json,sys; s=json.load(open(sys.argv[1]))['stages']['finetune']
print('$precision', 'stage 2:', round(s['images_per_second'], 1), 'images/s,', s['epochs_run'], 'epochs,', round(s['seconds'], 1), 's')" \
        "$RUNS/speed-$precision/metrics.json"
done

step "export (ONNX) and bench: torch-cpu, ort-cpu, torch-cuda fp32/fp16, ort-cuda where onnxruntime-gpu is installed"
timeout 120 $PY -m edgetl export "$RUNS/gpu-auto" --format onnx --force
timeout "${BENCH_TIMEOUT:-240}" $PY -m edgetl bench "$RUNS/gpu-auto" --targets torch-cpu,ort-cpu,torch-cuda,torch-cuda-graph,ort-cuda \
    --batch 1,32 --min-time "${MIN_TIME:-4}" --out "$OUT/bench"

step "two training processes on a one-GPU machine: refused in one line (exit 2), not a CUDA traceback"
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" = 1 ]; then
    $PY -m edgetl train "$DATA" --backbone tiny --no-pretrained --nproc-per-node 2 --out "$RUNS/two-procs" 2>&1 | tail -3
    echo "exit ${PIPESTATUS[0]}"
fi

step "tests whose code paths change with a CUDA device"
# shellcheck disable=SC2086  # TESTS is a list of pytest arguments
timeout "${TEST_TIMEOUT:-400}" $PY -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_train.py tests/test_distributed.py tests/test_transfer.py}
echo "pytest exit $?"
