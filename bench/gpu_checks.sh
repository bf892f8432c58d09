#!/bin/bash
# Every GPU-only check in one run, shortest first, within a time budget (seconds, default 420):
#   bash bench/gpu_checks.sh [OUT_DIR]
# the S2 kernels on CUDA against the float64 reference, LLaMA2 7B/13B memory under a 32 GiB cap,
# S2 vs full attention, and the 7B training-step setups. Results: JSON files in OUT_DIR.
# Where the GPU machine has no package index, put wheels (bitsandbytes, ...) in .whl/ first.
OUT=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( ${BUDGET:-420} - ($(date +%s) - START) )); }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "== S2 on CUDA vs the float64 reference ($(left) s left)"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/backends/test_s2.py -k cuda 2>&1 | tail -15
echo "== bench/memory_gpu.py ($(left) s left)"
timeout $(( $(left) - 150 )) python3 bench/memory_gpu.py --timeout-min 3.5 --output "$OUT/memory_gpu.json" 2>&1 | tail -14
echo "== bench/attention.py ($(left) s left)"
timeout 80 python3 bench/attention.py --lengths 8192 16384 32768 --output "$OUT/attention_gpu.json" 2>&1 | tail -13
echo "== bench/train_step.py, LLaMA2-7B at 8k ($(left) s left)"
[ "$(left)" -gt 60 ] && timeout $(( $(left) - 5 )) python3 bench/train_step.py --model llama2-7b --lengths 8192 --steps 1 \
  --timeout-min 2 --output "$OUT/train_step_gpu.json" 2>&1 | tail -9
echo "== done in $(( $(date +%s) - START )) s"
