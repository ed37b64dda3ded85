#!/usr/bin/env bash
# Runs the CUDA backend tests on a GPU machine and prints a summary:
#   (a) test_cuda_ops     every op, CUDA vs the fp32 CPU reference (real 35B-A3B shapes + awkward sizes)
#   (b) test_cuda_golden  golden fixtures on the CUDA backend vs transformers' fp32/bf16 runs
#   (c) compute-sanitizer memcheck on the golden test with one prompt (tiny-moe, both checkpoints)
#   (d) test_cuda_graph   recorded decode steps vs eager, bit for bit
#   (e) test_cuda_engine  the engine's greedy output with CUDA-graph decode steps vs all-eager; device vs host sampling
#   (f) test_cuda_sampling  sample_rows on the GPU vs the CPU specification over shapes and parameters
#   (g) test_cuda_vision  vision-tower ops vs the CPU, a random real-shaped tower, the fixtures' image features and
#                         logits, an image request through the engine; memcheck on its op tests
#   (h) test_cuda_spec / test_cuda_flash / test_cuda_gdr  speculative decoding (greedy identity, graphed = eager),
#                         prefill flash attention and the chunked delta rule vs the CPU (when built); memcheck and
#                         racecheck on FlashAttention.Dh256Small
#   (i) bench_model --kernel-times on the tiny model (when bench_model is in BIN_DIR): the CUPTI table comes out
# Usage: tools/gpu_test.sh [BIN_DIR]
#   BIN_DIR holds prebuilt test_cuda_ops / test_cuda_golden (/ test_cuda_graph / test_cuda_engine) (e.g. built on a dev machine and carried);
#   without it the script configures and builds build-gpu/ here (needs the project's build dependencies).
# Logs go to $OUT (or /tmp/ds-gpu-test). DS_BENCH=1 also runs bench_decode (batch 1 and 8, context 1024).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG=${OUT:-/tmp/ds-gpu-test}
mkdir -p "$LOG"
BIN=${1:-}
if [ -z "$BIN" ]; then
  cmake -S "$ROOT" -B "$ROOT/build-gpu" -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 >"$LOG/build.log" 2>&1 &&
    cmake --build "$ROOT/build-gpu" --target test_cuda_ops test_cuda_golden test_cuda_graph test_cuda_engine test_cuda_sampling test_cuda_vision test_cuda_spec test_cuda_flash test_cuda_gdr >>"$LOG/build.log" 2>&1 ||
    { tail -40 "$LOG/build.log"; echo "BUILD FAILED"; exit 1; }
  BIN=$ROOT/build-gpu
fi
export DS_TEST_DATA_DIR=$ROOT/tests/data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
summary=()
step() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  "$@" >"$LOG/$name.log" 2>&1
  local rc=$? t1=$(date +%s)
  local res=$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$LOG/$name.log" | tr '\n' ' ')
  summary+=("$(printf '%-10s rc=%d %4ds  %s' "$name" "$rc" $((t1 - t0)) "$res")")
}
step ops "$BIN/test_cuda_ops"
step golden "$BIN/test_cuda_golden"
step memcheck env DS_GOLDEN_PROMPTS=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
  "$BIN/test_cuda_golden" --gtest_filter='*tiny_moe*'
[ -x "$BIN/test_cuda_graph" ] && step graph "$BIN/test_cuda_graph"
[ -x "$BIN/test_cuda_engine" ] && step engine "$BIN/test_cuda_engine"
[ -x "$BIN/test_cuda_sampling" ] && step sampling "$BIN/test_cuda_sampling"
[ -x "$BIN/test_cuda_spec" ] && step spec "$BIN/test_cuda_spec"
if [ -x "$BIN/test_cuda_flash" ]; then
  step flash "$BIN/test_cuda_flash"
  step fmemcheck compute-sanitizer --tool memcheck --error-exitcode 99 "$BIN/test_cuda_flash" \
    --gtest_filter='FlashAttention.Dh256Small'
  step fracecheck compute-sanitizer --tool racecheck --error-exitcode 99 "$BIN/test_cuda_flash" \
    --gtest_filter='FlashAttention.Dh256Small'
fi
[ -x "$BIN/test_cuda_gdr" ] && step gdr "$BIN/test_cuda_gdr"
if [ -x "$BIN/test_cuda_vision" ]; then
  step vision "$BIN/test_cuda_vision"
  step vmemcheck compute-sanitizer --tool memcheck --error-exitcode 99 "$BIN/test_cuda_vision" \
    --gtest_filter='CudaVision.Attention:CudaVision.Rope2d:CudaVision.LayerNorm:*Golden*tiny_moe_int4*'
fi
# (i) `bench --kernel-times` (CUPTI per-kernel times, session 14) on the tiny model: runs, and prints its table.
if [ -x "$BIN/bench_model" ]; then
  step ktimes bash -c "'$BIN/bench_model' bench --random-weights --config '$ROOT/tests/data/tiny-moe/tiny-moe-int4/config.json' \
    --backend cuda --batch 1,4 --context 32 --prefill none --steps 3 --kernel-times > '$LOG/ktimes.out' 2>&1; rc=\$?; \
    cat '$LOG/ktimes.out'; [ \$rc = 0 ] && grep -q 'kernels per step; a kernel ran' '$LOG/ktimes.out' && grep -q '^| .k_' '$LOG/ktimes.out'"
fi
if [ "${DS_BENCH:-0}" = 1 ] && [ -x "$BIN/bench_decode" ]; then
  step bench1 "$BIN/bench_decode" 1 1024 20
  step bench8 "$BIN/bench_decode" 8 1024 20
fi
echo "==== op errors (CUDA vs CPU, rel L2) ===="
grep -h 'rel L2' "$LOG/ops.log"
echo "==== golden ===="
grep -hE 'ratio|batched' "$LOG/golden.log"
[ -f "$LOG/vision.log" ] && { echo "==== vision ===="; grep -hE 'rel L2|tokens' "$LOG/vision.log"; }
echo "==== bench ===="
cat "$LOG"/bench*.log 2>/dev/null
[ -f "$LOG/ktimes.log" ] && grep -hE -A6 '^### Kernel times' "$LOG/ktimes.log" | head -20
echo "==== failures ===="
grep -hE 'Failure|FAILED' "$LOG/ops.log" "$LOG/golden.log" "$LOG"/golden_sr.log "$LOG"/graph.log "$LOG"/engine.log "$LOG"/sampling.log "$LOG"/vision.log "$LOG"/spec.log "$LOG"/flash.log "$LOG"/gdr.log 2>/dev/null | head -30
grep -hE 'ERROR SUMMARY|========= ' "$LOG/memcheck.log" "$LOG"/memchk_sr.log "$LOG"/vmemcheck.log 2>/dev/null | head -20
echo "==== summary ===="
printf '%s\n' "${summary[@]}"
