#!/usr/bin/env bash
# One GPU-machine call: correctness (tools/gpu_test.sh + test_cuda_graph), then `deltaserve bench` (as the
# bench_model binary) on the 35B-A3B config. Usage on the GPU machine, from the repo root:
#   bench/run_gpu.sh BIN_DIR [bench flags...]
# BIN_DIR holds test_cuda_ops, test_cuda_golden, test_cuda_graph, test_cuda_spec, bench_model (and lib/ with shared libraries
# the dev machine linked that the GPU image may lack). Logs and the bench table go to $OUT.
set -u
BIN=$(cd "$1" && pwd); shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/ds-bench}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$BIN/lib:${LD_LIBRARY_PATH:-}
command -v xz >/dev/null && bash "$ROOT/scripts/unpack-test-data.sh" ||
  python3 - "$ROOT/tests/data" <<'PY'
import lzma, pathlib, sys
for f in pathlib.Path(sys.argv[1]).rglob("*.safetensors.xz"):
    out = f.with_suffix("")
    if not out.exists(): out.write_bytes(lzma.decompress(f.read_bytes()))
PY
export DS_TEST_DATA_DIR=$ROOT/tests/data
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  "$ROOT/tools/gpu_test.sh" "$BIN" 2>&1 | tail -25
  [ -x "$BIN/test_cuda_spec" ] && { "$BIN/test_cuda_spec" >"$OUT/spec.log" 2>&1; echo "test_cuda_spec rc=$? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/spec.log" | tr '\n' ' ')"; }
  "$BIN/test_cuda_graph" >"$OUT/graph.log" 2>&1; echo "test_cuda_graph rc=$? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/graph.log" | tr '\n' ' ')"
fi
echo "==== bench ===="
"$BIN/bench_model" bench --random-weights --config "$ROOT/bench/configs/qwen3.6-35b-a3b.json" "$@" 2>&1 | tee "$OUT/bench.md"
