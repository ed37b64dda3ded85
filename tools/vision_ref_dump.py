#!/usr/bin/env python3
"""Reference dump for deltaserve's vision stage (run where transformers + torch + Pillow exist, e.g. the GPU box).

For each image given, writes to OUT.safetensors (float32 unless noted):
  <name>.pil22          uint8 [H', W', 3]  PIL Image.resize(BICUBIC) to the smart-resize size (Pillow's 22-bit weights)
  <name>.torch_u8       uint8 [H', W', 3]  torchvision F.resize(antialias=True, BICUBIC) on the uint8 tensor
  <name>.pixel_values   [P, 1536]          the processor's output (AutoImageProcessor of --model)
  <name>.grid_thw       int64 [1, 3]
and, with --features, <name>.features [P/4, out_hidden] from the model's vision tower in fp32.
Compare with `deltaserve` through tests/unit/test_vision.cpp-style checks: vision::resize_bicubic with
ResizePrecision::Pil must equal .pil22 exactly, ResizePrecision::Int16 must equal .torch_u8 exactly, and
preprocess_image must equal .pixel_values to ~1e-7.

With --compact FILE, also writes the small form committed under tests/data/vision/: per image
  <name>.pixel_levels   uint8 [P, 1536]   the uint8 level L of every pixel value, where the reference value is
                                          (L / 255 - mean[c]) / std[c] (checked here to 1e-6 for every value;
                                          an image whose values are not on that grid gets float32
                                          <name>.pixel_values instead)
  <name>.grid_thw       int64 [1, 3]
An image the processor refuses gets no tensors; its error is in the metadata (key "<name>.error") of both files.

usage: tools/vision_ref_dump.py --model DIR --out ref.safetensors [--compact small.safetensors] IMG [IMG ...]
       [--features]
"""
import argparse
import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file


def smart_resize(h, w, factor, min_pixels, max_pixels):
    if max(h, w) / min(h, w) > 200:
        raise ValueError("aspect ratio > 200")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    return hb, wb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--features", action="store_true")
    ap.add_argument("--compact")
    ap.add_argument("images", nargs="+")
    a = ap.parse_args()

    from transformers import AutoImageProcessor
    import torchvision.transforms.v2.functional as F

    proc = AutoImageProcessor.from_pretrained(a.model)
    factor = proc.patch_size * proc.merge_size
    size = getattr(proc, "size", None)

    def size_get(key, default):  # a dict in older releases, a SizeDict in transformers 5
        try:
            v = size[key]
        except (KeyError, TypeError, AttributeError):
            v = getattr(size, key, None)
        return default if v is None else v

    min_px = size_get("shortest_edge", getattr(proc, "min_pixels", None) or 65536)
    max_px = size_get("longest_edge", getattr(proc, "max_pixels", None) or 16777216)
    mean = np.array(proc.image_mean, dtype=np.float64)
    std = np.array(proc.image_std, dtype=np.float64)
    print(f"processor {type(proc).__name__}: factor {factor}, min_pixels {min_px}, max_pixels {max_px}, "
          f"mean {mean.tolist()}, std {std.tolist()}")
    out, compact, meta = {}, {}, {"processor": type(proc).__name__}
    model = None
    if a.features:
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32).eval()
    for path in a.images:
        name = os.path.splitext(os.path.basename(path))[0]
        img = ImageOps.exif_transpose(Image.open(path))
        if img.mode != "RGB":  # transformers' convert_to_rgb: alpha over white
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255))
            img = Image.alpha_composite(bg, rgba).convert("RGB")
        try:
            r = proc(images=[img], return_tensors="pt")
        except Exception as e:  # recorded: deltaserve must refuse the picture too
            meta[f"{name}.error"] = f"{type(e).__name__}: {e}"
            print(f"{name}: the processor refused it: {meta[name + '.error']}")
            continue
        pv = r["pixel_values"].float()
        grid = r["image_grid_thw"].long()
        out[f"{name}.pixel_values"] = pv
        out[f"{name}.grid_thw"] = grid
        compact[f"{name}.grid_thw"] = grid
        # Level form: which uint8 value each pixel value came from (channel = column // (D / 3)).
        D = pv.shape[1]
        ch = np.repeat(np.arange(3), D // 3)
        v = pv.double().numpy()
        lv = np.rint((v * std[ch] + mean[ch]) * 255)
        back = ((lv / 255).astype(np.float32) - mean[ch].astype(np.float32)) / std[ch].astype(np.float32)
        err = float(np.abs(back - v).max()) if v.size else 0.0
        if lv.min() >= 0 and lv.max() <= 255 and err <= 1e-6:
            compact[f"{name}.pixel_levels"] = torch.from_numpy(lv.astype(np.uint8))
        else:
            compact[f"{name}.pixel_values"] = pv
        print(f"{name}: {img.width}x{img.height} {img.mode} -> grid {grid.tolist()}, pixel_values {list(pv.shape)}, "
              f"uint8-level reconstruction max error {err:.3g}")
        h, w = smart_resize(img.height, img.width, factor, min_px, max_px)
        if [h, w] != [int(grid[0, 1]) * proc.patch_size, int(grid[0, 2]) * proc.patch_size]:
            print(f"  warning: this script's smart_resize gives {h}x{w}; .pil22/.torch_u8 are at that size")
        out[f"{name}.pil22"] = torch.from_numpy(np.array(img.resize((w, h), Image.BICUBIC)))
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        out[f"{name}.torch_u8"] = F.resize(t, [h, w], interpolation=F.InterpolationMode.BICUBIC,
                                           antialias=True).permute(1, 2, 0).contiguous()
        if model is not None:
            with torch.no_grad():
                feats = model.model.get_image_features(r["pixel_values"], r["image_grid_thw"])
            feats = feats[0] if isinstance(feats, (list, tuple)) else getattr(feats, "pooler_output", feats)
            out[f"{name}.features"] = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.float()
    save_file({k: v.contiguous() for k, v in out.items()}, a.out, metadata=meta)
    print(f"wrote {a.out}: {', '.join(sorted(out))}")
    if a.compact:
        save_file({k: v.contiguous() for k, v in compact.items()}, a.compact, metadata=meta)
        print(f"wrote {a.compact}: {', '.join(sorted(compact))}")


if __name__ == "__main__":
    main()
