#!/usr/bin/env bash
# The test checkpoints and golden tensors are stored xz-compressed (tests/data/**/*.safetensors.xz) to keep
# the repository small; this unpacks each next to itself (byte-identical to the reference files, git-ignored).
# Idempotent: only missing or stale files are unpacked. Run by CMake at configure time and by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/../tests/data"
find . -name '*.safetensors.xz' -print0 | while IFS= read -r -d '' f; do
  out="${f%.xz}"
  if [ ! -f "$out" ] || [ "$f" -nt "$out" ]; then
    xz -d -k -c "$f" > "$out.tmp" && mv "$out.tmp" "$out"
  fi
done
