#!/bin/bash
# Every GPU-only check in one run, most important first, within a time budget (seconds, default 600):
#   bash bench/gpu_checks.sh [OUT_DIR]
#   bash bench/gpu_checks.sh --dry-run    # here, without a GPU: pack what the GPU machine lacks, print the
#                                         # device calls that carry it and every check's command
# 1. the S2 kernels on CUDA against the float64 reference;
# 2. the real-model S2-transfer grid: SmolLM2-135M 8k -> 16k on the shipped books, base, zero-shot PI,
#    LongQLoRA (YaRN + S2, the default), the paper's PI + S2, LoRA + full attention (bench/reproduce.py);
# 3. LLaMA2 7B/13B memory under a 32 GiB cap, S2 vs full attention, the 7B training-step setups.
# Results: JSON files in OUT_DIR. The GPU machine has no package index: bench/gpu_carry.py packs the
# wheels and the SmolLM2 GGUF here and joins them there (into /tmp/carry), or put wheels in .whl/.
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-${OUT:-bench/results/gpu}}
START=$(date +%s)
left() { echo $(( ${BUDGET:-600} - ($(date +%s) - START) )); }
# check SECONDS COMMAND...: run it within SECONDS (the last lines shown), or print it in a dry run
check() {
  local seconds=$1; shift
  if [ "$DRY" = 1 ]; then echo "+ timeout $seconds $*"; return 0; fi
  [ "$seconds" -gt 10 ] || { echo "skipped: $(left) s left"; return 0; }
  timeout "$seconds" "$@" 2>&1 | tail -16
}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY" = 1 ]; then
  python3 bench/gpu_carry.py pack || exit 1
  echo "== the device calls, in order"
  python3 bench/gpu_carry.py plan || exit 1
  echo "== the checks the last call runs"
else
  mkdir -p "$OUT"
  WHEELS=$(ls /tmp/carry/wheels/*.whl .whl/*.whl 2>/dev/null)
  if [ -n "$WHEELS" ]; then
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS \
      && export PYTHONPATH=/tmp/site || exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
echo "== S2 on CUDA vs the float64 reference ($(left) s left)"
check 60 python3 -m pytest -q -p no:cacheprovider tests/backends/test_s2.py -k cuda
echo "== SmolLM2-135M 8k -> 16k: does S2 training hold under full attention? ($(left) s left)"
check $(( $(left) < 330 ? $(left) - 30 : 300 )) python3 bench/reproduce.py --steps 150 --grad-accum 2 \
  --seq-lens 4096,8192,16384 --rows longqlora,longqlora-pi,lora-bf16-full --output /tmp/reproduce --results reproduce_gpu
[ "$DRY" = 1 ] || cp bench/results/reproduce_gpu.* "$OUT"/ 2>/dev/null
echo "== bench/memory_gpu.py ($(left) s left)"
check $(( $(left) - 150 )) python3 bench/memory_gpu.py --timeout-min 3.5 --output "$OUT/memory_gpu.json"
echo "== bench/attention.py ($(left) s left)"
check 80 python3 bench/attention.py --lengths 8192 16384 32768 --output "$OUT/attention_gpu.json"
echo "== bench/train_step.py, LLaMA2-7B at 8k ($(left) s left)"
check $(( $(left) - 5 )) python3 bench/train_step.py --model llama2-7b --lengths 8192 --steps 1 \
  --timeout-min 2 --output "$OUT/train_step_gpu.json"
echo "== done in $(( $(date +%s) - START )) s"
