#!/usr/bin/env bash
# Runs every test that needs no GPU: builds (scripts/setup.sh), installs the test-only npm clients
# (tests/package-lock.json), then runs the unit, golden, CLI, fuzz and end-to-end tests through ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ ! -d tests/node_modules ] || [ tests/package-lock.json -nt tests/node_modules/.package-lock.json ]; then
  (cd tests && npm ci --no-audit --no-fund --loglevel=error)
fi
# ctest runs one test per core and the CPU backend's OpenMP loops use every core too: with OpenMP's default
# (spinning) wait policy the oversubscribed threads burn each other's time (a speculative test: 58 s spinning vs
# 9 s passive on 2 cores). Passive waiting changes no result (same threads, same work split).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
ctest --test-dir build --output-on-failure -j"$(nproc)" --timeout 1200
