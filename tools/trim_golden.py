#!/usr/bin/env python3
"""Copies a fixture's golden.safetensors without the bf16-reference logits and the image pixel values,
keeping what tests need of them in bf16ref-errors.json: the relative L2 error of the reference's own bf16
run against its fp32 run, per prompt and per teacher-forced step (the error scale the CUDA backend is held
to). Pixel values are identical across fixtures that share image.png; tests read them from tiny-moe.

usage: tools/trim_golden.py SRC_FIXTURE_DIR DST_DIR   (pure Python, no numpy needed)
"""
import json, math, struct, sys
from array import array

src, dst = sys.argv[1], sys.argv[2]
raw = open(f"{src}/golden.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
base = 8 + n

def f32(name):
    b, e = header[name]["data_offsets"]
    a = array("f")
    a.frombytes(raw[base + b:base + e])
    return a, header[name]["shape"]

def rel(a, b):
    num = sum((x - y) ** 2 for x, y in zip(a, b))
    den = sum(y * y for y in b)
    return math.sqrt(num / den)

errors = {}
for name in sorted(header):
    if ".bf16ref." not in name:
        continue
    ref_name = name.replace(".bf16ref.", ".fp32.")
    a, shape = f32(name)
    r, _ = f32(ref_name)
    entry = {"all_rows": rel(a, r)}
    if name.endswith("gen_logits"):
        V = shape[1]
        entry["per_step"] = [rel(a[s * V:(s + 1) * V], r[s * V:(s + 1) * V]) for s in range(shape[0])]
    errors[name] = entry

keep = {k: v for k, v in header.items() if k != "__metadata__" and ".bf16ref." not in k and k != "image.pixel_values"}
out_header, blobs, off = {}, [], 0
for k in sorted(keep):
    b, e = keep[k]["data_offsets"]
    out_header[k] = {"dtype": keep[k]["dtype"], "shape": keep[k]["shape"], "data_offsets": [off, off + e - b]}
    blobs.append(raw[base + b:base + e])
    off += e - b
hs = json.dumps(out_header, separators=(",", ":")).encode()
hs += b" " * ((8 - (len(hs) + 8) % 8) % 8)
with open(f"{dst}/golden.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(hs)) + hs + b"".join(blobs))
with open(f"{dst}/bf16ref-errors.json", "w") as f:
    json.dump({"source": "relative L2 error of transformers' bf16 run vs its fp32 run (golden.safetensors *.bf16ref.* vs *.fp32.*), computed by tools/trim_golden.py",
               "errors": errors}, f, indent=1)
print(f"wrote {dst}/golden.safetensors ({off} data bytes) and bf16ref-errors.json ({len(errors)} entries)")
