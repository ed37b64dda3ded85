#!/usr/bin/env bash
# Runs every test that needs no GPU: builds (scripts/setup.sh), installs the test-only npm clients
# (tests/package-lock.json), then runs the unit, golden, CLI, fuzz and end-to-end tests through ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ ! -d tests/node_modules ] || [ tests/package-lock.json -nt tests/node_modules/.package-lock.json ]; then
  (cd tests && npm ci --no-audit --no-fund --loglevel=error)
fi
ctest --test-dir build --output-on-failure -j"$(nproc)" --timeout 1200
