#!/usr/bin/env bash
# Runs the two reference dumps of issues #9 and #7 (item 1) on a machine with torch, transformers, safetensors,
# Pillow, torchvision and numpy, from any directory: tools/run_reference_dumps.sh OUTDIR
#
# OUTDIR/raw/      everything the dumps write (full float32 vision dump with .pil22/.torch_u8 variants, logs)
# OUTDIR/stage/    exactly what goes into tests/data, laid out the same way, *.safetensors already xz-compressed:
#   stage/tiny-dense3/golden.json, golden.safetensors.xz, tiny-dense3-bf16/{config.json, model.safetensors.xz, ...}
#   stage/vision/*.png|jpg|webp, vision-ref.safetensors.xz
# Copy with: cp -r OUTDIR/stage/. tests/data/   (then scripts/unpack-test-data.sh, or re-run cmake)
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/unpack-test-data.sh
python3 -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'
rm -rf "$OUT/raw" "$OUT/stage"
mkdir -p "$OUT/raw" "$OUT/stage/vision"

echo "== 1/2 tiny-dense3 (issue #9): 3 DeltaNet value heads per key head"
CUDA_VISIBLE_DEVICES= python3 tools/dense3_ref_dump.py --src tests/data/tiny-dense/tiny-dense-bf16 \
  --out "$OUT/raw/tiny-dense3" 2>&1 | tee "$OUT/raw/dense3.log"

echo "== 2/2 vision preprocessing on more pictures (issue #7 item 1)"
python3 tools/make_test_images.py "$OUT/stage/vision" 2>&1 | tee "$OUT/raw/images.log"
CUDA_VISIBLE_DEVICES= python3 tools/vision_ref_dump.py --model tests/data/tiny-moe/tiny-moe-bf16 \
  --out "$OUT/raw/vision-ref-full.safetensors" --compact "$OUT/raw/vision-ref.safetensors" \
  "$OUT"/stage/vision/*.png "$OUT"/stage/vision/*.jpg "$OUT"/stage/vision/*.webp 2>&1 | tee "$OUT/raw/vision.log"

# Stage for tests/data: safetensors xz-compressed like the rest of the test data.
cp -r "$OUT/raw/tiny-dense3" "$OUT/stage/tiny-dense3"
cp "$OUT/raw/vision-ref.safetensors" "$OUT/stage/vision/"
find "$OUT/stage" -name '*.safetensors' -exec xz -9 -f {} \;

echo "== summary"
grep -h "^prompt\|^wrote" "$OUT/raw/dense3.log" || true
grep -h "reconstruction\|refused\|warning" "$OUT/raw/vision.log" || true
echo "staged files (copy OUTDIR/stage/. into tests/data/):"
(cd "$OUT/stage" && find . -type f | sort | xargs ls -l | awk '{printf "  %8d  %s\n", $5, $9}')
echo "total staged bytes: $(du -cb $(find "$OUT/stage" -type f) | tail -1 | cut -f1)"
echo "done in $(( $(date +%s) - start )) s"
