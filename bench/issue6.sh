#!/usr/bin/env bash
# Issue 6's four measurements in one GPU-machine call, for the day an H100 is lent (any NVIDIA GPU runs it):
#   1. batch-1 decode at 1k context: ms/step, tok/s, GB/s against the measured copy rate, time per kernel family;
#   2. 64 sequences at 1k context: aggregate tok/s (default fp32 DeltaNet state, and the opt-in bf16 state);
#   3. prefill of a 4k and a 32k prompt: TTFT and tok/s;
#   4. memory: 64 sequences of 8k context decoded beside the weights (the bench allocates that KV pool and those
#      state slots on the device, then prints weights / KV / state bytes; out of memory is an error, not a number);
#   and, not an item of the issue, the routed experts' knobs at batch 64 (defaults chosen on an H200).
# Usage on the GPU machine, from the repo root: bench/issue6.sh BIN_DIR   (BIN_DIR holds bench_model and lib/, as
# tools/pack_gpu_carry.sh packs them). Each part is its own bench_model process; the tables go to $OUT/issue6-*.md,
# the device line and a summary of the numbers the issue names to stdout. ~6-7 minutes on an H200.
set -u
BIN=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/ds-issue6}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$BIN/lib:${LD_LIBRARY_PATH:-}
CFG=$ROOT/bench/configs/qwen3.6-35b-a3b.json
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>/dev/null |
  sed 's/^/device: /'
run() {  # name, then bench flags
  local name=$1
  shift
  local t0=$SECONDS
  "$BIN/bench_model" bench --random-weights --config "$CFG" --backend cuda "$@" >"$OUT/issue6-$name.md" 2>&1
  echo "== $name (rc=$?, $((SECONDS - t0)) s): bench $*"
}
# 1 and 2: decode at 1k, both state dtypes in one process (the variants share the weights), with the per-family
# breakdown and CUPTI's per-kernel times.
run decode --prefill none --context 1024 --batch 1,64 --steps 30 --breakdown --kernel-times \
  --variants "fp32-state:;bf16-state:ssm-dtype=bfloat16"
# 3: prefill (median of 3 timed runs after a warm-up at each length).
run prefill --batch none --prefill 4096,32768 --breakdown
# 4: 64 × 8k beside the weights.
run memory --prefill none --context 8192 --batch 64 --steps 10
# Not an item of the issue: the routed experts' knobs at batch 64, whose defaults were chosen on an H200, where those
# kernels are bound per SM (docs/perf.md "Session 38"); on an H100 they should be bound by DRAM, where another ring
# depth or block shape may win. `d` and `d2` are the defaults, first and last.
run knobs --prefill none --context 1024 --batch 64 --steps 30 --kernel-times \
  --variants "d:;ring3:DS_INT4_MOE_RING=3;gur4:DS_INT4_MOE_GU_R=4;tpw4:DS_INT4_MOE_DOWN_TPW=4;regs:DS_INT4_MOE_RING=0;d2:"
echo "== summary (full tables in $OUT/issue6-*.md)"
for f in decode prefill memory knobs; do
  grep -E '^\| [a-z0-9-]+ \| [0-9]+ \| [0-9]+ \||^Device ceilings|^\| (weights on device|KV pool|DeltaNet state)|[Ee]rror' \
    "$OUT/issue6-$f.md"
done
# The batch-1 time by kernel family (issue 6, item 1), default state.
awk '/by kernel family, fp32-state, batch 1,/{p=1} p&&/^$/&&n++>=1{exit} p' "$OUT/issue6-decode.md"
