#!/usr/bin/env python3
"""Per-kernel device time of one model step from an Nsight Compute CSV.

Profile (on the GPU machine) with
  ncu --csv --log-file ncu.csv --print-units base --print-kernel-base function \
      --metrics gpu__time_duration.sum bench_model bench --random-weights --config CFG --backend cuda \
      --batch 1,64 --context 1024 --steps 1 --no-graph --prefill 4096
then `python3 tools/ncu_steps.py ncu.csv`. Every forward starts with the embedding kernel (k_embed), whose grid
is the step's token count: the script cuts the kernel stream there and prints, for the last step of each token
count, the time per kernel name (sum, launches, share), sorted.

`--launches` also lists every launch of those steps in order (grid, block, µs and, when the CSV has them, DRAM bytes
read and written and their rate): add `--clock-control none` (real clocks, as in a run) and
`--metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum` to the ncu command.

`--stalls` adds, per kernel name, where its warps' cycles between issues go (session 24: a small kernel's share of
`no_instruction`, instruction fetch, is what a compact, typed form of it removes): add
`--section WarpStateStats` to the ncu command (its `smsp__average_warps_issue_stalled_*_per_issue_active` metrics;
with only that section a batch-1 step of ~450 launches profiles in a few minutes).
"""
import csv
import sys
from collections import OrderedDict, defaultdict


def launches_of(path):
    """[(name, grid, block, {metric: value})] in launch order, one per kernel launch (the CSV's ID)."""
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # drop ncu's own log lines
    by_id = OrderedDict()
    for r in csv.DictReader(lines):
        k = by_id.setdefault(r["ID"], (r["Kernel Name"], r["Grid Size"], r.get("Block Size", ""), {}))
        k[3][r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
    return [k for k in by_id.values() if "gpu__time_duration.sum" in k[3]]


STALL, RATIO = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"


def main(path, list_launches, stalls=False):
    steps = []  # (tokens, [launch])
    for k in launches_of(path):
        if k[0].startswith("k_embed"):
            steps.append((k[1].strip("()").split(",")[0].strip(), []))
        if steps:
            steps[-1][1].append(k)
    last = OrderedDict()
    for toks, ks in steps:
        last[toks] = ks
    for toks, ks in last.items():
        tot = sum(k[3]["gpu__time_duration.sum"] for k in ks)
        agg = defaultdict(lambda: [0.0, 0])
        for k in ks:
            agg[k[0]][0] += k[3]["gpu__time_duration.sum"]
            agg[k[0]][1] += 1
        print(f"\n## step with {toks} tokens: {len(ks)} kernels, {tot / 1e6:.3f} ms of kernel time\n")
        print("| kernel | ms | launches | us/launch | share |\n|---|---|---|---|---|")
        for n, (ns, c) in sorted(agg.items(), key=lambda kv: -kv[1][0]):
            print(f"| {n[:60]} | {ns / 1e6:.3f} | {c} | {ns / c / 1e3:.1f} | {100 * ns / tot:.1f}% |")
        stall_keys = sorted({m for k in ks for m in k[3] if m.startswith(STALL) and m.endswith(RATIO)})
        if stalls and stall_keys:
            by = defaultdict(lambda: defaultdict(list))
            for n, _, _, m in ks:
                for key in stall_keys:
                    if key in m:
                        by[n][key].append(m[key])
            print("\n| kernel | cycles between issues | no_instruction | top stall reasons |\n|---|---|---|---|")
            for n, (ns, c) in sorted(agg.items(), key=lambda kv: -kv[1][0]):
                mean = {key[len(STALL):-len(RATIO)]: sum(v) / len(v) for key, v in by[n].items() if v}
                total = sum(mean.values())
                if not total:
                    continue
                top = ", ".join(f"{r} {v:.1f}" for r, v in sorted(mean.items(), key=lambda kv: -kv[1])[:3])
                print(f"| {n[:60]} | {total:.1f} | {100 * mean.get('no_instruction', 0.0) / total:.0f}% | {top} |")
        if list_launches:
            print("\n| # | kernel | grid | block | us | MB read | MB written | GB/s |\n|---|---|---|---|---|---|---|---|")
            for i, (n, grid, block, m) in enumerate(ks):
                ns = m["gpu__time_duration.sum"]
                rd, wr = m.get("dram__bytes_read.sum"), m.get("dram__bytes_write.sum")
                mb = lambda b: "" if b is None else f"{b / 1e6:.2f}"
                rate = "" if rd is None or wr is None else f"{(rd + wr) / ns:.0f}"
                print(f"| {i} | {n[:40]} | {grid} | {block} | {ns / 1e3:.1f} | {mb(rd)} | {mb(wr)} | {rate} |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a not in ("--launches", "--stalls")]
    if len(args) != 1:
        sys.exit("usage: ncu_steps.py NCU.csv [--launches] [--stalls]")
    main(args[0], "--launches" in sys.argv[1:], "--stalls" in sys.argv[1:])
