#!/usr/bin/env bash
# Runs every test that needs no GPU: builds (scripts/setup.sh), then the unit/golden tests (ctest),
# the bounded fuzz run, and the end-to-end tests with the official openai npm client.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
ctest --test-dir build --output-on-failure -j"$(nproc)" --timeout 1200
