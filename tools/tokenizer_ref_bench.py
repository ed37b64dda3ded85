#!/usr/bin/env python3
"""Reference side of bench/tokenizer_bench.cpp: HF `tokenizers` load time and single-thread encode MB/s on
the same text file, plus the same FNV-1a hashes of the text and of the ids (int32 little-endian), so the
two implementations are checked for identical ids on the whole benchmark text.

  bench/tokenizer_bench.sh                      # writes build-tok/tokenizer_bench.txt, prints our numbers
  python3 tools/tokenizer_ref_bench.py TOKENIZER_JSON build-tok/tokenizer_bench.txt
"""
import os
import struct
import sys
import time


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # single thread, like our benchmark
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, __version__

    path, text_path = sys.argv[1], sys.argv[2]
    raw = open(text_path, "rb").read()
    text = raw.decode("utf-8")
    loads = []
    for _ in range(5):
        t0 = time.perf_counter()
        tok = Tokenizer.from_file(path)
        loads.append(time.perf_counter() - t0)
    tok = Tokenizer.from_file(path)
    t0 = time.perf_counter()
    ids = tok.encode(text, add_special_tokens=False).ids
    cold = time.perf_counter() - t0
    warm = min(
        (lambda t: (tok.encode(text, add_special_tokens=False), time.perf_counter() - t)[1])(time.perf_counter())
        for _ in range(3)
    )
    mb = len(raw) / 1e6
    packed = struct.pack("<%di" % len(ids), *ids)
    print(f"tokenizers     {__version__}, {path}")
    print(f"text           {len(raw)} bytes, fnv1a {fnv1a(raw):016x}")
    print(f"ids            {len(ids)}, fnv1a(int32 LE) {fnv1a(packed):016x}")
    print(f"load           first {loads[0] * 1e3:.1f} ms, best of 5 {min(loads) * 1e3:.1f} ms")
    print(f"encode cold    {cold:.3f} s  {mb / cold:.2f} MB/s")
    print(f"encode warm    {warm:.3f} s  {mb / warm:.2f} MB/s")


if __name__ == "__main__":
    main()
