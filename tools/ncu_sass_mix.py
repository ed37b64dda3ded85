#!/usr/bin/env python3
"""Instruction mix and stall reasons of one kernel from Nsight Compute's per-instruction (source page) CSV.

Profile on the GPU machine, then export one kernel's SASS with its counters:
  ncu --set full --import-source no -k 'regex:KERNEL' --launch-skip N --launch-count C -o rep BINARY ARGS...
  ncu -i rep.ncu-rep --page source --print-source sass --csv --launch-skip i --launch-count 1 > src_i.csv
then `python3 tools/ncu_sass_mix.py src_i.csv [--top N]`: executed warp-level instructions and stall samples per opcode
(e.g. LOP3 against HMMA: how many integer instructions each mma costs), and the stall reasons over the whole kernel.
--top N also lists the N instructions with the most stall samples (address, samples, execution count, SASS, their two
main stall reasons): where the warps wait, and how often that code runs (a prologue runs once per warp, a loop body
once per iteration).
"""
import collections
import csv
import sys


def main(path, top=0):
    with open(path, newline="") as f:
        print(f.readline().strip()[:160])  # the kernel's name
        rows = [r for r in csv.DictReader(f) if r.get("Address", "").startswith("0x")]
    # Some exports list every instruction twice (session 17: `--launch-skip` exports of a two-launch report); an
    # address is one instruction, so keep its first row.
    seen = set()
    rows = [r for r in rows if not (r["Address"] in seen or seen.add(r["Address"]))]
    if not rows:
        sys.exit(f"{path}: no per-instruction rows (expected ncu --page source --print-source sass --csv)")
    num = lambda v: int(v) if v and v.isdigit() else 0
    execd, stalls = collections.Counter(), collections.Counter()
    for r in rows:
        words = r["Source"].split()
        op = (words[1] if words and words[0].startswith("@") and len(words) > 1 else words[0] if words else "?")
        op = op.split(".")[0]
        execd[op] += num(r["Instructions Executed"])
        stalls[op] += num(r["Warp Stall Sampling (All Samples)"])
    te, ts = sum(execd.values()) or 1, sum(stalls.values()) or 1
    print(f"{len(rows)} instructions, {te} warp-level instructions executed, {ts} stall samples")
    for op, n in execd.most_common(20):
        print(f"  {op:10s} executed {n:12d} ({100 * n / te:5.1f}%)   stall samples {stalls[op]:7d} ({100 * stalls[op] / ts:5.1f}%)")
    reasons = collections.Counter()
    for r in rows:
        for c, v in r.items():
            if c.startswith("stall_") and "Not Issued" not in c:
                reasons[c[6:]] += num(v)
    tr = sum(reasons.values()) or 1
    print("stall reasons: " + ", ".join(f"{k} {100 * v / tr:.1f}%" for k, v in reasons.most_common(10)))
    if top > 0:
        print(f"top {top} instructions by stall samples (address, samples, executed, SASS, main reasons):")
        for r in sorted(rows, key=lambda r: -num(r["Warp Stall Sampling (All Samples)"]))[:top]:
            why = sorted(((num(v), c[6:]) for c, v in r.items() if c.startswith("stall_") and "Not Issued" not in c),
                         reverse=True)[:2]
            print(f"  {r['Address']} {num(r['Warp Stall Sampling (All Samples)']):6d} {num(r['Instructions Executed']):9d}  "
                  f"{r['Source'][:64]:64s} " + ", ".join(f"{k} {v}" for v, k in why if v))


if __name__ == "__main__":
    args = sys.argv[1:]
    top = 0
    if len(args) == 3 and args[1] == "--top" and args[2].isdigit():
        top = int(args[2])
        args = args[:1]
    if len(args) != 1:
        sys.exit(__doc__)
    main(args[0], top)
