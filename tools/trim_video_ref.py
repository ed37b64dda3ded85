#!/usr/bin/env python3
"""Keeps the part of tools/video_ref_dump.py's output that tests/unit/test_video.cpp reads (pure Python, no numpy):

  video-ref.safetensors -> tests/data/vision/video-ref.safetensors (xz-compressed by the caller)
    indices, timestamps, video_grid_thw, input_ids, position_ids, rope_deltas  (unchanged)
    pixel_levels (uint8) when present, else pixel_values_videos (float32)
    features                                                                   (unchanged, small)
    logits_last  float32 [K, V]  the last K rows of logits, logits_rows int64 [K] their row numbers
  video-ref.json -> tests/data/vision/video-ref.json without the bulky keys (input_ids are in the tensors)

usage: tools/trim_video_ref.py SRC_DIR DST_DIR [--last K]
"""
import json
import struct
import sys

SIZES = {"F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BF16": 2, "F16": 2, "BOOL": 1}


def read(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    meta = h.pop("__metadata__", {})
    data = b[8 + n:]
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in h.items()}, meta


def write(path, tensors, meta):
    h, off, blobs = {}, 0, []
    for k in sorted(tensors):
        dt, shape, raw = tensors[k]
        h[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    if meta:
        h["__metadata__"] = meta
    hb = json.dumps(h, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


def main():
    src, dst = sys.argv[1], sys.argv[2]
    last = int(sys.argv[sys.argv.index("--last") + 1]) if "--last" in sys.argv else 4
    t, meta = read(f"{src}/video-ref.safetensors")
    out = {k: t[k] for k in ["indices", "timestamps", "video_grid_thw", "input_ids", "position_ids", "rope_deltas",
                             "features", "mm_token_type_ids"] if k in t}
    if "pixel_levels" in t:
        out["pixel_levels"] = t["pixel_levels"]
    elif "pixel_values_videos" in t:
        out["pixel_values_videos"] = t["pixel_values_videos"]
    if "logits" in t:
        dt, (T, V), raw = t["logits"]
        k = min(last, T)
        row = V * SIZES[dt]
        out["logits_last"] = (dt, [k, V], raw[(T - k) * row:])
        out["logits_rows"] = ("I64", [k], b"".join(struct.pack("<q", r) for r in range(T - k, T)))
    write(f"{dst}/video-ref.safetensors", out, meta)
    js = json.load(open(f"{src}/video-ref.json"))
    for k in ["input_ids"]:
        js.pop(k, None)
    json.dump(js, open(f"{dst}/video-ref.json", "w"), indent=1)
    print("kept:", {k: (v[0], v[1]) for k, v in sorted(out.items())})


if __name__ == "__main__":
    main()
