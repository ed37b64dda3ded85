#!/usr/bin/env python3
"""Per-kernel device time of one model step from an Nsight Compute CSV.

Profile (on the GPU machine) with
  ncu --csv --log-file ncu.csv --print-units base --print-kernel-base function \
      --metrics gpu__time_duration.sum bench_model bench --random-weights --config CFG --backend cuda \
      --batch 1,64 --context 1024 --steps 1 --no-graph --prefill 4096
then `python3 tools/ncu_steps.py ncu.csv`. Every forward starts with the embedding kernel (k_embed), whose grid
is the step's token count: the script cuts the kernel stream there and prints, for the last step of each token
count, the time per kernel name (sum, launches, share), sorted.
"""
import csv
import sys
from collections import OrderedDict, defaultdict


def main(path):
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # drop ncu's own log lines
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        rows.append((r["Kernel Name"], r["Grid Size"], float(r["Metric Value"].replace(",", ""))))
    steps = []  # (tokens, [(name, ns)])
    for name, grid, ns in rows:
        if name.startswith("k_embed"):
            toks = grid.strip("()").split(",")[0].strip()
            steps.append((toks, []))
        if steps:
            steps[-1][1].append((name, ns))
    last = OrderedDict()
    for toks, ks in steps:
        last[toks] = ks
    for toks, ks in last.items():
        tot = sum(ns for _, ns in ks)
        agg = defaultdict(lambda: [0.0, 0])
        for n, ns in ks:
            agg[n][0] += ns
            agg[n][1] += 1
        print(f"\n## step with {toks} tokens: {len(ks)} kernels, {tot / 1e6:.3f} ms of kernel time\n")
        print("| kernel | ms | launches | us/launch | share |\n|---|---|---|---|---|")
        for n, (ns, c) in sorted(agg.items(), key=lambda kv: -kv[1][0]):
            print(f"| {n[:60]} | {ns / 1e6:.3f} | {c} | {ns / c / 1e3:.1f} | {100 * ns / tot:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1])
