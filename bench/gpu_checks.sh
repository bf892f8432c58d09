#!/bin/bash
# Every GPU-only check in one run, most important first, within a time budget (seconds, default 600):
#   bash bench/gpu_checks.sh [OUT_DIR]
#   bash bench/gpu_checks.sh --dry-run    # here, without a GPU: pack what the GPU machine lacks, print the
#                                         # device calls that carry it and every check's command
#   bash bench/gpu_checks.sh --rehearse [OUT_DIR]   # here, without a GPU: every check's command run end to end
#                                         # on the CPU, with bench.common's llama-tiny (a 2-layer LLaMA2 shape)
#                                         # for SmolLM2 and LLaMA2, a step or two and short lengths: the same
#                                         # scripts, children and code paths, so that a GPU call is never the
#                                         # first run of a changed command (174 s measured on 2 quiet cores,
#                                         # the PoSE check 35 s of it)
# 1. the S2 kernels on CUDA against the float64 reference;
# 2. the real-model S2-transfer grid: SmolLM2-135M 8k -> 16k on the shipped books, base, zero-shot PI,
#    LongQLoRA (YaRN + S2, the default), the paper's PI + S2, LoRA + full attention (bench/reproduce.py);
# 3. train short, read long: SmolLM2-135M 8k -> 32k, PoSE (YaRN x4 + QLoRA, an 8k window of 32k samples)
#    against zero-shot YaRN x4, perplexity at 8k, 16k and 32k (bench/reproduce.py --factor 4 --rows pose);
# 4. LLaMA2 7B/13B memory under a 32 GiB cap, S2 vs full attention, the 7B training-step setups.
# Results: JSON files in OUT_DIR (a rehearsal's default: a new folder under /tmp). The GPU machine has no
# package index: bench/gpu_carry.py packs the wheels and the SmolLM2 GGUF here and joins them there (into
# /tmp/carry), or put wheels in .whl/. Exit status: the number of checks that failed (or were skipped).
#
# The slots (seconds each check may take), from what has been measured on one H100 (bench/results/*_gpu.json):
#   S2 test          60 s: the test's tensors take milliseconds; the slot is the interpreter, torch's CUDA start
#                    and pytest's collection (seconds each), with room to spare. Not measured on its own yet.
#   reproduce.py     210 s (less when less is left): NOT derived from a measurement, as SmolLM2 has not trained on a
#                    GPU yet (docs/gpu-results.md). What it asks: 3 trained rows x 100 steps x 2 micro-batches x
#                    16,384 tokens = 9.8M tokens, i.e. about 55k tokens/s over the ~180 s left after the 5
#                    evaluations (3 lengths x 16k tokens each). The runs' metrics.jsonl give the tokens/s: resize
#                    --steps to slot_s x tokens/s / (3 x 2 x 16,384) after the first run. Finished rows are reused.
#                    (300 s and 150 steps until the PoSE check below took 90 s of it.)
#   PoSE             90 s (less when less is left): NOT derived from a measurement either, the same assumed ~55k
#                    tokens/s (full attention in the 8k window, not S2 over 16k: it may differ). What it asks: 1
#                    trained row x 120 steps x 2 micro-batches x 8,192 tokens (the window computed of each 32,768-
#                    token sample) = 2.0M tokens, ~36 s; 2 evaluations (zero-shot YaRN, PoSE) at 3 lengths (8k,
#                    16k, 32k) over 32,769 held-out tokens each, ~10 s apiece with the model's load; the training's
#                    start and its held-out watch at 32k (~5% of its time): ~20 s left to spare. Resize --steps to
#                    (slot_s - 40) x tokens/s / (2 x 8,192) from /tmp/reproduce_pose/pose/metrics.jsonl after the
#                    first run. Its own --output: its finished run and evaluations are reused, never another
#                    factor's. Both SmolLM2 checks save a checkpoint every tenth of their steps (bench/reproduce.py).
#   memory_gpu.py    what is left less 150 s (the two checks after it), each model's child --timeout-min 3.5:
#                    memory_gpu.json's steps take 1.22 / 2.33 / 4.96 s (7B at 8k / 16k / 32k) and 2.92 / 3.93 s
#                    (13B at 12k / 16k), each run twice (warm-up + 1 timed): 17 s and 14 s; the build (random
#                    bf16 weights drawn and saved, NF4 load) takes about 20 s for 7B (train_step_gpu.json: a 7B
#                    child took 23 s with 2 steps of 1.2 s), so ~40 s for 13B: ~90 s for both, 3.5 min a model
#                    for a machine twice as slow or a cold disk.
#   attention.py     80 s: the longest step is 55 ms (full attention at 32k, attention_gpu.json), 3 lengths x
#                    (1 timing + 2 memory children; eager is skipped for memory): 9 children of a few seconds
#                    each (interpreter, torch, CUDA context): ~60 s, start-up bound, not throughput bound.
#   train_step.py    what is left less 5 s, each setup's child --timeout-min 2: train_step_gpu.json's 7B setups at
#                    8k took 22.6-23.8 s each (wall_s, build included): ~70 s for the three.
# Budget: 60 + 210 + 90 + ~90 + 80 + ~70 = 600 s, the device's limit of one command. A rehearsal keeps the slots:
# its tiny runs are start-up bound (~10 s an interpreter with torch on 2 busy cores), well inside them.
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry; shift ;;
  --rehearse) MODE=rehearse; shift ;;
esac
DRY=0
[ "$MODE" = dry ] && DRY=1
if [ "$MODE" = rehearse ]; then
  OUT=${1:-${OUT:-$(mktemp -d /tmp/gpu-checks-rehearsal.XXXXXX)}}
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
else
  OUT=${1:-${OUT:-bench/results/gpu}}
  PY=${PYTHON:-python3}
fi
START=$(date +%s)
FAILED=0
left() { echo $(( ${BUDGET:-600} - ($(date +%s) - START) )); }
# check SECONDS COMMAND...: run it within SECONDS (the last lines shown), or print it in a dry run
check() {
  local seconds=$1; shift
  if [ "$DRY" = 1 ]; then echo "+ timeout $seconds $*"; return 0; fi
  if [ "$seconds" -le 10 ]; then
    echo "skipped: $(left) s left"
    [ "$MODE" = rehearse ] && FAILED=$((FAILED + 1))  # a rehearsal runs every check
    return 0
  fi
  local started=$(date +%s)
  timeout "$seconds" "$@" 2>&1 | tail -16
  local status=${PIPESTATUS[0]}
  if [ "$status" != 0 ]; then
    echo "FAILED (exit $status$([ "$status" = 124 ] && echo ", past its $seconds s"))"
    FAILED=$((FAILED + 1))
  fi
  echo "-- $(( $(date +%s) - started )) s"
}
# What each check runs: the GPU's sizes, or a rehearsal's tiny ones through the same commands.
if [ "$MODE" = rehearse ]; then
  REPRODUCE=(--model llama-tiny --steps 2 --grad-accum 1 --train-len 512 --seq-lens 256,512 --eval-tokens 1025
             --output "$OUT/reproduce_runs")
  # llama-tiny's 4k window x 4 = a 16k target: 16k-token samples, a 512-token window computed of each
  POSE=(--model llama-tiny --steps 2 --grad-accum 1 --train-len 512 --seq-lens 256,512,1024 --eval-tokens 1025
        --output "$OUT/pose_runs")
  MEMORY_GPU=(--allow-cpu --models llama-tiny --lengths 256 512)
  ATTENTION=(--lengths 512)
  TRAIN_STEP=(--model llama-tiny --lengths 512 --setups bf16-lora-full qlora-full longqlora)  # the GPU's default setups
else
  REPRODUCE=(--steps 100 --grad-accum 2 --seq-lens 4096,8192,16384 --output /tmp/reproduce)
  POSE=(--steps 120 --grad-accum 2 --train-len 8192 --seq-lens 8192,16384,32768 --eval-tokens 32769
        --output /tmp/reproduce_pose)
  MEMORY_GPU=()
  ATTENTION=(--lengths 8192 16384 32768)
  TRAIN_STEP=(--model llama2-7b --lengths 8192)
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$MODE" = dry ]; then
  python3 bench/gpu_carry.py pack || exit 1
  echo "== the device calls, in order"
  python3 bench/gpu_carry.py plan || exit 1
  echo "== the checks the last call runs"
elif [ "$MODE" = rehearse ]; then
  mkdir -p "$OUT"
  echo "rehearsal on the CPU with $PY: results in $OUT"
else
  mkdir -p "$OUT"
  WHEELS=$(ls /tmp/carry/wheels/*.whl .whl/*.whl 2>/dev/null)
  if [ -n "$WHEELS" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS \
      && export PYTHONPATH=/tmp/site || exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
echo "== S2 on CUDA vs the float64 reference ($(left) s left)"
check 60 "$PY" -m pytest -q -p no:cacheprovider tests/backends/test_s2.py -k cuda
echo "== SmolLM2-135M 8k -> 16k: does S2 training hold under full attention? ($(left) s left)"
check $(( $(left) < 240 ? $(left) - 30 : 210 )) "$PY" bench/reproduce.py "${REPRODUCE[@]}" \
  --rows longqlora,longqlora-pi,lora-bf16-full --results reproduce_gpu --results-dir "$OUT"
echo "== SmolLM2-135M 8k -> 32k: PoSE in an 8k window vs zero-shot YaRN ($(left) s left)"
check $(( $(left) < 120 ? $(left) - 30 : 90 )) "$PY" bench/reproduce.py "${POSE[@]}" \
  --factor 4 --zero-shot yarn --rows pose --results pose_gpu --results-dir "$OUT"
echo "== bench/memory_gpu.py ($(left) s left)"
check $(( $(left) - 150 )) "$PY" bench/memory_gpu.py "${MEMORY_GPU[@]}" --timeout-min 3.5 --output "$OUT/memory_gpu.json"
echo "== bench/attention.py ($(left) s left)"
check 80 "$PY" bench/attention.py "${ATTENTION[@]}" --output "$OUT/attention_gpu.json"
echo "== bench/train_step.py, LLaMA2-7B at 8k ($(left) s left)"
check $(( $(left) - 5 )) "$PY" bench/train_step.py "${TRAIN_STEP[@]}" --steps 1 --timeout-min 2 \
  --output "$OUT/train_step_gpu.json"
echo "== done in $(( $(date +%s) - START )) s, $FAILED failed"
exit "$FAILED"
